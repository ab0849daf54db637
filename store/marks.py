"""Writer marks: how a process tells the others that every row it accepted before a moment is in
Postgres.

Several proxy processes (`--workers N`, replicas) each hold rows in their batch writer's memory
for up to a flush interval. A rollout's calls may go to one process and its finish to another, so
"finished" in Postgres does not mean "all its calls are in Postgres". Each writer therefore keeps
one row in `writer_marks`: every row it accepted before `durable_through` has been written. Both
sides use the database's clock: a finish is stamped with `now()` of its transaction, a mark with
`clock_timestamp()` read before the writer flushes. A call accepted before the finish arrived was
accepted before that stamp; a mark at or past the stamp was read after it, and the flush that
follows the reading covers every row accepted until then. So once every live writer's mark has
passed a rollout's `finished_at`, all of its calls are in Postgres, whichever process took them.

A writer that stops cleanly removes its row; one that was killed stops holding anything back
when it has not been seen for `stale_after_s` (its spool is replayed when it starts again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg

from lightloop.store import database
from lightloop.store.errors import WriterUnavailable

log = logging.getLogger(__name__)

# The earliest mark every live writer has reached: 'infinity' with no live writer (nothing is
# held anywhere), '-infinity' while a live writer has not made its first mark yet.
MARKS_SQL = """
SELECT CASE WHEN count(*) = 0 THEN 'infinity'::timestamptz
            ELSE min(coalesce(durable_through, '-infinity'::timestamptz)) END
