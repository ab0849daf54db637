"""The task queue's routes on the proxy: runners take rollouts (`POST /v1/tasks/next`), keep
their lease (`POST /v1/rollouts/{id}/heartbeat`) and read progress (`GET /v1/datasets`). The
queue itself is in Postgres (`store/queue.py`); a supervised reaper re-queues lapsed leases."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from urllib.parse import quote

from lightloop.aio import stop_task
from lightloop.proxy.attribution import check_id
from lightloop.proxy.errors import BadRequest, NotFound
from lightloop.proxy.http import Scope, Send, header, respond, respond_json
from lightloop.proxy.prompts import PromptRegistry
from lightloop.proxy.recorder import Recorder
from lightloop.proxy.routes import Pool, _parse_lenient, with_db
from lightloop.proxy.versions import LiveVersions
from lightloop.settings import QueueSettings, TrainerSettings
from lightloop.store import queue, tasks

log = logging.getLogger(__name__)


def public_base(scope: Scope) -> str:
    """The proxy's address as this client reached it (for the base URL a runner gets back)."""
    host = (header(scope, b"host") or b"").decode("latin-1")
    if not host:
        server = scope.get("server") or ("127.0.0.1", 4000)
        host = f"{server[0]}:{server[1]}"
    return f"{scope.get('scheme', 'http')}://{host}"


def rollout_base_url(base: str, rollout_id: str, attempt: int) -> str:
    return f"{base}/rollout/{quote(rollout_id, safe='')}/attempt/{attempt}/v1"


