"""`run_sql`: rows, statuses, several statements, JSON columns, and Postgres's own errors."""

from __future__ import annotations

import pytest

from lightloop.store import QueryError, run_sql


async def test_rows_and_columns(db_url: str) -> None:
    result = await run_sql(db_url, "SELECT 1 AS one, 'x' AS letter, '{\"a\": [1]}'::jsonb AS doc")
    assert result.columns == ["one", "letter", "doc"]
    assert result.rows == [(1, "x", '{"a": [1]}')]
    assert result.records() == [{"one": 1, "letter": "x", "doc": {"a": [1]}}]
    assert result.status == "SELECT 1"


async def test_statements_without_rows_and_several_statements(db_url: str) -> None:
    result = await run_sql(db_url, "INSERT INTO rollouts (id) VALUES ('r1')")
    assert result.columns == [] and result.status == "INSERT 0 1"
    result = await run_sql(db_url, "INSERT INTO rollouts (id) VALUES ('r2'); UPDATE rollouts SET agent = 'a'")
    assert result.status == "UPDATE 2"


async def test_broken_sql_raises_postgres_message(db_url: str) -> None:
    with pytest.raises(QueryError, match='syntax error at or near "SELEC"'):
        await run_sql(db_url, "SELEC 1")
    with pytest.raises(QueryError, match='relation "nope" does not exist'):
        await run_sql(db_url, "SELECT * FROM nope")
