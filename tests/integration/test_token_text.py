"""The trainer view's token text: a tokenizer from a model folder on disk decodes each id alone;
a model this machine has no tokenizer for gives none (ids are shown), and is not retried."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lightloop.errors import ModelLoadError
from lightloop.models import load_tokenizer
from lightloop.proxy.token_text import TokenText


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A byte-level BPE tokenizer with a handful of tokens, saved as a Hugging Face folder."""
    vocab = {"a": 0, "b": 1, "Ġ": 2, "Ġa": 3, "ab": 4}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "a"), ("a", "b")]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)

    inner.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=inner).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_each_id_reads_as_it_does_in_a_sequence(folder: Path, tmp_path: Path) -> None:
    text = TokenText(tmp_path / "cache")
    assert text.texts(str(folder), [4, 3, 4, 2]) == ["ab", " a", "ab", " "]
    assert AutoTokenizer.from_pretrained(folder).decode([4, 3]) == "ab a"  # the same tokenizer


def test_a_sentencepiece_tokenizer_keeps_each_words_space(tmp_path: Path) -> None:
    """Metaspace (Llama, Mistral, Gemma): decoding `▁cat` alone gives "cat"; in a sequence it
    reads " cat", and that is what the view must show."""
    vocab = {"<unk>": 0, "a": 1, "▁the": 2, "▁cat": 3, "s": 4}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Metaspace()
    inner.decoder = decoders.Metaspace()
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>").save_pretrained(tmp_path / "sp")
    assert AutoTokenizer.from_pretrained(tmp_path / "sp").decode([3]) == "cat"  # the trap
    assert TokenText(tmp_path).texts(str(tmp_path / "sp"), [2, 3, 4]) == [" the", " cat", "s"]


def test_ids_a_tokenizer_cannot_decode_give_ids_only(folder: Path, tmp_path: Path) -> None:
    assert TokenText(tmp_path).texts(str(folder), [-1]) is None


def test_a_model_with_no_tokenizer_here_gives_ids_only_and_is_not_retried_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_tokenizer("no-such-org/no-such-model", tmp_path)
    text = TokenText(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert text.texts("no-such-org/no-such-model", [1, 2]) is None
        assert text.texts("no-such-org/no-such-model", [3]) is None
    assert len([r for r in caplog.records if "token ids" in r.getMessage()]) == 1
