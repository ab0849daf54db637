"""Span ids, W3C trace context, and the OpenTelemetry GenAI attributes of a proxied call
(semantic conventions for generative AI, latest experimental: `gen_ai.provider.name`,
`gen_ai.usage.input_tokens`, ...). Pure functions, no I/O."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightloop.proxy.capture import Call

_TRACEPARENT = re.compile(rb"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")

# Request parameters recorded on the span, as the conventions name them.
_REQUEST_ATTRIBUTES = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "seed": "gen_ai.request.seed",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "n": "gen_ai.request.choice.count",
}


def new_span_id() -> str:
    return os.urandom(8).hex()


def new_trace_id() -> str:
    return os.urandom(16).hex()


def trace_context(traceparent: bytes | None) -> tuple[str, str | None]:
    """(trace id, parent span id) from a W3C `traceparent` header, so the proxy's span joins the
    agent's trace; a new trace when there is none (or it is malformed)."""
    if traceparent:
        match = _TRACEPARENT.match(traceparent.strip().lower())
        if match and match[1] != b"0" * 32 and match[2] != b"0" * 16:
            return match[1].decode(), match[2].decode()
    return new_trace_id(), None


def gen_ai_attributes(
    call: Call,
    *,
    response_id: str | None,
    response_model: str | None,
    usage: dict[str, Any] | None,
    finish_reasons: list[str],
    error_type: str | None,
) -> dict[str, Any]:
    a: dict[str, Any] = {
        "gen_ai.operation.name": call.operation,
        "gen_ai.provider.name": call.provider,
        "gen_ai.request.model": call.requested_model,
        "gen_ai.conversation.id": call.rollout_id,
        "lightloop.rollout.id": call.rollout_id,
        "lightloop.attribution": call.attribution.source,
        "lightloop.seq": call.seq,
    }
    for key, name in _REQUEST_ATTRIBUTES.items():
        value = call.request.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            a[name] = value
    if call.request.get("stream"):
        a["gen_ai.request.stream"] = True
    if call.policy_version is not None:
        a["lightloop.policy.version"] = call.policy_version
    if call.attribution.attempt is not None:
        a["lightloop.attempt"] = call.attribution.attempt
    for key, value in (
        ("lightloop.group.id", call.attribution.group_id),
        ("lightloop.agent", call.attribution.agent),
        ("lightloop.task.id", call.attribution.task_id),
        ("gen_ai.response.id", response_id),
        ("gen_ai.response.model", response_model),
        ("error.type", error_type),
    ):
        if value is not None:
            a[key] = value
    if call.upstream is not None:
        a["server.address"] = call.upstream
    if usage:
        if usage.get("prompt_tokens") is not None:
            a["gen_ai.usage.input_tokens"] = usage["prompt_tokens"]
        if usage.get("completion_tokens") is not None:
            a["gen_ai.usage.output_tokens"] = usage["completion_tokens"]
    if finish_reasons:
        a["gen_ai.response.finish_reasons"] = finish_reasons
    return a