FROM writer_marks
WHERE seen_at > now() - make_interval(secs => stale_after_s)
"""

_PASSED_SQL = f"SELECT ({MARKS_SQL}) >= $1"


async def register_writer(
    conn: asyncpg.Connection, writer_id: str, *, host: str, pid: int, stale_after_s: float
) -> datetime:
    """Add this writer (holding everything back until its first mark); returns the database time,
    the first moment its next mark may promise."""
    now: datetime = await conn.fetchval(
        """
        INSERT INTO writer_marks (writer_id, host, pid, stale_after_s) VALUES ($1, $2, $3, $4)
        ON CONFLICT (writer_id) DO UPDATE SET seen_at = now()
        RETURNING clock_timestamp()
        """,
        writer_id,
        host,
        pid,
        float(stale_after_s),
    )
    return now


async def advance_mark(
    conn: asyncpg.Connection,
    writer_id: str,
    durable_through: datetime | None,
    *,
    host: str,
    pid: int,
    stale_after_s: float,
) -> datetime:
    """Say the writer is alive and, unless None, that every row it accepted before
    `durable_through` is written. Returns the database time now, for the next mark. A row removed
    meanwhile (by hand, or by an old writer's clean-up) is made again."""
    now: datetime = await conn.fetchval(
        """
        INSERT INTO writer_marks (writer_id, host, pid, stale_after_s, durable_through)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (writer_id) DO UPDATE
        SET seen_at = now(),
            durable_through = greatest(writer_marks.durable_through, EXCLUDED.durable_through)
        RETURNING clock_timestamp()
        """,
        writer_id,
        host,
        pid,
        float(stale_after_s),
        durable_through,
    )
    return now


async def promise_through_finish(conn: asyncpg.Connection, writer_id: str, rollout_id: str) -> None:
    """Move a writer's mark to a rollout's `finished_at`. Only for a caller that knows every row
    its writer accepted before that moment is written (see `MarkKeeper.can_promise`)."""
    await conn.execute(
        """
        UPDATE writer_marks
        SET durable_through = greatest(durable_through, (SELECT finished_at FROM rollouts WHERE id = $2)),
            seen_at = now()
        WHERE writer_id = $1
        """,
        writer_id,
        rollout_id,
    )


async def remove_writer(conn: asyncpg.Connection, writer_id: str) -> None:
    await conn.execute("DELETE FROM writer_marks WHERE writer_id = $1", writer_id)


async def forget_old_writers(conn: asyncpg.Connection, older_than_s: float = 86_400.0) -> int:
    """Remove rows of writers long gone (killed, never cleaned up): for SQL readers' sake only,
    since a stale row already holds nothing back."""
    status = await conn.execute(
        "DELETE FROM writer_marks WHERE seen_at < now() - make_interval(secs => $1)", float(older_than_s)
    )
    return int(status.split()[-1])


async def durable_through(conn: asyncpg.Connection) -> datetime | None:
    """The moment before which every live writer has written every row it accepted; None when no
    live writer holds anything back (there is none)."""
    mark: datetime = await conn.fetchval(MARKS_SQL)
    if mark.tzinfo is None:  # asyncpg's infinities: naive datetime.max and datetime.min
        return None if mark == datetime.max else mark.replace(tzinfo=UTC)
    return mark


async def written_since(conn: asyncpg.Connection, since: datetime) -> bool:
    """Whether every live writer has written what it accepted before `since` (database time)."""
    passed: bool = await conn.fetchval(_PASSED_SQL, since)
    return passed


async def database_time(conn: asyncpg.Connection) -> datetime:
    now: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return now


async def wait_until_written(
    conn: asyncpg.Connection, since: datetime, timeout_s: float, poll_s: float = 0.05
) -> bool:
    """Wait until every live writer has written what it accepted before `since` (database time);
    False when that did not happen within `timeout_s`. Polls: marks advance every
    `writer.mark_interval_s`, and the wait is bounded, so LISTEN would buy little here."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await written_since(conn, since):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll_s)  # pacing a poll with a deadline, not synchronisation


async def wait_for_writers(conn: asyncpg.Connection, timeout_s: float) -> bool:
    """Wait until every live writer has written every row it accepted before this call; False
    when one has not within `timeout_s`."""
    since: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return await wait_until_written(conn, since, timeout_s)


class MarkKeeper:
    """Keeps one batch writer's row in `writer_marks`. Each round: flush the writer, then promise
    the database time read before the flush began (the module's docstring says why that order
    makes the promise true). Supervised: a failure (Postgres down) is logged once per outage and
    the next round reconnects; a writer that cannot confirm its rows only says it is alive."""

    def __init__(
        self,
        url: str,
        *,
        flush: Callable[[], Awaitable[None]],
        pending: Callable[[], bool],
        interval_s: float,
        stale_after_s: float,
    ) -> None:
        self.url = url
        self.flush = flush
        self.pending = pending  # rows spooled and not yet replayed: no promise while any are
        self.interval_s = interval_s
        self.writer_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.host, self.pid, self.stale_after_s = socket.gethostname(), os.getpid(), stale_after_s
        self.marked_through: datetime | None = None
        self.failures = 0
        self._conn: asyncpg.Connection | None = None

    async def run(self) -> None:
        promised: datetime | None = None
        failing = False
        while True:
            try:
                conn = self._conn
                if conn is None or conn.is_closed():
                    conn = await database.connect(self.url, command_timeout=10)
                    self._conn = conn
                    await forget_old_writers(conn)
                    promised = await register_writer(
                        conn, self.writer_id, host=self.host, pid=self.pid, stale_after_s=self.stale_after_s
                    )
                else:
                    promised = await self._round(conn, promised)
                if failing:
                    log.info("writer marks are recorded again")
                    failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                if not failing:
                    log.warning("cannot record the writer's mark (%s: %s); retrying", type(exc).__name__, exc)
                    failing = True
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(self.interval_s)  # pacing between rounds, not synchronisation

    async def _round(self, conn: asyncpg.Connection, promised: datetime | None) -> datetime:
        durable: datetime | None = None
        try:
            await self.flush()
            if not self.pending():
                durable = promised
        except WriterUnavailable:
            pass  # alive but behind: say so without promising anything
        now = await advance_mark(
            conn, self.writer_id, durable, host=self.host, pid=self.pid, stale_after_s=self.stale_after_s
        )
        if durable is not None:
            self.marked_through = durable
        return now

    def can_promise(self, accepted_before: int, accepted_now: int) -> bool:
        """Whether a finish may move the mark at once (`promise_through_finish`): marks are on, the caller
        flushed after counting `accepted_before` rows, no row arrived since, and none is spooled.
        Then every row accepted before the finish committed is written, and a single process's
        claims need not wait for the next round."""
        return self.interval_s > 0 and accepted_before == accepted_now and not self.pending()

    async def remove(self) -> None:
        """A clean stop: this writer holds nothing back any more. Rows it spooled and could not
        replay are written by the next start; a claim meanwhile goes on without them."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(remove_writer(conn, self.writer_id), 5)
        except Exception as exc:
            log.warning("could not remove writer mark %s (%s); it lapses by itself", self.writer_id, exc)
        with contextlib.suppress(Exception):
            await conn.close()
