"""`lightloop.tracing.init` in a real agent process (instrumentation patches the `openai` SDK and
httpx process-wide, so the agent runs in its own process) against a real proxy: the agent's own
span, the GenAI instrumentation's span and the proxy's span of the call share one trace, and all
of them are the rollout's in `spans`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.conftest import Proxy, clean_env, eventually
from tests.e2e.test_proxy import sql

AGENT = """
import sys
import openai
from opentelemetry import trace
from lightloop import tracing
from lightloop.client import Rollout

url, key = sys.argv[1], sys.argv[2]
provider = tracing.init(url, key, service_name="traced-agent", batch=False)
with trace.get_tracer("agent").start_as_current_span("agent.step") as span:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key)
    client.chat.completions.create(
        model="policy", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        extra_headers={"X-Lightloop-Rollout": "traced-1"},
    )
    print(format(span.get_span_context().trace_id, "032x"), format(span.get_span_context().span_id, "016x"))
    # lightloop's own control call, inside the traced block: it makes no span.
    Rollout("traced-1", url, key).post_reward(1.0)
provider.shutdown()
"""


def test_the_agents_spans_and_the_proxys_share_one_trace_and_the_rollout(
    proxy: Proxy, module_db: str
) -> None:
    ran = subprocess.run(
        [sys.executable, "-c", AGENT, proxy.url, proxy.key],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    trace_id, step_span = ran.stdout.split()
    done = httpx.post(
        f"{proxy.url}/v1/rollouts/traced-1/finish", json={"status": "succeeded"}, headers=proxy.headers
    )
    assert done.status_code == 200, done.text
    (call,) = eventually(
        lambda: sql(
            module_db,
            "SELECT s.span_id, s.trace_id, s.parent_span_id FROM llm_calls c JOIN spans s USING (span_id) "
            "WHERE c.rollout_id = 'traced-1'",
        ),
        what="the proxy's span of the call",
    )
    spans = eventually(
        lambda: (
            (r := sql(module_db, "SELECT * FROM spans WHERE trace_id = $1", trace_id)) and len(r) >= 3 and r
        ),
        what="the agent's spans",
    )
    assert call["trace_id"] == trace_id
    agent_spans = [s for s in spans if s["span_id"] != call["span_id"]]
    assert call["parent_span_id"] in {s["span_id"] for s in agent_spans}  # a child of the agent's
    assert step_span in {s["span_id"] for s in agent_spans}
    # The GenAI instrumentation's span of the call, by the semantic conventions' attributes.
    genai = [s for s in agent_spans if s["attributes"].get("gen_ai.request.model") == "policy"]
    assert len(genai) == 1 and genai[0]["attributes"].get("gen_ai.operation.name") == "chat", agent_spans
    assert {s["resource"]["service.name"] for s in agent_spans} == {"traced-agent"}
    assert {s["rollout_id"] for s in spans} == {"traced-1"}  # one query returns the whole trace
    assert not [s for s in spans if "/v1/rewards" in str(s["attributes"])]  # control calls untraced
    assert len(agent_spans) == 3, [s["name"] for s in agent_spans]  # step, GenAI span, its HTTP span


def test_without_the_extra_init_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['opentelemetry.instrumentation.openai_v2'] = None\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", "from lightloop import tracing; tracing.init('http://127.0.0.1:1', 'k')"],
        env={**clean_env(), "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 1 and "pip install 'lightloop[tracing]'" in ran.stderr, ran.stderr
