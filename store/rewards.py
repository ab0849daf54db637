"""Rewards and finishing rollouts: written synchronously, since the caller needs the answer
(an unknown rollout or response id is the agent's bug and must be reported, not dropped)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from lightloop.store.errors import Conflict, NotFound

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
    name: str = TRAINING_REWARD,
    source: str | None = None,
) -> RewardRecord:
    """Record a reward for a rollout, or for the call that returned `response_id`."""
    assert (rollout_id is None) != (response_id is None), "name exactly one of rollout_id, response_id"
    async with conn.transaction():
        span_id: str | None = None
        if response_id is not None:
            row = await conn.fetchrow(
                "SELECT rollout_id, span_id FROM llm_calls WHERE response_id = $1 LIMIT 1", response_id
            )
            if row is None:
                raise NotFound(f"no call returned response id {response_id!r}")
            rollout_id, span_id = row["rollout_id"], row["span_id"]
        assert rollout_id is not None
        # FOR UPDATE: a concurrent finish must not overwrite the reward this statement sets.
        exists = await conn.fetchval("SELECT 1 FROM rollouts WHERE id = $1 FOR UPDATE", rollout_id)
        if exists is None:
            raise NotFound(f"rollout {rollout_id!r} does not exist")
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
            await conn.execute("UPDATE rollouts SET reward = $2 WHERE id = $1", rollout_id, value)
    return RewardRecord(reward_id, rollout_id, span_id, name, value)


async def finish_rollout(
    conn: asyncpg.Connection,
    rollout_id: str,
    status: str,
    reward: float | None = None,
    source: str | None = None,
) -> bool:
    """Mark a rollout succeeded or failed (and record its reward). Finishing it again with the same
    status is a no-op that returns False; with another status it is a Conflict."""
    assert status in ("succeeded", "failed")
    async with conn.transaction():
        current = await conn.fetchval("SELECT status FROM rollouts WHERE id = $1 FOR UPDATE", rollout_id)
        if current is None:
            raise NotFound(f"rollout {rollout_id!r} does not exist")
        if current != "running":
            if current != status:
                raise Conflict(f"rollout {rollout_id!r} already finished as {current}")
            if reward is None:
                return False
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
            "finished_at = coalesce(finished_at, now()) WHERE id = $1",
            rollout_id,
            status,
            reward,
        )
    return bool(current == "running")
