"""The dashboard in a real Chromium (Playwright) against a real proxy process and Postgres: an
agent's calls (one answered with a tool call) and its own OpenTelemetry span go through the
proxy; steps and versions are rows as the trainer writes them. Every page is screenshotted into
the test artifacts, and any console error or uncaught exception fails the test."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.e2e.conftest import Proxy, eventually, start_proxy, stub_policy
from tests.e2e.test_proxy import sql as _sql
from tests.support.browser import Watched, running_browser
from tests.support.stub_engine import Action, StubEngine

pytestmark = pytest.mark.timeout(300)
_DB = ThreadPoolExecutor(1)


def sql(url: str, query: str, *args: Any) -> list[Any]:
    # Playwright's sync API keeps an event loop running in this thread: Postgres from another.
    return _DB.submit(_sql, url, query, *args).result(timeout=60)


STEPS = 4


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, stub: StubEngine, module_db: str) -> Iterator[Proxy]:
    config = stub_policy(stub)
    config["policy"][0]["base_model"] = "tiny"  # SmolLM2's tokenizer: the trainer's view shows text
    p = start_proxy(tmp_path_factory.mktemp("ui-home"), module_db, config)
    try:
        agent_run(p, stub, module_db)
        trained(module_db)
        merged_rollout(module_db)
        yield p
    finally:
        p.stop()


def agent_run(proxy: Proxy, stub: StubEngine, db: str) -> None:
    """One rollout as an agent makes it: a traced step, a call answered with a tool call, the
    tool's result sent back, a reward."""
    from opentelemetry import propagate
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    client = openai.OpenAI(base_url=f"{proxy.url}/rollout/ui-1/v1", api_key=proxy.key)
    provider = TracerProvider(resource=Resource.create({"service.name": "ui-agent"}))
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{proxy.url}/v1/traces", headers=proxy.headers))
    )
    question: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
    with provider.get_tracer("agent").start_as_current_span("agent.plan"):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        stub.script.append(Action(tool_call=True))
        first = client.chat.completions.create(model="policy", messages=question, extra_headers=carrier)
        call = first.choices[0].message.tool_calls[0]
        followup = [
            *question,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Paris is the capital."},
        ]
        client.chat.completions.create(model="policy", messages=followup, extra_headers=carrier)
    provider.shutdown()
    done = httpx.post(
        f"{proxy.url}/v1/rollouts/ui-1/finish",
        json={"status": "succeeded", "reward": 1.0},
        headers=proxy.headers,
    )
    assert done.status_code == 200, done.text
    eventually(
        lambda: len(sql(db, "SELECT 1 FROM llm_calls WHERE rollout_id = 'ui-1'")) == 2 or None,
        what="the agent's calls",
    )


def merged_rollout(db: str) -> None:
    """Two calls of one conversation as an engine records them: the second prompt holds the first
    prompt, its completion and a tool result (4 tokens), so the trainer makes one sample of it."""
    sql(db, "INSERT INTO rollouts (id, status, reward) VALUES ('tv-1', 'succeeded', 1)")
    first_prompt, first, tool, second = [1, 2, 3], [11, 12, 13], [21, 22, 23, 24], [31, 32]
    for seq, (prompt, completion) in enumerate(
        ((first_prompt, first), (first_prompt + first + tool, second))
    ):
        sql(
            db,
            """INSERT INTO llm_calls (span_id, rollout_id, seq, model, request, prompt_token_ids,
                                      completion_token_ids, completion_logprobs)
               VALUES ($1, 'tv-1', $2, 'policy', '{}', $3, $4, $5)""",
            f"tv-{seq}",
            seq,
            prompt,
            completion,
            [-0.5] * len(completion),
        )
    # A turn reward for the first call, and the rollout's own (final) reward.
    sql(
        db, "INSERT INTO rewards (rollout_id, span_id, value) VALUES ('tv-1', 'tv-0', 0.5), ('tv-1', NULL, 1)"
    )


