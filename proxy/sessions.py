"""Inferred sessions: a call whose messages start with an earlier call's messages plus that
call's reply continues that call's rollout. Pure, in memory, bounded.

Messages are compared in a canonical form (role, text, tool calls, tool call id), because agents
re-send the assistant's reply in slightly different shapes (content None or "", parts lists,
extra keys such as `refusal`). A conversation is a chain of digests, one per message, so every
prefix of it has a key and a lookup costs one hash per message.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import orjson


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) if isinstance(part, Mapping) else str(part) for part in content
        )
    return str(content)


def _canonical(message: Mapping[str, Any]) -> bytes:
    calls = message.get("tool_calls") or []
    tool_calls = [
        (
            str((c.get("function") or {}).get("name", "")),
            str((c.get("function") or {}).get("arguments", "")),
        )
        for c in calls
        if isinstance(c, Mapping)
    ]
    return orjson.dumps(
        [
            str(message.get("role", "")),
            _text(message.get("content")),
            tool_calls,
            str(message.get("tool_call_id") or ""),
        ]
    )


def chain(messages: Sequence[Any]) -> list[bytes]:
    """keys[i] identifies messages[: i + 1]."""
    keys: list[bytes] = []
    previous = b""
    for message in messages:
        body = _canonical(message) if isinstance(message, Mapping) else orjson.dumps(repr(message))
        previous = hashlib.blake2b(previous + body, digest_size=16).digest()
        keys.append(previous)
    return keys


class SessionIndex:
    """Conversation prefix (ending in an assistant reply) -> rollout id; least recently used
    entries go first once `capacity` is reached."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rollouts: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rollouts)

    def find(self, messages: Sequence[Any], keys: list[bytes] | None = None) -> str | None:
        """The rollout of the longest earlier conversation (messages + reply) this one extends.
        `keys`: `chain(messages)` when the caller has it."""
        keys = chain(messages) if keys is None else keys
        for i in range(len(messages) - 1, -1, -1):
            message = messages[i]
            if isinstance(message, Mapping) and message.get("role") == "assistant":
                rollout = self._rollouts.get(keys[i])
                if rollout is not None:
                    self._rollouts.move_to_end(keys[i])
                    return rollout
        return None

    def remember(
        self,
        messages: Sequence[Any],
        reply: Mapping[str, Any],
        rollout_id: str,
        keys: list[bytes] | None = None,
    ) -> None:
        """`keys`: `chain(messages)` when the caller has it (found when the call was opened), so
        only the reply is hashed here."""
        if keys is None:
            keys = chain(messages)
        previous = keys[-1] if keys else b""
        key = hashlib.blake2b(previous + _canonical(reply), digest_size=16).digest()
        self._rollouts[key] = rollout_id
        self._rollouts.move_to_end(key)
        while len(self._rollouts) > self.capacity:
            self._rollouts.popitem(last=False)
