"""Claims of whole groups, with SKIP LOCKED, leases that lapse, and consumption recorded together
with the training step."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime

import asyncpg
import pytest

from lightloop.store import (
    ClaimLost,
    StepRecord,
    claim_groups,
    extend_claim,
    record_step,
    release_claim,
    release_expired,
)
from lightloop.store.database import dsn


async def add_rollout(
    conn: asyncpg.Connection,
    rid: str,
    group: str | None,
    *,
    status: str = "succeeded",
    reward: float | None = 1.0,
    mode: str = "train",
    calls: int = 0,
) -> None:
    await conn.execute(
        """INSERT INTO rollouts (id, group_id, status, reward, mode, finished_at)
           VALUES ($1, $2, $3, $4, $5, CASE WHEN $3 = 'running' THEN NULL ELSE now() END)""",
        rid,
        group,
        status,
        reward,
        mode,
    )
    for seq in range(calls):
        await conn.execute(
            """INSERT INTO llm_calls (span_id, rollout_id, seq, model, request, prompt_token_ids,
                                      completion_token_ids, completion_logprobs)
               VALUES ($1, $2, $3, 'policy', '{}', '{1,2}', '{3}', '{-0.1}')""",
            f"{rid}-{seq}",
            rid,
            seq,
        )


def step(**kw: object) -> StepRecord:
    return StepRecord(started_at=datetime.now(UTC), **kw)  # type: ignore[arg-type]


async def test_claims_whole_groups_with_their_calls(conn: asyncpg.Connection) -> None:
    for i in range(3):
        await add_rollout(conn, f"a{i}", "A", reward=float(i), calls=2)
    await add_rollout(conn, "b0", "B")
    await add_rollout(conn, "b1", "B", status="running", reward=None)  # B is not finished
    await add_rollout(conn, "c0", "C", reward=None, status="failed")  # C has no reward yet
    await add_rollout(conn, "v0", "V", mode="val")  # validation rollouts are never trained on
    await add_rollout(conn, "solo", None)  # no group: a group of its own

    claim = await claim_groups(conn, "t1", max_groups=10, lease_s=60, settle_s=0)
    assert claim is not None
    assert set(claim.groups()) == {"A", "solo"}
    assert sorted(claim.rollout_ids) == ["a0", "a1", "a2", "solo"]
    a1 = next(r for r in claim.rollouts if r.id == "a1")
    assert a1.reward == 1.0
    assert [c["seq"] for c in a1.calls] == [0, 1]
    assert a1.calls[0]["prompt_token_ids"] == [1, 2]
    # Claimed rollouts are not claimed again while the lease holds.
    assert await claim_groups(conn, "t2", max_groups=10, lease_s=60, settle_s=0) is None


async def test_max_groups_limits_the_claim(conn: asyncpg.Connection) -> None:
    for g in range(5):
        for i in range(2):
            await add_rollout(conn, f"{g}-{i}", f"g{g}")
    claim = await claim_groups(conn, "t1", max_groups=2, lease_s=60, settle_s=0)
    assert claim is not None
    assert len(claim.groups()) == 2 and len(claim.rollouts) == 4
    with pytest.raises(ValueError, match="max_groups"):
        await claim_groups(conn, "t1", max_groups=0, lease_s=60, settle_s=0)


async def test_record_step_consumes_atomically(conn: asyncpg.Connection) -> None:
    await add_rollout(conn, "r1", "G")
    await add_rollout(conn, "r2", "G")
    claim = await claim_groups(conn, "t1", max_groups=1, lease_s=60, settle_s=0)
    assert claim is not None
    step_id = await record_step(conn, claim, step(loss=0.5, reward_mean=1.0, metrics={"merges": 3}))
    rows = await conn.fetch("SELECT consumed_by_step, claimed_by FROM rollouts ORDER BY id")
    assert [tuple(r) for r in rows] == [(step_id, None), (step_id, None)]
    s = await conn.fetchrow("SELECT * FROM training_steps WHERE step = $1", step_id)
    assert s["n_rollouts"] == 2 and s["loss"] == 0.5 and s["trainer"] == "t1"
    assert json.loads(s["metrics"]) == {"merges": 3}
    assert s["finished_at"] is not None
    assert await claim_groups(conn, "t2", max_groups=1, lease_s=60, settle_s=0) is None


async def test_a_stale_claim_is_released_and_the_late_trainer_loses(conn: asyncpg.Connection) -> None:
    await add_rollout(conn, "r1", "G")
    # A lease of zero seconds has lapsed by the next statement: the trainer "died".
    stale = await claim_groups(conn, "dead-trainer", max_groups=1, lease_s=0, settle_s=0)
    assert stale is not None
    fresh = await claim_groups(conn, "t2", max_groups=1, lease_s=60, settle_s=0)
    assert fresh is not None and fresh.rollout_ids == ["r1"]
    # The first trainer comes back: its step must not be recorded, and nothing changes.
    with pytest.raises(ClaimLost):
        await record_step(conn, stale, step())
    with pytest.raises(ClaimLost):
        await extend_claim(conn, stale, 60)
    assert await conn.fetchval("SELECT count(*) FROM training_steps") == 0
    assert await conn.fetchval("SELECT claimed_by FROM rollouts WHERE id = 'r1'") == "t2"
    await record_step(conn, fresh, step())


async def test_release_and_release_expired(conn: asyncpg.Connection) -> None:
    await add_rollout(conn, "r1", "G")
    await add_rollout(conn, "r2", "H")
    claim = await claim_groups(conn, "t1", max_groups=1, lease_s=60, settle_s=0)
    assert claim is not None
    assert await release_claim(conn, claim) == 1
    expired = await claim_groups(conn, "t1", max_groups=2, lease_s=0, settle_s=0)
    assert expired is not None and len(expired.rollouts) == 2
    assert await release_expired(conn) == 2
    assert await conn.fetchval("SELECT count(*) FROM rollouts WHERE claimed_by IS NOT NULL") == 0


async def test_extend_claim_moves_the_lease(conn: asyncpg.Connection) -> None:
    await add_rollout(conn, "r1", "G")
    claim = await claim_groups(conn, "t1", max_groups=1, lease_s=1, settle_s=0)
    assert claim is not None
    later = await extend_claim(conn, claim, 3600)
    assert (later - claim.expires_at).total_seconds() > 3000


_CLAIMER = """
import asyncio, json, sys
import asyncpg
from datetime import UTC, datetime
from lightloop.store import claim_groups, record_step, StepRecord