class TaskQueue:
    def __init__(
        self,
        settings: QueueSettings,
        trainer: TrainerSettings,
        versions: LiveVersions,
        recorder: Recorder,
        pool: Pool,
        prompts: PromptRegistry,
    ) -> None:
        self.settings = settings
        self.prompts = prompts
        self.trainer = trainer
        self.versions = versions
        self.recorder = recorder
        self.pool = pool
        # (dataset, policy, version) whose val round is known to exist: skips the statement.
        self._rounds: set[tuple[str, str, int]] = set()
        self.reaper_error: str | None = None
        self.reaped = {"requeued": 0, "failed": 0}

    def live(self, policy: str) -> int:
        if policy not in self.versions.policies:
            return 0
        return self.versions.live(policy)

    def max_groups(self, policy: str) -> int | None:
        """The staleness rule: a group handed out now is trained by one of the next
        MAX_STALENESS + 1 steps (each takes GROUPS_PER_STEP groups, oldest first), so its
        version is never more than MAX_STALENESS behind the one training it."""
        configured = self.settings.max_groups_in_flight
        if configured is not None:
            return configured or None
        return (self.trainer.max_staleness + 1) * self.trainer.groups_per_step

    async def next(self, scope: Scope, body: bytes, send: Send) -> int:
        data = _parse_lenient(body) if body.strip() else {}
        dataset = _optional(data, "dataset")
        if dataset is not None:
            check_id(dataset, "dataset")
        split = _optional(data, "split")
        if split not in (None, "train", "val"):
            raise BadRequest("split must be 'train' or 'val' (or left out: val first, then train)")
        worker = _optional(data, "worker")
        if worker is not None and len(worker) > 200:
            raise BadRequest("worker must hold at most 200 characters")
        prompt_run = _optional(data, "prompt_run")
        if prompt_run is not None:
            check_id(prompt_run, "prompt_run")
        splits = ("val", "train") if split is None else (split,)

        async def take(conn: Any) -> queue.Handout | queue.Empty:
            wanted = await queue.datasets(conn, dataset)
            if "val" in splits and prompt_run is None:
                for name, policy in wanted.items():
                    key = (name, policy, self.live(policy))
                    if key not in self._rounds:
                        await queue.ensure_val_round(conn, *key)
                        self._rounds.add(key)
            return await queue.next_rollout(
                conn,
                wanted=wanted,
                splits=splits,
                worker=worker,
                lease_s=self.settings.lease_s,
                live=self.live,
                max_groups=self.max_groups,
                prompt_run=prompt_run,
            )

        got = await with_db(self.pool, take)
        if isinstance(got, queue.Empty):
            state = b"drained" if got.drained else b"waiting"
            await respond(send, 204, b"", extra_headers=[(b"x-lightloop-queue", state)])
            return 204
        self.recorder.handed_out(got.rollout_id)
        if got.prompt_name is not None and got.prompt_version is not None and got.prompt_text is not None:
            self.prompts.pin(got.rollout_id, (got.prompt_name, got.prompt_version, got.prompt_text))
        measures = got.split == "val" or got.prompt_name is not None
        if measures and got.policy_version is not None and got.policy in self.versions.policies:
            # A held-out round measures the version it was made for, and an optimisation run's
            # candidates are all measured with the policy version live when it started, even when
            # a newer one goes live meanwhile.
            self.versions.pin(got.rollout_id, got.policy, got.policy_version)
        await respond_json(
            send,
            200,
            {
                "rollout_id": got.rollout_id,
                "group_id": got.group_id,
                "task_id": got.task_id,
                "dataset": got.dataset,
                "split": got.split,
                "input": got.input,
                "base_url": rollout_base_url(public_base(scope), got.rollout_id, got.attempt),
                "attempt": got.attempt,
                "lease_s": self.settings.lease_s,
                "group_size": got.group_size,
                "model": got.policy,
                "policy_version": got.policy_version,
                "prompt": None
                if got.prompt_name is None
                else {"name": got.prompt_name, "version": got.prompt_version},
            },
        )
        return 200

    async def heartbeat(self, rollout_id: str, body: bytes, send: Send) -> int:
        check_id(rollout_id, "rollout id")
        data = _parse_lenient(body) if body.strip() else {}
        attempt = _attempt(data)
        current, expires = await with_db(
            self.pool, lambda conn: queue.heartbeat(conn, rollout_id, attempt, self.settings.lease_s)
        )
        await respond_json(
            send,
            200,
            {
                "rollout_id": rollout_id,
                "attempt": current,
                "lease_s": self.settings.lease_s,
                "expires_at": expires.isoformat(),
            },
        )
        return 200

    async def datasets(self, name: str | None, send: Send) -> int:
        if name is not None:
            check_id(name, "dataset")

        async def read(conn: Any) -> list[dict[str, Any]]:
            out = []
            for d in await tasks.dataset_progress(conn, name):
                latest = await tasks.latest_val_reward(conn, d.name)
                out.append(
                    {
                        "name": d.name,
                        "policy": d.policy,
                        "live_version": self.live(d.policy),
                        "val_reward": None if latest is None else {"version": latest[0], "mean": latest[1]},
                        "splits": {k: v.as_dict() for k, v in d.splits.items()},
                    }
                )
            return out

        found = await with_db(self.pool, read)
        if name is not None:
            if not found:
                raise NotFound(f"dataset {name!r} does not exist")
            await respond_json(send, 200, found[0])
        else:
            await respond_json(send, 200, {"data": found})
        return 200

    async def reap_forever(self) -> None:
        """Re-queue lapsed leases every REAP_INTERVAL_S. Supervised: a failing pass is logged,
        shown in /health and retried; it never ends the task."""
        while True:
            started = time.monotonic()
            try:
                counts = await with_db(
                    self.pool,
                    lambda conn: queue.expire_leases(
                        conn,
                        max_attempts=self.settings.max_attempts,
                        failed_reward=self.settings.failed_reward,
                    ),
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.reaper_error is None:
                    log.warning("the queue's lease reaper failed (%s: %s); retrying", type(exc).__name__, exc)
                self.reaper_error = f"{type(exc).__name__}: {exc}"[:300]
            else:
                self.reaper_error = None
                for k, v in counts.items():
                    self.reaped[k] += v
                if any(counts.values()):
                    log.info(
                        "queue: %d rollouts re-queued, %d failed after their last attempt", *counts.values()
                    )
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.settings.reap_interval_s - elapsed))

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        task = asyncio.create_task(self.reap_forever(), name="lightloop-queue-reaper")
        try:
            yield
        finally:
            await stop_task(task)


def _optional(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{key} must be a string")
    return value


def _attempt(data: dict[str, Any]) -> int | None:
    value = data.get("attempt")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest("attempt must be a positive integer")
    return value
