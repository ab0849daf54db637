"""What the benchmarks share: free loopback ports, child processes waited on until healthy, and
their CPU time. Imported as `bench.common` (each benchmark puts the repository on sys.path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from lightloop.stack import wait_ready

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def process(
    args: list[str], env: dict[str, str], health: str, log: Path, key: str | None = None
) -> Iterator[psutil.Process]:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_ready(health, proc, log.stem, 180, key)
        yield psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_seconds(p: psutil.Process) -> float:
    """User + system CPU seconds of a process and its children."""
    total = 0.0
    for q in [p, *p.children(recursive=True)]:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def server_cpu_seconds(p: psutil.Process) -> float:
    """User + system CPU seconds of a server and every process it ever forked: its live children
    and, through its own children_* times, the ones it has reaped (a Postgres backend whose
    connection closed mid-measurement still counts)."""
    t = p.cpu_times()
    return t.children_user + t.children_system + cpu_seconds(p)


CLI = [sys.executable, "-c", "from lightloop.cli import main; main()"]


def clean_env(home: Path, key: str) -> dict[str, str]:
    """This environment without lightloop's and LiteLLM's settings, with its own home and key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIGHTLOOP_", "LITELLM_"))}
    env.update(
        {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": key, "LIGHTLOOP_HOME": str(home)}
    )
    return env


@contextmanager
def migrated_database(env: dict[str, str]) -> Iterator[str]:
    """LIGHTLOOP_DATABASE_URL when set, else a throwaway embedded Postgres (stopped at the end),
    migrated; its URL is also put into `env`."""
    given = os.environ.get("LIGHTLOOP_DATABASE_URL")
    url = (
        given
        or subprocess.run(
            [*CLI, "db", "url"], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    env["LIGHTLOOP_DATABASE_URL"] = url
    try:
        subprocess.run([*CLI, "db", "upgrade"], env=env, check=True, capture_output=True)
        yield url
    finally:
        if not given:
            subprocess.run([*CLI, "db", "stop"], env=env, capture_output=True, check=False)
