"""The HTTP API: the part of vLLM's OpenAI-compatible server lightloop relies on, with vLLM's
field names and places (`return_token_ids`, `prompt_token_ids`, `token_ids`, processed logprobs,
runtime LoRA loading). Errors become OpenAI-shaped JSON in `_error_response` only."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightloop.engine.batcher import Batcher, Choice, Event, Failed, Finished, Token
from lightloop.engine.chat import Detokenizer, encode, parse_tool_calls, render_chat
from lightloop.engine.errors import BadRequest, EngineError, Forbidden, NotFound
from lightloop.engine.lora import Adapter, LoraRuntime, read_adapter
from lightloop.engine.sampling import SamplingParams, find_stop
from lightloop.models import LoadedModel

MAX_TOP_LOGPROBS = 20


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    n: int = Field(1, ge=1, le=16)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    return_token_ids: bool = False


class ChatRequest(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


class LoadLora(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLora(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


@dataclass
class _ChoiceState:
    index: int
    prompt_ids: list[int]
    detok: Detokenizer
    choice: Choice
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    sent_text: int = 0  # characters of detok.text already streamed
    finish_reason: str | None = None
    stop_reason: str | None = None
    stop_at: int | None = None  # text cut here by a stop string

    @property
    def text(self) -> str:
        full = self.detok.text
        return full if self.stop_at is None else full[: self.stop_at]


class EngineServer:
    def __init__(
        self,
        loaded: LoadedModel,
        batcher: Batcher,
        lora: LoraRuntime,
        served_name: str,
        *,
        api_key: str | None = None,
        lora_root: Path | None = None,
        runtime_lora: bool = False,
    ) -> None:
        self.loaded = loaded
        self.batcher = batcher
        self.lora = lora
        self.served_name = served_name
        self.created = int(time.time())
        self.api_key = api_key.encode() if api_key else None
        self.lora_root = lora_root
        self.runtime_lora = runtime_lora

    def authorized(self, header: str | None) -> bool:
        """vLLM's --api-key: `Authorization: Bearer KEY` on every /v1 route."""
        if self.api_key is None:
            return True
        given = (header or "").removeprefix("Bearer ").strip().encode()
        return hmac.compare_digest(given, self.api_key)

    def adapter_path(self, raw: str) -> Path:
        """The adapter folder a load names, if it may be loaded: under `lora_root` after
        following links, so that no link leads out of it."""
        try:
            # Not strict: a path outside the root is refused the same whether or not it exists,
            # so the answer tells nothing about the file system outside it.
            resolved = Path(raw).expanduser().resolve()
        except (OSError, RuntimeError):
            raise BadRequest(f"LoRA adapter path {raw!r} cannot be resolved") from None
        if self.lora_root is not None and not resolved.is_relative_to(self.lora_root):
            raise BadRequest(f"LoRA adapter path {raw!r} is outside the engine's --lora-root")
        return resolved

    # -- helpers -------------------------------------------------------------------------------

    def adapter_for(self, model: str) -> Adapter | None:
        if model in (self.served_name, self.loaded.name):
            return None
        adapter = self.lora.get(model)
        if adapter is None:
            raise NotFound(f"The model `{model}` does not exist.")
        return adapter

    def params(self, req: _Common, prompt_len: int, logprobs: bool, top: int) -> SamplingParams:
        limit = self.loaded.max_model_len
        max_tokens = req.max_completion_tokens or req.max_tokens
        if prompt_len >= limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{prompt_len} tokens. Please reduce the length of the input."
            )
        if max_tokens is None:
            max_tokens = limit - prompt_len
        elif prompt_len + max_tokens > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=tuple(s for s in stops if s),
            seed=req.seed,
            logprobs=logprobs,
            top_logprobs=top,
        )

    def start(
        self, prompts: list[list[int]], n: int, params: SamplingParams, adapter: Adapter | None
    ) -> tuple[list[_ChoiceState], asyncio.Queue[tuple[int, Event]]]:
        if n > self.batcher.max_batch_size:
            # A request's choices are prefilled and decoded together; more than a batch holds
            # could never be scheduled.
            raise BadRequest(f"n={n} exceeds this engine's max_batch_size of {self.batcher.max_batch_size}")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        states: list[_ChoiceState] = []
        for p, prompt in enumerate(prompts):
            group = []
            for j in range(n):
                index = p * n + j

                def emit(event: Event, index: int = index) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))

                generator = None
                if not params.greedy:
                    generator = torch.Generator()
                    if params.seed is not None:
                        generator.manual_seed(params.seed + index)
                    else:
                        generator.seed()
                choice = Choice(
                    prompt_ids=prompt, params=params, adapter=adapter, emit=emit, generator=generator
                )
                group.append(choice)
                states.append(_ChoiceState(index, prompt, Detokenizer(self.loaded.tokenizer), choice))
            self.batcher.submit(group)
        return states, events

    def apply(self, state: _ChoiceState, event: Event) -> str:
        """Fold one engine event into a choice; returns the text newly safe to send."""
        if isinstance(event, Token):
            if state.finish_reason is not None:
                return ""  # generated after a stop string cut the choice: not part of it
            state.token_ids.append(event.token_id)
            state.logprobs.append((event.token_id, event.logprob, event.top))
            before = len(state.detok.text)
            state.detok.add(event.token_id)
            stops = state.choice.params.stop
            if stops:
                at = find_stop(state.detok.text, stops, before)
                if at is not None:
                    state.stop_at = at
                    state.stop_reason = next(s for s in stops if state.detok.text.startswith(s, at))
                    state.finish_reason = "stop"
                    state.choice.cancel()
            return self._unsent(state, final=False)
        if isinstance(event, Finished):
            if state.finish_reason is None:
                state.finish_reason = event.reason
            return self._unsent(state, final=True)
        raise EngineError(event.message)

    def _unsent(self, state: _ChoiceState, *, final: bool) -> str:
        text = state.text
        # Hold back a tail that could still become a stop string.
        hold = (
            0
            if final or state.finish_reason
            else max((len(s) - 1 for s in state.choice.params.stop), default=0)
        )
        end = max(state.sent_text, len(text) - hold)
        delta = text[state.sent_text : end]
        state.sent_text = end
        return delta

    def token_text(self, token_id: int) -> str:
        return str(self.loaded.tokenizer.decode([token_id]))


