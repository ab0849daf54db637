"""Chaos, as tests: whole processes killed or starved mid-flight, each run ending with an SQL check
that nothing was lost or counted twice.

- the engine is killed (kill -9) mid-stream: the agent gets a 502 error event, the call is
  recorded as an error, and the next call gets a 502;
- Postgres restarts while the trainer is between its claim and its record: the step completes,
  each rollout is consumed once;
- one of two proxy workers is killed with kill -9 during a burst while Postgres is down: what it
  had spooled is replayed by the worker started in its place;
- the spool's disk is full (a 256 kB tmpfs in the proxy's own mount namespace): the proxy keeps
  serving, counts what it drops, `/health` says why, and once Postgres is back
  every row it accepted is there once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import psutil
import pytest

from lightloop.store import EmbeddedPostgres, upgrade
from lightloop.store.database import dsn
from lightloop.store.writer import WRITABLE, _decode
from tests.conftest import LIGHTLOOP, REPO
from tests.e2e.conftest import Proxy, clean_env, eventually, start_proxy, wait_healthy
from tests.e2e.test_multi_agent_training import _seed_two_adapters
from tests.e2e.test_proxy import HI, sql
from tests.e2e.test_trainer import _seed, trainer_config, trainer_for
from tests.support.stub_engine import free_port, running_stub

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def own_pg(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A Postgres of this test's own, to stop and start; stopped whatever the test does."""
    pg = EmbeddedPostgres(tmp_path / "pg")
    try:
        url = pg.ensure_running()
        asyncio.run(upgrade(url))
        yield pg, url
    finally:
        pg.stop()


def _restart(pg: EmbeddedPostgres, url: str) -> None:
    assert pg.ensure_running() == url, "Postgres came back on another port: the test's URLs are stale"


def _config(upstream: str) -> dict[str, Any]:
    return {"policy": [{"name": "p", "base_model": "m", "upstreams": [upstream]}]}


async def _burst(base_url: str, key: str, n: int, content: str = "Say hi.") -> list[str]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
    try:
        results = await asyncio.gather(
            *[
                client.chat.completions.create(model="p", messages=[{"role": "user", "content": content}])
                for _ in range(n)
            ]
        )
    finally:
        await client.close()
    return [r.id for r in results]


