"""What the benchmarks share: free loopback ports, child processes waited on until healthy, and
their CPU time. Imported as `bench.common` (each benchmark puts the repository on sys.path)."""

from __future__ import annotations

import socket
import subprocess
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
