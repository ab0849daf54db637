"""Continuous batching on one thread: requests join the running batch at step boundaries,
leave it when they finish or are cancelled, and every decode step runs all of them at once.

The running batch keeps one KV cache, left-padded to a common length; a mask marks the padding
and each row carries its own positions. A new request is prefilled alone (its prompt at once),
then its cache rows are padded and stacked onto the batch's. Events (tokens, finish, error) go
to each request's `emit` callback, which must be thread-safe and must not block.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lightloop.engine.lora import Adapter, LoraRuntime
from lightloop.engine.sampling import SamplingParams, processed_logprobs, sample, top_k
from lightloop.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Token:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of sequence), "length", or "abort"


@dataclass(frozen=True)
class Failed:
    message: str


Event = Token | Finished | Failed


@dataclass(eq=False)
class Choice:
    """One sequence to generate: a request with n=2 is two Choices sharing a prompt."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: Adapter | None
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class _Row:
    choice: Choice
    last_token: int
    position: int  # position id of last_token (prompt length + tokens generated - 1)
    generated: int


class Batcher:
    def __init__(self, loaded: LoadedModel, lora: LoraRuntime, *, max_batch_size: int = 16) -> None:
        self.loaded = loaded
        self.lora = lora
        self.max_batch_size = max_batch_size
        self._inbox: queue.Queue[list[Choice] | None] = queue.Queue()
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [B, L] 1 = real token, 0 = padding
        self._thread = threading.Thread(target=self._loop, name="lightloop-engine", daemon=True)
        # transformers renamed `past_key_values` to `cache` (5.2x); take whichever this one has.
        params = inspect.signature(inspect.unwrap(loaded.model.forward)).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._stopping = False
        self._waiting_count = 0
        self.steps = 0
        # Decode steps whose batch ran rows on different adapters (or the base model beside one):
        # agents with adapters of their own are served side by side, not one after another.
        self.mixed_adapter_steps = 0

    # -- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def submit(self, choices: list[Choice]) -> None:
        """Queue the choices of one request; they are prefilled together (one prompt)."""
        assert choices and all(c.prompt_ids == choices[0].prompt_ids for c in choices)
        self._inbox.put(choices)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return self._inbox.qsize() + self._waiting_count

    # -- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        waiting: list[list[Choice]] = []
        while not self._stopping:
            prefilling: list[Choice] = []
            try:
                self._take(waiting)
                self._drop_cancelled()
                while waiting and len(self._rows) + len(waiting[0]) <= self.max_batch_size:
                    prefilling = waiting.pop(0)
                    self._prefill(prefilling)
                    prefilling = []
                self._waiting_count = len(waiting)
                if self._rows:
                    self._decode()
            except Exception as exc:  # a bug or OOM must fail the requests, not the engine
                log.exception("engine step failed")
                for choice in [*prefilling, *(row.choice for row in self._rows)]:
                    choice.emit(Failed(f"engine error: {exc}"))
                self._rows, self._cache, self._mask = [], None, None

    def _take(self, waiting: list[list[Choice]]) -> None:
        block = not self._rows and not waiting
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            if item is None:
                return
            waiting.append(item)
            block = False

    def _drop_cancelled(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.choice.cancelled.is_set()]
        if len(keep) != len(self._rows):
            for row in self._rows:
                if row.choice.cancelled.is_set():
                    row.choice.emit(Finished("abort"))
            self._select(keep)

    def _prefill(self, choices: list[Choice]) -> None:
        live = [c for c in choices if not c.cancelled.is_set()]
        for c in choices:
            if c.cancelled.is_set():
                c.emit(Finished("abort"))
        if not live:
            return
        from transformers import DynamicCache

        prompt = live[0].prompt_ids
        ids = torch.tensor([prompt], dtype=torch.long)  # [1, P]
        cache = DynamicCache(config=self.loaded.model.config)
        self.lora.row_adapters = [live[0].adapter]
        out = self.loaded.model(input_ids=ids, use_cache=True, **{self._cache_kw: cache})
        logits = out.logits[:, -1, :]  # [1, V]
        new_rows: list[_Row] = []
        for c in live:
            token = self._sample_and_emit(c, logits[0], generated=1)
            if token is not None:
                new_rows.append(_Row(choice=c, last_token=token, position=len(prompt), generated=1))
        if not new_rows:
            return
        if len(new_rows) > 1:
            cache.batch_repeat_interleave(len(new_rows))
        mask = torch.ones((len(new_rows), len(prompt)), dtype=torch.long)
        self._merge(new_rows, cache, mask)

    def _decode(self) -> None:
        assert self._mask is not None
        b = len(self._rows)
        ids = torch.tensor([[r.last_token] for r in self._rows], dtype=torch.long)  # [B, 1]
        positions = torch.tensor([[r.position] for r in self._rows], dtype=torch.long)  # [B, 1]
        mask = torch.cat([self._mask, torch.ones((b, 1), dtype=torch.long)], dim=1)  # [B, L+1]
        self.lora.row_adapters = [r.choice.adapter for r in self._rows]
        if len({a.name if a is not None else None for a in self.lora.row_adapters}) > 1:
            self.mixed_adapter_steps += 1
        out = self.loaded.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kw: self._cache},
        )
        self._mask = mask
        self.steps += 1
        logits = out.logits[:, -1, :]  # [B, V]
        keep: list[int] = []
        for i, row in enumerate(self._rows):
            token = self._sample_and_emit(
                row.choice, logits[i], generated=row.generated + 1, position=row.position + 1
            )
            if token is not None:
                row.last_token, row.position, row.generated = token, row.position + 1, row.generated + 1
                keep.append(i)
        if len(keep) != b:
            self._select(keep)

    def _sample_and_emit(
        self, choice: Choice, logits: torch.Tensor, *, generated: int, position: int | None = None
    ) -> int | None:
        """Sample the next token of `choice`, emit it; the token if the choice goes on, else None."""
        params = choice.params
        lp = processed_logprobs(logits.unsqueeze(0), params.temperature, params.top_p)[0]  # [V]
        token = sample(lp, params.greedy, choice.generator)
        top = top_k(lp, params.top_logprobs) if params.logprobs else []
        choice.emit(Token(token_id=token, logprob=float(lp[token]), top=top))
        if token in self.loaded.eos_token_ids:
            choice.emit(Finished("stop"))
            return None
        next_position = position if position is not None else len(choice.prompt_ids)
        if generated >= params.max_tokens or next_position + 1 >= self.loaded.max_model_len:
            choice.emit(Finished("length"))
            return None
        if choice.cancelled.is_set():
            choice.emit(Finished("abort"))
            return None
        return token

    def _merge(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        assert self._mask is not None
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            old_layer.keys = torch.cat(
                [_pad_left(old_layer.keys, width), _pad_left(new_layer.keys, width)], dim=0
            )
            old_layer.values = torch.cat(
                [_pad_left(old_layer.values, width), _pad_left(new_layer.values, width)], dim=0
            )
        self._mask = torch.cat([_pad_left_2d(self._mask, width), _pad_left_2d(mask, width)], dim=0)
        self._rows = self._rows + rows

    def _select(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        assert self._mask is not None
        index = torch.tensor(keep, dtype=torch.long)
        mask = self._mask[index]
        # Drop the columns that are padding in every remaining row.
        first_real = int((mask.cumsum(dim=1) == 0).sum(dim=1).min().item())
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first_real:, :]
            layer.values = layer.values[index, :, first_real:, :]
        self._mask = mask[:, first_real:]


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, width, D], zeros in front."""
    missing = width - t.shape[2]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros((t.shape[0], t.shape[1], missing, t.shape[3])), t], dim=2)


def _pad_left_2d(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[1]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros((t.shape[0], missing)), t], dim=1)