def _error_response(status: int, message: str, err_type: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": err_type, "param": param, "code": status}},
    )


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"{where}: {first['msg']}" if where else first["msg"]) from None


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (a non-streamed request has read its whole body)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _runtime_lora(server: EngineServer) -> None:
    if not server.runtime_lora:
        raise Forbidden(
            "runtime LoRA updating is off: start the engine with --allow-runtime-lora-updating "
            "(vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
        )


def create_app(server: EngineServer) -> FastAPI:
    app = FastAPI(title="lightloop engine", docs_url=None, redoc_url=None)

    @app.exception_handler(EngineError)
    async def _engine_error(_request: Request, exc: EngineError) -> JSONResponse:
        return _error_response(exc.status, str(exc), exc.type)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return _error_response(exc.status_code, str(exc.detail), kind)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        # The two gauges vLLM also exports, under lightloop's prefix.
        text = (
            "# TYPE lightloop_engine_requests_running gauge\n"
            f"lightloop_engine_requests_running {server.batcher.running}\n"
            "# TYPE lightloop_engine_requests_waiting gauge\n"
            f"lightloop_engine_requests_waiting {server.batcher.waiting}\n"
            "# TYPE lightloop_engine_decode_steps_total counter\n"
            f"lightloop_engine_decode_steps_total {server.batcher.steps}\n"
            "# TYPE lightloop_engine_mixed_adapter_steps_total counter\n"
            f"lightloop_engine_mixed_adapter_steps_total {server.batcher.mixed_adapter_steps}\n"
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {
                "id": server.served_name,
                "object": "model",
                "created": server.created,
                "owned_by": "lightloop",
                "root": server.loaded.name,
                "parent": None,
                "max_model_len": server.loaded.max_model_len,
            }
        ]
        data += [
            {
                "id": a.name,
                "object": "model",
                "created": server.created,
                "owned_by": "lightloop",
                "root": str(a.path),
                "parent": server.served_name,
            }
            for a in server.lora.names()
        ]
        return {"object": "list", "data": data}

    @app.middleware("http")
    async def _api_key(request: Request, call_next: Any) -> Response:
        # Like vLLM: the /v1 routes need the key; /health and /metrics stay open for probes.
        if request.url.path.startswith("/v1") and not server.authorized(request.headers.get("authorization")):
            return _error_response(401, "Unauthorized: this engine requires its API key", "Unauthorized")
        response: Response = await call_next(request)
        return response

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request) -> Response:
        _runtime_lora(server)
        body: LoadLora = await _body(request, LoadLora)
        if server.lora.get(body.lora_name) is not None:
            raise BadRequest(f"The lora adapter '{body.lora_name}' has already been loaded.")
        path = server.adapter_path(body.lora_path)
        adapter = await asyncio.to_thread(read_adapter, body.lora_name, path, server.loaded.model)
        server.lora.add(adapter)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request) -> Response:
        _runtime_lora(server)
        body: UnloadLora = await _body(request, UnloadLora)
        server.lora.remove(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req: ChatRequest = await _body(request, ChatRequest)
        adapter = server.adapter_for(req.model)
        prompt_text = render_chat(server.loaded.tokenizer, req.messages, req.tools)
        prompt = encode(server.loaded.tokenizer, prompt_text)
        top = req.top_logprobs or 0
        params = server.params(req, len(prompt), req.logprobs, top)
        states, events = server.start([prompt], req.n, params, adapter)
        meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.model)
        if req.stream:
            return _sse(_chat_stream(server, req, states, events, meta), states)
        await _collect(request, server, states, events)
        return JSONResponse(_chat_response(server, req, states, meta))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = await _body(request, CompletionRequest)
        adapter = server.adapter_for(req.model)
        prompts = _completion_prompts(server, req.prompt)
        top = req.logprobs or 0
        params = server.params(req, max(len(p) for p in prompts), req.logprobs is not None, top)
        states, events = server.start(prompts, req.n, params, adapter)
        meta = _Meta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.model)
        if req.stream:
            return _sse(_completion_stream(server, req, states, events, meta), states)
        await _collect(request, server, states, events)
        return JSONResponse(_completion_response(server, req, states, meta))

    return app


