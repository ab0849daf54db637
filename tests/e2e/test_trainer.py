"""The trainer against real processes: `lightloop engine --model tiny`, the proxy, Postgres, and
a stub engine that refuses or stalls adapter loads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import yaml

from lightloop.models import load_model
from lightloop.settings import TrainerSettings
from lightloop.store.database import dsn
from lightloop.trainer import HttpEngine, LocalBackend, LocalConfig, Publisher, PublishError, Trainer
from tests.conftest import LIGHTLOOP
from tests.e2e.conftest import clean_env, eventually, start_proxy
from tests.e2e.test_proxy import sql
from tests.support.stub_engine import running_stub


def trainer_for(
    db_url: str,
    engine_home: Path,
    engines: list[str],
    root: Path,
    *,
    agents: tuple[str, ...] = (),
    learning_rate: float = 1e-3,
    **settings: Any,
) -> Trainer:
    """A trainer of `policy` on `tiny`, and of the adapters of `agents` (`policy-<agent>`)."""
    loaded = load_model("tiny", engine_home / "models")  # the same seeded weights the engine serves
    adapters = {agent: f"policy-{agent}" for agent in agents}
    backend = LocalBackend(
        loaded.model,
        loaded.tokenizer,
        LocalConfig(learning_rate=learning_rate, lora_rank=4, micro_batch_size=8),
        adapters=list(adapters.values()),
    )
    publisher = Publisher(
        "policy", "tiny", root, [HttpEngine(e) for e in engines], keep=2, agents=list(adapters.values())
    )
    config = TrainerSettings(**{"groups_per_step": 4, **settings})
    return Trainer(config, "policy", db_url, backend, publisher, name="test-trainer", agents=adapters)


def trainer_config(folder: Path, engine: str, agents: tuple[str, ...] = (), **trainer: Any) -> Path:
    """A lightloop.yaml for `lightloop trainer` on `tiny` against one engine, small steps; `agents`
    with adapters of their own."""
    config = folder / "lightloop.yaml"
    settings = {"model": "tiny", "poll_interval_s": 0.2, "groups_per_step": 4, "lora_rank": 4, **trainer}
    policy = [{"name": "policy", "base_model": "tiny", "upstreams": [engine], "agents": list(agents)}]
    config.write_text(yaml.safe_dump({"policy": policy, "trainer": settings}))
    return config


def play(
    proxy_url: str,
    key: str,
    groups: int = 2,
    per_group: int = 4,
    prefix: str = "",
    agents: tuple[str | None, ...] = (None,),
) -> None:
    """An agent: a few rollouts per task through the proxy, each finished with a reward; each
    rollout makes one call per entry of `agents` (None: no agent named)."""
    client = openai.OpenAI(base_url=f"{proxy_url}/v1", api_key=key, max_retries=0)
    for g in range(groups):
        for k in range(per_group):
            rollout = f"{prefix}task{g}-try{k}"
            for agent in agents:
                client.chat.completions.create(
                    model="policy",
                    messages=[{"role": "user", "content": f"Task {g}: say something."}],
                    max_tokens=6,
                    temperature=1.0,
                    extra_headers={
                        "X-Lightloop-Rollout": rollout,
                        "X-Lightloop-Group": f"task{g}",
                        "X-Lightloop-Group-Size": str(per_group),
                        **({"X-Lightloop-Agent": agent} if agent else {}),
                    },
                )
            done = httpx.post(
                f"{proxy_url}/v1/rollouts/{rollout}/finish",
                json={"status": "succeeded", "reward": float(k % 2)},
                headers={"authorization": f"Bearer {key}"},
            )
            assert done.status_code == 200


def test_one_step_publishes_a_version_the_engine_and_proxy_then_serve(
    tmp_path: Path, engine: str, engine_home: Path, db_url: str
) -> None:
    proxy = start_proxy(
        tmp_path / "home",
        db_url,
        {"policy": [{"name": "policy", "base_model": "tiny", "upstreams": [engine]}]},
    )
    try:
        play(proxy.url, proxy.key)
        trainer = trainer_for(db_url, engine_home, [engine], tmp_path / "checkpoints")
        outcome = asyncio.run(trainer.step_once())
        assert (
            outcome is not None
            and outcome.version == 1
            and outcome.n_rollouts == 8
            and outcome.n_samples == 8
        )
        # What the trainer computed matches what the engine served, token for token.
        assert outcome.metrics["serve_train_logprob_gap"] < 1e-2, outcome.metrics
        step = sql(db_url, "SELECT * FROM training_steps")[0]
        assert (step["policy_in"], step["policy_out"], step["n_rollouts"]) == (0, 1, 8)
        metrics = step["metrics"]
        assert (
            metrics["samples"] == 8 and metrics["skipped_no_token_ids"] == 0 and metrics["flat_groups"] == 0
        )
        assert (
            sql(db_url, "SELECT count(*) FROM rollouts WHERE consumed_by_step = $1", step["step"])[0][0] == 8
        )
        version = sql(db_url, "SELECT * FROM policy_versions WHERE policy = 'policy'")[0]
        assert version["status"] == "live" and version["training_step"] == step["step"]
        folder = tmp_path / "checkpoints" / "policy" / "v1"
        assert version["uri"] == folder.resolve().as_uri()
        manifest = json.loads((folder / "manifest.json").read_text())
        assert "adapter_model.safetensors" in manifest and len(version["sha256"]) == 64
        assert "policy-v1" in {m["id"] for m in httpx.get(f"{engine}/v1/models").json()["data"]}
        # The proxy switched at once (NOTIFY) and the next call is served and recorded as v1.
        eventually(
            lambda: httpx.get(f"{proxy.url}/health", headers=proxy.headers).json()["policies"]["policy"] == 1
        )
        client = openai.OpenAI(base_url=f"{proxy.url}/rollout/after/v1", api_key=proxy.key, max_retries=0)
        answer = client.chat.completions.create(
            model="policy", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert answer.model == "policy-v1"
        httpx.post(
            f"{proxy.url}/v1/rollouts/after/finish", json={"status": "succeeded"}, headers=proxy.headers
        )
        assert sql(db_url, "SELECT policy_version FROM llm_calls WHERE rollout_id = 'after'")[0][0] == 1
        # The engine loses the adapter (as a restarted engine comes back without it): the proxy
        # loads it again from policy_versions.uri, and the agent never sees the engine's 404.
        unloaded = httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": "policy-v1"})
        assert unloaded.status_code == 200, unloaded.text
        again = client.chat.completions.create(
            model="policy", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert again.model == "policy-v1"
        assert "policy-v1" in {m["id"] for m in httpx.get(f"{engine}/v1/models").json()["data"]}
        assert "loaded it again" in proxy.log_text()
        # Nothing left to claim: the next step waits.
        assert asyncio.run(trainer.step_once()) is None
    finally:
        proxy.stop()
        httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": "policy-v1"})


def test_lightloop_trainer_with_the_verl_backend_publishes_and_resumes(
    tmp_path: Path, engine: str, engine_home: Path, db_url: str
) -> None:
    """`backend: verl` runs VERL's actor worker in the trainer's process (FSDP2 on the CPU); its
    logprobs match the engine's, its adapter loads on the engine, and a restart resumes. The
    policy lists a planner with an adapter of its own: every rollout has a planner call and a
    call of the policy's, so each step trains both adapters (one VERL worker each) and
    publishes both, and the restart resumes both."""
    policy = {"name": "policy", "base_model": "tiny", "upstreams": [engine], "agents": {"planner": {}}}
    proxy = start_proxy(tmp_path / "home", db_url, {"policy": [policy]})
    config = tmp_path / "lightloop.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "policy": [policy],
                "trainer": {
                    "backend": "verl",
                    "model": str(engine_home / "models" / "tiny"),  # the weights the engine serves
                    "groups_per_step": 2,
                    "lora_rank": 4,
                    # Large enough that v1's logprobs are far from the base model's, so a
                    # restart that lost v1 would show in the second step's gap.
                    "learning_rate": 5e-2,
                    "poll_interval_s": 0.2,
                },
            }
        )
    )
    env = {**clean_env(), "LIGHTLOOP_HOME": str(tmp_path / "trainer-home"), "LIGHTLOOP_DATABASE_URL": db_url}

    def train_one_step() -> None:
        done = subprocess.run(
            [LIGHTLOOP, "--config", str(config), "trainer", "--max-steps", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]

    both = ("planner", None)
    health = lambda: httpx.get(f"{proxy.url}/health", headers=proxy.headers).json()["policies"]  # noqa: E731
    try:
        play(proxy.url, proxy.key, agents=both)
        train_one_step()
        (step,) = sql(db_url, "SELECT * FROM training_steps")
        assert (step["policy_in"], step["policy_out"], step["n_rollouts"]) == (0, 1, 8)
        # VERL's logprobs of the served tokens equal the engine's, token for token, per adapter.
        adapters = step["metrics"]["adapters"]
        for name in ("policy", "policy-planner"):
            assert adapters[name]["version_out"] == 1, adapters
            assert adapters[name]["serve_train_logprob_gap"] < 1e-2, adapters
        assert {"policy-v1", "policy-planner-v1"} <= {
            m["id"] for m in httpx.get(f"{engine}/v1/models").json()["data"]
        }
        eventually(lambda: health()["policy"] == health()["policy-planner"] == 1)
        # A new trainer process resumes both from v1: the agents' next rollouts, served by the
        # v1s, train with the same small gaps (a restart from the base weights, or with the two
        # adapters swapped, would not match their logprobs).
        play(proxy.url, proxy.key, prefix="again-", agents=both)
        train_one_step()
        second = sql(db_url, "SELECT * FROM training_steps ORDER BY step")[1]
        assert (second["policy_in"], second["policy_out"]) == (1, 2)
        adapters = second["metrics"]["adapters"]
        for name in ("policy", "policy-planner"):
            assert (adapters[name]["version_in"], adapters[name]["version_out"]) == (1, 2), adapters
            assert adapters[name]["serve_train_logprob_gap"] < 1e-2, adapters
        live = sql(
            db_url, "SELECT policy, version FROM policy_versions WHERE status = 'live' ORDER BY policy"
        )
        assert [tuple(r) for r in live] == [("policy", 2), ("policy-planner", 2)]
    finally:
        proxy.stop()
        for version in (1, 2):
            for name in ("policy", "policy-planner"):
                httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": f"{name}-v{version}"})


async def _seed(db_url: str, rollouts: int = 8) -> None:
    conn = await asyncpg.connect(dsn(db_url))
    try:
        for i in range(rollouts):
            rid = f"r{i}"
            await conn.execute(
                "INSERT INTO rollouts (id, group_id, group_size, status, reward, finished_at) "
                "VALUES ($1, $2, $3, 'succeeded', $4, now())",
                rid,
                f"g{i % 2}",
                rollouts // 2,
                float(i % 4 >= 2),
            )
            await conn.execute(
                "INSERT INTO llm_calls (span_id, rollout_id, seq, model, request, policy_version, "
                "prompt_token_ids, completion_token_ids, completion_logprobs) "
                "VALUES ($1, $2, 0, 'policy', '{}', 0, $3, $4, $5)",
                f"s{i}",
                rid,
                [1, 9690, 198, 2683],
                [100 + i, 200 + i],
                [-9.5, -9.8],
            )
    finally:
        await conn.close()


def test_an_engine_that_refuses_the_adapter_rolls_the_publish_back(
    tmp_path: Path, engine: str, engine_home: Path, db_url: str
) -> None:
    asyncio.run(_seed(db_url))
    with running_stub() as stub:
        stub.lora_status = 500
        trainer = trainer_for(db_url, engine_home, [engine, stub.url], tmp_path / "checkpoints")
        outcome = asyncio.run(trainer.step_once())
    assert outcome is not None and outcome.version == 0
    assert "refused adapter policy-v1" in outcome.metrics["publish_error"]
    version = sql(db_url, "SELECT status, reason FROM policy_versions")[0]
    assert version["status"] == "failed" and "HTTP 500" in version["reason"]
    # Loaded on the first engine, then unloaded again: no engine serves a version that is not live.
    assert "policy-v1" not in {m["id"] for m in httpx.get(f"{engine}/v1/models").json()["data"]}
    step = sql(db_url, "SELECT policy_in, policy_out FROM training_steps")[0]
    assert tuple(step) == (0, 0)


def test_a_slow_publish_keeps_the_claim_and_the_step_is_recorded(
    tmp_path: Path, engine_home: Path, db_url: str
) -> None:
    """The lease is renewed while the engines load the adapter, not only during the update: a
    lease lost after the version went live would hand its rollouts to another step."""
    asyncio.run(_seed(db_url))
    expired_while_publishing = []
    with running_stub() as stub, concurrent.futures.ThreadPoolExecutor(1) as pool:
        stub.lora_delay_s = 4.0  # four leases long
        trainer = trainer_for(db_url, engine_home, [stub.url], tmp_path / "checkpoints", lease_s=1.0)
        step = pool.submit(asyncio.run, trainer.step_once())
        assert stub.lora_requested.wait(120), "the trainer never published"
        # Two leases into the engine's load: a claim not renewed meanwhile has lapsed, and
        # another trainer could take its rollouts.
        time.sleep(2.0)
        expired_while_publishing = sql(
            db_url,
            "SELECT id FROM rollouts WHERE claimed_by IS NOT NULL AND claim_expires_at < now() "
            "AND consumed_by_step IS NULL",
        )
        outcome = step.result(timeout=120)
    assert expired_while_publishing == [], "the lease lapsed while the engines loaded the adapter"
    assert outcome is not None and outcome.version == 1
    assert outcome.step is not None, "the claim was lost while publishing"
    assert sql(db_url, "SELECT count(*) FROM rollouts WHERE consumed_by_step IS NULL")[0][0] == 0


def test_the_trainer_waits_out_a_postgres_outage_and_then_trains(
    tmp_path: Path, engine: str, engine_home: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Postgres unreachable at the start and between steps: the trainer retries (saying so once)
    instead of ending, and trains as soon as it answers again."""
    asyncio.run(_seed(db_url))
    trainer = trainer_for(
        "postgresql://postgres@127.0.0.1:1/x",
        engine_home,
        [engine],
        tmp_path / "checkpoints",
        poll_interval_s=0.05,
    )

    async def run() -> int:
        stop = asyncio.Event()
        task = asyncio.create_task(trainer.run(stop, max_steps=1))
        for _ in range(400):  # bounded: until it has failed a few times
            if caplog.text.count("cannot resume yet") == 1 and task.done() is False:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # several more retries meanwhile (they log nothing more)
        assert not task.done(), "the trainer ended on the outage"
        trainer.database_url = db_url  # Postgres is back
        return await asyncio.wait_for(task, 180)

    with caplog.at_level("INFO", logger="lightloop.trainer.loop"):
        steps = asyncio.run(run())
    try:
        assert steps == 1
        assert caplog.text.count("cannot resume yet") == 1, caplog.text
        assert sql(db_url, "SELECT count(*) FROM training_steps")[0][0] == 1
    finally:
        httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": "policy-v1"})


