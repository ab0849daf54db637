"""Claims: a trainer takes whole groups of finished, rewarded, unconsumed rollouts, with their
LLM calls, and marks them consumed in the same transaction that records its training step.

A claim is a lease (`claimed_by`, `claim_expires_at`): a trainer that dies frees its rollouts
when the lease runs out, without anyone's help; one that takes longer extends it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from lightloop.store.errors import ClaimLost
from lightloop.store.marks import MARKS_SQL

# One statement claims, so there is no window between choosing rollouts and taking them.
# FOR UPDATE SKIP LOCKED lets several trainers (or workers of one) run it at once: each locks what
# it takes and skips what another transaction holds, instead of waiting on it or taking it twice.
# Groups are locked through one "head" row each (the group's smallest rollout id): `heads` locks
# heads in order and stops at the limit, so a claimer holds exactly the groups it takes and a
# concurrent one moves on to the next groups. Holding the head, it then locks the group's other
# rollouts (`members`); no other claimer can want those without the head. Locked rows are
# re-checked against their newest version, so a group another trainer claimed and committed a
# moment ago fails the claim condition and is skipped.
#
# A group is ready only once every live batch writer has written what it accepted before the
# group's last finish (store/marks.py): its calls may have gone through another proxy process
# than its finish, and be in that process's memory still.
_CLAIM_SQL = f"""
WITH written AS MATERIALIZED ({MARKS_SQL}),
ready AS MATERIALIZED (
    SELECT coalesce(group_id, id) AS g, min(id) AS head, max(finished_at) AS last_finished
    FROM rollouts
    -- A prompt optimisation run's evaluations measure a candidate prompt: never trained on.
    WHERE consumed_by_step IS NULL AND mode = $4 AND prompt_run IS NULL
    GROUP BY 1
    HAVING bool_and(status IN ('succeeded', 'failed') AND reward IS NOT NULL)
       AND bool_and(claimed_by IS NULL OR claim_expires_at < now())
       AND coalesce(max(finished_at), '-infinity') <= (SELECT * FROM written)
       -- Complete: as many finished as the group declared (the queue's group_size, or
       -- X-Lightloop-Group-Size); a rollout without a group is a group of one; a group of
       -- unknown size has settled (its newest member finished $5 seconds ago).
       AND CASE
           WHEN max(group_size) IS NOT NULL THEN count(*) >= max(group_size)
           WHEN bool_and(group_id IS NULL) THEN true
           ELSE max(finished_at) <= now() - make_interval(secs => $5)
       END
),
heads AS MATERIALIZED (
    SELECT ready.g
    FROM rollouts r JOIN ready ON r.id = ready.head
    WHERE r.consumed_by_step IS NULL AND (r.claimed_by IS NULL OR r.claim_expires_at < now())
    ORDER BY ready.last_finished, ready.g
    LIMIT $1
    FOR UPDATE OF r SKIP LOCKED
),
members AS MATERIALIZED (
    SELECT r.id
    FROM rollouts r JOIN heads ON coalesce(r.group_id, r.id) = heads.g
    WHERE r.consumed_by_step IS NULL AND r.prompt_run IS NULL
      -- A rollout that joined the group after `ready` looked is left for a later claim.
      AND r.status IN ('succeeded', 'failed') AND r.reward IS NOT NULL
    FOR UPDATE OF r
)
UPDATE rollouts r
SET claimed_by = $2, claim_expires_at = now() + make_interval(secs => $3)
FROM members m
WHERE r.id = m.id
RETURNING r.id, r.group_id, r.task_id, r.agent, r.mode, r.status, r.reward, r.metadata,
          r.created_at, r.finished_at, r.claim_expires_at
"""

_CALLS_SQL = """
SELECT c.span_id, c.choice_index, c.rollout_id, c.seq, c.model, c.agent, c.adapter, c.policy_version,
       c.attempt, c.created_at, c.prompt_token_ids, c.completion_token_ids, c.completion_logprobs,
       c.finish_reason, c.request, c.response
FROM llm_calls c JOIN rollouts r ON r.id = c.rollout_id
WHERE c.rollout_id = ANY($1::text[])
  -- Calls of a superseded attempt (a runner that lost its lease) stay for SQL, not for training.
  AND (r.attempt IS NULL OR c.attempt IS NULL OR c.attempt = r.attempt)
