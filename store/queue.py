"""The task queue: rollouts made from dataset tasks, handed to runners under a lease.

Life of a queue rollout: `queued` (made with its whole group, or with its val round) ->
`running` (handed out as attempt n, with a lease the runner renews by heartbeat) -> `succeeded`
or `failed` (the runner's finish). A lease that lapses supersedes the attempt and puts the
rollout back as `queued`; it is handed out again as attempt n+1, up to `max_attempts`, after
which it is finished as failed with `failed_reward`, so that its group still completes.

Train groups are made only while the trainer can still use them (`max_groups`, see
`next_rollout`), one whole group of `group_size` rollouts per task and epoch; val rollouts are
made once per live policy version and handed out before train ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from lightloop.store.errors import Conflict, NotFound

# The oldest queued rollout of the wanted datasets, val before train. FOR UPDATE SKIP LOCKED:
# runners asking at once each take a different row instead of queueing on the same one, and a
# row another transaction is taking is skipped, not handed out twice. Its attempt row (with the
# lease) is written in the same statement.
_HAND_OUT_SQL = """
WITH pick AS (
    SELECT id FROM rollouts
    WHERE status = 'queued' AND dataset = ANY($1::text[]) AND mode = ANY($2::text[])
      -- A prompt optimisation run's evaluations go to its own runners only.
      AND prompt_run IS NOT DISTINCT FROM $5
    ORDER BY (mode = 'val') DESC, created_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
),
taken AS (
    UPDATE rollouts r
    SET status = 'running', attempt = coalesce(r.attempt, 0) + 1
    FROM pick WHERE r.id = pick.id
    RETURNING r.id, r.group_id, r.task_id, r.dataset, r.mode, r.attempt, r.group_size, r.policy_version,
              r.prompt_name, r.prompt_version
),
leased AS (
    INSERT INTO rollout_attempts (rollout_id, attempt, worker, lease_expires_at)
    SELECT id, attempt, $3, now() + make_interval(secs => $4) FROM taken
)
SELECT taken.*, t.input, d.policy, pv.text AS prompt_text
FROM taken
JOIN tasks t ON t.dataset = taken.dataset AND t.split = taken.mode AND t.id = taken.task_id
JOIN datasets d ON d.name = taken.dataset
LEFT JOIN prompt_versions pv ON pv.name = taken.prompt_name AND pv.version = taken.prompt_version
"""

# Groups the trainer has not consumed yet: queued, running, or finished and waiting for a step.
_GROUPS_IN_FLIGHT_SQL = """
SELECT count(DISTINCT r.group_id) FROM rollouts r JOIN datasets d ON d.name = r.dataset
WHERE r.consumed_by_step IS NULL AND r.mode = 'train' AND d.policy = $1 AND r.prompt_run IS NULL
"""

# New train groups ($3 of them): the tasks with the fewest epochs started (shuffled by the
# dataset's seed within an epoch), locked so that two proxies cannot start the same task's epoch
# twice. Groups made together get created_at a microsecond apart in shuffle order, so that the
# hand-out (oldest first) keeps both the shuffle and each group whole.
_NEW_GROUP_SQL = """
WITH picked AS (
    SELECT t.dataset, t.id, t.group_size, t.epochs_started,
           md5(d.seed::text || ':' || t.epochs_started::text || ':' || t.id) AS shuffle
    FROM tasks t JOIN datasets d ON d.name = t.dataset
    WHERE t.dataset = ANY($1::text[]) AND t.split = 'train' AND d.stopped_at IS NULL
      AND (d.epochs = 0 OR t.epochs_started < d.epochs)
    ORDER BY t.epochs_started, shuffle
    LIMIT $3
    FOR UPDATE OF t SKIP LOCKED
),
t AS (
    SELECT picked.*, row_number() OVER (ORDER BY epochs_started, shuffle) AS rank FROM picked
),
bumped AS (
    UPDATE tasks SET epochs_started = tasks.epochs_started + 1
    FROM t WHERE tasks.dataset = t.dataset AND tasks.split = 'train' AND tasks.id = t.id
    RETURNING tasks.dataset, tasks.id, tasks.group_size, t.epochs_started AS epoch, t.rank,
              'g-' || replace(gen_random_uuid()::text, '-', '') AS group_id
)
INSERT INTO rollouts (id, group_id, task_id, dataset, mode, status, group_size, attempt, policy_version,
                      metadata, created_at)
SELECT 'q-' || replace(gen_random_uuid()::text, '-', ''), b.group_id, b.id, b.dataset, 'train', 'queued',
       b.group_size, 0, $2, jsonb_build_object('attribution', 'queue', 'epoch', b.epoch),
       now() + make_interval(secs => b.rank / 1e6)
