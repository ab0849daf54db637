"""Which samples share a micro-batch, and how much of their prompt they share: pure."""

from __future__ import annotations

from lightloop.trainer.local import micro_batches, shared_prefix
from lightloop.trainer.rebuild import Sample


def sample(name: str, prompt: list[int], response: list[int]) -> Sample:
    return Sample(name, prompt + response, len(prompt), [1] * len(response), [-1.0] * len(response))


def test_a_step_groups_equal_prompts_into_one_micro_batch() -> None:
    groups = [[sample(f"g{g}-{k}", [g, 7, 7, g], [k, k]) for k in range(4)] for g in range(3)]
    interleaved = [s for row in zip(*groups, strict=True) for s in row]  # g0-0, g1-0, g2-0, g0-1, ...
    chunks = micro_batches(interleaved, 4)
    for chunk in chunks:
        assert len({interleaved[i].rollout_id.split("-")[0] for i in chunk}) == 1, chunk
    assert sorted(i for chunk in chunks for i in chunk) == list(range(12))


def test_the_shared_prefix_stops_one_token_short_of_the_shortest_prompt() -> None:
    # The logits that predict the first answer token come from the last prompt position, which
    # must be run per row.
    same = [sample("a", [1, 2, 3, 4], [5]), sample("b", [1, 2, 3, 4], [6, 7])]
    assert shared_prefix(same) == 3
    forked = [sample("a", [1, 2, 3, 4], [5]), sample("b", [1, 2, 9, 4, 4], [6])]
    assert shared_prefix(forked) == 2
    assert shared_prefix([sample("a", [1], [2])]) == 0
    assert shared_prefix([sample("a", [1, 2], [3]), sample("b", [8, 2], [3])]) == 0
