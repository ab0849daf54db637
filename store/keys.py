"""Scoped API keys: made, listed, revoked and looked up, kept only as SHA-256 digests.

A key is shown once, when it is made. The proxy looks one up by its digest when it first sees
it (and again after its cache expires), which also stamps `last_used_at`: at most one write per
key, proxy process and cache period, never one per request."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from lightloop.store.errors import Conflict, NotFound

# Every lightloop key starts so: the proxy looks up only such keys, so a LiteLLM virtual key or
# a random guess costs no query.
KEY_PREFIX = "sk-ll-"
SCOPES = ("agent", "admin")


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    scope: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


_COLUMNS = "id, name, scope, created_at, last_used_at, revoked_at"


def digest(key: str | bytes) -> str:
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()


def is_lightloop_key(key: bytes) -> bool:
    return key.startswith(KEY_PREFIX.encode())


async def create_key(conn: asyncpg.Connection, scope: str, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key of `scope`: its row and the key itself, which is not kept anywhere."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if name is not None and re.fullmatch(r"key-[0-9]+|[0-9]+", name):
        raise ValueError(f"{name!r} is reserved: unnamed keys are called key-ID, and revoke takes ids")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        row = await conn.fetchrow(
            f"""
            INSERT INTO api_keys (id, name, scope, key_hash)
            -- The id is drawn first so that an unnamed key can be called after it.
            SELECT n, coalesce($1, 'key-' || n), $2, $3
            FROM nextval(pg_get_serial_sequence('api_keys', 'id')) AS n
            RETURNING {_COLUMNS}
            """,
            name,
            scope,
            digest(key),
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"a key named {name!r} exists already") from None
    return ApiKey(**dict(row)), key


async def list_keys(conn: asyncpg.Connection) -> list[ApiKey]:
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM api_keys ORDER BY id")
    return [ApiKey(**dict(r)) for r in rows]


async def revoke_key(conn: asyncpg.Connection, ident: str) -> ApiKey:
    """Revoke the key with id or name `ident` (revoking twice keeps the first time)."""
    key_id = int(ident) if ident.isascii() and ident.isdigit() and len(ident) <= 18 else None
    row = await conn.fetchrow(
        f"""
        UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
        WHERE CASE WHEN $1::bigint IS NOT NULL THEN id = $1 ELSE name = $2 END
        RETURNING {_COLUMNS}
        """,
        key_id,
        ident,
    )
    if row is None:
        raise NotFound(f"no key has the id or name {ident!r}")
    return ApiKey(**dict(row))


async def use_key(conn: asyncpg.Connection, key_digest: str) -> ApiKey | None:
    """The key with this digest (revoked ones too, so the caller can say so), stamping its use."""
    row = await conn.fetchrow(
        f"""
        WITH used AS (
            UPDATE api_keys SET last_used_at = now()
            WHERE key_hash = $1 AND revoked_at IS NULL
            RETURNING id
        )
        SELECT {_COLUMNS} FROM api_keys WHERE key_hash = $1
        """,
        key_digest,
    )
    return None if row is None else ApiKey(**dict(row))
