"""Scoped keys in a real Postgres: made, listed, revoked, looked up by the proxy's cache, and
what the cache does when Postgres cannot be reached (a real refused connection)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from lightloop.proxy.errors import DatabaseDown, Unauthorized
from lightloop.proxy.keys import Caller, Keys
from lightloop.store import (
    Conflict,
    NotFound,
    create_key,
    create_pool,
    digest,
    list_keys,
    revoke_key,
    use_key,
)
from tests.support.stub_engine import free_port


async def test_keys_are_made_listed_and_revoked_by_id_or_name(conn: asyncpg.Connection) -> None:
    agent, agent_key = await create_key(conn, "agent", "runner")
    admin, _ = await create_key(conn, "admin")
    assert agent_key.startswith("sk-ll-") and len(agent_key) > 40
    assert admin.name == f"key-{admin.id}"  # unnamed keys are called after their id
    stored = await conn.fetchval("SELECT key_hash FROM api_keys WHERE id = $1", agent.id)
    assert stored == digest(agent_key) and agent_key not in stored
    with pytest.raises(Conflict, match="exists already"):
        await create_key(conn, "agent", "runner")
    with pytest.raises(ValueError, match="scope"):
        await create_key(conn, "root")
    first = await revoke_key(conn, "runner")
    again = await revoke_key(conn, str(agent.id))
    assert first.revoked_at is not None and again.revoked_at == first.revoked_at
    with pytest.raises(NotFound):
        await revoke_key(conn, "nobody")
    assert [(k.name, k.revoked_at is None) for k in await list_keys(conn)] == [
        ("runner", False),
        (admin.name, True),
    ]


async def test_using_a_key_stamps_it_and_a_revoked_one_is_not_stamped(conn: asyncpg.Connection) -> None:
    record, key = await create_key(conn, "agent", "used")
    assert record.last_used_at is None
    await use_key(conn, digest(key))
    found = await use_key(conn, digest(key))
    assert found is not None and found.last_used_at is not None
    await revoke_key(conn, "used")
    stamped = await conn.fetchval("SELECT last_used_at FROM api_keys WHERE name = 'used'")
    after = await use_key(conn, digest(key))
    assert after is not None and after.revoked_at is not None and after.last_used_at == stamped
    assert await use_key(conn, digest("sk-ll-unknown")) is None


async def test_the_proxy_takes_a_new_key_at_once_and_drops_a_revoked_one(db_url: str) -> None:
    pool = await create_pool(db_url, min_size=0, max_size=2)

    async def get_pool() -> asyncpg.Pool:
        return pool

    try:
        keys = Keys(b"sk-master", get_pool, cache_s=0)
        async with pool.acquire() as conn:
            _, key = await create_key(conn, "admin", "ops")
        assert await keys.identify(key.encode()) == Caller("admin", "ops")
        async with pool.acquire() as conn:
            await revoke_key(conn, "ops")
        with pytest.raises(Unauthorized, match="revoked or was never issued"):
            await keys.identify(key.encode())
    finally:
        await pool.close()


async def test_a_key_seen_before_keeps_working_while_postgres_is_unreachable(db_url: str) -> None:
    pool = await create_pool(db_url, min_size=0, max_size=2)
    # A real refused connection: nothing listens on this port.
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    current = {"url": db_url}

    async def get_pool() -> asyncpg.Pool:
        if current["url"] == db_url:
            return pool
        return await create_pool(dead, min_size=0, max_size=1)

    try:
        keys = Keys(b"sk-master", get_pool, cache_s=0)
        async with pool.acquire() as conn:
            _, seen = await create_key(conn, "agent", "seen")
            _, unseen = await create_key(conn, "agent", "unseen")
        assert await keys.identify(seen.encode()) == Caller("agent", "seen")
        current["url"] = dead
        assert await keys.identify(seen.encode()) == Caller("agent", "seen")  # the last answer stands
        with pytest.raises(DatabaseDown, match="not seen before"):
            await keys.identify(unseen.encode())
        assert await keys.identify(b"sk-master") is not None  # the master key needs no database
    finally:
        await pool.close()


async def test_a_cancelled_lookup_does_not_fail_the_others_waiting_for_the_same_key(db_url: str) -> None:
    pool = await create_pool(db_url, min_size=0, max_size=2)
    gate = asyncio.Event()

    async def slow_pool() -> asyncpg.Pool:
        await gate.wait()  # the lookup is under way when the first request is cancelled
        return pool

    try:
        async with pool.acquire() as conn:
            _, key = await create_key(conn, "agent", "shared")
        keys = Keys(b"sk-master", slow_pool, cache_s=5)
        first = asyncio.create_task(keys.identify(key.encode()))
        second = asyncio.create_task(keys.identify(key.encode()))
        await asyncio.sleep(0)  # both are waiting on the one lookup
        first.cancel()
        gate.set()
        assert await second == Caller("agent", "shared")
        assert first.cancelled()
    finally:
        await pool.close()


async def test_made_up_keys_cost_no_query_and_never_push_out_real_ones(db_url: str) -> None:
    pool = await create_pool(db_url, min_size=0, max_size=2)
    queries = 0

    async def counting_pool() -> asyncpg.Pool:
        nonlocal queries
        queries += 1
        return pool

    try:
        async with pool.acquire() as conn:
            _, key = await create_key(conn, "agent", "real")
        keys = Keys(b"sk-master", counting_pool, cache_s=60, memory=2)
        assert await keys.identify(key.encode()) == Caller("agent", "real")
        for guess in (b"sk-ll-short", b"sk-ll-" + b"!" * 43):  # not a key's shape: no query
            with pytest.raises(Unauthorized):
                await keys.identify(guess)
        assert queries == 1
        for i in range(5):  # well-formed but never issued: one query each, kept apart
            with pytest.raises(Unauthorized):
                await keys.identify(b"sk-ll-" + f"{i:043d}".encode())
        assert queries == 6
        await pool.close()  # Postgres is now out of reach for this cache: the real key is still known
        assert await keys.identify(key.encode()) == Caller("agent", "real")
    finally:
        await pool.close()
