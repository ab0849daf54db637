"""Virtual environments for one optional extra whose pins cannot live beside the test venv's (the
AgentOps SDK needs OpenTelemetry below 1.45; the proxy runs on the newest). The requirements are
read from pyproject.toml, so the test exercises exactly the pins users install; the venv is built
once per set of pins under .cache/venvs (about 15 s from PyPI) and reused."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def extra_requirements(extra: str) -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements: list[str] = project["optional-dependencies"][extra]
    return requirements


def venv_with_extra(extra: str, *also: str) -> Path:
    """The python of a venv holding `extra`'s requirements plus `also` (the agent's own packages,
    at the versions the test venv has); only those, not lightloop itself, so the agent side is
    the small environment an agent traced with that SDK would have."""
    requirements = [*extra_requirements(extra), *(f"{name}=={version(name)}" for name in also)]
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:12]
    home = REPO / ".cache" / "venvs" / f"{extra}-{digest}"
    python = home / "bin" / "python"
    done = home / ".complete"
    if done.exists():
        return python
    shutil.rmtree(home, ignore_errors=True)  # a build that stopped half-way
    subprocess.run([sys.executable, "-m", "venv", str(home)], check=True, timeout=120)
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    if installed.returncode != 0:
        raise RuntimeError(f"pip could not install {requirements}:\n{installed.stderr[-3000:]}")
    done.touch()
    return python
