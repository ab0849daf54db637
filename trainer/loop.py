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
import random
import socket
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg

from lightloop.settings import TrainerSettings
from lightloop.store import (
    Claim,
    ClaimedRollout,
    ClaimLost,
    DatabaseUnavailable,
    StepRecord,
    claim_groups,
    connect,
    extend_claim,
    fail_version,
    get_version,
    list_versions,
    live_version,
    record_step,
    release_claim,
)
from lightloop.store.database import is_transient, is_unavailable
from lightloop.trainer.algorithms import Scored, drop_flat_groups, rollout_advantages
from lightloop.trainer.credit import rollout_total, turn_credit
from lightloop.trainer.errors import PublishError, TrainerError
from lightloop.trainer.publish import Published, Publisher
from lightloop.trainer.rebuild import (
    Advantage,
    RebuildStats,
    Sample,
    rebuild,
    served_by,
    trainable_for,
    turns_from_calls,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
BACKOFF_CAP_S = 30.0

T = TypeVar("T")
# What Postgres raises when it is unreachable or refusing, before or after translation; which of
# these is an outage (it may pass) rather than a bug is `is_outage`.
# asyncpg's InternalClientError: a connection whose server ended it (a failover, a restart) while
# a statement was being sent is left in a state no statement can use; a new connection is fine.
OUTAGE = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    DatabaseUnavailable,
)


def is_outage(exc: BaseException) -> bool:
    """Postgres is down or refuses for now (read-only, a deadlock): it may pass. Anything else
    (a statement Postgres rejects every time) is logged at ERROR each time it happens."""
    return (
        isinstance(exc, DatabaseUnavailable | asyncpg.InternalClientError)
        or is_unavailable(exc)
        or is_transient(exc)
    )


