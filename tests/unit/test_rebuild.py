"""Trajectory rebuild on hand-made call sequences."""

from __future__ import annotations

from lightloop.trainer.rebuild import Turn, rebuild, turns_from_calls


def turn(prompt: list[int], completion: list[int], trainable: bool = True, version: int | None = 1) -> Turn:
    return Turn(prompt, completion, [-0.1 * (i + 1) for i in range(len(completion))], trainable, version)


def test_a_multi_turn_conversation_with_tool_messages_merges_into_one_sample() -> None:
    first = turn([1, 2, 3], [10, 11, 99])  # 99: end of turn
    # The agent sends the reply back plus a tool result (20, 21) and the template's glue (5).
    second = turn([1, 2, 3, 10, 11, 99, 5, 20, 21, 5], [12, 99])
    third = turn([1, 2, 3, 10, 11, 99, 5, 20, 21, 5, 12, 99, 6, 30], [13])
    samples, stats = rebuild("r", [first, second, third])
    (sample,) = samples
    assert sample.input_ids == [1, 2, 3, 10, 11, 99, 5, 20, 21, 5, 12, 99, 6, 30, 13]
    assert sample.prompt_len == 3
    assert sample.loss_mask == [1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1]
    assert sample.logprobs == [-0.1, -0.2, -0.30000000000000004, 0, 0, 0, 0, -0.1, -0.2, 0, 0, -0.1]
    assert (stats.merges, stats.splits, stats.duplicates) == (2, 0, 0)


def test_a_rewritten_history_starts_a_new_sample() -> None:
    samples, stats = rebuild(
        "r", [turn([1, 2], [3]), turn([1, 7, 8], [9, 10]), turn([1, 7, 8, 9, 10, 4], [11])]
    )
    assert [s.input_ids for s in samples] == [[1, 2, 3], [1, 7, 8, 9, 10, 4, 11]]
    assert samples[1].loss_mask == [1, 1, 0, 1]
    assert (stats.merges, stats.splits) == (1, 1)


def test_a_prompt_that_drops_the_completion_is_a_split_not_a_merge() -> None:
    # The next prompt starts with the first prompt but not with its completion (e.g. summarised).
    samples, stats = rebuild("r", [turn([1, 2], [3, 4]), turn([1, 2, 5], [6])])
    assert len(samples) == 2 and stats.splits == 1 and stats.merges == 0


def test_exact_duplicates_keep_the_last() -> None:
    retried = turn([1, 2], [8])
    final = Turn([1, 2], [3], [-0.5])
    samples, stats = rebuild("r", [retried, final, turn([1, 2, 3, 4], [5])])
    (sample,) = samples
    assert sample.input_ids == [1, 2, 3, 4, 5] and sample.logprobs[0] == -0.5
    assert stats.duplicates == 1 and stats.merges == 1


def test_calls_without_token_ids_are_skipped_and_counted_never_retokenised() -> None:
    samples, stats = rebuild(
        "r", [Turn([], [], []), Turn([1], [], []), turn([1, 2], [3]), Turn([4], [5, 6], [-1.0])]
    )
    assert [s.input_ids for s in samples] == [[1, 2, 3]]
    assert stats.skipped_no_token_ids == 2 and stats.skipped_bad_logprobs == 1 and stats.calls == 4


def test_turns_of_agents_not_trained_are_context_only() -> None:
    planner = turn([1], [2, 3], trainable=False)
    solver = turn([1, 2, 3, 4], [5, 6])
    (sample,) = rebuild("r", [planner, solver])[0]
    assert sample.loss_mask == [0, 0, 0, 1, 1]
    assert sample.logprobs[:2] == [0.0, 0.0]
    # A sample made only of other agents' turns has nothing to learn from.
    assert rebuild("r", [turn([7], [8], trainable=False)])[0] == []


def test_versions_are_collected_per_sample() -> None:
    samples, _ = rebuild("r", [turn([1], [2], version=3), turn([1, 2], [4], version=4)])
    assert samples[0].policy_versions == {3, 4}


def test_turns_from_call_rows() -> None:
    rows = [
        {
            "prompt_token_ids": [1],
            "completion_token_ids": [2],
            "completion_logprobs": [-0.3],
            "policy_version": 2,
            "agent": "a",
        },
        {
            "prompt_token_ids": None,
            "completion_token_ids": None,
            "completion_logprobs": None,
            "policy_version": None,
            "agent": "b",
        },
    ]
    turns = turns_from_calls(rows, trainable=lambda c: c["agent"] == "a")
    assert turns[0].trainable and not turns[1].trainable and turns[1].prompt_ids == []
