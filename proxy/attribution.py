"""Which rollout a call belongs to, from what the agent sent. First match wins:

1. the path: `/rollout/{rollout_id}/v1/...` or `/rollout/{rollout_id}/attempt/{n}/v1/...`;
2. the headers `X-Lightloop-Rollout`, `-Group`, `-Agent`, `-Task` (and `-Mode`: train or val,
   and `-Group-Size`: how many rollouts the group will have, which also apply to the other forms);
3. neither: the proxy infers the session from the messages (done by the caller).

Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from lightloop.ids import ID_RULE, is_valid_id
from lightloop.proxy.errors import BadRequest

_PATH_RE = re.compile(r"^/rollout/(?P<rollout>[^/]+)(?:/attempt/(?P<attempt>[^/]+))?(?P<rest>/v1(?:/.*)?)$")

HEADER_ROLLOUT = "x-lightloop-rollout"
HEADER_GROUP = "x-lightloop-group"
HEADER_AGENT = "x-lightloop-agent"
HEADER_TASK = "x-lightloop-task"
HEADER_MODE = "x-lightloop-mode"
HEADER_GROUP_SIZE = "x-lightloop-group-size"
MAX_GROUP_SIZE = 10_000


@dataclass(frozen=True)
class Attribution:
    rollout_id: str | None
    source: Literal["path", "header", "session"]
    attempt: int | None = None
    group_id: str | None = None
    agent: str | None = None
    task_id: str | None = None
    mode: str = "train"  # "val": evaluation rollouts, recorded but never trained on
    group_size: int | None = None  # declared: the trainer waits for that many finished rollouts
    # Set by the proxy, not the agent: the registered prompt it swapped in, and its version
    # (proxy/prompts.py); carried here so both lanes record it with the call.
    prompt_name: str | None = None
    prompt_version: int | None = None


def check_id(value: str, what: str) -> str:
    if not is_valid_id(value):
        raise BadRequest(f"{what} {value[:80]!r} is not a valid id: use {ID_RULE}")
    return value


def split_path(path: str) -> tuple[str | None, int | None, str]:
    """(rollout id, attempt, the OpenAI path the agent meant) for a path-attributed URL, or
    (None, None, path) for any other path."""
    match = _PATH_RE.match(path)
    if match is None:
        return None, None, path
    rollout = check_id(match["rollout"], "rollout id")
    attempt = None
    if match["attempt"] is not None:
        if not match["attempt"].isdigit():
            raise BadRequest(f"attempt {match['attempt'][:20]!r} must be a non-negative integer")
        attempt = int(match["attempt"])
    return rollout, attempt, match["rest"]


def resolve(path: str, headers: Mapping[str, str]) -> tuple[Attribution, str]:
    """The attribution of a request and the path to serve it at (the path form's prefix removed).

    Headers still add group, agent and task to a path-attributed call; a rollout named in both
    places must agree, since a disagreement means the agent is misconfigured."""
    lower = {k.lower(): v for k, v in headers.items()}
    group = lower.get(HEADER_GROUP)
    agent = lower.get(HEADER_AGENT)
    task = lower.get(HEADER_TASK)
    for value, what in ((group, "group id"), (task, "task id")):
        if value is not None:
            check_id(value, what)
    if agent is not None and not 0 < len(agent) <= 200:
        raise BadRequest("X-Lightloop-Agent must hold 1 to 200 characters")
    mode = lower.get(HEADER_MODE, "train")
    if mode not in ("train", "val"):
        raise BadRequest(f"X-Lightloop-Mode must be train or val, not {mode[:20]!r}")
    size_text = lower.get(HEADER_GROUP_SIZE)
    size = None
    if size_text is not None:
        if not size_text.strip().isdigit() or not 1 <= int(size_text) <= MAX_GROUP_SIZE:
            raise BadRequest(f"X-Lightloop-Group-Size must be a whole number from 1 to {MAX_GROUP_SIZE}")
        size = int(size_text)
    header_rollout = lower.get(HEADER_ROLLOUT)
    if header_rollout is not None:
        check_id(header_rollout, "rollout id")
    rollout, attempt, rest = split_path(path)
    if rollout is not None:
        if header_rollout is not None and header_rollout != rollout:
            raise BadRequest(
                f"the path names rollout {rollout!r} but X-Lightloop-Rollout says {header_rollout!r}"
            )
        return Attribution(rollout, "path", attempt, group, agent, task, mode, size), rest
    if header_rollout is not None:
        return Attribution(header_rollout, "header", None, group, agent, task, mode, size), rest
    return Attribution(None, "session", None, group, agent, task, mode, size), rest
