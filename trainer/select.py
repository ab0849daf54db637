"""Which claimed calls become an adapter's training samples, and their advantages (pure).

Every adapter of a policy (its own, and each agent's with an adapter of its own) is planned from
the same claimed rollouts: its own turns are trained, every other call is context, and the same
groups give its advantages. Staleness is measured in the versions of the adapter that served
each call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightloop.settings import TrainerSettings
from lightloop.store import ClaimedRollout
from lightloop.trainer.algorithms import Scored, drop_flat_groups, rollout_advantages
from lightloop.trainer.credit import final_reward, rollout_total, turn_credit
from lightloop.trainer.rebuild import (
    Advantage,
    RebuildStats,
    Sample,
    owned_by,
    rebuild,
    served_by,
    trainable_for,
    turns_from_calls,
)


@dataclass
class AdapterStep:
    """One adapter's part of a step: its samples and advantages from the step's shared groups."""

    name: str  # its versions' key: the policy's name, or `policy-agent`
    agent: str | None  # None: the policy's own adapter
    version_in: int
    samples: list[Sample]
    advantages: list[Advantage]
    rewards: list[float]  # the rewards of the rollouts it trains on
    metrics: dict[str, Any]


def select_samples(
    rollouts: Sequence[ClaimedRollout],
    *,
    policy: str,
    live: int,
    max_staleness: int,
    agents: Sequence[str],
    adapter: str | None = None,
    agent: str | None = None,
    others: Sequence[str] = (),
    adopted: int | None = None,
) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
    """Samples per rollout for `adapter` (the policy's own by default; an agent's, of `agent`,
    otherwise), after the staleness filter; counts for the step's metrics. Pure.

    `others`: the agents with adapters of their own (context for the policy's adapter).
    `adopted`: while an agent's adapter has no version of its own, the policy's live version:
    the agent's calls the policy's adapter served are then its own (`owned_by`), and their
    staleness is measured against that version. `live` is the adapter's own live version."""
    stats = RebuildStats()
    stale = 0
    by_rollout: dict[str, list[Sample]] = {}
    adapter = adapter or policy
    own = owned_by(adapter, policy=policy, agent=agent, others=others, adopting=adopted is not None)
    trainable = trainable_for(
        adapter, agents, policy, agent=agent, others=others, adopting=adopted is not None
    )
    served = served_by(adapter, policy)

    for rollout in rollouts:
        calls = [c for c in rollout.calls if c["model"] == policy]
        # Version numbers are per adapter: each call's against the live version of the one that
        # served it. Calls another adapter served are context and never make a rollout stale.
        stale_here = any(
            c["policy_version"] is not None
            and c["policy_version"] < (live if served(c) else (adopted or 0)) - max_staleness
            for c in calls
            if own(c)
        )
        if stale_here:
            stale += 1
            continue
        samples, rollout_stats = rebuild(rollout.id, turns_from_calls(calls, trainable))
        stats.add(rollout_stats)
        if samples:
            by_rollout[rollout.id] = samples
    return by_rollout, {**stats.as_dict(), "stale_rollouts": stale}


def plan_adapter(
    rollouts: Sequence[ClaimedRollout],
    settings: TrainerSettings,
    *,
    policy: str,
    name: str,
    agent: str | None,
    version_in: int,
    others: Sequence[str],
    adopted: int | None,
) -> AdapterStep:
    """One adapter's samples and advantages from a step's claimed rollouts: the same groups for
    every adapter, its own turns trained (`select_samples`), advantages by the step's credit."""
    s = settings
    by_rollout, metrics = select_samples(
        rollouts,
        policy=policy,
        live=version_in,
        max_staleness=s.max_staleness,
        agents=s.agents,
        adapter=name,
        agent=agent,
        others=others,
        adopted=adopted,
    )
    samples: list[Sample]
    advantages: list[Advantage]
    if s.credit == "turn":
        samples, advantages, flat_groups, turns = turn_credit(rollouts, by_rollout, s.gamma)
        metrics.update(credit="turn", gamma=s.gamma, turns=turns)
    else:
        scored = [Scored(r.id, r.group, r.reward) for r in rollouts if r.id in by_rollout]
        kept, flat_groups = drop_flat_groups(scored)
        by_id = rollout_advantages(kept, s.algorithm)
        samples = [sample for rid in by_id for sample in by_rollout[rid]]
        advantages = [by_id[sample.rollout_id] for sample in samples]
        metrics.update(credit="rollout")
    metrics.update(flat_groups=flat_groups, samples=len(samples), algorithm=s.algorithm)
    trained = {sample.rollout_id for sample in samples}
    if s.credit == "turn":
        spans = {span for sample in samples for _, _, span in sample.turns}
        rewards = [own_turn_rewards(r, spans) for r in rollouts if r.id in trained]
    else:
        rewards = [r.reward for r in rollouts if r.id in trained]
    return AdapterStep(name, agent, version_in, samples, advantages, rewards, metrics)


def own_turn_rewards(rollout: ClaimedRollout, spans: set[str | None]) -> float:
    """What an adapter's own turns (`spans`) earned in a rollout under turn credit: their
    rewards, and R when the rollout's last call is one of them (turn credit puts R there)."""
    earned = float(sum(v for span, v in rollout.turn_rewards.items() if span in spans))
    if rollout.calls and rollout.calls[-1]["span_id"] in spans:
        earned += final_reward(rollout.final_reward, rollout.turn_rewards, rollout.reward)
    return earned


def rollout_reward(rollout: ClaimedRollout, credit: str) -> float:
    """A rollout's reward in the step's figures: its reward, or with turn credit all it earned
    (rollouts.reward is then just the latest reward posted, a call's included)."""
    return rollout_total(rollout) if credit == "turn" else rollout.reward
