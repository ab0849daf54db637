"""Prompts served on the wire: a chat call whose message text equals a registered prompt's
baseline (exact after trimming whitespace) gets that text replaced by the version chosen for its
rollout before either lane sees it, so the model, the recorded request and the inferred session
all see the served text, and the call records which version it was.

The version is the candidate an optimisation run pinned to the rollout, else the live version.
Only an optimisation run's evaluations can be pinned, and their ids carry a prefix of their own
(`p-`, store/prompt_runs.py), so every other call is served from memory with no look-up. A
pinned rollout's text is learned when the queue hands it out, or read once per rollout by the
process its call reaches (several workers or replicas); a pinned prompt applies to the rollout's
calls whatever the prompt's agent or model scope, since its runner sends neither.

Prompts and live versions are read at start, then again on each NOTIFY and every `reread_s` (a
listener that went half-open reports nothing). While Postgres is unreachable the proxy serves
what it knew; an evaluation whose pin it cannot read (or before its first read) gets a 503 to
retry, never a wrong prompt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from lightloop.aio import stop_task
from lightloop.proxy.attribution import Attribution, check_id
from lightloop.proxy.errors import DatabaseDown, NotFound
from lightloop.proxy.http import Send, respond_json
from lightloop.proxy.routes import Pool, with_db
from lightloop.store import connect
from lightloop.store.prompts import CHANNEL, ServedPrompt, normalise, rollout_pin, served_prompts

log = logging.getLogger(__name__)

EVALUATION_PREFIX = "p-"  # the ids store/prompt_runs.py gives an optimisation run's evaluations
_NO_PIN = ("", -1, "")
REFRESH_MIN_S = 1.0  # an unknown name asked for re-reads the prompts at most this often


@dataclass(frozen=True)
class Swap:
    """What was served in place of a baseline."""

    name: str
    version: int


def is_evaluation(rollout_id: str | None) -> bool:
    return rollout_id is not None and rollout_id.startswith(EVALUATION_PREFIX)


class PromptRegistry:
    def __init__(
        self, url: str, pool: Pool, retry_interval_s: float, reread_s: float = 30.0, memory: int = 10_000
    ) -> None:
        self.url = url
        self.pool = pool
        self.retry_interval_s = retry_interval_s
        self.reread_s = reread_s
        self._memory = memory
        self._by_baseline: dict[str, list[ServedPrompt]] = {}
        self._by_name: dict[str, ServedPrompt] = {}
        self._lengths: tuple[int, int] = (0, -1)  # shortest and longest baseline: a cheap filter
        # rollout id -> (name, version, text) pinned, or _NO_PIN; bounded, oldest dropped.
        self._pins: OrderedDict[str, tuple[str, int, str]] = OrderedDict()
        self._reading: dict[str, asyncio.Future[tuple[str, int, str]]] = {}  # one read per rollout
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.loaded = asyncio.Event()
        self.changed = asyncio.Event()  # set at every read (tests wait on it)
        self._read_at = 0.0
        self._down = False

    # -- serving -------------------------------------------------------------------------------

    def pin(self, rollout_id: str, pinned: tuple[str, int, str] | None) -> None:
        self._pins[rollout_id] = pinned or _NO_PIN
        self._pins.move_to_end(rollout_id)
        while len(self._pins) > self._memory:
            self._pins.popitem(last=False)

    def text_for(self, name: str) -> ServedPrompt | None:
        return self._by_name.get(name)

    async def swap(
        self, body: dict[str, Any], model: str, agent: str | None, rollout_id: str | None
    ) -> Swap | None:
        """Replace, in `body`'s messages, each text that is a registered baseline applying to
        this call (by model and agent, or by the rollout's pin) with the version chosen for the
        rollout. Returns the first prompt swapped (None: nothing matched; `body` untouched)."""
        evaluation = is_evaluation(rollout_id)
        if not self.loaded.is_set() and evaluation:
            raise DatabaseDown("the registered prompts are not read yet (Postgres unreachable); retry")
        messages = body.get("messages")
        if not self._by_baseline or not isinstance(messages, list):
            return None
        pinned = await self._pin_of(rollout_id) if evaluation and rollout_id is not None else _NO_PIN
        low, high = self._lengths
        found: Swap | None = None
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                chosen = self._chosen_for(content, low, high, model, agent, pinned)
                if chosen is not None:
                    messages[i] = {**message, "content": chosen[2]}
                    found = found or Swap(chosen[0], chosen[1])
            elif isinstance(content, list):
                parts = list(content)
                for j, part in enumerate(parts):
                    text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
                    if isinstance(text, str):
                        chosen = self._chosen_for(text, low, high, model, agent, pinned)
                        if chosen is not None:
                            parts[j] = {**part, "text": chosen[2]}
                            found = found or Swap(chosen[0], chosen[1])
                if parts != content:
                    messages[i] = {**message, "content": parts}
        return found

    def _chosen_for(
        self, text: str, low: int, high: int, model: str, agent: str | None, pinned: tuple[str, int, str]
    ) -> tuple[str, int, str] | None:
        # Lengths first: most messages are no baseline, and trimming a long one costs a copy.
        if len(text) < low or len(text) > high + 4096:
            return None
        candidates = self._by_baseline.get(normalise(text), ())
        for prompt in candidates:
            if prompt.name == pinned[0]:
                return pinned
        for prompt in candidates:
            if (prompt.model is None or prompt.model == model) and (
                prompt.agent is None or prompt.agent == agent
            ):
                return prompt.name, prompt.live_version, prompt.live_text
        return None

    async def chosen(self, prompt: ServedPrompt, rollout_id: str | None) -> tuple[int, str]:
        """(version, text) of `prompt` for the rollout: its pinned candidate, else the live one."""
        if is_evaluation(rollout_id) and rollout_id is not None:
            pinned = await self._pin_of(rollout_id)
            if pinned[0] == prompt.name:
                return pinned[1], pinned[2]
        return prompt.live_version, prompt.live_text

    async def _pin_of(self, rollout_id: str) -> tuple[str, int, str]:
        known = self._pins.get(rollout_id)
        if known is not None:
            return known
        reading = self._reading.get(rollout_id)
        if reading is None:  # the first call of this rollout here reads; its others wait on it
            reading = asyncio.ensure_future(self._read_pin(rollout_id))
            self._reading[rollout_id] = reading
            reading.add_done_callback(lambda _f: self._reading.pop(rollout_id, None))
        return await asyncio.shield(reading)

    async def _read_pin(self, rollout_id: str) -> tuple[str, int, str]:
        pinned = await with_db(self.pool, lambda conn: rollout_pin(conn, rollout_id))  # DatabaseDown: 503
        self.pin(rollout_id, pinned)
        return pinned or _NO_PIN

    # -- keeping current -----------------------------------------------------------------------

    def set_prompts(self, prompts: list[ServedPrompt]) -> None:
        by_baseline: dict[str, list[ServedPrompt]] = {}
        for p in prompts:
            by_baseline.setdefault(p.baseline, []).append(p)
        # The most specific scope first: agent and model, then one of them, then neither.
        for group in by_baseline.values():
            group.sort(key=lambda p: (p.agent is None) + (p.model is None))
        lengths = [len(b) for b in by_baseline]
        self._lengths = (min(lengths), max(lengths)) if lengths else (0, -1)
        self._by_baseline = by_baseline
        self._by_name = {p.name: p for p in prompts}
        self._read_at = time.monotonic()
        self.loaded.set()
        self.changed.set()

    async def reload(self) -> None:
        conn = await connect(self.url, command_timeout=30)
        try:
            self.set_prompts(await served_prompts(conn))
        finally:
            await conn.close()

    async def refresh_if_stale(self) -> None:
        """Read again, unless a read happened within REFRESH_MIN_S (a name nobody registered,
        asked for in a loop, must not become one read per request)."""
        if time.monotonic() - self._read_at >= REFRESH_MIN_S:
            await with_db(self.pool, lambda conn: _refresh(self, conn))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lightloop-prompts")

    async def close(self) -> None:
        if self._task is not None:
            await stop_task(self._task)

    async def _run(self) -> None:
        while True:
            listener = None
            closed = asyncio.Event()
            try:
                listener = await connect(self.url)
                listener.add_termination_listener(lambda _c, closed=closed: closed.set())
                await listener.add_listener(CHANNEL, lambda *_: self._dirty.set())
                await self.reload()  # over its own connection, with a timeout
                if self._down:
                    log.warning("reading registered prompts again")
                    self._down = False
                while not closed.is_set():
                    await _either(self._dirty.wait(), closed.wait(), wait_s=self.reread_s)
                    self._dirty.clear()
                    if not closed.is_set():
                        await self.reload()  # a failure here reconnects the listener too
                log.warning("lost the prompt listener; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._down:  # once per outage, not once per retry
                    log.warning("cannot read registered prompts (%s); serving what is known", exc)
                self._down = True
            finally:
                if listener is not None:
                    with contextlib.suppress(Exception):
                        await listener.close()
            # Reconnect pacing in a background task, not synchronisation.
            await asyncio.sleep(self.retry_interval_s)


async def _either(first: Awaitable[Any], second: Awaitable[Any], wait_s: float) -> None:
    tasks = {asyncio.ensure_future(first), asyncio.ensure_future(second)}
    try:
        await asyncio.wait(tasks, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def prompt_text(
    name: str, attribution: Attribution, registry: PromptRegistry, pool: Pool, send: Send
) -> int:
    """`GET /v1/prompts/{name}`: the text meant for the caller's rollout (the path form or
    X-Lightloop-Rollout names it): its pinned candidate, else the live version."""
    check_id(name, "prompt name")
    prompt = registry.text_for(name)
    if prompt is None:  # registered since the last read: ask Postgres before saying no
        await registry.refresh_if_stale()
        prompt = registry.text_for(name)
    if prompt is None:
        raise NotFound(f"prompt {name!r} is not registered; add it with `lightloop prompts add`")
    version, text = await registry.chosen(prompt, attribution.rollout_id)
    await respond_json(
        send, 200, {"name": name, "version": version, "text": text, "rollout_id": attribution.rollout_id}
    )
    return 200


async def _refresh(registry: PromptRegistry, conn: Any) -> None:
    registry.set_prompts(await served_prompts(conn))
