"""The proxy as more than one process, and its spans exported to an OTLP collector."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tests.e2e.conftest import eventually, start_proxy
from tests.e2e.test_proxy import HI, sql
from tests.support.stub_engine import running_stub


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
