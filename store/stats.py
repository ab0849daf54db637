"""What the dashboard and `/v1/stats/...` show, read from Postgres.

Every statement is fixed text with bound parameters: a filter a user typed reaches Postgres only
as a value, never as SQL. Filters are validated by the caller (proxy/stats.py) into the typed
`RolloutFilter`; a filter left out is NULL, and `$n IS NULL OR ...` lets it match everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

# The statuses and modes a rollout can have (store/schema.py's checks), for validating filters.
STATUSES = ("queued", "running", "succeeded", "failed")
MODES = ("train", "val")

# The version that served a rollout: its calls' oldest version, else the version live when the
# queue handed it out (as the reward_by_version view counts it).
_VERSION = """coalesce(
    (SELECT min(c.policy_version) FROM llm_calls c WHERE c.rollout_id = r.id), r.policy_version)"""


@dataclass(frozen=True)
class RolloutFilter:
    dataset: str | None = None
    mode: str | None = None
    status: str | None = None
    version: int | None = None
    reward_min: float | None = None
    reward_max: float | None = None
    agent: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def params(self) -> tuple[Any, ...]:
        return (
            self.dataset,
            self.mode,
            self.status,
            self.version,
            self.reward_min,
            self.reward_max,
            self.agent,
            self.since,
            self.until,
        )


_ROLLOUT_WHERE = f"""
    ($1::text IS NULL OR r.dataset = $1)
    AND ($2::text IS NULL OR r.mode = $2)
    AND ($3::text IS NULL OR r.status = $3)
    AND ($4::int IS NULL OR {_VERSION} = $4)
    AND ($5::float8 IS NULL OR r.reward >= $5)
    AND ($6::float8 IS NULL OR r.reward <= $6)
    AND ($7::text IS NULL OR r.agent = $7)
    AND ($8::timestamptz IS NULL OR r.created_at >= $8)
    AND ($9::timestamptz IS NULL OR r.created_at < $9)
"""


def _rows(records: list[asyncpg.Record], json_fields: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    out = []
    for record in records:
        row = dict(record)
        for name in json_fields:
            if isinstance(row.get(name), str):
                row[name] = orjson.loads(row[name])
        out.append(row)
    return out


async def live_versions(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Each policy's live version and when it went live."""
    return _rows(
        await conn.fetch(
            "SELECT policy, version, base_model, live_at FROM policy_versions "
            "WHERE status = 'live' ORDER BY policy"
        )
    )


async def rewards_by_version(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Mean reward per policy version, train and val, per dataset (the reward_by_version view;
    rollouts outside the task queue have no dataset)."""
    return _rows(
        await conn.fetch(
            """SELECT d.policy, v.dataset, v.policy_version AS version,
                      v.train_reward, v.train_rollouts, v.val_reward, v.val_rollouts
               FROM reward_by_version v LEFT JOIN datasets d ON d.name = v.dataset
               ORDER BY v.dataset NULLS FIRST, v.policy_version"""
        )
    )


async def activity(conn: asyncpg.Connection, minutes: int) -> list[dict[str, Any]]:
    """Rollouts started and calls made per minute over the last `minutes` (zeros included)."""
    # Calls are counted through their spans, whose start time is indexed (llm_calls' is not:
    # an index there would cost every recorded call a write).
    return _rows(
        await conn.fetch(
            """WITH m AS (
                   SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => $1 - 1),
                                          date_trunc('minute', now()), interval '1 minute') AS minute
               ),
               r AS (
                   SELECT date_trunc('minute', created_at) AS minute, count(*) AS n FROM rollouts
                   WHERE created_at >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
                   GROUP BY 1
               ),
               c AS (
                   SELECT date_trunc('minute', s.start_time) AS minute, count(*) AS n
                   FROM spans s JOIN llm_calls l ON l.span_id = s.span_id
                   WHERE s.start_time >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
                   GROUP BY 1
               )
               SELECT m.minute, coalesce(r.n, 0) AS rollouts, coalesce(c.n, 0) AS calls
               FROM m LEFT JOIN r USING (minute) LEFT JOIN c USING (minute)
               ORDER BY m.minute""",
            minutes,
        )
    )


async def queue_depth(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Rollouts waiting for a runner and running, per dataset and mode."""
    return _rows(
        await conn.fetch(
            """SELECT d.name AS dataset, m.mode,
                      count(r.id) FILTER (WHERE r.status = 'queued') AS queued,
                      count(r.id) FILTER (WHERE r.status = 'running') AS running
               FROM datasets d CROSS JOIN (VALUES ('train'), ('val')) AS m (mode)
               LEFT JOIN rollouts r
                   ON r.dataset = d.name AND r.mode = m.mode AND r.status IN ('queued', 'running')
               GROUP BY d.name, m.mode ORDER BY d.name, m.mode"""
        )
    )


