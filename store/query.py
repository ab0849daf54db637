"""Run one SQL text for a person or a script (`lightloop sql`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from lightloop.store import database

_JSON_TYPES = {"json", "jsonb"}


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    status: str
    json_columns: frozenset[int] = frozenset()

    def records(self) -> list[dict[str, Any]]:
        """Rows as objects, JSON columns decoded, for `--json` output."""
        return [
            {
                c: json.loads(v) if i in self.json_columns and isinstance(v, str) else v
                for i, (c, v) in enumerate(zip(self.columns, row, strict=True))
            }
            for row in self.rows
        ]


async def run_sql(url: str, sql: str) -> QueryResult:
    """Run `sql` and return its rows. Several statements separated by `;` run too (their last
    status is reported, no rows), as psql -c would."""
    conn = await database.connect(url)
    try:
        async with database.translated(url):
            try:
                stmt = await conn.prepare(sql)
            except asyncpg.PostgresSyntaxError as exc:
                if "multiple commands" not in str(exc):
                    raise
                status = await conn.execute(sql)
                return QueryResult(columns=[], rows=[], status=status)
            attrs = stmt.get_attributes()
            records = await stmt.fetch()
            return QueryResult(
                columns=[a.name for a in attrs],
                rows=[tuple(r) for r in records],
                status=stmt.get_statusmsg(),
                json_columns=frozenset(i for i, a in enumerate(attrs) if a.type.name in _JSON_TYPES),
            )
    finally:
        await conn.close()
