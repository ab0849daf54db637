"""Proxy overhead: the same fast stub engine behind each front door, measured in one run.

- direct: the client calls the stub itself;
- litellm: LiteLLM's proxy server alone, tuned for throughput as its docs advise (logging at
  ERROR, no verbose or spend logging, no database), one worker like the others;
- agl-v1: Agent Lightning v1's LLM proxy (`agentlightning==1.0.2`, in its own virtual
  environment made here under .cache/venvs; absent, with the reason, when it cannot be installed);
- lightloop-litellm-lane: `lightloop proxy`, a model routed through LiteLLM (recorded);
- lightloop-policy-lane: `lightloop proxy`, a policy model (token ids, recorded);
- lightloop-policy-lane-unrecorded: the same with LIGHTLOOP_PROXY__RECORD=false, so that
  `recording_cpu_share` = 1 - unrecorded/recorded proxy CPU per call is what recording costs the
  proxy; Postgres's CPU per call (its server and backends, from /proc) is reported beside it.

Payloads (`--payload`): `realistic` (default) sends about 4 KB of messages and gets back 1,000
prompt ids and 256 completion tokens with chat logprobs, or a 256-chunk stream; `small` is the
old 12-id, 16-token (100-chunk streamed) call. Each client is an agent running episodes of 4
calls, its conversation growing by the reply and a new user turn each call; every other episode
names its rollout (`X-Lightloop-Rollout`), the rest are inferred sessions, so attribution and
session memory are on the measured path.

Each cell runs non-streamed and streamed calls at concurrency 1, 16 and 64 for `--seconds` and
reports calls/s, p50/p99 latency, and CPU ms per call of the proxy process (user + system, from
/proc, with its children) and of Postgres. Prints one JSON object; `summary` holds the ratios at
concurrency 64 for the chosen payload.

Usage: python bench/proxy.py [--seconds 4] [--payload realistic|small] [--only policy,litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    REPO,
    clean_env,
    cpu_seconds,
    free_port,
    migrated_database,
    process,
    server_cpu_seconds,
)

KEY = "sk-bench-" + "0123456789abcdef" * 4
AGL_VERSION = "1.0.2"
FRONTS = (
    "direct",
    "litellm",
    "agl-v1",
    "lightloop-litellm-lane",
    "lightloop-policy-lane",
    "lightloop-policy-lane-unrecorded",
)


@dataclass(frozen=True)
class Payload:
    prompt_tokens: int  # prompt ids the stub returns
    tokens: int  # completion tokens, non-streamed
    stream_tokens: int  # chunks, streamed
    system_chars: int  # the system prompt's length: with the turns, the request's size
    logprobs: bool

    def reply(self, stream: bool) -> str:
        """The stub's answer text (`tests/support/stub_engine.py`), for the conversation's next turn."""
        return "".join(f" t{1000 + i}" for i in range(self.stream_tokens if stream else self.tokens))


PAYLOADS = {
    "realistic": Payload(prompt_tokens=1000, tokens=256, stream_tokens=256, system_chars=3600, logprobs=True),
    "small": Payload(prompt_tokens=12, tokens=16, stream_tokens=100, system_chars=0, logprobs=False),
}
SYSTEM = (
    "You are a careful assistant working through a multi-step task. Think about each step, use the "
    "tools you are given when they help, keep a short plan, check your arithmetic, and answer in "
    "the format the user asks for. "
)


async def load(
    url: str, model: str, payload: Payload, stream: bool, concurrency: int, seconds: float
) -> tuple[int, list[float]]:
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    system = (SYSTEM * (payload.system_chars // len(SYSTEM) + 1))[: payload.system_chars]
    reply = payload.reply(stream)
    latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            episode = 0
            while time.perf_counter() < deadline:
                # One episode of an agent: 4 calls, each re-sending the conversation so far.
                name = f"bench-{os.getpid()}-{i}-{episode}-{time.monotonic_ns()}"
                messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
                messages.append({"role": "user", "content": f"Task {name}: what is 17 * 23? Show the steps."})
                h = dict(headers)
                if episode % 2 == 0:  # named; the others are inferred sessions
                    h["x-lightloop-rollout"] = name
                for turn in range(4):
                    if time.perf_counter() >= deadline:
                        break
                    body: dict[str, Any] = {
                        "model": model,
                        "messages": messages,
                        "stream": stream,
                        "max_tokens": payload.stream_tokens if stream else payload.tokens,
                    }
                    if payload.logprobs:
                        body["logprobs"] = True
                    t0 = time.perf_counter()
                    async with session.post(url, data=json.dumps(body), headers=h) as response:
                        await response.read()
                        if response.status != 200:
                            errors.append(f"{response.status}: {(await response.text())[:200]}")
                    latencies.append(time.perf_counter() - t0)
                    messages = [
                        *messages,
                        {"role": "assistant", "content": reply},
                        {"role": "user", "content": f"Step {turn + 2}: go on."},
                    ]
                episode += 1

        await asyncio.gather(*[worker(i) for i in range(concurrency)])
    if errors:
        raise SystemExit(f"{url}: {len(errors)} calls failed, the first: {errors[0]}")
    return len(latencies), latencies


def measure(
    name: str,
    url: str,
    model: str,
    payload: Payload,
    proc: psutil.Process | None,
    postgres: psutil.Process | None,
    seconds: float,
    streams: tuple[bool, ...] = (False, True),
) -> list[dict[str, Any]]:
    rows = []
    for stream in streams:
        asyncio.run(load(url, model, payload, stream, 4, 1.0))  # warm up: connections, caches
        for concurrency in (1, 16, 64):
            cpu0 = cpu_seconds(proc) if proc else 0.0
            pg0 = server_cpu_seconds(postgres) if postgres else 0.0
            t0 = time.perf_counter()
            calls, latencies = asyncio.run(load(url, model, payload, stream, concurrency, seconds))
            elapsed = time.perf_counter() - t0
            cpu = (cpu_seconds(proc) - cpu0) if proc else None
            pg = (server_cpu_seconds(postgres) - pg0) if postgres else None
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
                    "postgres_cpu_ms_per_call": round(pg * 1000 / calls, 3) if pg is not None else None,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--payload", choices=sorted(PAYLOADS), default="realistic")
    parser.add_argument("--only", default=",".join(FRONTS))
    args = parser.parse_args()
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="lightloop-bench-proxy-"))
    env = clean_env(work / "home", KEY)
    with migrated_database(env) as database_url:
        run_fronts(args, only, work, env, database_url)


def postgres_server(database_url: str) -> psutil.Process | None:
    """The Postgres server behind `database_url` (its postmaster; backends are its children),
    when it runs on this machine and this user may read its data directory's pid file."""
    out = subprocess.run(
        ["psql", database_url, "-Atc", "SHOW data_directory"], capture_output=True, text=True, check=False
    )
    try:
        pid = int((Path(out.stdout.strip()) / "postmaster.pid").read_text().split()[0])
        return psutil.Process(pid)
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def agl_python(work: Path) -> tuple[Path | None, str | None]:
    """The Agent Lightning venv's python, made when missing; or why it cannot be had. The package
    needs Python 3.12 or newer and pulls no torch."""
    venv = REPO / ".cache" / "venvs" / f"agl-{AGL_VERSION}"
    python = venv / "bin" / "python"
    if (venv / ".installed").exists():
        return python, None
    base = next((p for p in _pythons_3_12_or_newer()), None)
    if base is None:
        return None, f"agentlightning=={AGL_VERSION} needs Python >= 3.12, and none was found here"
    log = work / "agl-install.log"
    with open(log, "wb") as fh:
        steps = [
            [base, "-m", "venv", str(venv)],
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--timeout",
                "60",
                f"agentlightning=={AGL_VERSION}",
            ],
        ]
        for step in steps:
            if subprocess.run(step, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                return None, f"agentlightning=={AGL_VERSION} did not install: {' | '.join(tail)}"
    (venv / ".installed").touch()
    return python, None


def _pythons_3_12_or_newer() -> list[str]:
    found = [shutil.which(f"python3.{minor}") for minor in (12, 13, 14)]
    found += [str(p) for p in sorted(Path.home().glob(".pyenv/versions/3.1[2-9]*/bin/python3"))]
    return [p for p in found if p]


def run_fronts(
    args: argparse.Namespace, only: set[str], work: Path, env: dict[str, str], database_url: str
) -> None:
    payload = PAYLOADS[args.payload]
    stub_port = free_port()
    stub_url = f"http://127.0.0.1:{stub_port}"
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    lite_model = {
        "model_name": "lite",
        "litellm_params": {"model": "openai/stub", "api_base": f"{stub_url}/v1", "api_key": "none"},
    }
    postgres = postgres_server(database_url)
    if postgres is None:
        notes.append("Postgres's CPU is not measured: its server is not a process of this machine")
    stub_cmd = [
        sys.executable,
        "-m",
        "tests.support.stub_engine",
        "--port",
        str(stub_port),
        "--tokens",
        str(max(payload.tokens, payload.stream_tokens)),
        "--prompt-tokens",
        str(payload.prompt_tokens),
    ]
    with process(stub_cmd, env, f"{stub_url}/health", work / "stub.log"):
        if "direct" in only:
            results += measure(
                "direct", f"{stub_url}/v1/chat/completions", "stub", payload, None, None, args.seconds
            )
        if "litellm" in only:
            config = work / "litellm.yaml"
            # LiteLLM's production advice: no verbose or debug logging, JSON logs at ERROR, no
            # spend logs (there is no database here anyway).
            config.write_text(
                yaml.safe_dump(
                    {
                        "model_list": [lite_model],
                        "litellm_settings": {"set_verbose": False, "json_logs": True},
                        "general_settings": {"disable_spend_logs": True},
                    }
                )
            )
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
                "error",
            ]
            lenv = {**env, "CONFIG_FILE_PATH": str(config), "LITELLM_LOG": "ERROR"}
            with process(cmd, lenv, f"http://127.0.0.1:{port}/health/liveliness", work / "litellm.log") as p:
                results += measure(
                    "litellm",
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    "lite",
                    payload,
                    p,
                    None,
                    args.seconds,
                )
        if "agl-v1" in only:
            results += measure_agl(work, env, stub_url, payload, args.seconds, notes)
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
            penv = {**env, "LIGHTLOOP_PROXY__RECORD": str(record).lower(), "LITELLM_LOG": "ERROR"}
            with process(cmd, penv, f"http://127.0.0.1:{port}/health", work / f"{name}.log", KEY) as p:
                results += measure(
                    name,
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    model,
                    payload,
                    p,
                    postgres,
                    args.seconds,
                )
    print(
        json.dumps(
            {
                "benchmark": "proxy",
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
                "payload": args.payload,
                "seconds_per_cell": args.seconds,
                "results": results,
                "summary": {**summarize(results, payload.stream_tokens), "notes": notes},
            },
            indent=1,
        )
    )


