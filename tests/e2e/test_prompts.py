"""Prompts served on the wire and optimised with GEPA, against real processes: the proxy in front
of a stub model that echoes the system prompt it was served (so an agent's reward depends on the
prompt's wording) and a stub reflection model that proposes known rewrites; the CLI, the runner
and Postgres are real."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import LIGHTLOOP, REPO
from tests.e2e.conftest import Proxy, eventually, start_proxy
from tests.e2e.test_proxy import sql
from tests.e2e.test_queue import cli_env, lightloop
from tests.support.agents import KEYWORD_BASELINE
from tests.support.stub_engine import StubEngine, running_stub

pytestmark = pytest.mark.timeout(300)
AGENT = "tests/support/agents.py:keyword_agent"
BASELINE = "You are a careful assistant.\nAnswer in one line."
KEYWORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")


def system_text(body: dict[str, Any]) -> str:
    return next((m["content"] for m in body.get("messages", []) if m.get("role") == "system"), "")


class Reflector:
    """A deterministic reflection model: it appends "Mention K." for each keyword the feedback
    in GEPA's prompt says is missing. Its second request can be held, to kill the run mid-way."""

    def __init__(self) -> None:
        self.requests = 0
        self.empty = False  # answer with no prompt at all
        self.hold_at: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()

    def __call__(self, body: dict[str, Any]) -> str:
        self.requests += 1
        if self.requests == self.hold_at:
            self.held.set()
            self.release.wait(60)
        if self.empty:
            return "  "
        prompt = body["messages"][-1]["content"]
        current = prompt.split("```\n", 1)[1].split("\n```", 1)[0]
        missing = sorted(set(re.findall(r"MISSING keyword '(\w+)'", prompt)))
        return "Improved:\n```\n" + current + "".join(f" Mention {k}." for k in missing) + "\n```"


@pytest.fixture(scope="module")
def model() -> Iterator[StubEngine]:
    with running_stub(tokens=64) as stub:
        stub.reply = system_text
        yield stub


@pytest.fixture(scope="module")
def reflector() -> Iterator[tuple[StubEngine, Reflector]]:
    with running_stub() as stub:
        logic = Reflector()
        stub.reply = logic
        yield stub, logic


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory,
    model: StubEngine,
    reflector: tuple[StubEngine, Reflector],
    module_db: str,
) -> Iterator[Proxy]:
    config = {
        "policy": [{"name": "policy", "base_model": "stub-base", "upstreams": [model.url]}],
        "model_list": [
            {
                "model_name": "hosted",
                "litellm_params": {"model": "openai/hosted", "api_base": f"{model.url}/v1", "api_key": "x"},
            },
            {
                "model_name": "reflector",
                "litellm_params": {
                    "model": "openai/reflector",
                    "api_base": f"{reflector[0].url}/v1",
                    "api_key": "x",
                },
            },
        ],
    }
    p = start_proxy(tmp_path_factory.mktemp("prompts-home"), module_db, config)
    yield p
    p.stop()


def cli(proxy: Proxy, db: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return lightloop(cli_env(proxy.home, db), *args, timeout=timeout)


def test_an_unchanged_agent_gets_the_live_version_on_both_lanes(
    proxy: Proxy, model: StubEngine, module_db: str, tmp_path: Path
) -> None:
    (tmp_path / "base.txt").write_text(BASELINE + "\n")
    (tmp_path / "v1.txt").write_text("Be precise.")
    added = cli(proxy, module_db, "prompts", "add", "system", "--text-file", str(tmp_path / "base.txt"))
    assert added.returncode == 0 and "version 0 (baseline) is live" in added.stdout, added.stderr
    assert (
        "staged"
        in cli(proxy, module_db, "prompts", "add", "system", "--text-file", str(tmp_path / "v1.txt")).stdout
    )
    assert cli(proxy, module_db, "prompts", "set-live", "system", "1").returncode == 0
    listed = cli(proxy, module_db, "prompts", "list").stdout
    assert "system" in listed and "| 1 " in listed  # live version 1, of 2 versions
    shown = cli(proxy, module_db, "prompts", "show", "system").stdout
    assert "retired" in shown and "baseline" in shown and shown.endswith("Be precise.\n")
    assert cli(proxy, module_db, "prompts", "show", "system", "--version", "0").stdout == BASELINE + "\n\n"
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.key, max_retries=0)

    def ask(model_name: str, system: str, rollout: str) -> str:
        client.chat.completions.create(
            model=model_name,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
            extra_headers={"X-Lightloop-Rollout": rollout},
        )
        return system_text(model.requests[-1])

    # The proxy reads the new live version on the NOTIFY; the first call may race it.
    eventually(
        lambda: ask("policy", f"  {BASELINE}  ", "warmup") == "Be precise.", what="the live version served"
    )
    assert ask("policy", f"\n{BASELINE}\n", "lane-policy") == "Be precise."
    assert ask("hosted", BASELINE, "lane-litellm") == "Be precise."
    partial = f"{BASELINE} Also mind the units."
    assert ask("policy", partial, "untouched") == partial  # only a whole message is the baseline
    rows = eventually(
        lambda: (
            (
                r := sql(
                    module_db,
                    "SELECT rollout_id, model, prompt_name, prompt_version, "
                    "request -> 'messages' -> 0 ->> 'content' AS sent FROM llm_calls "
                    "WHERE rollout_id IN ('lane-policy', 'lane-litellm', 'untouched')",
                )
            )
            and len(r) == 3
            and r
        ),
        what="the three calls recorded",
    )
    by = {r["rollout_id"]: r for r in rows}
    for rollout in ("lane-policy", "lane-litellm"):
        assert (by[rollout]["prompt_name"], by[rollout]["prompt_version"], by[rollout]["sent"]) == (
            "system",
            1,
            "Be precise.",
        )
    assert by["untouched"]["prompt_name"] is None and by["untouched"]["sent"] == partial
    # An agent that prefers to ask.
    got = httpx.get(f"{proxy.url}/v1/prompts/system", headers=proxy.headers)
    assert got.status_code == 200 and got.json()["version"] == 1 and got.json()["text"] == "Be precise."
    in_rollout = httpx.get(f"{proxy.url}/rollout/r-1/v1/prompts/system", headers=proxy.headers).json()
    assert in_rollout["rollout_id"] == "r-1" and in_rollout["text"] == "Be precise."
    missing = httpx.get(f"{proxy.url}/v1/prompts/nope", headers=proxy.headers)
    assert missing.status_code == 404 and "not registered" in missing.json()["error"]["message"]
    assert httpx.get(f"{proxy.url}/v1/prompts/system").status_code == 401


