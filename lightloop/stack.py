"""The whole stack on one machine, as child processes: embedded Postgres (unless a database URL
is set), the CPU engine, the proxy and the trainer. Used by `lightloop up` and `lightloop demo`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from lightloop.errors import LightloopError
from lightloop.settings import Settings


@dataclass
class Stack:
    base_url: str  # the proxy, without /v1
    key: str
    key_created: bool
    database_url: str
    revision: str
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def check_children(self) -> None:
        for child in self.children:
            if child.poll() is not None:
                raise LightloopError(f"a child process exited (status {child.returncode}); stopping")


def _child(args: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "from lightloop.cli import main; main()", *args], env=dict(env)
    )


def wait_ready(
    url: str, process: subprocess.Popen[bytes] | None, what: str, timeout_s: float, key: str | None
) -> None:
    """Poll /health until it answers (a separate process starting up)."""
    deadline = time.monotonic() + timeout_s
    headers = {"authorization": f"Bearer {key}"} if key else {}
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise LightloopError(
                f"the {what} exited during startup (status {process.returncode}); see its log above"
            )
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise LightloopError(f"the {what} did not become ready at {url} within {timeout_s:g} s")


@contextmanager
def running_stack(
    settings: Settings,
    *,
    engine: bool = True,
    trainer: bool = True,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    import asyncio

    from lightloop.proxy.server import master_key
    from lightloop.store.embedded import EmbeddedPostgres, resolve_database_url
    from lightloop.store.migrate import upgrade

    embedded = None if settings.database_url else EmbeddedPostgres(settings.pgdata)
    started_here = embedded is not None and embedded.status() is None
    url = resolve_database_url(settings.database_url, settings.pgdata)
    stack: Stack | None = None
    try:
        revision = asyncio.run(upgrade(url))
        key, created = master_key(settings)
        env = {**os.environ, **(extra_env or {})}
        env.update(
            {"LIGHTLOOP_DATABASE_URL": url, "LITELLM_MASTER_KEY": key, "LIGHTLOOP_HOME": str(settings.home)}
        )
        if settings.config is not None:
            env["LIGHTLOOP_CONFIG"] = str(settings.config)
        stack = Stack(f"http://{settings.proxy.host}:{settings.proxy.port}", key, created, url, revision)
        if engine:
            stack.children.append(_child(["engine"], env))
            engine_url = f"http://{settings.engine.host}:{settings.engine.port}/health"
            wait_ready(engine_url, stack.children[-1], "engine", 600, None)
        stack.children.append(_child(["proxy"], env))
        wait_ready(stack.base_url + "/health", stack.children[-1], "proxy", 120, key)
        if trainer:
            stack.children.append(_child(["trainer"], env))
        yield stack
    finally:
        for child in reversed(stack.children if stack else []):
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
        if embedded is not None and started_here:
            embedded.stop()
            print("embedded Postgres stopped", flush=True)
