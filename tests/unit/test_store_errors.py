"""Which Postgres errors set a row aside, which are an outage, and which are transient: the
writer keeps every row that is not itself at fault."""

from __future__ import annotations

import asyncpg
import pytest

from lightloop.store.database import is_bad_row, is_transient, is_unavailable

E = asyncpg.exceptions


@pytest.mark.parametrize(
    "error",
    [
        E.NumericValueOutOfRangeError,
        E.UniqueViolationError,
        E.ForeignKeyViolationError,
        E.ProgramLimitExceededError,
    ],
)
def test_data_errors_are_the_row_s(error: type[asyncpg.PostgresError]) -> None:
    exc = error("x")
    assert is_bad_row(exc) and not is_transient(exc) and not is_unavailable(exc)


@pytest.mark.parametrize(
    "error",
    [
        E.ReadOnlySQLTransactionError,  # 25006, after a failover
        E.UndefinedTableError,  # 42P01, a migration not applied yet
        E.InsufficientPrivilegeError,  # 42501
        E.SerializationError,  # 40001
        E.DeadlockDetectedError,  # 40P01
        E.LockNotAvailableError,  # 55P03
        E.InternalServerError,  # XX000
    ],
)
def test_the_database_s_state_is_transient_not_the_row_s(error: type[asyncpg.PostgresError]) -> None:
    exc = error("x")
    assert is_transient(exc) and not is_bad_row(exc) and not is_unavailable(exc)


@pytest.mark.parametrize(
    "error", [E.ConnectionFailureError, E.CannotConnectNowError, E.TooManyConnectionsError]
)
def test_a_lost_server_is_unavailable(error: type[asyncpg.PostgresError]) -> None:
    exc = error("x")
    assert is_unavailable(exc) and not is_bad_row(exc) and not is_transient(exc)


def test_the_driver_s_own_data_errors_are_the_row_s() -> None:
    assert is_bad_row(ValueError("invalid input for query argument $1")) and not is_transient(ValueError())
