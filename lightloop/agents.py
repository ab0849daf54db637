"""The user's agent function: loading it from `AGENT` and calling it for one rollout.

The runner's own event loop does only queue I/O (hand-out, heartbeats, finish). Agents run
elsewhere so that an agent that blocks cannot starve the heartbeats that keep its lease: a sync
agent runs in a daemon thread of its own, and async agents share one event loop in a thread of
theirs. An async agent that calls blocking code (a slow first `import openai`, a sync HTTP
client, a model loaded on first use) then delays only other agents, never the runner."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from lightloop.errors import LightloopError
from lightloop.llm import LLM

Agent = Callable[[dict[str, Any], LLM], Any]


class AgentLoadError(LightloopError):
    """AGENT cannot be imported or is not callable (the CLI exits 2)."""


def load_agent(spec: str) -> Agent:
    """`path/to/file.py:function` or `package.module:function`."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise AgentLoadError(
            f"AGENT must be path/to/file.py:function or package.module:function, not {spec!r}"
        )
    try:
        if target.endswith(".py") or os.sep in target:
            path = Path(target)
            if not path.is_file():
                raise AgentLoadError(f"{target}: no such file")
            module_name = f"lightloop_agent_{path.stem}"
            loader = importlib.util.spec_from_file_location(module_name, path)
            if loader is None or loader.loader is None:
                raise AgentLoadError(f"{target}: not a Python file")
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            # Let the agent import modules that sit beside it (appended: a file named like a
            # package it imports must not shadow that package).
            sys.path.append(str(path.resolve().parent))
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except AgentLoadError:
        raise
    except Exception as exc:
        raise AgentLoadError(f"cannot import {target}: {type(exc).__name__}: {exc}") from None
    agent = getattr(module, name, None)
    if agent is None:
        raise AgentLoadError(f"{target} has no {name!r}")
    if not callable(agent):
        raise AgentLoadError(f"{target}:{name} is not callable")
    return agent  # type: ignore[no-any-return]


class AgentCaller:
    """Calls the agent off the caller's loop; `close()` stops the async agents' loop."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    async def call(self, task: dict[str, Any], llm: LLM) -> tuple[float | None, str | None]:
        """(reward, feedback) the agent returned for `task`: a reward alone, or `(reward,
        feedback)` with feedback text for prompt optimisation (None: no reward); its exception,
        if any."""
        if inspect.iscoroutinefunction(self.agent):
            result = await self._on_agent_loop(self.agent(task, llm))
        else:
            result = await _in_daemon_thread(lambda: self.agent(task, llm))
            if inspect.isawaitable(result):
                result = await self._on_agent_loop(_awaited(result))
        if isinstance(result, tuple):
            if len(result) != 2 or not isinstance(result[1], str | None):
                raise TypeError("the agent returned a tuple; return (reward, feedback text) or a reward")
            return _reward(result[0]), result[1]
        return _reward(result), None

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

    def _on_agent_loop(self, coro: Coroutine[Any, Any, Any]) -> Awaitable[Any]:
        # Cancelling the returned future (the runner shutting down) cancels the agent's task.
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._agent_loop()))

    def _agent_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                name = "lightloop-async-agents"
                threading.Thread(target=_serve, args=(loop,), name=name, daemon=True).start()
                self._loop = loop
            return self._loop


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _in_daemon_thread(fn: Callable[[], Any]) -> Awaitable[Any]:
    """Run a sync agent in a daemon thread: a second Ctrl-C can then exit without waiting for it
    (an executor's threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(_set, future, None, exc)
        else:
            loop.call_soon_threadsafe(_set, future, result, None)

    threading.Thread(target=target, name="lightloop-agent", daemon=True).start()
    return future


def _set(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _reward(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"the agent returned {type(value).__name__}; return a float reward or None")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"the agent returned {value}; a reward must be a finite number")
    return number
