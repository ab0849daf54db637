"""AgentOps against a real proxy: the SDK itself (agentops 0.4.21, in a venv of the `agentops`
extra's pins) with no account and no network, and its API replayed call by call (the token trade,
the span export with the token as the bearer, the captured-output upload). Its spans name no
rollout and join the one whose call they report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tests.e2e.conftest import Proxy, clean_env, eventually
from tests.e2e.test_proxy import sql
from tests.support.venvs import venv_with_extra

TRACE = bytes(range(1, 17))


def agentops_spans(response_id: str) -> bytes:
    """What AgentOps exports for one traced call: its session span, then the call's span (a
    child) carrying the response id the proxy answered with; the root first, as in one batch."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    service = resource_spans.resource.attributes.add()
    service.key, service.value.string_value = "service.name", "agentops"
    for name, span_id, parent, attrs in (
        ("default.session", bytes(range(1, 9)), b"", {"agentops.span.kind": "session"}),
        (
            "openai.chat.completion",
            bytes(range(9, 17)),
            bytes(range(1, 9)),
            {"gen_ai.response.id": response_id},
        ),
    ):
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.name = "agentops" if parent == b"" else "openai"
        span = scope_spans.spans.add()
        span.trace_id, span.span_id, span.parent_span_id, span.name = TRACE, span_id, parent, name
        span.start_time_unix_nano = 1_700_000_000_000_000_000
        for key, value in attrs.items():
            a = span.attributes.add()
            a.key, a.value.string_value = key, value
    return request.SerializeToString()


def test_an_agentops_traced_agent_lands_in_spans_under_its_rollout(proxy: Proxy, module_db: str) -> None:
    auth = httpx.post(f"{proxy.url}/v3/auth/token", json={"api_key": proxy.key})
    assert auth.status_code == 200, auth.text
    token = auth.json()["token"]
    assert auth.json()["project_id"]
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.key)
    reply = client.chat.completions.create(
        model="policy",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Lightloop-Rollout": "ao-1"},
    )
    exported = httpx.post(
        f"{proxy.url}/v1/traces",
        content=agentops_spans(reply.id),
        headers={"authorization": f"Bearer {token}", "content-type": "application/x-protobuf"},
    )
    assert exported.status_code == 200, exported.text
    logs = httpx.post(
        f"{proxy.url}/v4/logs/upload/",
        json={"body": "planning the answer\n"},
        headers={"authorization": f"Bearer {token}", "trace-id": str(int.from_bytes(TRACE, "big"))},
    )
    assert logs.status_code == 200 and logs.json() == {}
    assert (
        httpx.post(f"{proxy.url}/v1/rollouts/ao-1/finish", json={}, headers=proxy.headers).status_code == 200
    )
    rows = eventually(
        lambda: (
            (r := sql(module_db, "SELECT * FROM spans WHERE trace_id = $1", TRACE.hex()))
            and len(r) == 3
            and r
        ),
        what="the session span, the call's span and the captured output",
    )
    assert {r["name"]: r["rollout_id"] for r in rows} == {
        "default.session": "ao-1",
        "openai.chat.completion": "ao-1",
        "agentops.logs": "ao-1",
    }
    (output,) = [r for r in rows if r["name"] == "agentops.logs"]
    assert output["attributes"]["agentops.logs"] == "planning the answer\n"


def test_agentops_calls_with_bad_input(proxy: Proxy) -> None:
    def auth(body: object) -> httpx.Response:
        return httpx.post(f"{proxy.url}/v3/auth/token", json=body)

    assert auth({"api_key": "sk-ll-" + "x" * 43}).status_code == 401  # never issued
    assert auth({}).json()["error"]["param"] == "api_key"
    assert httpx.post(f"{proxy.url}/v3/auth/token", content=b"{").status_code == 400
    upload = f"{proxy.url}/v4/logs/upload/"
    assert httpx.post(upload, json={"body": "x"}, headers={"trace-id": "1"}).status_code == 401  # no key
    for trace_id in ("abc", "0", str(2**128)):
        answer = httpx.post(upload, json={"body": "x"}, headers={**proxy.headers, "trace-id": trace_id})
        assert answer.status_code == 400, trace_id
    assert httpx.post(upload, json={"body": 5}, headers={**proxy.headers, "trace-id": "1"}).status_code == 400


# An agent traced with the AgentOps SDK as its docs show, configured by the environment the
# deployment plan names (AGENTOPS_API_KEY, a lightloop key) with its API and exporter pointed at
# lightloop. It runs in a venv holding the `agentops` extra's pins (tests/support/venvs.py);
# every other host is behind a proxy that refuses connections, so nothing reaches AgentOps.
AGENTOPS_AGENT = """
import json, sys
import agentops, openai
url, rollout = sys.argv[1:3]
agentops.init(auto_start_session=False)
trace = agentops.start_trace("solve")
client = openai.OpenAI(base_url=url + "/v1")  # OPENAI_API_KEY: the same lightloop key
reply = client.chat.completions.create(
    model="policy", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
    extra_headers={"X-Lightloop-Rollout": rollout},
)
agentops.end_trace(trace, "Success")
trace_id = format(trace.span.get_span_context().trace_id, "032x")
print(json.dumps({"response_id": reply.id, "trace_id": trace_id}))
"""


@pytest.mark.timeout(900)  # the first run builds the venv from PyPI
def test_the_agentops_sdk_with_no_account_and_no_network(
    proxy: Proxy, module_db: str, tmp_path: Path
) -> None:
    python = venv_with_extra("agentops", "openai")
    inherited = {
        k: v
        for k, v in clean_env().items()
        if not k.lower().endswith("_proxy") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    refused = {
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
        "no_proxy": "127.0.0.1",
    }
    env = {
        **inherited,
        **refused,
        **{k.upper(): v for k, v in refused.items()},
        "AGENTOPS_API_KEY": proxy.key,
        "AGENTOPS_API_ENDPOINT": proxy.url,
        "AGENTOPS_EXPORTER_ENDPOINT": f"{proxy.url}/v1/traces",
        "OPENAI_API_KEY": proxy.key,
    }
    ran = subprocess.run(
        [str(python), "-c", AGENTOPS_AGENT, proxy.url, "agentops-sdk-1"],
        env=env,
        cwd=tmp_path,  # the SDK writes agentops.log into its working directory
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    sent = json.loads(ran.stdout.strip().splitlines()[-1])
    finished = httpx.post(f"{proxy.url}/v1/rollouts/agentops-sdk-1/finish", json={}, headers=proxy.headers)
    assert finished.status_code == 200, finished.text
    rows = eventually(
        lambda: (
            (r := sql(module_db, "SELECT * FROM spans WHERE trace_id = $1", sent["trace_id"]))
            and {"solve.session", "openai.chat.completion"} <= {s["name"] for s in r}
            and r
        ),
        what="the AgentOps trace's spans: its session and the call",
    )
    by_name = {r["name"]: r for r in rows}
    assert {r["rollout_id"] for r in rows} == {"agentops-sdk-1"}
    assert by_name["openai.chat.completion"]["attributes"]["gen_ai.response.id"] == sent["response_id"]
    assert by_name["openai.chat.completion"]["parent_span_id"] == by_name["solve.session"]["span_id"]
    # One SQL query returns the rollout's whole trace: the proxy's span of the call with the agent's.
    names = sql(module_db, "SELECT name FROM spans WHERE rollout_id = 'agentops-sdk-1'")
    assert {"solve.session", "openai.chat.completion"} < {n["name"] for n in names}
