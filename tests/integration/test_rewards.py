"""Rewards and finishing rollouts against a real Postgres."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from lightloop.store import Conflict, NotFound, add_reward, finish_rollout


async def _rollout_with_call(conn: asyncpg.Connection, rollout: str, response_id: str) -> None:
    await conn.execute("INSERT INTO rollouts (id) VALUES ($1)", rollout)
    await conn.execute(
        "INSERT INTO llm_calls (span_id, rollout_id, seq, model, request, response_id) "
        "VALUES ($1, $2, 0, 'policy', '{}', $3)",
        f"span-{rollout}",
        rollout,
        response_id,
    )


async def test_a_reward_by_response_id_lands_on_its_rollout_and_call(conn: asyncpg.Connection) -> None:
    await _rollout_with_call(conn, "r1", "chatcmpl-1")
    record = await add_reward(conn, value=0.25, response_id="chatcmpl-1", name="reward")
    assert (record.rollout_id, record.span_id, record.value) == ("r1", "span-r1", 0.25)
    assert await conn.fetchval("SELECT reward FROM rollouts WHERE id = 'r1'") == 0.25
    other = await add_reward(conn, value=3, rollout_id="r1", name="latency")
    assert other.span_id is None
    # Only the training reward ("reward") is copied onto the rollout.
    assert await conn.fetchval("SELECT reward FROM rollouts WHERE id = 'r1'") == 0.25
    assert await conn.fetchval("SELECT count(*) FROM rewards WHERE rollout_id = 'r1'") == 2


async def test_unknown_ids_are_not_found_and_write_nothing(conn: asyncpg.Connection) -> None:
    with pytest.raises(NotFound, match="rollout 'nope'"):
        await add_reward(conn, value=1, rollout_id="nope")
    with pytest.raises(NotFound, match="response id"):
        await add_reward(conn, value=1, response_id="chatcmpl-nope")
    with pytest.raises(NotFound):
        await finish_rollout(conn, "nope", "succeeded")
    assert await conn.fetchval("SELECT count(*) FROM rewards") == 0


async def test_the_database_refuses_non_finite_rewards(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO rollouts (id) VALUES ('r2')")
    with pytest.raises(asyncpg.CheckViolationError):
        await add_reward(conn, value=float("nan"), rollout_id="r2")


async def test_finish_is_idempotent_and_refuses_a_different_status(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO rollouts (id) VALUES ('r3')")
    assert await finish_rollout(conn, "r3", "succeeded", reward=1.0) is True
    row = await conn.fetchrow("SELECT status, reward, finished_at FROM rollouts WHERE id = 'r3'")
    assert row["status"] == "succeeded" and row["reward"] == 1.0 and row["finished_at"] is not None
    assert await finish_rollout(conn, "r3", "succeeded") is False
    with pytest.raises(Conflict):
        await finish_rollout(conn, "r3", "failed")
    # A late reward with the same status is still recorded and becomes the rollout's reward.
    assert await finish_rollout(conn, "r3", "succeeded", reward=0.5) is False
    assert await conn.fetchval("SELECT reward FROM rollouts WHERE id = 'r3'") == 0.5
    assert await conn.fetchval("SELECT count(*) FROM rewards WHERE rollout_id = 'r3'") == 2


async def test_concurrent_rewards_and_finish_do_not_lose_updates(
    db_url: str, conn: asyncpg.Connection
) -> None:
    from lightloop.store.database import dsn

    await conn.execute("INSERT INTO rollouts (id) VALUES ('r4')")
    pool = await asyncpg.create_pool(dsn(db_url), min_size=4, max_size=8)
    try:

        async def reward(i: int) -> None:
            async with pool.acquire() as c:
                await add_reward(c, value=i, rollout_id="r4", name=f"n{i}")

        async def finish() -> None:
            async with pool.acquire() as c:
                await finish_rollout(c, "r4", "succeeded")

        await asyncio.gather(*[reward(i) for i in range(20)], finish())
    finally:
        await pool.close()
    assert await conn.fetchval("SELECT count(*) FROM rewards WHERE rollout_id = 'r4'") == 20
    assert await conn.fetchval("SELECT status FROM rollouts WHERE id = 'r4'") == "succeeded"


async def test_a_failure_whose_error_holds_nul_is_recorded(conn: asyncpg.Connection) -> None:
    # An agent's exception text can carry U+0000 (a tool's binary output); Postgres refuses it.
    await conn.execute("INSERT INTO rollouts (id) VALUES ('r5')")
    assert await finish_rollout(conn, "r5", "failed", metadata={"error": "bad \x00 bytes"}) is True
    row = await conn.fetchrow("SELECT status, metadata->>'error' AS error FROM rollouts WHERE id = 'r5'")
    assert (row["status"], row["error"]) == ("failed", "bad \ufffd bytes")


async def test_turn_rewards_reach_the_claim_per_call_and_a_call_of_another_rollout_is_refused(
    conn: asyncpg.Connection,
) -> None:
    from lightloop.store import claim_groups

    await _rollout_with_call(conn, "t1", "chatcmpl-t1")
    await _rollout_with_call(conn, "t2", "chatcmpl-t2")
    await add_reward(conn, value=0.5, response_id="chatcmpl-t1")
    await add_reward(conn, value=0.25, span_id="span-t1", rollout_id="t1")
    await add_reward(conn, value=9, span_id="span-t1", name="latency")  # not a training reward
    for wrong in ({"response_id": "chatcmpl-t2"}, {"span_id": "span-t2"}):
        with pytest.raises(Conflict, match="belongs to rollout 't2', not 't1'"):
            await add_reward(conn, value=1, rollout_id="t1", **wrong)
    with pytest.raises(NotFound, match="span id"):
        await add_reward(conn, value=1, span_id="span-nope")
    assert await finish_rollout(conn, "t1", "succeeded", reward=2.0) is True
    assert await finish_rollout(conn, "t2", "succeeded") is True
    await add_reward(conn, value=0.0, span_id="span-t2")
    claim = await claim_groups(conn, "trainer-1", max_groups=10, lease_s=60, settle_s=0)
    assert claim is not None
    got = {r.id: (r.turn_rewards, r.final_reward, r.reward) for r in claim.rollouts}
    # t1: its call earned 0.5 + 0.25, its final reward is 2; t2 has a turn reward and no final one.
    assert got == {"t1": ({"span-t1": 0.75}, 2.0, 2.0), "t2": ({"span-t2": 0.0}, None, 0.0)}
    assert await conn.fetchval("SELECT count(*) FROM rewards WHERE rollout_id = 't2'") == 1


async def test_a_response_id_two_rollouts_share_rewards_the_named_rollout_s_call(
    conn: asyncpg.Connection,
) -> None:
    await _rollout_with_call(conn, "d1", "chatcmpl-same")
    await _rollout_with_call(conn, "d2", "chatcmpl-same")
    for rollout in ("d1", "d2"):
        record = await add_reward(conn, value=1, rollout_id=rollout, response_id="chatcmpl-same")
        assert (record.rollout_id, record.span_id) == (rollout, f"span-{rollout}")
