"""Prompts as versioned resources: a prompt's baseline (version 0) is the text agents send; the
proxy swaps it for the version chosen for each rollout (proxy/prompts.py). Every change of a
prompt or its live version NOTIFYs `lightloop_prompts`, so proxies re-read at once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from lightloop.ids import ID_RULE, is_valid_id
from lightloop.store.errors import Conflict, NotFound
from lightloop.store.text import dump_json, storable_text

CHANNEL = "lightloop_prompts"
ORIGINS = ("baseline", "manual", "optimiser")
_COLUMNS = (
    "name, version, text, parent, origin, status, score, scored_on, scores, run_id, created_at, live_at"
)


@dataclass(frozen=True)
class PromptVersion:
    name: str
    version: int
    text: str
    parent: int | None
    origin: str
    status: str
    score: float | None
    scored_on: str | None
    scores: dict[str, float] | None
    run_id: str | None
    created_at: datetime
    live_at: datetime | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> PromptVersion:
        data = dict(r)
        if isinstance(data["scores"], str):
            data["scores"] = json.loads(data["scores"])
        return cls(**data)


@dataclass(frozen=True)
class ServedPrompt:
    """What the proxy needs to serve a prompt: where it applies, the baseline it looks for and
    the live version's text."""

    name: str
    agent: str | None
    model: str | None
    baseline: str
    live_version: int
    live_text: str


# Trimmed as Postgres's btrim with these characters does (store/prompt_runs.py looks for the
# baseline in recorded calls with it), not str.strip()'s Unicode whitespace.
WHITESPACE = " \t\n\r\f\v"


def normalise(text: str) -> str:
    """The form baselines are matched in: exact after trimming surrounding whitespace."""
    return text.strip(WHITESPACE)


async def _lock(conn: asyncpg.Connection, name: str) -> None:
    # Version numbers and the single live version are per prompt; serialise changes to one.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('lightloop.prompt:' || $1))", name)


async def _notify(conn: asyncpg.Connection, name: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, name)


async def add_prompt(
    conn: asyncpg.Connection, name: str, text: str, *, agent: str | None = None, model: str | None = None
) -> tuple[PromptVersion, bool]:
    """Register `name` with `text` as its live baseline (version 0) the first time; afterwards
    a new staged manual version. (the version, whether it is new): a text the prompt already
    has returns that version. Conflict when --agent or --model differ from the registration."""
    if not is_valid_id(name):
        raise ValueError(f"prompt name {name[:80]!r} is not valid: use {ID_RULE}")
    text = storable_text(text)
    if not normalise(text):
        raise ValueError("a prompt's text must not be empty")
    async with conn.transaction():
        await _lock(conn, name)
        known = await conn.fetchrow("SELECT agent, model FROM prompts WHERE name = $1", name)
        if known is None:
            await conn.execute(
                "INSERT INTO prompts (name, agent, model) VALUES ($1, $2, $3)", name, agent, model
            )
            row = await conn.fetchrow(
                f"""INSERT INTO prompt_versions (name, version, text, origin, status, live_at)
                    VALUES ($1, 0, $2, 'baseline', 'live', now()) RETURNING {_COLUMNS}""",
                name,
                text,
            )
            await _notify(conn, name)
            return PromptVersion.from_record(row), True
        for flag, given, registered in (
            ("--agent", agent, known["agent"]),
            ("--model", model, known["model"]),
        ):
            if given is not None and given != registered:
                raise Conflict(f"prompt {name!r} is registered with {flag} {registered!r}, not {given!r}")
        return await _add_version(conn, name, text, parent=None, origin="manual", run_id=None)


async def add_candidate(
    conn: asyncpg.Connection, name: str, text: str, *, parent: int | None, run_id: str
) -> tuple[PromptVersion, bool]:
    """An optimiser's candidate as a staged version (the same text twice is one version)."""
    if not normalise(text):
        raise ValueError("a candidate prompt must not be empty")
    async with conn.transaction():
        await _lock(conn, name)
        if await conn.fetchval("SELECT 1 FROM prompts WHERE name = $1", name) is None:
            raise NotFound(f"prompt {name!r} is not registered; add it with `lightloop prompts add`")
        return await _add_version(
            conn, name, storable_text(text), parent=parent, origin="optimiser", run_id=run_id
        )


