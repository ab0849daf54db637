"""Memory over time: a long run of policy-lane calls through one recording proxy.

Sends `--calls` (default one million) realistic calls (about 4 KB of messages, 1,000 prompt ids,
256 completion tokens with logprobs; every other 4-call episode names its rollout, the rest are
inferred sessions) through `lightloop proxy` to the stub engine, at `--concurrency`, sampling the
proxy's RSS as it goes. At the end it waits for the proxy's writer (its marks) and checks that
every call is in `llm_calls` exactly once, by the response ids the client got.

Prints one JSON object: the RSS samples, the growth after warm-up (the first `--warmup` of the
calls), calls/s, and the exactly-once check.

Usage: python bench/soak.py [--calls 1000000] [--concurrency 64] [--warmup 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import clean_env, free_port, migrated_database, process
from bench.proxy import KEY, PAYLOADS, SYSTEM
from lightloop.store.database import dsn
from lightloop.store.marks import wait_for_writers

PAYLOAD = PAYLOADS["realistic"]


async def drive(url: str, calls: int, concurrency: int, proc: psutil.Process, warmup: int) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    system = (SYSTEM * (PAYLOAD.system_chars // len(SYSTEM) + 1))[: PAYLOAD.system_chars]
    reply = PAYLOAD.reply(False)
    ids: set[str] = set()
    sent = 0
    samples: list[tuple[int, int]] = []  # (calls done, RSS bytes)
    baseline: list[int] = []
    errors: list[str] = []

    async def sample() -> None:
        while True:
            rss = proc.memory_info().rss
            samples.append((len(ids), rss))
            if not baseline and len(ids) >= warmup:
                baseline.append(rss)
            await asyncio.sleep(2)  # a sampling period, not synchronisation

    async def worker(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal sent
        episode = 0
        while sent < calls:
            name = f"soak-{i}-{episode}"
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Task {name}: what is 17 * 23? Show the steps."},
            ]
            h = dict(headers)
            if episode % 2 == 0:
                h["x-lightloop-rollout"] = name
            for turn in range(4):
                if sent >= calls:
                    break
                sent += 1
                body = {
                    "model": "policy",
                    "messages": messages,
                    "max_tokens": PAYLOAD.tokens,
                    "logprobs": True,
                }
                async with session.post(url, data=json.dumps(body), headers=h) as response:
                    data = await response.read()
                    if response.status != 200:
                        errors.append(f"{response.status}: {data[:200]!r}")
                        continue
                ids.add(json.loads(data)["id"])
                messages = [
                    *messages,
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": f"Step {turn + 2}: go on."},
                ]
            episode += 1

    sampler = asyncio.create_task(sample())
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*[worker(session, i) for i in range(concurrency)])
    elapsed = time.perf_counter() - t0
    sampler.cancel()
    final = proc.memory_info().rss
    samples.append((len(ids), final))
    after = [rss for done, rss in samples if done >= warmup]
    return {
        "calls": sent,
        "answered": len(ids),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "calls_per_s": round(sent / elapsed, 1),
        "rss_mb_at_warmup": round(baseline[0] / 2**20, 1) if baseline else None,
        "rss_mb_final": round(final / 2**20, 1),
        "rss_growth_mb_after_warmup": round((max(after) - baseline[0]) / 2**20, 1) if baseline else None,
        # Mean RSS over each fifth of the run: a leak shows as a rise to the end; the bounded caches
        # (session memory, recent rollouts and responses) filling up show as a rise that stops.
        "rss_mb_mean_by_fifth": _by_fifth(samples, sent),
        "rss_samples_mb": [
            (done, round(rss / 2**20, 1)) for done, rss in samples[:: max(1, len(samples) // 60)]
        ],
        "_ids": ids,
    }


def _by_fifth(samples: list[tuple[int, int]], calls: int) -> list[float | None]:
    out: list[float | None] = []
    for k in range(5):
        inside = [rss for done, rss in samples if k * calls / 5 <= done < (k + 1) * calls / 5]
        out.append(round(sum(inside) / len(inside) / 2**20, 1) if inside else None)
    return out


async def check(database_url: str, ids: set[str], sent: int, errors: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn(database_url))
    try:
        written = await wait_for_writers(conn, timeout_s=600)
        rows = await conn.fetch("SELECT response_id, count(*) AS n FROM llm_calls GROUP BY response_id")
    finally:
        await conn.close()
    stored = {r["response_id"]: r["n"] for r in rows}
    return {
        "writers_caught_up": written,
        "rows": sum(stored.values()),
        "missing": len(ids - stored.keys()),
        "duplicated": sum(1 for n in stored.values() if n > 1),
        "unexpected": len(stored.keys() - ids),
        "every_call_exactly_once": written
        and errors == 0
        and len(ids) == sent
        and stored.keys() == ids
        and all(n == 1 for n in stored.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--warmup", type=float, default=0.1, help="share of the calls before the baseline RSS"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lightloop-bench-soak-"))
    env = clean_env(work / "home", KEY)
    with migrated_database(env) as database_url:
        stub_port, port = free_port(), free_port()
        stub = f"http://127.0.0.1:{stub_port}"
        stub_cmd = [sys.executable, "-m", "tests.support.stub_engine", "--port", str(stub_port)]
        stub_cmd += ["--tokens", str(PAYLOAD.tokens), "--prompt-tokens", str(PAYLOAD.prompt_tokens)]
        config = work / "lightloop.yaml"
        config.write_text(
            yaml.safe_dump({"policy": [{"name": "policy", "base_model": "stub", "upstreams": [stub]}]})
        )
        cmd = [sys.executable, "-c", "from lightloop.cli import main; main()", "--config", str(config)]
        cmd += ["--log-level", "warning", "proxy", "--port", str(port)]
        with (
            process(stub_cmd, env, f"{stub}/health", work / "stub.log"),
            process(cmd, env, f"http://127.0.0.1:{port}/health", work / "proxy.log", KEY) as proc,
        ):
            run = asyncio.run(
                drive(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    args.calls,
                    args.concurrency,
                    proc,
                    int(args.calls * args.warmup),
                )
            )
            ids = run.pop("_ids")
            stored = asyncio.run(check(database_url, ids, run["calls"], run["errors"]))
    print(
        json.dumps(
            {
                "benchmark": "soak",
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
                "concurrency": args.concurrency,
                **run,
                "postgres": stored,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
