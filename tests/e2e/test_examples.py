"""The examples of examples/, run the way users run them: `lightloop tasks load` and
`lightloop run` as processes, against the proxy in front of `lightloop engine --model tiny` (a
random model: the agents must survive its garbage), checked with SQL."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
from pathlib import Path

import pytest

from tests.conftest import LIGHTLOOP, REPO
from tests.e2e.conftest import clean_env, start_proxy
from tests.e2e.test_proxy import sql

EXAMPLES = REPO / "examples"
# Each example and its tasks.
CASES = {
    "arithmetic": "arithmetic.jsonl",
    "calculator_tool": "sums.jsonl",
    "langgraph_react": "sums.jsonl",
    "openai_agents": "sums.jsonl",
    "autogen_assistant": "sums.jsonl",
    "solver_checker": "sums.jsonl",
}
# Agents with adapters of their own, per example (the policy's `agents:`).
AGENTS = {"solver_checker": {"solver": {}, "checker": {}}}


def test_every_example_defines_agent_and_is_in_the_readme() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    files = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert files == sorted(CASES)
    for name in files:
        source = (EXAMPLES / f"{name}.py").read_text()
        module = ast.parse(source)
        assert ast.get_docstring(module), f"{name}.py has no module docstring"
        agents = [
            node
            for node in module.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "agent"
        ]
        assert agents and len(agents[0].args.args) == 2, f"{name}.py: no agent(task, llm)"
        assert f"examples/{name}.py:agent" in readme, f"{name}.py is not in examples/README.md"
        assert (EXAMPLES / CASES[name]).is_file()
        # The runner puts the file's folder first on sys.path: a file named like a module it
        # imports (autogen_agentchat.py) would shadow that module.
        assert importlib.util.find_spec(name) is None, f"{name}.py shadows an installed module"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_through_the_runner(name: str, tmp_path: Path, engine: str, db_url: str) -> None:
    home = tmp_path / "home"
    policy = {"name": "policy", "base_model": "tiny", "upstreams": [engine], "agents": AGENTS.get(name, {})}
    proxy = start_proxy(home, db_url, {"policy": [policy]})
    env = {**clean_env(), "LIGHTLOOP_DATABASE_URL": db_url, "LIGHTLOOP_HOME": str(home)}

    def lightloop(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LIGHTLOOP, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=240, check=False
        )

    try:
        loaded = lightloop("tasks", "load", f"examples/{CASES[name]}", "--dataset", "ex", "--group-size", "2")
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        ran = lightloop(
            "run", f"examples/{name}.py:agent", "--dataset", "ex", "--proxy", proxy.url, "--key", proxy.key,
            "--max-tasks", "4", "--concurrency", "2", "--quiet",
        )  # fmt: skip
        assert ran.returncode == 0, ran.stdout + ran.stderr
        # --max-tasks counts rollouts: two tasks' groups of two.

        rollouts = sql(
            db_url,
            """SELECT r.id, r.status, r.metadata ? 'error' AS errored, r.metadata->>'error' AS error,
                      count(c.*) FILTER (WHERE c.model = 'policy'
                                         AND cardinality(c.completion_token_ids) > 0) AS calls
               FROM rollouts r LEFT JOIN llm_calls c ON c.rollout_id = r.id
               WHERE r.dataset = 'ex' AND r.status IN ('succeeded', 'failed')
               GROUP BY r.id""",
        )
        output = ran.stdout + ran.stderr
        assert len(rollouts) == 4, (rollouts, output)
        assert not [r for r in rollouts if r["errored"]], ([r["error"] for r in rollouts], output)
        without = [r["id"] for r in rollouts if r["calls"] < 1]
        if without:  # say everything that was recorded about them (a failure seen once in CI)
            calls = sql(
                db_url,
                """SELECT rollout_id, model, cardinality(completion_token_ids) AS ids, finish_reason,
                          left(response::text, 300) AS response FROM llm_calls WHERE rollout_id = ANY($1)""",
                without,
            )
            spans = sql(db_url, "SELECT rollout_id, name FROM spans WHERE rollout_id = ANY($1)", without)
            raise AssertionError(
                f"rollouts without a recorded policy call: {without}\ncalls: {[dict(c) for c in calls]}\n"
                f"spans: {[dict(x) for x in spans]}\nrunner: {output[-3000:]}\n"
                f"proxy: {proxy.log_text()[-5000:]}"
            )
        if name in AGENTS:  # each agent's calls recorded as its own (served by the policy's
            # adapter until the agent has a version of its own)
            served = sql(
                db_url,
                """SELECT c.agent, c.adapter, count(*) AS n
                   FROM llm_calls c JOIN rollouts r ON r.id = c.rollout_id
                   WHERE r.dataset = 'ex' GROUP BY 1, 2 ORDER BY 1""",
            )
            assert [(r["agent"], r["adapter"], r["n"]) for r in served] == [
                ("checker", "policy", 4),
                ("solver", "policy", 4),
            ]
    finally:
        proxy.stop()
