"""Prompt optimisation runs (`lightloop optimize-prompt`) in Postgres: the run and GEPA's state,
and the evaluations: rollouts of the dataset's tasks, each pinned to one candidate version and
handed out only to that run's runners. One evaluation per (run, version, split, task), so a
resumed run finds what was scored instead of scoring it again."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from lightloop.store.errors import NotFound
from lightloop.store.marks import MARKS_SQL


@dataclass(frozen=True)
class PromptRun:
    id: str
    name: str
    dataset: str
    train_split: str
    val_split: str
    agent: str
    reflection_model: str
    budget: int
    seed: int
    start_version: int
    policy_version: int
    train_tasks: list[str]
    val_tasks: list[str]
    status: str
    metric_calls: int
    proposals_failed: int
    best_version: int | None
    state: bytes | None
    error: str | None


@dataclass(frozen=True)
class Evaluation:
    rollout_id: str
    task_id: str
    status: str
    reward: float | None
    feedback: str | None


_RUN_COLUMNS = (
    "id, name, dataset, train_split, val_split, agent, reflection_model, budget, seed, start_version, "
    "policy_version, train_tasks, val_tasks, status, "
    "metric_calls, proposals_failed, best_version, state, error"
)

# Evaluations are queue rollouts of a group of one, never trained (the trainer's claim and
# reward_by_version leave prompt_run rollouts out). ON CONFLICT: a candidate already evaluated
# on a task in this run (before a restart, or by GEPA asking twice) keeps its one rollout.
_ENQUEUE_SQL = """
INSERT INTO rollouts (id, task_id, dataset, mode, status, group_size, attempt, prompt_run,
                      prompt_name, prompt_version, policy_version, metadata)
SELECT 'p-' || replace(gen_random_uuid()::text, '-', ''), t.id, $4, $5, 'queued', 1, 0, $1, $2, $3, $7,
       jsonb_build_object('attribution', 'queue', 'prompt_run', $1::text)
FROM unnest($6::text[]) AS t (id)
ON CONFLICT (prompt_run, prompt_version, mode, task_id) WHERE prompt_run IS NOT NULL DO NOTHING
"""

# Recent calls of the agent (or model) whose messages hold the baseline, or that the proxy
# already served a version of the prompt to (their stored messages hold that version's text).
_BASELINE_SEEN_SQL = r"""
WITH recent AS (
    SELECT request, prompt_name FROM llm_calls
    WHERE ($2::text IS NULL OR agent = $2) AND ($3::text IS NULL OR model = $3)
    ORDER BY created_at DESC
    LIMIT $4
)
SELECT count(*) AS checked,
       count(*) FILTER (WHERE prompt_name = $5 OR EXISTS (
           SELECT 1 FROM jsonb_array_elements(
               CASE WHEN jsonb_typeof(request -> 'messages') = 'array' THEN request -> 'messages'
                    ELSE '[]'::jsonb END) AS m
           WHERE btrim(m ->> 'content', E' \t\n\r\f\v') = $1
              OR (jsonb_typeof(m -> 'content') = 'array' AND EXISTS (
                  SELECT 1 FROM jsonb_array_elements(m -> 'content') AS part
                  WHERE btrim(part ->> 'text', E' \t\n\r\f\v') = $1))
       )) AS found
