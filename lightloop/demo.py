"""`lightloop demo`: the whole loop on CPU, on the task queue. A task set of demo_tasks (the
opposite of a word chosen from three by default; opposites recalled; or sums) is loaded as a
dataset (training tasks, and held-out tasks as its val split); the runner hands them to an
ordinary `openai` SDK agent that answers through the proxy (reward 1 for the exact answer);
the trainer learns from the GRPO groups; the queue runs the held-out tasks against every new
version; and the learning curve is read back from `reward_by_version` and plotted.

The agent knows nothing of lightloop but the base URL and key its `llm` carries."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lightloop.demo_tasks import from_row, reward, split
from lightloop.errors import LightloopError
from lightloop.llm import LLM
from lightloop.runner import Runner
from lightloop.store import (
    TrainingProgress,
    connect,
    live_version,
    load_tasks,
    reward_curve,
    stop_dataset,
    training_progress,
)
from lightloop.store.tasks import REWARD_CURVE_SQL

# Nothing happened for this long (no rollout finished, no step taken): the trainer or the
# engine is not running; say so instead of waiting for ever.
STALL_S = 900.0

__all__ = ["CURVE_SQL", "Demo", "agent", "plot", "schedule"]

CURVE_SQL = REWARD_CURVE_SQL


async def agent(row: dict[str, Any], llm: LLM) -> float:
    """The demo's agent: one chat call. Training tries sample (the GRPO group's spread);
    held-out tasks are answered greedily."""
    task = from_row(row)
    temperature = 0.0 if llm.mode == "val" else task.train_temperature
    async with llm.async_openai(max_retries=2) as client:
        completion = await client.chat.completions.create(
            model=llm.model,
            messages=task.messages(),  # type: ignore[arg-type]
            max_tokens=task.max_tokens,
            temperature=temperature,
        )
    return reward(task, completion.choices[0].message.content or "")


def schedule(steps: int, groups: int, available: int) -> tuple[int, int]:
    """(tasks, epochs) with tasks x epochs == steps x groups exactly and tasks a multiple of
    `groups`, as many tasks as `available` allows."""
    if groups > available:
        raise LightloopError(f"{groups} groups per step, but only {available} training tasks")
    per_epoch = max(d for d in range(1, steps + 1) if steps % d == 0 and d * groups <= available)
    return per_epoch * groups, steps // per_epoch


@dataclass
class Demo:
    base_url: str  # the proxy, without /v1
    key: str
    database_url: str
    policy: str = "policy"
    groups: int = 8  # tasks per training step
    tries: int = 4  # rollouts per task: one GRPO group
    held_out: int = 32  # tasks never trained on; 32 so that one task moves the mean by 0.03
    parallel: int = 16  # the runner's concurrency: the engine decodes up to 16 together
    seed: int = 0
    task: str = "opposite-choice"  # a key of demo_tasks.KINDS
    log: Callable[[str], None] = print
    dataset: str = field(default_factory=lambda: f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}")

    def __post_init__(self) -> None:
        self.train_tasks, self.held_tasks = split(self.task, self.held_out)
        self._reported: set[int] = set()
        self._started = time.monotonic()
        self._deadline = math.inf
        self._stopped = False

    async def load(self, steps: int) -> tuple[int, int]:
        """The dataset: exactly `steps` steps' worth of groups (each task one group), so that the
        queue drains when the trainer has taken them all; returns (tasks, epochs). With fewer
        training tasks than that, a multiple of `groups` tasks is taken that many epochs over,
        so that no group is left over that the trainer (waiting for `groups` at once) never takes."""
        n, epochs = schedule(steps, self.groups, len(self.train_tasks))
        chosen = random.Random(self.seed).sample(self.train_tasks, n)
        conn = await connect(self.database_url)
        try:
            await load_tasks(
                conn,
                self.dataset,
                "train",
                [t.row() for t in chosen],
                group_size=self.tries,
                policy=self.policy,
                seed=self.seed,
                epochs=epochs,
            )
            await load_tasks(
                conn,
                self.dataset,
                "val",
                [t.row() for t in self.held_tasks],
                group_size=1,
                policy=self.policy,
            )
        finally:
            await conn.close()
        return n, epochs

    async def _read(self) -> tuple[TrainingProgress, int]:
        conn = await connect(self.database_url)
        try:
            live = await live_version(conn, self.policy)
            return await training_progress(conn, self.dataset), (live.version if live else 0)
        finally:
            await conn.close()

    def _report(self, progress: TrainingProgress) -> None:
        for r in progress.val_rounds:
            if r.complete and r.version not in self._reported:
                self._reported.add(r.version)
                served = progress.calls_by_version.get(r.version, 0)
                mean = "n/a" if r.mean_reward is None else f"{r.mean_reward:.3f}"
                self.log(
                    f"version {r.version}: held-out reward {mean} over {r.rollouts} tasks"
                    f"  ({served} calls served by v{r.version}, {time.monotonic() - self._started:.0f} s)"
                )

    async def _watch(self, runner: Runner, stalled: list[str]) -> None:
        """Report finished val rounds as they come; at the deadline stop the dataset (started
        groups finish, so the runner drains); stop the runner when nothing moves at all."""
        last, moved = None, time.monotonic()
        while True:
            progress, _ = await self._read()
            self._report(progress)
            signature = (progress.steps, progress.finished)
            if signature != last:
                last, moved = signature, time.monotonic()
            elif time.monotonic() - moved > STALL_S:
                stalled.append(f"nothing finished for {STALL_S:g} s; are the engine and the trainer running?")
                runner.stop()
                return
            await self._stop_if_late()
            await asyncio.sleep(1.0)

    async def run(self, steps: int, minutes: float) -> list[dict[str, Any]]:
        """Until the trainer took every training group and the newest version's held-out round
        is done (or `minutes` passed: then the started groups finish and the run ends)."""
        self._started = time.monotonic()
        self._deadline = self._started + minutes * 60
        self._stopped = False
        n, epochs = await self.load(steps)
        self.log(
            f"dataset {self.dataset}: {n} training tasks x {epochs} epoch(s), {self.tries} tries each, "
            f"{len(self.held_tasks)} held-out tasks; the runner takes them from the queue"
        )
        round_awaited_since: float | None = None
        while True:
            runner = Runner(agent, self.base_url, self.key, self.dataset, concurrency=self.parallel)
            stalled: list[str] = []
            watch = asyncio.create_task(self._watch(runner, stalled))
            try:
                await runner.run()  # until the queue is drained for now
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            if stalled:
                raise LightloopError(stalled[0])
            progress, live = await self._read()
            self._report(progress)
            if live not in self._reported:
                # The live version's val round is made when a runner next asks (the proxy may
                # learn of the version a moment after the database has it).
                round_awaited_since = round_awaited_since or time.monotonic()
                if time.monotonic() - round_awaited_since > STALL_S:
                    raise LightloopError(
                        f"the proxy made no held-out round for v{live} within {STALL_S:g} s; "
                        "does it serve that version?"
                    )
                await asyncio.sleep(0.5)
                continue
            round_awaited_since = None
            if progress.train_open == 0 or self._stopped:
                break
            await self._wait_for_trainer(progress, live)
        conn = await connect(self.database_url)
        try:
            return await reward_curve(conn, self.dataset)
        finally:
            await conn.close()

    async def _wait_for_trainer(self, before: TrainingProgress, live_before: int) -> None:
        """Every group is finished and the trainer has some still to take: until it takes a
        step or publishes (a new val round), or time is up."""
        since = time.monotonic()
        while True:
            progress, live = await self._read()
            if progress.steps != before.steps or live != live_before:
                return
            if await self._stop_if_late():
                return
            if time.monotonic() - since > STALL_S:
                raise LightloopError(f"the trainer took no step within {STALL_S:g} s; is it running?")
            await asyncio.sleep(1.0)

    async def _stop_if_late(self) -> bool:
        if time.monotonic() < self._deadline or self._stopped:
            return self._stopped
        self._stopped = True
        conn = await connect(self.database_url)
        try:
            discarded = await stop_dataset(conn, self.dataset)
        finally:
            await conn.close()
        self.log(f"time is up: no new training groups ({discarded} unstarted rollouts discarded)")
        return True


def plot(curve: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    val = [(r["policy_version"], float(r["val_reward"])) for r in curve if r["val_rollouts"]]
    train = [(r["policy_version"], float(r["train_reward"])) for r in curve if r["train_rollouts"]]
    ax.plot([v for v, _ in val], [x for _, x in val], marker="o", label="held-out (val)")
    if train:
        ax.plot([v for v, _ in train], [x for _, x in train], alpha=0.5, label="training tries")
    ax.set_xlabel("policy version (training steps published)")
    ax.set_ylabel("mean reward")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
