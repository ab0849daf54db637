"""Turn-level credit (`TRAINER__CREDIT=turn`): rewards given to the calls that earned them.

A rollout is a sequence of calls (its steps, in the order the claim gives them). Call k's reward
r_k is the sum of the training rewards posted for it (by `response_id` or `span_id`); the
rollout's final reward R (posted with finish, or by rollout id) counts as a reward on its last
call. A call's return is

    G_k = sum_{j >= k} gamma^(j - k) * r'_j,   r'_j = r_j (+ R when j is the last call)

so with gamma = 1 every call's return is R plus the turn rewards from that call on. Each trained
turn's return is then normalised within its group as GRPO normalises rollout rewards:
A = (G - mean) / (std + eps) over every trained turn of the group's rollouts, and that advantage
is given to the turn's own completion tokens. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lightloop.store import ClaimedRollout
from lightloop.trainer.rebuild import Sample


@dataclass(frozen=True)
class TurnScore:
    """One trained turn's return, for the group statistics."""

    rollout_id: str
    span_id: str
    group: str
    ret: float


def call_returns(
    span_ids: Sequence[str], turn_rewards: Mapping[str, float], final_reward: float, gamma: float
) -> dict[str, float]:
    """The return of each call of one rollout; `span_ids` are its calls in order (a call with
    several choices appears once or repeatedly: it is one step)."""
    steps: list[str] = []
    for span_id in span_ids:
        if not steps or steps[-1] != span_id:
            if span_id in steps:
                continue  # not adjacent: the same call listed again is still one step
            steps.append(span_id)
    returns: dict[str, float] = {}
    running = 0.0
    for k in range(len(steps) - 1, -1, -1):
        reward = turn_rewards.get(steps[k], 0.0) + (final_reward if k == len(steps) - 1 else 0.0)
        running = reward + gamma * running
        returns[steps[k]] = running
    assert all(math.isfinite(v) for v in returns.values()), "non-finite return"
    return returns


def final_reward(rollout: ClaimedRollout) -> float:
    """R: the latest reward posted for the rollout itself; with none, 0 when its calls were
    rewarded (those are its rewards), else `rollouts.reward` (set by hand in SQL, say)."""
    if rollout.final_reward is not None:
        return rollout.final_reward
    return 0.0 if rollout.turn_rewards else rollout.reward


def turn_scores(
    rollouts: Sequence[ClaimedRollout], samples: Mapping[str, Sequence[Sample]], gamma: float
) -> list[TurnScore]:
    """The return of every trained turn of the rollouts that have samples, in order."""
    scores: list[TurnScore] = []
    for rollout in rollouts:
        trained = [span for sample in samples.get(rollout.id, ()) for _, _, span in sample.turns]
        if not trained:
            continue
        returns = call_returns(
            [c["span_id"] for c in rollout.calls], rollout.turn_rewards, final_reward(rollout), gamma
        )
        for span_id in dict.fromkeys(trained):
            assert span_id is not None and span_id in returns, (
                "a trained turn is not one of the rollout's calls"
            )
            scores.append(TurnScore(rollout.id, span_id, rollout.group, returns[span_id]))
    return scores
