from __future__ import annotations

import socket

import asyncpg
import pytest

from lightloop.store.database import describe_cause, dsn, host_port, is_unavailable, sqlalchemy_url


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u:p@h:5433/d",
        "postgresql://u:p@h:5433/d",
        "postgresql+asyncpg://u:p@h:5433/d",
        "postgresql+psycopg://u:p@h:5433/d",
    ],
)
def test_any_postgres_url_form_is_accepted(url: str) -> None:
    assert dsn(url) == "postgresql://u:p@h:5433/d"
    assert sqlalchemy_url(url) == "postgresql+asyncpg://u:p@h:5433/d"
    assert host_port(url) == ("h", 5433)


def test_passwords_with_special_characters_survive() -> None:
    assert dsn("postgresql://u:p%40ss%2F@h/d") == "postgresql://u:p%40ss%2F@h/d"


def test_other_databases_are_refused() -> None:
    with pytest.raises(ValueError, match="not a Postgres URL"):
        dsn("mysql://root:secret@h/d")


def test_unavailability_is_told_apart_from_bad_statements() -> None:
    assert is_unavailable(ConnectionRefusedError())
    assert is_unavailable(TimeoutError())
    assert is_unavailable(asyncpg.exceptions.AdminShutdownError("terminating"))
    assert is_unavailable(asyncpg.exceptions.CannotConnectNowError("starting up"))
    assert not is_unavailable(asyncpg.exceptions.UniqueViolationError("dup"))
    assert not is_unavailable(asyncpg.exceptions.PostgresSyntaxError("syntax"))


def test_causes_read_as_one_short_phrase() -> None:
    assert describe_cause(ConnectionRefusedError(111, "Connection refused")).startswith("connection refused")
    assert (
        describe_cause(socket.gaierror(-2, "Name or service not known"))
        == "unknown host (Name or service not known)"
    )
    assert describe_cause(TimeoutError()).startswith("no answer within")
