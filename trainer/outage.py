"""Postgres outages as the trainer sees them: which errors may pass, and how long to wait."""

from __future__ import annotations

import random

import asyncpg

from lightloop.store import DatabaseUnavailable
from lightloop.store.database import is_transient, is_unavailable

BACKOFF_CAP_S = 30.0

# What Postgres raises when it is unreachable or refusing, before or after translation; which of
# these is an outage (it may pass) rather than a bug is `is_outage`.
# asyncpg's InternalClientError: a connection whose server ended it (a failover, a restart) while
# a statement was being sent is left in a state no statement can use; a new connection is fine.
OUTAGE = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    DatabaseUnavailable,
)


def is_outage(exc: BaseException) -> bool:
    """Postgres is down or refuses for now (read-only, a deadlock): it may pass. Anything else
    (a statement Postgres rejects every time) is logged at ERROR each time it happens."""
    return (
        isinstance(exc, DatabaseUnavailable | asyncpg.InternalClientError)
        or is_unavailable(exc)
        or is_transient(exc)
    )


def backoff_s(attempt: int, base_s: float) -> float:
    """The pause before retry `attempt` (1, 2, ...): doubling from `base_s` up to 30 s, with jitter
    over its upper half ("equal jitter"), so that trainers that lost Postgres together do not
    return together."""
    ceiling: float = min(BACKOFF_CAP_S, base_s * 2.0 ** (attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)
