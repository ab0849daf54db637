"""The policy lane's way to the engines: one aiohttp session, each rollout pinned to one replica
(rendezvous hashing, so adding or losing a replica moves only the rollouts that were on it) for
prefix-cache reuse, and retries on connection errors and 5xx answers, which are safe because
nothing has reached the agent yet.

aiohttp rather than httpx: on this path it cost about a third of httpx's CPU per request
(bench/proxy.py), and the policy lane's budget is 1 ms per call."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import aiohttp

from lightloop.proxy.errors import UpstreamFailed, UpstreamUnavailable

log = logging.getLogger(__name__)

_FORWARDED_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}


@dataclass(frozen=True)
class Attempted:
    response: aiohttp.ClientResponse
    url: str


def order(upstreams: list[str], rollout_id: str) -> list[str]:
    """The replicas in the order a rollout tries them: the same first choice for every call of it."""
    key = rollout_id.encode()
    return sorted(upstreams, key=lambda u: hashlib.blake2b(key + b"|" + u.encode(), digest_size=8).digest())


class Upstreams:
    def __init__(self, timeout_s: float, retries: int) -> None:
        self.retries = retries
        self._timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self, replicas: list[str], path: str, body: bytes, api_key: str | None = None
    ) -> Attempted:
        """POST to the first replica that answers below 500, trying up to `retries` more times
        (moving on to the next replica each time). The caller reads and releases the answer.
        No answer at all is UpstreamFailed (502); only 5xx answers, UpstreamUnavailable (503)."""
        headers = dict(_FORWARDED_HEADERS)
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        session = self.session()
        last_error = ""
        last_status: int | None = None
        for attempt in range(self.retries + 1):
            base = replicas[attempt % len(replicas)]
            try:
                response = await session.post(base + path, data=body, headers=headers)
            except (TimeoutError, aiohttp.ClientConnectionError, OSError) as exc:
                last_error = f"{base}: {type(exc).__name__}: {exc}".rstrip(": ")
                log.warning("engine %s unreachable (%s), attempt %d", base, exc, attempt + 1)
                continue
            if response.status < 500:
                return Attempted(response, base)
            # A 5xx on every try is the proxy's own 503, with the engine's words in its message,
            # not the engine's answer passed on (README, "Proxy").
            last_status = response.status
            try:
                said = (await response.text())[:300]
            except (TimeoutError, aiohttp.ClientError, UnicodeDecodeError):
                said = ""
            last_error = f"{base} answered {response.status}" + (f": {said}" if said else "")
            response.release()
        if last_status is not None:
            raise UpstreamUnavailable(f"the engine failed: {last_error}")
        raise UpstreamFailed(f"no engine reachable after {self.retries + 1} tries; last: {last_error}")

    async def probe(self, base: str, api_key: str | None = None, timeout_s: float = 2.0) -> dict[str, object]:
        """An engine's health and the models it serves (LoRA adapters included: vLLM and the CPU
        engine list them in /v1/models), for the dashboard; never raises."""
        headers = {"accept-encoding": "identity"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        session = self.session()
        try:
            async with session.get(base + "/health", timeout=timeout) as health:
                healthy = health.status == 200
            async with session.get(base + "/v1/models", headers=headers, timeout=timeout) as listed:
                if listed.status != 200:
                    return {
                        "url": base,
                        "healthy": healthy,
                        "error": f"/v1/models answered {listed.status}",
                        "models": [],
                    }
                models = [m.get("id") for m in (await listed.json(content_type=None)).get("data", [])]
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, AttributeError) as exc:
            return {
                "url": base,
                "healthy": False,
                "error": f"{type(exc).__name__}: {exc}"[:200],
                "models": [],
            }
        return {"url": base, "healthy": healthy, "models": models}
