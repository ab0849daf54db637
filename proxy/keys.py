"""Who is calling: the master key (an admin), a scoped key from `api_keys`, or a key lightloop
does not know (left to LiteLLM, which may know it as a virtual key).

A scoped key is looked up in Postgres the first time a process sees it, so a key made by
`lightloop keys create` works at once in every proxy process. The answer is trusted for
`cache_s`; after that the next request is still answered from memory while the key is looked up
again in the background, so a revocation reaches every process within `cache_s` and one more
request, and no call waits on Postgres for a key already seen (nor stalls while Postgres is
down: the last answer stands)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
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
        # digest -> (the caller, when it was looked up). Keys that exist only: a stream of made-up
        # keys must not push real ones out (they go to the smaller cache of unknown ones).
        self._known: OrderedDict[str, tuple[Caller | None, float]] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._memory = memory
        self._inflight: dict[str, asyncio.Task[Caller | None]] = {}
        self._master_digest = digest(master_key)

    async def identify(self, key: bytes | None) -> Caller | None:
        """The caller holding `key`; None for a key lightloop does not make (not `sk-ll-...`).
        Unauthorized for no key and for a lightloop key that is revoked or was never made."""
        if key is None:
            raise Unauthorized("no API key: send it as 'Authorization: Bearer <key>'")
        if hmac.compare_digest(key, self.master_key):
            return MASTER
        if not is_lightloop_key(key):
            return None
        caller = await self._lookup(digest(key)) if _WELL_FORMED.fullmatch(key) else None
        if caller is None:
            raise Unauthorized("the API key is revoked or was never issued")
        return caller

    async def identify_digest(self, key_digest: str) -> Caller | None:
        """The caller whose key has this digest (a dashboard session names its key so); None when
        it is revoked or unknown. The master key is not in `api_keys`: its digest is compared."""
        if hmac.compare_digest(key_digest, self._master_digest):
            return MASTER
        if not _DIGEST.fullmatch(key_digest):
            return None
        return await self._lookup(key_digest)

    async def _lookup(self, key_digest: str) -> Caller | None:
        now = time.monotonic()
        unknown_at = self._unknown.get(key_digest)
        if unknown_at is not None and now - unknown_at < self.cache_s:
            return None
        cached = self._known.get(key_digest)
        if cached is None:
            return await asyncio.shield(self._refresh(key_digest))
        if now - cached[1] < self.cache_s:
            return cached[0]
        if self.cache_s > 0:
            # Stale: answer from memory now and look it up again in the background, so that no
            # call waits on Postgres for a key it knows (nor stalls while it is down).
            self._refresh(key_digest)
            return cached[0]
        try:  # no cache: every request looks its key up, unless Postgres cannot answer
            return await asyncio.shield(self._refresh(key_digest))
        except DatabaseDown:
            return cached[0]

    def _refresh(self, key_digest: str) -> asyncio.Task[Caller | None]:
        """One lookup per key at a time, as its own task: a request that is cancelled while it
        waits cancels nothing the others wait on."""
        task = self._inflight.get(key_digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key_digest))
            self._inflight[key_digest] = task
            task.add_done_callback(lambda t: self._done(key_digest, t))
        return task

    def _done(self, key_digest: str, task: asyncio.Task[Caller | None]) -> None:
        self._inflight.pop(key_digest, None)
        error = None if task.cancelled() else task.exception()  # retrieved, whoever waited
        if error is not None and key_digest in self._known:
            log.warning("cannot look up an API key again (%s); its last answer stands", error)

    async def _fetch(self, key_digest: str) -> Caller | None:
        try:
            async with (await self.pool()).acquire(timeout=_ACQUIRE_S) as conn:
                row = await use_key(conn, key_digest)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            if not is_unavailable(exc) and not isinstance(exc, TimeoutError):
                raise
            raise DatabaseDown(f"Postgres is unavailable ({exc}) and this key was not seen before") from None
        now = time.monotonic()
        if row is None:
            self._unknown[key_digest] = now
            self._unknown.move_to_end(key_digest)
            while len(self._unknown) > _UNKNOWN_MEMORY:
                self._unknown.popitem(last=False)
            self._known.pop(key_digest, None)
            return None
        caller = None if row.revoked_at is not None else Caller(row.scope, row.name)
        self._known[key_digest] = (caller, now)
        self._known.move_to_end(key_digest)
        while len(self._known) > self._memory:
            self._known.popitem(last=False)
        return caller


# What `lightloop keys create` makes: the prefix and 32 random bytes in URL-safe base64.
_WELL_FORMED = re.compile(rb"sk-ll-[A-Za-z0-9_-]{43}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_UNKNOWN_MEMORY = 1_000
# Longest a key lookup waits for a connection from the proxy's pool.
_ACQUIRE_S = 5.0
