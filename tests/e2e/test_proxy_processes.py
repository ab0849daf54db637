"""The proxy as more than one process, and its spans exported to an OTLP collector."""

from __future__ import annotations

import asyncio
import ssl
import stat
import subprocess
from pathlib import Path

import asyncpg
import httpx
import openai
import psutil
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from sqlalchemy.engine import make_url

from lightloop.store import claim_groups
from lightloop.store.database import dsn
from tests.conftest import LIGHTLOOP
from tests.e2e.conftest import MASTER_KEY, Proxy, clean_env, eventually, start_proxy, wait_healthy
from tests.e2e.test_proxy import HI, sql
from tests.support.stub_engine import free_port, running_stub
from tests.support.tls import self_signed


def test_several_workers_serve_and_record_every_call(tmp_path: Path, db_url: str) -> None:
    with running_stub() as stub:
        config = {"policy": [{"name": "p", "base_model": "m", "upstreams": [stub.url]}]}
        proxy = start_proxy(tmp_path / "home", db_url, config, args=["--workers", "2"])
        try:

            async def burst() -> list[str]:
                client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.key, max_retries=0)
                # New connections each time, so the kernel spreads them over both workers.
                results = []
                for i in range(40):
                    async with openai.AsyncOpenAI(
                        base_url=f"{proxy.url}/rollout/w-{i % 4}/v1", api_key=proxy.key, max_retries=0
                    ) as c:
                        results.append(await c.chat.completions.create(model="p", messages=HI))
                await client.close()
                return [r.id for r in results]

            ids = asyncio.run(burst())
            rows = eventually(
                lambda: (r := sql(db_url, "SELECT response_id FROM llm_calls")) and len(r) == 40 and r,
                what="all calls",
            )
            assert sorted(r["response_id"] for r in rows) == sorted(ids)
            # Each worker holds its own spool folder (two processes cannot share one).
            workers = sorted(p.name for p in (tmp_path / "home" / "spool" / "proxy").iterdir())
            assert workers == ["worker-0", "worker-1"]
        finally:
            proxy.stop()


def test_spans_are_exported_to_an_otlp_endpoint_with_the_same_ids(tmp_path: Path, db_url: str) -> None:
    with running_stub() as stub:
        config = {
            "policy": [{"name": "p", "base_model": "m", "upstreams": [stub.url]}],
            "proxy": {"otlp_endpoint": f"{stub.url}/v1/traces"},
        }
        proxy = start_proxy(tmp_path / "home", db_url, config)
        try:
            client = openai.OpenAI(base_url=f"{proxy.url}/rollout/exp-1/v1", api_key=proxy.key, max_retries=0)
            client.chat.completions.create(model="p", messages=HI)
        finally:
            proxy.stop()  # a clean shutdown flushes the exporter's batch
        (span_id,) = [
            r["span_id"] for r in sql(db_url, "SELECT span_id FROM spans WHERE rollout_id = 'exp-1'")
        ]
        exported = []
        for body in stub.traces:
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    exported += [
                        (s.span_id.hex(), s.name, {a.key for a in s.attributes}) for s in scope_spans.spans
                    ]
        assert [(sid, name) for sid, name, _ in exported] == [(span_id, "chat p")]
        assert {"gen_ai.operation.name", "lightloop.rollout.id", "gen_ai.usage.output_tokens"} <= exported[0][
            2
        ]


def test_the_cap_on_rollouts_in_flight_refuses_new_ones_until_one_finishes(
    tmp_path: Path, db_url: str
) -> None:
    import httpx

    with running_stub() as stub:
        config = {"policy": [{"name": "p", "base_model": "m", "upstreams": [stub.url]}]}
        proxy = start_proxy(
            tmp_path / "home", db_url, config, extra_env={"LIGHTLOOP_PROXY__MAX_ROLLOUTS_IN_FLIGHT": "2"}
        )
        try:

            def call(rollout: str, mode: str = "train") -> httpx.Response:
                return httpx.post(
                    f"{proxy.url}/rollout/{rollout}/v1/chat/completions",
                    json={"model": "p", "messages": HI},
                    headers={**proxy.headers, "x-lightloop-mode": mode},
                )

            assert call("cap-1").status_code == 200
            assert call("cap-2").status_code == 200
            assert call("cap-1").status_code == 200  # a rollout in flight goes on
            refused = call("cap-3")
            assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
            assert call("eval-1", mode="val").status_code == 200  # evaluation is not capped
            finished = httpx.post(
                f"{proxy.url}/v1/rollouts/cap-1/finish", json={"status": "succeeded"}, headers=proxy.headers
            )
            assert finished.status_code == 200
            assert call("cap-3").status_code == 200
        finally:
            proxy.stop()


