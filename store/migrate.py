"""Schema migrations with Alembic: `alembic upgrade head` is the only way the schema changes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from lightloop.store import database
from lightloop.store.errors import SchemaError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def _migrations_dir() -> Path:
    # Editable installs map lightloop.migrations to the top-level folder; wheels ship it as a
    # package. Ask the import system instead of guessing.
    import lightloop.migrations

    return Path(lightloop.migrations.__file__).resolve().parent


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    # ConfigParser treats % as interpolation; URLs may hold %-escapes.
    cfg.set_main_option("sqlalchemy.url", database.sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("postgresql://localhost/x")).get_current_head()
    assert head is not None
    return head


async def current_revision(url: str) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    conn = await database.connect(url)
    try:
        async with database.translated(url):
            if await conn.fetchval("SELECT to_regclass('alembic_version')") is None:
                return None
            value = await conn.fetchval("SELECT version_num FROM alembic_version")
            return str(value) if value is not None else None
    finally:
        await conn.close()


def _known(revision: str) -> bool:
    script = ScriptDirectory.from_config(alembic_config("postgresql://localhost/x"))
    return any(rev.revision == revision for rev in script.walk_revisions())


def _too_new(revision: str) -> SchemaError:
    return SchemaError(
        f"the database schema is at revision {revision}, which this lightloop does not know "
        f"(its newest is {head_revision()}): a newer lightloop migrated it. Upgrade lightloop; "
        "lightloop never downgrades a schema by itself."
    )


async def upgrade(url: str, revision: str = "head") -> str:
    """Migrate to `revision`; refuse a database that a newer lightloop has migrated."""
    current = await current_revision(url)
    if current is not None and not _known(current):
        raise _too_new(current)
    try:
        await asyncio.to_thread(command.upgrade, alembic_config(url), revision)
    except (asyncpg.PostgresError, OSError) as exc:
        raise database.translate(exc, url) from None
    except Exception as exc:
        # SQLAlchemy wraps driver errors; unwrap to the one boundary that translates them.
        orig = getattr(exc, "orig", None) or exc.__cause__
        if isinstance(orig, BaseException) and (
            database.is_unavailable(orig) or isinstance(orig, asyncpg.PostgresError)
        ):
            raise database.translate(orig, url) from None
        raise
    head = await current_revision(url)
    assert head is not None
    return head


async def check_current(url: str) -> None:
    """Raise SchemaError unless the database is at this code's head revision."""
    current = await current_revision(url)
    if current == head_revision():
        return
    if current is None:
        raise SchemaError("the database has no lightloop schema yet: run `lightloop db upgrade`")
    if not _known(current):
        raise _too_new(current)
    raise SchemaError(
        f"the database schema is at {current}, older than {head_revision()}: run `lightloop db upgrade`"
    )
