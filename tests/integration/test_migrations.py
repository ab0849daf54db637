"""The schema comes from Alembic alone, matches the models, and is never silently downgraded."""

from __future__ import annotations

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.pool import NullPool

from lightloop.store import SchemaError, check_current, current_revision, head_revision, upgrade
from lightloop.store.database import create_engine, dsn
from lightloop.store.schema import metadata


async def _diff(url: str) -> list[object]:
    engine = create_engine(url, poolclass=NullPool)

    def compare(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    try:
        async with engine.connect() as connection:
            return await connection.run_sync(compare)
    finally:
        await engine.dispose()


async def test_upgrade_head_on_empty_database_matches_the_models(empty_db_url: str) -> None:
    assert await current_revision(empty_db_url) is None
    assert await upgrade(empty_db_url) == head_revision()
    assert await _diff(empty_db_url) == []


async def test_drift_is_detected(db_url: str) -> None:
    # The comparison above can fail: a column added outside Alembic shows up as a difference.
    conn = await asyncpg.connect(dsn(db_url))
    await conn.execute("ALTER TABLE rollouts ADD COLUMN stray int")
    await conn.close()
    diff = await _diff(db_url)
    assert any("stray" in repr(d) for d in diff)


async def test_upgrade_is_idempotent(db_url: str) -> None:
    assert await upgrade(db_url) == head_revision()
    assert await upgrade(db_url) == head_revision()
    await check_current(db_url)


async def test_a_newer_schema_is_refused(db_url: str) -> None:
    conn = await asyncpg.connect(dsn(db_url))
    await conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    await conn.close()
    with pytest.raises(SchemaError, match=r"9999_from_the_future.*newer lightloop"):
        await upgrade(db_url)
    with pytest.raises(SchemaError, match="newer lightloop"):
        await check_current(db_url)


async def test_check_current_on_an_unmigrated_database(empty_db_url: str) -> None:
    with pytest.raises(SchemaError, match="lightloop db upgrade"):
        await check_current(empty_db_url)
