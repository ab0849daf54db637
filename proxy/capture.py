"""What a proxied call leaves behind: the engine's answer (whole or streamed) assembled into one
outcome, then one span row and one `llm_calls` row per choice. Pure functions, no I/O.

Token ids and logprobs are the engine's own (`return_token_ids`, processed logprobs), never
re-tokenised. They go into array columns, so the `response` kept as JSON leaves them out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from lightloop.proxy.attribution import Attribution
from lightloop.proxy.spans import gen_ai_attributes

ABORT = "abort"
ERROR = "error"


@dataclass
class Call:
    """One call as the proxy saw it, before its answer."""

    span_id: str
    trace_id: str
    parent_span_id: str | None
    operation: str  # "chat" or "text_completion"
    provider: str
    rollout_id: str
    attribution: Attribution
    seq: int
    requested_model: str
    served_model: str
    policy_version: int | None
    request: dict[str, Any]
    started_ns: int  # wall clock, ns since the epoch
    upstream: str | None = None
    # The agent's request body as it came (JSON text): stored as is rather than encoded again.
    request_json: bytes | str | None = None
    # The adapter's policy key that served it (`policy`, or `policy-planner`): policy_version's.
    adapter: str | None = None
    # The inferred session's chain of message digests (proxy/sessions.py), when one was looked up.
    session_keys: list[bytes] | None = None


@dataclass
class Choice:
    index: int
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    finish_reason: str | None = None

    def message(self) -> dict[str, Any]:
        """The assistant message as the agent will send it back (for inferred sessions)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


@dataclass
class Outcome:
    response_id: str | None
    model: str | None
    choices: list[Choice]
    prompt_token_ids: list[int] | None
    usage: dict[str, Any] | None
    response: dict[str, Any]  # what the agent got, without token ids and logprobs


def _logprobs(operation: str, logprobs: Any) -> list[float] | None:
    if not isinstance(logprobs, dict):
        return None
    # The values are JSON numbers already; the column's codec takes int or float alike.
    if operation == "chat":
        content = logprobs.get("content")
        return [e["logprob"] for e in content] if isinstance(content, list) else None
    values = logprobs.get("token_logprobs")
    return list(values) if isinstance(values, list) else None


def from_response(operation: str, response: dict[str, Any]) -> Outcome:
    """The outcome of a non-streamed answer."""
    choices: list[Choice] = []
    slim_choices = []
    for raw in response.get("choices") or []:
        choice = Choice(index=int(raw.get("index", len(choices))), finish_reason=raw.get("finish_reason"))
        choice.token_ids = raw.get("token_ids")
        choice.logprobs = _logprobs(operation, raw.get("logprobs"))
        if operation == "chat":
            message = raw.get("message") or {}
            choice.text = message.get("content") or ""
            choice.tool_calls = message.get("tool_calls") or []
        else:
            choice.text = raw.get("text") or ""
            if choice.token_ids is None and raw.get("prompt_token_ids") is not None:
                choice.token_ids = []
        choices.append(choice)
        slim_choices.append(
            {k: v for k, v in raw.items() if k not in ("token_ids", "logprobs", "prompt_token_ids")}
        )
    prompt_ids = response.get("prompt_token_ids")
    if prompt_ids is None and response.get("choices"):
        prompt_ids = response["choices"][0].get("prompt_token_ids")  # completions: per choice
    slim = {k: v for k, v in response.items() if k not in ("prompt_token_ids", "choices")}
    slim["choices"] = slim_choices
    return Outcome(
        response.get("id"), response.get("model"), choices, prompt_ids, response.get("usage"), slim
    )