def backoff_s(attempt: int, base_s: float) -> float:
    """The pause before retry `attempt` (1, 2, ...): doubling from `base_s` up to 30 s, with jitter
    over its upper half ("equal jitter"), so that trainers that lost Postgres together do not
    return together."""
    ceiling: float = min(BACKOFF_CAP_S, base_s * 2.0 ** (attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)


class Backend(Protocol):
    def step(self, samples: Sequence[Sample], advantages: Sequence[Advantage]) -> dict[str, float]: ...

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
    # A call an agent's adapter served (its versions are that adapter's) is context here, never
    # trained into the policy's adapter, and does not count against its staleness.
    own, trainable = served_by(policy), trainable_for(policy, agents)

    for rollout in rollouts:
        calls = [c for c in rollout.calls if c["model"] == policy]
        versions = [c["policy_version"] for c in calls if c["policy_version"] is not None and own(c)]
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
        self._stop: asyncio.Event | None = None  # run()'s: a stopping trainer retries nothing

    async def resume(self) -> int:
        """Start from the live version: its weights, loaded on every engine. Versions a previous
        run staged but never made live are marked failed."""
        conn = await connect(self.database_url)
        try:
            await self._fail_staged(conn, "the trainer stopped before publishing it")
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
        self._stop = stop
        beating = asyncio.create_task(self._beat(stop)) if self.heartbeat else None
        try:
            attempt = 0
            while True:
                try:
                    version = await self.resume()
                    break
                except OUTAGE as exc:
                    attempt += 1
                    if attempt == 1:
                        log.warning(
                            "cannot resume yet (%s: %s); retrying until Postgres answers",
                            type(exc).__name__,
                            exc,
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff_s(attempt, self.settings.poll_interval_s))
                    if stop.is_set():
                        return 0
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
        outage = 0  # consecutive failed steps: Postgres down or refusing
        while not stop.is_set() and (max_steps is None or steps < max_steps):
            try:
                outcome = await self.step_once()
            except OUTAGE as exc:
                # An outage ends no trainer: its claim lapses by itself (nothing is consumed
                # before its step is recorded), and it retries with backoff and jitter, saying so
                # once per outage. An error that is no outage is said every time.
                outage += 1
                level = logging.WARNING if outage == 1 and is_outage(exc) else logging.DEBUG
                if not is_outage(exc):
                    level = logging.ERROR
                log.log(
                    level, "step failed (%s: %s); retrying until Postgres answers", type(exc).__name__, exc
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff_s(outage, self.settings.poll_interval_s))
                continue
            if outage:
                log.warning("Postgres answers again after %d failed tries; training resumes", outage)
                outage = 0
            if outcome is None:
                # Nothing ready: wait for more finished rollouts (or for stop).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.poll_interval_s)
                continue
            steps += 1
        return steps

    async def _renewing(self, claim: Claim, work: Awaitable[T]) -> T:
        """Await `work` while renewing the claim's lease every third of it, on a connection of its
        own (the step's connection may be busy in `work`): the update and the publish both take
        long, and a lease lost after a version went live would train its rollouts twice.

        Renewal is best effort and never stops `work`: an update thread cannot be cancelled (a
        second update would then run on the same weights), and a publish cut in half leaves a
        staged version loaded on the engines. A failed renewal is retried at the next tick; a
        lost claim stops the renewing, and `record_step` then refuses the step. A step past
        `max_step_s` is presumed hung and its lease left to lapse."""
        s = self.settings
        task = asyncio.ensure_future(work)
        renew: asyncpg.Connection | None = None
        lost = False
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=s.lease_s / 3)
                if done:
                    return task.result()
                assert self._step_started is not None
                if lost:
                    continue
                if time.monotonic() - self._step_started > s.max_step_s:
                    log.error("the step has run for more than %.0f s; not renewing the claim", s.max_step_s)
                    lost = True
                    continue
                try:
                    renew = renew if renew is not None and not renew.is_closed() else None
                    renew = renew or await connect(self.database_url)
                    await extend_claim(renew, claim, s.lease_s)
                except ClaimLost as exc:
                    log.error("the claim was lost during the step: %s", exc)
                    lost = True
                except OUTAGE as exc:
                    log.warning("could not renew the claim (%s: %s); trying again", type(exc).__name__, exc)
        finally:
            if not task.done():
                # Cancelled from outside (the trainer stops): let the work end first, so that no
                # update runs on beside the next one.
                await asyncio.wait({task})
            if renew is not None:
                with contextlib.suppress(Exception):
                    await renew.close()

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
                await self._release(conn, claim)
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
        # The step's reward figures: each rollout's reward, or with turn credit all it earned
        # (rollouts.reward is then just the latest reward posted, a call's included).
        rewards = {r.id: rollout_total(r) if s.credit == "turn" else r.reward for r in claim.rollouts}
        samples: list[Sample]
        sample_advantages: list[Advantage]
        if s.credit == "turn":
            samples, sample_advantages, flat_groups, turns = turn_credit(claim.rollouts, by_rollout, s.gamma)
            metrics.update(credit="turn", gamma=s.gamma, turns=turns)
        else:
            scored = [Scored(r.id, r.group, r.reward) for r in claim.rollouts if r.id in by_rollout]
            kept, flat_groups = drop_flat_groups(scored)
            advantages = rollout_advantages(kept, s.algorithm)
            samples = [sample for rid in advantages for sample in by_rollout[rid]]
            sample_advantages = [advantages[sample.rollout_id] for sample in samples]
            metrics.update(credit="rollout")
        metrics.update(flat_groups=flat_groups, samples=len(samples), algorithm=s.algorithm)
        loss = None
        n_tokens = 0
        if samples:
            # The update runs in a thread so that the lease can be renewed meanwhile.
            step_metrics = await self._renewing(
                claim, asyncio.to_thread(self.backend.step, samples, sample_advantages)
            )
            loss = step_metrics.pop("loss")
            n_tokens = int(step_metrics.pop("tokens"))
            metrics.update(step_metrics)
        values = list(rewards.values())

        def record(version_out: int, publish_error: str | None) -> StepRecord:
            extra = {} if publish_error is None else {"publish_error": publish_error}
            return StepRecord(
                started_at=started,
                policy=self.policy,
                policy_in=version_in,
                policy_out=version_out,
                trainer=self.name,
                n_tokens=n_tokens,
                loss=loss,
                reward_mean=statistics.fmean(values) if values else None,
                reward_std=statistics.pstdev(values) if len(values) > 1 else 0.0,
                metrics={**metrics, **extra, "seconds": round(time.monotonic() - t0, 3)},
            )

        step, finished = await self._publish_and_record(conn, claim, bool(samples), version_in, record)
        version_out = finished.policy_out
        assert version_out is not None
        log.info(
            "step %s: %d rollouts, %d samples, %d tokens, reward %.3f, loss %s, v%d -> v%d (%.1fs)",
            step,
            len(claim.rollouts),
            len(samples),
            n_tokens,
            finished.reward_mean or 0.0,
            "-" if loss is None else f"{loss:.4f}",
            version_in,
            version_out,
            time.monotonic() - t0,
        )
        return StepOutcome(step, len(claim.rollouts), len(samples), version_out, finished.metrics)

    async def _publish_and_record(
        self,
        conn: asyncpg.Connection,
        claim: Claim,
        updated: bool,
        version_in: int,
        record: Callable[[int, str | None], StepRecord],
    ) -> tuple[int | None, StepRecord]:
        """Publish the updated weights (when there are any) and record the step, which consumes
        its rollouts. Postgres going away here (it restarted, it failed over) does not throw the
        update away and train the same rollouts twice: on a fresh connection, with backoff, the
        part that did not go through is tried again, until it does, the step outlives
        `max_step_s`, the trainer is stopped or the claim is lost. A publish cut short is
        looked up first: live, it counts; still staged, it is marked failed and done again."""
        s = self.settings
        published: Published | None = None
        publish_error: str | None = None
        interrupted = False  # a publish call was cut short by the outage
        attempt = 0
        db = conn
        try:
            while True:
                try:
                    if interrupted:
                        published = await self._after_interrupted_publish(db)
                        interrupted = False
                    if updated and published is None and publish_error is None:
                        try:
                            interrupted = True
                            published = await self._renewing(
                                claim, self.publisher.publish(db, self.backend.save_adapter)
                            )
                        except PublishError as exc:
                            # The weights stay in the trainer and go out with the next publish.
                            log.error("publishing failed, version %d stays live: %s", version_in, exc)
                            publish_error = str(exc)
                        interrupted = False
                    finished = record(published.version if published else version_in, publish_error)
                    try:
                        return await record_step(db, claim, finished), finished
                    except ClaimLost as exc:
                        log.error("step not recorded: %s", exc)
                        return None, finished
                except OUTAGE as exc:
                    if not is_outage(exc):
                        raise
                    log.warning(
                        "Postgres went away while publishing or recording (%s: %s); trying again",
                        type(exc).__name__,
                        exc,
                    )
                    if db is not conn:
                        with contextlib.suppress(Exception):
                            await db.close()
                    # Back on a fresh connection whose claim still holds, or give up (raise).
                    while True:
                        attempt += 1
                        assert self._step_started is not None
                        if time.monotonic() - self._step_started > s.max_step_s or self._stopping:
                            raise
                        await asyncio.sleep(backoff_s(attempt, s.poll_interval_s))
                        try:
                            db = await connect(self.database_url)
                        except OUTAGE:
                            continue
                        try:
                            await extend_claim(db, claim, s.lease_s)
                        except ClaimLost as lost:
                            log.error("the claim was lost during the outage: %s", lost)
                            return None, record(published.version if published else version_in, publish_error)
                        except OUTAGE:
                            with contextlib.suppress(Exception):
                                await db.close()
                            continue
                        break
        finally:
            if db is not conn:
                with contextlib.suppress(Exception):
                    await db.close()

    async def _after_interrupted_publish(self, conn: asyncpg.Connection) -> Published | None:
        """What became of the version a publish cut short by an outage had staged: live (its
        `set_live` committed), it is this step's; staged, it is marked failed (the engines may
        not all hold it) and unloaded, so that the step publishes anew."""
        version = self.publisher.staged
        if version is None:
            return None
        found = await get_version(conn, self.policy, version)
        if found is not None and found.status == "live":
            return Published(version, self.publisher.path_of(version), found.sha256 or "")
        if found is not None and found.status == "staged":
            await fail_version(conn, self.policy, version, "a Postgres outage interrupted its publish")
            await self.publisher.unload(version)
        return None

    @property
    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def _release(self, conn: asyncpg.Connection, claim: Claim) -> None:
        """Give a failed step's rollouts back now, on a fresh connection if the step's is gone
        (Postgres restarted), so that the retry need not wait for the lease to lapse."""
        with contextlib.suppress(Exception):
            if not conn.is_closed():
                await release_claim(conn, claim)
                return
        with contextlib.suppress(Exception):
            fresh = await connect(self.database_url)
            try:
                await release_claim(fresh, claim)
            finally:
                await fresh.close()

    async def _fail_staged(self, conn: asyncpg.Connection, reason: str) -> None:
        for version in await list_versions(conn, self.policy):
            if version.status == "staged":
                await fail_version(conn, self.policy, version.version, reason)