def test_prompt_commands_refuse_bad_input_in_one_line(proxy: Proxy, module_db: str, tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("x")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    for args, says in (
        (("prompts", "show", "nope"), "not registered"),
        (("prompts", "set-live", "nope", "1"), "not registered"),
        (("prompts", "set-live", "system", "9"), "no version 9"),
        (("prompts", "add", "bad name!", "--text-file", str(tmp_path / "t.txt")), "not valid"),
        (("prompts", "add", "x", "--text-file", str(tmp_path / "bin.txt")), "not UTF-8"),
        (("prompts", "add", "system", "--text-file", str(tmp_path / "t.txt"), "--agent", "a"), "--agent"),
    ):
        done = cli(proxy, module_db, *args)
        assert done.returncode != 0 and says in done.stderr and "Traceback" not in done.stderr, (
            args,
            done.stderr,
        )


def _load(proxy: Proxy, db: str, tmp_path: Path) -> None:
    for split, words in (("train", KEYWORDS), ("val", KEYWORDS[:4])):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(f'{{"id": "{split}-{w}", "keyword": "{w}"}}\n' for w in words))
        loaded = cli(proxy, db, "tasks", "load", str(path), "--dataset", "kw", "--split", split)
        assert loaded.returncode == 0, loaded.stderr


def _optimize(proxy: Proxy, *extra: str) -> list[str]:
    return [
        LIGHTLOOP,
        "optimize-prompt",
        "kw",
        "--dataset",
        "kw",
        "--agent",
        AGENT,
        "--reflection-model",
        "reflector",
        "--budget",
        "40",
        "--minibatch",
        "2",
        "--concurrency",
        "2",
        "--proxy",
        proxy.url,
        "--key",
        proxy.key,
        "--quiet",
        *extra,
    ]