async def _add_version(
    conn: asyncpg.Connection, name: str, text: str, *, parent: int | None, origin: str, run_id: str | None
) -> tuple[PromptVersion, bool]:
    same = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM prompt_versions WHERE name = $1 AND text = $2 ORDER BY version LIMIT 1",
        name,
        text,
    )
    if same is not None:
        return PromptVersion.from_record(same), False
    row = await conn.fetchrow(
        f"""INSERT INTO prompt_versions (name, version, text, parent, origin, run_id)
            SELECT $1, max(version) + 1, $2, $3, $4, $5 FROM prompt_versions WHERE name = $1
            RETURNING {_COLUMNS}""",
        name,
        text,
        parent,
        origin,
        run_id,
    )
    return PromptVersion.from_record(row), True


async def set_live(conn: asyncpg.Connection, name: str, version: int) -> PromptVersion:
    """Make `version` of `name` live (the one live before is retired). NotFound for an unknown
    prompt or a version it does not have."""
    async with conn.transaction():
        await _lock(conn, name)
        if await conn.fetchval("SELECT 1 FROM prompts WHERE name = $1", name) is None:
            raise NotFound(f"prompt {name!r} is not registered")
        if (
            await conn.fetchval(
                "SELECT 1 FROM prompt_versions WHERE name = $1 AND version = $2", name, version
            )
            is None
        ):
            raise NotFound(f"prompt {name!r} has no version {version}")
        await conn.execute(
            "UPDATE prompt_versions SET status = 'retired' "
            "WHERE name = $1 AND status = 'live' AND version <> $2",
            name,
            version,
        )
        row = await conn.fetchrow(
            f"""UPDATE prompt_versions SET status = 'live', live_at = now()
                WHERE name = $1 AND version = $2 RETURNING {_COLUMNS}""",
            name,
            version,
        )
        await _notify(conn, name)
    return PromptVersion.from_record(row)


async def record_score(
    conn: asyncpg.Connection, name: str, version: int, score: float, scores: dict[str, float], scored_on: str
) -> None:
    await conn.execute(
        "UPDATE prompt_versions SET score = $3, scores = $4::jsonb, scored_on = $5 "
        "WHERE name = $1 AND version = $2",
        name,
        version,
        score,
        dump_json(scores),
        scored_on,
    )


async def get_versions(conn: asyncpg.Connection, name: str) -> list[PromptVersion]:
    """Every version of `name`, oldest first; NotFound for an unknown prompt."""
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM prompt_versions WHERE name = $1 ORDER BY version", name)
    if not rows:
        raise NotFound(f"prompt {name!r} is not registered; add it with `lightloop prompts add`")
    return [PromptVersion.from_record(r) for r in rows]


async def get_prompt(conn: asyncpg.Connection, name: str) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT name, agent, model, created_at FROM prompts WHERE name = $1", name)
    if row is None:
        raise NotFound(f"prompt {name!r} is not registered; add it with `lightloop prompts add`")
    return dict(row)


async def list_prompts(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Each prompt with its scope, live version, number of versions and best score."""
    rows = await conn.fetch(
        """SELECT p.name, p.agent, p.model,
                  (SELECT version FROM prompt_versions WHERE name = p.name AND status = 'live') AS live,
                  (SELECT count(*) FROM prompt_versions WHERE name = p.name) AS versions,
                  (SELECT max(score) FROM prompt_versions WHERE name = p.name) AS best_score
           FROM prompts p ORDER BY p.name"""
    )
    return [dict(r) for r in rows]


async def served_prompts(conn: asyncpg.Connection) -> list[ServedPrompt]:
    """What every proxy holds in memory: each prompt's scope, baseline and live text."""
    rows = await conn.fetch(
        """SELECT p.name, p.agent, p.model, b.text AS baseline, l.version AS live_version, l.text AS live_text
           FROM prompts p
           JOIN prompt_versions b ON b.name = p.name AND b.version = 0
           JOIN prompt_versions l ON l.name = p.name AND l.status = 'live'"""
    )
    return [ServedPrompt(**{**dict(r), "baseline": normalise(r["baseline"])}) for r in rows]


async def rollout_pin(conn: asyncpg.Connection, rollout_id: str) -> tuple[str, int, str] | None:
    """The candidate an optimisation run pinned to the rollout: (name, version, text)."""
    row = await conn.fetchrow(
        """SELECT v.name, v.version, v.text FROM rollouts r
           JOIN prompt_versions v ON v.name = r.prompt_name AND v.version = r.prompt_version
           WHERE r.id = $1""",
        rollout_id,
    )
    return None if row is None else (row["name"], row["version"], row["text"])


async def version_text(conn: asyncpg.Connection, name: str, version: int) -> str:
    text = await conn.fetchval(
        "SELECT text FROM prompt_versions WHERE name = $1 AND version = $2", name, version
    )
    if text is None:
        raise NotFound(f"prompt {name!r} has no version {version}")
    return str(text)
