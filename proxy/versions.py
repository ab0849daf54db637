"""The live version of each policy model, as the proxy serves it: read at start, then kept
current by LISTEN/NOTIFY, so the alias switches the instant the trainer makes a version live.

While Postgres is unreachable the proxy keeps serving the version it knew (the base model if it
never knew one) and reconnects in the background; on reconnect it re-reads every live version,
since notifications sent meanwhile are lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from lightloop.settings import PolicyModelSettings
from lightloop.store import PolicyChange, PolicyListener, adapter_name, connect, live_version

log = logging.getLogger(__name__)


class LiveVersions:
    def __init__(self, policies: list[PolicyModelSettings], url: str, retry_interval_s: float) -> None:
        self.policies = {p.name: p for p in policies}
        self.url = url
        self.retry_interval_s = retry_interval_s
        self._versions = dict.fromkeys(self.policies, 0)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def served(self, policy: str) -> tuple[str, int]:
        """(the model name to ask the engines for, the version it is)."""
        version = self._versions[policy]
        if version == 0:
            return self.policies[policy].base_model, 0
        return adapter_name(policy, version), version

    def set(self, policy: str, version: int) -> None:
        if policy in self._versions and self._versions[policy] != version:
            log.info("policy %s: now serving version %d", policy, version)
            self._versions[policy] = version

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lightloop-policy-versions")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _reload(self) -> None:
        conn = await connect(self.url)
        try:
            for name in self.policies:
                live = await live_version(conn, name)
                self.set(name, live.version if live is not None else 0)
        finally:
            await conn.close()

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
                await listener.closed.wait()
                log.warning("lost the policy-version listener; reconnecting")
            except asyncio.CancelledError:
                await listener.close()
                raise
            except Exception as exc:
                log.warning("cannot read live policy versions (%s); serving what is known", exc)
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await listener.close()
            # Reconnect pacing in a background task, not synchronisation.
            await asyncio.sleep(self.retry_interval_s)