@pytest.mark.timeout(600)
def test_gepa_finds_a_better_prompt_through_the_queue_and_resumes_after_kill_9(
    proxy: Proxy,
    model: StubEngine,
    reflector: tuple[StubEngine, Reflector],
    module_db: str,
    tmp_path: Path,
) -> None:
    env = cli_env(proxy.home, module_db)
    (tmp_path / "kw.txt").write_text(KEYWORD_BASELINE)
    assert (
        cli(
            proxy,
            module_db,
            "prompts",
            "add",
            "kw",
            "--text-file",
            str(tmp_path / "kw.txt"),
            "--model",
            "policy",
        ).returncode
        == 0
    )
    _load(proxy, module_db, tmp_path)
    # No recorded call holds the baseline yet: refused before any budget is spent.
    refused = subprocess.run(_optimize(proxy), env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (
        refused.returncode == 1 and "checked the" in refused.stderr and "most recent calls" in refused.stderr
    )
    assert sql(module_db, "SELECT count(*) AS n FROM prompt_runs")[0]["n"] == 0
    unknown = subprocess.run(
        [*_optimize(proxy)[:2], "nope", *_optimize(proxy)[3:]],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert unknown.returncode == 1 and "'nope' is not registered" in unknown.stderr
    assert "Traceback" not in unknown.stderr + refused.stderr
    no_run = cli(proxy, module_db, "run", AGENT, "--dataset", "kw", "--prompt-run", "po-nope",
                 "--proxy", proxy.url, "--key", proxy.key, "--quiet")  # fmt: skip
    assert no_run.returncode == 1 and "does not exist" in no_run.stderr
    ran = cli(proxy, module_db, "run", AGENT, "--dataset", "kw", "--split", "val", "--proxy", proxy.url,
              "--key", proxy.key, "--quiet")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    # A reflection model that never proposes anything: each failure is counted, the search goes
    # on, and once every proposal so far failed it stops with the model's answer.
    logic = reflector[1]
    logic.empty = True
    asked = logic.requests
    hopeless = subprocess.run(
        _optimize(proxy), env=env, cwd=REPO, capture_output=True, text=True, timeout=200
    )
    logic.empty = False
    assert hopeless.returncode == 1 and "every proposal failed" in hopeless.stderr, hopeless.stderr[-2000:]
    assert "returned no prompt" in hopeless.stderr and "Traceback" not in hopeless.stderr
    (failed,) = sql(module_db, "SELECT status, proposals_failed, error FROM prompt_runs")
    # One count per failed proposal (GEPA's immediate retry of it is not another), four in a row.
    assert failed["status"] == "failed" and failed["proposals_failed"] == 4 and "no prompt" in failed["error"]
    assert logic.requests - asked == 4
    # The run, killed with SIGKILL while it waits for its second reflection.
    logic.hold_at = logic.requests + 2
    first = subprocess.Popen(
        _optimize(proxy), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert logic.held.wait(240), "the run never asked for a second reflection"
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        logic.release.set()
        if first.poll() is None:
            first.kill()
    (run,) = sql(
        module_db,
        "SELECT id, status, state IS NOT NULL AS saved, metric_calls FROM prompt_runs "
        "WHERE status <> 'failed'",
    )
    assert run["status"] == "running" and run["saved"], run
    before = {
        (r["prompt_version"], r["mode"], r["task_id"]): r["id"]
        for r in sql(
            module_db,
            "SELECT id, prompt_version, mode, task_id FROM rollouts WHERE prompt_run = $1",
            run["id"],
        )
    }
    scored_before = {
        r["version"]
        for r in sql(module_db, "SELECT version FROM prompt_versions WHERE name = 'kw' AND score IS NOT NULL")
    }
    assert scored_before, "no candidate was scored before the kill"
    # The same command resumes it, with a runner on "another machine" helping.
    helper = subprocess.Popen(
        [LIGHTLOOP, "run", AGENT, "--dataset", "kw", "--prompt-run", run["id"], "--proxy", proxy.url,
         "--key", proxy.key, "--quiet"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        second = subprocess.run(
            _optimize(proxy, "--apply"), env=env, cwd=REPO, capture_output=True, text=True, timeout=400
        )
        # It waited between the batches, and stops once the run ended.
        _, helped = helper.communicate(timeout=60)
    finally:
        if helper.poll() is None:
            helper.kill()
    assert helper.returncode == 0, helped[-2000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"run {run['id']} (resumed)" in second.stdout
    # GEPA went on from its saved state: its count of evaluations never fell back below what
    # the killed run had reached (a fresh search would start again from the seed's few).
    used = [int(n) for n in re.findall(r": (\d+)/40 evaluations", second.stderr)]
    assert used and min(used) >= run["metric_calls"] > 0, (used, run["metric_calls"])
    after = sql(
        module_db, "SELECT id, prompt_version, mode, task_id FROM rollouts WHERE prompt_run = $1", run["id"]
    )
    for r in after:  # what was evaluated before the kill was read back, never evaluated again
        key = (r["prompt_version"], r["mode"], r["task_id"])
        assert before.get(key, r["id"]) == r["id"]
    for version in scored_before:
        new_val = [
            r for r in after if r["prompt_version"] == version and r["mode"] == "val" and key_new(r, before)
        ]
        assert not new_val, f"v{version} was scored on val again after the resume"
    versions = sql(module_db, "SELECT * FROM prompt_versions WHERE name = 'kw' ORDER BY version")
    (live,) = [v for v in versions if v["status"] == "live"]
    baseline = versions[0]
    assert live["version"] > 0 and live["origin"] == "optimiser" and live["parent"] is not None
    assert live["score"] > (baseline["score"] or 0.0) and "Mention" in live["text"]
    assert set(live["scores"]) == {f"val-{w}" for w in KEYWORDS[:4]} and live["scored_on"] == "kw/val"
    assert f"version {live['version']} is live" in second.stdout
    # The reflection model's calls went through the proxy and were recorded as the optimiser's.
    reflections = sql(
        module_db,
        "SELECT count(*) AS n FROM llm_calls WHERE model = 'reflector' AND agent = 'lightloop-optimizer'",
    )
    assert reflections[0]["n"] >= 2
    # --apply: the next rollout of the unchanged agent is served the best text.
    model.requests.clear()
    again = cli(proxy, module_db, "run", AGENT, "--dataset", "kw", "--split", "train", "--max-tasks", "1",
                "--proxy", proxy.url, "--key", proxy.key, "--quiet")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert system_text(model.requests[-1]) == live["text"]


def key_new(row: dict[str, Any], before: dict[tuple[Any, ...], str]) -> bool:
    return (row["prompt_version"], row["mode"], row["task_id"]) not in before