-- created_at first: it orders a rollout's calls even when several proxy processes served it
-- (each counts seq on its own).
ORDER BY c.rollout_id, c.created_at, c.seq, c.choice_index
"""


# The training rewards of claimed rollouts, oldest first: per call (span_id set) for turn credit,
# and the rollout's own (span_id NULL), of which the latest is its final reward.
_REWARDS_SQL = """
SELECT rollout_id, span_id, value FROM rewards
WHERE rollout_id = ANY($1::text[]) AND name = 'reward'
ORDER BY rollout_id, id
"""


def _split_rewards(rows: list[asyncpg.Record]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per rollout: its calls' training rewards summed per call, and its latest own reward."""
    turn_rewards: dict[str, dict[str, float]] = {}
    final: dict[str, float] = {}
    for reward in rows:
        if reward["span_id"] is None:
            final[reward["rollout_id"]] = float(reward["value"])
        else:
            per_call = turn_rewards.setdefault(reward["rollout_id"], {})
            per_call[reward["span_id"]] = per_call.get(reward["span_id"], 0.0) + float(reward["value"])
    return turn_rewards, final


async def rollout_training_rewards(
    conn: asyncpg.Connection, rollout_id: str
) -> tuple[dict[str, float], float | None, float | None]:
    """One rollout's training rewards as a claim hands them over: (per call, its own latest,
    rollouts.reward)."""
    turn_rewards, final = _split_rewards(list(await conn.fetch(_REWARDS_SQL, [rollout_id])))
    reward = await conn.fetchval("SELECT reward FROM rollouts WHERE id = $1", rollout_id)
    return turn_rewards.get(rollout_id, {}), final.get(rollout_id), reward


async def rollout_calls(conn: asyncpg.Connection, rollout_id: str) -> list[asyncpg.Record]:
    """One rollout's calls exactly as a claim hands them to the trainer (the dashboard's
    trainer's view rebuilds them with the trainer's own code)."""
    return list(await conn.fetch(_CALLS_SQL, [rollout_id]))


@dataclass(frozen=True)
class ClaimedRollout:
    id: str
    group_id: str | None
    task_id: str | None
    agent: str | None
    status: str
    reward: float
    metadata: dict[str, Any]
    finished_at: datetime | None
    calls: list[asyncpg.Record] = field(default_factory=list)
    # Training rewards posted for its calls (by response_id or span_id), summed per call.
    turn_rewards: dict[str, float] = field(default_factory=dict)
    # The latest training reward posted for the rollout itself (finish, or by rollout id).
    final_reward: float | None = None

    @property
    def group(self) -> str:
        return self.group_id if self.group_id is not None else self.id


@dataclass(frozen=True)
class Claim:
    claimer: str
    expires_at: datetime
    rollouts: list[ClaimedRollout]

    @property
    def rollout_ids(self) -> list[str]:
        return [r.id for r in self.rollouts]

    def groups(self) -> dict[str, list[ClaimedRollout]]:
        out: dict[str, list[ClaimedRollout]] = {}
        for r in self.rollouts:
            out.setdefault(r.group, []).append(r)
        return out


@dataclass(frozen=True)
class StepRecord:
    """What a finished training step reports; becomes one `training_steps` row."""

    started_at: datetime
    policy: str | None = None
    policy_in: int | None = None
    policy_out: int | None = None
    trainer: str | None = None
    n_tokens: int | None = None
    loss: float | None = None
    reward_mean: float | None = None
    reward_std: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    # Versions of agent adapters (`policy-planner`) the step published, by adapter name: each
    # gets its training_step, as the policy's `policy_out` does.
    published: dict[str, int] = field(default_factory=dict)


async def claim_groups(
    conn: asyncpg.Connection,
    claimer: str,
    *,
    max_groups: int,
    lease_s: float,
    settle_s: float,
    mode: str = "train",
) -> Claim | None:
    """Claim up to `max_groups` complete groups; None when nothing is ready. A group is complete
    when its declared size is finished, or, with no declared size, `settle_s` after its newest
    member finished (and none is running)."""
    if max_groups < 1:
        raise ValueError("max_groups must be at least 1")
    async with conn.transaction():
        rows = await conn.fetch(_CLAIM_SQL, max_groups, claimer, float(lease_s), mode, float(settle_s))
        if not rows:
            return None
        ids = [r["id"] for r in rows]
        calls = await conn.fetch(_CALLS_SQL, ids)
        rewards = await conn.fetch(_REWARDS_SQL, ids)
    by_rollout: dict[str, list[asyncpg.Record]] = {}
    for call in calls:
        by_rollout.setdefault(call["rollout_id"], []).append(call)
    turn_rewards, final = _split_rewards(rewards)
    rollouts = [
        ClaimedRollout(
            id=r["id"],
            group_id=r["group_id"],
            task_id=r["task_id"],
            agent=r["agent"],
            status=r["status"],
            reward=float(r["reward"]),
            metadata=_json(r["metadata"]),
            finished_at=r["finished_at"],
            calls=by_rollout.get(r["id"], []),
            turn_rewards=turn_rewards.get(r["id"], {}),
            final_reward=final.get(r["id"]),
        )
        for r in sorted(rows, key=lambda r: (r["group_id"] or r["id"], r["id"]))
    ]
    return Claim(claimer=claimer, expires_at=min(r["claim_expires_at"] for r in rows), rollouts=rollouts)