def measure_agl(
    work: Path, env: dict[str, str], stub_url: str, payload: Payload, seconds: float, notes: list[str]
) -> list[dict[str, Any]]:
    """Agent Lightning v1's gateway (bench/agl_gateway.py says how it is set up). Non-streamed
    only: 1.0.2 answers a streamed call with 400 "Streaming responses are not supported"."""
    python, why = agl_python(work)
    if python is None:
        notes.append(why or "Agent Lightning could not be installed")
        return []
    notes.append(
        f"agl-v1: agentlightning=={AGL_VERSION} refuses streamed calls (400), so it has no streamed cells"
    )
    port = free_port()
    cmd = [str(python), str(REPO / "bench" / "agl_gateway.py"), "--port", str(port)]
    cmd += ["--upstream", f"{stub_url}/v1", "--model", "stub"]
    base = f"http://127.0.0.1:{port}"
    with process(cmd, env, f"{base}/healthz", work / "agl.log") as p:
        return measure("agl-v1", f"{base}{AGL_CHAT}", "stub", payload, p, None, seconds, streams=(False,))


# bench/agl_gateway.py's one rollout, attempt and mode: the path its proxy serves chat calls on.
AGL_CHAT = "/proxy/rollout/bench/attempt/0/mode/train/openai/v1/chat/completions"


