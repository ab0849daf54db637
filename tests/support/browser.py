"""A real Chromium for the dashboard's tests: Debian's `chromium` package (installed here with
apt-get when it is missing, as the machine's own package manager provides it), driven by
Playwright, which uses that executable instead of downloading a browser of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

REPO = Path(__file__).resolve().parents[2]
# Screenshots of each page, kept as the run's artifacts (CI shows them on failure too).
ARTIFACTS = Path(os.environ.get("LIGHTLOOP_TEST_ARTIFACTS", REPO / ".cache" / "test-artifacts"))
# As the machine's probe runs it: no sandbox as root, and none of Chromium's own network calls,
# which this machine's closed network refuses (each refusal is a console error).
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:  # stale package lists: refresh them once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900, check=False)
    found = shutil.which("chromium")
    assert found, f"Debian's chromium could not be installed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    return found


@contextmanager
def running_browser() -> Iterator[Browser]:
    executable = chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class Watched:
    """A page whose console errors and uncaught exceptions are collected: a test fails on any."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        # Console errors a test provokes on purpose (Chromium logs a page answered 404 as one).
        self.allowed: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def allow(self, text: str) -> None:
        self.allowed.append(text)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not any(a in message.text for a in self.allowed):
            self.errors.append(f"console: {message.text} at {message.location}")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"dashboard-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path
