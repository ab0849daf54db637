"""Reading dataset files for `lightloop tasks load`: JSONL, CSV or Parquet, one task per row,
each a JSON object. Any malformed row stops the whole load, named by file, line (or row) and
reason, so that nothing half-loaded is ever trained on."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lightloop.errors import LightloopError
from lightloop.store.tasks import task_id

FORMATS = ("jsonl", "csv", "parquet")


class TaskFileError(LightloopError):
    """A dataset file that cannot be loaded; the message names the file, the line and why."""


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("jsonl", "ndjson", "json"):
        return "jsonl"
    if suffix in ("csv", "parquet"):
        return suffix
    raise TaskFileError(
        f"{path}: cannot tell the format from {path.suffix or 'no suffix'!r}; use .jsonl, .csv or .parquet"
    )


def read_tasks(path: Path) -> list[dict[str, Any]]:
    """Every task in the file, in order; TaskFileError on the first bad row."""
    if not path.is_file():
        raise TaskFileError(f"{path}: no such file")
    fmt = detect_format(path)
    tasks = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}[fmt](path)
    if not tasks:
        raise TaskFileError(f"{path}: no tasks in the file")
    seen: dict[str, str] = {}
    for where, task in tasks:
        tid = task_id(task)
        if tid in seen:
            raise TaskFileError(f"{path}:{where}: task id {tid!r} was already used at {seen[tid]}")
        seen[tid] = where
    return [task for _, task in tasks]


def _jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw, parse_constant=_refuse_constant)
            except (ValueError, UnicodeDecodeError) as exc:
                raise TaskFileError(f"{path}:{number}: not valid JSON ({exc})") from None
            if not isinstance(value, dict):
                raise TaskFileError(
                    f"{path}:{number}: a task must be a JSON object, not {type(value).__name__}"
                )
            out.append((f"line {number}", _checked(path, f"line {number}", value)))
    return out


def _csv(path: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise TaskFileError(f"{path}:1: no header row")
            for row in reader:
                where = f"line {reader.line_num}"
                if None in row:
                    raise TaskFileError(f"{path}:{where}: more fields than the header names")
                if any(v is None for v in row.values()):
                    raise TaskFileError(f"{path}:{where}: fewer fields than the header names")
                out.append((where, _checked(path, where, dict(row))))
    except UnicodeDecodeError as exc:
        raise TaskFileError(f"{path}: not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise TaskFileError(f"{path}: not valid CSV ({exc})") from None
    return out


def _parquet(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise TaskFileError(f"{path}: not a readable Parquet file ({exc})") from None
    out = []
    for number, row in enumerate(table.to_pylist(), start=1):
        where = f"row {number}"
        try:
            value = json.loads(json.dumps(row, default=str, allow_nan=False))
        except ValueError as exc:
            raise TaskFileError(f"{path}:{where}: {exc}") from None
        out.append((where, _checked(path, where, value)))
    return out


def _checked(path: Path, where: str, task: dict[str, Any]) -> dict[str, Any]:
    if not task:
        raise TaskFileError(f"{path}:{where}: an empty task")
    given = task.get("id")
    if given is not None and (isinstance(given, bool) or not isinstance(given, str | int)):
        raise TaskFileError(f"{path}:{where}: id must be a string or an integer")
    if isinstance(given, str) and len(given) > 200:
        raise TaskFileError(f"{path}:{where}: id is longer than 200 characters")
    return task


def _refuse_constant(name: str) -> float:
    # NaN and Infinity are not JSON; Postgres's jsonb refuses them too.
    raise ValueError(f"{name} is not allowed in JSON")


__all__ = ["FORMATS", "TaskFileError", "detect_format", "read_tasks"]
