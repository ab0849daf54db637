"""Sampling, without I/O: the distribution a token is drawn from, and its logprobs.

Logprobs are those of the distribution actually sampled from, as vLLM gives them with
`--logprobs-mode processed_logprobs`: after temperature and top-p. Greedy decoding
(temperature 0) reports the log-softmax of the raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def processed_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probabilities of the sampling distribution. logits: [B, V] -> [B, V] (float32)."""
    logits = logits.float()
    if temperature > 0.0 and temperature != 1.0:
        logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    if temperature > 0.0 and top_p < 1.0:
        # Keep the smallest set of tokens whose probability reaches top_p; renormalise over it.
        sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True)
        cumulative = sorted_lp.exp().cumsum(dim=-1)
        drop_sorted = (cumulative - sorted_lp.exp()) >= top_p  # the first token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logprobs = torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)
    return logprobs


def sample(logprobs: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> int:
    """One token id from a [V] row of processed logprobs."""
    if greedy:
        return int(torch.argmax(logprobs).item())
    return int(torch.multinomial(logprobs.exp(), 1, generator=generator).item())


def top_k(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) of a [V] row, most likely first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, k)
    return [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Index of the earliest stop string that ends at or after `start` (new text), or None."""
    best: int | None = None
    for stop in stops:
        # A stop string can straddle the old and new text.
        at = text.find(stop, max(0, start - len(stop) + 1))
        if at != -1 and (best is None or at < best):
            best = at
    return best
