"""Token ids as text for the trainer's view, by the tokenizer of the policy's base model
(lightloop.models.load_tokenizer: smollm2, tiny, a folder, or a Hub id in the local cache). A
policy whose tokenizer this machine does not have (a vLLM model that lives only on the GPU hosts)
gets none, and the view shows ids; the reason is logged once."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from lightloop.errors import ModelLoadError

log = logging.getLogger(__name__)


class TokenText:
    def __init__(self, cache_dir: Path) -> None:
        self._cache_dir = cache_dir
        self._tokenizers: dict[str, Any] = {}  # base model -> tokenizer, or None when unavailable
        self._lock = threading.Lock()  # rebuilds run in worker threads; load each tokenizer once

    def texts(self, base_model: str, ids: list[int]) -> list[str] | None:
        """One string per id (each token decoded alone, so a byte split across tokens shows as
        U+FFFD), or None where there is no tokenizer. Blocking: call it from a worker thread."""
        tokenizer = self._tokenizer(base_model)
        if tokenizer is None:
            return None
        unique = sorted(set(ids))
        decoded = dict(
            zip(
                unique,
                tokenizer.batch_decode([[i] for i in unique], clean_up_tokenization_spaces=False),
                strict=True,
            )
        )
        return [decoded[i] for i in ids]

    def _tokenizer(self, base_model: str) -> Any:
        with self._lock:
            if base_model not in self._tokenizers:
                from lightloop.models import load_tokenizer

                try:
                    self._tokenizers[base_model] = load_tokenizer(base_model, self._cache_dir)
                except ModelLoadError as exc:
                    log.warning("the trainer's view shows token ids for %s: %s", base_model, exc)
                    self._tokenizers[base_model] = None
            return self._tokenizers[base_model]
