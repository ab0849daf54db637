"""Policy versions: stage, make live, retire, fail. Every change NOTIFYs `lightloop_policy`
(payload JSON: policy, version, status), so listeners such as the proxy learn it at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from lightloop.store import database
from lightloop.store.errors import PolicyVersionError

CHANNEL = "lightloop_policy"

_COLUMNS = "policy, version, base_model, uri, sha256, status, reason, training_step, created_at, live_at"


def adapter_name(policy: str, version: int) -> str:
    """The name a version is loaded under on the engines (vLLM's lora_name) and asked for by the
    proxy. Version 0 is the base model, served under its own name, so it has no adapter."""
    assert version > 0
    return f"{policy}-v{version}"


@dataclass(frozen=True)
class PolicyVersion:
    policy: str
    version: int
    base_model: str
    uri: str | None
    sha256: str | None
    status: str
    reason: str | None
    training_step: int | None
    created_at: datetime
    live_at: datetime | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> PolicyVersion:
        return cls(**dict(r))


@dataclass(frozen=True)
class PolicyChange:
    policy: str
    version: int
    status: str


async def _lock(conn: asyncpg.Connection, policy: str) -> None:
    # Version numbers and the single live version are per policy; serialise changes to one policy.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('lightloop.policy:' || $1))", policy)


async def _notify(conn: asyncpg.Connection, policy: str, version: int, status: str) -> None:
    payload = json.dumps({"policy": policy, "version": version, "status": status})
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)


async def stage_version(
    conn: asyncpg.Connection,
    policy: str,
    *,
    base_model: str,
    uri: str | None = None,
    sha256: str | None = None,
) -> PolicyVersion:
    """Add the next version of `policy` as staged (not yet served)."""
    async with conn.transaction():
        await _lock(conn, policy)
        row = await conn.fetchrow(
            f"""
            INSERT INTO policy_versions (policy, version, base_model, uri, sha256, status)
            SELECT $1, coalesce(max(version), 0) + 1, $2, $3, $4, 'staged'
            FROM policy_versions WHERE policy = $1
            RETURNING {_COLUMNS}
            """,
            policy,
            base_model,
            uri,
            sha256,
        )
        version = PolicyVersion.from_record(row)
        await _notify(conn, policy, version.version, "staged")
    return version


async def set_live(conn: asyncpg.Connection, policy: str, version: int) -> PolicyVersion:
    """Make `version` the one live version of `policy`; the previous live one is retired.

    A retired version may be made live again (a rollback); a failed one may not."""
    async with conn.transaction():
        await _lock(conn, policy)
        current = await conn.fetchval(
            "SELECT status FROM policy_versions WHERE policy = $1 AND version = $2", policy, version
        )
        if current is None:
            raise PolicyVersionError(f"policy {policy!r} has no version {version}")
        if current == "failed":
            raise PolicyVersionError(f"version {version} of {policy!r} failed and cannot be made live")
        if current != "live":
            await conn.execute(
                "UPDATE policy_versions SET status = 'retired' WHERE policy = $1 AND status = 'live'",
                policy,
            )
        row = await conn.fetchrow(
            f"""
            UPDATE policy_versions SET status = 'live', live_at = now(), reason = NULL
            WHERE policy = $1 AND version = $2 RETURNING {_COLUMNS}
            """,
            policy,
            version,
        )
        await _notify(conn, policy, version, "live")
    return PolicyVersion.from_record(row)


async def set_version_uri(conn: asyncpg.Connection, policy: str, version: int, uri: str) -> None:
    """Where a staged version's files are (the trainer knows once its folder has its number)."""
    await conn.execute(
        "UPDATE policy_versions SET uri = $3 WHERE policy = $1 AND version = $2", policy, version, uri
    )


async def retire_version(
    conn: asyncpg.Connection, policy: str, version: int, reason: str | None = None
) -> None:
    await _set_status(conn, policy, version, "retired", reason)


async def fail_version(conn: asyncpg.Connection, policy: str, version: int, reason: str) -> None:
    """Mark a staged version that could not be published; the live version stays as it is."""
    await _set_status(conn, policy, version, "failed", reason)


async def _set_status(
    conn: asyncpg.Connection, policy: str, version: int, status: str, reason: str | None
) -> None:
    async with conn.transaction():
        await _lock(conn, policy)
        current = await conn.fetchval(
            "SELECT status FROM policy_versions WHERE policy = $1 AND version = $2", policy, version
        )
        if current is None:
            raise PolicyVersionError(f"policy {policy!r} has no version {version}")
        if current == "live" and status == "failed":
            raise PolicyVersionError(f"version {version} of {policy!r} is live; retire it instead")
        await conn.execute(
            "UPDATE policy_versions SET status = $3, reason = $4 WHERE policy = $1 AND version = $2",
            policy,
            version,
            status,
            reason,
        )
        await _notify(conn, policy, version, status)


async def live_version(conn: asyncpg.Connection, policy: str) -> PolicyVersion | None:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM policy_versions WHERE policy = $1 AND status = 'live'", policy
    )
    return None if row is None else PolicyVersion.from_record(row)


async def get_version(conn: asyncpg.Connection, policy: str, version: int) -> PolicyVersion | None:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM policy_versions WHERE policy = $1 AND version = $2", policy, version
    )
    return None if row is None else PolicyVersion.from_record(row)


async def list_versions(conn: asyncpg.Connection, policy: str) -> list[PolicyVersion]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM policy_versions WHERE policy = $1 ORDER BY version", policy
    )
    return [PolicyVersion.from_record(r) for r in rows]


class PolicyListener:
    """LISTENs on the policy channel over its own connection and calls `on_change` for each
    change. Reconnecting after a lost connection is the caller's job (`closed` tells), because
    only it knows how to re-read the live versions it may have missed meanwhile."""

    def __init__(self, url: str, on_change: Callable[[PolicyChange], Awaitable[None] | None]) -> None:
        self.url = url
        self.on_change = on_change
        self._conn: asyncpg.Connection | None = None
        self.closed = asyncio.Event()

    async def start(self) -> None:
        self._conn = await database.connect(self.url)
        self._conn.add_termination_listener(lambda _c: self.closed.set())
        await self._conn.add_listener(CHANNEL, self._on_notify)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        data = json.loads(payload)
        result = self.on_change(
            PolicyChange(policy=data["policy"], version=int(data["version"]), status=data["status"])
        )
        if asyncio.iscoroutine(result):
            asyncio.get_running_loop().create_task(result)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        self.closed.set()