def test_calls_on_one_process_and_the_finish_on_another_are_all_trained(tmp_path: Path, db_url: str) -> None:
    """Issue 13, item 1: a rollout's calls went to one proxy process, whose writer still holds
    them, and its finish and reward to another. The finish and the reward are kept (not a 404),
    and the trainer's claim takes the rollout only with every call."""
    with running_stub() as stub:
        config = {"policy": [{"name": "p", "base_model": "m", "upstreams": [stub.url]}]}
        # The slow process keeps rows in memory for 4 s, and marks what it wrote every 4 s.
        slow_writer = {
            "LIGHTLOOP_WRITER__FLUSH_INTERVAL_MS": "4000",
            "LIGHTLOOP_WRITER__MARK_INTERVAL_S": "4",
        }
        slow = start_proxy(tmp_path / "slow", db_url, config, extra_env=slow_writer)
        fast = start_proxy(tmp_path / "fast", db_url, config)
        try:

            def call(rollout: str) -> str:
                client = openai.OpenAI(
                    base_url=f"{slow.url}/rollout/{rollout}/v1", api_key=slow.key, max_retries=0
                )
                return client.chat.completions.create(model="p", messages=HI).id

            def post(path: str, body: dict[str, object]) -> httpx.Response:
                return httpx.post(f"{fast.url}{path}", json=body, headers=fast.headers, timeout=60)

            # "older": its first call is in Postgres, its second only in the slow writer's memory.
            call("older")
            eventually(
                lambda: sql(db_url, "SELECT 1 FROM llm_calls WHERE rollout_id = 'older'"), what="call 1"
            )
            call("older")
            finished = post("/v1/rollouts/older/finish", {"reward": 0.5})
            assert finished.status_code == 200, finished.text
            # "newer": not a row of it is in Postgres when its reward and finish arrive.
            response_id = call("newer")
            rewarded = post("/v1/rewards", {"response_id": response_id, "value": 1.0})
            assert rewarded.status_code == 200, rewarded.text
            assert rewarded.json()["rollout_id"] == "newer"
            finished = post("/v1/rollouts/newer/finish", {})
            assert finished.status_code == 200, finished.text

            async def claim_both() -> dict[str, int]:
                conn = await asyncpg.connect(dsn(db_url))
                got: dict[str, int] = {}
                try:
                    while len(got) < 2:  # the test's timeout bounds this
                        claim = await claim_groups(conn, "test", max_groups=10, lease_s=60, settle_s=0)
                        for rollout in claim.rollouts if claim else []:
                            got[rollout.id] = len(rollout.calls)
                        await asyncio.sleep(0.05)
                finally:
                    await conn.close()
                return got

            assert asyncio.run(asyncio.wait_for(claim_both(), 60)) == {"older": 2, "newer": 1}
            assert sql(db_url, "SELECT reward FROM rollouts WHERE id = 'newer'")[0]["reward"] == 1.0
            # Each process shows its promise in /health, and has its row in writer_marks.
            health = [
                httpx.get(f"{p.url}/health", headers=p.headers, timeout=10).json() for p in (slow, fast)
            ]
            slow_mark, fast_mark = (h["writer"]["written_through"] for h in health)
            assert slow_mark is not None and fast_mark is not None
            assert len(sql(db_url, "SELECT 1 FROM writer_marks")) == 2
        finally:
            slow.stop()
            fast.stop()


def test_https_with_a_self_signed_certificate_serves_the_openai_sdk(tmp_path: Path, db_url: str) -> None:
    cert, key = self_signed(tmp_path / "tls")
    with running_stub() as stub:
        config = {"policy": [{"name": "p", "base_model": "m", "upstreams": [stub.url]}]}
        args = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        proxy = start_proxy(tmp_path / "home", db_url, config, args=args)
        try:
            assert proxy.url.startswith("https://")
            with httpx.Client(verify=ssl.create_default_context(cafile=cert)) as http:
                client = openai.OpenAI(
                    base_url=f"{proxy.url}/rollout/tls-1/v1",
                    api_key=proxy.key,
                    max_retries=0,
                    http_client=http,
                )
                completion = client.chat.completions.create(model="p", messages=HI)
            rows = eventually(
                lambda: sql(db_url, "SELECT response_id FROM llm_calls WHERE rollout_id = 'tls-1'"),
                what="call",
            )
            assert rows[0]["response_id"] == completion.id
            # A client that does not trust the certificate is refused, and plain HTTP gets nothing.
            untrusting = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.key, max_retries=0)
            with pytest.raises(openai.APIConnectionError):
                untrusting.chat.completions.create(model="p", messages=HI)
            with pytest.raises(httpx.HTTPError):
                httpx.get(
                    proxy.url.replace("https://", "http://") + "/health", headers=proxy.headers, timeout=5
                )
        finally:
            proxy.stop()


def test_worker_processes_find_no_secret_in_their_environment(tmp_path: Path, db_url: str) -> None:
    """Issue 13, item 12: with the key and the database URL in lightloop.yaml, neither reaches an
    environment; workers read them from a file only this user can read, removed at exit."""
    with running_stub() as stub:
        home = tmp_path / "home"
        home.mkdir()
        config_path = home / "lightloop.yaml"
        config = {
            "policy": [{"name": "p", "base_model": "m", "upstreams": [stub.url]}],
            "master_key": MASTER_KEY,
            "database_url": db_url,
        }
        config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        env = {**clean_env(), "LIGHTLOOP_HOME": str(home)}
        log = home / "proxy.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [LIGHTLOOP, "--config", str(config_path), "proxy", "--port", str(port), "--workers", "2"],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=home,
            )
        proxy = Proxy(f"http://127.0.0.1:{port}", proc, home, log)
        try:
            wait_healthy(proxy.url, proc, 120, proxy.headers)
            client = openai.OpenAI(
                base_url=f"{proxy.url}/rollout/env-1/v1", api_key=MASTER_KEY, max_retries=0
            )
            client.chat.completions.create(model="p", messages=HI)
            password = make_url(db_url).password or db_url
            processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            assert len(processes) >= 3  # uvicorn's supervisor and two workers
            for process in processes:
                values = "\n".join(f"{k}={v}" for k, v in process.environ().items())
                assert MASTER_KEY not in values and password not in values, process.cmdline()
            private = sorted((home / "run").glob("*-[0-9]*.*"))
            assert {p.name.split("-")[0] for p in private} == {"litellm", "proxy"}, private
            assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in private)
        finally:
            proxy.stop()
        assert not list((home / "run").glob("*-[0-9]*.*")), "the secret files outlived the proxy"