def summarize(results: list[dict[str, Any]], chunks: int) -> dict[str, Any]:
    """Ratios at concurrency 64; `chunks`: the token chunks of one streamed answer."""

    def cell(front: str, stream: bool, concurrency: int = 64) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in results
                if r["front"] == front and r["stream"] == stream and r["concurrency"] == concurrency
            ),
            None,
        )

    def per_core(row: dict[str, Any]) -> float:
        """Calls/s one core of the front's process serves: 1,000 / its CPU ms per call."""
        return 1000 / row["proxy_cpu_ms_per_call"]

    out: dict[str, Any] = {}
    for stream in (False, True):
        prefix = "streamed_" if stream else ""
        policy, unrecorded = (
            cell("lightloop-policy-lane", stream),
            cell("lightloop-policy-lane-unrecorded", stream),
        )
        for key, front in (("litellm", "litellm"), ("agl_v1", "agl-v1")):
            other = cell(front, stream)
            if policy and other:
                out[f"{prefix}policy_vs_{key}_calls_per_s"] = round(per_core(policy) / per_core(other), 1)
                out[f"{prefix}policy_vs_{key}_calls_per_s_wall"] = round(
                    policy["calls_per_s"] / other["calls_per_s"], 1
                )
        if policy:
            out[f"{prefix}policy_cpu_ms_per_call"] = policy["proxy_cpu_ms_per_call"]
            if stream:
                out["streamed_policy_cpu_ms_per_chunk"] = round(policy["proxy_cpu_ms_per_call"] / chunks, 4)
            out[f"{prefix}postgres_cpu_ms_per_call"] = policy["postgres_cpu_ms_per_call"]
        if policy and unrecorded:
            out[f"{prefix}recording_cpu_share"] = round(
                1 - unrecorded["proxy_cpu_ms_per_call"] / policy["proxy_cpu_ms_per_call"], 3
            )
    return out


if __name__ == "__main__":
    main()
