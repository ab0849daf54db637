"""Test fixtures: real Postgres servers, one template database migrated once per server, and a
fresh copy of it per test.

The embedded Postgres always runs; when LIGHTLOOP_TEST_DATABASE_URL names another server (CI sets
it to the machine's Postgres), the tests under tests/integration (the SQL) also run against that
one. The e2e tests run once, on the embedded server that `lightloop up` itself starts: running
whole processes twice doubled the suite's time and tested no SQL that the integration tests miss.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from lightloop.store.database import dsn
from lightloop.store.embedded import EmbeddedPostgres
from lightloop.store.migrate import upgrade

REPO = Path(__file__).resolve().parent.parent
LIGHTLOOP = str(Path(sys.executable).parent / "lightloop")


INTEGRATION = REPO / "tests" / "integration"


def _servers(test_file: Path) -> list[str]:
    external = os.environ.get("LIGHTLOOP_TEST_DATABASE_URL") and test_file.is_relative_to(INTEGRATION)
    return ["embedded", "external"] if external else ["embedded"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pg_server" in metafunc.fixturenames:
        servers = _servers(Path(str(metafunc.definition.path)))
        metafunc.parametrize("pg_server", servers, indirect=True, scope="session")


@pytest.fixture(scope="session")
def embedded_pg() -> Iterator[EmbeddedPostgres]:
    # Not under pytest's basetemp: pytest keeps only its three newest, so a fourth session run
    # meanwhile on the same machine would delete this server's data under it.
    home = Path(tempfile.mkdtemp(prefix="lightloop-test-pg-"))
    server = EmbeddedPostgres(home / "postgres")
    server.ensure_running()
    yield server
    server.stop()
    shutil.rmtree(home, ignore_errors=True)


def with_database(url: str, database: str) -> str:
    return make_url(dsn(url)).set(database=database).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> str:
    """The URL of a server's maintenance database, where databases are created and dropped."""
    if request.param == "embedded":
        return with_database(request.getfixturevalue("embedded_pg").url(), "postgres")
    return os.environ["LIGHTLOOP_TEST_DATABASE_URL"]


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> Iterator[str]:
    """A database migrated to head once per server per session; tests copy it."""
    name = f"lightloop_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    asyncio.run(_admin(pg_server, f'CREATE DATABASE "{name}"'))
    asyncio.run(upgrade(with_database(pg_server, name)))
    yield name
    asyncio.run(_admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def db_url(pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"lightloop_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(pg_server, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"'))
    yield with_database(pg_server, name)
    asyncio.run(_admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_db_url(pg_server: str) -> Iterator[str]:
    """A fresh database with no schema at all."""
    name = f"lightloop_e_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(pg_server, f'CREATE DATABASE "{name}"'))
    yield with_database(pg_server, name)
    asyncio.run(_admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def conn(db_url: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(dsn(db_url))
    yield connection
    await connection.close()
