"""The trainer daemon: claim -> rebuild -> advantages -> update -> publish -> record, one step at
a time, one log line per step.

Crash safety: a claim is a lease, so rollouts of a step that dies come back by themselves and
none is marked consumed before its step is recorded; a version is live only after every engine
loaded it (`publish.py`). A crash after publishing and before recording trains those rollouts
again on restart: at least once, never lost. A restart resumes from the live version's weights."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg

from lightloop.settings import TrainerSettings
from lightloop.store import (
    Claim,
    ClaimLost,
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
from lightloop.trainer.errors import PublishError, TrainerError
from lightloop.trainer.outage import OUTAGE, backoff_s, is_outage
from lightloop.trainer.publish import Published, Publisher
from lightloop.trainer.rebuild import Advantage, Sample
from lightloop.trainer.select import AdapterStep, plan_adapter, rollout_reward

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
T = TypeVar("T")


class Backend(Protocol):
    """A trainer backend holds the policy's adapter (`adapter=None`) and one per agent with an
    adapter of its own (by its name, `policy-planner`), all on one base model."""

    def step(
        self, samples: Sequence[Sample], advantages: Sequence[Advantage], adapter: str | None = None
    ) -> dict[str, float]: ...

    def save_adapter(self, path: Any, adapter: str | None = None) -> None: ...

    def load_adapter(self, path: Any, adapter: str | None = None) -> None: ...


@dataclass
class StepOutcome:
    step: int | None
    n_rollouts: int
    n_samples: int
    version: int  # the policy's own adapter's version after the step
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)  # every adapter's, by name


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
        agents: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        # The adapters trained, (name, agent): the policy's own, then each agent's with an adapter
        # of its own (`agents`: agent -> adapter name); the publisher must know the same ones.
        self.adapters: list[tuple[str, str | None]] = [(policy, None)]
        self.adapters += [(adapter, agent) for agent, adapter in (agents or {}).items()]
        assert [a for a, _ in self.adapters] == publisher.names, "the publisher publishes other adapters"
        self.database_url = database_url
        self.backend = backend
        self.publisher = publisher
        self.name = name or f"trainer@{socket.gethostname()}:{os.getpid()}"
        self.heartbeat = heartbeat
        self._step_started: float | None = None  # monotonic start of the step in progress
        self._stop: asyncio.Event | None = None  # run()'s: a stopping trainer retries nothing
        # Agent adapters without a version of their own: the policy's version each was copied from.
        self._forked: dict[str, int] = {}
        # Adapters whose weights here are ahead of their live version (trained, publish failed):
        # they go out with the next publish, whether or not that step trains them again.
        self._unpublished: set[str] = set()

    async def resume(self) -> int:
        """Start from the live versions: their weights (the policy's and each agent adapter's),
        loaded on every engine. Versions a previous run staged but never made live are marked
        failed. Returns the policy's own live version."""
        # From here the trainer holds the live versions' weights: nothing is ahead of them.
        self._unpublished.clear()
        self._forked.clear()
        conn = await connect(self.database_url)
        try:
            versions: dict[str, int] = {}
            for name, agent in self.adapters:
                await self._fail_staged(conn, name, "the trainer stopped before publishing it")
                live = await live_version(conn, name)
                if live is None:
                    continue
                path = self.publisher.path_of(live.version, name)
                if not (path / "adapter_config.json").is_file():
                    raise TrainerError(
                        f"version {live.version} of {name} is live but its adapter is not in {path}; "
                        "point LIGHTLOOP_HOME at the folder the trainer published from"
                    )
                self.backend.load_adapter(path, adapter=agent and name)
                versions[name] = live.version
            if versions:
                try:
                    await self.publisher.restore(conn)
                except PublishError as exc:
                    log.warning("could not reload the live versions %s on every engine: %s", versions, exc)
            return versions.get(self.policy, 0)
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

    def _fork(self, name: str, version: int) -> None:
        """Make agent adapter `name`, which has no version of its own, the policy's `version`
        (nothing to do for version 0, the base model: every adapter starts as it). An adapter
        trained since its last copy keeps its weights: they await their first publish."""
        if version == 0 or self._forked.get(name) == version or name in self._unpublished:
            return
        try:
            self.backend.load_adapter(self.publisher.path_of(version), adapter=name)
        except TrainerError as exc:
            # The verl backend copies only before the adapter's workers start (its first step).
            log.warning("%s starts from the weights it had, not %s v%d: %s", name, self.policy, version, exc)
        self._forked[name] = version

    def _update(self, plans: Sequence[AdapterStep]) -> dict[str, dict[str, float]]:
        """Each adapter with samples takes one optimiser step (in a thread: the loop renews the
        lease meanwhile); their metrics by adapter."""
        return {
            p.name: self.backend.step(p.samples, p.advantages, adapter=p.agent and p.name)
            for p in plans
            if p.samples
        }

    async def _train(self, conn: asyncpg.Connection, claim: Claim) -> StepOutcome:
        started = datetime.now(UTC)
        t0 = time.monotonic()
        # The rollouts are rebuilt once per adapter: each trains on its own turns, the other
        # agents' turns are its context, and every adapter's advantages come from the same groups.
        lives: dict[str, int] = {}
        for name, _ in self.adapters:
            live = await live_version(conn, name)
            lives[name] = live.version if live is not None else 0
            if lives[name]:
                self._forked.pop(name, None)  # a version of its own: no copy to remember
        plans = []
        for name, agent in self.adapters:
            # An agent's adapter without a version of its own starts as a copy of the policy's
            # live one, which served that agent until now; those calls are its samples.
            adopted = lives[self.policy] if agent is not None and lives[name] == 0 else None
            if adopted is not None:
                self._fork(name, adopted)
            plans.append(
                plan_adapter(
                    claim.rollouts,
                    self.settings,
                    policy=self.policy,
                    name=name,
                    agent=agent,
                    version_in=lives[name],
                    others=[a for _, a in self.adapters if a is not None],
                    adopted=adopted,
                )
            )
        own = plans[0]
        assert own.agent is None, "the policy's own adapter comes first"
        updates = (
            await self._renewing(claim, asyncio.to_thread(self._update, plans))
            if any(p.samples for p in plans)
            else {}
        )
        self._unpublished |= set(updates)
        n_tokens = 0
        weighted_loss = 0.0
        for plan in plans:
            if plan.name in updates:
                m = dict(updates[plan.name])
                tokens = int(m.pop("tokens"))
                n_tokens += tokens
                weighted_loss += m["loss"] * tokens
                plan.metrics.update(m, tokens=tokens)
        loss = weighted_loss / n_tokens if n_tokens else None
        # The step's reward figures: each rollout's reward, or with turn credit all it earned
        # (rollouts.reward is then just the latest reward posted, a call's included).
        values = [rollout_reward(r, self.settings.credit) for r in claim.rollouts]
        # The policy's own adapter's figures stay at the top (as before agent adapters); with
        # agent adapters, `adapters` holds each one's, by name.
        metrics = {k: v for k, v in own.metrics.items() if k not in ("loss", "tokens")}
        several = len(plans) > 1

        def record(versions: dict[str, int], publish_error: str | None) -> StepRecord:
            extra: dict[str, Any] = {} if publish_error is None else {"publish_error": publish_error}
            if several:
                extra["adapters"] = {
                    p.name: {
                        "agent": p.agent,
                        "version_in": p.version_in,
                        "version_out": versions.get(p.name, p.version_in),
                        "samples": len(p.samples),
                        "reward_mean": statistics.fmean(p.rewards) if p.rewards else None,
                        **p.metrics,
                    }
                    for p in plans
                }
            return StepRecord(
                started_at=started,
                policy=self.policy,
                policy_in=own.version_in,
                policy_out=versions.get(self.policy, own.version_in),
                trainer=self.name,
                n_tokens=n_tokens,
                loss=loss,
                reward_mean=statistics.fmean(values) if values else None,
                reward_std=statistics.pstdev(values) if len(values) > 1 else 0.0,
                metrics={**metrics, **extra, "seconds": round(time.monotonic() - t0, 3)},
                published={n: v for n, v in versions.items() if n != self.policy},
            )

        step, finished = await self._publish_and_record(conn, claim, plans, set(self._unpublished), record)
        assert finished.policy_out is not None
        versions = {p.name: p.version_in for p in plans} | finished.published
        versions[self.policy] = finished.policy_out
        n_samples = sum(len(p.samples) for p in plans)
        log.info(
            "step %s: %d rollouts, %d samples, %d tokens, reward %.3f, loss %s, %s (%.1fs)",
            step,
            len(claim.rollouts),
            n_samples,
            n_tokens,
            finished.reward_mean or 0.0,
            "-" if loss is None else f"{loss:.4f}",
            ", ".join(f"{p.name} v{p.version_in} -> v{versions[p.name]}" for p in plans),
            time.monotonic() - t0,
        )
        return StepOutcome(
            step, len(claim.rollouts), n_samples, finished.policy_out, finished.metrics, versions
        )

    async def _publish_and_record(
        self,
        conn: asyncpg.Connection,
        claim: Claim,
        plans: Sequence[AdapterStep],
        updated: set[str],
        record: Callable[[dict[str, int], str | None], StepRecord],
    ) -> tuple[int | None, StepRecord]:
        """Publish the updated adapters (when there are any), together, and record the step,
        which consumes its rollouts. Postgres going away here (it restarted, it failed over) does
        not throw the update away and train the same rollouts twice: on a fresh connection, with
        backoff, the part that did not go through is tried again, until it does, the step
        outlives `max_step_s`, the trainer is stopped or the claim is lost. A publish cut short
        is looked up first: live, it counts; still staged, it is marked failed and done again."""
        s = self.settings
        saves = {
            p.name: functools.partial(self.backend.save_adapter, adapter=p.agent and p.name)
            for p in plans
            if p.name in updated
        }
        published: dict[str, Published] | None = None
        publish_error: str | None = None
        interrupted = False  # a publish call was cut short by the outage
        attempt = 0
        db = conn

        def versions() -> dict[str, int]:
            return {name: p.version for name, p in (published or {}).items()}

        try:
            while True:
                try:
                    if interrupted:
                        published = await self._after_interrupted_publish(db)
                        interrupted = False
                    if saves and published is None and publish_error is None:
                        try:
                            interrupted = True
                            published = await self._renewing(claim, self.publisher.publish_all(db, saves))
                        except PublishError as exc:
                            # The weights stay in the trainer and go out with the next publish.
                            log.error(
                                "publishing failed, the live versions stay live (%s): %s",
                                ", ".join(f"{p.name} v{p.version_in}" for p in plans),
                                exc,
                            )
                            publish_error = str(exc)
                        interrupted = False
                    if published:
                        self._unpublished.difference_update(published)
                    finished = record(versions(), publish_error)
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
                            if interrupted:
                                # What the cut-short publish left: live counts as published;
                                # staged is failed and unloaded (best effort).
                                with contextlib.suppress(*OUTAGE):
                                    published = await self._after_interrupted_publish(db)
                            self._unpublished.difference_update(published or {})
                            return None, record(versions(), publish_error)
                        except OUTAGE:
                            with contextlib.suppress(Exception):
                                await db.close()
                            continue
                        break
        finally:
            if db is not conn:
                with contextlib.suppress(Exception):
                    await db.close()

    async def _after_interrupted_publish(self, conn: asyncpg.Connection) -> dict[str, Published] | None:
        """What became of the versions a publish cut short by an outage had staged: live (their
        one `set_live` transaction committed), they are this step's; staged, they are marked
        failed (the engines may not all hold them) and unloaded, so that the step publishes anew."""
        staged = dict(self.publisher.staged)
        if not staged:
            return None
        found = {name: await get_version(conn, name, version) for name, version in staged.items()}
        if all(f is not None and f.status == "live" for f in found.values()):
            return {
                name: Published(version, self.publisher.path_of(version, name), found[name].sha256 or "")  # type: ignore[union-attr]
                for name, version in staged.items()
            }
        for name, version in staged.items():
            status = found[name].status if found[name] is not None else None  # type: ignore[union-attr]
            if status == "staged":
                await fail_version(conn, name, version, "a Postgres outage interrupted its publish")
            if status != "live":
                await self.publisher.unload(version, name)
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

    async def _fail_staged(self, conn: asyncpg.Connection, name: str, reason: str) -> None:
        for version in await list_versions(conn, name):
            if version.status == "staged":
                await fail_version(conn, name, version.version, reason)
