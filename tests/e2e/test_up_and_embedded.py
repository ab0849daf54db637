"""`lightloop up` and the embedded Postgres across starts, stops, crashes and users."""

from __future__ import annotations

import os
import pwd
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import LIGHTLOOP
from tests.e2e.test_cli import run
from tests.support.stub_engine import free_port


def read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float = 120) -> list[str]:
    """Lines of the process's stdout up to the one containing `marker`."""
    stdout = proc.stdout
    assert stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stdout:
            lines.put(line.rstrip("\n"))
            if marker in line:
                return
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} within {timeout_s}s; got {seen}"
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        assert line is not None, f"process ended before {marker!r}: {seen}"
        seen.append(line)
        if marker in line:
            return seen


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home
    run("db", "stop", env={"LIGHTLOOP_HOME": str(home)})


def up_env(home: Path) -> dict[str, str]:
    """`up` as a user runs it, but with the tiny model and free ports (tests run side by side)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIGHTLOOP_", "LITELLM_"))}
    return {
        **env,
        "LIGHTLOOP_HOME": str(home),
        "LIGHTLOOP_ENGINE__MODEL": "tiny",
        "LIGHTLOOP_ENGINE__PORT": str(free_port()),
        "LIGHTLOOP_PROXY__PORT": str(free_port()),
    }


def value_after(lines: list[str], label: str) -> str:
    return next(line.split(label, 1)[1].split()[0] for line in lines if label in line)


def test_up_starts_everything_prints_what_agents_need_and_stops_cleanly(home: Path) -> None:
    env = up_env(home)
    proc = subprocess.Popen(
        [LIGHTLOOP, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        lines = read_until(proc, "Press Ctrl-C", timeout_s=300)
        shown = value_after(lines, "database:")
        url = run("db", "url", env=env).stdout.strip()
        password = make_url(url).password
        # Printed without its password; `lightloop db url` gives it in full.
        assert shown == make_url(url).render_as_string(hide_password=True)
        assert url.startswith("postgresql://postgres:") and "@127.0.0.1:" in url and password
        assert not [line for line in lines if password in line]
        base_url = value_after(lines, "OPENAI_BASE_URL=")
        key = value_after(lines, "OPENAI_API_KEY=")
        # No secret went into a child's environment: the engine has neither, the proxy and the
        # trainer read the kept key and the embedded database's password from files.
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3
        for child in children:
            try:
                values = "\n".join(f"{k}={v}" for k, v in child.environ().items())
                cmdline = child.cmdline()
            except psutil.NoSuchProcess:
                continue  # a short-lived helper (pg_ctl) that has finished
            assert key not in values and password not in values, cmdline
        assert base_url == f"http://127.0.0.1:{env['LIGHTLOOP_PROXY__PORT']}/v1"
        # A generated key: strong, kept under the home for the next start.
        assert key.startswith("sk-") and len(key) >= 40
        assert (home / "master.key").read_text().strip() == key
        # What it printed is all an agent needs.
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
        completion = client.chat.completions.create(
            model="policy",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            extra_headers={"X-Lightloop-Rollout": "up-1"},
        )
        finish = httpx.post(
            f"{base_url[:-3]}/v1/rollouts/up-1/finish",
            json={"status": "succeeded"},
            headers={"authorization": f"Bearer {key}"},
        )
        assert finish.status_code == 200
        shown = run(
            "sql", "SELECT response_id, array_length(completion_token_ids, 1) FROM llm_calls", env=env
        )
        assert completion.id in shown.stdout
        inserted = run("sql", "INSERT INTO rollouts (id) VALUES ('kept')", env=env)
        assert inserted.returncode == 0, inserted.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "embedded Postgres stopped" in out
    assert run("db", "status", env=env).returncode == 3

    # A second `up` finds the data and the key of the first.
    proc = subprocess.Popen(
        [LIGHTLOOP, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        lines = read_until(proc, "Press Ctrl-C", timeout_s=300)
        # The key is printed once, when it is made; later, how to read it.
        assert value_after(lines, "OPENAI_API_KEY=") == "$(cat"
        assert f"OPENAI_API_KEY=$(cat {home / 'master.key'})" in "\n".join(lines)
        assert not [line for line in lines if key in line]
        assert "kept" in run("sql", "SELECT id FROM rollouts", env=env).stdout
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_up_leaves_running_a_server_it_did_not_start(home: Path) -> None:
    env = {"LIGHTLOOP_HOME": str(home)}
    assert run("db", "start", env=env).returncode == 0
    proc = subprocess.Popen(
        [LIGHTLOOP, "up", "--no-engine"],
        env={**up_env(home), "LITELLM_MASTER_KEY": "sk-" + "ab" * 32},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = read_until(proc, "Press Ctrl-C", timeout_s=300)
    # A key from the environment is used as given, and not written to disk.
    assert value_after(lines, "OPENAI_API_KEY=") == "$LITELLM_MASTER_KEY"
    assert not [line for line in lines if "ab" * 32 in line]
    assert not (home / "master.key").exists()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert run("db", "status", env=env).returncode == 0


def test_a_second_start_finds_the_running_server(home: Path) -> None:
    env = {"LIGHTLOOP_HOME": str(home)}
    first = run("db", "start", env=env)
    second = run("db", "start", env=env)
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout
    status = run("db", "status", env=env)
    assert "running: pid" in status.stdout


def test_concurrent_first_starts_share_one_server(home: Path) -> None:
    env = {"LIGHTLOOP_HOME": str(home)}
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: run("db", "url", env=env), range(3)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len({r.stdout for r in results}) == 1


def test_a_stale_pid_file_is_recovered(home: Path) -> None:
    env = {"LIGHTLOOP_HOME": str(home)}
    url = run("db", "url", env=env).stdout.strip()
    assert run("db", "stop", env=env).returncode == 0
    pidfile = home / "postgres" / "postmaster.pid"
    # What a crash (power loss, kill -9 of the whole box) leaves: a pid file naming a dead process.
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile.write_text(f"{dead.pid}\n{home / 'postgres'}\n1700000000\n5432\n\n127.0.0.1\n  1  2\nready\n")
    restarted = run("db", "url", env=env)
    assert restarted.returncode == 0, restarted.stderr
    assert restarted.stdout.strip() == url  # the same port again
    assert run("sql", "SELECT 1 AS ok", env=env).returncode == 0


def test_a_killed_server_is_restarted(home: Path) -> None:
    env = {"LIGHTLOOP_HOME": str(home)}
    assert run("db", "start", env=env).returncode == 0
    pid = int((home / "postgres" / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    assert run("db", "status", env=env).returncode == 3
    restarted = run("sql", "SELECT 1 AS ok", env=env)
    assert restarted.returncode == 0, restarted.stderr


def _wait_gone(pid: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _unprivileged_user_can_run_lightloop() -> str | None:
    """Why the non-root test cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return None  # the whole suite already runs as a normal user
    if shutil.which("setpriv") is None:
        return "setpriv is not installed"
    nobody = pwd.getpwnam("nobody")
    check = subprocess.run(
        [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            LIGHTLOOP,
            "--version",
        ],
        capture_output=True,
        check=False,
    )
    return None if check.returncode == 0 else "this checkout is not readable by other users"


def test_runs_as_a_normal_user() -> None:
    reason = _unprivileged_user_can_run_lightloop()
    if reason:
        pytest.skip(reason)
    # Directly under /tmp: pytest's own folders are private to the user running the tests.
    home = Path(tempfile.mkdtemp(prefix="lightloop-user-"))
    prefix: list[str] = []
    uid = os.geteuid()
    if uid == 0:
        nobody = pwd.getpwnam("nobody")
        uid = nobody.pw_uid
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTLOOP_")}
    env |= {"LIGHTLOOP_HOME": str(home / "lightloop"), "HOME": str(home)}
    try:
        result = subprocess.run(
            [*prefix, LIGHTLOOP, "sql", "SELECT current_user AS u"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "postgres" in result.stdout
        # The server runs as the invoking user itself: no system user is involved.
        assert (home / "lightloop" / "postgres").stat().st_uid == uid
    finally:
        subprocess.run(
            [*prefix, LIGHTLOOP, "db", "stop"], env=env, capture_output=True, timeout=120, check=False
        )
        shutil.rmtree(home, ignore_errors=True)
