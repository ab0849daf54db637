"""The live version of each policy model, as the proxy serves it: read at start, then kept
current by LISTEN/NOTIFY, so the alias switches the instant the trainer makes a version live.

While Postgres is unreachable the proxy keeps serving the version it knew (the base model if it
never knew one) and reconnects in the background; on reconnect it re-reads every live version,
since notifications sent meanwhile are lost. It also re-reads them every `reread_s` while
listening: a connection that went half-open (a NAT or a failover dropped it without a reset)
delivers nothing and reports no error."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

from lightloop.aio import stop_task
from lightloop.settings import PolicyModelSettings
from lightloop.store import PolicyChange, PolicyListener, adapter_name, connect, get_version, live_version

log = logging.getLogger(__name__)


class LiveVersions:
    def __init__(
        self,
        policies: list[PolicyModelSettings],
        url: str,
        retry_interval_s: float,
        keep: int = 2,
        memory: int = 10_000,
        reread_s: float = 30.0,
    ) -> None:
        self.policies = {p.name: p for p in policies}
        self.url = url
        self.retry_interval_s = retry_interval_s
        # The trainer keeps the newest `keep` versions loaded on the engines (trainer.keep_versions).
        self.keep = keep
        self._memory = memory
        self._versions = dict.fromkeys(self.policies, 0)
        # Rollout id -> (policy, version): a val round's rollouts are served the version they
        # measure, not whichever is live when each of their calls comes (bounded, oldest dropped).
        self._pins: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self.reread_s = reread_s
        # Counts changes applied, so that a re-read that raced a notification does not undo it.
        self._changes = 0
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self._down = False  # an outage is under way (and was logged)

    def pin(self, rollout_id: str, policy: str, version: int) -> None:
        """Serve `rollout_id`'s calls to `policy` with `version` while the engines hold it."""
        self._pins[rollout_id] = (policy, version)
        self._pins.move_to_end(rollout_id)
        while len(self._pins) > self._memory:
            self._pins.popitem(last=False)

    def served(self, policy: str, rollout_id: str | None = None) -> tuple[str, int]:
        """(the model name to ask the engines for, the version it is): the live version, or the
        rollout's pinned one while it is among the `keep` newest (older ones are unloaded)."""
        version = self._versions[policy]
        pinned = self._pins.get(rollout_id) if rollout_id is not None else None
        # The base model (0) is never unloaded; an adapter is, once `keep` newer ones are live.
        if (
            pinned is not None
            and pinned[0] == policy
            and (pinned[1] == 0 or version - self.keep < pinned[1] <= version)
        ):
            version = pinned[1]
        return self.name_of(policy, version), version

    def live(self, policy: str) -> int:
        return self._versions[policy]

    def name_of(self, policy: str, version: int) -> str:
        """The engines' name of `version` (0: the base model)."""
        if version == 0:
            return self.policies[policy].base_model
        return adapter_name(policy, version)

    def set(self, policy: str, version: int) -> None:
        self._changes += 1
        if policy in self._versions and self._versions[policy] != version:
            log.info("policy %s: now serving version %d", policy, version)
            self._versions[policy] = version

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lightloop-policy-versions")

    async def close(self) -> None:
        if self._task is not None:
            await stop_task(self._task)

    async def uri_of(self, policy: str, version: int) -> str | None:
        """Where a version's adapter lies (policy_versions.uri), to load it again on an engine
        that lost it."""
        conn = await connect(self.url)
        try:
            found = await get_version(conn, policy, version)
        finally:
            await conn.close()
        # Only the live version: a retired one the trainer unloaded must stay unloaded.
        return None if found is None or found.status != "live" else found.uri

    async def _reload(self) -> None:
        before = self._changes
        conn = await connect(self.url, command_timeout=30)
        try:
            found = {name: await live_version(conn, name) for name in self.policies}
        finally:
            await conn.close()
        if self._changes != before:
            return  # a notification came meanwhile: it is newer than what was read
        for name, live in found.items():
            self.set(name, live.version if live is not None else 0)

    def _on_change(self, change: PolicyChange) -> None:
        if change.policy not in self.policies:
            return
        if change.status == "live":
            self.set(change.policy, change.version)
        elif change.version == self._versions[change.policy]:
            # The served version was retired without a successor: back to what the database says.
            asyncio.get_running_loop().create_task(self._reload_quietly())

    async def _reload_quietly(self) -> None:
        with contextlib.suppress(Exception):
            await self._reload()

    async def _run(self) -> None:
        while True:
            listener = PolicyListener(self.url, self._on_change)
            try:
                await listener.start()
                await self._reload()
                self.connected.set()
                if self._down:
                    log.warning("reading live policy versions again")
                    self._down = False
                while not listener.closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(listener.closed.wait(), self.reread_s)
                    if not listener.closed.is_set():
                        await self._reload()  # a failure here reconnects the listener too
                log.warning("lost the policy-version listener; reconnecting")
            except asyncio.CancelledError:
                await listener.close()
                raise
            except Exception as exc:
                # Once per outage, not once per retry.
                if not self._down:
                    log.warning("cannot read live policy versions (%s); serving what is known", exc)
                self._down = True
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await listener.close()
            # Reconnect pacing in a background task, not synchronisation.
            await asyncio.sleep(self.retry_interval_s)
