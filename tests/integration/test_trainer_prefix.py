"""The local backend runs a micro-batch's shared prompt once and repeats its KV cache: the
logprobs and the gradients must be those of running every row whole."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lightloop.models import load_model
from lightloop.trainer.local import LocalBackend, LocalConfig, pad, response_logprobs
from lightloop.trainer.rebuild import Sample


def group(rng: random.Random, name: str, prompt_len: int, tries: int) -> list[Sample]:
    prompt = [rng.randrange(10, 1000) for _ in range(prompt_len)]
    out = []
    for k in range(tries):
        # Multi-turn rows too: context (mask 0) between two trained completions.
        response = [rng.randrange(10, 1000) for _ in range(1 + k * 2)]
        mask = [1] * len(response)
        if k == tries - 1:
            mask[1:3] = [0, 0]
        out.append(Sample(f"{name}-{k}", prompt + response, prompt_len, mask, [-1.0] * len(response)))
    return out


def gradients(
    backend: LocalBackend, samples: list[Sample], share: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    backend.model.zero_grad(set_to_none=True)
    batch = pad(samples, [1.0] * len(samples), backend.pad_id, share=share)
    assert (batch.prefix_len > 0) == share
    logprobs = response_logprobs(backend.model, batch)  # [B, R]
    weights = torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)
    (logprobs * weights).sum().backward()  # type: ignore[no-untyped-call]
    grads = [p.grad.clone() for p in backend.model.parameters() if p.requires_grad and p.grad is not None]
    return logprobs.detach(), grads


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> LocalBackend:
    loaded = load_model("tiny", Path(tmp_path_factory.mktemp("models")))
    backend = LocalBackend(loaded.model, loaded.tokenizer, LocalConfig(lora_rank=4, seed=3))
    # LoRA's B starts at zero, which would leave A without gradient: give both some weight.
    with torch.no_grad():
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return backend


def test_a_shared_prefix_gives_the_same_logprobs_and_gradients(backend: LocalBackend) -> None:
    samples = group(random.Random(1), "g", prompt_len=40, tries=4)
    whole, whole_grads = gradients(backend, samples, share=False)
    shared, shared_grads = gradients(backend, samples, share=True)
    assert pad(samples, [1.0] * 4, backend.pad_id).prefix_len == 39
    # Padding is 0 in both; every response token has a real logprob.
    assert int((whole != 0).sum()) == sum(s.response_len for s in samples)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-4)
    assert len(shared_grads) == len(whole_grads) > 0
    for a, b in zip(shared_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_rows_with_different_prompts_share_what_they_have_in_common(backend: LocalBackend) -> None:
    rng = random.Random(2)
    a = group(rng, "a", prompt_len=30, tries=2)
    b = group(rng, "b", prompt_len=30, tries=2)
    # b's prompt: a's first 20 tokens, then its own, and longer.
    b = [
        Sample(s.rollout_id, a[0].input_ids[:20] + s.input_ids[20:] + [5, 6], 32, s.loss_mask, s.logprobs)
        for s in b
    ]
    for s in b:
        s.input_ids[30:32] = [7, 8]
    samples = a + b
    batch = pad(samples, [1.0] * 4, backend.pad_id)
    assert batch.prefix_len == 20
    whole, whole_grads = gradients(backend, samples, share=False)
    shared, shared_grads = gradients(backend, samples, share=True)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-4)
    for x, y in zip(shared_grads, whole_grads, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-3)
