"""The trainer daemon: claim -> rebuild -> advantages -> update -> publish -> record, one step at
a time, one log line per step.

Crash safety: a claim is a lease, so rollouts of a step that dies come back by themselves and
none is marked consumed before its step is recorded; a version is live only after every engine
loaded it (`publish.py`). A crash after publishing and before recording trains those rollouts
again on restart: at least once, never lost. A restart resumes from the live version's weights."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from lightloop.settings import TrainerSettings
from lightloop.store import (
    Claim,
    ClaimedRollout,
    ClaimLost,
    StepRecord,
    claim_groups,
    connect,
    extend_claim,
    fail_version,
    list_versions,
    live_version,
    record_step,
    release_claim,
)
from lightloop.trainer.algorithms import Scored, drop_flat_groups, rollout_advantages
from lightloop.trainer.errors import PublishError, TrainerError
from lightloop.trainer.publish import Publisher
from lightloop.trainer.rebuild import RebuildStats, Sample, rebuild, turns_from_calls

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0


class Backend(Protocol):
    def step(self, samples: Sequence[Sample], advantages: Sequence[float]) -> dict[str, float]: ...

    def save_adapter(self, path: Any) -> None: ...

    def load_adapter(self, path: Any) -> None: ...


@dataclass
class StepOutcome:
    step: int | None
    n_rollouts: int
    n_samples: int
    version: int
    metrics: dict[str, Any] = field(default_factory=dict)


def select_samples(
    rollouts: Sequence[ClaimedRollout],
    *,
    policy: str,
    live: int,
    max_staleness: int,
    agents: Sequence[str],
) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
    """Samples per rollout, after the staleness filter; counts for the step's metrics. Pure."""
    stats = RebuildStats()
    stale = 0
    by_rollout: dict[str, list[Sample]] = {}
    wanted = set(agents)

    def trainable(call: Any) -> bool:
        return not wanted or call["agent"] in wanted or call["model"] in wanted

    for rollout in rollouts:
        calls = [c for c in rollout.calls if c["model"] == policy]
        versions = [c["policy_version"] for c in calls if c["policy_version"] is not None]
        if versions and min(versions) < live - max_staleness:
            stale += 1
            continue
        samples, rollout_stats = rebuild(rollout.id, turns_from_calls(calls, trainable))
        stats.add(rollout_stats)
        if samples:
            by_rollout[rollout.id] = samples
    return by_rollout, {**stats.as_dict(), "stale_rollouts": stale}


