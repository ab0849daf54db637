"""Loading a version's adapter again on an engine that lost it.

An engine that restarts (a crash, a rolling update, a new replica) comes back with the base model
only, while the proxy keeps sending agents the live version's name: until the next publish, each
of their calls would get the engine's 404. The trainer loads adapters when it publishes; the
proxy is the one that sees the 404 first, so it is the proxy that repairs the engine: it loads
the version from `policy_versions.uri` (vLLM's `POST /v1/load_lora_adapter`) and answers the call
again. One load per engine and version at a time; after a failed load the engine is not asked
again for `cooldown_s`, so a replica that cannot read the adapter does not get a load per call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import unquote, urlparse

import orjson

from lightloop.proxy.upstream import Upstreams

log = logging.getLogger(__name__)

UriOf = Callable[[str, int], Awaitable[str | None]]


class AdapterRestorer:
    def __init__(self, upstreams: Upstreams, uri_of: UriOf, cooldown_s: float = 10.0) -> None:
        self.upstreams = upstreams
        self.uri_of = uri_of
        self.cooldown_s = cooldown_s
        self._loading: dict[tuple[str, str], asyncio.Task[bool]] = {}
        self._failed_at: dict[tuple[str, str], float] = {}
        self.restored = 0  # adapters loaded again, for /metrics and tests

    async def restore(self, engine: str, name: str, policy: str, version: int, api_key: str | None) -> bool:
        """Load adapter `name` (version `version` of `policy`) on `engine`; whether it is there now."""
        key = (engine, name)
        failed = self._failed_at.get(key)
        if failed is not None and time.monotonic() - failed < self.cooldown_s:
            return False
        task = self._loading.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(engine, name, policy, version, api_key))
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        # Shielded: one caller hanging up must not cancel the load the others wait for.
        return await asyncio.shield(task)

    async def _load(self, engine: str, name: str, policy: str, version: int, api_key: str | None) -> bool:
        key = (engine, name)
        try:
            uri = await self.uri_of(policy, version)
        except Exception as exc:
            log.warning("cannot look up where %s lies (%s); the engine's 404 goes to the agent", name, exc)
            self._failed_at[key] = time.monotonic()
            return False
        if uri is None:
            self._failed_at[key] = time.monotonic()
            return False
        if uri.startswith("file://"):
            uri = unquote(urlparse(uri).path)  # the trainer records file URIs; engines take paths
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        body = orjson.dumps({"lora_name": name, "lora_path": uri})
        try:
            async with self.upstreams.session().post(
                f"{engine}/v1/load_lora_adapter", data=body, headers=headers
            ) as answer:
                text = await answer.text()
                ok = answer.status == 200 or (answer.status == 400 and "already" in text)
        except Exception as exc:  # any failure to load leaves the engine's 404 as the answer
            ok, text = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            log.warning("engine %s lost adapter %s and refused it again: %s", engine, name, text[:300])
            self._failed_at[key] = time.monotonic()
            return False
        self._failed_at.pop(key, None)
        self.restored += 1
        log.warning("engine %s had lost adapter %s (restarted?); loaded it again from %s", engine, name, uri)
        return True