def trained(db: str) -> None:
    """What the trainer leaves after STEPS steps: steps, versions, and rollouts served by them."""
    for step in range(1, STEPS + 1):
        sql(
            db,
            """INSERT INTO training_steps (policy, policy_in, policy_out, n_rollouts, n_tokens, loss,
                                           reward_mean, reward_std, metrics, finished_at)
               VALUES ('policy', $1, $2, 8, 800, $3, $4, 0.2, $5, now())""",
            step - 1,
            step,
            1.0 / step,
            0.2 * step,
            {"grad_norm": 2.0 / step, "kl_to_base": 0.01 * step},
        )
        sql(
            db,
            "INSERT INTO policy_versions (policy, version, base_model, status, live_at) "
            "VALUES ('policy', $1, 'tiny', $2, now())",
            step,
            "live" if step == STEPS else "retired",
        )
        sql(
            db,
            "INSERT INTO rollouts (id, status, reward, policy_version, mode) "
            "VALUES ($1, 'succeeded', $2, $3, $4)",
            f"v{step}",
            0.2 * step,
            step,
            "val" if step % 2 else "train",
        )


@pytest.fixture(scope="module")
def browser(proxy: Proxy) -> Iterator[Browser]:
    # After the proxy and its database (set up, and torn down, with asyncio.run): Playwright's
    # sync API keeps an event loop running in this thread while the browser is open.
    with running_browser() as b:
        yield b


@pytest.fixture
def page(browser: Browser, proxy: Proxy) -> Iterator[Watched]:
    context = browser.new_context(base_url=proxy.url)
    watched = Watched(context.new_page())
    yield watched
    context.close()
    assert not watched.errors, watched.errors


def sign_in(watched: Watched, key: str) -> Page:
    page = watched.page
    page.goto("/ui")
    expect(page).to_have_url(re.compile(r"/ui/login\?next=%2Fui$"))  # no session: the form first
    page.fill("#key", key)
    page.click("#sign-in button")
    return page


def test_a_wrong_key_gets_the_form_again_with_an_error(page: Watched, proxy: Proxy) -> None:
    page.allow("status of 401")
    p = sign_in(page, "sk-not-the-key")
    expect(p.locator("#key-error")).to_have_text("That key is not valid for this proxy.")
    expect(p.locator("#key")).to_have_attribute("aria-invalid", "true")
    assert "Traceback" not in p.content()
    page.screenshot("login-error")
    # The session cookie is never readable by a script, and a wrong key sets none.
    assert not [c for c in p.context.cookies() if c["name"] == "lightloop_session"]