class Trainer:
    def __init__(
        self,
        settings: TrainerSettings,
        policy: str,
        database_url: str,
        backend: Backend,
        publisher: Publisher,
        name: str | None = None,
        heartbeat: Path | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.database_url = database_url
        self.backend = backend
        self.publisher = publisher
        self.name = name or f"trainer@{socket.gethostname()}:{os.getpid()}"
        self.heartbeat = heartbeat
        self._step_started: float | None = None  # monotonic start of the step in progress

    async def resume(self) -> int:
        """Start from the live version: its weights, loaded on every engine. Versions a previous
        run staged but never made live are marked failed."""
        conn = await connect(self.database_url)
        try:
            for version in await list_versions(conn, self.policy):
                if version.status == "staged":
                    await fail_version(
                        conn, self.policy, version.version, "the trainer stopped before publishing it"
                    )
            live = await live_version(conn, self.policy)
            if live is None:
                return 0
            path = self.publisher.path_of(live.version)
            if not (path / "adapter_config.json").is_file():
                raise TrainerError(
                    f"version {live.version} of {self.policy} is live but its adapter is not in {path}; "
                    "point LIGHTLOOP_HOME at the folder the trainer published from"
                )
            self.backend.load_adapter(path)
            try:
                await self.publisher.restore(conn)
            except PublishError as exc:
                log.warning("could not reload version %d on every engine: %s", live.version, exc)
            return live.version
        finally:
            await conn.close()

    async def run(self, stop: asyncio.Event, max_steps: int | None = None) -> int:
        """Train until `stop` is set (or `max_steps` steps were recorded); steps recorded."""
        beating = asyncio.create_task(self._beat(stop)) if self.heartbeat else None
        try:
            version = await self.resume()
            log.info("trainer %s: policy %s from version %d", self.name, self.policy, version)
            return await self._loop(stop, max_steps)
        finally:
            if beating:
                beating.cancel()

    async def _beat(self, stop: asyncio.Event) -> None:
        """Touch the heartbeat file while the trainer is healthy (`lightloop trainer --check`).
        The update runs in a thread, so a long step keeps beating, up to `max_step_s`: a step
        stuck longer (a hung collective, a dead worker) stops the beat, and the health check fails."""
        assert self.heartbeat is not None
        self.heartbeat.parent.mkdir(parents=True, exist_ok=True)
        while not stop.is_set():
            running = self._step_started is not None and time.monotonic() - self._step_started
            if not running or running < self.settings.max_step_s:
                self.heartbeat.touch()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_S)

    async def _loop(self, stop: asyncio.Event, max_steps: int | None) -> int:
        steps = 0
        while not stop.is_set() and (max_steps is None or steps < max_steps):
            try:
                outcome = await self.step_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("step failed (%s: %s); retrying", type(exc).__name__, exc)
                outcome = None
            if outcome is None:
                # Nothing ready: wait for more finished rollouts (or for stop).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.poll_interval_s)
                continue
            steps += 1
        return steps

    async def step_once(self) -> StepOutcome | None:
        s = self.settings
        conn = await connect(self.database_url)
        try:
            claim = await claim_groups(
                conn, self.name, max_groups=s.groups_per_step, lease_s=s.lease_s, settle_s=s.group_settle_s
            )
            if claim is None:
                return None
            groups = {r.group_id or r.id for r in claim.rollouts}
            if len(groups) < s.min_groups:
                await release_claim(conn, claim)
                return None
            self._step_started = time.monotonic()
            try:
                return await self._train(conn, claim)
            except BaseException:
                with contextlib.suppress(Exception):
                    await release_claim(conn, claim)
                raise
            finally:
                self._step_started = None
        finally:
            await conn.close()

    async def _train(self, conn: asyncpg.Connection, claim: Claim) -> StepOutcome:
        s = self.settings
        started = datetime.now(UTC)
        t0 = time.monotonic()
        live = await live_version(conn, self.policy)
        version_in = live.version if live is not None else 0
        by_rollout, metrics = select_samples(
            claim.rollouts,
            policy=self.policy,
            live=version_in,
            max_staleness=s.max_staleness,
            agents=s.agents,
        )
        rewards = {r.id: r.reward for r in claim.rollouts}
        scored = [Scored(r.id, r.group_id or r.id, r.reward) for r in claim.rollouts if r.id in by_rollout]
        kept, flat_groups = drop_flat_groups(scored)
        advantages = rollout_advantages(kept, s.algorithm)
        samples = [sample for rid in advantages for sample in by_rollout[rid]]
        sample_advantages = [advantages[sample.rollout_id] for sample in samples]
        metrics.update(flat_groups=flat_groups, samples=len(samples), algorithm=s.algorithm)
        version_out = version_in
        loss = None
        n_tokens = 0
        if samples:
            # The update runs in a thread so that the lease can be renewed meanwhile.
            update = asyncio.create_task(asyncio.to_thread(self.backend.step, samples, sample_advantages))
            while True:
                done, _ = await asyncio.wait({update}, timeout=s.lease_s / 3)
                if done:
                    break
                assert self._step_started is not None
                if time.monotonic() - self._step_started > s.max_step_s:
                    # Presumed hung: let the lease lapse so another trainer (or this one,
                    # restarted by its health check) can take the rollouts.
                    log.error("the update has run for more than %.0f s; not renewing the claim", s.max_step_s)
                    continue
                await extend_claim(conn, claim, s.lease_s)
            step_metrics = update.result()
            loss = step_metrics.pop("loss")
            n_tokens = int(step_metrics.pop("tokens"))
            metrics.update(step_metrics)
            try:
                published = await self.publisher.publish(conn, self.backend.save_adapter)
                version_out = published.version
            except PublishError as exc:
                # The weights stay in the trainer and go out with the next successful publish.
                log.error("publishing failed, version %d stays live: %s", version_in, exc)
                metrics["publish_error"] = str(exc)
        values = list(rewards.values())
        record = StepRecord(
            started_at=started,
            policy=self.policy,
            policy_in=version_in,
            policy_out=version_out,
            trainer=self.name,
            n_tokens=n_tokens,
            loss=loss,
            reward_mean=statistics.fmean(values) if values else None,
            reward_std=statistics.pstdev(values) if len(values) > 1 else 0.0,
            metrics={**metrics, "seconds": round(time.monotonic() - t0, 3)},
        )
        try:
            step = await record_step(conn, claim, record)
        except ClaimLost as exc:
            log.error("step not recorded: %s", exc)
            step = None
        log.info(
            "step %s: %d rollouts, %d samples, %d tokens, reward %.3f, loss %s, v%d -> v%d (%.1fs)",
            step,
            len(claim.rollouts),
            len(samples),
            n_tokens,
            record.reward_mean or 0.0,
            "-" if loss is None else f"{loss:.4f}",
            version_in,
            version_out,
            time.monotonic() - t0,
        )
        return StepOutcome(step, len(claim.rollouts), len(samples), version_out, record.metrics)