@dataclass(frozen=True)
class _Meta:
    id: str
    created: int
    model: str


def _completion_prompts(server: EngineServer, prompt: Any) -> list[list[int]]:
    tok = server.loaded.tokenizer
    if isinstance(prompt, str):
        return [encode(tok, prompt)]
    if not prompt:
        raise BadRequest("prompt must not be empty")
    if all(isinstance(t, int) for t in prompt):
        out = [list(prompt)]
    else:
        out = [encode(tok, p) if isinstance(p, str) else list(p) for p in prompt]
    vocab = len(tok)
    for ids in out:
        if not ids:
            raise BadRequest("prompt must not be empty")
        if any(not 0 <= t < vocab for t in ids):
            raise BadRequest(f"prompt token ids must lie in [0, {vocab})")
    return out


async def _collect(
    request: Request,
    server: EngineServer,
    states: list[_ChoiceState],
    events: asyncio.Queue[tuple[int, Event]],
) -> None:
    """Run a non-streamed request to its end; a client that leaves cancels its choices."""
    gone = asyncio.create_task(_disconnected(request))
    try:
        pending = {s.index for s in states}
        by_index = {s.index: s for s in states}
        while pending:
            get = asyncio.create_task(events.get())
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                get.cancel()
                raise asyncio.CancelledError
            index, event = get.result()
            server.apply(by_index[index], event)
            if isinstance(event, Finished | Failed):
                pending.discard(index)
    finally:
        gone.cancel()
        for s in states:
            s.choice.cancel()


