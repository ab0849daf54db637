"""Prompt optimisation on this machine's CPU: `lightloop optimize-prompt` with SmolLM2-135M as both
the task model and the reflection model (the policy itself, through the proxy), on the demo's
task (opposite-choice: "What is the opposite of 'hot'? Choose from: ..."), whose agent
(`lightloop.demo:agent`) sends the system prompt "Reply with the answer only, one word." as it
always does. The proxy serves each candidate to it unchanged.

Reported, as one JSON object: the val reward of the baseline and of the best candidate (GEPA's
own scores, on the same val tasks, greedy), rollouts used (evaluations), reflection calls,
candidates (each with its parent, val score and text), failed proposals, and wall time.

Usage: python bench/prompts.py [--budget 60] [--val 16] [--train 32] [--minibatch 3]
                               [--concurrency 4] [--model smollm2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import CLI, clean_env, free_port, migrated_database, process
from lightloop.demo_tasks import OppositeChoice, split

KEY = "sk-bench-" + "0123456789abcdef" * 4
AGENT = "lightloop.demo:agent"


def cli(env: dict[str, str], *args: str, timeout: float = 3600) -> str:
    done = subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"lightloop {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--val", type=int, default=16)
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--minibatch", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lightloop-bench-prompts-") as tmp:
        work = Path(tmp)
        env = clean_env(work / "home", KEY)
        with migrated_database(env) as db_url:
            engine_port, proxy_port = free_port(), free_port()
            engine_url = f"http://127.0.0.1:{engine_port}"
            proxy_url = f"http://127.0.0.1:{proxy_port}"
            config = work / "lightloop.yaml"
            policy = {"name": "policy", "base_model": args.model, "upstreams": [engine_url]}
            config.write_text(yaml.safe_dump({"policy": [policy]}))
            engine_cmd = [*CLI, "engine", "--model", args.model, "--port", str(engine_port)]
            proxy_cmd = [
                *CLI,
                "--config",
                str(config),
                "--log-level",
                "warning",
                "proxy",
                "--port",
                str(proxy_port),
            ]
            with (
                process(engine_cmd, env, f"{engine_url}/health", work / "engine.log"),
                process(proxy_cmd, env, f"{proxy_url}/health", work / "proxy.log", KEY),
            ):
                result = run(args, env, db_url, proxy_url, work)
    result.update(
        {
            "benchmark": "prompts",
            "model": args.model,
            "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        }
    )
    print(json.dumps(result, indent=2))


def run(
    args: argparse.Namespace, env: dict[str, str], db_url: str, proxy: str, work: Path
) -> dict[str, object]:
    train, val = split("opposite-choice")
    for name, tasks in (("train", train[: args.train]), ("val", val[: args.val])):
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(t.row()) + "\n" for t in tasks))
        cli(env, "tasks", "load", str(path), "--dataset", "opp", "--split", name)
    prompt = work / "system.txt"
    prompt.write_text(OppositeChoice.system)
    cli(env, "prompts", "add", "system", "--text-file", str(prompt), "--model", "policy")
    # The agent's ordinary traffic first (optimize-prompt refuses a baseline no call has sent).
    cli(env, "run", AGENT, "--dataset", "opp", "--split", "val", "--max-tasks", "2", "--proxy", proxy,
        "--key", KEY, "--quiet")  # fmt: skip
    started = time.perf_counter()
    out = cli(
        env, "optimize-prompt", "system", "--dataset", "opp", "--agent", AGENT,
        "--reflection-model", "policy", "--budget", str(args.budget), "--minibatch", str(args.minibatch),
        "--concurrency", str(args.concurrency), "--proxy", proxy, "--key", KEY, "--quiet",
    )  # fmt: skip
    wall = time.perf_counter() - started
    rows = json.loads(
        cli(
            env, "sql", "--json",
            "SELECT r.id, r.metric_calls, r.proposals_failed, r.best_version, "
            "(SELECT count(*) FROM rollouts WHERE prompt_run = r.id) AS rollouts, "
            "(SELECT count(*) FROM llm_calls WHERE agent = 'lightloop-optimizer') AS reflections, "
            "(SELECT json_agg(json_build_object('version', v.version, 'parent', v.parent, "
            "                 'score', v.score, 'text', v.text) ORDER BY v.version) "
            " FROM prompt_versions v WHERE v.name = r.name) "
            "AS versions FROM prompt_runs r",
        )
    )  # fmt: skip
    (row,) = rows
    versions = row["versions"]
    best = next(v for v in versions if v["version"] == row["best_version"])
    return {
        "val_tasks": args.val,
        "train_tasks": args.train,
        "budget": args.budget,
        "baseline_val_reward": versions[0]["score"],
        "best_val_reward": best["score"],
        "best_version": best["version"],
        "best_text": best["text"],
        "rollouts": row["rollouts"],
        "metric_calls": row["metric_calls"],
        "reflection_calls": row["reflections"],
        "candidates": len(versions) - 1,
        # What the reflection model proposed, with each candidate's val score where GEPA scored it.
        "versions": [
            {"version": v["version"], "parent": v["parent"], "score": v["score"], "text": v["text"][:300]}
            for v in versions
        ],
        "proposals_failed": row["proposals_failed"],
        "wall_s": round(wall, 1),
        "cli_output": out.strip().splitlines(),
    }


if __name__ == "__main__":
    main()
