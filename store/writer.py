"""The batch writer: rows go into a bounded in-memory queue and a writer task COPYs them to
Postgres in batches. Callers never wait on Postgres.

- Flush: when a batch reaches `batch_size` rows or its oldest row is `flush_interval_ms` old.
- Postgres down: the batch is appended to the on-disk spool (fsync'd) and the writer retries the
  connection every `retry_interval_s`; once it is back the spool is replayed, in order, before
  any newer batch, so foreign keys (a rollout before its calls) hold.
- Exactly once: every writable table has a primary key. A batch is first COPYed directly; if a
  key is already there (a replay of a batch whose commit was acknowledged too late), the batch is
  COPYed into a temporary table and inserted with ON CONFLICT DO NOTHING.
- Poison rows: a batch Postgres or the driver refuses because of a row (SQLSTATE classes 22, 23
  and 54: a value a column cannot hold, a constraint, a value too large to index; or the
  driver's own data errors) is retried row by row; refused rows are kept in
  `spool/rejected.jsonl`. Any other refusal (a read-only server, a missing table or privilege,
  a deadlock) is about the database, not the rows: the batch is spooled and retried like an
  outage.
- Supervised: an unexpected error in the writer task (a full disk under the spool, a bug) does
  not end it. The batch in hand is kept, the task starts again after `retry_interval_s`, and
  `degraded` says why until a batch goes through; `flush` and `put` wait at most
  `flush_timeout_s`, then raise `WriterUnavailable` (a 503 at the proxy), never for ever.
- Marks: every `mark_interval_s` the writer flushes and then records in `writer_marks` that
  every row it accepted before the previous mark's database time is written (store/marks.py),
  so that another process can wait for rows this one still holds. A spooled row holds the mark
  back until it is replayed.
- Queue full: `submit` drops the row and counts it (`rows_dropped`, logged at most once per
  second), so that a stuck disk can never stall the agent the proxy is serving. Producers that
  prefer backpressure call `await put(...)`, which waits for room instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import operator
import reprlib
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import DateTime, Table, Text
from sqlalchemy.dialects.postgresql import JSONB

from lightloop.aio import stop_task
from lightloop.settings import WriterSettings
from lightloop.store import database, marks
from lightloop.store.copy_binary import HEADER, TRAILER, Encoder, NonFinite, encode_tuple, encoder
from lightloop.store.errors import WriterUnavailable
from lightloop.store.schema import metadata
from lightloop.store.spool import Spool
from lightloop.store.text import dump_json_bytes, storable_json, storable_json_bytes, storable_text

log = logging.getLogger(__name__)

# Tables rows may be written to through the writer, in the order a batch writes them (a rollout
# before the calls that reference it). Rewards and policy versions are written synchronously:
# their callers need the answer (unknown rollout, new version number).
WRITABLE = ("rollouts", "spans", "llm_calls")
# The longest one COPY may take before its connection is given up as lost (its batch is spooled).
_COPY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TableSpec:
    name: str
    columns: tuple[str, ...]
    json_columns: tuple[int, ...]
    text_columns: tuple[int, ...]
    time_columns: frozenset[int]
    # COPY writes every listed column, so a column a row leaves out takes the model's
    # Python-side default here (the same value its server default would give).
    static_defaults: dict[str, Any]
    callable_defaults: tuple[tuple[str, Callable[[], Any]], ...]
    values: Callable[[dict[str, Any]], tuple[Any, ...]]
    encoders: tuple[Encoder, ...]  # binary COPY, one per column (store/copy_binary.py)

    @classmethod
    def from_table(cls, table: Table) -> TableSpec:
        static: dict[str, Any] = {}
        dynamic: list[tuple[str, Callable[[], Any]]] = []
        for c in table.columns:
            d = c.default
            if d is None:
                static[c.name] = None
            elif getattr(d, "is_scalar", False):
                static[c.name] = getattr(d, "arg", None)
            else:
                assert getattr(d, "is_callable", False), f"{table.name}.{c.name}: unsupported default"
                static[c.name] = None
                dynamic.append((c.name, _Default(getattr(d, "arg"))))  # noqa: B009 - typed union
        cols = tuple(c.name for c in table.columns)
        return cls(
            name=table.name,
            columns=cols,
            json_columns=tuple(i for i, c in enumerate(table.columns) if isinstance(c.type, JSONB)),
            text_columns=tuple(i for i, c in enumerate(table.columns) if isinstance(c.type, Text)),
            time_columns=frozenset(i for i, c in enumerate(table.columns) if isinstance(c.type, DateTime)),
            static_defaults=static,
            callable_defaults=tuple(dynamic),
            values=operator.itemgetter(*cols),
            encoders=tuple(encoder(c.type) for c in table.columns),
        )


@dataclass(frozen=True)
class _Default:
    """A callable column default (SQLAlchemy wraps it to take an execution context)."""

    fn: Any

    def __call__(self) -> Any:
        return self.fn(None)


SPECS: dict[str, TableSpec] = {name: TableSpec.from_table(metadata.tables[name]) for name in WRITABLE}


@dataclass
class WriterStats:
    rows_submitted: int = 0
    rows_written: int = 0
    rows_spooled: int = 0
    rows_replayed: int = 0
    rows_dropped: int = 0
    rows_rejected: int = 0
    batches_written: int = 0
    batches_deduplicated: int = 0
    restarts: int = 0  # the writer task failed and was started again
    logprobs_refused: int = 0  # calls stored without their logprobs (NaN or infinite)
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class _Flush:
    done: asyncio.Future[None]


Batch = dict[str, list[tuple[Any, ...]]]


class BatchWriter:
    def __init__(self, url: str, spool_dir: Path, settings: WriterSettings | None = None) -> None:
        self.url = url
        self.settings = settings or WriterSettings()
        self.spool = Spool(spool_dir)
        self.stats = WriterStats()
        # A deque and two events rather than asyncio.Queue: submit() runs once per row on the
        # proxy's hot path, and Queue's bookkeeping cost more than the rest of it together.
        self._items: deque[tuple[str, tuple[Any, ...], int] | _Flush] = deque()
        self._rows_queued = 0
        # What the queued rows hold, roughly (approx_size): the queue is bounded by it too, so
        # that a replica's memory limit holds when calls carry 10 MB bodies.
        self._bytes_queued = 0
        self._arrived = asyncio.Event()
        # Set when a whole batch is queued (or a flush asks): the collector then stops waiting
        # for its interval. One wake-up per batch, not one per row: waking the writer task for
        # every row cost more than the rest of recording together at a thousand calls a second.
        self._batch_ready = asyncio.Event()
        self._flushes_queued = 0
        self._batch_bytes = self.settings.queue_bytes // 4
        self._room = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._next_connect = 0.0
        self._last_drop_log = 0.0
        self._last_nan_log = 0.0
        # Rows the write in progress refused (encoding or Postgres), until it ends (_keep_set_aside).
        self._set_aside: list[tuple[str, tuple[Any, ...], BaseException]] = []
        self._closing = False
        # The batch taken off the queue and not yet written or spooled, with its flush waiters:
        # kept across a failure of the task, so nothing taken is lost.
        self._in_hand: tuple[Batch, list[asyncio.Future[None]]] | None = None
        # Why the writer task last failed, until a batch goes through again.
        self.degraded: str | None = None
        # This writer's row in writer_marks (store/marks.py).
        self.marks = marks.MarkKeeper(
            url,
            flush=self.flush,
            pending=self.spool.has_pending,
            interval_s=self.settings.mark_interval_s,
            stale_after_s=self.settings.stale_after_s,
        )
        self._mark_task: asyncio.Task[None] | None = None

    # -- producer side -----------------------------------------------------------------------

    def submit(self, table: str, row: Mapping[str, Any]) -> bool:
        """Queue one row without waiting. False when the queue is full: the row is dropped and counted."""
        record = self._record(table, row)
        if self._full():
            self.stats.rows_dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= 1.0:
                self._last_drop_log = now
                log.error(
                    "writer queue full (%d rows, about %d bytes): dropped %d rows so far",
                    self._rows_queued,
                    self._bytes_queued,
                    self.stats.rows_dropped,
                )
            return False
        self._enqueue((table, record, record_size(record)))
        return True

    async def put(self, table: str, row: Mapping[str, Any]) -> None:
        """Queue one row, waiting for room when the queue is full (backpressure)."""
        record = self._record(table, row)
        while self._full():
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), self.settings.flush_timeout_s)
            except TimeoutError:
                raise self._unavailable("had no room") from None
        self._enqueue((table, record, record_size(record)))

    def _full(self) -> bool:
        # An empty queue takes any row, however large: a row bigger than the bound still lands.
        return self._rows_queued >= self.settings.queue_size or (
            self._rows_queued > 0 and self._bytes_queued >= self.settings.queue_bytes
        )

    def _enqueue(self, item: tuple[str, tuple[Any, ...], int]) -> None:
        self._items.append(item)
        self._rows_queued += 1
        self._bytes_queued += item[2]
        self.stats.rows_submitted += 1
        if not self._arrived.is_set():
            self._arrived.set()
        if self._batch_due():
            self._batch_ready.set()

    @property
    def queue_depth(self) -> int:
        return self._rows_queued

    def _record(self, table: str, row: Mapping[str, Any]) -> tuple[Any, ...]:
        spec = SPECS.get(table)
        if spec is None:
            raise ValueError(f"the writer does not write to table {table!r} (only {', '.join(WRITABLE)})")
        # Hot path (every proxied call): one dict merge and one itemgetter, no per-column loop.
        merged = {**spec.static_defaults, **row}
        if len(merged) != len(spec.columns):
            unknown = merged.keys() - set(spec.columns)
            raise ValueError(f"unknown columns for {table}: {', '.join(sorted(unknown))}")
        for name, make in spec.callable_defaults:
            if name not in row:
                merged[name] = make()
        values: tuple[Any, ...] = spec.values(merged)
        if not spec.json_columns:
            return values
        # JSON documents are encoded here, once: the queue then holds bytes whose size is their
        # length (no walk over nested documents to bound its memory), and COPY and the spool
        # take them as they are. A document the encoder refuses stays as it is; the writer keeps
        # its row aside later instead of failing the caller.
        encoded = list(values)
        for i in spec.json_columns:
            v = encoded[i]
            if v is not None and not isinstance(v, bytes):
                with contextlib.suppress(TypeError, ValueError):
                    encoded[i] = v.encode() if isinstance(v, str) else dump_json_bytes(v)
        return tuple(encoded)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="lightloop-batch-writer")
        if self._mark_task is None and self.settings.mark_interval_s > 0:
            self._mark_task = asyncio.create_task(self.marks.run(), name="lightloop-writer-marks")

    async def flush(self) -> None:
        """Return once every row submitted before the call is committed or spooled on disk."""
        assert self._task is not None, "start() the writer first"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._items.append(_Flush(done))
        self._flushes_queued += 1
        self._arrived.set()
        self._batch_ready.set()
        try:
            await asyncio.wait_for(asyncio.shield(done), self.settings.flush_timeout_s)
        except TimeoutError:
            raise self._unavailable("did not confirm the rows") from None

    def _unavailable(self, what: str) -> WriterUnavailable:
        why = f": {self.degraded}" if self.degraded else ""
        return WriterUnavailable(f"the batch writer {what} within {self.settings.flush_timeout_s:g} s{why}")

    async def close(self) -> None:
        """Write or spool everything queued, then stop."""
        if self._task is None:
            return
        self._closing = True
        if self._mark_task is not None:
            await stop_task(self._mark_task)
            self._mark_task = None
        try:
            await self.flush()
        except WriterUnavailable as exc:
            log.error("closing the writer with %d rows not written or spooled: %s", self._rows_queued, exc)
        await self.marks.remove()
        await stop_task(self._task)
        self._task = None
        self.spool.close()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    # -- the writer task ---------------------------------------------------------------------

    async def _run(self) -> None:
        """The writer task, supervised: an unexpected error is logged, kept in `degraded`, and
        the loop starts again after `retry_interval_s` with the batch it had in hand."""
        while True:
            try:
                await self._loop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.restarts += 1
                self._count_error(exc)
                self.degraded = f"{type(exc).__name__}: {exc}"
                log.exception("the writer task failed (%s); starting it again", self.degraded)
                # Restart pacing, not synchronisation: the failure may be a full disk.
                await asyncio.sleep(self.settings.retry_interval_s)

    async def _loop(self) -> None:
        while True:
            if self._in_hand is None:
                self._in_hand = await self._collect()
            batch, waiters = self._in_hand
            if batch:
                await self._write_or_spool(batch)
            elif self.spool.has_pending() and not self._closing:
                await self._replay()
            self._in_hand = None
            self.degraded = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _collect(self) -> tuple[Batch, list[asyncio.Future[None]]]:
        """One batch: up to batch_size rows, ending flush_interval after its first row."""
        batch: Batch = {}
        waiters: list[asyncio.Future[None]] = []
        count = 0
        idle = self.settings.retry_interval_s if self.spool.has_pending() else None
        if not await self._wait_for_items(idle):
            return batch, waiters
        # Rows accumulate until the interval ends, a whole batch is queued or a flush asks: one
        # wait per batch. The batch is bounded in bytes too (a quarter of the queue's bound): it
        # is held in memory until it is written or spooled.
        if not self._batch_due():
            self._batch_ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._batch_ready.wait(), self.settings.flush_interval_ms / 1000)
        size = 0
        while count < self.settings.batch_size and size < self._batch_bytes and self._items:
            item = self._items.popleft()
            if isinstance(item, _Flush):
                self._flushes_queued -= 1
                waiters.append(item.done)
                break
            table, record, row_size = item
            self._rows_queued -= 1
            self._bytes_queued -= row_size
            size += row_size
            rows = batch.get(table)
            if rows is None:
                batch[table] = [record]
            else:
                rows.append(record)
            count += 1
        if not self._full():
            self._room.set()
        return batch, waiters

    def _batch_due(self) -> bool:
        return (
            self._flushes_queued > 0
            or self._rows_queued >= self.settings.batch_size
            or self._bytes_queued >= self._batch_bytes
        )

    async def _wait_for_items(self, wait_s: float | None) -> bool:
        if self._items:
            return True
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), wait_s)
        except TimeoutError:
            return False
        return True

    async def _write_or_spool(self, batch: Batch) -> None:
        if self.spool.has_pending() and not await self._replay():
            self._spool_batch(batch)
            return
        written = await self._write(batch)
        # Kept now either way: they are out of the batch, which is written or spooled without them.
        self._keep_set_aside(True)
        if written is None:
            self._spool_batch(batch)
        else:
            self.stats.rows_written += written

    def _spool_batch(self, batch: Batch) -> None:
        rows = sum(len(r) for r in batch.values())
        encodable, refused = _for_spool(batch)
        # The spool first: if it fails (a full disk), the task is restarted with this batch and
        # nothing was kept aside twice.
        if encodable:
            self.spool.append(_encode(encodable))
        for table, record, exc in refused:
            self._reject(table, record, exc)
        self.stats.rows_spooled += rows - len(refused)

    async def _replay(self) -> bool:
        """Write spooled batches in order; False when Postgres is (still) unavailable."""
        for segment, number, line in self.spool.replay():
            try:
                batch = _decode(line)
            except (ValueError, KeyError) as exc:
                self.spool.reject(line, f"undecodable spool line: {exc}")
                self.spool.committed(segment, number)
                continue
            written = await self._write(batch)
            self._keep_set_aside(written is not None)
            if written is None:
                return False
            self.spool.committed(segment, number)
            self.stats.rows_replayed += written
        return True

    async def _write(self, batch: Batch) -> int | None:
        """Commit one batch; the rows it wrote, or None when Postgres is unavailable (spool it)."""
        conn = await self._connection()
        if conn is None:
            return None
        try:
            async with conn.transaction():
                for table in WRITABLE:
                    records = batch.get(table)
                    if records:
                        await self._copy(conn, SPECS[table], records)
            self.stats.batches_written += 1
            return sum(len(r) for r in batch.values())
        except Exception as exc:
            if database.is_unavailable(exc) or database.is_transient(exc) or conn.is_closed():
                self._lost_connection(exc)
                return None
            if not database.is_bad_row(exc):
                raise
            self._count_error(exc)
            log.warning("batch refused (%s); writing it row by row", exc)
        return await self._write_rowwise(conn, batch)

    async def _copy(self, conn: asyncpg.Connection, spec: TableSpec, records: list[tuple[Any, ...]]) -> None:
        pieces = await self._encode(spec, records)
        try:
            async with conn.transaction():  # a savepoint: a duplicate key only undoes this COPY
                for data in pieces:
                    await _copy_binary(conn, spec.name, spec.columns, data)
            return
        except asyncpg.UniqueViolationError:
            self.stats.batches_deduplicated += 1
        for data in pieces:
            await self._copy_deduplicated(conn, spec, data)

    async def _encode(self, spec: TableSpec, records: list[tuple[Any, ...]]) -> list[bytes]:
        """`records` as binary COPY streams of `_ENCODE_SLICE` rows each (several COPYs bound the
        memory a batch takes twice over: encoded here, then in the driver's buffer), with the
        event loop let in between. A record a column cannot hold is kept aside now and taken out
        of `records` (which is the batch in hand: a spool of it must not keep it twice); one
        with non-finite logprobs goes on without them (NULL), counted."""
        pieces: list[bytes] = []
        kept: list[tuple[Any, ...]] = []
        for start in range(0, len(records), _ENCODE_SLICE):
            if start:
                await asyncio.sleep(0)  # a yield, not a wait: requests run between slices
            tuples = []
            for record in records[start : start + _ENCODE_SLICE]:
                encoded = self._encode_record(spec, record)
                if encoded is not None:
                    record, data = encoded
                    kept.append(record)
                    tuples.append(data)
            if tuples:
                pieces.append(HEADER + b"".join(tuples) + TRAILER)
        records[:] = kept
        return pieces

    def _encode_record(
        self, spec: TableSpec, record: tuple[Any, ...]
    ) -> tuple[tuple[Any, ...], bytes] | None:
        """(the record as written, its COPY tuple), or None when it was kept aside."""
        try:
            try:
                return record, encode_tuple(spec.encoders, _to_copy(spec, record))
            except NonFinite as exc:
                if exc.column is None:
                    raise
                self.stats.logprobs_refused += 1
                now = time.monotonic()
                if now - self._last_nan_log >= 1.0:  # an engine emitting NaN would flood the log
                    self._last_nan_log = now
                    log.warning(
                        "calls whose logprobs hold NaN or infinity are stored without them (%s): %d so far",
                        spec.columns[exc.column],
                        self.stats.logprobs_refused,
                    )
                record = (*record[: exc.column], None, *record[exc.column + 1 :])
                return record, encode_tuple(spec.encoders, _to_copy(spec, record))
        except (TypeError, ValueError, RecursionError) as exc:  # Unencodable is a ValueError
            self._set_aside.append((spec.name, record, exc))
            return None

    async def _copy_deduplicated(self, conn: asyncpg.Connection, spec: TableSpec, data: bytes) -> None:
        stage = _stage_table(spec.name)
        cols = ", ".join(spec.columns)
        await _copy_binary(conn, stage, spec.columns, data)
        await conn.execute(
            f"INSERT INTO {spec.name} ({cols}) SELECT {cols} FROM {stage} ON CONFLICT DO NOTHING"
        )
        await conn.execute(f"DELETE FROM {stage}")

    async def _write_rowwise(self, conn: asyncpg.Connection, batch: Batch) -> int | None:
        """Each row in a savepoint of its own: the ones Postgres refuses are set aside and taken
        out of the batch (which is the batch in hand: spooled after a lost connection, it must
        not hold them), the NaN-cleared ones stay as written."""
        written = 0
        try:
            async with conn.transaction():
                for table in WRITABLE:
                    spec = SPECS[table]
                    records = batch.get(table, [])
                    survivors: list[tuple[Any, ...]] = []
                    for i, record in enumerate(records):
                        encoded = self._encode_record(spec, record)
                        if encoded is None:
                            continue
                        try:
                            async with conn.transaction():
                                await self._copy_deduplicated(conn, spec, HEADER + encoded[1] + TRAILER)
                            written += 1
                            survivors.append(encoded[0])
                        except Exception as exc:
                            if not database.is_bad_row(exc):
                                records[:] = [*survivors, *records[i:]]
                                raise
                            self._set_aside.append((table, record, exc))
                    records[:] = survivors
        except Exception as exc:
            if database.is_unavailable(exc) or database.is_transient(exc) or conn.is_closed():
                self._lost_connection(exc)
                return None
            raise
        self.stats.batches_written += 1
        return written

    def _keep_set_aside(self, keep: bool) -> None:
        """The rows encoding or Postgres refused during the last write, taken out of its batch:
        kept in rejected.jsonl (`keep`), or forgotten when the batch is a spool line that failed
        to write and stays in the spool (its next replay refuses them again)."""
        set_aside, self._set_aside = self._set_aside, []
        if keep:
            for table, record, exc in set_aside:
                self._reject(table, record, exc)

    def _reject(self, table: str, record: tuple[Any, ...], exc: BaseException) -> None:
        self._count_error(exc)
        self.stats.rows_rejected += 1
        self.spool.reject(_encode_rejected(table, record), f"{type(exc).__name__}: {exc}")
        log.error("row refused and kept in %s: %s", self.spool.dir / "rejected.jsonl", exc)

    async def _connection(self) -> asyncpg.Connection | None:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        now = time.monotonic()
        if now < self._next_connect:
            return None
        try:
            conn = await database.connect(self.url, command_timeout=30)
            # Staging tables for de-duplicated COPY, made once per session and outside any
            # transaction (one made inside a savepoint that rolls back would vanish with it).
            for table in WRITABLE:
                await conn.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS {_stage_table(table)} "
                    f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
            self._conn = conn
            log.info("writer connected to Postgres")
            return self._conn
        except Exception as exc:
            self._next_connect = now + self.settings.retry_interval_s
            self._count_error(exc)
            log.warning("writer cannot reach Postgres (%s); spooling to %s", exc, self.spool.dir)
            return None

    def _lost_connection(self, exc: BaseException) -> None:
        """Postgres is gone, or refuses for now (read-only, a table or privilege missing): spool,
        and try a fresh connection after `retry_interval_s` (after a failover it reaches the new
        primary)."""
        self._count_error(exc)
        log.warning(
            "writer cannot write to Postgres now (%s: %s); spooling to %s",
            type(exc).__name__,
            exc,
            self.spool.dir,
        )
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
        self._next_connect = time.monotonic() + self.settings.retry_interval_s

    def _count_error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.stats.errors[name] = self.stats.errors.get(name, 0) + 1


# Rows per COPY stream, with the event loop let in between: a 5,000-row batch of realistic calls
# is some 100 ms of encoding and 60 MB of COPY data, which would otherwise hold every request the
# loop serves and sit in memory twice.
_ENCODE_SLICE = 128


async def _copy_binary(conn: asyncpg.Connection, table: str, columns: tuple[str, ...], data: bytes) -> None:
    """COPY `data` (a whole binary COPY stream) into `table`.

    The stream is handed over as one buffer, never as a file or an iterator: asyncpg then writes
    it in one go and waits only for the server's answer, which a lost connection ends. Between
    the chunks of a file, asyncpg waits for the transport to resume writing, and a connection lost
    while paused never resumes: the COPY, and the writer with it, would hang (seen in about a
    third of runs of test_writer_outage before this). The timeout bounds the one wait left
    (a transport paused before the COPY starts); the caller treats it as a lost connection."""
    async with asyncio.timeout(_COPY_TIMEOUT_S):
        # A memoryview, not the bytes: asyncpg takes bytes for a file's path.
        await conn.copy_to_table(table, source=memoryview(data), columns=columns, format="binary")


def _stage_table(table: str) -> str:
    return f"_lightloop_stage_{table}"


def _to_copy(spec: TableSpec, record: tuple[Any, ...]) -> tuple[Any, ...]:
    """The record as COPY takes it: JSON columns as UTF-8 JSON text (store/copy_binary.py), and
    no U+0000 in any text or JSON value, since Postgres refuses it (store/text.py)."""
    values = list(record)
    for i in spec.json_columns:
        v = values[i]
        if isinstance(v, bytes):
            values[i] = storable_json_bytes(v)
        elif isinstance(v, str):
            values[i] = storable_json(v).encode()
        elif v is not None:
            values[i] = dump_json_bytes(v)
    for i in spec.text_columns:
        v = values[i]
        if isinstance(v, str):
            values[i] = storable_text(v)
    return tuple(values)


def _for_spool(batch: Batch) -> tuple[Batch, list[tuple[str, tuple[Any, ...], Exception]]]:
    """The batch as the database path would COPY it (`_to_copy`: JSON columns already JSON text,
    by the same encoder), so that a spooled row and a written one are the same bytes; and the
    rows that encoder refuses (an integer past 64 bits, a key that is not text), which would be
    refused at replay too: they are kept aside now instead of stopping the spool."""
    ready: Batch = {}
    refused: list[tuple[str, tuple[Any, ...], Exception]] = []
    for table, records in batch.items():
        spec = SPECS[table]
        for record in records:
            try:
                ready.setdefault(table, []).append(_to_copy(spec, record))
            except (TypeError, ValueError) as exc:  # orjson's JSONEncodeError is a TypeError
                refused.append((table, record, exc))
    return ready, refused


def _encode(batch: Batch) -> bytes:
    """A spool line. Columns other than JSON ones keep their types (stdlib JSON writes a NaN or
    infinite logprob as it is, so that the replay stores that call as a direct write would)."""
    return json.dumps(batch, default=_encode_value, separators=(",", ":")).encode()


def _encode_value(value: Any) -> Any:
    """What JSON cannot hold: times as ISO text, anything else as its str(), as the database
    path's JSON encoder does (`dump_json`)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):  # a JSON column's text (`_to_copy`)
        return value.decode("utf-8", errors="replace")
    return str(value)


def _encode_rejected(table: str, record: tuple[Any, ...]) -> bytes:
    """A refused row for rejected.jsonl, whatever it holds: as a spool line when it can be one,
    else as its repr, so that keeping it aside cannot fail too."""
    try:
        return _encode({table: [record]})
    except Exception:  # anything at all (a document nested past the recursion limit): its repr
        return json.dumps({table: reprlib.repr(record)}).encode()


def _decode(line: bytes) -> Batch:
    raw: dict[str, Sequence[Sequence[Any]]] = json.loads(line)
    batch: Batch = {}
    for table, records in raw.items():
        spec = SPECS[table]
        batch[table] = [
            tuple(
                datetime.fromisoformat(v) if i in spec.time_columns and isinstance(v, str) else v
                for i, v in enumerate(record)
            )
            for record in records
        ]
    return batch


def record_size(record: tuple[Any, ...]) -> int:
    """`approx_size` of a queued record, in one flat pass: its JSON documents are bytes already
    (`_record`), so only a document the encoder refused needs the walk."""
    size = 56 + 8 * len(record)
    for value in record:
        if isinstance(value, bytes | str):
            size += 49 + len(value)
        elif isinstance(value, list) and value and isinstance(value[0], int | float):
            size += 56 + 36 * len(value)
        elif isinstance(value, list | dict | tuple):
            size += approx_size(value)
        else:
            size += 28
    return size


def approx_size(value: Any, depth: int = 0) -> int:
    """Roughly the bytes `value` holds in memory, cheaply: text by its length, documents by
    their parts, a list of numbers (token ids, logprobs) by its length alone."""
    if isinstance(value, str | bytes):
        return 49 + len(value)
    if depth > 32:  # a pathologically nested document: its encoding is bounded by the body limit
        return 1024
    if isinstance(value, dict):
        return 64 + sum(approx_size(k) + approx_size(v, depth + 1) for k, v in value.items())
    if isinstance(value, list | tuple):
        if value and isinstance(value[0], int | float):
            return 56 + 36 * len(value)
        return 56 + 8 * len(value) + sum(approx_size(v, depth + 1) for v in value)
    return 28
