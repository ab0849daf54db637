"""Whole processes: `lightloop engine --model tiny` and `lightloop proxy`, on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from tests.conftest import LIGHTLOOP, _admin, with_database
from tests.support.stub_engine import StubEngine, free_port, running_stub

T = TypeVar("T")
MASTER_KEY = "sk-test-" + "0123456789abcdef" * 4


def wait_healthy(
    base: str,
    proc: subprocess.Popen[bytes],
    timeout_s: float = 180,
    headers: dict[str, str] | None = None,
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Wait for a child process to start serving (it loads models, LiteLLM, ...)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{base}: the process exited during start-up"
        try:
            if httpx.get(f"{base}/health", timeout=1, headers=headers, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{base} did not become healthy")


def eventually(check: Callable[[], T | None], timeout_s: float = 30, what: str = "condition") -> T:
    """Poll until `check` returns something truthy: for effects that land asynchronously by
    design (the writer flushes in the background), with a deadline rather than a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


@pytest.fixture(scope="session")
def engine_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-home")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("LIGHTLOOP_", "LITELLM_"))}


@pytest.fixture(scope="module")
def engine(engine_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = clean_env()
    env["LIGHTLOOP_HOME"] = str(engine_home)
    log = open(engine_home / f"engine-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            LIGHTLOOP,
            "engine",
            "--model",
            "tiny",
            "--port",
            str(port),
            "--max-model-len",
            "512",
            "--max-batch-size",
            "8",
            # Tests publish adapters under their own tmp_path: all lie under the base temp folder.
            "--lora-root",
            str(tmp_path_factory.getbasetemp()),
            "--allow-runtime-lora-updating",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def module_db(pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database shared by one module's long-lived processes."""
    name = f"lightloop_m_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(pg_server, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"'))
    yield with_database(pg_server, name)
    asyncio.run(_admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class Proxy:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], home: Path, log: Path) -> None:
        self.url = url
        self.proc = proc
        self.home = home
        self.log = log
        self.key = MASTER_KEY
        self.headers = {"authorization": f"Bearer {MASTER_KEY}"}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_proxy(
    home: Path,
    database_url: str,
    config: dict[str, Any],
    *,
    extra_env: dict[str, str] | None = None,
    args: list[str] | None = None,
    prefix: list[str] | None = None,
) -> Proxy:
    home.mkdir(parents=True, exist_ok=True)
    config_path = home / "lightloop.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = clean_env()
    env.update(
        {
            "LIGHTLOOP_HOME": str(home),
            "LIGHTLOOP_DATABASE_URL": database_url,
            "LITELLM_MASTER_KEY": MASTER_KEY,
            "LIGHTLOOP_WRITER__FLUSH_INTERVAL_MS": "20",
            "LIGHTLOOP_WRITER__RETRY_INTERVAL_S": "0.2",
            **(extra_env or {}),
        }
    )
    log = home / f"proxy-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            # `prefix`: a command the proxy runs under (its own mount namespace, say).
            [
                *(prefix or []),
                LIGHTLOOP,
                "--config",
                str(config_path),
                "proxy",
                "--port",
                str(port),
                *(args or []),
            ],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=home,
        )
    # With --ssl-certfile: HTTPS, and the (self-signed) certificate is the CA to trust.
    cert = (
        (args or [])[(args or []).index("--ssl-certfile") + 1] if "--ssl-certfile" in (args or []) else None
    )
    proxy = Proxy(f"{'https' if cert else 'http'}://127.0.0.1:{port}", proc, home, log)
    try:
        wait_healthy(
            proxy.url,
            proc,
            120,
            proxy.headers,
            verify=ssl.create_default_context(cafile=cert) if cert else True,
        )
    except AssertionError:
        proxy.stop()
        raise AssertionError(f"the proxy did not start:\n{proxy.log_text()[-5000:]}") from None
    return proxy


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    """A vLLM-shaped stub engine for one module (modules that steer it differently define their own)."""
    with running_stub() as s:
        yield s


def stub_policy(stub: StubEngine) -> dict[str, Any]:
    """lightloop.yaml for one policy model, `policy`, served by the stub."""
    return {"policy": [{"name": "policy", "base_model": "stub-base", "upstreams": [stub.url]}]}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, stub: StubEngine, module_db: str) -> Iterator[Proxy]:
    """A proxy process in front of the stub for one module (modules that need more define their own)."""
    p = start_proxy(tmp_path_factory.mktemp("proxy-home"), module_db, stub_policy(stub))
    yield p
    p.stop()
