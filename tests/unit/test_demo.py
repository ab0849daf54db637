"""The demo's task and reward: pure functions."""

from __future__ import annotations

from lightloop.demo import Task, reward, tasks


def test_the_exact_answer_gets_1_and_partial_credit_points_the_way() -> None:
    task = Task(7, 5)
    assert reward(task, "12") == 1.0
    assert reward(task, " 12.\n") == 1.0
    # Tiers never overlap: the right number among words beats any number beats none.
    right_in_words = reward(task, "The answer is 12")
    assert 0.5 < right_in_words <= 0.6
    assert 0.2 < reward(task, "13") <= 0.3
    assert 0 < reward(task, "twelve") <= 0.1
    assert 0 < reward(task, "x" * 200) < reward(task, "x" * 100)  # brevity never saturates
    assert min(reward(task, "12 " + "x" * 500), right_in_words) >= 0.5


def test_shorter_answers_of_the_same_tier_score_higher_so_groups_seldom_tie() -> None:
    task = Task(7, 5)
    assert reward(task, "12 is it") > reward(task, "The answer to that is 12")
    assert reward(task, "banana") > reward(task, "a long and winding answer")


def test_held_out_tasks_are_never_training_tasks() -> None:
    train, held = tasks()
    assert len(held) == 32 and not set(train) & set(held)
    assert tasks() == (train, held)  # the split is fixed
