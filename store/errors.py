"""The store's exception tree. asyncpg, SQLAlchemy and Alembic errors are translated in
`lightloop.store.database` (connections, queries) and `lightloop.store.migrate` (schema)."""

from lightloop.errors import LightloopError


class StoreError(LightloopError):
    """Base of the store's errors."""


class DatabaseUnavailable(StoreError):
    """Postgres cannot be reached; the message names host, port and cause."""

    def __init__(self, host: str, port: int | str, cause: str) -> None:
        self.host, self.port, self.cause = host, port, cause
        super().__init__(f"cannot connect to Postgres at {host}:{port}: {cause}")


class WriterUnavailable(StoreError):
    """The batch writer did not confirm rows within its bound (its task is failing and being
    restarted): the caller answers 503 rather than wait for ever."""


class QueryError(StoreError):
    """Postgres refused a statement; the message is Postgres's own."""


class SchemaError(StoreError):
    """The database schema is not the one this code knows (not migrated, or newer)."""


class EmbeddedPostgresError(StoreError):
    """The embedded Postgres server failed to initialise, start or stop."""


class ClaimLost(StoreError):
    """A claim expired and was taken by another worker before it was completed."""


class PolicyVersionError(StoreError):
    """A policy version does not exist or cannot make the requested transition."""


class NotFound(StoreError):
    """A rollout or response the caller named does not exist."""


class Conflict(StoreError):
    """The request contradicts the row's state (a rollout already finished differently)."""
