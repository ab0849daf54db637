"""`lightloop run AGENT --dataset NAME`: take rollouts from the proxy's task queue, run the user's
agent function on each, and finish it with the reward the function returns.

A runner keeps nothing that matters: the queue, the leases and the results are in Postgres
behind the proxy, so any number of runners on any number of machines share one dataset, and a
runner that dies only loses its leases (the rollouts are handed out again)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import stamina

from lightloop.agents import Agent, AgentCaller, load_agent
from lightloop.errors import LightloopError
from lightloop.llm import LLM
from lightloop.tracing import untraced

log = logging.getLogger(__name__)


class ProxyUnreachable(LightloopError):
    """The proxy did not answer within the retry budget."""


class QueueError(LightloopError):
    """The proxy refused a queue request (unknown dataset, bad key, ...)."""


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    taken: int = 0
    succeeded: int = 0
    failed: int = 0  # the agent raised or returned no usable reward
    superseded: int = 0  # the lease lapsed and another attempt took over
    reward_sum: float = 0.0
    rewarded: int = 0
    running: int = 0
    live_version: int | None = None
    val_reward: tuple[int, float] | None = None
    done_total: tuple[int, int | None] | None = None  # the dataset's (finished, planned), all runners

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.superseded

    def rate(self) -> float:
        return self.finished / max(time.monotonic() - self.started, 1e-9)

    def mean_reward(self) -> float | None:
        return self.reward_sum / self.rewarded if self.rewarded else None

    def line(self) -> str:
        mean = self.mean_reward()
        parts = [
            f"{self.finished} finished ({self.succeeded} ok, {self.failed} failed, "
            f"{self.superseded} superseded)",
            f"{self.running} running",
            f"{self.rate():.2f} rollouts/s",
            f"mean reward {mean:.3f}" if mean is not None else "mean reward -",
        ]
        if self.live_version is not None:
            parts.append(f"live v{self.live_version}")
        if self.val_reward is not None:
            parts.append(f"val v{self.val_reward[0]} {self.val_reward[1]:.3f}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Handout:
    rollout_id: str
    input: dict[str, Any]
    base_url: str
    attempt: int
    lease_s: float
    split: str
    model: str
    group_id: str | None
    task_id: str | None


class QueueClient:
    """The proxy's queue routes, with retries (stamina's backoff) for an unreachable proxy or a
    503 while its Postgres is down; past `retry_s`, ProxyUnreachable."""

    def __init__(self, proxy: str, key: str, retry_s: float, prompt_run: str | None = None) -> None:
        self.proxy = proxy.rstrip("/").removesuffix("/v1")
        self.prompt_run = prompt_run  # only this prompt optimisation run's evaluations
        self.retry_s = retry_s
        self.http = httpx.AsyncClient(
            base_url=self.proxy, headers={"authorization": f"Bearer {key}"}, timeout=60
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def _post(
        self, path: str, body: dict[str, Any] | None = None, method: str = "POST"
    ) -> httpx.Response:
        try:
            async for attempt in stamina.retry_context(
                on=_retryable, attempts=None, timeout=self.retry_s, wait_initial=0.1, wait_max=5.0
            ):
                with attempt, untraced():  # the runner's own calls are no part of the agent's trace
                    answer = await self.http.request(method, path, json=body)
                    if answer.status_code in (502, 503, 504):
                        raise _Transient(answer)
                    return answer
        except (httpx.TransportError, _Transient) as exc:
            what = (
                f"HTTP {exc.answer.status_code}"
                if isinstance(exc, _Transient)
                else f"{type(exc).__name__}: {exc}"
            )
            raise ProxyUnreachable(
                f"the proxy at {self.proxy} did not answer for {self.retry_s:g} s ({what})"
            ) from None
        raise AssertionError("unreachable")

    async def next(self, dataset: str, split: str | None, worker: str) -> Handout | bool:
        """A rollout, or whether the dataset is drained (True) or more may come (False)."""
        body: dict[str, Any] = {"dataset": dataset, "worker": worker}
        if split is not None:
            body["split"] = split
        if self.prompt_run is not None:
            body["prompt_run"] = self.prompt_run
        answer = await self._post("/v1/tasks/next", body)
        if answer.status_code == 204:
            return bool(answer.headers.get("x-lightloop-queue") == "drained")
        data = _ok(answer, "/v1/tasks/next")
        return Handout(
            rollout_id=data["rollout_id"],
            input=data["input"],
            base_url=data["base_url"],
            attempt=int(data["attempt"]),
            lease_s=float(data["lease_s"]),
            split=data["split"],
            model=data["model"],
            group_id=data.get("group_id"),
            task_id=data.get("task_id"),
        )

    async def heartbeat(self, rollout_id: str, attempt: int) -> bool:
        """False when the attempt was superseded (409)."""
        answer = await self._post(
            f"/v1/rollouts/{quote(rollout_id, safe='')}/heartbeat", {"attempt": attempt}
        )
        if answer.status_code == 409:
            return False
        _ok(answer, "heartbeat")
        return True

    async def finish(self, rollout_id: str, body: dict[str, Any]) -> bool:
        """False when the attempt was superseded (409): its result is not recorded."""
        answer = await self._post(f"/v1/rollouts/{quote(rollout_id, safe='')}/finish", body)
        if answer.status_code == 409:
            return False
        _ok(answer, "finish")
        return True

    async def progress(self, dataset: str) -> dict[str, Any]:
        return _ok(await self._post(f"/v1/datasets/{quote(dataset, safe='')}", method="GET"), "datasets")


class _Transient(Exception):
    def __init__(self, answer: httpx.Response) -> None:
        self.answer = answer


def _retryable(exc: Exception) -> bool:
    return isinstance(exc, httpx.TransportError | _Transient)


def _ok(answer: httpx.Response, what: str) -> dict[str, Any]:
    if answer.status_code != 200:
        try:
            message = answer.json()["error"]["message"]
        except Exception:
            message = answer.text[:300]
        raise QueueError(f"{what}: HTTP {answer.status_code}: {message}")
    data: dict[str, Any] = answer.json()
    return data


@dataclass
class Runner:
    agent: Agent
    proxy: str
    key: str
    dataset: str
    split: str | None = None  # None: the dataset's val rounds first, then train
    concurrency: int = 8
    max_tasks: int | None = None  # rollouts this runner takes at most
    model: str | None = None  # default: the dataset's policy model
    retry_s: float = 30.0
    stop_when: Callable[[], bool] | None = None
    on_progress: Callable[[Stats], None] | None = None
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    stats: Stats = field(default_factory=Stats)
    prompt_run: str | None = None  # take only this prompt optimisation run's evaluations

    def __post_init__(self) -> None:
        self.stopping = asyncio.Event()
        self._client = QueueClient(self.proxy, self.key, self.retry_s, self.prompt_run)
        self._caller = AgentCaller(self.agent)

    async def run(self) -> Stats:
        """Until the dataset is drained, `max_tasks` were taken, `stop_when()` or `stop()`."""
        try:
            slots = [asyncio.create_task(self._slot(i)) for i in range(self.concurrency)]
            watcher = asyncio.create_task(self._watch())
            try:
                await asyncio.gather(*slots)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, LightloopError, httpx.HTTPError):
                    await watcher
                for slot in slots:
                    slot.cancel()
            with contextlib.suppress(LightloopError, httpx.HTTPError):
                await self._refresh()
            return self.stats
        finally:
            self._caller.close()
            await self._client.close()

    def stop(self) -> None:
        """Take no new rollouts; the running ones finish."""
        self.stopping.set()

    def _may_take(self) -> bool:
        if self.stopping.is_set():
            return False
        if self.max_tasks is not None and self.stats.taken >= self.max_tasks:
            return False
        if self.stop_when is not None and self.stop_when():
            self.stopping.set()
            return False
        return True

    async def _slot(self, index: int) -> None:
        worker = f"{self.worker}:{index}"
        idle = 0
        while self._may_take():
            self.stats.taken += 1  # reserved before asking, so max_tasks is never exceeded
            try:
                got = await self._client.next(self.dataset, self.split, worker)
            except BaseException:
                self.stats.taken -= 1
                raise
            if isinstance(got, bool):
                self.stats.taken -= 1
                if got:
                    return  # drained: nothing queued, nothing running, no task left to start
                # More may come (the trainer catching up, a lapsed lease): poll, backing off.
                idle += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), min(0.05 * 2**idle, 2.0))
                continue
            idle = 0
            await self._run_one(got)

    async def _run_one(self, got: Handout) -> None:
        llm = LLM(
            base_url=got.base_url,
            api_key=self._client.http.headers["authorization"].removeprefix("Bearer "),
            model=self.model or got.model,
            rollout_id=got.rollout_id,
            mode=got.split,
            attempt=got.attempt,
            group_id=got.group_id,
            task_id=got.task_id,
        )
        self.stats.running += 1
        beating = asyncio.create_task(self._beat(got))
        body: dict[str, Any] = {"attempt": got.attempt}
        try:
            reward, feedback = await self._caller.call(got.input, llm)
        except Exception as exc:
            log.warning("rollout %s: the agent raised %s: %s", got.rollout_id, type(exc).__name__, exc)
            body.update(
                status="failed",
                error=f"{type(exc).__name__}: {exc}",
                traceback="".join(traceback.format_exception(exc)),
            )
            reward = None
        else:
            body["status"] = "succeeded"
            if reward is not None:
                body["reward"] = reward
            if feedback is not None:
                body["feedback"] = feedback
        finally:
            beating.cancel()
            self.stats.running -= 1
        recorded = await self._client.finish(got.rollout_id, body)
        if not recorded:
            self.stats.superseded += 1
            log.warning(
                "rollout %s: attempt %d was superseded (its lease lapsed)", got.rollout_id, got.attempt
            )
        elif body["status"] == "failed":
            self.stats.failed += 1
        else:
            self.stats.succeeded += 1
            if reward is not None and got.split == "train":
                self.stats.reward_sum += reward
                self.stats.rewarded += 1

    async def _beat(self, got: Handout) -> None:
        while True:
            await asyncio.sleep(got.lease_s / 3)  # a lease renewed at a third of its length
            try:
                if not await self._client.heartbeat(got.rollout_id, got.attempt):
                    log.warning("rollout %s: attempt %d lost its lease", got.rollout_id, got.attempt)
                    return
            except LightloopError as exc:
                log.warning("rollout %s: heartbeat failed: %s", got.rollout_id, exc)

    async def _refresh(self) -> None:
        data = await self._client.progress(self.dataset)
        self.stats.live_version = data.get("live_version")
        val = data.get("val_reward")
        self.stats.val_reward = None if val is None else (int(val["version"]), float(val["mean"]))
        done, planned = 0, 0
        unknown = False
        for split in data.get("splits", {}).values():
            done += int(split["done"]) + int(split["failed"])
            if split.get("planned") is None:
                unknown = True
            else:
                planned += int(split["planned"])
        self.stats.done_total = (done, None if unknown else planned)

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(LightloopError, httpx.HTTPError):
                await self._refresh()
            if self.on_progress is not None:
                self.on_progress(self.stats)
            await asyncio.sleep(2.0)


def run(
    agent: Agent | str,
    *,
    dataset: str,
    split: str | None = None,
    concurrency: int = 8,
    proxy: str | None = None,
    key: str | None = None,
    max_tasks: int | None = None,
    model: str | None = None,
    stop_when: Callable[[], bool] | None = None,
) -> Stats:
    """`lightloop run` from Python: run `agent` over `dataset` until it is drained (or
    `max_tasks` rollouts, or `stop_when()`). The proxy and key default to the configured proxy
    address and the key `lightloop up` uses."""
    from lightloop.settings import load_settings

    settings = load_settings()
    proxy = proxy or f"http://{settings.proxy.host}:{settings.proxy.port}"
    key = key or default_key(
        settings.home, settings.master_key.get_secret_value() if settings.master_key else None
    )
    function = load_agent(agent) if isinstance(agent, str) else agent
    runner = Runner(function, proxy, key, dataset, split, concurrency, max_tasks, model, stop_when=stop_when)
    return asyncio.run(runner.run())


# The file `lightloop up` keeps a generated key in (proxy/auth.py's KEY_FILE; not imported, so
# that a runner does not load the proxy and LiteLLM).
KEY_FILE = "master.key"


def default_key(home: Path, master_key: str | None) -> str:
    """LITELLM_MASTER_KEY, else the key `lightloop up` generated under LIGHTLOOP_HOME."""
    if master_key:
        return master_key
    path = home / KEY_FILE
    if path.is_file():
        return path.read_text().strip()
    raise LightloopError(f"no proxy key: pass --key, set LITELLM_MASTER_KEY, or run where {path} exists")


async def run_cli(runner: Runner, *, quiet: bool) -> int:
    """The CLI's loop: a progress bar (or log lines with --quiet) and two-stage Ctrl-C. Exit
    status: 0, or 130 when a second Ctrl-C abandoned running rollouts."""
    loop = asyncio.get_running_loop()
    interrupts = 0
    abandon = asyncio.Event()

    def on_signal() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            runner.stop()
            print(
                f"\nstopping: no new rollouts; {runner.stats.running} running finish "
                "(Ctrl-C again abandons them: they are handed out again when their lease lapses)",
                file=sys.stderr,
                flush=True,
            )
        else:
            abandon.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    display = _Display(runner, quiet)
    runner.on_progress = display.update
    with display:
        work = asyncio.create_task(runner.run())
        stop = asyncio.create_task(abandon.wait())
        done, _ = await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            return 130
        stop.cancel()
        stats = work.result()
        display.update(stats)
    print(f"done: {stats.line()}", flush=True)
    return 0


class _Display:
    """A rich progress bar on a terminal; a log line every 5 s with --quiet or without one."""

    def __init__(self, runner: Runner, quiet: bool) -> None:
        self.runner = runner
        self.quiet = quiet or not sys.stderr.isatty()
        self._last = 0.0
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Display:
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn(f"[bold]{self.runner.dataset}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[line]}"),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("run", total=None, line="starting")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, stats: Stats) -> None:
        if self._progress is not None:
            done, total = stats.done_total or (stats.finished, None)
            self._progress.update(self._task, completed=done, total=total, line=stats.line())
            return
        now = time.monotonic()
        if now - self._last >= 5.0:
            self._last = now
            print(f"{self.runner.dataset}: {stats.line()}", flush=True)
