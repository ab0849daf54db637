"""What the demo's base model does before any training: the numbers behind "why does the demo
stall" (issue 12). For each sampling temperature and answer budget, sample GROUP tries for each
of TASKS training tasks (as the demo's training rollouts do) and report:

- how often a try is exactly the number (reward 1), the right number among words, any number;
- the fraction of flat groups (every try the same reward: no advantage, nothing learned) under
  the demo's current reward and under the earlier one (0.5 / 0.1 / 0, no brevity term);
- the mean reward standard deviation within a group;
- a few sample answers;
- on the held-out tasks: the greedy answer's exact rate and pass@16 at temperature 1.0.

The model is sampled in-process with transformers (`generate`), the demo's system prompt and
chat template. Prints one JSON object.

Usage: python bench/demo_baseline.py [--task sums|opposites|opposite-choice] [--earlier-prompt]
       [--tasks 48] [--group 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lightloop.demo_probe import earlier_messages, sample_replies
from lightloop.demo_tasks import DemoTask, reward, split
from lightloop.models import load_model


def earlier_reward(task: DemoTask, reply: str) -> float:
    """The demo's reward before issue 11: no brevity term, so tries of one tier tie."""
    text = reply.strip().rstrip(".")
    if text in task.answers:
        return 1.0
    if any(answer in text.replace(",", " ").split() for answer in task.answers):
        return 0.5
    return 0.1 if task.right_form(text) else 0.0


def sample(
    loaded: Any, chosen: list[DemoTask], group: int, temperature: float, max_tokens: int, earlier: bool
) -> list[list[str]]:
    # The demo agent's messages; `earlier`: the agent before issue 12 (no worked example).
    return [
        sample_replies(
            loaded, earlier_messages(t) if earlier else t.messages(), group, temperature, max_tokens
        )
        for t in chosen
    ]


def summarise(chosen: list[DemoTask], answers: list[list[str]]) -> dict[str, Any]:
    tries = [(t, a) for t, group in zip(chosen, answers, strict=True) for a in group]
    exact = sum(reward(t, a) == 1.0 for t, a in tries)
    among = sum(0.5 < reward(t, a) < 1.0 for t, a in tries)
    number = sum(reward(t, a) < 0.5 and t.right_form(a.strip()) for t, a in tries)
    flat_now = flat_before = 0
    stds = []
    for t, group in zip(chosen, answers, strict=True):
        now = [reward(t, a) for a in group]
        before = [earlier_reward(t, a) for a in group]
        flat_now += len(set(now)) == 1
        flat_before += len(set(before)) == 1
        stds.append(statistics.pstdev(now))
    n = len(tries)
    return {
        "tries": n,
        "exact_answer_only": round(exact / n, 3),
        "right_answer_among_words": round(among / n, 3),
        "right_form_wrong_answer": round(number / n, 3),
        "mean_reward": round(statistics.fmean(reward(t, a) for t, a in tries), 3),
        "flat_groups_current_reward": round(flat_now / len(chosen), 3),
        "flat_groups_earlier_reward": round(flat_before / len(chosen), 3),
        "mean_group_reward_std": round(statistics.fmean(stds), 4),
        "samples": [a for a in answers[0][:2] + answers[1][:2]],
    }


def held_out_reach(loaded: Any, held: list[DemoTask], tries: int, max_tokens: int) -> dict[str, Any]:
    """What the base model can reach on the held-out tasks: its greedy answer (what the demo's
    held-out rounds score) and pass@`tries` at temperature 1.0 (the share of tasks it answers
    exactly at least once: what RL can surface without ever training on them)."""
    greedy, reached, missed = 0, 0, []
    for task in held:
        (answer,) = sample_replies(loaded, task.messages(), 1, 0.0, max_tokens)
        tries_ = sample_replies(loaded, task.messages(), tries, 1.0, max_tokens)
        greedy += reward(task, answer) == 1.0
        hit = any(reward(task, a) == 1.0 for a in tries_)
        reached += hit
        if not hit:
            missed.append(task.row()["id"])
    return {
        "held_out_tasks": len(held),
        "held_out_greedy_exact": round(greedy / len(held), 3),
        f"held_out_pass_at_{tries}_t1": round(reached / len(held), 3),
        "held_out_never_exact": missed,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="sums", choices=["sums", "opposites", "opposite-choice"])
    parser.add_argument("--tasks", type=int, default=48)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--temperatures", default="0.7,1.0")
    parser.add_argument("--max-tokens", default="8,16")
    parser.add_argument(
        "--earlier-prompt", action="store_true", help="The agent's prompt before issue 12: no worked example."
    )
    parser.add_argument("--home", default=os.environ.get("LIGHTLOOP_HOME", ".lightloop"))
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model, Path(args.home) / "models")
    train, held = split(args.task)
    chosen = train[: args.tasks]
    rows = []
    for temperature in (float(x) for x in args.temperatures.split(",")):
        for max_tokens in (int(x) for x in args.max_tokens.split(",")):
            t0 = time.perf_counter()
            answers = sample(loaded, chosen, args.group, temperature, max_tokens, args.earlier_prompt)
            row = {"temperature": temperature, "max_tokens": max_tokens, **summarise(chosen, answers)}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    reach = {} if args.earlier_prompt else held_out_reach(loaded, held, 16, 8)
    print(
        json.dumps(
            {
                "model": args.model,
                "task": args.task,
                "earlier_prompt": args.earlier_prompt,
                "tasks": args.tasks,
                "group": args.group,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "results": rows,
                **reach,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