def parse_events(raw: bytes) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent-event stream, one at a time (a long stream's events are
    not all alive at once); a torn last event (an aborted stream) and `[DONE]` are left out."""
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict):
            yield event


def from_stream(operation: str, raw: bytes) -> Outcome:
    """The outcome of a streamed answer, assembled from its chunks.

    Linear in the stream's length: pieces are collected in lists and joined once at the end
    (appending to a string or list attribute copies it each time, which is quadratic in a long
    answer of one-token chunks)."""
    parts: dict[int, _Parts] = {}
    first: dict[str, Any] = {}
    usage = None
    prompt_ids = None
    for event in parse_events(raw):
        if not first:
            first = event
        if event.get("usage"):
            usage = event["usage"]
        if prompt_ids is None and event.get("prompt_token_ids") is not None:
            prompt_ids = event["prompt_token_ids"]
        for raw_choice in event.get("choices") or []:
            index = int(raw_choice.get("index", 0))
            part = parts.get(index)
            if part is None:
                part = parts[index] = _Parts()
            if prompt_ids is None and raw_choice.get("prompt_token_ids") is not None:
                prompt_ids = raw_choice["prompt_token_ids"]
            ids = raw_choice.get("token_ids")
            if ids is not None:
                part.token_ids.extend(ids)
                part.has_ids = True
            lps = _logprobs(operation, raw_choice.get("logprobs"))
            if lps is not None:
                part.logprobs.extend(lps)
                part.has_logprobs = True
            if raw_choice.get("finish_reason") is not None:
                part.finish_reason = raw_choice["finish_reason"]
            if operation == "chat":
                delta = raw_choice.get("delta") or {}
                if delta.get("content"):
                    part.text.append(delta["content"])
                for call in delta.get("tool_calls") or []:
                    slot = part.calls.setdefault(int(call.get("index", 0)), [None, [], []])
                    if call.get("id"):
                        slot[0] = call["id"]
                    fn = call.get("function") or {}
                    slot[1].append(fn.get("name") or "")
                    slot[2].append(fn.get("arguments") or "")
            elif raw_choice.get("text"):
                part.text.append(raw_choice["text"])
    ordered = [parts[i].choice(i) for i in sorted(parts)]
    response: dict[str, Any] = {
        "id": first.get("id"),
        "object": "chat.completion" if operation == "chat" else "text_completion",
        "created": first.get("created"),
        "model": first.get("model"),
        "choices": [_assembled(operation, c) for c in ordered],
        "usage": usage,
    }
    return Outcome(first.get("id"), first.get("model"), ordered, prompt_ids, usage, response)


@dataclass
class _Parts:
    """One choice's pieces as a stream delivers them, joined once by `choice`."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    has_ids: bool = False
    logprobs: list[float] = field(default_factory=list)
    has_logprobs: bool = False
    finish_reason: str | None = None
    # tool call index -> [id, name pieces, argument pieces]
    calls: dict[int, list[Any]] = field(default_factory=dict)

    def choice(self, index: int) -> Choice:
        return Choice(
            index=index,
            text="".join(self.text),
            tool_calls=[
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "".join(names), "arguments": "".join(arguments)},
                }
                for call_id, names, arguments in (self.calls[i] for i in sorted(self.calls))
            ],
            token_ids=self.token_ids if self.has_ids else None,
            logprobs=self.logprobs if self.has_logprobs else None,
            finish_reason=self.finish_reason,
        )


def _assembled(operation: str, choice: Choice) -> dict[str, Any]:
    if operation == "chat":
        return {"index": choice.index, "message": choice.message(), "finish_reason": choice.finish_reason}
    return {"index": choice.index, "text": choice.text, "finish_reason": choice.finish_reason}


def _time(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


def build_rows(
    call: Call,
    outcome: Outcome | None,
    ended_ns: int,
    *,
    aborted: bool = False,
    error: tuple[str, str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The span row and the llm_calls rows of a finished call.

    `error` is (error.type, message, the error body the agent got); `aborted` marks a call the
    agent hung up on: its unfinished choices get finish reason `abort`; a stream the engine broke
    off (`error` with a partial outcome) leaves them with `error`, its tokens so far kept."""
    choices = outcome.choices if outcome is not None else []
    if aborted or error is not None:
        for choice in choices:
            if choice.finish_reason is None:
                choice.finish_reason = ABORT if aborted else ERROR
    if not choices:
        choices = [Choice(index=0, finish_reason=ABORT if aborted else ERROR if error else None)]
    prompt_ids = outcome.prompt_token_ids if outcome is not None else None
    usage = outcome.usage if outcome is not None else None
    if usage is None and prompt_ids is not None:
        completion = sum(len(c.token_ids or ()) for c in choices)
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": completion,
            "total_tokens": len(prompt_ids) + completion,
        }
    response_id = outcome.response_id if outcome is not None else None
    latency_ms = (ended_ns - call.started_ns) / 1e6
    attributes = gen_ai_attributes(
        call,
        response_id=response_id,
        response_model=outcome.model if outcome is not None else None,
        usage=usage,
        finish_reasons=[c.finish_reason for c in choices if c.finish_reason is not None],
        error_type=error[0] if error else None,
    )
    started = _time(call.started_ns)
    span = {
        "span_id": call.span_id,
        "trace_id": call.trace_id,
        "parent_span_id": call.parent_span_id,
        "name": f"{call.operation} {call.requested_model}",
        "kind": "CLIENT",
        "start_time": started,
        "end_time": _time(ended_ns),
        "status_code": "ERROR" if error else "UNSET",
        "status_message": error[1] if error else None,
        "attributes": attributes,
        "resource": {"service.name": "lightloop-proxy"},
        "scope": "lightloop.proxy",
        "rollout_id": call.rollout_id,
        "model": call.requested_model,
        "input_tokens": usage.get("prompt_tokens") if usage else None,
        "output_tokens": usage.get("completion_tokens") if usage else None,
    }
    response = error[2] if error else outcome.response if outcome is not None else None
    calls = [
        {
            "span_id": call.span_id,
            "choice_index": choice.index,
            "rollout_id": call.rollout_id,
            "seq": call.seq,
            "model": call.requested_model,
            "agent": call.attribution.agent,
            "policy_version": call.policy_version,
            "request": call.request_json if call.request_json is not None else call.request,
            "response": response,
            "prompt_token_ids": prompt_ids,
            "completion_token_ids": choice.token_ids,
            "completion_logprobs": choice.logprobs,
            "finish_reason": choice.finish_reason,
            "latency_ms": latency_ms,
            "usage": usage,
            "created_at": started,
            "response_id": response_id,
            "attempt": call.attribution.attempt,
            "upstream": call.upstream,
            "prompt_name": call.attribution.prompt_name,
            "prompt_version": call.attribution.prompt_version,
            "adapter": call.adapter,
        }
        for choice in choices
    ]
    return span, calls
