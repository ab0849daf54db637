"""lightloop's own routes: rewards, finishing rollouts, OTLP trace ingest, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from lightloop.proxy import otlp
from lightloop.proxy.attribution import check_id
from lightloop.proxy.errors import (
    BadRequest,
    Conflict,
    DatabaseDown,
    NotFound,
    RecordingUnavailable,
    Unprocessable,
)
from lightloop.proxy.http import Send, respond, respond_json
from lightloop.proxy.metrics import CONTENT_TYPE, Metrics
from lightloop.proxy.recorder import Recorder
from lightloop.proxy.versions import LiveVersions
from lightloop.store import Conflict as StoreConflict
from lightloop.store import NotFound as StoreNotFound
from lightloop.store import (
    WriterUnavailable,
    add_reward,
    database_time,
    finish_rollout,
    promise_through_finish,
    written_since,
)
from lightloop.store.database import is_unavailable
from lightloop.store.stats import attach_trace_spans, gauges

log = logging.getLogger(__name__)

SOURCE = "api"


def _parse_lenient(body: bytes) -> dict[str, Any]:
    # The stdlib parser accepts NaN and Infinity, so they reach the finite-number check (422)
    # instead of failing as malformed JSON.
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unprocessable(f"{what} must be a number, not {json.dumps(value)[:40]}")
    number = float(value)
    if not math.isfinite(number):
        raise Unprocessable(f"{what} must be a finite number, not {value}")
    return number


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{key} must be a string")
    return value


Pool = Callable[[], Awaitable[asyncpg.Pool]]


async def with_db(pool: Pool, action: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    try:
        async with (await pool()).acquire() as conn:
            return await action(conn)
    except StoreNotFound as exc:
        raise NotFound(str(exc)) from None
    except StoreConflict as exc:
        raise Conflict(str(exc)) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        if is_unavailable(exc):
            raise DatabaseDown(f"Postgres is unavailable ({exc}); retry the request") from None
        raise


# The dashboard's and Prometheus' reads share the pool with the agents' calls: at most two at a
# time per process, each bounded by a statement timeout, so an open dashboard (or a scrape over a
# large table) cannot starve the calls, finishes and hand-outs.
_READS = asyncio.Semaphore(2)
READ_TIMEOUT_MS = 10_000


async def read_bounded(pool: Pool, action: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    async def bounded(conn: asyncpg.Connection) -> Any:
        async with conn.transaction(readonly=True):
            await conn.execute(f"SET LOCAL statement_timeout = {READ_TIMEOUT_MS}")
            return await action(conn)

    async with _READS:
        try:
            return await with_db(pool, bounded)
        except asyncpg.QueryCanceledError:
            raise DatabaseDown(f"the query took longer than {READ_TIMEOUT_MS // 1000} s; try again") from None


async def with_written(
    pool: Pool, action: Callable[[asyncpg.Connection], Awaitable[Any]], wait_s: float
) -> Any:
    """`with_db`, for an action that names a rollout or response: one that is not in Postgres may
    still be in another proxy process's writer (its calls went there, this finish came here). So
    before the 404, wait until every process's writer has written what it accepted before now
    (store/marks.py) and try once more; a writer that stays behind for `wait_s` is a 503."""
    try:
        return await with_db(pool, action)
    except NotFound:
        # A connection per poll, not one held for the wait: a few such requests must not take
        # the pool from every other route.
        since = await with_db(pool, database_time)
        deadline = time.monotonic() + wait_s
        while not await with_db(pool, lambda conn: written_since(conn, since)):
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)  # pacing a bounded poll, not synchronisation
        else:
            return await with_db(pool, action)
        raise RecordingUnavailable(
            f"another proxy process has not written its rows within {wait_s:g} s, and the "
            "rollout or response may be among them; retry the request"
        ) from None


async def flushed(recorder: Recorder) -> None:
    """Every row submitted so far is in Postgres or the spool; 503 when the writer cannot say so."""
    try:
        await recorder.writer.flush()
    except WriterUnavailable as exc:
        raise RecordingUnavailable(f"{exc}; retry the request") from None


async def post_reward(
    body: bytes,
    path_rollout: str | None,
    path_attempt: int | None,
    recorder: Recorder,
    pool: Pool,
    send: Send,
) -> int:
    data = _parse_lenient(body)
    rollout_id = _optional_str(data, "rollout_id") or path_rollout
    response_id = _optional_str(data, "response_id")
    span_id = _optional_str(data, "span_id")
    if response_id is not None and span_id is not None:
        raise BadRequest("name the call once: response_id or span_id, not both")
    if rollout_id is None and response_id is None and span_id is None:
        raise BadRequest(
            "name the rollout_id, or a call: the response_id (the `id` of a completion) or its span_id"
        )
    if "value" not in data:
        raise BadRequest("value is required")
    value = _finite(data["value"], "value")
    name = _optional_str(data, "name") or "reward"
    attempt = path_attempt if rollout_id == path_rollout else None
    if rollout_id is not None:
        check_id(rollout_id, "rollout id")
    if span_id is not None or recorder.knows(rollout_id, response_id):
        await flushed(recorder)  # its calls may still be on their way to Postgres
    record = await with_written(
        pool,
        lambda conn: add_reward(
            conn,
            value=value,
            rollout_id=rollout_id,
            response_id=response_id,
            span_id=span_id,
            name=name,
            source=SOURCE,
            attempt=attempt,
        ),
        recorder.writer.settings.flush_timeout_s,
    )
    await respond_json(
        send,
        200,
        {
            "id": record.id,
            "rollout_id": record.rollout_id,
            "span_id": record.span_id,
            "name": record.name,
            "value": record.value,
        },
    )
    return 200


async def post_finish(
    body: bytes, rollout_id: str, failed_reward: float, recorder: Recorder, pool: Pool, send: Send
) -> int:
    check_id(rollout_id, "rollout id")
    data = _parse_lenient(body) if body.strip() else {}
    status = data.get("status", "succeeded")
    if status not in ("succeeded", "failed"):
        raise BadRequest("status must be 'succeeded' or 'failed'")
    reward = _finite(data["reward"], "reward") if data.get("reward") is not None else None
    attempt = data.get("attempt")
    if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1):
        raise BadRequest("attempt must be a positive integer")
    # A runner's report of an agent that raised, or the agent's feedback text (for prompt
    # optimisation's reflection): kept in rollouts.metadata.
    metadata = {
        k: str(data[k])[:20_000] for k in ("error", "traceback", "feedback") if data.get(k) is not None
    }
    writer = recorder.writer
    accepted = writer.stats.rows_submitted
    known = recorder.knows(rollout_id, None)
    if known:
        await flushed(recorder)
    try:
        changed = await with_written(
            pool,
            lambda conn: finish_rollout(
                conn,
                rollout_id,
                status,
                reward,
                source=SOURCE,
                attempt=attempt,
                failed_reward=failed_reward,
                metadata=metadata or None,
            ),
            recorder.writer.settings.flush_timeout_s,
        )
    finally:
        recorder.finished(rollout_id)
    # The agent's spans that share a trace with the rollout's calls but name no rollout (those
    # that arrived before this process saw the trace, or at another process) get its id.
    try:
        await with_db(pool, lambda conn: attach_trace_spans(conn, rollout_id))
    except Exception as exc:  # best effort after the commit: the dashboard joins by trace too
        log.warning("could not name the spans of rollout %s's traces: %s", rollout_id, exc)
    if known and writer.marks.can_promise(accepted, writer.stats.rows_submitted):
        # Checked after the finish committed: a row arriving from here on came after finished_at.
        with contextlib.suppress(Exception):  # best effort after the commit: the next round will
            await with_db(pool, lambda conn: promise_through_finish(conn, writer.marks.writer_id, rollout_id))
    await respond_json(
        send, 200, {"rollout_id": rollout_id, "status": status, "reward": reward, "changed": changed}
    )
    return 200


async def post_traces(
    body: bytes,
    content_type: bytes | None,
    encoding: bytes | None,
    recorder: Recorder,
    send: Send,
    max_body_bytes: int | None = None,
) -> int:
    rows, protobuf = otlp.decode(otlp.decompress(body, encoding, max_body_bytes), content_type)
    # Spans that report a call first: they tie their trace, which the batch's other spans
    # (the agent's root span, say) may share.
    rows.sort(key=lambda row: "gen_ai.response.id" not in (row["attributes"] or {}))
    try:
        for row in rows:
            if row["rollout_id"] is None:  # tied by the call it reports or the trace it shares
                row["rollout_id"] = recorder.rollout_of_span(row)
            # Backpressure rather than drops: an OTLP exporter retries a slow answer, not a lost
            # span (bounded: a writer that cannot take them is a 503, which it retries too).
            await recorder.writer.put("spans", row)
    except WriterUnavailable as exc:
        raise RecordingUnavailable(f"{exc}; retry the request") from None
    media, answer = otlp.encode_response(protobuf)
    await respond(send, 200, answer, media)
    return 200


async def get_health(recorder: Recorder, versions: LiveVersions, queue: dict[str, Any], send: Send) -> int:
    writer = recorder.writer
    database = "up" if versions.connected.is_set() else "unreachable"
    healthy = database == "up" and queue.get("reaper") == "ok" and writer.degraded is None
    await respond_json(
        send,
        200,
        {
            "status": "ok" if healthy else "degraded",
            "database": database,
            "writer": {
                "queue_rows": writer.queue_depth,
                "spool_bytes": writer.spool.pending_bytes(),
                "rows_dropped": writer.stats.rows_dropped,
                "restarts": writer.stats.restarts,
                "degraded": writer.degraded,
                # The writer's promise in writer_marks: every row before it is in Postgres.
                "written_through": None
                if writer.marks.marked_through is None
                else writer.marks.marked_through.isoformat(),
            },
            "policies": {name: versions.served(name)[1] for name in versions.policies},
            "queue": queue,
        },
    )
    return 200


async def get_metrics(metrics: Metrics, pool: Pool, send: Send) -> int:
    figures = None
    try:
        # Bounded: a scrape answers while Postgres is away or slow (lightloop_stats_up 0 says so).
        figures = await asyncio.wait_for(read_bounded(pool, gauges), timeout=5)
    except Exception as exc:  # any failure: the process's own metrics are still served
        log.warning("metrics: the training figures could not be read (%s: %s)", type(exc).__name__, exc)
    await respond(send, 200, metrics.render(figures), CONTENT_TYPE)
    return 200
