"""Trainer speed: trajectory rebuild throughput (calls/s, pure Python) and one local LoRA update
step of a model on CPU (tokens/s, forward + backward + optimiser) with the local and the verl
backend, measured in one run.

And one local step over GRPO groups on a 1,000-token prompt, with the tries' shared prompt run
once (the default) and with every row run whole, side by side.

Usage: python bench/trainer.py [--model smollm2|tiny] [--samples 8] [--length 256] [--home DIR]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightloop.models import load_model, model_folder
from lightloop.settings import TrainerSettings
from lightloop.trainer.local import LocalBackend, LocalConfig
from lightloop.trainer.loop import Backend
from lightloop.trainer.rebuild import Sample, Turn, rebuild
from lightloop.trainer.verl_backend import VerlBackend


def conversation(rng: random.Random, turns: int, prompt_len: int, completion_len: int) -> list[Turn]:
    history = [rng.randrange(50_000) for _ in range(prompt_len)]
    out = []
    for _ in range(turns):
        completion = [rng.randrange(50_000) for _ in range(completion_len)]
        out.append(Turn(list(history), completion, [-1.0] * completion_len))
        history += completion + [rng.randrange(50_000) for _ in range(20)]  # tool result, glue
    return out


def bench_rebuild(rollouts: int = 2_000, turns: int = 5) -> dict[str, float]:
    rng = random.Random(0)
    data = [conversation(rng, turns, 300, 60) for _ in range(rollouts)]
    t0 = time.perf_counter()
    for i, turns_ in enumerate(data):
        rebuild(f"r{i}", turns_)
    elapsed = time.perf_counter() - t0
    return {"rebuild_calls_per_s": round(rollouts * turns / elapsed, 1), "rebuild_turns_per_rollout": turns}


def bench_update(model: str, home: Path, samples: int, length: int, backend_name: str) -> dict[str, float]:
    backend: Backend
    if backend_name == "verl":
        backend = VerlBackend(TrainerSettings(backend="verl"), model_folder(model, home / "models"))
    else:
        loaded = load_model(model, home / "models")
        backend = LocalBackend(loaded.model, loaded.tokenizer, LocalConfig(micro_batch_size=4))
    rng = random.Random(1)
    prompt = length // 2
    batch = [
        Sample(
            f"s{i}",
            [rng.randrange(1000, 40_000) for _ in range(length)],
            prompt,
            [1] * (length - prompt),
            [-2.0] * (length - prompt),
        )
        for i in range(samples)
    ]
    advantages = [1.0 if i % 2 else -1.0 for i in range(samples)]
    backend.step(batch, advantages)  # warm-up: allocator, kernels
    t0 = time.perf_counter()
    steps = 2
    for _ in range(steps):
        backend.step(batch, advantages)
    elapsed = (time.perf_counter() - t0) / steps
    prefix = "update" if backend_name == "local" else f"update_{backend_name}"
    return {
        f"{prefix}_model": model,
        f"{prefix}_samples": samples,
        f"{prefix}_tokens_per_sample": length,
        f"{prefix}_step_s": round(elapsed, 2),
        f"{prefix}_tokens_per_s": round(samples * length / elapsed, 1),
    }


def bench_shared_prefix(
    model: str, home: Path, groups: int, tries: int, prompt: int, answer: int
) -> dict[str, Any]:
    """One local step over GRPO groups whose tries share a `prompt`-token prompt, with the shared
    prefix run once per micro-batch (the default) and with every row run whole, side by side."""
    loaded = load_model(model, home / "models")
    rng = random.Random(2)
    batch = []
    for g in range(groups):
        ids = [rng.randrange(1000, 40_000) for _ in range(prompt)]
        for k in range(tries):
            response = [rng.randrange(1000, 40_000) for _ in range(answer)]
            batch.append(Sample(f"g{g}-{k}", ids + response, prompt, [1] * answer, [-2.0] * answer))
    advantages = [1.0 if i % 2 else -1.0 for i in range(len(batch))]
    out: dict[str, Any] = {
        "prefix_groups": groups,
        "prefix_tries": tries,
        "prefix_prompt_tokens": prompt,
        "prefix_answer_tokens": answer,
    }
    for share in (False, True):
        backend = LocalBackend(
            loaded.model, loaded.tokenizer, LocalConfig(micro_batch_size=tries, share_prefix=share)
        )
        backend.step(batch[:tries], advantages[:tries])  # warm-up
        t0 = time.perf_counter()
        backend.step(batch, advantages)
        out[f"prefix_step_s_{'shared' if share else 'whole'}"] = round(time.perf_counter() - t0, 2)
        loaded.model = backend.model.unload()  # the next backend wraps the bare model again
    out["prefix_speedup"] = round(out["prefix_step_s_whole"] / out["prefix_step_s_shared"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--home", type=Path, default=None)
    args = parser.parse_args()
    home = args.home or Path(
        os.environ.get("LIGHTLOOP_BENCH_HOME", tempfile.mkdtemp(prefix="lightloop-bench-"))
    )
    # VERL prints progress to stdout; stdout carries only the JSON result.
    with contextlib.redirect_stdout(sys.stderr):
        result = {
            "threads": torch.get_num_threads(),
            **bench_rebuild(),
            **bench_update(args.model, home, args.samples, args.length, "local"),
            # The same batch through VERL's actor worker (FSDP2, fp32, one process), same run.
            **bench_update(args.model, home, args.samples, args.length, "verl"),
            # A realistic agent step: 2 groups of 4 tries on a 1,000-token prompt, 64-token answers.
            **bench_shared_prefix(args.model, home, groups=2, tries=4, prompt=1000, answer=64),
        }
    result["verl_vs_local_step_time"] = round(result["update_verl_step_s"] / result["update_step_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
