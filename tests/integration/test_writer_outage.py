"""Stop Postgres in the middle of a stream of rows, keep writing, start it again: every row lands
exactly once. Runs on its own embedded server, since it stops it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from lightloop.settings import WriterSettings
from lightloop.store import BatchWriter, EmbeddedPostgres, upgrade
from lightloop.store.database import dsn
from tests.integration.test_writer import span


@pytest.fixture
def own_pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "home" / "postgres")
    asyncio.run(upgrade(server.ensure_running()))
    yield server
    server.stop()


async def _until(condition: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_rows_survive_a_database_restart_exactly_once(own_pg: EmbeddedPostgres, tmp_path: Path) -> None:
    url = own_pg.url()
    assert url is not None
    writer = BatchWriter(
        url, tmp_path / "spool", WriterSettings(batch_size=100, flush_interval_ms=10, retry_interval_s=0.05)
    )
    await writer.start()
    next_id = 0

    async def produce(n: int) -> None:
        nonlocal next_id
        for _ in range(n):
            assert writer.submit("spans", span(next_id))
            next_id += 1
            if next_id % 50 == 0:
                await asyncio.sleep(0)  # let the writer run between bursts, as a server would

    await produce(2_000)
    # Stop the server while rows keep coming.
    stopping = asyncio.create_task(asyncio.to_thread(own_pg.stop))
    while not stopping.done():
        await produce(50)
    await produce(2_000)
    await writer.flush()
    assert writer.stats.rows_spooled > 0, "the outage should have sent rows to the spool"
    assert writer.spool.has_pending()

    await asyncio.to_thread(own_pg.ensure_running)
    await produce(2_000)
    await writer.flush()
    await _until(lambda: not writer.spool.has_pending())
    await writer.close()

    conn = await asyncpg.connect(dsn(url))
    ids = {r["span_id"] for r in await conn.fetch("SELECT span_id FROM spans")}
    await conn.close()
    assert len(ids) == next_id
    assert ids == {f"{i:016x}" for i in range(next_id)}
    assert writer.stats.rows_dropped == 0
    assert writer.stats.rows_written + writer.stats.rows_replayed >= next_id
