"""Assembling a streamed answer into its recorded call: cost per chunk at growing lengths (linear
means flat), and the longest the event loop is held while a long stream is assembled, inline and
as the proxy does it (in a worker thread above `OFF_LOOP_BYTES`).

Usage: python bench/stream_assembly.py [--tokens 1000,8000,32000]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import orjson

from lightloop.proxy.capture import from_stream
from lightloop.proxy.lane import OFF_LOOP_BYTES, _assemble


def stream(tokens: int) -> bytes:
    """A vLLM chat stream of one token per chunk, with token ids and logprobs, as the engines send it."""
    head = {"id": "chatcmpl-b", "object": "chat.completion.chunk", "created": 1, "model": "policy-v1"}
    events = [
        {
            **head,
            "prompt_token_ids": list(range(1000)),
            "choices": [{"index": 0, "delta": {"role": "assistant"}}],
        }
    ]
    for i in range(tokens):
        choice = {
            "index": 0,
            "delta": {"content": " tok"},
            "token_ids": [i % 50_000],
            "logprobs": {
                "content": [
                    {"token": " tok", "logprob": -0.25, "bytes": [32, 116, 111, 107], "top_logprobs": []}
                ]
            },
            "finish_reason": "stop" if i == tokens - 1 else None,
        }
        events.append({**head, "choices": [choice]})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def per_chunk_us(raw: bytes, tokens: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        outcome = from_stream("chat", raw)
        best = min(best, time.perf_counter() - started)
    assert len(outcome.choices[0].token_ids or []) == tokens
    return best / tokens * 1e6


async def longest_stall_ms(raw: bytes, inline: bool) -> float:
    """The longest gap between ticks of a 1 ms ticker while the stream is assembled."""
    stall = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal stall
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall = max(stall, now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    if inline:
        from_stream("chat", raw)
    else:
        await _assemble("chat", raw)
    done.set()
    await task
    return stall * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1000,8000,32000")
    args = parser.parse_args()
    sizes = [int(t) for t in args.tokens.split(",")]
    streams = {n: stream(n) for n in sizes}
    cost = {n: round(per_chunk_us(streams[n], n, repeat=5 if n <= 8000 else 3), 2) for n in sizes}
    longest = streams[sizes[-1]]
    result = {
        "benchmark": "stream_assembly",
        "prompt_tokens": 1000,
        "stream_bytes": {n: len(streams[n]) for n in sizes},
        "us_per_chunk": cost,
        # Flat is linear: the cost of one chunk in the longest stream over that in the shortest.
        "per_chunk_ratio_longest_to_shortest": round(cost[sizes[-1]] / cost[sizes[0]], 2),
        "off_loop_bytes": OFF_LOOP_BYTES,
        "loop_stall_ms_inline": round(asyncio.run(longest_stall_ms(longest, inline=True)), 1),
        "loop_stall_ms_as_the_proxy_does": round(asyncio.run(longest_stall_ms(longest, inline=False)), 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