def _spooled(folder: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The rows in a spool folder's segments, by table (a torn last line left out)."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for segment in sorted(folder.glob("[0-9]*.jsonl")):
        for line in segment.read_bytes().split(b"\n"):
            try:
                batch = _decode(line)
            except ValueError:
                continue
            for table, records in batch.items():
                rows.setdefault(table, []).extend(records)
    return rows


def test_the_engine_killed_mid_stream_is_a_502_for_the_agent_and_an_error_row(
    tmp_path: Path, db_url: str
) -> None:
    port = free_port()
    log = open(tmp_path / "engine.log", "wb")  # noqa: SIM115 - closed below
    # The vLLM-shaped stub as its own process, so it can be killed: every stream stops after its
    # first token and waits, as a long generation would.
    engine = subprocess.Popen(
        [sys.executable, "-m", "tests.support.stub_engine", "--port", str(port), "--hold"],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proxy = None
    try:
        wait_healthy(f"http://127.0.0.1:{port}", engine)
        proxy = start_proxy(tmp_path / "home", db_url, _config(f"http://127.0.0.1:{port}"))
        client = openai.OpenAI(
            base_url=f"{proxy.url}/rollout/chaos-engine/v1", api_key=proxy.key, max_retries=0
        )
        chunks = iter(client.chat.completions.create(model="p", messages=HI, stream=True))
        first = next(chunks)
        assert first.id
        engine.send_signal(signal.SIGKILL)
        engine.wait(30)
        with pytest.raises(openai.APIError) as broken:
            list(chunks)
        assert "broke off the stream" in broken.value.message
        assert isinstance(broken.value.body, dict) and broken.value.body["code"] == 502
        with pytest.raises(openai.APIStatusError) as down:
            client.chat.completions.create(model="p", messages=HI)
        assert down.value.status_code == 502
        finished = httpx.post(
            f"{proxy.url}/v1/rollouts/chaos-engine/finish", json={"status": "failed"}, headers=proxy.headers
        )
        assert finished.status_code == 200, finished.text  # the sync point: the rows are written
        rows = sql(
            db_url,
            "SELECT c.finish_reason, c.completion_token_ids, s.status_code, "
            "s.attributes->>'error.type' AS kind FROM llm_calls c JOIN spans s USING (span_id) "
            "WHERE c.rollout_id = 'chaos-engine' ORDER BY c.created_at",
        )
        assert [r["finish_reason"] for r in rows] == ["error", "error"]
        assert rows[0]["completion_token_ids"], "the tokens streamed before the kill are kept"
        assert all(r["status_code"] == "ERROR" and r["kind"] == "upstream_error" for r in rows)
    finally:
        if proxy is not None:
            proxy.stop()
        if engine.poll() is None:
            engine.kill()
        log.close()


def test_postgres_restarted_between_claim_and_record_trains_each_rollout_once(
    tmp_path: Path, engine_home: Path, own_pg: tuple[EmbeddedPostgres, str]
) -> None:
    """The policy's adapter and a planner's are published together when Postgres restarts: both
    staged versions, cut short, are failed and unloaded, and the step publishes both anew."""
    pg, url = own_pg
    asyncio.run(_seed_two_adapters(url, 0))
    with running_stub() as stub:
        stub.lora_status = "hold"  # the trainer stops in publish: after its claim, before its record
        config = trainer_config(tmp_path, stub.url, agents=("planner",))
        env = {**clean_env(), "LIGHTLOOP_HOME": str(engine_home), "LIGHTLOOP_DATABASE_URL": url}
        with open(tmp_path / "trainer.log", "wb") as log:
            trainer = subprocess.Popen(
                [LIGHTLOOP, "--config", str(config), "trainer", "--max-steps", "1"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                assert stub.lora_requested.wait(180), (tmp_path / "trainer.log").read_text()
                assert sql(url, "SELECT count(*) FROM rollouts WHERE claimed_by IS NOT NULL")[0][0] == 8
                pg.stop()  # every connection the trainer holds is gone
                _restart(pg, url)
                stub.lora_release.set()
                assert trainer.wait(240) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
            finally:
                if trainer.poll() is None:
                    trainer.kill()
        # The versions cut short were staged, loaded (the first), never live: failed and
        # unloaded, and the step published its update once more, as versions 2.
        assert set(stub.adapters) == {"policy-v2", "policy-planner-v2"}, stub.adapters
    steps = sql(url, "SELECT step, policy_out, metrics FROM training_steps")
    assert [r["policy_out"] for r in steps] == [2], steps
    assert steps[0]["metrics"]["adapters"]["policy-planner"]["version_out"] == 2
    consumed = sql(url, "SELECT consumed_by_step, count(*) FROM rollouts GROUP BY 1")
    assert [tuple(r) for r in consumed] == [(steps[0]["step"], 8)]
    versions = sql(
        url, "SELECT policy, version, status, reason FROM policy_versions ORDER BY policy, version"
    )
    assert [(r["policy"], r["version"], r["status"]) for r in versions] == [
        ("policy", 1, "failed"),
        ("policy", 2, "live"),
        ("policy-planner", 1, "failed"),
        ("policy-planner", 2, "live"),
    ]
    assert all("outage interrupted its publish" in r["reason"] for r in versions if r["status"] == "failed")


def test_postgres_lost_after_the_version_went_live_records_the_step_without_publishing_again(
    tmp_path: Path, engine_home: Path, db_url: str
) -> None:
    """The trainer's connection is cut (pg_terminate_backend: the server side of a failover)
    right after its version went live and before the step is recorded: the record is tried
    again on a fresh connection, and the same update is not published a second time."""
    asyncio.run(_seed(db_url))
    with running_stub() as stub:
        trainer = trainer_for(db_url, engine_home, [stub.url], tmp_path / "checkpoints", poll_interval_s=0.05)
        publish = trainer.publisher.publish_all
        calls = 0

        async def publish_then_lose_the_connection(conn: asyncpg.Connection, saves: Any) -> Any:
            nonlocal calls
            calls += 1
            published = await publish(conn, saves)
            admin = await asyncpg.connect(dsn(db_url))
            try:
                await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
            finally:
                await admin.close()
            return published

        trainer.publisher.publish_all = publish_then_lose_the_connection  # type: ignore[method-assign]
        outcome = asyncio.run(trainer.step_once())
        assert outcome is not None and outcome.step is not None and outcome.version == 1
        assert calls == 1, "the update was published twice"
        assert set(stub.adapters) == {"policy-v1"}
    versions = sql(db_url, "SELECT version, status FROM policy_versions")
    assert [tuple(r) for r in versions] == [(1, "live")]
    (step,) = sql(db_url, "SELECT step, policy_out FROM training_steps")
    assert step["policy_out"] == 1
    consumed = sql(db_url, "SELECT consumed_by_step, count(*) FROM rollouts GROUP BY 1")
    assert [tuple(r) for r in consumed] == [(step["step"], 8)]


def _worker_slots(proxy: Proxy) -> dict[int, Path]:
    """Each live worker process of a `--workers N` proxy and the spool folder it holds."""
    slots: dict[int, Path] = {}
    for child in psutil.Process(proxy.proc.pid).children(recursive=True):
        try:
            for f in child.open_files():
                if f.path.endswith("/.lock") and "/spool/proxy/worker-" in f.path:
                    slots[child.pid] = Path(f.path).parent
        except psutil.NoSuchProcess:
            continue
    return slots


def test_a_proxy_worker_killed_with_kill_9_loses_nothing_it_spooled(
    tmp_path: Path, own_pg: tuple[EmbeddedPostgres, str]
) -> None:
    pg, url = own_pg
    with running_stub() as stub:
        proxy = start_proxy(tmp_path / "home", url, _config(stub.url), args=["--workers", "2"])
        try:
            slots = eventually(lambda: (s := _worker_slots(proxy)) and len(s) == 2 and s, what="two workers")
            pg.stop()
            base = f"{proxy.url}/rollout/chaos-kill/v1"
            ids = asyncio.run(_burst(base, proxy.key, 40))
            # Served while Postgres is down; each worker spools what it took (fsync'd).
            eventually(
                lambda: sum(len(_spooled(f).get("llm_calls", [])) for f in slots.values()) == 40,
                timeout_s=60,
                what="every call spooled",
            )
            victim, folder = max(slots.items(), key=lambda kv: len(_spooled(kv[1]).get("llm_calls", [])))
            spooled = {r[0] for r in _spooled(folder)["spans"]}
            assert spooled, "the killed worker had spooled nothing: the test proves nothing"
            os.kill(victim, signal.SIGKILL)
            # uvicorn starts another worker in its place, which takes the free spool slot back.
            eventually(
                lambda: (s := _worker_slots(proxy)) and len(s) == 2 and victim not in s,
                timeout_s=120,
                what="a new worker",
            )
            ids += asyncio.run(_burst(base, proxy.key, 10))  # a burst across the restart too
            _restart(pg, url)
            rows = eventually(
                lambda: (
                    (r := sql(url, "SELECT span_id, response_id FROM llm_calls")) and len(r) >= len(ids) and r
                ),
                timeout_s=60,
                what="every call in Postgres",
            )
            assert sorted(r["response_id"] for r in rows) == sorted(ids)  # none lost, none twice
            assert spooled <= {r["span_id"] for r in rows}
            assert sql(url, "SELECT count(*) FROM spans")[0][0] == len(ids)
        finally:
            proxy.stop()


def _can_mount_a_small_disk(folder: Path) -> bool:
    probe = subprocess.run(
        [*_on_a_small_disk(folder, 65536), "true"], capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


def _on_a_small_disk(folder: Path, size: int) -> list[str]:
    """A command prefix: run in a mount namespace of its own (an unprivileged user namespace
    where needed) with a `size`-byte tmpfs on `folder`, a real disk that fills up (ENOSPC)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        script,
        "sh",
        str(size),
        str(folder),
    ]


def test_a_full_spool_disk_keeps_serving_counts_drops_and_says_why(
    tmp_path: Path, own_pg: tuple[EmbeddedPostgres, str]
) -> None:
    if not _can_mount_a_small_disk(tmp_path / "probe"):
        pytest.skip("this machine allows no mount namespace (unshare --user --mount): no small disk to fill")
    pg, url = own_pg
    home = tmp_path / "home"
    with running_stub() as stub:
        proxy = start_proxy(
            home,
            url,
            _config(stub.url),
            extra_env={"LIGHTLOOP_WRITER__QUEUE_BYTES": str(1024 * 1024)},
            prefix=_on_a_small_disk(home / "spool", 256 * 1024),
        )
        try:
            base = f"{proxy.url}/rollout/chaos-disk/v1"
            ids = asyncio.run(_burst(base, proxy.key, 5))
            eventually(lambda: len(sql(url, "SELECT 1 FROM llm_calls")) == 5, what="the first calls")
            pg.stop()
            prompt = "x" * 40_000  # 60 calls of 40 kB: far more than the spool's 256 kB
            for _ in range(6):
                ids += asyncio.run(_burst(base, proxy.key, 10, prompt))  # every call is served

            def health() -> dict[str, Any]:
                answer: dict[str, Any] = httpx.get(f"{proxy.url}/health", headers=proxy.headers).json()
                return answer

            seen = eventually(
                lambda: (h := health())["writer"]["rows_dropped"] > 0 and h["writer"]["degraded"] and h,
                timeout_s=60,
                what="drops counted and the reason shown",
            )
            assert seen["status"] == "degraded"
            assert "No space left on device" in seen["writer"]["degraded"], seen["writer"]
            metrics = httpx.get(f"{proxy.url}/metrics", headers=proxy.headers).text
            assert 'lightloop_writer_rows_total{outcome="dropped"}' in metrics
            _restart(pg, url)
            # Postgres is back: the writer drains its memory and what it could spool, and says so.
            eventually(lambda: health()["status"] == "ok", timeout_s=90, what="healthy again")
            final = health()["writer"]
            submitted = _metric(httpx.get(f"{proxy.url}/metrics", headers=proxy.headers).text, "submitted")
            written = sum(sql(url, f"SELECT count(*) FROM {table}")[0][0] for table in WRITABLE)
            assert written == submitted, (written, submitted, final)  # every accepted row, once
            calls = sql(url, "SELECT response_id FROM llm_calls")
            assert len(calls) == len({r["response_id"] for r in calls})
            assert {r["response_id"] for r in calls} <= set(ids)
            assert final["rows_dropped"] > 0
        finally:
            proxy.stop()


def _metric(text: str, outcome: str) -> int:
    for line in text.splitlines():
        if line.startswith(f'lightloop_writer_rows_total{{outcome="{outcome}"}}'):
            return int(float(line.split()[-1]))
    raise AssertionError(f"no {outcome} count in /metrics")