def _sse(chunks: AsyncIterator[dict[str, Any]], states: list[_ChoiceState]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        except EngineError as exc:
            error = {"error": {"message": str(exc), "type": exc.type, "param": None, "code": exc.status}}
            yield b"data: " + json.dumps(error).encode() + b"\n\n"
        finally:
            # Also runs when the client disconnects: stop generating for it.
            for s in states:
                s.choice.cancel()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _chat_logprobs(
    server: EngineServer, entries: list[tuple[int, float, list[tuple[int, float]]]]
) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = server.token_text(token_id)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    return {
        "content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]} for t, lp, top in entries]
    }


def _usage(states: list[_ChoiceState]) -> dict[str, int]:
    prompt = sum(len(p) for p in {id(s.prompt_ids): s.prompt_ids for s in states}.values())
    completion = sum(len(s.token_ids) for s in states)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _message(
    server: EngineServer, req: ChatRequest, state: _ChoiceState
) -> tuple[dict[str, Any], str | None]:
    content = state.text
    finish = state.finish_reason
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if req.tools and req.tool_choice != "none":
        text, calls = parse_tool_calls(content)
        if calls:
            message = {"role": "assistant", "content": text or None, "tool_calls": calls}
            finish = "tool_calls"
    return message, finish


def _chat_response(
    server: EngineServer, req: ChatRequest, states: list[_ChoiceState], meta: _Meta
) -> dict[str, Any]:
    choices = []
    for s in states:
        message, finish = _message(server, req, s)
        choice: dict[str, Any] = {
            "index": s.index,
            "message": message,
            "logprobs": _chat_logprobs(server, s.logprobs) if req.logprobs else None,
            "finish_reason": finish,
            "stop_reason": s.stop_reason,
        }
        if req.return_token_ids:
            choice["token_ids"] = s.token_ids
        choices.append(choice)
    response: dict[str, Any] = {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": _usage(states),
    }
    if req.return_token_ids:
        response["prompt_token_ids"] = states[0].prompt_ids
    return response


async def _chat_stream(
    server: EngineServer,
    req: ChatRequest,
    states: list[_ChoiceState],
    events: asyncio.Queue[tuple[int, Event]],
    meta: _Meta,
) -> AsyncIterator[dict[str, Any]]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "choices": choices,
            **extra,
        }

    first_extra: dict[str, Any] = {"prompt_token_ids": states[0].prompt_ids} if req.return_token_ids else {}
    yield chunk(
        [
            {
                "index": s.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for s in states
        ],
        **first_extra,
    )
    by_index = {s.index: s for s in states}
    # With tools, a choice's text is held to its end: only then is it known to be a tool call.
    buffered = bool(req.tools) and req.tool_choice != "none"
    pending = set(by_index)
    sent_tokens = {i: 0 for i in by_index}
    while pending:
        index, event = await events.get()
        state = by_index[index]
        delta = server.apply(state, event)
        done = isinstance(event, Finished | Failed)
        new_tokens = state.token_ids[sent_tokens[index] :]
        new_logprobs = state.logprobs[sent_tokens[index] :]
        if not (delta or new_tokens or done):
            continue
        sent_tokens[index] = len(state.token_ids)
        choice: dict[str, Any] = {"index": index, "delta": {}, "logprobs": None, "finish_reason": None}
        if delta and not buffered:
            choice["delta"] = {"content": delta}
        if req.logprobs and new_logprobs:
            choice["logprobs"] = _chat_logprobs(server, new_logprobs)
        if req.return_token_ids:
            choice["token_ids"] = new_tokens
        if done:
            pending.discard(index)
            if buffered:
                message, finish = _message(server, req, state)
                choice["delta"] = {k: v for k, v in message.items() if k != "role" and v is not None}
                if "tool_calls" in choice["delta"]:
                    choice["delta"]["tool_calls"] = [
                        {"index": i, **call} for i, call in enumerate(choice["delta"]["tool_calls"])
                    ]
            else:
                finish = state.finish_reason
            choice["finish_reason"] = finish
            choice["stop_reason"] = state.stop_reason
        yield chunk([choice])
    options = req.stream_options or {}
    if options.get("include_usage"):
        yield chunk([], usage=_usage(states))


def _completion_logprobs(
    server: EngineServer, entries: list[tuple[int, float, list[tuple[int, float]]]], offset: int
) -> dict[str, Any]:
    tokens = [server.token_text(t) for t, _, _ in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [{server.token_text(i): v for i, v in top} for _, _, top in entries],
        "text_offset": offsets,
    }


def _completion_response(
    server: EngineServer, req: CompletionRequest, states: list[_ChoiceState], meta: _Meta
) -> dict[str, Any]:
    choices = []
    for s in states:
        choice: dict[str, Any] = {
            "index": s.index,
            "text": s.text,
            "logprobs": _completion_logprobs(server, s.logprobs, 0) if req.logprobs is not None else None,
            "finish_reason": s.finish_reason,
            "stop_reason": s.stop_reason,
        }
        if req.return_token_ids:
            choice["prompt_token_ids"] = s.prompt_ids
            choice["token_ids"] = s.token_ids
        choices.append(choice)
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": _usage(states),
    }


async def _completion_stream(
    server: EngineServer,
    req: CompletionRequest,
    states: list[_ChoiceState],
    events: asyncio.Queue[tuple[int, Event]],
    meta: _Meta,
) -> AsyncIterator[dict[str, Any]]:
    by_index = {s.index: s for s in states}
    pending = set(by_index)
    sent_tokens = {i: 0 for i in by_index}
    first = set(by_index)
    while pending:
        index, event = await events.get()
        state = by_index[index]
        offset = state.sent_text
        delta = server.apply(state, event)
        done = isinstance(event, Finished | Failed)
        new = state.logprobs[sent_tokens[index] :]
        if not (delta or new or done):
            continue
        sent_tokens[index] = len(state.token_ids)
        choice: dict[str, Any] = {"index": index, "text": delta, "logprobs": None, "finish_reason": None}
        if req.logprobs is not None and new:
            choice["logprobs"] = _completion_logprobs(server, new, offset)
        if req.return_token_ids:
            choice["token_ids"] = [t for t, _, _ in new]
            if index in first:
                choice["prompt_token_ids"] = state.prompt_ids
        first.discard(index)
        if done:
            pending.discard(index)
            choice["finish_reason"] = state.finish_reason
            choice["stop_reason"] = state.stop_reason
        yield {
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [choice],
        }
    options = req.stream_options or {}
    if options.get("include_usage"):
        yield {
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [],
            "usage": _usage(states),
        }
