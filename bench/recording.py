"""What recording one proxied call costs in-process: opening the call, parsing the engine's
answer, building the span and rows, and the batch writer's COPY of them, against a real Postgres.

Usage: python bench/recording.py [--calls 20000] [--database-url URL]
Prints one JSON object: CPU microseconds per recorded call (the proxy's recording budget).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from lightloop.proxy.attribution import Attribution
from lightloop.proxy.capture import from_response
from lightloop.proxy.recorder import Recorder
from lightloop.store import BatchWriter, upgrade

REQUEST = {
    "model": "policy",
    "messages": [{"role": "user", "content": "Benchmark me, please."}],
    "max_tokens": 16,
}
ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "policy-v1",
        "prompt_token_ids": list(range(12)),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " t" * 16},
                "logprobs": {"content": [{"token": "t", "logprob": -0.5} for _ in range(16)]},
                "finish_reason": "length",
                "token_ids": list(range(1000, 1016)),
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28},
    }
)


async def run(url: str, calls: int) -> dict[str, float]:
    await upgrade(url)
    writer = BatchWriter(url, Path(tempfile.mkdtemp(prefix="lightloop-bench-spool-")))
    await writer.start()
    recorder = Recorder(writer, 100_000)
    attribution = Attribution("bench-rollout", "header")
    raw_request = orjson.dumps(REQUEST)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(calls):
        call = recorder.open(
            attribution,
            operation="chat",
            provider="vllm",
            requested_model="policy",
            served_model="policy-v1",
            policy_version=1,
            request=orjson.loads(raw_request),
            traceparent=None,
        )
        call.request_json = raw_request.decode()
        recorder.close(call, from_response("chat", orjson.loads(ANSWER)))
        if i % 500 == 499:
            await asyncio.sleep(0)  # let the writer task run, as the event loop would
    await writer.flush()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await writer.close()
    assert writer.stats.rows_written == 2 * calls + 1, writer.stats
    return {
        "calls": calls,
        "cpu_us_per_call": round(cpu / calls * 1e6, 1),
        "calls_per_s": round(calls / wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    if args.database_url:
        print(json.dumps(asyncio.run(run(args.database_url, args.calls))))
        return
    home = tempfile.mkdtemp(prefix="lightloop-bench-")
    cli = [sys.executable, "-c", "from lightloop.cli import main; main()", "--home", home, "db"]
    url = subprocess.run([*cli, "url"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        print(json.dumps(asyncio.run(run(url, args.calls))))
    finally:
        subprocess.run([*cli, "stop"], capture_output=True, check=False)


if __name__ == "__main__":
    main()