async def main(url, name):
    conn = await asyncpg.connect(url)
    print("ready", flush=True)
    sys.stdin.readline()  # both start together
    taken = []
    while True:
        claim = await claim_groups(conn, name, max_groups=2, lease_s=60, settle_s=0)
        if claim is None:
            break
        await record_step(conn, claim, StepRecord(started_at=datetime.now(UTC)))
        taken.append(sorted(claim.groups()))
    print(json.dumps(taken))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_two_processes_never_claim_the_same_rollout(db_url: str, conn: asyncpg.Connection) -> None:
    groups = 300
    await conn.executemany(
        "INSERT INTO rollouts (id, group_id, status, reward, finished_at)"
        " VALUES ($1, $2, 'succeeded', 1, now())",
        [(f"g{g}-{i}", f"g{g}") for g in range(groups) for i in range(4)],
    )
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 - two real claimer processes are the point of this test
            [sys.executable, "-c", _CLAIMER, dsn(db_url), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("w1", "w2")
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    outs = await asyncio.gather(*(asyncio.to_thread(p.communicate, "go\n") for p in procs))
    assert all(p.returncode == 0 for p in procs)
    taken = [[g for batch in json.loads(out) for g in batch] for out, _ in outs]
    # Both took part (the race is real), and no group went to both.
    assert taken[0] and taken[1]
    assert not set(taken[0]) & set(taken[1])
    assert len(taken[0]) + len(taken[1]) == groups
    assert set(taken[0]) | set(taken[1]) == {f"g{g}" for g in range(groups)}
    # Whole groups only: every group was consumed by exactly one step.
    split = await conn.fetchval(
        "SELECT count(*) FROM (SELECT group_id FROM rollouts GROUP BY group_id "
        "HAVING count(DISTINCT consumed_by_step) <> 1 OR bool_or(consumed_by_step IS NULL)) s"
    )
    assert split == 0