async def record_step(conn: asyncpg.Connection, claim: Claim, step: StepRecord) -> int:
    """Write the training step and mark the claim's rollouts consumed by it, atomically.

    Raises ClaimLost (and changes nothing) when any rollout is no longer claimed by this claimer:
    its lease ran out and another trainer took it."""
    ids = claim.rollout_ids
    async with conn.transaction():
        step_id: int = await conn.fetchval(
            """
            INSERT INTO training_steps (policy, policy_in, policy_out, trainer, n_rollouts, n_tokens,
                                        loss, reward_mean, reward_std, metrics, started_at, finished_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11, now())
            RETURNING step
            """,
            step.policy,
            step.policy_in,
            step.policy_out,
            step.trainer or claim.claimer,
            len(ids),
            step.n_tokens,
            step.loss,
            step.reward_mean,
            step.reward_std,
            json.dumps(step.metrics),
            step.started_at,
        )
        status = await conn.execute(
            """
            UPDATE rollouts SET consumed_by_step = $1, claimed_by = NULL, claim_expires_at = NULL
            WHERE id = ANY($2::text[]) AND claimed_by = $3 AND consumed_by_step IS NULL
            """,
            step_id,
            ids,
            claim.claimer,
        )
        updated = int(status.split()[-1])
        if updated != len(ids):
            # Raising inside the transaction rolls back the step row too.
            raise ClaimLost(
                f"{len(ids) - updated} of {len(ids)} claimed rollouts were taken by another trainer "
                "after this claim's lease ran out; the step is not recorded"
            )
        # Only a version this step made: a step that published none (nothing of the policy's
        # to train, or a failed publish) leaves the live version's step as it was.
        if step.policy is not None and step.policy_out is not None and step.policy_out != step.policy_in:
            await conn.execute(
                "UPDATE policy_versions SET training_step = $1 WHERE policy = $2 AND version = $3",
                step_id,
                step.policy,
                step.policy_out,
            )
        for adapter, version in step.published.items():
            await conn.execute(
                "UPDATE policy_versions SET training_step = $1 WHERE policy = $2 AND version = $3",
                step_id,
                adapter,
                version,
            )
    return step_id


async def extend_claim(conn: asyncpg.Connection, claim: Claim, lease_s: float) -> datetime:
    """Renew the lease for a step that takes longer; ClaimLost when part of it was taken."""
    rows = await conn.fetch(
        """
        UPDATE rollouts SET claim_expires_at = now() + make_interval(secs => $3)
        WHERE id = ANY($1::text[]) AND claimed_by = $2 AND consumed_by_step IS NULL
        RETURNING claim_expires_at
        """,
        claim.rollout_ids,
        claim.claimer,
        float(lease_s),
    )
    if len(rows) != len(claim.rollouts):
        raise ClaimLost(f"{len(claim.rollouts) - len(rows)} claimed rollouts were taken by another trainer")
    expires: datetime = min(r["claim_expires_at"] for r in rows)
    return expires


async def release_claim(conn: asyncpg.Connection, claim: Claim) -> int:
    """Give the rollouts back unconsumed (a step that failed); returns how many were released."""
    status = await conn.execute(
        """
        UPDATE rollouts SET claimed_by = NULL, claim_expires_at = NULL
        WHERE id = ANY($1::text[]) AND claimed_by = $2 AND consumed_by_step IS NULL
        """,
        claim.rollout_ids,
        claim.claimer,
    )
    return int(status.split()[-1])


async def release_expired(conn: asyncpg.Connection) -> int:
    """Clear lapsed leases. Claiming already ignores them; this keeps SQL views of claims honest."""
    status = await conn.execute(
        """
        UPDATE rollouts SET claimed_by = NULL, claim_expires_at = NULL
        WHERE claim_expires_at < now() AND consumed_by_step IS NULL
        """
    )
    return int(status.split()[-1])


def _json(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        loaded = json.loads(value)
        return loaded if isinstance(loaded, dict) else {"value": loaded}
    return dict(value)
