"""Writer marks (store/marks.py): a claim waits until every live batch writer has written what
it accepted before the group finished; a killed writer stops holding claims back; a writer's
own mark never promises rows that are only in its memory or its spool."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from lightloop.settings import WriterSettings
from lightloop.store import (
    BatchWriter,
    claim_groups,
    durable_through,
    promise_through_finish,
    wait_for_writers,
)
from lightloop.store.marks import advance_mark, register_writer

from .test_claims import add_rollout

WRITER = {"host": "h", "pid": 1}


async def claim(conn: asyncpg.Connection) -> list[str]:
    got = await claim_groups(conn, "t", max_groups=10, lease_s=60, settle_s=0)
    return [] if got is None else sorted(got.rollout_ids)


async def eventually(check: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    """Poll `check` until it returns something truthy (a deadline, not a sleep-as-sync)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


async def test_a_claim_waits_for_every_live_writer_to_pass_the_finish(conn: asyncpg.Connection) -> None:
    await add_rollout(conn, "r0", "G")
    await add_rollout(conn, "r1", "G")
    # No writer at all: nothing is held anywhere, the group is ready.
    assert await durable_through(conn) is None
    before = await register_writer(conn, "w-behind", stale_after_s=30, **WRITER)
    # A writer that has not made its first mark holds everything back.
    assert await claim(conn) == []
    # One whose mark is older than the group's finish still does.
    await advance_mark(conn, "w-behind", before - timedelta(seconds=5), stale_after_s=30, **WRITER)
    assert await claim(conn) == []
    after = await conn.fetchval("SELECT clock_timestamp()")
    await advance_mark(conn, "w-behind", after, stale_after_s=30, **WRITER)
    # A second writer, fully caught up, changes nothing: the slowest one decides.
    await register_writer(conn, "w-ahead", stale_after_s=30, **WRITER)
    assert await claim(conn) == []
    await advance_mark(conn, "w-ahead", after, stale_after_s=30, **WRITER)
    assert await claim(conn) == ["r0", "r1"]


async def test_a_mark_never_moves_back(conn: asyncpg.Connection) -> None:
    now = await register_writer(conn, "w", stale_after_s=30, **WRITER)
    await advance_mark(conn, "w", now, stale_after_s=30, **WRITER)
    await advance_mark(conn, "w", now - timedelta(minutes=1), stale_after_s=30, **WRITER)
    await advance_mark(conn, "w", None, stale_after_s=30, **WRITER)
    assert await durable_through(conn) == now


async def test_a_writer_not_seen_for_its_stale_time_holds_nothing_back(conn: asyncpg.Connection) -> None:
    await add_rollout(conn, "r0", None)
    await register_writer(conn, "killed", stale_after_s=30, **WRITER)
    assert await claim(conn) == []
    await conn.execute("UPDATE writer_marks SET seen_at = now() - interval '31 seconds'")
    assert await claim(conn) == ["r0"]


async def test_wait_for_writers_is_bounded(conn: asyncpg.Connection) -> None:
    await register_writer(conn, "stuck", stale_after_s=30, **WRITER)
    started = time.monotonic()
    assert await wait_for_writers(conn, timeout_s=0.3) is False
    assert time.monotonic() - started < 5
    await conn.execute("DELETE FROM writer_marks")
    assert await wait_for_writers(conn, timeout_s=0.3) is True


async def test_a_batch_writer_marks_only_what_it_has_written(
    conn: asyncpg.Connection, db_url: str, tmp_path: Path
) -> None:
    # Batches leave only on a flush: a row sits in memory for as long as the test wants.
    settings = WriterSettings(flush_interval_ms=60_000, batch_size=100_000, mark_interval_s=0.05)
    writer = BatchWriter(db_url, tmp_path / "spool", settings)
    await writer.start()
    try:
        writer.submit("rollouts", {"id": "held"})
        # Read after the row was accepted: a mark at or past it promises the row.
        stamp = await conn.fetchval("SELECT clock_timestamp()")
        # The marker flushes before it promises: the row is in Postgres before the mark passes it.
        await eventually(lambda: _passed(conn, stamp))
        assert await _passed(conn, stamp)
        assert await conn.fetchval("SELECT count(*) FROM rollouts WHERE id = 'held'") == 1
        row = await conn.fetchrow("SELECT host, pid, stale_after_s FROM writer_marks")
        assert row["stale_after_s"] == settings.stale_after_s
    finally:
        await writer.close()
    # A clean stop removes the row: a stopped writer holds nothing back.
    assert await conn.fetchval("SELECT count(*) FROM writer_marks") == 0


async def test_spooled_rows_hold_the_mark_until_they_are_replayed(
    conn: asyncpg.Connection, db_url: str, tmp_path: Path
) -> None:
    settings = WriterSettings(flush_interval_ms=10, retry_interval_s=0.05, mark_interval_s=0.05)
    writer = BatchWriter(db_url, tmp_path / "spool", settings)
    await writer.start()
    try:
        await eventually(lambda: conn.fetchval("SELECT durable_through FROM writer_marks"))
        # The table refuses for now (a privilege or a table missing is the database's state):
        # the rows are spooled, and the mark must stop short of them.
        await conn.execute("ALTER TABLE rollouts RENAME TO rollouts_away")
        writer.submit("rollouts", {"id": "spooled"})
        stamp = await conn.fetchval("SELECT clock_timestamp()")
        await eventually(lambda: writer.stats.rows_spooled > 0)
        assert writer.stats.rows_spooled > 0
        # Rounds go on (seen_at moves) while the promise stays behind the spooled row.
        seen = await conn.fetchval("SELECT seen_at FROM writer_marks")
        await eventually(lambda: _true_after(conn, seen))
        assert not await _passed(conn, stamp)
        await conn.execute("ALTER TABLE rollouts_away RENAME TO rollouts")
        await eventually(lambda: _passed(conn, stamp))
        assert await _passed(conn, stamp)
        assert await conn.fetchval("SELECT count(*) FROM rollouts WHERE id = 'spooled'") == 1
    finally:
        await writer.close()


async def _passed(conn: asyncpg.Connection, stamp: datetime) -> bool:
    mark = await durable_through(conn)
    return mark is not None and mark >= stamp


async def _true_after(conn: asyncpg.Connection, seen: object) -> bool:
    return bool(await conn.fetchval("SELECT seen_at > $1 FROM writer_marks", seen))


async def test_a_finish_can_move_its_own_writer_s_mark_to_the_finish(conn: asyncpg.Connection) -> None:
    await register_writer(conn, "w", stale_after_s=30, **WRITER)
    await add_rollout(conn, "r0", None)
    assert await claim(conn) == []
    await promise_through_finish(conn, "w", "r0")
    assert await durable_through(conn) == await conn.fetchval("SELECT finished_at FROM rollouts")
    assert await claim(conn) == ["r0"]
