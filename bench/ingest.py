"""Ingest throughput: spans/s and llm_calls/s (1,000-token prompt id arrays) through the batch
writer, beside raw COPY and one-INSERT-per-row, measured in one run on one server.

Usage: python bench/ingest.py [--spans N] [--calls N] [--database-url URL]
Without --database-url (or LIGHTLOOP_DATABASE_URL) it starts a throwaway embedded Postgres.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from lightloop.settings import WriterSettings
from lightloop.store import BatchWriter, EmbeddedPostgres, upgrade
from lightloop.store.database import dsn


def _with_db(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(dsn(url)).set(database=name).render_as_string(hide_password=False)


async def _fresh_database(server_url: str) -> str:
    name = f"lightloop_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn(server_url))
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = _with_db(server_url, name)
    await upgrade(url)
    return url


def _spans(n: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        {
            "span_id": f"{i:016x}",
            "trace_id": uuid.uuid4().hex,
            "name": "chat policy",
            "kind": "CLIENT",
            "start_time": now,
            "end_time": now,
            "attributes": {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "policy",
                "gen_ai.usage.input_tokens": 1000,
                "gen_ai.usage.output_tokens": 200,
                "lightloop.rollout.id": "bench",
            },
            "rollout_id": "bench",
            "model": "policy",
            "input_tokens": 1000,
            "output_tokens": 200,
        }
        for i in range(n)
    ]


def _calls(n: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    prompt = [rng.randrange(49152) for _ in range(1000)]
    completion = [rng.randrange(49152) for _ in range(200)]
    logprobs = [-rng.random() for _ in range(200)]
    return [
        {
            "span_id": f"{i:016x}",
            "rollout_id": "bench",
            "seq": i,
            "model": "policy",
            "policy_version": 1,
            "request": {"messages": [{"role": "user", "content": "What is 17 * 23?"}]},
            "response": {"id": f"chatcmpl-{i}", "choices": [{"message": {"content": "391"}}]},
            "prompt_token_ids": prompt,
            "completion_token_ids": completion,
            "completion_logprobs": logprobs,
            "finish_reason": "stop",
            "latency_ms": 120.0,
        }
        for i in range(n)
    ]


async def _through_writer(url: str, table: str, rows: list[dict[str, Any]], spool: Path) -> float:
    writer = BatchWriter(url, spool, WriterSettings(queue_size=len(rows) + 1))
    await writer.start()
    t0 = time.perf_counter()
    for i, row in enumerate(rows):
        # put(): wait for room rather than drop, so the bound on the queue's bytes paces the producer.
        await writer.put(table, row)
        if i % 1000 == 999:
            await asyncio.sleep(0)  # a server's producers yield between requests
    await writer.flush()
    elapsed = time.perf_counter() - t0
    await writer.close()
    assert writer.stats.rows_written == len(rows), writer.stats
    return len(rows) / elapsed


async def _prebuilt_copy(url: str, rows: list[dict[str, Any]]) -> float:
    """The ceiling for `llm_calls`: the same rows as one binary COPY stream encoded beforehand
    (untimed), so only Postgres's side of the COPY is measured, in the writer's batch size."""
    from lightloop.store.copy_binary import encode_rows
    from lightloop.store.writer import SPECS, BatchWriter, _to_copy

    spec = SPECS["llm_calls"]
    shaper = BatchWriter(url, Path(tempfile.mkdtemp()))
    records = [
        _to_copy(spec, shaper._record("llm_calls", {**r, "span_id": f"pre-{r['span_id']}"})) for r in rows
    ]
    batch = WriterSettings().batch_size
    streams = [encode_rows(spec.encoders, records[i : i + batch]) for i in range(0, len(records), batch)]
    conn = await asyncpg.connect(dsn(url))
    t0 = time.perf_counter()
    for data in streams:
        async with conn.transaction():
            await conn.copy_to_table(
                "llm_calls", source=memoryview(data), columns=spec.columns, format="binary"
            )
    elapsed = time.perf_counter() - t0
    await conn.close()
    return len(rows) / elapsed


async def _raw_copy(url: str, n: int) -> float:
    conn = await asyncpg.connect(dsn(url))
    await conn.execute("CREATE TABLE bench_copy (id bigint, payload text)")
    payload = "x" * 1000
    records = [(i, payload) for i in range(n)]
    t0 = time.perf_counter()
    for start in range(0, n, 5000):
        await conn.copy_records_to_table("bench_copy", records=records[start : start + 5000])
    elapsed = time.perf_counter() - t0
    await conn.close()
    return n / elapsed


async def _insert_per_row(url: str, n: int) -> float:
    conn = await asyncpg.connect(dsn(url))
    await conn.execute("CREATE TABLE bench_insert (id bigint, payload text)")
    payload = "x" * 1000
    t0 = time.perf_counter()
    for i in range(n):
        await conn.execute("INSERT INTO bench_insert VALUES ($1, $2)", i, payload)  # autocommit
    elapsed = time.perf_counter() - t0
    await conn.close()
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=200_000)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--database-url", default=os.environ.get("LIGHTLOOP_DATABASE_URL"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        embedded = None
        server_url = args.database_url
        if not server_url:
            embedded = EmbeddedPostgres(Path(tmp) / "postgres")
            server_url = _with_db(embedded.ensure_running(), "postgres")
        try:
            url = await _fresh_database(server_url)
            conn = await asyncpg.connect(dsn(url))
            server_version = await conn.fetchval("SHOW server_version")
            await conn.execute("INSERT INTO rollouts (id) VALUES ('bench')")
            await conn.close()
            spans, calls = _spans(args.spans), _calls(args.calls)
            result = {
                "benchmark": "ingest",
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "postgres": server_version,
                    "server": "embedded" if embedded else "external",
                },
                "spans": args.spans,
                "spans_per_s": round(await _through_writer(url, "spans", spans, Path(tmp) / "s1")),
                "llm_calls": args.calls,
                "llm_calls_per_s_1000_token_prompts": round(
                    await _through_writer(url, "llm_calls", calls, Path(tmp) / "s2")
                ),
                "prebuilt_binary_copy_llm_calls_per_s": round(await _prebuilt_copy(url, calls)),
                "raw_copy_1kb_rows_per_s": round(await _raw_copy(url, 100_000)),
                "insert_per_row_autocommit_rows_per_s": round(await _insert_per_row(url, 2_000)),
            }
            result["writer_vs_insert_per_row"] = round(
                result["spans_per_s"] / result["insert_per_row_autocommit_rows_per_s"], 1
            )
            print(json.dumps(result, indent=2))
        finally:
            if embedded is not None:
                embedded.stop()


if __name__ == "__main__":
    asyncio.run(main())
