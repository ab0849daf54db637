"""The batch writer against a real Postgres: bursts land, duplicates land once, refused rows are
kept, a full queue is counted, and nothing is lost across a database outage or a restart."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from lightloop.settings import WriterSettings
from lightloop.store import BatchWriter, WriterUnavailable
from lightloop.store.writer import approx_size


def span(i: int, rollout: str | None = None, **extra: object) -> dict[str, object]:
    return {
        "span_id": f"{i:016x}",
        "trace_id": "ab" * 16,
        "name": "chat policy",
        "start_time": datetime.now(UTC),
        "attributes": {"gen_ai.request.model": "policy", "i": i},
        "rollout_id": rollout,
        **extra,
    }


def call(span_id: str, rollout: str, seq: int, choice: int = 0) -> dict[str, object]:
    return {
        "span_id": span_id,
        "choice_index": choice,
        "rollout_id": rollout,
        "seq": seq,
        "model": "policy",
        "request": {"messages": [{"role": "user", "content": "2+2?"}]},
        "response": {"id": "chatcmpl-1"},
        "prompt_token_ids": list(range(1000)),
        "completion_token_ids": [1, 2, 3],
        "completion_logprobs": [-0.5, -31.25, 0.0],
        "finish_reason": "stop",
        "latency_ms": 12.5,
    }


@pytest.fixture
async def writer(db_url: str, tmp_path: Path) -> AsyncIterator[BatchWriter]:
    w = BatchWriter(db_url, tmp_path / "spool", WriterSettings(batch_size=500, flush_interval_ms=50))
    await w.start()
    yield w
    await w.close()


async def test_a_burst_of_rows_all_land(writer: BatchWriter, conn: asyncpg.Connection) -> None:
    rollout = str(uuid.uuid4())
    assert writer.submit("rollouts", {"id": rollout, "group_id": "g1", "task_id": "t1"})
    for i in range(5_000):
        assert writer.submit("spans", span(i, rollout))
    for seq in range(20):
        writer.submit("llm_calls", call(f"{seq:016x}", rollout, seq))
    await writer.flush()
    assert await conn.fetchval("SELECT count(*) FROM spans WHERE rollout_id = $1", rollout) == 5_000
    row = await conn.fetchrow("SELECT * FROM llm_calls WHERE span_id = $1", f"{7:016x}")
    assert row["prompt_token_ids"] == list(range(1000))
    assert row["completion_logprobs"] == [-0.5, -31.25, 0.0]
    assert json.loads(row["request"])["messages"][0]["content"] == "2+2?"
    rollout_row = await conn.fetchrow("SELECT mode, status, metadata FROM rollouts WHERE id = $1", rollout)
    assert dict(rollout_row) == {"mode": "train", "status": "running", "metadata": "{}"}
    assert writer.stats.rows_written == 5_021
    assert writer.stats.rows_spooled == writer.stats.rows_dropped == 0


async def test_a_row_written_twice_lands_once(writer: BatchWriter, conn: asyncpg.Connection) -> None:
    writer.submit("spans", span(1))
    await writer.flush()
    # Again in a later batch (a replay of a batch whose commit was acknowledged too late) ...
    writer.submit("spans", span(1, name="changed"))
    writer.submit("spans", span(2))
    # ... and twice within one batch.
    writer.submit("spans", span(3))
    writer.submit("spans", span(3))
    await writer.flush()
    rows = await conn.fetch("SELECT span_id, name FROM spans ORDER BY span_id")
    assert [(r["span_id"], r["name"]) for r in rows] == [
        (f"{1:016x}", "chat policy"),
        (f"{2:016x}", "chat policy"),
        (f"{3:016x}", "chat policy"),
    ]
    assert writer.stats.batches_deduplicated >= 1


async def test_a_refused_row_is_kept_and_the_rest_land(writer: BatchWriter, conn: asyncpg.Connection) -> None:
    writer.submit("spans", span(1))
    writer.submit("llm_calls", call("c1", rollout="no-such-rollout", seq=0))  # violates the foreign key
    writer.submit("spans", span(2))
    await writer.flush()
    assert await conn.fetchval("SELECT count(*) FROM spans") == 2
    assert writer.stats.rows_rejected == 1
    rejected = (writer.spool.dir / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 1
    record = json.loads(rejected[0])
    assert "ForeignKeyViolation" in record["reason"]
    assert "no-such-rollout" in record["data"]


async def test_unknown_tables_and_columns_are_refused_at_once(writer: BatchWriter) -> None:
    with pytest.raises(ValueError, match="does not write to table 'rewards'"):
        writer.submit("rewards", {"rollout_id": "r", "value": 1.0})
    with pytest.raises(ValueError, match="unknown columns for spans: colour"):
        writer.submit("spans", {**span(1), "colour": "red"})


async def test_a_full_queue_drops_and_counts(db_url: str, tmp_path: Path, conn: asyncpg.Connection) -> None:
    w = BatchWriter(db_url, tmp_path / "spool", WriterSettings(queue_size=10))
    # Not started: nothing drains the queue, so the 11th row finds it full.
    accepted = [w.submit("spans", span(i)) for i in range(15)]
    assert accepted == [True] * 10 + [False] * 5
    assert w.stats.rows_dropped == 5
    await w.start()
    await w.close()
    assert await conn.fetchval("SELECT count(*) FROM spans") == 10


async def test_the_queue_is_bounded_by_bytes_too(
    db_url: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    """Rows carrying 10 MB bodies must not pile up to the row bound: a replica's memory limit."""
    mib = 1024 * 1024
    w = BatchWriter(db_url, tmp_path / "spool", WriterSettings(queue_bytes=mib))
    big = "x" * (300 * 1024)
    await conn.execute("INSERT INTO rollouts (id) VALUES ('r-big')")
    rows = [
        {**call(f"{i:016x}", "r-big", i), "request": {"messages": [{"role": "user", "content": big}]}}
        for i in range(6)
    ]
    accepted = [w.submit("llm_calls", row) for row in rows]
    assert accepted == [True] * 4 + [False] * 2  # 4 x 300 KB reach 1 MiB; then rows are dropped
    assert w.stats.rows_dropped == 2
    # An empty queue takes a row bigger than the whole bound (it is still written).
    huge = BatchWriter(db_url, tmp_path / "spool2", WriterSettings(queue_bytes=mib))
    assert huge.submit("spans", span(1, attributes={"text": "y" * (2 * mib)}))
    assert not huge.submit("spans", span(2))
    for writer in (w, huge):
        await writer.start()
        await writer.close()
    # Batches are a quarter of the bound: the four rows went in several, and all landed.
    assert await conn.fetchval("SELECT count(*) FROM llm_calls WHERE rollout_id = 'r-big'") == 4
    assert await conn.fetchval("SELECT count(*) FROM spans") == 1


