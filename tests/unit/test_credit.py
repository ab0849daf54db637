"""Turn credit (TRAINER__CREDIT=turn) on hand-made rollouts: returns per call by the README's
formula, turns without a reward, rollouts split into several samples, and the advantages each
trained token gets."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from lightloop.store import ClaimedRollout
from lightloop.trainer import select_samples
from lightloop.trainer.credit import call_returns, final_reward, rollout_total, turn_credit, turn_scores


def test_a_call_s_return_is_its_reward_plus_the_discounted_rewards_after_it() -> None:
    # Calls a, b, c; b earned 2, the rollout's final reward R = 1 lands on the last call.
    got = call_returns(["a", "b", "c"], {"b": 2.0}, 1.0, gamma=0.5)
    assert got == {"c": 1.0, "b": 2.0 + 0.5 * 1.0, "a": 0.5 * (2.0 + 0.5 * 1.0)}
    # gamma 1: R plus every turn reward from that call on.
    assert call_returns(["a", "b", "c"], {"a": 3.0, "b": 2.0}, 1.0, gamma=1.0) == {
        "a": 6.0,
        "b": 3.0,
        "c": 1.0,
    }
    # Two choices of one call (n=2) are one step; no reward anywhere is 0 everywhere.
    assert call_returns(["a", "a", "b"], {}, 0.0, gamma=0.9) == {"a": 0.0, "b": 0.0}


def call(
    span: str, prompt: list[int], completion: list[int], agent: str = "solver", model: str = "policy"
) -> dict[str, Any]:
    return {
        "span_id": span,
        "model": model,
        "agent": agent,
        "policy_version": 1,
        "prompt_token_ids": prompt,
        "completion_token_ids": completion,
        "completion_logprobs": [-0.5] * len(completion),
        "request": {},
    }


def rollout(
    rid: str, group: str, calls: list[dict[str, Any]], turn_rewards: dict[str, float], final: float | None
) -> ClaimedRollout:
    reward = final if final is not None else max(turn_rewards.values(), default=0.0)
    return ClaimedRollout(rid, group, None, None, "succeeded", reward, {}, None, calls, turn_rewards, final)


def two_rollouts() -> list[ClaimedRollout]:
    # r1: s1 opens a sample, s2 merges into it (its prompt extends s1's), s3 rewrites the history
    # (a new sample), and a call to another model (x) in between carries a turn reward too.
    r1 = rollout(
        "r1",
        "g",
        [
            call("s1", [1, 2], [3, 4]),
            call("s2", [1, 2, 3, 4, 5], [6]),
            call("x", [9], [9], model="judge"),
            call("s3", [7], [8, 8, 8]),
        ],
        {"s1": 1.0, "x": 0.5},
        final=2.0,
    )
    r2 = rollout("r2", "g", [call("t1", [1, 2], [5])], {}, final=0.0)
    return [r1, r2]


def test_each_trained_turn_gets_its_own_normalised_return_on_its_own_tokens() -> None:
    rollouts = two_rollouts()
    by_rollout, _ = select_samples(rollouts, policy="policy", live=1, max_staleness=2, agents=[])
    assert len(by_rollout["r1"]) == 2  # split: s1+s2 in one sample, s3 in another
    scores = turn_scores(rollouts, by_rollout, gamma=1.0)
    returns = {(s.rollout_id, s.span_id): s.ret for s in scores}
    # r1's calls in order: s1, s2, x, s3; R = 2 on s3; x (another model) is a step, not trained.
    assert returns == {
        ("r1", "s1"): 1.0 + 0.5 + 2.0,
        ("r1", "s2"): 0.5 + 2.0,
        ("r1", "s3"): 2.0,
        ("r2", "t1"): 0.0,
    }
    samples, advantages, flat, turns = turn_credit(rollouts, by_rollout, gamma=1.0)
    assert flat == 0 and turns == 4
    values = list(returns.values())
    mean, std = statistics.fmean(values), statistics.stdev(values)  # VERL's GRPO: unbiased std, eps 1e-6
    expected = {key: (ret - mean) / (std + 1e-6) for key, ret in returns.items()}
    by_id = {(s.rollout_id, tuple(s.input_ids)): a for s, a in zip(samples, advantages, strict=True)}
    first = by_id[("r1", (1, 2, 3, 4, 5, 6))]  # response: 3 4 | 5 (context) | 6
    assert first == pytest.approx([expected["r1", "s1"]] * 2 + [0.0] + [expected["r1", "s2"]], abs=1e-5)
    assert by_id[("r1", (7, 8, 8, 8))] == pytest.approx([expected["r1", "s3"]] * 3, abs=1e-5)
    assert by_id[("r2", (1, 2, 5))] == pytest.approx([expected["r2", "t1"]], abs=1e-5)
    # The turn that earned a reward is credited more than a later one of the same rollout.
    assert expected["r1", "s1"] > expected["r1", "s2"] > expected["r1", "s3"]


def test_a_group_whose_turns_all_return_the_same_is_dropped() -> None:
    same = [rollout(f"r{i}", "g", [call(f"s{i}", [1], [2])], {}, final=1.0) for i in range(2)]
    by_rollout, _ = select_samples(same, policy="policy", live=1, max_staleness=2, agents=[])
    samples, advantages, flat, turns = turn_credit(same, by_rollout, gamma=1.0)
    assert (samples, advantages, flat, turns) == ([], [], 1, 0)


def test_the_final_reward_is_the_rollout_s_own_else_zero_when_its_calls_were_rewarded() -> None:
    assert final_reward(3.0, {"s": 1.0}, 1.0) == 3.0
    assert final_reward(None, {"s": 1.0}, 1.0) == 0.0
    assert final_reward(None, {}, 0.7) == 0.7  # rollouts.reward set by hand, no reward rows
    assert rollout_total(rollout("a", "g", [], {"s": 1.0, "t": 0.5}, final=2.0)) == 3.5


def test_a_lone_rollout_is_not_normalised_against_its_own_turns() -> None:
    """A failed episode alone in its group (an inferred session): gamma < 1 gives its opening
    turn the larger return; normalising its turns against each other would reinforce it."""
    lone = rollout("s", "s", [call("a", [1], [2]), call("b", [1, 2, 3], [4])], {}, final=-1.0)
    by_rollout, _ = select_samples([lone], policy="policy", live=1, max_staleness=2, agents=[])
    assert turn_scores([lone], by_rollout, gamma=0.9)[0].ret == pytest.approx(-0.9)
    assert turn_credit([lone], by_rollout, gamma=0.9) == ([], [], 1, 0)
