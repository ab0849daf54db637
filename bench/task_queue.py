"""The task queue end to end, in the scenarios of Agent Lightning v0.3's store benchmark
(runners x LLM turns per rollout: 32x6, 100x10, 300x6, 1000x3).

Each runner is a loop in this process (aiohttp, one connection each): take a rollout from
`POST /v1/tasks/next`, send its turns through the rollout's `base_url` (the proxy's policy lane,
recorded to Postgres) to the stub engine, and finish it with a reward. The conversation grows
turn by turn from a ~1,000-token first prompt, as an agent's does. Reported per scenario:
rollouts/s and calls/s over the whole scenario (from the first hand-out to the last finish),
p50/p99 of a hand-out, and the proxy's CPU ms per rollout. Prints one JSON object.

Usage: python bench/task_queue.py [--scenarios 32x6,100x10,300x6,1000x3] [--rollouts 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import CLI, clean_env, cpu_seconds, free_port, migrated_database, process
from lightloop.store import connect, load_tasks

KEY = "sk-bench-" + "0123456789abcdef" * 4
# Agent Lightning v0.3's published scenarios (runners, LLM turns per rollout).
SCENARIOS = [(32, 6), (100, 10), (300, 6), (1000, 3)]
# About 1,000 tokens of a task description (SmolLM2's tokenizer: ~4.3 characters a token).
PROMPT = " ".join(f"Step {i}: read the ledger row, check the amount against the invoice." for i in range(62))


async def runner(
    session: aiohttp.ClientSession,
    proxy: str,
    dataset: str,
    turns: int,
    index: int,
    handouts: list[float],
    counts: dict[str, int],
) -> None:
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    waited = 0
    while True:
        t0 = time.perf_counter()
        async with session.post(
            f"{proxy}/v1/tasks/next", json={"dataset": dataset, "worker": f"bench:{index}"}, headers=headers
        ) as answer:
            if answer.status == 204:
                if answer.headers.get("x-lightloop-queue") == "drained":
                    return
                waited += 1  # every task started, some still running: poll as `lightloop run` does
                await asyncio.sleep(min(0.05 * 2**waited, 2.0))
                continue
            if answer.status != 200:
                raise SystemExit(f"tasks/next: HTTP {answer.status}: {(await answer.text())[:300]}")
            got = await answer.json()
        handouts.append(time.perf_counter() - t0)
        waited = 0
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a careful bookkeeping agent."},
            {"role": "user", "content": f"{PROMPT}\nTask: {got['input']['question']}"},
        ]
        for turn in range(turns):
            body = {"model": got["model"], "messages": messages, "max_tokens": 16}
            async with session.post(
                f"{got['base_url']}/chat/completions", json=body, headers=headers
            ) as call:
                if call.status != 200:
                    raise SystemExit(f"chat: HTTP {call.status}: {(await call.text())[:300]}")
                reply = (await call.json())["choices"][0]["message"]["content"]
            counts["calls"] += 1
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": f"Tool result {turn}: row {index} matches; continue."},
            ]
        async with session.post(
            f"{proxy}/v1/rollouts/{got['rollout_id']}/finish",
            json={"status": "succeeded", "reward": 1.0, "attempt": got["attempt"]},
            headers=headers,
        ) as done:
            if done.status != 200:
                raise SystemExit(f"finish: HTTP {done.status}: {(await done.text())[:300]}")
        counts["rollouts"] += 1


async def load_dataset(database_url: str, name: str, rollouts: int, group_size: int) -> None:
    conn = await connect(database_url)
    try:
        rows = [{"id": f"t{i}", "question": f"Reconcile ledger {i}."} for i in range(rollouts // group_size)]
        await load_tasks(conn, name, "train", rows, group_size=group_size, policy="policy")
    finally:
        await conn.close()


async def scenario(
    proxy: str, database_url: str, runners: int, turns: int, rollouts: int, group_size: int
) -> dict[str, Any]:
    name = f"bench-{runners}x{turns}-{os.getpid()}"
    await load_dataset(database_url, name, rollouts, group_size)
    handouts: list[float] = []
    counts = {"rollouts": 0, "calls": 0}
    connector = aiohttp.TCPConnector(limit=runners + 8)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=300)
    ) as session:
        t0 = time.perf_counter()
        await asyncio.gather(
            *[runner(session, proxy, name, turns, i, handouts, counts) for i in range(runners)]
        )
        elapsed = time.perf_counter() - t0
    handouts.sort()
    return {
        "scenario": f"{runners}x{turns}",
        "runners": runners,
        "turns": turns,
        "rollouts": counts["rollouts"],
        "calls": counts["calls"],
        "seconds": round(elapsed, 2),
        "rollouts_per_s": round(counts["rollouts"] / elapsed, 1),
        "calls_per_s": round(counts["calls"] / elapsed, 1),
        "handout_p50_ms": round(statistics.median(handouts) * 1000, 2),
        "handout_p99_ms": round(handouts[min(len(handouts) - 1, int(len(handouts) * 0.99))] * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", default=",".join(f"{r}x{t}" for r, t in SCENARIOS))
    parser.add_argument(
        "--rollouts", type=int, default=2000, help="Rollouts per scenario (at least 4 per runner)."
    )
    parser.add_argument("--group-size", type=int, default=4, help="Rollouts per task (one GRPO group).")
    parser.add_argument(
        "--proxy-workers",
        type=int,
        default=1,
        help="LIGHTLOOP_PROXY__WORKERS: proxy processes sharing the port.",
    )
    args = parser.parse_args()
    scenarios = [tuple(int(x) for x in s.split("x")) for s in args.scenarios.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lightloop-bench-queue-"))
    env = clean_env(work / "home", KEY)
    env.update(
        {
            # The benchmark measures the queue, not the staleness rule: no trainer consumes.
            "LIGHTLOOP_QUEUE__MAX_GROUPS_IN_FLIGHT": "0",
            "LIGHTLOOP_QUEUE__LEASE_S": "600",
            "LIGHTLOOP_PROXY__WORKERS": str(args.proxy_workers),
        }
    )
    with migrated_database(env) as database_url:
        results = run_scenarios(scenarios, args, work, env, database_url)
    print(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(),
                },
                "rollouts_per_scenario": args.rollouts,
                "group_size": args.group_size,
                "proxy_workers": args.proxy_workers,
                "agent_lightning_v0_3_rollouts_per_s": (
                    "9 to 50 (32- and 64-core VMs; best 50/s, MongoDB, 1000x3)"
                ),
                "results": results,
            },
            indent=1,
        )
    )


def cpu_by_part(proxy: psutil.Process, stub: psutil.Process) -> dict[str, float]:
    postgres = 0.0
    for p in psutil.process_iter(["name", "cpu_times"]):
        if (p.info["name"] or "").startswith("postgres") and p.info["cpu_times"] is not None:
            postgres += p.info["cpu_times"].user + p.info["cpu_times"].system
    own = psutil.Process().cpu_times()
    return {
        "proxy": cpu_seconds(proxy),
        "runners": own.user + own.system,
        "stub_engine": cpu_seconds(stub),
        "postgres": postgres,
    }


def run_scenarios(
    scenarios: list[tuple[int, ...]],
    args: argparse.Namespace,
    work: Path,
    env: dict[str, str],
    database_url: str,
) -> list[dict[str, Any]]:
    stub_port = free_port()
    stub_url = f"http://127.0.0.1:{stub_port}"
    config = work / "lightloop.yaml"
    config.write_text(
        yaml.safe_dump({"policy": [{"name": "policy", "base_model": "stub", "upstreams": [stub_url]}]})
    )
    port = free_port()
    proxy = f"http://127.0.0.1:{port}"
    results = []
    with (
        process(
            [sys.executable, "-m", "tests.support.stub_engine", "--port", str(stub_port), "--tokens", "16"],
            env,
            f"{stub_url}/health",
            work / "stub.log",
        ) as stub_proc,
        process(
            [*CLI, "--config", str(config), "--log-level", "warning", "proxy", "--port", str(port)],
            env,
            f"{proxy}/health",
            work / "proxy.log",
            KEY,
        ) as proxy_proc,
    ):
        asyncio.run(scenario(proxy, database_url, 8, 2, 64, args.group_size))  # warm-up
        for runners, turns in scenarios:
            before = cpu_by_part(proxy_proc, stub_proc)
            rollouts = max(args.rollouts, 4 * runners)
            row = asyncio.run(scenario(proxy, database_url, runners, turns, rollouts, args.group_size))
            after = cpu_by_part(proxy_proc, stub_proc)
            # Where the CPU went, per rollout: the proxy is lightloop; the runners (this
            # process), the stub engine and Postgres share the same cores.
            for part, seconds in after.items():
                used = (seconds - before[part]) * 1000 / row["rollouts"]
                row[f"{part}_cpu_ms_per_rollout"] = round(used, 2)
            row["load_average_1m"] = round(psutil.getloadavg()[0], 2)
            print(json.dumps(row), file=sys.stderr)
            results.append(row)
    return results


if __name__ == "__main__":
    main()
