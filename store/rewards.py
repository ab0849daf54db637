"""Rewards and finishing rollouts: written synchronously, since the caller needs the answer
(an unknown rollout or response id is the agent's bug and must be reported, not dropped)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from lightloop.store.errors import Conflict, NotFound
from lightloop.store.text import dump_json, storable_text

# The reward that training uses: a reward posted under this name (the default) also becomes
# rollouts.reward; other names (tests_passed, latency, ...) are kept for analysis only.
TRAINING_REWARD = "reward"


@dataclass(frozen=True)
class RewardRecord:
    id: int
    rollout_id: str
    span_id: str | None
    name: str
    value: float


async def add_reward(
    conn: asyncpg.Connection,
    *,
    value: float,
    rollout_id: str | None = None,
    response_id: str | None = None,
    span_id: str | None = None,
    name: str = TRAINING_REWARD,
    source: str | None = None,
    attempt: int | None = None,
) -> RewardRecord:
    """Record a reward for a rollout, or for one call of it: the call that returned
    `response_id`, or the call `span_id`. A call and a rollout named together must agree
    (Conflict otherwise: a reward for another rollout's call). With `attempt` (the path form
    `/rollout/{id}/attempt/{n}`), a superseded attempt is a Conflict."""
    assert response_id is None or span_id is None, "name the call once: response_id or span_id"
    assert rollout_id is not None or response_id is not None or span_id is not None, "name what to reward"
    async with conn.transaction():
        if response_id is not None or span_id is not None:
            column, key = ("response_id", response_id) if response_id is not None else ("span_id", span_id)
            # A response id is the engine's or provider's and may repeat across rollouts: the
            # named rollout's call first, then the newest.
            row = await conn.fetchrow(
                f"SELECT rollout_id, span_id FROM llm_calls WHERE {column} = $1 "
                "ORDER BY rollout_id IS NOT DISTINCT FROM $2 DESC, created_at DESC LIMIT 1",
                key,
                rollout_id,
            )
            if row is None:
                what = "returned response id" if response_id is not None else "has span id"
                raise NotFound(f"no call {what} {key!r}")
            if rollout_id is not None and row["rollout_id"] != rollout_id:
                raise Conflict(
                    f"call {key!r} belongs to rollout {row['rollout_id']!r}, not {rollout_id!r}: "
                    "a call's reward goes to its own rollout"
                )
            rollout_id, span_id = row["rollout_id"], row["span_id"]
        assert rollout_id is not None
        # FOR UPDATE: a concurrent finish must not overwrite the reward this statement sets.
        row = await conn.fetchrow("SELECT attempt FROM rollouts WHERE id = $1 FOR UPDATE", rollout_id)
        if row is None:
            raise NotFound(f"rollout {rollout_id!r} does not exist")
        _check_attempt(rollout_id, attempt, row["attempt"])
        reward_id = await conn.fetchval(
            "INSERT INTO rewards (rollout_id, span_id, name, value, source) "
            "VALUES ($1, $2, $3, $4, $5) RETURNING id",
            rollout_id,
            span_id,
            name,
            value,
            source,
        )
        if name == TRAINING_REWARD:
            # Also the rollout's reward (the latest posted, a call's included): what claims
            # require and rollout credit trains on. Turn credit reads the rewards table instead.
            await conn.execute("UPDATE rollouts SET reward = $2 WHERE id = $1", rollout_id, value)
    return RewardRecord(reward_id, rollout_id, span_id, name, value)


async def finish_rollout(
    conn: asyncpg.Connection,
    rollout_id: str,
    status: str,
    reward: float | None = None,
    source: str | None = None,
    *,
    attempt: int | None = None,
    failed_reward: float = 0.0,
    metadata: dict[str, Any] | None = None,
) -> bool:
    """Mark a rollout succeeded or failed (and record its reward). Finishing it again with the same
    status is a no-op that returns False; with another status it is a Conflict.

    Queue rollouts: a finish naming a superseded `attempt` is a Conflict and changes nothing;
    one that leaves the rollout without any reward gives it `failed_reward`, so that its group
    completes. `metadata` is merged into `rollouts.metadata` (a runner's error and traceback)."""
    assert status in ("succeeded", "failed")
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT status, attempt, dataset, reward FROM rollouts WHERE id = $1 FOR UPDATE", rollout_id
        )
        if row is None:
            raise NotFound(f"rollout {rollout_id!r} does not exist")
        current = row["status"]
        _check_attempt(rollout_id, attempt, row["attempt"])
        if current == "queued":
            raise Conflict(f"rollout {rollout_id!r} is queued: no runner holds it")
        if current != "running":
            if current != status:
                raise Conflict(f"rollout {rollout_id!r} already finished as {current}")
            if reward is None:
                return False
        if reward is None and row["dataset"] is not None and row["reward"] is None:
            reward = failed_reward
            metadata = {**(metadata or {}), "reward": "none was posted; failed_reward given"}
        if reward is not None:
            await conn.execute(
                "INSERT INTO rewards (rollout_id, name, value, source) VALUES ($1, $2, $3, $4)",
                rollout_id,
                TRAINING_REWARD,
                reward,
                source,
            )
        await conn.execute(
            "UPDATE rollouts SET status = $2, reward = coalesce($3, reward), "
            "finished_at = coalesce(finished_at, now()), metadata = metadata || $4::jsonb WHERE id = $1",
            rollout_id,
            status,
            reward,
            dump_json(metadata or {}),
        )
        if row["attempt"] is not None and current == "running":
            await conn.execute(
                "UPDATE rollout_attempts SET status = $3, ended_at = now(), error = $4 "
                "WHERE rollout_id = $1 AND attempt = $2 AND status = 'running'",
                rollout_id,
                row["attempt"],
                status,
                None if (error := (metadata or {}).get("error")) is None else storable_text(str(error)),
            )
    return bool(current == "running")


def _check_attempt(rollout_id: str, given: int | None, current: int | None) -> None:
    if given is not None and current is not None and given != current:
        raise Conflict(
            f"attempt {given} of rollout {rollout_id!r} was superseded by attempt {current}; "
            "its result is not recorded"
        )
