"""Connections to Postgres, and the one place where driver errors become store errors."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from lightloop.store.errors import DatabaseUnavailable, QueryError

CONNECT_TIMEOUT_S = 10.0

# SQLSTATE classes that mean "the server or the link is gone", as opposed to "this statement is
# wrong": 08 connection exception, 53 insufficient resources, 57 operator intervention.
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")
# SQLSTATE classes about the row itself: 22 data exception (a value its column cannot hold), 23
# integrity constraint violation, 54 program limit exceeded (a value too large for its index or
# row). Every other refusal is about the database's state now, not the
# row: read-only after a failover (25006), a table or privilege not there yet (42P01, 42501),
# serialization failures and deadlocks (40001, 40P01), lock timeouts (55P03), internal errors
# (XX000). Those rows are kept and retried, never set aside.
_BAD_ROW_SQLSTATE_CLASSES = ("22", "23", "54")


def dsn(url: str) -> str:
    """A plain libpq URL (what asyncpg and psql take) from any Postgres URL SQLAlchemy accepts."""
    parsed = make_url(url)
    if not parsed.drivername.startswith(("postgres", "postgresql")):
        raise ValueError(f"not a Postgres URL: {parsed.render_as_string(hide_password=True)}")
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def sqlalchemy_url(url: str) -> str:
    """The same URL for SQLAlchemy's asyncpg dialect."""
    return make_url(dsn(url)).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An SQLAlchemy async engine on asyncpg, for ORM users and migrations."""
    return create_async_engine(sqlalchemy_url(url), **kwargs)


def host_port(url: str) -> tuple[str, int | str]:
    parts = urlsplit(dsn(url))
    return parts.hostname or "localhost", parts.port or 5432


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` means Postgres cannot be reached now (retry later), not a bad statement."""
    if isinstance(exc, asyncpg.PostgresError):
        return _sqlstate_class(exc) in _UNAVAILABLE_SQLSTATE_CLASSES
    if is_unencodable(exc):
        return False
    return isinstance(
        exc,
        OSError
        | asyncio.TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.exceptions.ConnectionDoesNotExistError,
    )


def is_unencodable(exc: BaseException) -> bool:
    """True when the driver itself refused a value (a str for an int column, say) before sending it.

    asyncpg raises its client-side DataError, a subclass of both InterfaceError and ValueError;
    it must not count as "unavailable", or a batch holding such a value would be retried forever.
    """
    return isinstance(exc, ValueError | TypeError)


def is_bad_row(exc: BaseException) -> bool:
    """True when a row itself was refused, by Postgres or by the driver: keep it aside, go on."""
    if isinstance(exc, asyncpg.PostgresError):
        return _sqlstate_class(exc) in _BAD_ROW_SQLSTATE_CLASSES
    return is_unencodable(exc)


def is_transient(exc: BaseException) -> bool:
    """True when Postgres refused a statement for a reason that is not the row's and may pass
    (a read-only server, a missing table or privilege, a deadlock): keep the rows, retry later."""
    return isinstance(exc, asyncpg.PostgresError) and not is_unavailable(exc) and not is_bad_row(exc)


def _sqlstate_class(exc: asyncpg.PostgresError) -> str:
    return str(getattr(exc, "sqlstate", "") or "")[:2]


def translate(exc: BaseException, url: str) -> Exception:
    """The store error for a driver error: DatabaseUnavailable or QueryError."""
    if is_unavailable(exc):
        host, port = host_port(url)
        return DatabaseUnavailable(host, port, describe_cause(exc))
    if isinstance(exc, asyncpg.PostgresError):
        return QueryError(format_postgres_error(exc))
    return QueryError(str(exc))


def describe_cause(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running and listening there?)"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def format_postgres_error(exc: asyncpg.PostgresError) -> str:
    """Postgres's own message, as psql prints it: `ERROR: ...` plus detail and hint."""
    severity = getattr(exc, "severity", None) or "ERROR"
    lines = [f"{severity}:  {exc.args[0] if exc.args else exc}"]
    for label, attr in (("DETAIL", "detail"), ("HINT", "hint")):
        value = getattr(exc, attr, None)
        if value:
            lines.append(f"{label}:  {value}")
    position = getattr(exc, "position", None)
    if position:
        lines.append(f"POSITION:  {position}")
    return "\n".join(lines)


async def connect(url: str, **kwargs: Any) -> asyncpg.Connection:
    """One asyncpg connection; an unreachable server raises DatabaseUnavailable."""
    try:
        return await asyncpg.connect(dsn(url), timeout=CONNECT_TIMEOUT_S, **kwargs)
    except Exception as exc:
        raise translate(exc, url) from None


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10, **kwargs: Any) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            dsn(url), min_size=min_size, max_size=max_size, timeout=CONNECT_TIMEOUT_S, **kwargs
        )
    except Exception as exc:
        raise translate(exc, url) from None
    assert pool is not None
    return pool


@asynccontextmanager
async def translated(url: str) -> AsyncIterator[None]:
    """Run a block, turning driver errors into store errors."""
    try:
        yield
    except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise translate(exc, url) from None