def test_a_rows_size_is_estimated_from_its_text_and_lengths() -> None:
    tokens = list(range(100_000))
    assert 3_600_000 <= approx_size(tokens) <= 3_700_000
    assert approx_size({"content": "x" * 10_000}) > 10_000
    assert approx_size(("a", None, [{"role": "user", "content": "y" * 5_000}])) > 5_000


async def test_put_waits_for_room_instead_of_dropping(
    db_url: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    w = BatchWriter(
        db_url, tmp_path / "spool", WriterSettings(queue_size=4, batch_size=2, flush_interval_ms=10)
    )
    await w.start()
    for i in range(50):
        await w.put("spans", span(i))
    await w.close()
    assert w.stats.rows_dropped == 0
    assert await conn.fetchval("SELECT count(*) FROM spans") == 50


async def test_postgres_unreachable_from_the_start_spools_then_replays(
    db_url: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    spool = tmp_path / "spool"
    # A writer pointed at a port where nothing listens spools everything, durably ...
    dead = BatchWriter("postgresql://postgres@127.0.0.1:1/x", spool, WriterSettings(flush_interval_ms=10))
    await dead.start()
    dead.submit("rollouts", {"id": "r1"})
    for seq in range(10):
        dead.submit("llm_calls", call(f"{seq:016x}", "r1", seq))
    await dead.close()
    assert dead.stats.rows_spooled == 11
    assert dead.spool.has_pending()
    # ... and a writer started later (a restart) replays the spool before anything newer.
    w = BatchWriter(db_url, spool, WriterSettings(flush_interval_ms=10))
    await w.start()
    w.submit("llm_calls", call(f"{99:016x}", "r1", 99))
    await w.flush()
    await w.close()
    assert await conn.fetchval("SELECT count(*) FROM llm_calls WHERE rollout_id = 'r1'") == 11
    assert not w.spool.has_pending()
    assert w.stats.rows_replayed == 11


async def test_a_row_the_json_encoder_refuses_is_kept_aside_by_the_spool_too(
    db_url: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    # A key JSON cannot have (a tuple) in a JSON column: the database path's encoder refuses it,
    # and so must the spool's (the same one), without stopping the writer or losing the rows
    # beside it.
    spool = tmp_path / "spool"
    dead = BatchWriter("postgresql://postgres@127.0.0.1:1/x", spool, WriterSettings(flush_interval_ms=10))
    await dead.start()
    dead.submit("rollouts", {"id": "r1"})
    dead.submit("llm_calls", call("c-big", "r1", 0) | {"request": {("t", 1): 1}})
    dead.submit("llm_calls", call("c-ok", "r1", 1))
    await dead.close()
    assert (dead.stats.rows_spooled, dead.stats.rows_rejected, dead.stats.restarts) == (2, 1, 0)
    (rejected,) = (spool / "rejected.jsonl").read_text().splitlines()
    assert "c-big" in json.loads(rejected)["data"] and "keys must be" in json.loads(rejected)["reason"]
    w = BatchWriter(db_url, spool, WriterSettings(flush_interval_ms=10))
    await w.start()
    await w.flush()
    await w.close()
    assert await conn.fetchval("SELECT array_agg(span_id) FROM llm_calls") == ["c-ok"]
    # What went through the spool is stored as what goes straight in: same JSON text.
    writer = BatchWriter(db_url, tmp_path / "direct", WriterSettings(flush_interval_ms=10))
    await writer.start()
    writer.submit("llm_calls", call("c-direct", "r1", 2))
    await writer.flush()
    await writer.close()
    spooled, direct = await conn.fetch(
        "SELECT request::text, response::text FROM llm_calls "
        "WHERE span_id IN ('c-ok', 'c-direct') ORDER BY seq"
    )
    assert tuple(spooled) == tuple(direct)


async def test_a_value_the_driver_cannot_encode_is_kept_aside_not_retried_forever(
    writer: BatchWriter, conn: asyncpg.Connection
) -> None:
    writer.submit("spans", span(1, input_tokens="not a number"))
    writer.submit("spans", span(2))
    await writer.flush()
    writer.submit("spans", span(3))
    await writer.flush()
    assert await conn.fetchval("SELECT count(*) FROM spans") == 2
    assert writer.stats.rows_rejected == 1
    assert not writer.spool.has_pending()


async def test_a_call_whose_text_holds_nul_is_written_not_refused(
    writer: BatchWriter, conn: asyncpg.Connection
) -> None:
    # Seen in CI: the tiny model sampled a token that decodes to U+0000, and Postgres refused the
    # whole call (jsonb cannot hold \u0000), so the rollout was trained without it.
    rollout = str(uuid.uuid4())
    writer.submit("rollouts", {"id": rollout, "metadata": {"note": "a\x00"}})
    writer.submit("spans", span(1, rollout, name="chat\x00", attributes={"gen_ai.completion": "\x00"}))
    nul_call = call("c-nul", rollout, seq=0) | {
        "request": {"messages": [{"role": "tool", "content": "bytes \x00\x01 of a file"}]},
        "response": {"choices": [{"message": {"content": "ok\x00"}}]},
        "finish_reason": "stop\x00",
    }
    writer.submit("llm_calls", nul_call)
    await writer.flush()
    assert writer.stats.rows_rejected == 0
    row = await conn.fetchrow("SELECT * FROM llm_calls WHERE span_id = 'c-nul'")
    assert json.loads(row["request"])["messages"][0]["content"] == "bytes \ufffd\x01 of a file"
    assert json.loads(row["response"])["choices"][0]["message"]["content"] == "ok\ufffd"
    assert row["finish_reason"] == "stop\ufffd"
    assert row["prompt_token_ids"] == list(range(1000)) and row["completion_token_ids"] == [1, 2, 3]
    assert await conn.fetchval("SELECT name FROM spans WHERE rollout_id = $1", rollout) == "chat\ufffd"
    assert await conn.fetchval("SELECT metadata->>'note' FROM rollouts WHERE id = $1", rollout) == "a\ufffd"


async def spooled_then_landed(w: BatchWriter, conn: asyncpg.Connection, table: str, n: int) -> None:
    """The writer replays its spool by itself once Postgres takes the rows again (bounded poll)."""
    for _ in range(500):
        await w.flush()
        if not w.spool.has_pending() and await conn.fetchval(f"SELECT count(*) FROM {table}") == n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{table} never got its {n} rows: {w.stats}")


async def test_a_missing_table_is_the_database_s_state_not_the_row_s(
    db_url: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    """42P01 (a migration not applied yet) keeps the rows and retries; only data errors reject."""
    w = BatchWriter(db_url, tmp_path / "spool", WriterSettings(flush_interval_ms=10, retry_interval_s=0.05))
    await w.start()
    w.submit("spans", span(0))
    await w.flush()
    await conn.execute("ALTER TABLE spans RENAME TO spans_away")
    w.submit("spans", span(1))
    await w.flush()
    assert w.spool.has_pending() and w.stats.rows_rejected == 0, w.stats
    await conn.execute("ALTER TABLE spans_away RENAME TO spans")
    await spooled_then_landed(w, conn, "spans", 2)
    await w.close()
    assert w.stats.rows_rejected == 0 and "UndefinedTableError" in w.stats.errors, w.stats


async def test_a_missing_privilege_keeps_the_rows_until_it_is_granted(
    db_url: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    role = f"lightloop_w_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        await conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        await conn.execute(f"REVOKE INSERT ON spans FROM {role}")
        url = make_url(db_url).set(username=role, password="pw").render_as_string(hide_password=False)
        w = BatchWriter(url, tmp_path / "spool", WriterSettings(flush_interval_ms=10, retry_interval_s=0.05))
        await w.start()
        w.submit("spans", span(1))
        await w.flush()
        assert w.spool.has_pending() and w.stats.rows_rejected == 0, w.stats
        assert "InsufficientPrivilegeError" in w.stats.errors, w.stats
        await conn.execute(f"GRANT INSERT ON spans TO {role}")
        await spooled_then_landed(w, conn, "spans", 1)
        await w.close()
        assert w.stats.rows_rejected == 0
    finally:
        await conn.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def test_a_failing_writer_task_is_started_again_and_loses_nothing(tmp_path: Path) -> None:
    """Postgres is down and the spool cannot be written (its folder is gone, as on a broken
    disk): the writer task fails, says why, is started again, and keeps the batch it had;
    flush() gives up within its bound instead of waiting for ever."""
    spool = tmp_path / "spool"
    w = BatchWriter(
        "postgresql://postgres@127.0.0.1:1/x",
        spool,
        WriterSettings(flush_interval_ms=10, retry_interval_s=0.05, flush_timeout_s=0.5),
    )
    await w.start()
    shutil.rmtree(spool)
    spool.write_text("not a folder")
    for i in range(3):
        w.submit("spans", span(i))
    with pytest.raises(WriterUnavailable, match=r"NotADirectoryError|FileExistsError"):
        await w.flush()
    assert w.degraded is not None and w.stats.restarts >= 1
    spool.unlink()
    spool.mkdir()
    await w.flush()
    assert w.degraded is None
    assert w.stats.rows_spooled == 3 and w.spool.has_pending()
    await w.close()
