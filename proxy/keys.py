"""Who is calling: the master key (an admin), a scoped key from `api_keys`, or a key lightloop
does not know (left to LiteLLM, which may know it as a virtual key).

A scoped key is looked up in Postgres the first time a process sees it, so a key made by
`lightloop keys create` works at once in every proxy process; the answer is kept for `cache_s`,
so a revocation reaches every process within that time. While Postgres is unreachable a key
seen before keeps its last answer, so agents' calls go on being served."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from lightloop.proxy.errors import DatabaseDown, Forbidden, Unauthorized
from lightloop.store import digest, is_lightloop_key, use_key
from lightloop.store.database import is_unavailable

log = logging.getLogger(__name__)

Pool = Callable[[], Awaitable[asyncpg.Pool]]

# What every scope may do: an admin key may do whatever an agent key may.
_RANK = {"agent": 0, "admin": 1}


@dataclass(frozen=True)
class Caller:
    scope: str  # agent | admin
    name: str  # "master", or the key's name in api_keys


MASTER = Caller("admin", "master")


def require(caller: Caller, scope: str, what: str) -> None:
    if _RANK[caller.scope] < _RANK[scope]:
        raise Forbidden(f"{what} needs an admin key; key {caller.name!r} is an agent key")


class Keys:
    def __init__(self, master_key: bytes, pool: Pool, cache_s: float, memory: int = 10_000) -> None:
        self.master_key = master_key
        self.pool = pool
        self.cache_s = cache_s
        self._memory = memory
        # digest -> (the caller, or None for a revoked or unknown key; when it was looked up)
        self._cache: OrderedDict[str, tuple[Caller | None, float]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Caller | None]] = {}

    async def identify(self, key: bytes | None) -> Caller | None:
        """The caller holding `key`; None for a key lightloop does not make (not `sk-ll-...`).
        Unauthorized for no key and for a lightloop key that is revoked or was never made."""
        if key is None:
            raise Unauthorized("no API key: send it as 'Authorization: Bearer <key>'")
        if hmac.compare_digest(key, self.master_key):
            return MASTER
        if not is_lightloop_key(key):
            return None
        caller = await self._lookup(digest(key))
        if caller is None:
            raise Unauthorized("the API key is revoked or was never issued")
        return caller

    async def _lookup(self, key_digest: str) -> Caller | None:
        cached = self._cache.get(key_digest)
        if cached is not None and time.monotonic() - cached[1] < self.cache_s:
            return cached[0]
        pending = self._inflight.get(key_digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Caller | None] = asyncio.get_running_loop().create_future()
        self._inflight[key_digest] = future
        try:
            caller = await self._fetch(key_digest, cached)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters, if any, get it too
            raise
        else:
            future.set_result(caller)
            return caller
        finally:
            del self._inflight[key_digest]

    async def _fetch(self, key_digest: str, cached: tuple[Caller | None, float] | None) -> Caller | None:
        try:
            async with (await self.pool()).acquire() as conn:
                row = await use_key(conn, key_digest)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            if not is_unavailable(exc):
                raise
            if cached is not None:
                return cached[0]  # Postgres is down: the last answer stands until it is back
            raise DatabaseDown(f"Postgres is unavailable ({exc}) and this key was not seen before") from None
        caller = None if row is None or row.revoked_at is not None else Caller(row.scope, row.name)
        self._cache[key_digest] = (caller, time.monotonic())
        self._cache.move_to_end(key_digest)
        while len(self._cache) > self._memory:
            self._cache.popitem(last=False)
        return caller
