"""Prompts served on the wire: a chat call whose message text equals a registered prompt's
baseline (exact after trimming whitespace) gets that text replaced by the version chosen for its
rollout before either lane sees it, so the model, the recorded request and the inferred session
all see the served text, and the call records which version it was.

The version is the candidate an optimisation run pinned to the rollout (rollouts.prompt_name,
prompt_version: learned at hand-out, or read once per rollout), else the live version. Prompts
and live versions are read at start, then again on each NOTIFY and every `reread_s` (a listener
that went half-open reports nothing). While Postgres is unreachable the proxy serves what it
knew; a call that needs a rollout's pin it cannot read gets a 503 to retry, never a wrong
prompt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from lightloop.proxy.attribution import Attribution, check_id
from lightloop.proxy.errors import NotFound, RecordingUnavailable
from lightloop.proxy.http import Send, respond_json
from lightloop.proxy.routes import Pool, with_db
from lightloop.store import connect
from lightloop.store.prompts import CHANNEL, ServedPrompt, normalise, rollout_pin, served_prompts

log = logging.getLogger(__name__)

_NO_PIN = ("", -1, "")


@dataclass(frozen=True)
class Swap:
    """What was served in place of a baseline."""

    name: str
    version: int


class PromptRegistry:
    def __init__(
        self, url: str, retry_interval_s: float, reread_s: float = 30.0, memory: int = 10_000
    ) -> None:
        self.url = url
        self.retry_interval_s = retry_interval_s
        self.reread_s = reread_s
        self._memory = memory
        self._by_baseline: dict[str, list[ServedPrompt]] = {}
        self._lengths: tuple[int, int] = (0, -1)  # shortest and longest baseline: a cheap filter
        # rollout id -> (name, version, text) pinned, or _NO_PIN; bounded, oldest dropped.
        self._pins: OrderedDict[str, tuple[str, int, str]] = OrderedDict()
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.loaded = asyncio.Event()
        self.changed = asyncio.Event()  # set at every read (tests wait on it)
        self._down = False

    # -- serving -------------------------------------------------------------------------------

    def pin(self, rollout_id: str, pinned: tuple[str, int, str] | None) -> None:
        self._pins[rollout_id] = pinned or _NO_PIN
        self._pins.move_to_end(rollout_id)
        while len(self._pins) > self._memory:
            self._pins.popitem(last=False)

    def text_for(self, name: str) -> ServedPrompt | None:
        for prompts in self._by_baseline.values():
            for p in prompts:
                if p.name == name:
                    return p
        return None

    async def swap(
        self, body: dict[str, Any], model: str, agent: str | None, rollout_id: str | None
    ) -> Swap | None:
        """Replace, in `body`'s messages, each text that is a registered baseline applying to
        this call (by model and agent) with the version chosen for the rollout. Returns the
        first prompt swapped (None: nothing matched; `body` untouched)."""
        if not self._by_baseline:
            return None
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        low, high = self._lengths
        found: Swap | None = None
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                prompt = self._match(content, low, high, model, agent)
                if prompt is not None:
                    version, text = await self.chosen(prompt, rollout_id)
                    messages[i] = {**message, "content": text}
                    found = found or Swap(prompt.name, version)
            elif isinstance(content, list):
                parts = list(content)
                for j, part in enumerate(parts):
                    if (
                        isinstance(part, dict)
                        and part.get("type") == "text"
                        and isinstance(part.get("text"), str)
                    ):
                        prompt = self._match(part["text"], low, high, model, agent)
                        if prompt is not None:
                            version, text = await self.chosen(prompt, rollout_id)
                            parts[j] = {**part, "text": text}
                            found = found or Swap(prompt.name, version)
                if parts != content:
                    messages[i] = {**message, "content": parts}
        return found

    def _match(self, text: str, low: int, high: int, model: str, agent: str | None) -> ServedPrompt | None:
        # Lengths first: most messages are no baseline, and stripping a long one costs a copy.
        if not low <= len(text) or len(text) > high + 4096:
            return None
        for prompt in self._by_baseline.get(normalise(text), ()):
            if (prompt.model is None or prompt.model == model) and (
                prompt.agent is None or prompt.agent == agent
            ):
                return prompt
        return None

    async def chosen(self, prompt: ServedPrompt, rollout_id: str | None) -> tuple[int, str]:
        """(version, text) of `prompt` for the rollout: its pinned candidate, else the live one."""
        if rollout_id is not None:
            pinned = self._pins.get(rollout_id)
            if pinned is None:
                pinned = await self._read_pin(rollout_id)
            if pinned[0] == prompt.name:
                return pinned[1], pinned[2]
        return prompt.live_version, prompt.live_text

    async def _read_pin(self, rollout_id: str) -> tuple[str, int, str]:
        try:
            conn = await connect(self.url, command_timeout=10)
            try:
                pinned = await rollout_pin(conn, rollout_id)
            finally:
                await conn.close()
        except Exception as exc:
            raise RecordingUnavailable(
                f"cannot read which prompt version rollout {rollout_id!r} is to be served ({exc}); retry"
            ) from None
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
        self.loaded.set()
        self.changed.set()

    async def reload(self) -> None:
        conn = await connect(self.url, command_timeout=30)
        try:
            self.set_prompts(await served_prompts(conn))
        finally:
            await conn.close()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lightloop-prompts")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def _run(self) -> None:
        while True:
            conn = None
            closed = asyncio.Event()
            try:
                conn = await connect(self.url)
                conn.add_termination_listener(lambda _c, closed=closed: closed.set())
                await conn.add_listener(CHANNEL, lambda *_: self._dirty.set())
                self.set_prompts(await served_prompts(conn))
                if self._down:
                    log.warning("reading registered prompts again")
                    self._down = False
                while not closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._dirty.wait(), self.reread_s)
                    self._dirty.clear()
                    if not closed.is_set():
                        self.set_prompts(await served_prompts(conn))
                log.warning("lost the prompt listener; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._down:
                    log.warning("cannot read registered prompts (%s); serving what is known", exc)
                self._down = True
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            # Reconnect pacing in a background task, not synchronisation.
            await asyncio.sleep(self.retry_interval_s)


async def prompt_text(
    name: str, attribution: Attribution, registry: PromptRegistry, pool: Pool, send: Send
) -> int:
    """`GET /v1/prompts/{name}`: the text meant for the caller's rollout (the path form or
    X-Lightloop-Rollout names it): its pinned candidate, else the live version."""
    check_id(name, "prompt name")
    prompt = registry.text_for(name)
    if prompt is None:  # registered since the last read: ask Postgres before saying no
        await with_db(pool, lambda conn: _refresh(registry, conn))
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
