"""The task queue in Postgres: loading, hand-out with SKIP LOCKED, whole groups, val rounds,
the staleness limit, leases that lapse into new attempts, and claims of complete groups only."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from lightloop.store import (
    Conflict,
    Empty,
    Handout,
    NotFound,
    StepRecord,
    claim_groups,
    dataset_progress,
    ensure_val_round,
    expire_leases,
    finish_rollout,
    heartbeat,
    load_tasks,
    next_rollout,
    record_step,
    stop_dataset,
    training_progress,
)
from lightloop.store.database import dsn
from lightloop.store.queue import GROUP_BATCH

TRAIN = [{"id": f"t{i}", "question": f"{i} + 1", "answer": i + 1} for i in range(6)]
VAL = [{"question": f"{i} + 2", "answer": i + 2} for i in range(3)]  # ids from their content


async def load(conn: asyncpg.Connection, group_size: int = 4, **kw: Any) -> None:
    await load_tasks(conn, "sums", "train", TRAIN, group_size=group_size, policy="policy", **kw)
    await load_tasks(conn, "sums", "val", VAL, group_size=1, policy="policy")


async def take(
    conn: asyncpg.Connection,
    splits: tuple[str, ...] = ("train",),
    *,
    live: int = 0,
    max_groups: int | None = None,
    lease_s: float = 60,
    worker: str = "w",
) -> Handout | Empty:
    return await next_rollout(
        conn,
        wanted={"sums": "policy"},
        splits=splits,
        worker=worker,
        lease_s=lease_s,
        live=lambda _: live,
        max_groups=lambda _: max_groups,
    )


async def test_loading_twice_changes_nothing_and_progress_counts(conn: asyncpg.Connection) -> None:
    first = await load_tasks(conn, "sums", "train", TRAIN, group_size=4, policy="policy")
    again = await load_tasks(conn, "sums", "train", TRAIN, group_size=4, policy="policy")
    assert (first.added, first.already_there) == (6, 0)
    assert (again.added, again.already_there) == (0, 6)
    await load_tasks(conn, "sums", "val", VAL, group_size=1, policy="policy")
    [progress] = await dataset_progress(conn)
    train, val = progress.splits["train"], progress.splits["val"]
    assert (train.tasks, train.group_size, train.planned, train.queued) == (6, 4, 24, 0)
    assert val.tasks == 3 and val.planned == 0  # no val round yet
    # Content-hashed ids are stable: the same val rows again add nothing.
    assert (await load_tasks(conn, "sums", "val", VAL, group_size=1, policy="policy")).added == 0
    with pytest.raises(NotFound, match="lightloop tasks load"):
        await dataset_progress(conn, "nope")


async def test_a_train_task_is_handed_out_as_one_whole_group(conn: asyncpg.Connection) -> None:
    await load(conn)
    got = [await take(conn) for _ in range(8)]
    assert all(isinstance(g, Handout) for g in got)
    handouts = [g for g in got if isinstance(g, Handout)]
    # The first group's four rollouts come out before the next group starts.
    assert len({h.group_id for h in handouts[:4]}) == 1 and len({h.task_id for h in handouts[:4]}) == 1
    assert handouts[4].group_id != handouts[0].group_id
    assert all(h.attempt == 1 and h.group_size == 4 and h.split == "train" for h in handouts)
    first = handouts[0]
    assert first.input == next(t for t in TRAIN if t["id"] == first.task_id)
    rows = await conn.fetch(
        "SELECT status, group_size, dataset FROM rollouts WHERE group_id = $1", first.group_id
    )
    assert [tuple(r) for r in rows] == [("running", 4, "sums")] * 4
    # The whole train split, then nothing: every task once per epoch (default 1).
    rest = [await take(conn) for _ in range(16)]
    assert all(isinstance(r, Handout) for r in rest)
    tasks_run = await conn.fetch("SELECT task_id, count(*) FROM rollouts GROUP BY 1")
    assert sorted(r[1] for r in tasks_run) == [4] * 6
    empty = await take(conn)
    assert isinstance(empty, Empty) and not empty.drained  # 24 still running


async def test_the_shuffle_follows_the_seed(conn: asyncpg.Connection, db_url: str) -> None:
    async def order(seed: int) -> list[str]:
        await conn.execute("TRUNCATE rollout_attempts, rollouts, val_rounds, tasks, datasets CASCADE")
        await load(conn, group_size=1, seed=seed)
        out = []
        for _ in range(6):
            got = await take(conn)
            assert isinstance(got, Handout)
            out.append(got.task_id)
        return out

    a, b, c = await order(1), await order(1), await order(2)
    assert a == b and sorted(a) == sorted(t["id"] for t in TRAIN)
    assert a != c


async def test_epochs_hand_each_task_out_once_per_epoch(conn: asyncpg.Connection) -> None:
    await load(conn, group_size=1, epochs=2)
    ids = []
    for _ in range(12):
        got = await take(conn)
        assert isinstance(got, Handout)
        ids.append(got.task_id)
    assert sorted(ids[:6]) == sorted(ids[6:])  # epoch 1 covers every task before epoch 2
    assert isinstance(await take(conn), Empty)


async def test_val_runs_once_per_version_and_before_train(conn: asyncpg.Connection) -> None:
    await load(conn)
    assert await ensure_val_round(conn, "sums", "policy", 0) == 3
    assert await ensure_val_round(conn, "sums", "policy", 0) == 0  # once per version
    got = [await take(conn, ("val", "train")) for _ in range(4)]
    assert [g.split for g in got if isinstance(g, Handout)] == ["val", "val", "val", "train"]
    assert all(g.policy_version == 0 for g in got[:3] if isinstance(g, Handout))
    assert await ensure_val_round(conn, "sums", "policy", 1) == 3
    nxt = await take(conn, ("val", "train"))
    assert isinstance(nxt, Handout) and nxt.split == "val" and nxt.policy_version == 1
    rounds = await conn.fetch("SELECT version FROM val_rounds ORDER BY 1")
    assert [r[0] for r in rounds] == [0, 1]


async def test_the_staleness_limit_holds_back_new_groups(conn: asyncpg.Connection) -> None:
    await load(conn, group_size=2)
    a = [await take(conn, max_groups=1) for _ in range(2)]
    assert all(isinstance(g, Handout) for g in a)
    blocked = await take(conn, max_groups=1)
    assert isinstance(blocked, Empty) and not blocked.drained
    # The group finishes, but until a trainer consumes it the limit still holds.
    for g in a:
        assert isinstance(g, Handout)
        await finish_rollout(conn, g.rollout_id, "succeeded", 1.0, attempt=g.attempt)
    assert isinstance(await take(conn, max_groups=1), Empty)
    claim = await claim_groups(conn, "trainer", max_groups=8, lease_s=60, settle_s=30)
    assert claim is not None and len(claim.rollouts) == 2
    await record_step(conn, claim, StepRecord(started_at=datetime.now(UTC)))
    assert isinstance(await take(conn, max_groups=1), Handout)


async def test_two_runners_never_receive_the_same_rollout(conn: asyncpg.Connection, db_url: str) -> None:
    await load(conn, group_size=4, epochs=5)  # 120 rollouts
    conns = [await asyncpg.connect(dsn(db_url)) for _ in range(6)]
    try:

        async def runner(c: asyncpg.Connection, name: str) -> list[str]:
            got = []
            while True:
                one = await take(c, worker=name)
                if isinstance(one, Empty):
                    return got
                got.append(one.rollout_id)

        taken = await asyncio.gather(*(runner(c, f"w{i}") for i, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    every = [r for got in taken for r in got]
    assert len(every) == len(set(every)) == 120
    assert sum(1 for got in taken if got) > 1  # the race was real
    per_task = await conn.fetch("SELECT task_id, count(*) FROM rollouts GROUP BY 1")
    assert sorted(r[1] for r in per_task) == [20] * 6


async def test_a_lapsed_lease_becomes_the_next_attempt_then_fails(conn: asyncpg.Connection) -> None:
    await load(conn, group_size=1)
    first = await take(conn, lease_s=0)  # lapsed at once: the runner "died"
    assert isinstance(first, Handout) and first.attempt == 1
    assert await expire_leases(conn, max_attempts=2, failed_reward=-1.0) == {"requeued": 1, "failed": 0}
    again = await take(conn, lease_s=0)
    assert isinstance(again, Handout) and again.rollout_id == first.rollout_id and again.attempt == 2
    # The dead attempt can no longer report or keep a lease.
    with pytest.raises(Conflict, match="superseded"):
        await finish_rollout(conn, first.rollout_id, "succeeded", 1.0, attempt=1)
    with pytest.raises(Conflict, match="superseded"):
        await heartbeat(conn, first.rollout_id, 1, 60)
    assert await expire_leases(conn, max_attempts=2, failed_reward=-1.0) == {"requeued": 0, "failed": 1}
    row = await conn.fetchrow("SELECT status, reward, metadata FROM rollouts WHERE id = $1", first.rollout_id)
    assert (row["status"], row["reward"]) == ("failed", -1.0)
    assert "lapsed" in json.loads(row["metadata"])["error"]
    attempts = await conn.fetch(
        "SELECT attempt, status FROM rollout_attempts WHERE rollout_id = $1 ORDER BY 1", first.rollout_id
    )
    assert [tuple(a) for a in attempts] == [(1, "superseded"), (2, "superseded")]
    # A failed group of one is complete: the trainer may take it.
    assert await claim_groups(conn, "t", max_groups=8, lease_s=60, settle_s=30) is not None


async def test_heartbeat_renews_the_lease_and_a_renewed_lease_is_not_reaped(conn: asyncpg.Connection) -> None:
    await load(conn, group_size=1)
    got = await take(conn, lease_s=0)
    assert isinstance(got, Handout)
    attempt, expires = await heartbeat(conn, got.rollout_id, got.attempt, 60)
    assert attempt == 1 and expires > datetime.now(UTC)
    assert await expire_leases(conn, max_attempts=3, failed_reward=0) == {"requeued": 0, "failed": 0}
    with pytest.raises(NotFound):
        await heartbeat(conn, "no-such-rollout", None, 60)
    await finish_rollout(conn, got.rollout_id, "succeeded", 0.5, attempt=1)
    with pytest.raises(Conflict, match="not running"):
        await heartbeat(conn, got.rollout_id, 1, 60)
    status = await conn.fetchval(
        "SELECT status FROM rollout_attempts WHERE rollout_id = $1 AND attempt = 1", got.rollout_id
    )
    assert status == "succeeded"


async def test_a_finish_without_a_reward_gets_the_failed_reward(conn: asyncpg.Connection) -> None:
    await load(conn, group_size=1)
    a, b = await take(conn), await take(conn)
    assert isinstance(a, Handout) and isinstance(b, Handout)
    await finish_rollout(
        conn, a.rollout_id, "failed", attempt=a.attempt, failed_reward=0.25, metadata={"error": "boom"}
    )
    await finish_rollout(conn, b.rollout_id, "succeeded", attempt=b.attempt, failed_reward=0.25)
    rows = await conn.fetch("SELECT id, status, reward, metadata FROM rollouts ORDER BY id")
    by_id = {r["id"]: r for r in rows}
    assert (
        by_id[a.rollout_id]["reward"] == 0.25
        and json.loads(by_id[a.rollout_id]["metadata"])["error"] == "boom"
    )
    assert by_id[b.rollout_id]["reward"] == 0.25
    error = await conn.fetchval("SELECT error FROM rollout_attempts WHERE rollout_id = $1", a.rollout_id)
    assert error == "boom"


async def test_drained_only_when_nothing_is_left_or_running(conn: asyncpg.Connection) -> None:
    await load(conn, group_size=1)
    got = [await take(conn) for _ in range(6)]
    assert all(isinstance(g, Handout) for g in got)
    waiting = await take(conn)
    assert isinstance(waiting, Empty) and not waiting.drained
    for g in got:
        assert isinstance(g, Handout)
        await finish_rollout(conn, g.rollout_id, "succeeded", 1.0)
    drained = await take(conn)
    assert isinstance(drained, Empty) and drained.drained


async def add(
    conn: asyncpg.Connection, rid: str, group: str | None, size: int | None, status: str = "succeeded"
) -> None:
    await conn.execute(
        """INSERT INTO rollouts (id, group_id, group_size, status, reward, finished_at)
           VALUES ($1, $2, $3, $4, CASE WHEN $4 = 'running' THEN NULL ELSE 1 END,
                   CASE WHEN $4 = 'running' THEN NULL ELSE now() END)""",
        rid,
        group,
        size,
        status,
    )


async def test_a_group_with_a_declared_size_waits_for_all_of_it(conn: asyncpg.Connection) -> None:
    # Four sequential runs: after each, everything so far is finished, but the group is not.
    for i in range(3):
        await add(conn, f"g1-{i}", "g1", 4)
        assert await claim_groups(conn, "t", max_groups=8, lease_s=60, settle_s=0) is None
    await add(conn, "g1-3", "g1", 4)
    claim = await claim_groups(conn, "t", max_groups=8, lease_s=60, settle_s=0)
    assert claim is not None and sorted(claim.rollout_ids) == [f"g1-{i}" for i in range(4)]


async def test_a_group_of_unknown_size_waits_until_it_settles(conn: asyncpg.Connection) -> None:
    await add(conn, "u-0", "u", None)
    await add(conn, "u-1", "u", None)
    await add(conn, "solo", None, None)  # no group: a group of one, complete at once
    claim = await claim_groups(conn, "t", max_groups=8, lease_s=60, settle_s=3600)
    assert claim is not None and claim.rollout_ids == ["solo"]
    await conn.execute("UPDATE rollouts SET finished_at = now() - interval '2 hours' WHERE group_id = 'u'")
    await add(conn, "u-2", "u", None, status="running")  # one still running holds it back
    assert await claim_groups(conn, "t", max_groups=8, lease_s=60, settle_s=3600) is None
    await conn.execute(
        "UPDATE rollouts SET status = 'succeeded', reward = 0, finished_at = now() - interval '2 hours' "
        "WHERE id = 'u-2'"
    )
    claim = await claim_groups(conn, "t", max_groups=8, lease_s=60, settle_s=3600)
    assert claim is not None and sorted(claim.rollout_ids) == ["u-0", "u-1", "u-2"]


async def test_calls_of_a_superseded_attempt_are_not_claimed(conn: asyncpg.Connection) -> None:
    await load(conn, group_size=1)
    got = await take(conn, lease_s=0)
    assert isinstance(got, Handout)
    await expire_leases(conn, max_attempts=3, failed_reward=0)
    again = await take(conn)
    assert isinstance(again, Handout) and again.attempt == 2
    for attempt in (1, 2):
        await conn.execute(
            """INSERT INTO llm_calls (span_id, rollout_id, seq, model, request, attempt,
                                      prompt_token_ids, completion_token_ids, completion_logprobs)
               VALUES ($1, $2, 0, 'policy', '{}', $3, '{1}', '{2}', '{-0.5}')""",
            f"span-{attempt}",
            got.rollout_id,
            attempt,
        )
    await finish_rollout(conn, got.rollout_id, "succeeded", 1.0, attempt=2)
    claim = await claim_groups(conn, "t", max_groups=8, lease_s=60, settle_s=0)
    assert claim is not None
    [rollout] = [r for r in claim.rollouts if r.id == got.rollout_id]
    assert [c["span_id"] for c in rollout.calls] == ["span-2"]
    # Both are still there for SQL.
    assert await conn.fetchval("SELECT count(*) FROM llm_calls WHERE rollout_id = $1", got.rollout_id) == 2


async def test_reward_by_version_gives_the_curve(conn: asyncpg.Connection) -> None:
    await load(conn, group_size=1)
    await ensure_val_round(conn, "sums", "policy", 0)
    for _ in range(5):
        got = await take(conn, ("val", "train"))
        assert isinstance(got, Handout)
        await finish_rollout(conn, got.rollout_id, "succeeded", 1.0 if got.split == "val" else 0.5)
    rows = await conn.fetch("SELECT * FROM reward_by_version WHERE dataset = 'sums'")
    assert len(rows) == 1
    row = rows[0]
    assert (row["policy_version"], row["val_rollouts"], row["train_rollouts"]) == (0, 3, 2)
    assert (row["val_reward"], row["train_reward"]) == (1.0, 0.5)


async def test_a_stopped_dataset_lets_started_groups_finish_and_makes_no_new_ones(
    conn: asyncpg.Connection,
) -> None:
    await load(conn, group_size=2)
    started = await take(conn)  # one rollout of the first group: that group is started
    assert isinstance(started, Handout)
    assert isinstance(await take(conn), Handout)  # the second of the first group
    await ensure_val_round(conn, "sums", "policy", 0)
    # The queue made more groups ahead (a batch); none of them was handed out: they go.
    unstarted = await conn.fetchrow(
        "SELECT count(*) AS rollouts, count(DISTINCT group_id) AS groups FROM rollouts "
        "WHERE mode = 'train' AND group_id <> $1",
        started.group_id,
    )
    assert unstarted["groups"] >= 1
    epochs_before = await conn.fetchval("SELECT sum(epochs_started) FROM tasks WHERE dataset = 'sums'")
    assert await stop_dataset(conn, "sums") == unstarted["rollouts"]
    assert await stop_dataset(conn, "sums") == 0  # stopping again changes nothing
    left = await conn.fetch("SELECT DISTINCT group_id FROM rollouts WHERE mode = 'train'")
    assert [r["group_id"] for r in left] == [started.group_id]
    # The discarded groups' tasks get their epoch back, so that resuming starts them again.
    assert await conn.fetchval("SELECT sum(epochs_started) FROM tasks WHERE dataset = 'sums'") == (
        epochs_before - unstarted["groups"]
    )
    # Val rounds still run; no new train group is made; once done, the queue is drained.
    for _ in range(3):
        got = await take(conn, ("val", "train"))
        assert isinstance(got, Handout) and got.split == "val"
        await finish_rollout(conn, got.rollout_id, "succeeded", 1.0, attempt=got.attempt)
    waiting = await take(conn)
    assert isinstance(waiting, Empty) and not waiting.drained  # the started group is running
    for rid in await conn.fetch("SELECT id, attempt FROM rollouts WHERE group_id = $1", started.group_id):
        await finish_rollout(conn, rid["id"], "succeeded", 0.5, attempt=rid["attempt"])
    drained = await take(conn)
    assert isinstance(drained, Empty) and drained.drained
    [progress] = await dataset_progress(conn, "sums")
    train = progress.splits["train"]
    assert train.stopped and train.planned == train.done == 2
    # Loading into it again resumes it.
    await load_tasks(conn, "sums", "train", TRAIN[:1], group_size=2, policy="policy")
    assert isinstance(await take(conn), Handout)
    with pytest.raises(NotFound):
        await stop_dataset(conn, "nope")


async def test_training_progress_follows_steps_val_rounds_and_served_calls(conn: asyncpg.Connection) -> None:
    await load(conn, group_size=1)
    await ensure_val_round(conn, "sums", "policy", 0)
    for _ in range(4):
        got = await take(conn, ("val", "train"))
        assert isinstance(got, Handout)
        await finish_rollout(conn, got.rollout_id, "succeeded", 1.0 if got.split == "val" else 0.0)
    progress = await training_progress(conn, "sums")
    # One batch of groups of one was made; one of them finished, none was trained.
    assert (progress.steps, progress.finished, progress.train_open) == (0, 4, GROUP_BATCH)
    [round0] = progress.val_rounds
    assert (round0.version, round0.rollouts, round0.finished, round0.mean_reward) == (0, 3, 3, 1.0)
    assert round0.complete and progress.calls_by_version == {}
