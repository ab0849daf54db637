"""Proxy overhead: the same fast stub engine behind four front doors, measured in one run.

- direct: the client calls the stub itself;
- litellm: LiteLLM's proxy server app alone (what the policy lane avoids);
- lightloop-litellm-lane: `lightloop proxy`, a model routed through LiteLLM (recorded);
- lightloop-policy-lane: `lightloop proxy`, a policy model (token ids, recorded);
- lightloop-policy-lane-unrecorded: the same with LIGHTLOOP_PROXY__RECORD=false, so that
  `recording_cpu_share` = 1 - unrecorded/recorded CPU per call is what recording costs.

Each cell runs non-streamed (16-token) and streamed (100-chunk) chat calls at concurrency 1, 16
and 64 for a fixed time, and reports calls/s, p50/p99 latency, and the proxy process's CPU ms per
call (user + system, from /proc, Postgres excluded). Prints one JSON object.

Usage: python bench/proxy.py [--seconds 4] [--only policy,litellm]
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
from bench.common import clean_env, cpu_seconds, free_port, migrated_database, process

KEY = "sk-bench-" + "0123456789abcdef" * 4
MESSAGES = [{"role": "user", "content": "Benchmark me, please: a short question."}]


async def load(
    url: str, model: str, stream: bool, concurrency: int, seconds: float
) -> tuple[int, list[float]]:
    body = json.dumps(
        {"model": model, "messages": MESSAGES, "stream": stream, "max_tokens": 100 if stream else 16}
    ).encode()
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal errors
            n = 0
            while time.perf_counter() < deadline:
                # Each worker is one agent: its own rollout, so replicas and sessions behave as in use.
                h = {**headers, "x-lightloop-rollout": f"bench-{os.getpid()}-{i}"}
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=h) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)
                n += 1

        await asyncio.gather(*[worker(i) for i in range(concurrency)])
    if errors:
        raise SystemExit(f"{url}: {errors} calls failed")
    return len(latencies), latencies


def measure(
    name: str, url: str, model: str, proc: psutil.Process | None, seconds: float
) -> list[dict[str, Any]]:
    rows = []
    for stream in (False, True):
        asyncio.run(load(url, model, stream, 4, 1.0))  # warm up: connections, caches, JIT-less paths
        for concurrency in (1, 16, 64):
            cpu0 = cpu_seconds(proc) if proc else 0.0
            t0 = time.perf_counter()
            calls, latencies = asyncio.run(load(url, model, stream, concurrency, seconds))
            elapsed = time.perf_counter() - t0
            cpu = (cpu_seconds(proc) - cpu0) if proc else None
            latencies.sort()
            rows.append(
                {
                    "front": name,
                    "stream": stream,
                    "concurrency": concurrency,
                    "calls": calls,
                    "calls_per_s": round(calls / elapsed, 1),
                    "p50_ms": round(statistics.median(latencies) * 1000, 2),
                    "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2),
                    "proxy_cpu_ms_per_call": round(cpu * 1000 / calls, 3) if cpu is not None else None,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument(
        "--only",
        default="direct,litellm,lightloop-litellm-lane,lightloop-policy-lane,lightloop-policy-lane-unrecorded",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="lightloop-bench-proxy-"))
    env = clean_env(work / "home", KEY)
    with migrated_database(env) as database_url:
        run_fronts(args, only, work, env, database_url)


def run_fronts(
    args: argparse.Namespace, only: set[str], work: Path, env: dict[str, str], database_url: str
) -> None:
    stub_port = free_port()
    stub_url = f"http://127.0.0.1:{stub_port}"
    results: list[dict[str, Any]] = []
    lite_model = {
        "model_name": "lite",
        "litellm_params": {"model": "openai/stub", "api_base": f"{stub_url}/v1", "api_key": "none"},
    }
    with process(
        [sys.executable, "-m", "tests.support.stub_engine", "--port", str(stub_port), "--tokens", "100"],
        env,
        f"{stub_url}/health",
        work / "stub.log",
    ):
        if "direct" in only:
            results += measure("direct", f"{stub_url}/v1/chat/completions", "stub", None, args.seconds)
        if "litellm" in only:
            config = work / "litellm.yaml"
            config.write_text(yaml.safe_dump({"model_list": [lite_model]}))
            port = free_port()
            cmd = [
                sys.executable,
                "-m",
                "uvicorn",
                "litellm.proxy.proxy_server:app",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ]
            with process(
                cmd,
                {**env, "CONFIG_FILE_PATH": str(config)},
                f"http://127.0.0.1:{port}/health/liveliness",
                work / "litellm.log",
            ) as p:
                results += measure(
                    "litellm", f"http://127.0.0.1:{port}/v1/chat/completions", "lite", p, args.seconds
                )
        lanes = [
            ("lightloop-litellm-lane", "lite", True),
            ("lightloop-policy-lane", "policy", True),
            ("lightloop-policy-lane-unrecorded", "policy", False),
        ]
        for name, model, record in lanes:
            if name not in only:
                continue
            config = work / "lightloop.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "policy": [{"name": "policy", "base_model": "stub", "upstreams": [stub_url]}],
                        "model_list": [lite_model],
                    }
                )
            )
            port = free_port()
            cmd = [
                sys.executable,
                "-c",
                "from lightloop.cli import main; main()",
                "--config",
                str(config),
                "--log-level",
                "warning",
                "proxy",
                "--port",
                str(port),
            ]
            penv = {**env, "LIGHTLOOP_PROXY__RECORD": str(record).lower()}
            with process(cmd, penv, f"http://127.0.0.1:{port}/health", work / f"{name}.log", KEY) as p:
                results += measure(
                    name, f"http://127.0.0.1:{port}/v1/chat/completions", model, p, args.seconds
                )
    summary = summarize(results)
    print(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "seconds_per_cell": args.seconds,
                "results": results,
                "summary": summary,
            },
            indent=1,
        )
    )


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    def cell(front: str, stream: bool, concurrency: int) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in results
                if r["front"] == front and r["stream"] == stream and r["concurrency"] == concurrency
            ),
            None,
        )

    out: dict[str, Any] = {}
    for stream in (False, True):
        kind = "streamed" if stream else "non_streamed"
        policy, lite, bare = (
            cell(f, stream, 64) for f in ("lightloop-policy-lane", "lightloop-litellm-lane", "litellm")
        )
        unrecorded = cell("lightloop-policy-lane-unrecorded", stream, 64)
        if policy and bare:
            out[f"{kind}_policy_over_litellm_calls_per_s_c64"] = round(
                policy["calls_per_s"] / bare["calls_per_s"], 2
            )
        if policy:
            out[f"{kind}_policy_cpu_ms_per_call_c64"] = policy["proxy_cpu_ms_per_call"]
        if lite:
            out[f"{kind}_litellm_lane_cpu_ms_per_call_c64"] = lite["proxy_cpu_ms_per_call"]
        if bare:
            out[f"{kind}_bare_litellm_cpu_ms_per_call_c64"] = bare["proxy_cpu_ms_per_call"]
        if policy and unrecorded:
            out[f"{kind}_recording_cpu_share_c64"] = round(
                1 - unrecorded["proxy_cpu_ms_per_call"] / policy["proxy_cpu_ms_per_call"], 3
            )
    return out


if __name__ == "__main__":
    main()
