"""A vLLM-shaped stub engine for fault injection and benchmarks: a real HTTP server on a free
loopback port, in a thread of the test process, answering chat and text completions with token
ids and logprobs the way vLLM does (`return_token_ids`), fast and deterministic.

Tests steer it through `script` (what the next requests do) and read what it saw in `requests`
and `disconnected`."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Action:
    """What one request gets: an HTTP status (>= 400: an error body), tool calls, or a stream
    held open after its first chunk until the client hangs up."""

    status: int = 200
    tool_call: bool = False
    hold: bool = False


@dataclass
class StubEngine:
    tokens: int = 8  # completion tokens per answer unless max_tokens is smaller
    script: deque[Action] = field(default_factory=deque)
    default_action: Action = field(default_factory=Action)  # what a request gets past the script
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    traces: list[bytes] = field(default_factory=list)  # OTLP/HTTP bodies received (a collector)
    # Runtime LoRA: the status load_lora_adapter answers, or "hold" to never answer.
    lora_status: int | str = 200
    lora_delay_s: float = 0.0  # how long load_lora_adapter takes to answer (a slow engine)
    refuse_lora: str | None = None  # an adapter name load_lora_adapter refuses (HTTP 500)
    lora_requested: threading.Event = field(default_factory=threading.Event)
    lora_release: threading.Event = field(default_factory=threading.Event)  # ends a "hold"
    adapters: dict[str, str] = field(default_factory=dict)
    port: int = 0
    # The chat reply's text from the request (a model whose answer depends on its prompt); the
    # default is fixed filler text.
    reply: Callable[[dict[str, Any]], str] | None = None
    prompt_tokens: int = 12  # prompt ids per answer (benchmarks use a realistic 1,000)
    # Answers built once per shape and replayed as bytes (benchmarks: the stub's own CPU is then
    # small next to the proxy's it shares the machine with). Only for plain answers.
    cache_answers: bool = False
    _answers: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _next(self) -> Action:
        return self.script.popleft() if self.script else self.default_action

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "text_completion")

    async def _answer(self, request: web.Request, operation: str) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        action = self._next()
        if action.status >= 400:
            return web.json_response(
                {"error": {"message": f"stub failure {action.status}", "type": "stub"}}, status=action.status
            )
        n = int(body.get("n") or 1)
        count = min(int(body.get("max_tokens") or self.tokens), self.tokens)
        seed = len(json.dumps(body.get("messages") or body.get("prompt")))
        prompt_ids = [100 + (seed + i) % 900 for i in range(self.prompt_tokens)]
        model = body.get("model")
        rid = f"chatcmpl-stub{time.time_ns()}"
        key = (operation, bool(body.get("stream")), model, n, count, seed)
        cacheable = self.cache_answers and action == Action() and self.reply is None
        if cacheable and key in self._answers:
            return await self._replay(request, self._answers[key], rid)
        if body.get("stream"):
            if cacheable:
                recorder = _Recorder()
                await self._stream(request, operation, _RID, model, n, count, prompt_ids, action, recorder)
                self._answers[key] = recorder.events
                return await self._replay(request, recorder.events, rid)
            return await self._stream(request, operation, rid, model, n, count, prompt_ids, action)
        choices = []
        for c in range(n):
            ids = [1000 + c * 100 + i for i in range(count)]
            lps = [-0.5 - i / 100 for i in range(count)]
            text = "".join(f" t{i}" for i in ids)
            if operation == "chat" and self.reply is not None:
                text = self.reply(body)
            if operation == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if action.tool_call:
                    message = {"role": "assistant", "content": None, "tool_calls": [_tool_call()]}
                choices.append(
                    {
                        "index": c,
                        "message": message,
                        "logprobs": {
                            "content": [
                                {"token": f"t{i}", "logprob": lp} for i, lp in zip(ids, lps, strict=True)
                            ]
                        },
                        "finish_reason": "tool_calls" if action.tool_call else "length",
                        "token_ids": ids,
                    }
                )
            else:
                choices.append(
                    {
                        "index": c,
                        "text": text,
                        "logprobs": {"tokens": [f"t{i}" for i in ids], "token_logprobs": lps},
                        "finish_reason": "length",
                        "token_ids": ids,
                        "prompt_token_ids": prompt_ids,
                    }
                )
        answer: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion" if operation == "chat" else "text_completion",
            "created": 1,
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": n * count,
                "total_tokens": len(prompt_ids) + n * count,
            },
        }
        if operation == "chat":
            answer["prompt_token_ids"] = prompt_ids
        if cacheable:
            answer["id"] = _RID
            self._answers[key] = json.dumps(answer).encode()
            return await self._replay(request, self._answers[key], rid)
        return web.json_response(answer)

    async def _replay(
        self, request: web.Request, answer: bytes | list[bytes], rid: str
    ) -> web.StreamResponse:
        """A cached answer with this request's id: a body, or a stream's events written 16 at a
        time (a real engine's chunks arrive spread out; the proxy still parses each one)."""
        rid_bytes = rid.encode()
        if isinstance(answer, bytes):
            return web.Response(body=answer.replace(_RID_BYTES, rid_bytes), content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for start in range(0, len(answer), 16):
            await response.write(b"".join(answer[start : start + 16]).replace(_RID_BYTES, rid_bytes))
        await response.write_eof()
        return response

    async def _stream(
        self,
        request: web.Request,
        operation: str,
        rid: str,
        model: Any,
        n: int,
        count: int,
        prompt_ids: list[int],
        action: Action,
        out: _Recorder | None = None,
    ) -> web.StreamResponse:
        response: Any = out or web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        def event(data: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        base = {"id": rid, "object": "chat.completion.chunk", "created": 1, "model": model}
        try:
            await response.write(
                event(
                    {
                        **base,
                        "choices": [
                            {"index": c, "delta": {"role": "assistant", "content": ""}} for c in range(n)
                        ],
                        "prompt_token_ids": prompt_ids,
                    }
                )
            )
            for i in range(count):
                for c in range(n):
                    tid = 1000 + c * 100 + i
                    if action.tool_call and i == 0:
                        delta: dict[str, Any] = {"tool_calls": [{"index": 0, **_tool_call(arguments="")}]}
                    elif action.tool_call:
                        delta = {
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "function": {"arguments": '{"q":' if i == 1 else "1}" if i == 2 else ""},
                                }
                            ]
                        }
                    else:
                        delta = {"content": f" t{tid}"}
                    await response.write(
                        event(
                            {
                                **base,
                                "choices": [
                                    {
                                        "index": c,
                                        "delta": delta,
                                        "logprobs": {
                                            "content": [{"token": f"t{tid}", "logprob": -0.5 - i / 100}]
                                        },
                                        "finish_reason": None,
                                        "token_ids": [tid],
                                    }
                                ],
                            }
                        )
                    )
                if action.hold and i == 0:
                    # Keep the stream open until the client hangs up (aiohttp then cancels us).
                    await asyncio.Event().wait()
            reason = "tool_calls" if action.tool_call else "length"
            await response.write(
                event(
                    {
                        **base,
                        "choices": [
                            {"index": c, "delta": {}, "finish_reason": reason, "token_ids": []}
                            for c in range(n)
                        ],
                    }
                )
            )
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.set()
            raise
        return response

    async def load_lora(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.lora_requested.set()
        if self.lora_status == "hold":
            # Held until the test (another thread) lets it go; polled, since a thread waiting on
            # the event would outlive a test that never lets go and keep the process from exiting.
            while not self.lora_release.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            self.lora_status = 200
        if self.lora_delay_s:
            await asyncio.sleep(self.lora_delay_s)  # the fault injected: a slow engine
        if self.lora_status != 200 or body["lora_name"] == self.refuse_lora:
            return web.json_response(
                {"error": {"message": "stub refuses adapters"}},
                status=int(self.lora_status) if self.lora_status != 200 else 500,
            )
        self.adapters[body["lora_name"]] = body["lora_path"]
        return web.Response(text="Success")

    async def unload_lora(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.adapters.pop(body["lora_name"], None) is None:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        return web.Response(text="Success")

    async def otlp(self, request: web.Request) -> web.Response:
        self.traces.append(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")


_RID = "chatcmpl-stub-cached-answer"
_RID_BYTES = _RID.encode()


class _Recorder:
    """Stands in for a StreamResponse while a stream's events are recorded for replay."""

    def __init__(self) -> None:
        self.events: list[bytes] = []

    async def prepare(self, _request: Any) -> None:
        pass

    async def write(self, data: bytes) -> None:
        self.events.append(data)

    async def write_eof(self) -> None:
        pass


def _tool_call(arguments: str = '{"q":1}') -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_stub(tokens: int = 8) -> Iterator[StubEngine]:
    stub = StubEngine(tokens=tokens, port=free_port())
    app = web.Application()
    app.router.add_post("/v1/chat/completions", stub.chat)
    app.router.add_post("/v1/completions", stub.completions)
    app.router.add_get("/health", stub.health)
    app.router.add_post("/v1/traces", stub.otlp)
    app.router.add_post("/v1/load_lora_adapter", stub.load_lora)
    app.router.add_post("/v1/unload_lora_adapter", stub.unload_lora)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", stub.port).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True, name="stub-engine")
    thread.start()
    assert ready.wait(30), "stub engine did not start"
    try:
        yield stub
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def main() -> None:
    """Run the stub as its own process (benchmarks keep its CPU apart from what they measure)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=12)
    parser.add_argument("--hold", action="store_true", help="Hold every stream open after its first chunk.")
    args = parser.parse_args()
    stub = StubEngine(
        tokens=args.tokens,
        port=args.port,
        default_action=Action(hold=args.hold),
        prompt_tokens=args.prompt_tokens,
        cache_answers=not args.hold,
    )
    # Benchmarks send many calls: keep no per-request history.
    stub.requests = _Discard()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", stub.chat)
    app.router.add_post("/v1/completions", stub.completions)
    app.router.add_get("/health", stub.health)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


class _Discard(list[dict[str, Any]]):
    def append(self, _item: dict[str, Any]) -> None:
        pass


if __name__ == "__main__":
    main()
