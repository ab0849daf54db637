"""The README documents every setting and every command: a missing one fails here."""

from __future__ import annotations

from pathlib import Path

import click

from lightloop.cli import cli
from lightloop.settings import describe_settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "lightloop") -> list[str]:
    out = []
    for name, command in group.commands.items():
        path = f"{prefix} {name}"
        if isinstance(command, click.Group):
            out.extend(_commands(command, path))
        else:
            out.append(path)
    return out


def test_every_setting_is_in_the_readme() -> None:
    missing = [env for env, _, _ in describe_settings() if f"`{env}`" not in README]
    assert not missing


def test_every_command_is_in_the_readme() -> None:
    missing = [c for c in _commands(cli) if c not in README]
    assert not missing


def test_every_proxy_route_is_in_the_readme() -> None:
    from lightloop.proxy.app import ROUTES

    missing = [route for route in ROUTES if f"`{route}`" not in README]
    assert not missing


def test_quickstart_gives_the_two_commands() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    assert "make up" in quickstart and "make test" in quickstart
