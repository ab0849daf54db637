"""Datasets of tasks: loading them (one transaction, idempotent) and reading their progress."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from lightloop.store.errors import NotFound
from lightloop.store.text import dump_json

SPLITS = ("train", "val")
_COUNTED = {"queued": "queued", "running": "running", "succeeded": "done", "failed": "failed"}


def task_id(task: dict[str, Any]) -> str:
    """A task's `id` field, else a hash of its content, so loading a file twice adds nothing."""
    given = task.get("id")
    if given is not None and given != "":
        return str(given)
    canonical = json.dumps(task, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LoadResult:
    dataset: str
    split: str
    added: int
    already_there: int


@dataclass
class SplitProgress:
    dataset: str
    split: str
    policy: str
    tasks: int
    group_size: int  # the largest group size of its tasks
    epochs: int  # 0: until stopped
    queued: int = 0
    running: int = 0
    done: int = 0  # succeeded
    failed: int = 0
    # Rollouts the split will have made in all (train: tasks x group size x epochs; val: per
    # version); None while epochs is 0 (until stopped).
    planned: int | None = None
    val_rounds: int = 0
    stopped: bool = False  # `lightloop tasks stop`: no new train groups

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class DatasetProgress:
    name: str
    policy: str
    splits: dict[str, SplitProgress] = field(default_factory=dict)


async def load_tasks(
    conn: asyncpg.Connection,
    dataset: str,
    split: str,
    tasks: Sequence[dict[str, Any]],
    *,
    group_size: int,
    policy: str,
    seed: int | None = None,
    epochs: int | None = None,
) -> LoadResult:
    """Add `tasks` to `dataset`/`split` in one transaction. A task whose id is already there is
    left as it is. `seed` and `epochs` change the dataset's schedule when given; a stopped
    dataset is resumed."""
    assert split in SPLITS, split
    if group_size < 1:
        raise ValueError("group size must be at least 1")
    if epochs is not None and epochs < 0:
        raise ValueError("epochs must be 0 (until stopped) or more")
    rows = [(dataset, split, task_id(t), dump_json(t), group_size if split == "train" else 1) for t in tasks]
    seen: set[str] = set()
    for row in rows:
        if row[2] in seen:
            raise ValueError(f"task id {row[2]!r} appears more than once")
        seen.add(row[2])
    async with conn.transaction():
        await conn.execute(
            """
            INSERT INTO datasets (name, policy, seed, epochs)
            VALUES ($1, $2, coalesce($3, 0), coalesce($4, 1))
            ON CONFLICT (name) DO UPDATE
            SET seed = coalesce($3, datasets.seed), epochs = coalesce($4, datasets.epochs),
                stopped_at = NULL
            """,
            dataset,
            policy,
            seed,
            epochs,
        )
        before = await conn.fetchval(
            "SELECT count(*) FROM tasks WHERE dataset = $1 AND split = $2", dataset, split
        )
        await conn.executemany(
            """
            INSERT INTO tasks (dataset, split, id, input, group_size)
            VALUES ($1, $2, $3, $4::jsonb, $5)
            ON CONFLICT (dataset, split, id) DO NOTHING
            """,
            rows,
        )
        after = await conn.fetchval(
            "SELECT count(*) FROM tasks WHERE dataset = $1 AND split = $2", dataset, split
        )
    added = int(after) - int(before)
    return LoadResult(dataset, split, added, len(rows) - added)


async def dataset_progress(conn: asyncpg.Connection, dataset: str | None = None) -> list[DatasetProgress]:
    """Every dataset (or one: NotFound when it does not exist) with its splits' counts."""
    rows = await conn.fetch(
        """
        SELECT d.name, d.policy, d.epochs, d.stopped_at, t.split, count(t.id) AS tasks,
               coalesce(max(t.group_size), 1) AS group_size, coalesce(sum(t.group_size), 0) AS per_epoch
        FROM datasets d LEFT JOIN tasks t ON t.dataset = d.name
        WHERE $1::text IS NULL OR d.name = $1
        GROUP BY d.name, d.policy, d.epochs, d.stopped_at, t.split
        ORDER BY d.name, t.split
        """,
        dataset,
    )
    if dataset is not None and not rows:
        raise NotFound(f"dataset {dataset!r} does not exist; load it with `lightloop tasks load`")
    out: dict[str, DatasetProgress] = {}
    for r in rows:
        d = out.setdefault(r["name"], DatasetProgress(r["name"], r["policy"]))
        if r["split"] is None:
            continue
        d.splits[r["split"]] = SplitProgress(
            dataset=r["name"],
            split=r["split"],
            policy=r["policy"],
            tasks=int(r["tasks"]),
            group_size=int(r["group_size"]),
            epochs=int(r["epochs"]),
            planned=_planned(r["split"], int(r["per_epoch"]), int(r["epochs"])),
            stopped=r["stopped_at"] is not None,
        )
    counts = await conn.fetch(
        """
        SELECT dataset, mode, status, count(*) AS n FROM rollouts
        -- A prompt optimisation run's evaluations are no part of the dataset's progress.
        WHERE dataset IS NOT NULL AND ($1::text IS NULL OR dataset = $1) AND prompt_run IS NULL
        GROUP BY 1, 2, 3
        """,
        dataset,
    )
    for c in counts:
        split = out.get(c["dataset"], DatasetProgress("", "")).splits.get(c["mode"])
        if split is None:
            continue
        attr = {"queued": "queued", "running": "running", "succeeded": "done", "failed": "failed"}[
            c["status"]
        ]
        setattr(split, attr, getattr(split, attr) + int(c["n"]))
    rounds = await conn.fetch(
        "SELECT dataset, count(*) AS n FROM val_rounds WHERE $1::text IS NULL OR dataset = $1 GROUP BY 1",
        dataset,
    )
    for r in rounds:
        val = out[r["dataset"]].splits.get("val") if r["dataset"] in out else None
        if val is not None:
            val.val_rounds = int(r["n"])
            val.planned = val.tasks * int(r["n"])
    for d in out.values():
        train = d.splits.get("train")
        if train is not None and train.stopped:
            # What was started is all there will be.
            train.planned = train.queued + train.running + train.done + train.failed
    return list(out.values())


def _planned(split: str, per_epoch: int, epochs: int) -> int | None:
    if split == "val":
        return 0  # until val rounds are made (one per live version)
    return per_epoch * epochs if epochs else None


async def latest_val_reward(conn: asyncpg.Connection, dataset: str) -> tuple[int, float] | None:
    """(version, mean val reward) of the newest version with finished val rollouts."""
    row = await conn.fetchrow(
        """
        SELECT policy_version, val_reward FROM reward_by_version
        WHERE dataset = $1 AND val_rollouts > 0 ORDER BY policy_version DESC LIMIT 1
        """,
        dataset,
    )
    return None if row is None else (int(row["policy_version"]), float(row["val_reward"]))


# Train groups of the dataset that no runner has touched (every rollout queued, never handed
# out), locked first so that a hand-out running now either took its row before (the group is
# kept) or finds it gone. Their tasks get their epoch back, so that resuming starts them again.
_DISCARD_UNSTARTED_SQL = """
WITH open AS (
    SELECT id, group_id, task_id, status, attempt FROM rollouts
    WHERE dataset = $1 AND mode = 'train' AND consumed_by_step IS NULL AND prompt_run IS NULL
    FOR UPDATE
),
untouched AS (
    SELECT group_id, min(task_id) AS task_id FROM open
    GROUP BY group_id HAVING bool_and(status = 'queued' AND coalesce(attempt, 0) = 0)
),
gone AS (
    DELETE FROM rollouts r USING untouched u WHERE r.dataset = $1 AND r.group_id = u.group_id
    RETURNING r.id
),
returned AS (
    UPDATE tasks t SET epochs_started = greatest(t.epochs_started - 1, 0)
    FROM untouched u WHERE t.dataset = $1 AND t.split = 'train' AND t.id = u.task_id
)
SELECT count(*) FROM gone
"""


async def stop_dataset(conn: asyncpg.Connection, dataset: str) -> int:
    """Stop training on `dataset`: the queue starts no new train group of it, and the groups no
    runner has started are discarded; started groups and val rounds are handed out and finish
    as usual, so nothing a runner did is lost. Loading tasks into it again resumes it. Returns
    how many queued rollouts were discarded."""
    async with conn.transaction():
        found = await conn.fetchval(
            "UPDATE datasets SET stopped_at = coalesce(stopped_at, now()) WHERE name = $1 RETURNING name",
            dataset,
        )
        if found is None:
            raise NotFound(f"dataset {dataset!r} does not exist")
        return int(await conn.fetchval(_DISCARD_UNSTARTED_SQL, dataset))


@dataclass(frozen=True)
class ValRound:
    version: int
    rollouts: int
    finished: int
    mean_reward: float | None  # of the finished ones

    @property
    def complete(self) -> bool:
        return self.finished == self.rollouts


@dataclass(frozen=True)
class TrainingProgress:
    """Where training on one dataset stands: what `lightloop demo` follows."""

    steps: int  # training steps that consumed its rollouts
    finished: int  # its rollouts that finished (succeeded or failed)
    train_open: int  # train rollouts not consumed by a step yet (queued, running or waiting)
    val_rounds: list[ValRound]
    calls_by_version: dict[int, int]  # LLM calls of its rollouts, by the version that served them


async def training_progress(conn: asyncpg.Connection, dataset: str) -> TrainingProgress:
    steps, finished, open_ = await conn.fetchrow(
        """
        SELECT count(DISTINCT consumed_by_step),
               count(*) FILTER (WHERE status IN ('succeeded', 'failed')),
               count(*) FILTER (WHERE mode = 'train' AND consumed_by_step IS NULL)
        FROM rollouts WHERE dataset = $1 AND prompt_run IS NULL
        """,
        dataset,
    )
    rounds = await conn.fetch(
        """
        SELECT policy_version AS version, count(*) AS rollouts,
               count(*) FILTER (WHERE status IN ('succeeded', 'failed')) AS finished,
               avg(reward) FILTER (WHERE status IN ('succeeded', 'failed')) AS mean_reward
        FROM rollouts WHERE dataset = $1 AND mode = 'val' AND prompt_run IS NULL
        GROUP BY policy_version ORDER BY policy_version
        """,
        dataset,
    )
    calls = await conn.fetch(
        """
        SELECT c.policy_version, count(*) AS n FROM llm_calls c JOIN rollouts r ON r.id = c.rollout_id
        WHERE r.dataset = $1 AND c.policy_version IS NOT NULL AND r.prompt_run IS NULL GROUP BY 1
        """,
        dataset,
    )
    return TrainingProgress(
        steps=int(steps),
        finished=int(finished),
        train_open=int(open_),
        val_rounds=[
            ValRound(
                int(r["version"]),
                int(r["rollouts"]),
                int(r["finished"]),
                None if r["mean_reward"] is None else float(r["mean_reward"]),
            )
            for r in rounds
        ],
        calls_by_version={int(c["policy_version"]): int(c["n"]) for c in calls},
    )


async def reward_curve(conn: asyncpg.Connection, dataset: str) -> list[dict[str, Any]]:
    """`reward_by_version` for one dataset, oldest version first: the learning curve."""
    rows = await conn.fetch(REWARD_CURVE_SQL, dataset)
    return [dict(r) for r in rows]


REWARD_CURVE_SQL = """
SELECT policy_version, train_reward, train_rollouts, val_reward, val_rollouts
FROM reward_by_version WHERE dataset = $1 ORDER BY policy_version
"""
