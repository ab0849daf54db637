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
import yaml

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
            # Our own child, by the address we gave it: its certificate may name another host.
            if httpx.get(url, headers=headers, timeout=2, verify=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise LightloopError(f"the {what} did not become ready at {url} within {timeout_s:g} s")


# Variables that hold secrets, never handed to a child that does not need them.
SECRET_ENV = ("LITELLM_MASTER_KEY", "LIGHTLOOP_DATABASE_URL")


def children_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the proxy and trainer children. No secret is added to it: they find
    the embedded database's URL and the kept master key under LIGHTLOOP_HOME (files only this
    user can read), or in the same environment and lightloop.yaml this process read. Only a
    database URL given as `--database-url` has no other way to reach them."""
    env = {**os.environ, **(extra or {}), "LIGHTLOOP_HOME": str(settings.home)}
    if settings.config is not None:
        env["LIGHTLOOP_CONFIG"] = str(settings.config)
    if (
        settings.database_url
        and env.get("LIGHTLOOP_DATABASE_URL") != settings.database_url
        and _configured_url(settings) != settings.database_url
    ):
        env["LIGHTLOOP_DATABASE_URL"] = settings.database_url
    return env


def _configured_url(settings: Settings) -> str | None:
    """The database URL lightloop.yaml holds, which the children read themselves."""
    if settings.config is None or not settings.config.is_file():
        return None
    data = yaml.safe_load(settings.config.read_text()) or {}
    url = data.get("database_url") if isinstance(data, dict) else None
    return url if isinstance(url, str) else None


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
        env = children_env(settings, extra_env)
        scheme = settings.proxy.scheme
        stack = Stack(f"{scheme}://{settings.proxy.host}:{settings.proxy.port}", key, created, url, revision)
        if engine:
            # The engine needs neither the proxy's key nor the database.
            engine_env = {k: v for k, v in env.items() if k not in SECRET_ENV}
            # The trainer beside it loads each new version on it.
            engine_env["LIGHTLOOP_ENGINE__ALLOW_RUNTIME_LORA_UPDATING"] = "true"
            stack.children.append(_child(["engine"], engine_env))
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
