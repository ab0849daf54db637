"""Tasks and runners against real processes: `lightloop engine --model tiny`, the proxy, Postgres,
`lightloop tasks load` and `lightloop run`, and the trainer taking the groups they make."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import LIGHTLOOP, REPO
from tests.e2e.conftest import Proxy, clean_env, eventually, start_proxy
from tests.e2e.test_proxy import sql
from tests.e2e.test_trainer import trainer_for

AGENTS = "tests/support/agents.py"
pytestmark = pytest.mark.timeout(300)


def cli_env(home: Path, db_url: str, **extra: str) -> dict[str, str]:
    return {**clean_env(), "LIGHTLOOP_HOME": str(home), "LIGHTLOOP_DATABASE_URL": db_url, **extra}


def lightloop(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LIGHTLOOP, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def write_tasks(path: Path, n: int) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"t{i}", "question": f"What is {i} + 1?"}) + "\n" for i in range(n))
    )
    return path


def run_agent(proxy: Proxy, env: dict[str, str], agent: str, *args: str) -> subprocess.CompletedProcess[str]:
    return lightloop(
        env, "run", f"{AGENTS}:{agent}", "--proxy", proxy.url, "--key", proxy.key, "--quiet", *args
    )


@pytest.fixture
def stack(tmp_path: Path, engine: str, db_url: str) -> Any:
    proxy = start_proxy(
        tmp_path / "home",
        db_url,
        {"policy": [{"name": "policy", "base_model": "tiny", "upstreams": [engine]}]},
        extra_env={"LIGHTLOOP_QUEUE__LEASE_S": "2", "LIGHTLOOP_QUEUE__REAP_INTERVAL_S": "0.2"},
    )
    try:
        yield proxy, cli_env(tmp_path / "home", db_url)
    finally:
        proxy.stop()


def test_a_dataset_runs_through_the_runner_and_trains_as_whole_groups(
    stack: tuple[Proxy, dict[str, str]], tmp_path: Path, db_url: str, engine_home: Path, engine: str
) -> None:
    proxy, env = stack
    loaded = lightloop(
        env, "tasks", "load", str(write_tasks(tmp_path / "t.jsonl", 3)), "--dataset", "d", "--group-size", "4"
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "3 tasks added" in loaded.stdout
    # Concurrency 1: the four rollouts of a task run one after another, and still form one group.
    done = run_agent(proxy, env, "one_call", "--dataset", "d", "--concurrency", "1")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "12 finished" in done.stdout
    rows = sql(db_url, "SELECT status, group_size, attempt, reward FROM rollouts WHERE dataset = 'd'")
    assert len(rows) == 12 and {(r["status"], r["group_size"], r["attempt"]) for r in rows} == {
        ("succeeded", 4, 1)
    }
    calls = sql(
        db_url,
        "SELECT c.attempt, c.policy_version, cardinality(c.completion_token_ids) AS n FROM llm_calls c "
        "JOIN rollouts r ON r.id = c.rollout_id WHERE r.dataset = 'd'",
    )
    assert len(calls) == 12 and all(c["attempt"] == 1 and c["n"] > 0 for c in calls)
    listing = lightloop(env, "tasks", "list", "--json")
    [train] = [s for s in json.loads(listing.stdout) if s["split"] == "train"]
    assert (train["tasks"], train["done"], train["planned"], train["queued"]) == (3, 12, 12, 0)

    trainer = trainer_for(db_url, engine_home, [engine], tmp_path / "checkpoints", groups_per_step=2)
    try:

        async def three_steps() -> list[Any]:
            # One event loop: the publisher's HTTP clients belong to it.
            return [await trainer.step_once() for _ in range(3)]

        first, second, third = asyncio.run(three_steps())
        assert first is not None and first.n_rollouts == 8
        assert second is not None and second.n_rollouts == 4
        assert third is None
        # No group was split between steps; every consumed group has its declared size.
        split_groups = sql(
            db_url,
            "SELECT group_id FROM rollouts WHERE dataset = 'd' GROUP BY group_id "
            "HAVING count(DISTINCT consumed_by_step) <> 1 OR count(*) <> max(group_size)",
        )
        assert split_groups == []
    finally:
        for version in (1, 2):
            httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": f"policy-v{version}"})


def test_sequential_free_traffic_with_a_declared_size_trains_as_one_group(
    stack: tuple[Proxy, dict[str, str]], tmp_path: Path, db_url: str, engine_home: Path, engine: str
) -> None:
    """The issue's report: an ordinary SDK agent runs one task four times, one after another."""
    proxy, _ = stack
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.key, max_retries=0)
    trainer = trainer_for(db_url, engine_home, [engine], tmp_path / "checkpoints", group_settle_s=3600)
    try:

        async def play() -> Any:
            # One event loop: the publisher's HTTP clients belong to it.
            for k in range(4):
                rollout = f"seq-{k}"
                await client.chat.completions.create(
                    model="policy",
                    messages=[{"role": "user", "content": "What is 2 + 2?"}],
                    max_tokens=3,
                    extra_headers={
                        "X-Lightloop-Rollout": rollout,
                        "X-Lightloop-Group": "g1",
                        "X-Lightloop-Group-Size": "4",
                    },
                )
                async with httpx.AsyncClient() as http:
                    finished = await http.post(
                        f"{proxy.url}/v1/rollouts/{rollout}/finish",
                        json={"status": "succeeded", "reward": float(k % 2)},
                        headers=proxy.headers,
                    )
                assert finished.status_code == 200
                if k < 3:
                    # Everything so far is finished, yet the group is not complete: nothing to claim.
                    assert await trainer.step_once() is None
            return await trainer.step_once()

        outcome = asyncio.run(play())
        assert outcome is not None and outcome.n_rollouts == 4 and outcome.n_samples == 4
        assert outcome.metrics["flat_groups"] == 0
    finally:
        httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": "policy-v1"})


