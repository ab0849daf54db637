"""Compose's variable interpolation, as `docker compose` applies it before validating a file
against the Compose Specification schema (compose-go: parse, interpolate, then validate).

Supported, per the specification: `$$` (a literal `$`), `$VAR`, `${VAR}`, `${VAR:-default}`,
`${VAR-default}`, `${VAR:?error}`, `${VAR?error}`. Values only; keys are not interpolated."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_TOKEN = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?)(?P<arg>[^}]*))?\})"
)


class MissingVariable(Exception):
    """A `${VAR:?error}` whose variable is unset (or empty)."""


def interpolate_text(text: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["bare"] or match["name"]
        value = env.get(name)
        op, arg = match["op"], match["arg"] or ""
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if (op == ":?" and not value) or (op == "?" and value is None):
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    if "${" in _TOKEN.sub("", text.replace("$$", "")):
        raise ValueError(f"unsupported interpolation in {text!r}")
    return _TOKEN.sub(substitute, text)


def interpolate(document: Any, env: Mapping[str, str]) -> Any:
    if isinstance(document, dict):
        return {key: interpolate(value, env) for key, value in document.items()}
    if isinstance(document, list):
        return [interpolate(value, env) for value in document]
    if isinstance(document, str):
        return interpolate_text(document, env)
    return document


def variables(document: Any) -> set[str]:
    """Names of the variables a parsed compose file's values refer to."""
    if isinstance(document, dict):
        return set().union(*(variables(v) for v in document.values()))
    if isinstance(document, list):
        return set().union(*(variables(v) for v in document))
    if isinstance(document, str):
        return {m["bare"] or m["name"] for m in _TOKEN.finditer(document) if not m["escaped"]}
    return set()


def read_env_file(text: str) -> dict[str, str]:
    """A compose `.env` file: KEY=VALUE lines; blank lines and # comments ignored."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env
