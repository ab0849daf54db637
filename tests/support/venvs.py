"""Virtual environments for one optional extra whose pins cannot live beside the test venv's (the
AgentOps SDK needs OpenTelemetry below 1.45; the proxy runs on the newest). The requirements are
read from pyproject.toml, so the test exercises exactly the pins users install; the venv is built
once per set of pins (and base interpreter) under .cache/venvs, about 15 s from PyPI, and reused.
Two test sessions building the same venv take turns (a file lock); a build that stopped half-way
is never reused (it is marked complete last)."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PIP_TIMEOUT_S = 480


def extra_requirements(extra: str) -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements: list[str] = project["optional-dependencies"][extra]
    return requirements


def venv_with_extra(extra: str, *also: str) -> Path:
    """The python of a venv holding `extra`'s requirements plus `also` (the agent's own packages,
    at the versions the test venv has); only those, not lightloop itself, so the agent side is
    the small environment an agent traced with that SDK would have."""
    requirements = [*extra_requirements(extra), *(f"{name}=={version(name)}" for name in also)]
    key = "\n".join([sys.version, sys.base_prefix, *requirements])
    home = REPO / ".cache" / "venvs" / f"{extra}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    python = home / "bin" / "python"
    done = home / ".complete"
    home.parent.mkdir(parents=True, exist_ok=True)
    with (home.parent / f"{home.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            _build(home, requirements)
            done.touch()
    return python


def _build(home: Path, requirements: list[str]) -> None:
    shutil.rmtree(home, ignore_errors=True)  # a build that stopped half-way
    subprocess.run([sys.executable, "-m", "venv", str(home)], check=True, capture_output=True, timeout=120)
    command = [
        str(home / "bin" / "python"),
        *("-m", "pip", "install", "--quiet", "--disable-pip-version-check"),
        *("--timeout", "30", "--retries", "1"),
        *requirements,
    ]
    needs = "it needs PyPI (or PIP_INDEX_URL / PIP_FIND_LINKS naming a mirror)"
    try:
        installed = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise RuntimeError(
            f"pip did not install {requirements} within {PIP_TIMEOUT_S} s; {needs}:\n{err[-3000:]}"
        ) from None
    if installed.returncode != 0:
        raise RuntimeError(f"pip could not install {requirements}; {needs}:\n{installed.stderr[-3000:]}")