FROM recent
"""


def _run(row: asyncpg.Record) -> PromptRun:
    return PromptRun(**dict(row))


async def start_run(
    conn: asyncpg.Connection,
    *,
    run_id: str,
    name: str,
    dataset: str,
    train_split: str,
    val_split: str,
    agent: str,
    reflection_model: str,
    budget: int,
    seed: int,
    start_version: int,
    policy_version: int,
    train_tasks: list[str],
    val_tasks: list[str],
) -> PromptRun:
    row = await conn.fetchrow(
        f"""INSERT INTO prompt_runs (id, name, dataset, train_split, val_split, agent, reflection_model,
                                     budget, seed, start_version, policy_version, train_tasks, val_tasks)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING {_RUN_COLUMNS}""",
        run_id,
        name,
        dataset,
        train_split,
        val_split,
        agent,
        reflection_model,
        budget,
        seed,
        start_version,
        policy_version,
        train_tasks,
        val_tasks,
    )
    return _run(row)


async def unfinished_run(conn: asyncpg.Connection, name: str, dataset: str) -> PromptRun | None:
    """The newest run of `name` on `dataset` that did not end: the one to resume."""
    row = await conn.fetchrow(
        f"""SELECT {_RUN_COLUMNS} FROM prompt_runs WHERE name = $1 AND dataset = $2 AND status = 'running'
            ORDER BY created_at DESC LIMIT 1""",
        name,
        dataset,
    )
    return None if row is None else _run(row)


async def get_run(conn: asyncpg.Connection, run_id: str) -> PromptRun:
    row = await conn.fetchrow(f"SELECT {_RUN_COLUMNS} FROM prompt_runs WHERE id = $1", run_id)
    if row is None:
        raise NotFound(f"prompt optimisation run {run_id!r} does not exist")
    return _run(row)


async def save_state(conn: asyncpg.Connection, run_id: str, state: bytes, metric_calls: int) -> None:
    await conn.execute(
        "UPDATE prompt_runs SET state = $2, metric_calls = $3, updated_at = now() WHERE id = $1",
        run_id,
        state,
        metric_calls,
    )


async def note_error(conn: asyncpg.Connection, run_id: str, error: str) -> None:
    """Why the run stopped, kept while it stays resumable."""
    await conn.execute("UPDATE prompt_runs SET error = $2, updated_at = now() WHERE id = $1", run_id, error)


async def count_candidates(conn: asyncpg.Connection, run_id: str) -> int:
    """The candidate versions this run made (a text proposed twice is one)."""
    return int(await conn.fetchval("SELECT count(*) FROM prompt_versions WHERE run_id = $1", run_id))


async def count_failed_proposal(conn: asyncpg.Connection, run_id: str) -> int:
    return int(
        await conn.fetchval(
            "UPDATE prompt_runs SET proposals_failed = proposals_failed + 1, updated_at = now() "
            "WHERE id = $1 RETURNING proposals_failed",
            run_id,
        )
    )


async def end_run(
    conn: asyncpg.Connection,
    run_id: str,
    status: str,
    *,
    best_version: int | None,
    error: str | None = None,
    metric_calls: int | None = None,
) -> None:
    await conn.execute(
        """UPDATE prompt_runs SET status = $2, best_version = $3, error = $4, finished_at = now(),
                                  metric_calls = coalesce($5, metric_calls), updated_at = now()
           WHERE id = $1""",
        run_id,
        status,
        best_version,
        error,
        metric_calls,
    )


async def lock_run(conn: asyncpg.Connection, run_id: str) -> bool:
    """Take the run for this session (released when the connection closes, a kill -9 included):
    False when another optimiser holds it, so two never drive one run."""
    return bool(
        await conn.fetchval("SELECT pg_try_advisory_lock(hashtext('lightloop.prompt_run:' || $1))", run_id)
    )


async def supersede_runs(conn: asyncpg.Connection, name: str, dataset: str, by: str) -> None:
    """`--fresh`: the unfinished runs of `name` on `dataset` end, so none is resumed later."""
    await conn.execute(
        """UPDATE prompt_runs SET status = 'failed', error = 'superseded by run ' || $3,
                                  finished_at = now(), updated_at = now()
           WHERE name = $1 AND dataset = $2 AND status = 'running' AND id <> $3""",
        name,
        dataset,
        by,
    )


async def drop_queued(conn: asyncpg.Connection, run_id: str) -> int:
    """A resumed run's evaluations that nobody took: GEPA draws its interrupted iteration again
    (its random state is not saved), so what it asked for then may never be asked again."""
    async with conn.transaction():
        await conn.execute(
            """DELETE FROM rollout_attempts WHERE rollout_id IN (
                   SELECT id FROM rollouts WHERE prompt_run = $1 AND status = 'queued')""",
            run_id,
        )
        status = await conn.execute(
            "DELETE FROM rollouts WHERE prompt_run = $1 AND status = 'queued'", run_id
        )
    return int(status.split()[-1])


async def live_policy_version(conn: asyncpg.Connection, dataset: str) -> int:
    """The live version of the dataset's policy (0: the base model)."""
    version = await conn.fetchval(
        """SELECT v.version FROM datasets d
           JOIN policy_versions v ON v.policy = d.policy AND v.status = 'live' WHERE d.name = $1""",
        dataset,
    )
    return int(version or 0)


