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


def test_each_id_is_decoded_alone_by_the_folders_tokenizer(folder: Path, tmp_path: Path) -> None:
    text = TokenText(tmp_path / "cache")
    assert text.texts(str(folder), [4, 3, 4, 2]) == ["ab", " a", "ab", " "]
    assert AutoTokenizer.from_pretrained(folder).decode([4, 3]) == "ab a"  # the same tokenizer


def test_a_model_with_no_tokenizer_here_gives_ids_only_and_is_tried_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_tokenizer("no-such-org/no-such-model", tmp_path)
    text = TokenText(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert text.texts("no-such-org/no-such-model", [1, 2]) is None
        assert text.texts("no-such-org/no-such-model", [3]) is None
    assert len([r for r in caplog.records if "token ids" in r.getMessage()]) == 1