def test_the_overview_draws_a_point_per_version_and_refreshes(
    page: Watched, proxy: Proxy, module_db: str
) -> None:
    p = sign_in(page, proxy.key)
    expect(p).to_have_url(re.compile(r"/ui$"))
    cookie = next(c for c in p.context.cookies() if c["name"] == "lightloop_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and proxy.key not in cookie["value"]
    versions = sql(module_db, "SELECT count(DISTINCT policy_version) AS n FROM reward_by_version")[0]["n"]
    chart = p.locator("#reward-chart")
    expect(chart).to_have_attribute("data-points", str(versions))
    expect(chart.locator("canvas")).to_have_count(1)
    expect(p.locator("#live-versions")).to_contain_text(f"v{STEPS}")
    expect(p.locator("#engines")).to_contain_text("healthy")
    expect(p.locator("#activity-chart canvas")).to_have_count(1)
    page.screenshot("overview")
    # A version made live meanwhile shows up without a reload.
    sql(
        module_db,
        "INSERT INTO rollouts (id, status, reward, policy_version) VALUES ('v9', 'succeeded', 1, 9)",
    )
    expect(chart).to_have_attribute("data-points", str(versions + 1), timeout=15_000)
    sql(module_db, "DELETE FROM rollouts WHERE id = 'v9'")


def test_training_charts_every_metric_over_the_steps(page: Watched, proxy: Proxy) -> None:
    p = sign_in(page, proxy.key)
    p.click("nav >> text=Training")
    for metric in ("loss", "reward-mean", "grad-norm", "kl-to-base"):
        expect(p.locator(f"#chart-{metric}")).to_have_attribute("data-points", str(STEPS))
    expect(p.locator("#steps tbody tr")).to_have_count(STEPS)
    page.screenshot("training")


def test_rollouts_filter_and_open_one_with_its_calls_tool_calls_and_agent_span(
    page: Watched, proxy: Proxy, module_db: str
) -> None:
    p = sign_in(page, proxy.key)
    p.click("nav >> text=Rollouts")
    total = sql(module_db, "SELECT count(*) AS n FROM rollouts")[0]["n"]
    expect(p.locator("#total")).to_contain_text(f"{total} rollouts")
    p.fill("input[name=reward_min]", "0.7")
    p.click("#filters button")
    expected = sql(module_db, "SELECT id FROM rollouts WHERE reward >= 0.7 ORDER BY created_at DESC")
    expect(p.locator("#rollouts tbody tr")).to_have_count(len(expected))
    page.screenshot("rollouts")
    p.click("text=ui-1")
    expect(p).to_have_url(re.compile(r"/ui/rollouts/ui-1$"))
    calls = p.locator(".event.call")
    expect(calls).to_have_count(2)
    expect(calls.nth(0)).to_contain_text("What is the capital of France?")
    expect(calls.nth(0).locator(".reply")).to_contain_text("tool call lookup")
    expect(calls.nth(1)).to_contain_text("Paris is the capital.")
    expect(p.locator(".event.span")).to_contain_text("agent.plan")
    expect(p.locator("#summary")).to_contain_text("succeeded")
    page.screenshot("rollout")


def test_bad_input_is_marked_and_unknown_rollouts_are_a_404_page(page: Watched, proxy: Proxy) -> None:
    p = sign_in(page, proxy.key)
    page.allow("status of 400")
    p.goto("/ui/rollouts?reward_min=high")
    expect(p.locator("input[name=reward_min]")).to_have_attribute("aria-invalid", "true")
    expect(p.locator("#filter-error")).to_contain_text("reward_min must be a number")
    page.screenshot("rollouts-bad-filter")
    page.allow("status of 404")
    answer = p.goto("/ui/rollouts/no-such-rollout")
    assert answer is not None and answer.status == 404
    expect(p.locator("h1")).to_have_text("Not found")
    expect(p.locator(".error")).to_contain_text("no-such-rollout")
    page.screenshot("rollout-404")


def test_a_page_with_no_data_says_so_and_signing_out_ends_the_session(page: Watched, proxy: Proxy) -> None:
    p = sign_in(page, proxy.key)
    p.click("nav >> text=Datasets")
    expect(p.locator("#datasets")).to_have_text("No dataset is loaded (lightloop tasks load).")
    page.screenshot("datasets-empty")
    p.click("text=Sign out")
    expect(p).to_have_url(re.compile(r"/ui/login$"))
    p.goto("/ui/training")
    expect(p).to_have_url(re.compile(r"/ui/login\?next=%2Fui%2Ftraining$"))


def test_the_trainers_view_marks_trained_and_masked_tokens(page: Watched, proxy: Proxy) -> None:
    p = sign_in(page, proxy.key)
    p.goto("/ui/rollouts/tv-1")
    # The first view reads the tokenizer from SmolLM2's GGUF (about 10 s here); later ones do not.
    expect(p.locator(".event.sample")).to_have_count(1, timeout=60_000)  # merged: one sample
    expect(p.locator("#samples .tokens > .tok.trained")).to_have_count(5)  # both completions
    expect(p.locator("#samples .tokens > .tok.masked")).to_have_count(4)  # the tool result
    # Each trained token says its turn's return: the first call's is its own 0.5 plus the final 1.
    first_turn, second_turn = (
        "id 11 · logprob -0.5000 · turn return 1.500",
        "id 31 · logprob -0.5000 · turn return 1",
    )
    expect(p.locator("#samples .tok.trained").first).to_have_attribute("title", first_turn)
    expect(p.locator("#samples .tok.trained").nth(3)).to_have_attribute("title", second_turn)
    credit = p.locator(".event.credit")
    expect(credit).to_have_attribute("data-credit", "rollout")
    expect(credit).to_contain_text("final reward 1")
    expect(credit).to_contain_text("1 call rewarded")
    expect(credit.locator(".formula")).to_contain_text("A = (R − mean_g R) / (std_g R + 1e−6)")
    p.click(".sample .turns summary")
    expect(p.locator(".sample .turns tbody tr")).to_have_count(2)
    expect(p.locator(".sample .turns tbody tr").nth(0)).to_contain_text("0.500")
    # Each token is shown as the policy's tokenizer decodes it, its id on hover.
    from lightloop.models import load_tokenizer  # here: importing it loads torch

    tokenizer = load_tokenizer("tiny", proxy.home / "models")
    expect(p.locator("#samples .tok.trained").first).to_have_text(tokenizer.decode([11]))
    expect(p.locator(".event.sample")).to_contain_text("3 prompt tokens")
    page.screenshot("trainers-view")