def test_publish_refuses_when_no_engine_answers(tmp_path: Path, engine_home: Path, db_url: str) -> None:
    publisher = Publisher("policy", "tiny", tmp_path, [HttpEngine("http://127.0.0.1:9")], keep=2)

    async def attempt() -> None:
        conn = await asyncpg.connect(dsn(db_url))
        try:
            await publisher.publish(conn, lambda path: (path / "adapter_config.json").write_text("{}"))
        finally:
            await conn.close()

    with pytest.raises(PublishError, match="unreachable"):
        asyncio.run(attempt())
    assert sql(db_url, "SELECT status FROM policy_versions")[0][0] == "failed"


def test_kill_9_mid_publish_then_restart_loses_nothing_and_trains_once(
    tmp_path: Path, engine_home: Path, db_url: str
) -> None:
    asyncio.run(_seed(db_url))
    with running_stub() as stub:
        stub.lora_status = "hold"  # the trainer blocks in publish, after its update
        config = trainer_config(tmp_path, stub.url, lease_s=1.0)
        env = {**clean_env(), "LIGHTLOOP_HOME": str(engine_home), "LIGHTLOOP_DATABASE_URL": db_url}
        log = open(tmp_path / "trainer.log", "wb")  # noqa: SIM115 - closed below
        first = subprocess.Popen(
            [LIGHTLOOP, "--config", str(config), "trainer"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            assert stub.lora_requested.wait(180), (tmp_path / "trainer.log").read_text()
            assert sql(db_url, "SELECT count(*) FROM rollouts WHERE claimed_by IS NOT NULL")[0][0] == 8
            assert sql(db_url, "SELECT status FROM policy_versions")[0][0] == "staged"
            # Blocked in publish, the trainer still beats: made stale by hand, the heartbeat
            # comes back, and the compose/k8s health check passes.
            heartbeat = engine_home / "run" / "trainer.heartbeat"
            os.utime(heartbeat, (0, 0))
            eventually(lambda: heartbeat.stat().st_mtime > 0, what="a new heartbeat")
            check = subprocess.run(
                [LIGHTLOOP, "--config", str(config), "trainer", "--check"],
                env=env,
                capture_output=True,
                check=False,
            )
            assert check.returncode == 0, check.stderr
            os.kill(first.pid, signal.SIGKILL)
            first.wait(30)
        finally:
            if first.poll() is None:
                first.kill()
        # Killed mid-step: nothing consumed, nothing live.
        assert sql(db_url, "SELECT count(*) FROM rollouts WHERE consumed_by_step IS NOT NULL")[0][0] == 0
        assert sql(db_url, "SELECT count(*) FROM training_steps")[0][0] == 0
        stub.lora_status = 200
        second = subprocess.run(
            [LIGHTLOOP, "--config", str(config), "trainer", "--max-steps", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=300,
            check=False,
        )
        log.close()
        assert second.returncode == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    versions = {
        r["version"]: (r["status"], r["reason"]) for r in sql(db_url, "SELECT * FROM policy_versions")
    }
    assert versions[1][0] == "failed" and "stopped before publishing" in versions[1][1]
    assert versions[2][0] == "live"
    (step,) = sql(db_url, "SELECT step, policy_out FROM training_steps")
    assert step["policy_out"] == 2
    consumed = sql(db_url, "SELECT consumed_by_step, count(*) FROM rollouts GROUP BY 1")
    assert [tuple(r) for r in consumed] == [(step["step"], 8)]


def test_the_demo_wiring_check_runs_the_whole_loop(tmp_path: Path) -> None:
    from tests.support.stub_engine import free_port

    env = {
        **clean_env(),
        "LIGHTLOOP_HOME": str(tmp_path / "home"),
        "LIGHTLOOP_ENGINE__PORT": str(free_port()),
        "LIGHTLOOP_PROXY__PORT": str(free_port()),
    }
    plot = tmp_path / "curve.png"
    result = subprocess.run(
        [LIGHTLOOP, "demo", "--model", "tiny", "--steps", "3", "--groups", "4", "--plot", str(plot)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "version 0: held-out reward" in out and "  v0: " in out
    # At least one version was published, its held-out round ran, and it served calls.
    served = re.findall(
        r"version (\d+): held-out reward [\d.]+ over 32 tasks {2}\((\d+) calls served by v\1", out
    )
    assert any(int(v) >= 1 and int(n) >= 32 for v, n in served), out[-3000:]
    assert re.search(r"  v[1-9]\d*: ", out), out[-3000:]
    assert re.search(r"baseline v0: [\d.]+ held-out; final v[1-9]\d*: [\d.]+; best v\d+: [\d.]+", out), out[
        -3000:
    ]
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "embedded Postgres stopped" in out
    dataset = re.search(r"dataset (demo-[\d-]+):", out)
    assert dataset is not None, out
    name = dataset.group(1)
    query = f"""
        SELECT (SELECT count(*) FROM training_steps) AS steps,
               (SELECT count(*) FROM policy_versions WHERE version > 0) AS published,
               (SELECT max(version) FROM policy_versions WHERE status = 'live') AS live,
               (SELECT count(*) FROM rollouts WHERE dataset = '{name}' AND mode = 'train'
                  AND consumed_by_step IS NULL) AS untrained,
               (SELECT count(DISTINCT group_id) FROM rollouts WHERE dataset = '{name}'
                  AND mode = 'train') AS groups,
               (SELECT array_agg(version ORDER BY version) FROM val_rounds
                  WHERE dataset = '{name}') AS rounds,
               (SELECT count(*) FROM rollouts WHERE dataset = '{name}' AND mode = 'val'
                  AND status <> 'succeeded') AS val_unfinished,
               (SELECT count(*) FROM rollouts WHERE dataset = '{name}' AND mode = 'val') AS val_rollouts,
               (SELECT count(*) FROM llm_calls c JOIN rollouts r ON r.id = c.rollout_id
                  WHERE r.dataset = '{name}' AND r.mode = 'val'
                  AND c.policy_version IS DISTINCT FROM r.policy_version) AS val_calls_of_another_version
    """
    counted = subprocess.run(
        [LIGHTLOOP, "sql", "--json", query], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    subprocess.run([LIGHTLOOP, "db", "stop"], env=env, capture_output=True, timeout=60, check=False)
    [row] = json.loads(counted.stdout)
    # The dataset held 3 x 4 groups: the trainer took all of them, in exactly 3 steps, each of
    # which published a version.
    assert (row["steps"], row["published"], row["live"], row["untrained"], row["groups"]) == (3, 3, 3, 0, 12)
    # Held-out rounds: v0 and the final version at least (a version replaced before a runner
    # asked for work gets none), each of all 32 tasks, all finished, and the demo reported each.
    rounds = row["rounds"]
    assert rounds[0] == 0 and rounds[-1] == 3 and row["val_rollouts"] == 32 * len(rounds), row
    assert row["val_unfinished"] == 0
    # Each round was answered by the version it measures, every call of it (pinned).
    assert row["val_calls_of_another_version"] == 0, row
    assert sorted(int(v) for v, _ in served) == rounds


def test_a_live_version_whose_adapter_is_missing_stops_the_trainer_clearly(
    tmp_path: Path, engine_home: Path, db_url: str
) -> None:
    from lightloop.store import set_live, stage_version
    from lightloop.trainer import TrainerError

    async def publish_elsewhere() -> None:
        conn = await asyncpg.connect(dsn(db_url))
        try:
            version = await stage_version(conn, "policy", base_model="tiny")
            await set_live(conn, "policy", version.version)
        finally:
            await conn.close()

    asyncio.run(publish_elsewhere())
    trainer = trainer_for(db_url, engine_home, [], tmp_path / "checkpoints")
    with pytest.raises(TrainerError, match="adapter is not in"):
        asyncio.run(trainer.resume())
