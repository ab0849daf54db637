"""The demo's tasks and rewards: pure functions."""

from __future__ import annotations

import pytest

from lightloop.demo import schedule
from lightloop.demo_tasks import KINDS, Opposite, OppositeChoice, Sum, from_row, reward, split
from lightloop.errors import LightloopError


def test_the_exact_answer_gets_1_and_partial_credit_points_the_way() -> None:
    task = Sum(7, 5)
    assert reward(task, "12") == 1.0
    assert reward(task, " 12.\n") == 1.0
    # Tiers never overlap: the right number among words beats any number beats none.
    right_in_words = reward(task, "The answer is 12")
    assert 0.5 < right_in_words <= 0.6
    assert 0.2 < reward(task, "13") <= 0.3
    assert 0 < reward(task, "twelve") <= 0.1
    assert 0 < reward(task, "x" * 200) < reward(task, "x" * 100)  # brevity never saturates
    assert min(reward(task, "12 " + "x" * 500), right_in_words) >= 0.5


def test_an_opposite_is_exact_whatever_its_case_quotes_or_full_stop() -> None:
    task = Opposite("big", ("small", "little"))
    for reply in ("small", "Small.", " **Little**\n", "'small'", '"Small!"'):
        assert reward(task, reply) == 1.0, reply
    sentence = reward(task, "The opposite of 'big' is 'small'.")
    assert 0.5 < sentence < 0.6
    # A wrong word earns nothing, short or not: rewarding it would teach the base model's
    # commonest mistake, echoing the word asked about.
    assert reward(task, "large") == 0.0
    assert reward(task, "big") == 0.0
    assert reward(task, "I do not know that one") == 0.0
    # "smaller" is not "small": words are matched whole.
    assert reward(task, "It is smaller") == 0.0


def test_a_hedge_earns_nothing_and_a_restated_question_is_no_hedge() -> None:
    task = Opposite("hot", ("cold",))
    assert reward(task, "Cold?") == 1.0  # final punctuation does not change the word
    assert reward(task, "hot or cold") == 0.0
    assert reward(task, "cold, not hot") == 0.0
    assert 0.5 < reward(task, "The opposite of 'hot' is cold.") < 0.6
    assert reward(task, "The opposite of cold") == 0.0  # that is 'hot' again
    choice = OppositeChoice("hot", ("cold",), ("loud", "hot", "cold"))
    assert reward(choice, "cold") == 1.0
    assert reward(choice, "loud") == 0.0 and reward(choice, "hot") == 0.0
    assert reward(choice, "cold or loud") == 0.0
    assert 0.5 < reward(choice, "It is cold") < 0.6


def test_each_choice_offers_one_opposite_the_word_itself_and_one_unrelated_word() -> None:
    train, held = split("opposite-choice")
    open_train, open_held = split("opposites")
    # The same words are held out as in the open form.
    assert [t.row()["word"] for t in held] == [t.row()["word"] for t in open_held]
    entries = [{t.row()["word"], *t.answers} for t in open_train + open_held]
    positions = set()
    for task in train + held:
        assert isinstance(task, OppositeChoice)
        word, options = task.word, task.options
        assert len(options) == 3 and word in options
        assert sum(o in task.answers for o in options) == 1
        (other,) = [o for o in options if o != word and o not in task.answers]
        # No offered wrong word is a fair answer: it shares no entry with the word or its answers.
        assert not [e for e in entries if other in e and e & {word, *task.answers}], (word, other)
        positions.add(next(i for i, o in enumerate(options) if o in task.answers))
        assert task.question == f"What is the opposite of '{word}'? Choose from: {', '.join(options)}."
    assert positions == {0, 1, 2}  # the right one is not always in the same place
    assert split("opposite-choice") == (train, held)  # the options are fixed per task


def test_shorter_answers_of_the_same_tier_score_higher_so_groups_seldom_tie() -> None:
    task = Sum(7, 5)
    assert reward(task, "12 is it") > reward(task, "The answer to that is 12")
    assert reward(task, "banana") > reward(task, "a long and winding answer")
    opposite = Opposite("hot", ("cold",))
    assert reward(opposite, "It is cold") > reward(opposite, "The opposite of 'hot' is 'cold'.")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_held_out_tasks_are_never_training_tasks_and_rows_round_trip(kind: str) -> None:
    train, held = split(kind)
    assert len(held) == 32 and len(train) > 100
    assert not {t.question for t in train} & {t.question for t in held}
    assert split(kind) == (train, held)  # the split is fixed
    for task in train + held:
        assert from_row(task.row()) == task


def test_no_opposite_is_another_one_reversed() -> None:
    """So that no held-out task is a training task turned round ("cold" for "hot")."""
    train, held = split("opposites")
    answers = {t.row()["word"]: set(t.answers) for t in train + held}
    assert not [(w, a) for w, ans in answers.items() for a in ans if w in answers.get(a, ())]


def test_the_opposites_agent_shows_the_form_once_with_an_example_that_is_no_task() -> None:
    train, held = split("opposites")
    messages = train[0].messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"] == train[0].question
    word, answer = Opposite.example
    assert messages[1]["content"] == f"What is the opposite of '{word}'?" and messages[2]["content"] == answer
    # Neither the example's word nor its answer is asked about, so no task is trained in the prompt.
    assert not {word, answer} & {t.row()["word"] for t in train + held}
    assert not {word, answer} & {a for t in train + held for a in t.answers}


def test_a_sum_is_asked_without_an_example() -> None:
    assert [m["role"] for m in Sum(7, 5).messages()] == ["system", "user"]


@pytest.mark.parametrize(
    ("steps", "groups", "available", "expected"),
    [(40, 8, 107, (80, 4)), (3, 4, 368, (12, 1)), (14, 8, 107, (56, 2)), (7, 8, 50, (8, 7))],
)
def test_the_dataset_holds_exactly_the_steps_groups_so_none_is_left_over(
    steps: int, groups: int, available: int, expected: tuple[int, int]
) -> None:
    """A leftover group (fewer than the trainer waits for) would never be taken: the demo would
    wait for a step that never comes."""
    n, epochs = schedule(steps, groups, available)
    assert (n, epochs) == expected and n * epochs == steps * groups and n % groups == 0 and n <= available


def test_more_groups_per_step_than_tasks_is_a_clear_error() -> None:
    with pytest.raises(LightloopError, match="only 5 training tasks"):
        schedule(3, 8, 5)


def test_a_row_of_another_kind_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a demo task"):
        from_row({"kind": "capitals", "country": "France"})
