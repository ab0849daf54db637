"""Token ids as text for the trainer's view, by the tokenizer of the policy's base model
(lightloop.models.load_tokenizer: smollm2, tiny, a folder, or a Hub id in the local cache). A
policy whose tokenizer this machine does not have (a vLLM model that lives only on the GPU hosts)
gets none, and the view shows ids; the reason is logged, and the load is tried again after
`RETRY_S` (a folder mounted or a model cached later)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RETRY_S = 300.0


class TokenText:
    def __init__(self, cache_dir: Path) -> None:
        self._cache_dir = cache_dir
        # base model -> (tokenizer or None when unavailable, when it was loaded or refused)
        self._tokenizers: dict[str, tuple[Any, float]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def texts(self, base_model: str, ids: list[int]) -> list[str] | None:
        """One string per id, or None where there is no tokenizer (or it cannot decode these
        ids). Blocking: call it from a worker thread."""
        tokenizer = self._tokenizer(base_model)
        if tokenizer is None:
            return None
        try:
            return _decode_each(tokenizer, ids)
        except Exception as exc:  # an id outside the vocabulary, a tokenizer that cannot decode
            log.warning(
                "the trainer's view shows token ids for %s: %s: %s", base_model, type(exc).__name__, exc
            )
            return None

    def _tokenizer(self, base_model: str) -> Any:
        known = self._tokenizers.get(base_model)
        if known is not None and (known[0] is not None or time.monotonic() - known[1] < RETRY_S):
            return known[0]
        with self._guard:
            lock = self._locks.setdefault(base_model, threading.Lock())
        # One load per model at a time; other models' views do not wait on it.
        with lock:
            known = self._tokenizers.get(base_model)
            if known is not None and (known[0] is not None or time.monotonic() - known[1] < RETRY_S):
                return known[0]
            from lightloop.errors import ModelLoadError
            from lightloop.models import load_tokenizer

            try:
                tokenizer = load_tokenizer(base_model, self._cache_dir)
            except ModelLoadError as exc:
                log.warning("the trainer's view shows token ids for %s: %s", base_model, exc)
                tokenizer = None
            self._tokenizers[base_model] = (tokenizer, time.monotonic())
            return tokenizer


def _decode_each(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id's text as it reads inside a sequence. Decoded after a fixed anchor token and cut
    after the anchor's text: SentencePiece decoders (Llama, Mistral, Gemma) drop the leading
    space of a sequence's first token, which decoding each id alone would lose."""
    anchor = [tokenizer.encode("a", add_special_tokens=False)[0]]
    prefix = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    unique = sorted(set(ids))
    decoded = tokenizer.batch_decode([[*anchor, i] for i in unique], clean_up_tokenization_spaces=False)
    texts = {
        i: text[len(prefix) :] if text.startswith(prefix) else text
        for i, text in zip(unique, decoded, strict=True)
    }
    return [texts[i] for i in ids]
