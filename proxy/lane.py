"""The policy lane: chat and text completions for trainable models, forwarded to the engines with
token ids and logprobs switched on, streamed back as they arrive (the bytes are not re-encoded),
and recorded. See DESIGN.md for why this does not go through LiteLLM's router."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from lightloop.proxy.adapters import AdapterRestorer
from lightloop.proxy.attribution import Attribution
from lightloop.proxy.capture import Call, Outcome, from_response, from_stream
from lightloop.proxy.errors import BadRequest, ProxyError
from lightloop.proxy.http import JSON, Receive, Send, error_body, respond
from lightloop.proxy.recorder import Recorder
from lightloop.proxy.upstream import Upstreams, order
from lightloop.proxy.versions import LiveVersions
from lightloop.settings import AGENT_NAME, PolicyModelSettings

log = logging.getLogger(__name__)

PROVIDER = "vllm"  # the API the engines speak (vLLM, or lightloop's CPU engine)
_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def upstream_base(url: str) -> str:
    """An engine URL as configured (`http://h:8000`, `.../v1`, trailing slash) without `/v1`."""
    return url.rstrip("/").removesuffix("/v1")


@dataclass
class PolicyLane:
    policies: dict[str, PolicyModelSettings]
    versions: LiveVersions
    upstreams: Upstreams
    recorder: Recorder
    # Called with the policy's name for a call by an agent it has no adapter for (a metric).
    unknown_agent: Callable[[str], None] = lambda _policy: None

    def __post_init__(self) -> None:
        # Normalised once, not per call.
        self._bases = {name: [upstream_base(u) for u in p.upstreams] for name, p in self.policies.items()}
        self.restorer = AdapterRestorer(self.upstreams, self.versions.uri_of)

    def resolve(self, model: str) -> tuple[str, str | None] | None:
        """(policy, agent) for a model this lane serves: a policy's name, or its alias
        `policy/agent` (the agent's adapter, as X-Lightloop-Agent asks); None for any other.
        An alias of a policy with an agent name that could not be one is a 400."""
        if model in self.policies:
            return model, None
        policy, slash, agent = model.rpartition("/")  # a policy's own name may hold a slash
        if not slash or policy not in self.policies:
            return None
        if not AGENT_NAME.fullmatch(agent):
            raise BadRequest(
                f"model {model!r}: {agent!r} is not an agent name "
                "(letters, digits, '_', '.', '-', at most 64)"
            )
        return policy, agent

    async def serve(
        self,
        operation: str,
        path: str,
        body: dict[str, Any],
        raw: bytes,
        attribution: Attribution,
        traceparent: bytes | None,
        receive: Receive,
        send: Send,
    ) -> int:
        """Answer one call; the HTTP status sent."""
        policy = self.policies[body["model"]]
        # An agent with an adapter of its own is served by it; any other by the policy's.
        adapter = policy.adapter_of(attribution.agent)
        if policy.agents and attribution.agent is not None and adapter == policy.name:
            self.unknown_agent(policy.name)
        if adapter != policy.name and self.versions.live(adapter) == 0:
            # No version of its own yet: the policy's adapter (what the agent was served before
            # it was listed), not the bare base model; the call records it as the policy's.
            adapter = policy.name
        served, version = self.versions.served(adapter, attribution.rollout_id)
        call = self.recorder.open(
            attribution,
            operation=operation,
            provider=PROVIDER,
            requested_model=policy.name,
            served_model=served,
            policy_version=version,
            request=body,
            traceparent=traceparent,
            admit=True,
        )
        call.adapter = adapter
        # Stored as the agent sent it (orjson parsed it, so it is valid UTF-8): no decode here,
        # no encode in the writer.
        call.request_json = raw
        forwarded = dict(body)
        forwarded["model"] = served
        forwarded["return_token_ids"] = True
        if operation == "chat":
            forwarded["logprobs"] = True
        elif forwarded.get("logprobs") is None:
            forwarded["logprobs"] = 0  # completions: the sampled token's logprob only
        replicas = order(self._bases[policy.name], call.rollout_id)
        api_key = policy.api_key.get_secret_value() if policy.api_key else None
        try:
            attempted = await self.upstreams.post(replicas, path, orjson.dumps(forwarded), api_key)
            if attempted.response.status == 404 and version != (live := self.versions.live(adapter)):
                # The pinned version was unloaded between the check and the call (a version
                # went live meanwhile): the live one answers, and the call records it.
                attempted.response.release()
                call.served_model = forwarded["model"] = self.versions.name_of(adapter, live)
                call.policy_version = live
                attempted = await self.upstreams.post(replicas, path, orjson.dumps(forwarded), api_key)
            if (
                attempted.response.status == 404
                and call.policy_version
                and await self.restorer.restore(
                    attempted.url, forwarded["model"], adapter, call.policy_version, api_key
                )
            ):
                # The engine restarted without the adapter: it has it again, ask that engine again.
                attempted.response.release()
                attempted = await self.upstreams.post([attempted.url], path, orjson.dumps(forwarded), api_key)
        except ProxyError as exc:
            self.recorder.close(call, None, error=(exc.type, str(exc), _error_json(exc.type, str(exc))))
            raise
        call.upstream = attempted.url
        response = attempted.response
        content_type = response.headers.get("content-type", "application/json").encode()
        if response.status == 200 and content_type.startswith(b"text/event-stream"):
            return await self._stream(operation, call, response, receive, send)
        try:
            raw = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            response.close()
            message = f"the engine at {attempted.url} broke off its answer: {exc}"
            self.recorder.close(
                call, None, error=("upstream_error", message, _error_json("upstream_error", message))
            )
            await respond(send, 502, orjson.dumps(_error_json("upstream_error", message)))
            return 502
        response.release()
        if response.status == 200:
            try:
                outcome = from_response(operation, orjson.loads(raw))
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
                log.error("engine %s answered 200 with an unreadable body: %s", attempted.url, exc)
                self.recorder.close(
                    call, None, error=("bad_upstream_response", str(exc), {"raw": _text(raw)})
                )
            else:
                self.recorder.close(call, outcome)
        else:
            self.recorder.close(
                call, None, error=(f"http_{response.status}", _text(raw)[:500], _json_or_text(raw))
            )
        await respond(send, response.status, raw, content_type or JSON)
        return response.status

    async def _stream(
        self, operation: str, call: Call, response: aiohttp.ClientResponse, receive: Receive, send: Send
    ) -> int:
        await send({"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS})
        chunks: list[bytes] = []
        # The stream's end (`data: [DONE]`) is held back until the call's rows are handed to the
        # writer: an agent that finishes its rollout the moment it reads it must find the call
        # accepted (the writer marks, store/marks.py, rely on it). Every other byte goes on at
        # once, so tokens reach the agent as they come.
        held: list[bytes] = [b""]

        async def pump() -> None:
            async for piece in response.content.iter_any():
                chunks.append(piece)
                out, held[0] = _split_done(held[0] + piece)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})

        pumping = asyncio.create_task(pump())
        # The agent hanging up shows as http.disconnect on receive(); the stream is then cut so
        # the engine stops generating (it sees its connection close).
        hangup: asyncio.Task[Any] = asyncio.ensure_future(receive())
        done, _ = await asyncio.wait({pumping, hangup}, return_when=asyncio.FIRST_COMPLETED)
        aborted = pumping not in done
        error = None
        if aborted:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pumping
            response.close()
        else:
            hangup.cancel()
            exc = pumping.exception()
            if exc is not None and held[0].startswith((_DONE, _DONE_CRLF)):
                exc = None  # the stream was whole; only the transfer's ending broke
            if exc is not None:
                response.close()
                message = f"the engine at {call.upstream} broke off the stream: {type(exc).__name__}: {exc}"
                log.warning("%s", message)
                error = ("upstream_error", message, _error_json("upstream_error", message))
            else:
                response.release()
        raw = b"".join(chunks)
        try:
            outcome = await _assemble(operation, raw)
        except asyncio.CancelledError:  # the server is stopping: the call is still recorded
            self.recorder.close(call, from_stream(operation, raw), aborted=True, error=error)
            raise
        self.recorder.close(call, outcome, aborted=aborted, error=error)
        if not aborted:
            with contextlib.suppress(Exception):
                if held[0] and error is None:
                    await send({"type": "http.response.body", "body": held[0], "more_body": True})
                if error is not None:
                    # The status line went out with the first byte; an error event is how a
                    # stream says it failed (the OpenAI SDKs raise APIError on it).
                    body = error_body(error[1], "upstream_error", 502)
                    await send(
                        {"type": "http.response.body", "body": b"data: " + body + b"\n\n", "more_body": True}
                    )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        return 499 if aborted else 502 if error is not None else 200


_DONE = b"data: [DONE]\n\n"
_DONE_CRLF = b"data: [DONE]\r\n\r\n"

# Above this a stream is assembled in a worker thread: a long answer (a 32k-token stream is some
# 6 MB of events) would otherwise hold the event loop, and every other agent's call, for its
# whole parse.
OFF_LOOP_BYTES = 256 * 1024


async def _assemble(operation: str, raw: bytes) -> Outcome:
    if len(raw) < OFF_LOOP_BYTES:
        return from_stream(operation, raw)
    return await asyncio.to_thread(from_stream, operation, raw)


def _split_done(buffer: bytes) -> tuple[bytes, bytes]:
    """(what may go to the agent now, what is held back): whole events only, up to the last
    blank line, and not a final `data: [DONE]`. An event cut in half is held until its end
    arrives, so that a stream the engine breaks off mid-event never leaves the agent half an
    event with the error event glued to it."""
    end = max(buffer.rfind(b"\n\n") + 2, buffer.rfind(b"\r\n\r\n") + 4, 0)
    out, rest = buffer[:end], buffer[end:]
    for done in (_DONE, _DONE_CRLF):
        if out.endswith(done):
            return out[: -len(done)], out[-len(done) :] + rest
    return out, rest


def _error_json(type_: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_}}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _json_or_text(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"raw": _text(raw)[:10_000]}
    return data if isinstance(data, dict) else {"raw": data}
