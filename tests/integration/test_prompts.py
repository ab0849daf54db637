"""Versioned prompts in a real Postgres: the baseline, staged versions, one live version, scopes,
bad input; an optimisation run's evaluations, handed out only to that run and never claimed for
training; and the proxy's registry swapping a baseline for the version chosen for a rollout."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from lightloop.proxy.errors import DatabaseDown
from lightloop.proxy.prompts import PromptRegistry
from lightloop.store import Conflict, NotFound, claim_groups, connect, create_pool
from lightloop.store import prompt_runs as runs
from lightloop.store.prompts import add_candidate, add_prompt, get_versions, served_prompts, set_live
from lightloop.store.queue import Empty, next_rollout

BASELINE = "You are a helpful assistant."


async def test_a_prompt_has_a_live_baseline_then_staged_versions(conn: asyncpg.Connection) -> None:
    v0, new = await add_prompt(conn, "system", f"  {BASELINE}\n", agent="solver")
    assert (v0.version, v0.status, v0.origin, new) == (0, "live", "baseline", True)
    v1, new = await add_prompt(conn, "system", "Be brief.")
    assert (v1.version, v1.status, v1.origin, new) == (1, "staged", "manual", True)
    same, new = await add_prompt(conn, "system", "Be brief.")
    assert (same.version, new) == (1, False)  # the same text is the same version
    with pytest.raises(Conflict, match="--agent 'solver'"):
        await add_prompt(conn, "system", "x", agent="checker")
    with pytest.raises(ValueError, match="not valid"):
        await add_prompt(conn, "bad name!", "x")
    with pytest.raises(ValueError, match="empty"):
        await add_prompt(conn, "blank", " \n ")
    live = await set_live(conn, "system", 1)
    assert live.status == "live"
    assert [v.status for v in await get_versions(conn, "system")] == ["retired", "live"]
    (served,) = await served_prompts(conn)
    assert (served.baseline, served.live_version, served.live_text, served.agent) == (
        BASELINE,
        1,
        "Be brief.",
        "solver",
    )
    with pytest.raises(NotFound, match="no version 7"):
        await set_live(conn, "system", 7)
    with pytest.raises(NotFound, match="not registered"):
        await set_live(conn, "nope", 0)
    with pytest.raises(NotFound):
        await get_versions(conn, "nope")


async def _dataset(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO datasets (name, policy) VALUES ('d', 'policy')")
    await conn.execute(
        "INSERT INTO tasks (dataset, split, id, input) "
        "VALUES ('d', 'val', 'a', '{}'), ('d', 'val', 'b', '{}'), ('d', 'train', 'c', '{}')"
    )


async def _run(conn: asyncpg.Connection, run_id: str = "po-1") -> Any:
    return await runs.start_run(
        conn,
        run_id=run_id,
        name="system",
        dataset="d",
        train_split="train",
        val_split="val",
        agent="agent.py:solve",
        reflection_model="m",
        budget=10,
        seed=0,
        start_version=0,
        policy_version=0,
        train_tasks=["c"],
        val_tasks=["a", "b"],
    )


def _take(conn: asyncpg.Connection, prompt_run: str | None, splits: tuple[str, ...] = ("val",)) -> Any:
    return next_rollout(
        conn,
        wanted={"d": "policy"},
        splits=splits,
        worker="w",
        lease_s=60,
        live=lambda _p: 0,
        max_groups=lambda _p: None,
        prompt_run=prompt_run,
    )


async def test_evaluations_go_to_their_run_only_once_each_and_are_never_trained(
    conn: asyncpg.Connection,
) -> None:
    await _dataset(conn)
    await add_prompt(conn, "system", BASELINE)
    run = await _run(conn)
    v1, _ = await add_candidate(conn, "system", "Be brief.", parent=0, run_id=run.id)
    assert await runs.enqueue_evaluations(conn, run, v1.version, "val", ["a", "b"]) == 2
    assert await runs.enqueue_evaluations(conn, run, v1.version, "val", ["a", "b"]) == 0  # once each
    # Ordinary runners never see them, and another run's runners neither.
    assert isinstance(await _take(conn, None), Empty)
    with pytest.raises(NotFound, match="po-other"):
        await _take(conn, "po-other")
    got = await _take(conn, run.id)
    assert (got.prompt_name, got.prompt_version, got.split) == ("system", v1.version, "val")
    second = await _take(conn, run.id)
    drained = await _take(conn, run.id)
    assert isinstance(drained, Empty) and not drained.drained  # two running: more may come
    for rollout, reward in ((got, 1.0), (second, 0.0)):
        await conn.execute(
            "UPDATE rollouts SET status = 'succeeded', reward = $2, finished_at = now(), "
            'metadata = metadata || \'{"feedback": "ok"}\' WHERE id = $1',
            rollout.rollout_id,
            reward,
        )
    # Between its batches a running optimisation is not drained (helpers wait); ended, it is.
    waiting = await _take(conn, run.id)
    assert isinstance(waiting, Empty) and not waiting.drained
    await runs.end_run(conn, run.id, "finished", best_version=None)
    drained = await _take(conn, run.id)
    assert isinstance(drained, Empty) and drained.drained
    found = await runs.evaluations(conn, run.id, v1.version, "val", ["a", "b"])
    assert {t: (e.reward, e.feedback) for t, e in found.items()} == {"a": (1.0, "ok"), "b": (0.0, "ok")} or {
        t: (e.reward, e.feedback) for t, e in found.items()
    } == {"a": (0.0, "ok"), "b": (1.0, "ok")}
    # Finished val-mode evaluations of train tasks would be claimable if they were not a run's.
    await runs.enqueue_evaluations(conn, run, v1.version, "train", ["c"])
    await conn.execute(
        "UPDATE rollouts SET status = 'succeeded', reward = 1, finished_at = now() - interval '1 hour' "
        "WHERE prompt_run = $1 AND mode = 'train'",
        run.id,
    )
    assert await claim_groups(conn, "trainer", max_groups=10, lease_s=60, settle_s=0) is None
    # reward_by_version leaves them out; reward_by_prompt_version counts them apart, and a
    # rollout counts under the prompt version its calls were served.
    assert await conn.fetch("SELECT * FROM reward_by_version") == []
    await conn.execute(
        "INSERT INTO rollouts (id, mode, status, reward, finished_at) "
        "VALUES ('free', 'val', 'succeeded', 0.5, now())"
    )
    for span, rollout, version in (("s1", got.rollout_id, v1.version), ("s2", "free", 0), ("s3", "free", 0)):
        await conn.execute(
            "INSERT INTO llm_calls (span_id, rollout_id, seq, model, request, prompt_name, prompt_version) "
            "VALUES ($1, $2, 0, 'policy', '{}', 'system', $3)",
            span,
            rollout,
            version,
        )
    rows = await conn.fetch(
        "SELECT prompt_version, val_reward, val_rollouts, evaluations FROM reward_by_prompt_version "
        "ORDER BY prompt_version"
    )
    assert [tuple(r) for r in rows] == [(0, 0.5, 1, 0), (v1.version, 1.0, 1, 1)]


async def test_baseline_seen_counts_recent_calls_of_the_scope(conn: asyncpg.Connection) -> None:
    await add_prompt(conn, "system", BASELINE, agent="solver")
    await conn.execute("INSERT INTO rollouts (id) VALUES ('r1')")
    for seq, (agent, content) in enumerate(
        (
            ("solver", [{"type": "text", "text": f"\n{BASELINE} "}]),  # parts, surrounding space
            ("solver", "You are a helpful assistant. Also be brief."),  # contains it: no match
            ("other", BASELINE),  # another agent
        )
    ):
        await conn.execute(
            "INSERT INTO llm_calls (span_id, rollout_id, seq, model, agent, request) "
            "VALUES ($1, 'r1', $2, 'm', $3, $4)",
            f"s{seq}",
            seq,
            agent,
            json.dumps(
                {"messages": [{"role": "system", "content": content}, {"role": "user", "content": "hi"}]}
            ),
        )
    assert await runs.baseline_seen(conn, "system", BASELINE, "solver", None, 1000) == (2, 1)
    assert await runs.baseline_seen(conn, "system", BASELINE, "nobody", None, 1000) == (0, 0)


def _pool(url: str) -> Any:
    made: list[asyncpg.Pool] = []

    async def pool() -> asyncpg.Pool:
        if not made:
            made.append(await create_pool(url, min_size=0, max_size=2))
        return made[0]

    return pool


async def test_the_registry_swaps_only_whole_baselines_for_the_rollouts_version(
    conn: asyncpg.Connection, db_url: str
) -> None:
    await _dataset(conn)
    # Scoped to an agent the queue's runner never names: a pinned evaluation is served anyway.
    await add_prompt(conn, "system", BASELINE, model="policy", agent="solver")
    await add_prompt(conn, "system", "Live text.")
    await set_live(conn, "system", 1)
    run = await _run(conn)
    v2, _ = await add_candidate(conn, "system", "Candidate text.", parent=1, run_id=run.id)
    await runs.enqueue_evaluations(conn, run, v2.version, "val", ["a"])
    pinned = await _take(conn, run.id)
    registry = PromptRegistry(db_url, _pool(db_url), retry_interval_s=0.1)
    await registry.reload()

    def body(content: Any) -> dict[str, Any]:
        return {"messages": [{"role": "system", "content": content}, {"role": "user", "content": "q"}]}

    plain = body(f"{BASELINE}\n")
    swap = await registry.swap(plain, "policy", "solver", "ordinary-rollout")
    assert (swap.name, swap.version) == ("system", 1) and plain["messages"][0]["content"] == "Live text."
    parts = body([{"type": "text", "text": BASELINE}, {"type": "image_url", "image_url": {"url": "x"}}])
    swap = await registry.swap(parts, "policy", None, pinned.rollout_id)
    assert swap.version == v2.version and parts["messages"][0]["content"][0]["text"] == "Candidate text."
    assert parts["messages"][0]["content"][1]["type"] == "image_url"
    for untouched in (body(f"{BASELINE} And more."), body("hello")):
        before = repr(untouched)
        assert await registry.swap(untouched, "policy", "solver", None) is None
        assert repr(untouched) == before
    assert await registry.swap(body(BASELINE), "gpt-4o", "solver", None) is None  # another model
    assert await registry.swap(body(BASELINE), "policy", "checker", None) is None  # another agent
    # An evaluation's pin that cannot be read is a 503 to retry, never the wrong text; every
    # other call is served from memory, Postgres or not.
    down = PromptRegistry(
        "postgresql://nobody@127.0.0.1:1/none", _pool("postgresql://nobody@127.0.0.1:1/none"), 0.1
    )
    with pytest.raises(DatabaseDown, match="not read yet"):
        await down.swap(body(BASELINE), "policy", "solver", "p-before-the-first-read")
    down.set_prompts(await served_prompts(conn))
    with pytest.raises(DatabaseDown, match="retry"):
        await down.swap(body(BASELINE), "policy", "solver", "p-unknown")
    served = body(BASELINE)
    assert (await down.swap(served, "policy", "solver", "ordinary")).version == 1


async def test_the_registry_follows_set_live_at_once(conn: asyncpg.Connection, db_url: str) -> None:
    await add_prompt(conn, "system", BASELINE)
    await add_prompt(conn, "system", "Second.")
    registry = PromptRegistry(db_url, _pool(db_url), retry_interval_s=0.1, reread_s=3600)  # NOTIFY only
    await registry.start()
    try:
        await registry.loaded.wait()
        assert registry.text_for("system").live_version == 0
        registry.changed.clear()
        other = await connect(db_url)  # another process's change, as `lightloop prompts set-live`
        await set_live(other, "system", 1)
        await other.close()
        await asyncio.wait_for(registry.changed.wait(), 10)  # the NOTIFY's reload
        assert registry.text_for("system").live_version == 1
    finally:
        await registry.close()
