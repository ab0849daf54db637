"""The writer's binary COPY encoder against a real Postgres: every column type the writer
writes reads back exactly as it went in (token ids and logprobs included, empty arrays, the
int4 bounds), and values a column cannot hold are refused before anything is sent, as the
writer's bad rows; a call's row through the writer reads back equal to what the engine said."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest
from sqlalchemy import REAL, BigInteger, DateTime, Double, Integer, Text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from lightloop.settings import WriterSettings
from lightloop.store import BatchWriter
from lightloop.store.copy_binary import Unencodable, encode_rows, encoder

TYPES = [
    Text(),
    Integer(),
    BigInteger(),
    Double(),
    JSONB(),
    DateTime(timezone=True),
    ARRAY(Integer()),
    ARRAY(REAL()),
]
ENCODERS = [encoder(t) for t in TYPES]
COLUMNS = list("abcdefgh")


async def _round_trip(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    await conn.execute(
        "CREATE TEMP TABLE t "
        "(n serial, a text, b int4, c int8, d float8, e jsonb, f timestamptz, g int4[], h real[])"
    )
    await conn.copy_to_table(
        "t", source=memoryview(encode_rows(ENCODERS, rows)), columns=COLUMNS, format="binary"
    )
    return [tuple(r) for r in await conn.fetch(f"SELECT {', '.join(COLUMNS)} FROM t ORDER BY n")]


async def test_every_column_type_reads_back_as_it_went_in(conn: asyncpg.Connection) -> None:
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(0, 150_000, 1000)]
    logprobs = [float(np.float32(x)) for x in -rng.exponential(2.0, 256)]  # float4-exact
    rows = [
        (
            "héllo\n\t«»",
            2**31 - 1,
            -(2**63),
            1.5e-300,
            '{"messages": [{"role": "user", "content": "é"}], "n": 1}'.encode(),
            datetime(2026, 12, 5, 17, 0, 0, 123456, tzinfo=UTC),
            ids,
            logprobs,
        ),
        (
            "",
            -(2**31),
            2**63 - 1,
            -0.0,
            b"[]",
            datetime(1990, 1, 1, tzinfo=timezone(timedelta(hours=-5))),
            [0, 2**31 - 1, -(2**31)],
            [],
        ),
        ("x", 0, 0, 0.0, b"null", datetime(2000, 1, 1, tzinfo=UTC), [], [-0.0]),
        (None,) * 8,
    ]
    got = await _round_trip(conn, rows)
    for sent, back in zip(rows, got, strict=True):
        assert back[:4] == sent[:4] and back[5:] == sent[5:]
        assert (None if back[4] is None else json.loads(back[4])) == (
            None if sent[4] is None else json.loads(sent[4])
        )


@pytest.mark.parametrize(
    ("column", "value", "says"),
    [
        (6, [2**31], "outside int4"),
        (6, [-(2**31) - 1], "outside int4"),
        (6, [[1, 2]], "flat"),
        (6, [1, None], "not storable"),
        (6, ["7"], "not storable"),
        (6, [1.5], "integers"),
        (6, [2**70], "outside int4"),
        (6, [[1, 2], 3], "not storable"),
        (6, (i for i in range(3)), "not storable"),
        (7, ["-0.5"], "numbers"),
        (7, [0.0, float("nan")], "finite"),
        (7, [float("-inf")], "finite"),
        (7, [1e39], "float4"),
        (1, "3", "not storable"),
        (1, 2**31, "not storable"),
        (5, "2026-01-01", "not storable"),
    ],
)
def test_values_a_column_cannot_hold_are_refused_before_sending(column: int, value: Any, says: str) -> None:
    row: list[Any] = [None] * 8
    row[column] = value
    with pytest.raises(Unencodable, match=says):
        encode_rows(ENCODERS, [tuple(row)])


async def test_a_call_through_the_writer_reads_back_exactly_and_a_bad_one_is_kept_aside(
    conn: asyncpg.Connection, db_url: str, tmp_path: Path
) -> None:
    """Three calls in one batch: one as the engine said it, one whose logprobs hold a NaN (stored
    without them: the call is kept, the NaN refused), one with a token id past int4 (kept aside
    in rejected.jsonl, alone: the rest of the batch is COPYed as usual, not row by row)."""
    writer = BatchWriter(db_url, tmp_path / "spool", WriterSettings(flush_interval_ms=10))
    await writer.start()
    try:
        ids = list(range(100_000, 101_000))
        logprobs = [float(np.float32(-i / 997)) for i in range(256)]
        writer.submit("rollouts", {"id": "r-bin"})
        calls = (
            ("good", ids, logprobs),
            ("nan", ids, [*logprobs[:-1], float("nan")]),
            ("huge", [*ids[:-1], 2**31], logprobs),
        )
        for span, prompt, lp in calls:
            writer.submit(
                "llm_calls",
                {
                    "span_id": span,
                    "rollout_id": "r-bin",
                    "seq": 0,
                    "model": "policy",
                    "request": {"messages": [{"role": "user", "content": "hi"}]},
                    "prompt_token_ids": prompt,
                    "completion_token_ids": ids[:256],
                    "completion_logprobs": lp,
                },
            )
        await writer.flush()
    finally:
        await writer.close()
    rows = {r["span_id"]: r for r in await conn.fetch("SELECT * FROM llm_calls WHERE rollout_id = 'r-bin'")}
    assert set(rows) == {"good", "nan"}
    good, nan = rows["good"], rows["nan"]
    assert good["prompt_token_ids"] == ids and good["completion_token_ids"] == ids[:256]
    assert good["completion_logprobs"] == logprobs
    assert nan["prompt_token_ids"] == ids and nan["completion_logprobs"] is None
    assert (writer.stats.rows_rejected, writer.stats.logprobs_refused, writer.stats.rows_written) == (1, 1, 3)
    assert "DataError" not in writer.stats.errors  # no batch refused by Postgres: no row-by-row pass
    (kept,) = (tmp_path / "spool" / "rejected.jsonl").read_text().splitlines()
    assert "outside int4" in json.loads(kept)["reason"]
