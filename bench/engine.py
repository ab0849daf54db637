"""Engine throughput: generated tokens/s at batch 1 and batch 8 for a model on CPU, in-process
(the batcher without HTTP), measured in one run.

Usage: python bench/engine.py [--model smollm2|tiny|PATH] [--tokens 64] [--home DIR]
Prints one JSON object; `batch8_over_batch1` is the ratio the design aims to keep at 4 or more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch

from lightloop.engine.batcher import Batcher, Choice, Event, Finished, Token
from lightloop.engine.chat import encode, render_chat
from lightloop.engine.lora import LoraRuntime
from lightloop.engine.sampling import SamplingParams
from lightloop.models import load_model

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how a bicycle works, in detail.",
    "Describe the water cycle step by step.",
    "List many fruits and describe each one.",
    "Tell me about the history of the printing press.",
    "Write a poem about autumn leaves.",
    "Explain photosynthesis to a child.",
    "Describe a day in the life of a baker.",
]


def run(batcher: Batcher, prompts: list[list[int]], tokens: int) -> tuple[int, float]:
    done = threading.Semaphore(0)
    counts = [0] * len(prompts)
    for i, prompt in enumerate(prompts):

        def emit(event: Event, i: int = i) -> None:
            if isinstance(event, Token):
                counts[i] += 1
            elif isinstance(event, Finished):
                done.release()

        batcher.submit(
            [
                Choice(
                    prompt_ids=prompt,
                    params=SamplingParams(max_tokens=tokens, temperature=0.0),
                    adapter=None,
                    emit=emit,
                )
            ]
        )
    t0 = time.perf_counter()
    for _ in prompts:
        done.acquire()
    return sum(counts), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--home", default=os.environ.get("LIGHTLOOP_HOME", ".lightloop"))
    args = parser.parse_args()
    loaded = load_model(args.model, Path(args.home) / "models")
    batcher = Batcher(loaded, LoraRuntime(loaded.model), max_batch_size=8)
    batcher.start()
    prompts = [
        encode(loaded.tokenizer, render_chat(loaded.tokenizer, [{"role": "user", "content": p}], None))
        for p in PROMPTS
    ]
    run(batcher, prompts[:1], 4)  # warm-up
    n1, t1 = run(batcher, prompts[:1], args.tokens)
    n8, t8 = run(batcher, prompts, args.tokens)
    batcher.stop()
    result = {
        "benchmark": "engine",
        "model": args.model,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "max_tokens": args.tokens,
        "batch1_tokens": n1,
        "batch1_tokens_per_s": round(n1 / t1, 1),
        "batch8_tokens": n8,
        "batch8_tokens_per_s": round(n8 / t8, 1),
        "batch8_over_batch1": round((n8 / t8) / (n1 / t1), 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