FROM bumped b, generate_series(1, b.group_size)
RETURNING id
"""

# Whether any train task of these datasets can still start a group.
_STARTABLE_SQL = """
SELECT EXISTS (
    SELECT 1 FROM tasks t JOIN datasets d ON d.name = t.dataset
    WHERE t.dataset = ANY($1::text[]) AND t.split = 'train' AND d.stopped_at IS NULL
      AND (d.epochs = 0 OR t.epochs_started < d.epochs)
)
"""

# The val split once for a version: the round row is the "once" (its key), the rollouts follow.
_VAL_ROUND_SQL = """
WITH round AS (
    INSERT INTO val_rounds (dataset, policy, version)
    SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM tasks WHERE dataset = $1 AND split = 'val')
    ON CONFLICT DO NOTHING
    RETURNING version
)
INSERT INTO rollouts (id, group_id, task_id, dataset, mode, status, group_size, attempt, policy_version,
                      metadata)
SELECT 'q-' || replace(gen_random_uuid()::text, '-', ''), NULL, t.id, t.dataset, 'val', 'queued', 1, 0,
       round.version, jsonb_build_object('attribution', 'queue', 'val_round', round.version)
FROM tasks t, round
WHERE t.dataset = $1 AND t.split = 'val'
"""

# Lapsed leases, rollouts locked first (the order finish and heartbeat lock in too), skipping
# any being finished right now. The attempt is re-checked under its lock, so a heartbeat that
# renewed it a moment ago wins.
_EXPIRE_SQL = """
WITH lapsed AS (
    SELECT r.id, r.attempt FROM rollouts r
    JOIN rollout_attempts a ON a.rollout_id = r.id AND a.attempt = r.attempt
    WHERE a.status = 'running' AND a.lease_expires_at < now() AND r.status = 'running'
    FOR UPDATE OF r SKIP LOCKED
),
superseded AS (
    UPDATE rollout_attempts a
    SET status = 'superseded', ended_at = now(), error = 'the lease lapsed (no heartbeat)'
    FROM lapsed l
    WHERE a.rollout_id = l.id AND a.attempt = l.attempt
      AND a.status = 'running' AND a.lease_expires_at < now()
    RETURNING a.rollout_id, a.attempt
)
UPDATE rollouts r
SET status = CASE WHEN s.attempt < $1 THEN 'queued' ELSE 'failed' END,
    reward = CASE WHEN s.attempt < $1 THEN r.reward ELSE coalesce(r.reward, $2) END,
    finished_at = CASE WHEN s.attempt < $1 THEN NULL ELSE now() END,
    metadata = CASE WHEN s.attempt < $1 THEN r.metadata
               ELSE r.metadata
                    || jsonb_build_object('error', 'every attempt''s lease lapsed', 'attempts', s.attempt)
               END
