"""The engine's incremental detokenizer with SmolLM2's real tokenizer: the text it hands out
piece by piece is the whole completion's decode, for prose, code, accents, CJK and emoji (whose
bytes span tokens), and for random ids; held back only while a character is incomplete."""

from __future__ import annotations

import random
from typing import Any

import pytest

from lightloop.engine.chat import Detokenizer
from lightloop.models import load_tokenizer

TEXTS = [
    "Hello, world! The opposite of 'hot' is cold.",
    "Été — 夏天 🌞 and ünïcödé, split across byte-level tokens.",
    "def f(x):\n    return x ** 2  # comment\n\n\n",
    "   leading spaces\tand tabs",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_tokenizer("tiny", tmp_path_factory.mktemp("models"))


def _streamed(tokenizer: Any, ids: list[int]) -> tuple[str, list[str]]:
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    assert detok.text == "".join(pieces)
    return detok.text, pieces


@pytest.mark.parametrize("text", TEXTS)
def test_the_pieces_make_the_whole_decode(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    streamed, pieces = _streamed(tokenizer, ids)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)  # a split character waits for its last byte


def test_random_ids_give_the_whole_decode_too(tokenizer: Any) -> None:
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 80))]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        streamed, _ = _streamed(tokenizer, ids)
        # What is held back is an incomplete character at the very end, nothing else.
        assert streamed == full or (full.endswith("\ufffd") and full.startswith(streamed)), ids
