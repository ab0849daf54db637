"""What recording one proxied call costs in-process: opening the call, parsing the engine's
answer, building the span and rows, and the batch writer's COPY of them, against a real Postgres.
The call is a realistic one: about 4 KB of messages, 1,000 prompt ids, 256 completion tokens with
chat logprobs.

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

SYSTEM = "You are a careful assistant working through a multi-step task. " * 56  # about 3.6 KB
REQUEST = {
    "model": "policy",
    "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is 17 * 23? Show the steps."},
    ],
    "max_tokens": 256,
    "logprobs": True,
}
# A realistic answer: 1,000 prompt ids, 256 completion tokens with chat logprobs (as vLLM sends
# them with return_token_ids).
ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "policy-v1",
        "prompt_token_ids": [100 + i % 900 for i in range(1000)],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " t" * 256},
                "logprobs": {
                    "content": [
                        {"token": "t", "logprob": -0.5 - i / 1000, "bytes": [116]} for i in range(256)
                    ]
                },
                "finish_reason": "length",
                "token_ids": [1000 + i for i in range(256)],
            }
        ],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 256, "total_tokens": 1256},
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
    cpu_parse = 0.0
    for i in range(calls):
        t_open = time.process_time()
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
        call.request_json = raw_request
        outcome = from_response("chat", orjson.loads(ANSWER))  # the lane does this unrecorded too
        cpu_parse += time.process_time() - t_open
        recorder.close(call, outcome)
        if i % 100 == 99:
            await asyncio.sleep(0)  # let the writer task run, as the event loop would
        if i % 2000 == 1999:
            await writer.flush()  # bounds the queue, as agents waiting on the engine would
    await writer.flush()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await writer.close()
    assert writer.stats.rows_written == 2 * calls + 1, writer.stats
    return {
        "calls": calls,
        "cpu_us_per_call": round(cpu / calls * 1e6, 1),
        # Opening the call and parsing the answer, which an unrecorded call pays too.
        "open_and_parse_cpu_us_per_call": round(cpu_parse / calls * 1e6, 1),
        "recording_cpu_us_per_call": round((cpu - cpu_parse) / calls * 1e6, 1),
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
