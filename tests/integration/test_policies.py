"""Policy versions: numbering, one live version per policy, and NOTIFY on every change."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from lightloop.store import (
    PolicyChange,
    PolicyListener,
    PolicyVersionError,
    fail_version,
    list_versions,
    live_version,
    retire_version,
    set_live,
    stage_version,
)


async def test_versions_number_per_policy_and_one_is_live(conn: asyncpg.Connection) -> None:
    v1 = await stage_version(conn, "policy", base_model="smollm2", uri="file:///c/v1", sha256="aa")
    v2 = await stage_version(conn, "policy", base_model="smollm2")
    other = await stage_version(conn, "other", base_model="tiny")
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert v1.status == "staged" and v1.uri == "file:///c/v1"
    assert await live_version(conn, "policy") is None

    await set_live(conn, "policy", 1)
    live = await set_live(conn, "policy", 2)
    assert live.status == "live" and live.live_at is not None
    statuses = {v.version: v.status for v in await list_versions(conn, "policy")}
    assert statuses == {1: "retired", 2: "live"}
    # Rolling back to a retired version is allowed.
    await set_live(conn, "policy", 1)
    current = await live_version(conn, "policy")
    assert current is not None and current.version == 1


async def test_bad_transitions_are_refused(conn: asyncpg.Connection) -> None:
    await stage_version(conn, "policy", base_model="smollm2")
    with pytest.raises(PolicyVersionError, match="no version 7"):
        await set_live(conn, "policy", 7)
    await fail_version(conn, "policy", 1, "engine refused the adapter")
    with pytest.raises(PolicyVersionError, match="failed"):
        await set_live(conn, "policy", 1)
    v2 = await stage_version(conn, "policy", base_model="smollm2")
    await set_live(conn, "policy", v2.version)
    with pytest.raises(PolicyVersionError, match="is live"):
        await fail_version(conn, "policy", v2.version, "no")
    await retire_version(conn, "policy", v2.version, "superseded")
    assert await live_version(conn, "policy") is None
    # The database itself refuses a second live version, whatever the code does.
    await conn.execute("UPDATE policy_versions SET status = 'live' WHERE version = 2")
    await stage_version(conn, "policy", base_model="smollm2")
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute("UPDATE policy_versions SET status = 'live' WHERE version = 3")


async def test_listeners_hear_every_change(db_url: str, conn: asyncpg.Connection) -> None:
    heard: asyncio.Queue[PolicyChange] = asyncio.Queue()
    listener = PolicyListener(db_url, heard.put_nowait)
    await listener.start()
    try:
        await stage_version(conn, "policy", base_model="smollm2")
        await set_live(conn, "policy", 1)
        await stage_version(conn, "policy", base_model="smollm2")
        await fail_version(conn, "policy", 2, "checksum mismatch")
        got = [await asyncio.wait_for(heard.get(), 10) for _ in range(4)]
    finally:
        await listener.close()
    assert [(c.version, c.status) for c in got] == [(1, "staged"), (1, "live"), (2, "staged"), (2, "failed")]
    assert all(c.policy == "policy" for c in got)


async def test_the_proxy_rereads_live_versions_without_a_notification(
    conn: asyncpg.Connection, db_url: str
) -> None:
    """A LISTEN connection gone half-open delivers nothing; the periodic re-read still finds the
    live version (here made live by SQL, which sends no NOTIFY at all)."""
    from lightloop.proxy.versions import LiveVersions
    from lightloop.settings import PolicyModelSettings

    versions = LiveVersions([PolicyModelSettings(name="policy", base_model="b")], db_url, 0.1, reread_s=0.1)
    await versions.start()
    try:
        await asyncio.wait_for(versions.connected.wait(), 30)
        assert versions.live("policy") == 0
        await stage_version(conn, "policy", base_model="b", uri="file:///c/v1")
        await conn.execute("UPDATE policy_versions SET status = 'live', live_at = now()")

        for _ in range(500):  # polling the object under test, up to 10 s
            if versions.live("policy") == 1:
                break
            await asyncio.sleep(0.02)
        assert versions.live("policy") == 1
        assert await versions.uri_of("policy", 1) == "file:///c/v1"
    finally:
        await versions.close()
