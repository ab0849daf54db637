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
from lightloop.trainer.algorithms import Scored, drop_flat_groups, rollout_advantages
from lightloop.trainer.rebuild import Advantage, Sample


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


def final_reward(own: float | None, turn_rewards: Mapping[str, float], reward: float | None) -> float:
    """R: the latest reward posted for the rollout itself; with none, 0 when its calls were
    rewarded (those are its rewards), else `rollouts.reward` (set by hand in SQL, say). The
    trainer and the dashboard's trainer view both use this."""
    if own is not None:
        return own
    return 0.0 if turn_rewards or reward is None else reward


def rollout_total(rollout: ClaimedRollout) -> float:
    """Everything a rollout earned, undiscounted: R plus its calls' rewards (a step's reward figures)."""
    return final_reward(rollout.final_reward, rollout.turn_rewards, rollout.reward) + sum(
        rollout.turn_rewards.values()
    )


def turn_scores(
    rollouts: Sequence[ClaimedRollout], samples: Mapping[str, Sequence[Sample]], gamma: float
) -> list[TurnScore]:
    """The return of every trained turn of the rollouts that have samples, in order."""
    scores: list[TurnScore] = []
    for rollout in rollouts:
        trained = [span for sample in samples.get(rollout.id, ()) for _, _, span in sample.turns]
        if not trained:
            continue
        final = final_reward(rollout.final_reward, rollout.turn_rewards, rollout.reward)
        returns = call_returns([c["span_id"] for c in rollout.calls], rollout.turn_rewards, final, gamma)
        for span_id in dict.fromkeys(trained):
            assert span_id is not None and span_id in returns, (
                "a trained turn is not one of the rollout's calls"
            )
            scores.append(TurnScore(rollout.id, span_id, rollout.group, returns[span_id]))
    return scores


def turn_credit(
    rollouts: Sequence[ClaimedRollout], by_rollout: dict[str, list[Sample]], gamma: float
) -> tuple[list[Sample], list[Advantage], int, int]:
    """Turn credit (trainer/credit.py): each trained turn's return, normalised over its group's
    trained turns by VERL's GRPO, on that turn's own tokens. (samples, their [R] advantages,
    groups dropped as flat, turns scored)."""
    scores = turn_scores(rollouts, by_rollout, gamma)
    # A group needs two rollouts or more, as with rollout credit: normalising one rollout's turns
    # against each other would reward its opening turns for their position alone.
    rollouts_of: dict[str, set[str]] = {}
    for t in scores:
        rollouts_of.setdefault(t.group, set()).add(t.rollout_id)
    lone = {g for g, ids in rollouts_of.items() if len(ids) < 2}
    # GRPO over turns: each turn is one entry of its group, keyed by rollout and call.
    scored = [Scored(f"{t.rollout_id}\n{t.span_id}", t.group, t.ret) for t in scores if t.group not in lone]
    kept, flat_groups = drop_flat_groups(scored)
    flat_groups += len(lone)
    advantages = rollout_advantages(kept, "grpo")
    per_rollout: dict[str, dict[str | None, float]] = {}
    for key, value in advantages.items():
        rollout_id, _, span_id = key.partition("\n")
        per_rollout.setdefault(rollout_id, {})[span_id] = value
    samples: list[Sample] = []
    sample_advantages: list[Advantage] = []
    for rollout_id, by_span in per_rollout.items():  # a rollout of a flat group has none
        for sample in by_rollout[rollout_id]:
            samples.append(sample)
            sample_advantages.append(sample.token_advantages(by_span))  # [R]
    return samples, sample_advantages, flat_groups, len(kept)