async def tasks_by_id(
    conn: asyncpg.Connection, dataset: str, split: str, ids: list[str]
) -> list[tuple[str, dict[str, Any]]]:
    """(task id, input) of `ids`, in that order; NotFound when one is gone from the dataset."""
    rows = await conn.fetch(
        "SELECT id, input FROM tasks WHERE dataset = $1 AND split = $2 AND id = ANY($3::text[])",
        dataset,
        split,
        ids,
    )
    found = {r["id"]: r["input"] if isinstance(r["input"], dict) else json.loads(r["input"]) for r in rows}
    gone = [i for i in ids if i not in found]
    if gone:
        raise NotFound(f"the run's {split} tasks {gone[:5]} are no longer in dataset {dataset!r}")
    return [(i, found[i]) for i in ids]


async def written_through(
    conn: asyncpg.Connection, run_id: str, version: int, split: str, ids: list[str]
) -> bool:
    """Whether every live batch writer has written what it accepted before these evaluations
    finished: their calls may have gone through another proxy process than their finish."""
    return bool(
        await conn.fetchval(
            f"""SELECT coalesce(max(finished_at), '-infinity') <= ({MARKS_SQL}) FROM rollouts
                WHERE prompt_run = $1 AND prompt_version = $2 AND mode = $3 AND task_id = ANY($4::text[])""",
            run_id,
            version,
            split,
            ids,
        )
    )


async def split_tasks(conn: asyncpg.Connection, dataset: str, split: str) -> list[tuple[str, dict[str, Any]]]:
    """(task id, input) of one split, in id order."""
    rows = await conn.fetch(
        "SELECT id, input FROM tasks WHERE dataset = $1 AND split = $2 ORDER BY id", dataset, split
    )
    return [(r["id"], r["input"] if isinstance(r["input"], dict) else json.loads(r["input"])) for r in rows]


async def enqueue_evaluations(
    conn: asyncpg.Connection, run: PromptRun, version: int, split: str, task_ids: list[str]
) -> int:
    """Queue `version`'s rollouts of `task_ids` (those not evaluated yet in this run)."""
    status = await conn.execute(
        _ENQUEUE_SQL, run.id, run.name, version, run.dataset, split, task_ids, run.policy_version
    )
    return int(status.split()[-1])


async def evaluations(
    conn: asyncpg.Connection, run_id: str, version: int, split: str, task_ids: list[str]
) -> dict[str, Evaluation]:
    """This run's evaluations of `version` on `task_ids`, by task id (finished or not)."""
    rows = await conn.fetch(
        """SELECT id, task_id, status, reward, metadata ->> 'feedback' AS feedback FROM rollouts
           WHERE prompt_run = $1 AND prompt_version = $2 AND mode = $3 AND task_id = ANY($4::text[])""",
        run_id,
        version,
        split,
        task_ids,
    )
    return {
        r["task_id"]: Evaluation(r["id"], r["task_id"], r["status"], r["reward"], r["feedback"]) for r in rows
    }


async def transcripts(conn: asyncpg.Connection, rollout_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each rollout's recorded calls, in order: the messages sent and the reply."""
    # The current attempt's calls only (a superseded attempt's stay in llm_calls).
    rows = await conn.fetch(
        """SELECT c.rollout_id, c.request -> 'messages' AS messages, c.response, c.prompt_name
           FROM llm_calls c JOIN rollouts r ON r.id = c.rollout_id
           WHERE c.rollout_id = ANY($1::text[])
             AND (r.attempt IS NULL OR c.attempt IS NULL OR c.attempt = r.attempt)
           ORDER BY c.rollout_id, c.seq, c.choice_index""",
        rollout_ids,
    )
    out: dict[str, list[dict[str, Any]]] = {i: [] for i in rollout_ids}
    for r in rows:
        messages = json.loads(r["messages"]) if isinstance(r["messages"], str) else r["messages"]
        response = json.loads(r["response"]) if isinstance(r["response"], str) else r["response"]
        out[r["rollout_id"]].append(
            {"messages": messages or [], "response": response, "prompt": r["prompt_name"]}
        )
    return out


async def baseline_seen(
    conn: asyncpg.Connection, name: str, baseline: str, agent: str | None, model: str | None, limit: int
) -> tuple[int, int]:
    """(calls checked, calls that hold the baseline): the newest `limit` calls of the agent or
    model the prompt applies to."""
    row = await conn.fetchrow(_BASELINE_SEEN_SQL, baseline, agent, model, limit, name)
    return int(row["checked"]), int(row["found"])