def test_a_killed_runner_s_rollouts_are_handed_out_again_and_completed(
    stack: tuple[Proxy, dict[str, str]], tmp_path: Path, db_url: str
) -> None:
    proxy, env = stack
    assert (
        lightloop(
            env,
            "tasks",
            "load",
            str(write_tasks(tmp_path / "t.jsonl", 2)),
            "--dataset",
            "k",
            "--group-size",
            "3",
        ).returncode
        == 0
    )
    dead = subprocess.Popen(
        [
            LIGHTLOOP,
            "run",
            f"{AGENTS}:hang",
            "--dataset",
            "k",
            "--proxy",
            proxy.url,
            "--key",
            proxy.key,
            "--quiet",
            "--concurrency",
            "2",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Both of its rollouts made their call and are still running.
        eventually(
            lambda: (
                len(
                    sql(
                        db_url,
                        "SELECT DISTINCT c.rollout_id FROM llm_calls c "
                        "JOIN rollouts r ON r.id = c.rollout_id "
                        "WHERE r.dataset = 'k' AND r.status = 'running'",
                    )
                )
                == 2
            ),
            timeout_s=120,
            what="the first runner's rollouts to be running",
        )
    finally:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
    done = run_agent(proxy, env, "one_call", "--dataset", "k", "--concurrency", "2")
    assert done.returncode == 0, done.stderr
    per_task = sql(
        db_url,
        "SELECT task_id, count(*) FILTER (WHERE status = 'succeeded') AS ok, count(*) AS n "
        "FROM rollouts WHERE dataset = 'k' GROUP BY 1",
    )
    assert sorted((r["ok"], r["n"]) for r in per_task) == [(3, 3), (3, 3)]
    attempts = sql(
        db_url, "SELECT attempt, status, worker FROM rollout_attempts ORDER BY rollout_id, attempt"
    )
    superseded = [a for a in attempts if a["status"] == "superseded"]
    assert len(superseded) == 2 and all(a["attempt"] == 1 for a in superseded)
    assert len({a["worker"].rsplit(":", 1)[0] for a in superseded}) == 1  # the dead runner's
    assert sum(a["status"] == "succeeded" for a in attempts) == 6
    # The dead attempts' calls are kept for SQL; the retried rollouts made their own.
    kept = sql(
        db_url,
        "SELECT count(*) FROM llm_calls c JOIN rollouts r ON r.id = c.rollout_id WHERE r.dataset = 'k'",
    )
    assert kept[0][0] == 8
    # The dead attempt's report, arriving late, changes nothing.
    late = superseded_rollout = sql(
        db_url, "SELECT rollout_id FROM rollout_attempts WHERE status = 'superseded' LIMIT 1"
    )[0][0]
    answer = httpx.post(
        f"{proxy.url}/v1/rollouts/{late}/finish",
        json={"status": "failed", "attempt": 1},
        headers=proxy.headers,
    )
    assert answer.status_code == 409 and "superseded" in answer.json()["error"]["message"]
    assert sql(db_url, "SELECT status FROM rollouts WHERE id = $1", superseded_rollout)[0][0] == "succeeded"


def test_an_agent_that_raises_fails_its_rollout_and_the_run_goes_on(
    stack: tuple[Proxy, dict[str, str]], tmp_path: Path, db_url: str
) -> None:
    proxy, env = stack
    assert (
        lightloop(
            env,
            "tasks",
            "load",
            str(write_tasks(tmp_path / "t.jsonl", 2)),
            "--dataset",
            "e",
            "--group-size",
            "2",
        ).returncode
        == 0
    )
    done = run_agent(proxy, env, "raises", "--dataset", "e")
    assert done.returncode == 0, done.stderr
    rows = sql(db_url, "SELECT status, reward, metadata FROM rollouts WHERE dataset = 'e'")
    assert len(rows) == 4 and {(r["status"], r["reward"]) for r in rows} == {("failed", 0.0)}
    metadata = rows[0]["metadata"]
    assert "RuntimeError: agent bug on task" in metadata["error"] and "Traceback" in metadata["traceback"]
    # A reward that is not a number fails the rollout too, with the reason.
    assert (
        lightloop(
            env,
            "tasks",
            "load",
            str(write_tasks(tmp_path / "u.jsonl", 1)),
            "--dataset",
            "f",
            "--group-size",
            "1",
        ).returncode
        == 0
    )
    assert run_agent(proxy, env, "bad_return", "--dataset", "f").returncode == 0
    [row] = sql(db_url, "SELECT status, metadata FROM rollouts WHERE dataset = 'f'")
    assert row["status"] == "failed" and "return a float reward" in row["metadata"]["error"]
    # Async agents and --max-tasks.
    assert (
        lightloop(
            env,
            "tasks",
            "load",
            str(write_tasks(tmp_path / "v.jsonl", 3)),
            "--dataset",
            "g",
            "--group-size",
            "2",
        ).returncode
        == 0
    )
    assert run_agent(proxy, env, "async_one_call", "--dataset", "g", "--max-tasks", "3").returncode == 0
    statuses = sql(db_url, "SELECT status, count(*) FROM rollouts WHERE dataset = 'g' GROUP BY 1")
    counts = {r[0]: r[1] for r in statuses}
    # Exactly three taken; slots asking at once may each have started a group, always a whole one.
    assert counts["succeeded"] == 3 and set(counts) <= {"succeeded", "queued"}
    assert (counts["succeeded"] + counts.get("queued", 0)) % 2 == 0
    # An async agent that blocks its event loop past the lease keeps its lease: the runner's
    # heartbeats do not share that loop.
    loaded = lightloop(
        env, "tasks", "load", str(write_tasks(tmp_path / "w.jsonl", 1)), "--dataset", "h", "--group-size", "1"
    )
    assert loaded.returncode == 0
    assert run_agent(proxy, env, "async_blocks", "--dataset", "h").returncode == 0
    [row] = sql(db_url, "SELECT status, attempt FROM rollouts WHERE dataset = 'h'")
    assert (row["status"], row["attempt"]) == ("succeeded", 1)


def test_queue_routes_refuse_bad_input(stack: tuple[Proxy, dict[str, str]], tmp_path: Path) -> None:
    proxy, _ = stack
    post = lambda path, body: httpx.post(f"{proxy.url}{path}", json=body, headers=proxy.headers)  # noqa: E731
    missing = post("/v1/tasks/next", {"dataset": "nope"})
    assert missing.status_code == 404 and "lightloop tasks load" in missing.json()["error"]["message"]
    assert post("/v1/tasks/next", {"dataset": "nope", "split": "test"}).status_code == 400
    assert post("/v1/tasks/next", {"dataset": 7}).status_code == 400
    assert (
        httpx.post(f"{proxy.url}/v1/tasks/next", content=b"{not json", headers=proxy.headers).status_code
        == 400
    )
    assert httpx.post(f"{proxy.url}/v1/tasks/next", json={}).status_code == 401
    assert httpx.get(f"{proxy.url}/v1/tasks/next", headers=proxy.headers).status_code == 405
    assert post("/v1/rollouts/nope/heartbeat", {}).status_code == 404
    assert post("/v1/rollouts/nope/heartbeat", {"attempt": "one"}).status_code == 400
    assert post("/v1/rollouts/nope/finish", {"attempt": 0}).status_code == 400
    assert httpx.get(f"{proxy.url}/v1/datasets/nope", headers=proxy.headers).status_code == 404
    assert httpx.get(f"{proxy.url}/v1/datasets", headers=proxy.headers).json() == {"data": []}
    # Group sizes agents declare are checked too.
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.key, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="Group-Size"):
        client.chat.completions.create(
            model="policy",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Lightloop-Group-Size": "0"},
        )


def test_cli_bad_input_is_one_line(stack: tuple[Proxy, dict[str, str]], tmp_path: Path, db_url: str) -> None:
    proxy, env = stack
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "q": 1}\n\n{"id": "b", "q": 2\n')
    loaded = lightloop(env, "tasks", "load", str(bad), "--dataset", "bad")
    assert loaded.returncode == 1
    [line] = loaded.stderr.strip().splitlines()
    assert line.startswith(f"lightloop: error: {bad}:3: not valid JSON"), line
    assert sql(db_url, "SELECT count(*) FROM tasks")[0][0] == 0  # nothing loaded
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("id,question\na,1\nb,2,extra\n")
    loaded = lightloop(env, "tasks", "load", str(csv_file), "--dataset", "bad")
    assert loaded.returncode == 1 and f"{csv_file}:line 3: more fields" in loaded.stderr
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a"}\n{"id": "a"}\n')
    loaded = lightloop(env, "tasks", "load", str(dup), "--dataset", "bad")
    assert loaded.returncode == 1 and "already used at line 1" in loaded.stderr
    assert sql(db_url, "SELECT count(*) FROM tasks")[0][0] == 0

    for agent, why in (
        ("tests/support/nope.py:agent", "no such file"),
        (f"{AGENTS}:missing", "has no 'missing'"),
        (f"{AGENTS}:not_callable", "is not callable"),
        ("no_such_package.module:agent", "cannot import no_such_package.module"),
        ("no-colon", "AGENT must be"),
    ):
        ran = lightloop(env, "run", agent, "--dataset", "d", "--proxy", proxy.url, "--key", proxy.key)
        assert ran.returncode == 2, (agent, ran.stderr)
        assert len(ran.stderr.strip().splitlines()) == 1 and why in ran.stderr, ran.stderr
    unknown = run_agent(proxy, env, "one_call", "--dataset", "nope")
    assert unknown.returncode == 1 and "dataset 'nope' does not exist" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    gone = lightloop(
        env,
        "run",
        f"{AGENTS}:one_call",
        "--dataset",
        "d",
        "--proxy",
        "http://127.0.0.1:1",
        "--key",
        "k",
        "--retry-s",
        "1",
    )
    assert gone.returncode == 1 and "did not answer" in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1, gone.stderr


def test_ctrl_c_lets_running_rollouts_finish_and_a_second_abandons_them(
    stack: tuple[Proxy, dict[str, str]], tmp_path: Path, db_url: str
) -> None:
    proxy, env = stack
    assert (
        lightloop(
            env,
            "tasks",
            "load",
            str(write_tasks(tmp_path / "t.jsonl", 1)),
            "--dataset",
            "c",
            "--group-size",
            "2",
        ).returncode
        == 0
    )
    runner = subprocess.Popen(
        [
            LIGHTLOOP,
            "run",
            f"{AGENTS}:hang",
            "--dataset",
            "c",
            "--proxy",
            proxy.url,
            "--key",
            proxy.key,
            "--quiet",
            "--concurrency",
            "2",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        eventually(
            lambda: sql(db_url, "SELECT count(*) FROM llm_calls")[0][0] == 2, timeout_s=120, what="both calls"
        )
        runner.send_signal(signal.SIGINT)
        assert runner.stderr is not None
        assert (
            "stopping: no new rollouts; 2 running finish"
            in runner.stderr.readline() + runner.stderr.readline()
        )
        assert runner.poll() is None  # waiting for its rollouts
        runner.send_signal(signal.SIGINT)
        assert runner.wait(timeout=30) == 130
    finally:
        if runner.poll() is None:
            runner.kill()
    # Abandoned: their leases lapse and they go back to the queue as the next attempt.
    eventually(
        lambda: (
            sql(db_url, "SELECT count(*) FROM rollouts WHERE dataset = 'c' AND status = 'queued'")[0][0] == 2
        ),
        timeout_s=30,
        what="the abandoned rollouts to be re-queued",
    )


def test_the_demo_out_of_time_stops_its_dataset_and_leaves_no_work_behind(
    stack: tuple[Proxy, dict[str, str]], db_url: str
) -> None:
    from lightloop.demo import Demo

    proxy, _ = stack
    lines: list[str] = []
    # No trainer runs and no time is left: the demo stops its dataset at once, the v0 held-out
    # round and any started group finish, and the run ends instead of waiting for steps.
    demo = Demo(proxy.url, proxy.key, db_url, groups=2, tries=2, parallel=4, log=lines.append)
    curve = asyncio.run(demo.run(steps=3, minutes=0))
    assert any(line.startswith("version 0: held-out reward") for line in lines), lines
    assert any(line.startswith("time is up") for line in lines), lines
    assert [(r["policy_version"], r["val_rollouts"]) for r in curve] == [(0, 32)]
    left = sql(
        db_url,
        f"SELECT count(*) AS n FROM rollouts WHERE dataset = '{demo.dataset}' "
        "AND status IN ('queued', 'running')",
    )
    assert [dict(r) for r in left] == [{"n": 0}]
    [stopped] = sql(db_url, f"SELECT stopped_at IS NOT NULL AS s FROM datasets WHERE name = '{demo.dataset}'")
    assert stopped["s"] is True