FROM superseded s
WHERE r.id = s.rollout_id
RETURNING r.id, r.status
"""


# Train groups made at a time when the queue runs dry: many runners asking at once find work
# without each queueing on the group lock; the staleness limit still caps the total.
GROUP_BATCH = 4


@dataclass(frozen=True)
class Handout:
    rollout_id: str
    group_id: str | None
    task_id: str
    dataset: str
    split: str
    input: dict[str, Any]
    attempt: int
    group_size: int
    policy: str
    policy_version: int | None
    prompt_name: str | None = None  # the candidate an optimisation run pinned to it
    prompt_version: int | None = None
    prompt_text: str | None = None


@dataclass(frozen=True)
class Empty:
    """Nothing to hand out now. `drained`: nothing queued or running and no task left to start,
    so a runner may stop; otherwise more work may come (leases lapsing, the trainer catching up,
    a new version's val round)."""

    drained: bool


async def datasets(conn: asyncpg.Connection, name: str | None) -> dict[str, str]:
    """{dataset: policy} for one dataset (NotFound when unknown) or all."""
    rows = await conn.fetch(
        "SELECT name, policy FROM datasets WHERE $1::text IS NULL OR name = $1 ORDER BY name", name
    )
    if name is not None and not rows:
        raise NotFound(f"dataset {name!r} does not exist; load it with `lightloop tasks load`")
    return {r["name"]: r["policy"] for r in rows}


async def ensure_val_round(conn: asyncpg.Connection, dataset: str, policy: str, version: int) -> int:
    """Make the val rollouts of `version` unless they were made before; how many were made."""
    status = await conn.execute(_VAL_ROUND_SQL, dataset, policy, version)
    return int(status.split()[-1])


async def next_rollout(
    conn: asyncpg.Connection,
    *,
    wanted: dict[str, str],
    splits: Sequence[str],
    worker: str | None,
    lease_s: float,
    live: Callable[[str], int],
    max_groups: Callable[[str], int | None],
    prompt_run: str | None = None,
) -> Handout | Empty:
    """Hand out one rollout of the `wanted` datasets ({name: policy}) and `splits`.

    `live(policy)` is the version being served; `max_groups(policy)` the most train groups the
    trainer can still use (None: no limit). A new train group is made only while fewer than
    that are in flight, so every rollout handed out is trained within the staleness limit.

    With `prompt_run`, only that optimisation run's evaluations are handed out (and no group
    is made); without it, never one of them."""
    names = list(wanted)
    modes = [s for s in ("val", "train") if s in splits]
    args = (names, modes, worker, float(lease_s), prompt_run)
    async with conn.transaction():
        run_status = None
        if prompt_run is not None:
            run_status = await conn.fetchval("SELECT status FROM prompt_runs WHERE id = $1", prompt_run)
            if run_status is None:
                raise NotFound(f"prompt optimisation run {prompt_run!r} does not exist")
        row = await conn.fetchrow(_HAND_OUT_SQL, *args)
        if row is None and "train" in modes and prompt_run is None:
            for policy in sorted(set(wanted.values())):
                of_policy = [n for n in names if wanted[n] == policy]
                if not await conn.fetchval(_STARTABLE_SQL, of_policy):
                    continue  # every task started: no need to wait for the group lock
                # Group creation is serialised per policy, so that proxies counting at once
                # cannot together start more groups than the limit.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('lightloop.queue.' || $1))", policy)
                # Whoever held the lock before may have just made groups: take from those
                # first, so that runners waiting on the lock do not each make another.
                row = await conn.fetchrow(_HAND_OUT_SQL, *args)
                if row is not None:
                    break
                batch = GROUP_BATCH
                limit = max_groups(policy)
                if limit is not None:
                    in_flight = await conn.fetchval(_GROUPS_IN_FLIGHT_SQL, policy)
                    if in_flight >= limit:
                        continue
                    batch = min(batch, limit - in_flight)
                made = await conn.fetch(_NEW_GROUP_SQL, of_policy, live(policy), batch)
                if made:
                    row = await conn.fetchrow(_HAND_OUT_SQL, *args)
                    break
        if row is None:
            busy = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM rollouts WHERE dataset = ANY($1::text[]) "
                "AND mode = ANY($2::text[]) AND status IN ('queued', 'running') "
                "AND prompt_run IS NOT DISTINCT FROM $3)",
                names,
                modes,
                prompt_run,
            )
            if prompt_run is not None:
                # The run asks for more between its batches: drained only once it ended.
                return Empty(drained=not busy and run_status != "running")
            more = "train" in modes and await conn.fetchval(_STARTABLE_SQL, names)
            return Empty(drained=not busy and not more)
    return Handout(
        rollout_id=row["id"],
        group_id=row["group_id"],
        task_id=row["task_id"],
        dataset=row["dataset"],
        split=row["mode"],
        input=_json(row["input"]),
        attempt=int(row["attempt"]),
        group_size=int(row["group_size"] or 1),
        policy=row["policy"],
        policy_version=row["policy_version"],
        prompt_name=row["prompt_name"],
        prompt_version=row["prompt_version"],
        prompt_text=row["prompt_text"],
    )


async def heartbeat(
    conn: asyncpg.Connection, rollout_id: str, attempt: int | None, lease_s: float
) -> tuple[int, Any]:
    """Renew the lease of the rollout's current attempt: (attempt, new expiry). NotFound for an
    unknown rollout; Conflict when that attempt is no longer the rollout's running one."""
    async with conn.transaction():
        row = await conn.fetchrow("SELECT status, attempt FROM rollouts WHERE id = $1 FOR UPDATE", rollout_id)
        if row is None:
            raise NotFound(f"rollout {rollout_id!r} does not exist")
        current = row["attempt"]
        if current is None:
            raise Conflict(f"rollout {rollout_id!r} is not a queue rollout; it has no lease")
        if attempt is not None and attempt != current:
            raise Conflict(f"attempt {attempt} of rollout {rollout_id!r} was superseded by attempt {current}")
        expires = await conn.fetchval(
            """
            UPDATE rollout_attempts
            SET lease_expires_at = now() + make_interval(secs => $3), heartbeat_at = now()
            WHERE rollout_id = $1 AND attempt = $2 AND status = 'running'
            RETURNING lease_expires_at
            """,
            rollout_id,
            current,
            float(lease_s),
        )
        if expires is None or row["status"] != "running":
            raise Conflict(f"attempt {current} of rollout {rollout_id!r} is not running ({row['status']})")
    return int(current), expires


async def expire_leases(
    conn: asyncpg.Connection, *, max_attempts: int, failed_reward: float
) -> dict[str, int]:
    """Supersede every attempt whose lease lapsed: re-queue its rollout, or fail it (with
    `failed_reward`) after `max_attempts`. Counts of each."""
    rows = await conn.fetch(_EXPIRE_SQL, max_attempts, failed_reward)
    out = {"requeued": 0, "failed": 0}
    for r in rows:
        out["requeued" if r["status"] == "queued" else "failed"] += 1
    return out


def _json(value: Any) -> dict[str, Any]:
    loaded = json.loads(value) if isinstance(value, str) else value
    return loaded if isinstance(loaded, dict) else {"value": loaded}