async def training_steps(conn: asyncpg.Connection, policy: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` steps, oldest first, with the trainer's metrics."""
    rows = _rows(
        await conn.fetch(
            """SELECT step, policy, policy_in, policy_out, trainer, n_rollouts, n_tokens, loss,
                      reward_mean, reward_std, metrics, started_at, finished_at,
                      extract(epoch FROM finished_at - started_at)::float8 AS seconds
               FROM training_steps WHERE ($1::text IS NULL OR policy = $1)
               ORDER BY step DESC LIMIT $2""",
            policy,
            limit,
        ),
        ("metrics",),
    )
    return rows[::-1]


async def rollouts(
    conn: asyncpg.Connection, where: RolloutFilter, limit: int, offset: int
) -> tuple[int, list[dict[str, Any]]]:
    """(how many match, the page of them, newest first)."""
    total = await conn.fetchval(f"SELECT count(*) FROM rollouts r WHERE {_ROLLOUT_WHERE}", *where.params())
    page = _rows(
        await conn.fetch(
            f"""SELECT r.id, r.group_id, r.task_id, r.dataset, r.agent, r.mode, r.status, r.reward,
                       r.attempt, {_VERSION} AS version, r.consumed_by_step, r.created_at,
                       r.finished_at,
                       (SELECT count(*) FROM llm_calls c WHERE c.rollout_id = r.id) AS calls
                FROM rollouts r WHERE {_ROLLOUT_WHERE}
                ORDER BY r.created_at DESC, r.id DESC LIMIT $10 OFFSET $11""",
            *where.params(),
            limit,
            offset,
        )
    )
    return int(total), page


async def rollout(conn: asyncpg.Connection, rollout_id: str) -> dict[str, Any] | None:
    """One rollout with its calls in order, every span of its traces, and its rewards."""
    found = await conn.fetchrow(
        f"""SELECT r.id, r.group_id, r.task_id, r.dataset, r.agent, r.mode, r.status, r.reward,
                   r.attempt, {_VERSION} AS version, r.consumed_by_step, r.group_size,
                   r.metadata, r.created_at, r.finished_at,
                   (SELECT input FROM tasks t
                    WHERE t.dataset = r.dataset AND t.split = r.mode AND t.id = r.task_id) AS task
            FROM rollouts r WHERE r.id = $1""",
        rollout_id,
    )
    if found is None:
        return None
    (head,) = _rows([found], ("metadata", "task"))
    calls = _rows(
        await conn.fetch(
            """SELECT span_id, choice_index, seq, model, agent, policy_version, request, response,
                      finish_reason, latency_ms, usage, created_at, response_id, attempt, upstream,
                      cardinality(prompt_token_ids) AS prompt_tokens,
                      cardinality(completion_token_ids) AS completion_tokens
               FROM llm_calls WHERE rollout_id = $1 ORDER BY created_at, seq, choice_index""",
            rollout_id,
        ),
        ("request", "response", "usage"),
    )
    # The agent's own spans join by the rollout id they carry, or by sharing a trace with the
    # proxy's span of one of its calls (W3C traceparent).
    spans = _rows(
        await conn.fetch(
            """SELECT span_id, trace_id, parent_span_id, name, kind, start_time, end_time,
                      status_code, status_message, attributes, rollout_id, model
               FROM spans
               WHERE rollout_id = $1
                  OR (rollout_id IS NULL
                      AND trace_id IN (SELECT s.trace_id FROM spans s JOIN llm_calls c USING (span_id)
                                       WHERE c.rollout_id = $1))
               ORDER BY start_time, span_id""",
            rollout_id,
        ),
        ("attributes",),
    )
    rewards = _rows(
        await conn.fetch(
            "SELECT id, span_id, name, value, source, created_at FROM rewards "
            "WHERE rollout_id = $1 ORDER BY id",
            rollout_id,
        )
    )
    return {**head, "calls": calls, "spans": spans, "rewards": rewards}


async def rollout_exists(conn: asyncpg.Connection, rollout_id: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM rollouts WHERE id = $1)", rollout_id))


async def attach_trace_spans(conn: asyncpg.Connection, rollout_id: str) -> int:
    """Give the rollout's id to spans that share a trace with its calls but came without one (an
    agent's OpenTelemetry spans that carry only the W3C trace context): then one SQL query on
    `spans.rollout_id` returns the rollout's whole trace. Returns how many spans it named."""
    # Only traces whose calls are all this rollout's: an agent that wraps several rollouts in
    # one root span leaves its spans unnamed rather than given to whichever finishes first.
    status = await conn.execute(
        """WITH mine AS (
               SELECT DISTINCT p.trace_id FROM spans p JOIN llm_calls c ON c.span_id = p.span_id
               WHERE c.rollout_id = $1
           ),
           only_mine AS (
               SELECT m.trace_id FROM mine m
               WHERE NOT EXISTS (SELECT 1 FROM spans p JOIN llm_calls c ON c.span_id = p.span_id
                                 WHERE p.trace_id = m.trace_id AND c.rollout_id <> $1)
           )
           UPDATE spans s SET rollout_id = $1 FROM only_mine o
           WHERE s.trace_id = o.trace_id AND s.rollout_id IS NULL""",
        rollout_id,
    )
    return int(status.split()[-1])


async def gauges(conn: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    """What Prometheus gets besides the proxy's own counters (proxy/metrics.py): each policy's
    live version and newest step, queue depth, and the live version's mean reward per dataset."""
    steps = _rows(
        await conn.fetch(
            """SELECT DISTINCT ON (policy) policy, step, loss, reward_mean, reward_std, n_tokens,
                      extract(epoch FROM finished_at - started_at)::float8 AS seconds, metrics
               FROM training_steps WHERE policy IS NOT NULL ORDER BY policy, step DESC"""
        ),
        ("metrics",),
    )
    live_rewards = _rows(
        await conn.fetch(
            """SELECT d.policy, v.dataset, v.policy_version AS version, v.train_reward, v.val_reward
               FROM reward_by_version v
               JOIN datasets d ON d.name = v.dataset
               JOIN policy_versions p ON p.policy = d.policy AND p.status = 'live'
                                     AND p.version = v.policy_version"""
        )
    )
    return {
        "live_versions": await live_versions(conn),
        "steps": steps,
        "queue": await queue_depth(conn),
        "live_rewards": live_rewards,
    }
