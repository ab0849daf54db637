"""`lightloop demo`: the whole loop on CPU. An example agent does short arithmetic through the
proxy with the `openai` SDK (reward 1 for the exact answer), the trainer learns from it, and the
held-out reward of each policy version is read back with SQL and plotted.

The agent is an ordinary client: it only knows the proxy's base URL and key."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import openai

from lightloop.errors import LightloopError
from lightloop.store import connect

SYSTEM = "You are a calculator. Reply with the number only."


@dataclass(frozen=True)
class Task:
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"What is {self.a} + {self.b}?"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


def reward(task: Task, reply: str) -> float:
    """1 for exactly the number. Partial credit points the way: 0.5 when the right number is
    there among other words, 0.1 for any number at all; 0 otherwise."""
    text = reply.strip().rstrip(".")
    if text == task.answer:
        return 1.0
    if task.answer in text.replace(",", " ").split():
        return 0.5
    return 0.1 if any(ch.isdigit() for ch in text) else 0.0


def tasks(seed: int = 0) -> tuple[list[Task], list[Task]]:
    """(training tasks, held-out tasks): sums of two numbers below 20, split once."""
    every = [Task(a, b) for a in range(20) for b in range(20)]
    random.Random(seed).shuffle(every)
    return every[32:], every[:32]


@dataclass
class Demo:
    base_url: str  # the proxy, without /v1
    key: str
    database_url: str
    model: str = "policy"
    groups: int = 8
    tries: int = 4
    held_out: int = 16
    parallel: int = 8
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.train_tasks, held = tasks()
        self.held_tasks = held[: self.held_out]
        self.headers = {"authorization": f"Bearer {self.key}"}

    def _client(self, rollout: str, extra: dict[str, str]) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}/rollout/{rollout}/v1",
            api_key=self.key,
            default_headers=extra,
            max_retries=2,
        )

    def _attempt(self, rollout: str, task: Task, temperature: float, extra: dict[str, str]) -> float:
        completion = self._client(rollout, extra).chat.completions.create(
            model=self.model,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.question}],
            max_tokens=16,
            temperature=temperature,
        )
        value = reward(task, completion.choices[0].message.content or "")
        answer = httpx.post(
            f"{self.base_url}/v1/rollouts/{rollout}/finish",
            json={"status": "succeeded", "reward": value},
            headers=self.headers,
            timeout=60,
        )
        if answer.status_code != 200:
            raise LightloopError(f"finishing {rollout}: HTTP {answer.status_code}: {answer.text[:200]}")
        return value

    def play(self, step: int, rng: random.Random) -> list[str]:
        """One batch of training rollouts: `groups` tasks, `tries` attempts each (a GRPO group)."""
        jobs = []
        for g in range(self.groups):
            task = rng.choice(self.train_tasks)
            for t in range(self.tries):
                # The declared size lets the trainer take the group the moment its last try ends.
                group = {"X-Lightloop-Group": f"demo-s{step}-g{g}", "X-Lightloop-Group-Size": str(self.tries)}
                jobs.append((f"demo-s{step}-g{g}-t{t}", task, group))
        with ThreadPoolExecutor(self.parallel) as pool:
            list(pool.map(lambda j: self._attempt(j[0], j[1], 1.0, j[2]), jobs))
        return [j[0] for j in jobs]

    def evaluate(self, version: int) -> float:
        """Greedy answers to the held-out tasks, as evaluation rollouts (never trained on)."""
        jobs = [(f"demo-eval-v{version}-{i}", task) for i, task in enumerate(self.held_tasks)]
        with ThreadPoolExecutor(self.parallel) as pool:
            values = list(
                pool.map(lambda j: self._attempt(j[0], j[1], 0.0, {"X-Lightloop-Mode": "val"}), jobs)
            )
        return sum(values) / len(values)

    def live_version(self) -> int:
        health = httpx.get(f"{self.base_url}/health", headers=self.headers, timeout=10).json()
        return int(health["policies"][self.model])

    async def _consumed(self, ids: list[str]) -> bool:
        conn = await connect(self.database_url)
        try:
            n = await conn.fetchval(
                "SELECT count(*) FROM rollouts WHERE id = ANY($1::text[]) AND consumed_by_step IS NOT NULL",
                ids,
            )
        finally:
            await conn.close()
        return int(n) == len(ids)

    def wait_trained(self, ids: list[str], timeout_s: float) -> None:
        """Until the trainer recorded a step for these rollouts (a separate process's progress)."""
        deadline = time.monotonic() + timeout_s
        while not asyncio.run(self._consumed(ids)):
            if time.monotonic() > deadline:
                raise LightloopError(
                    f"the trainer did not take the batch within {timeout_s:g} s; is it running?"
                )
            time.sleep(1.0)

    def run(self, steps: int, minutes: float) -> list[tuple[int, float]]:
        started = time.monotonic()
        rng = random.Random(1)
        version = self.live_version()
        self.log(f"version {version}: held-out reward {self.evaluate(version):.3f}")
        for step in range(steps):
            if (time.monotonic() - started) / 60 > minutes:
                self.log(f"stopping after {minutes:g} minutes")
                break
            ids = self.play(step, rng)
            self.wait_trained(ids, timeout_s=900)
            # The proxy learns a new version by NOTIFY; the step's row is written after publishing.
            new = self.live_version()
            if new != version:
                version = new
                score = self.evaluate(version)
                self.log(
                    f"version {version}: held-out reward {score:.3f}  ({time.monotonic() - started:.0f} s)"
                )
        return asyncio.run(self.curve())

    async def curve(self) -> list[tuple[int, float]]:
        """Held-out reward per policy version, straight from SQL."""
        conn: asyncpg.Connection = await connect(self.database_url)
        try:
            rows = await conn.fetch(CURVE_SQL)
        finally:
            await conn.close()
        return [(int(r["policy_version"]), float(r["held_out_reward"])) for r in rows]


CURVE_SQL = """
SELECT c.policy_version, avg(r.reward) AS held_out_reward, count(*) AS tasks
FROM rollouts r JOIN llm_calls c ON c.rollout_id = r.id
WHERE r.mode = 'val' AND r.id LIKE 'demo-eval-%'
GROUP BY c.policy_version ORDER BY c.policy_version
"""


def plot(curve: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([v for v, _ in curve], [r for _, r in curve], marker="o")
    ax.set_xlabel("policy version (training steps published)")
    ax.set_ylabel("mean held-out reward")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
