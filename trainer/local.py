"""The `local` backend: one process, CPU or one GPU, transformers + peft LoRA.

The base model stays frozen; a LoRA adapter on the attention projections is trained and saved in
PEFT's format, which vLLM and `lightloop engine` load at run time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightloop.trainer.algorithms import policy_loss
from lightloop.trainer.rebuild import Sample

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class LocalConfig:
    lora_rank: int = 8
    lora_alpha: int = 16
    learning_rate: float = 1e-4
    clip_ratio: float = 0.2
    tis_cap: float = 2.0
    kl_coef: float = 0.0
    micro_batch_size: int = 4
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class Padded:
    """A micro-batch, right-padded.

    input_ids [B, L], attention [B, L]; response tensors [B, R]: mask, served, advantages;
    starts[i] = index in input_ids of row i's first response token (its prompt length)."""

    input_ids: torch.Tensor
    attention: torch.Tensor
    mask: torch.Tensor
    served: torch.Tensor
    advantages: torch.Tensor
    temperature: torch.Tensor  # [B, 1, 1]
    starts: list[int]
    lengths: list[int]


def pad(samples: Sequence[Sample], advantages: Sequence[float], pad_id: int) -> Padded:
    b = len(samples)
    length = max(len(s.input_ids) for s in samples)
    width = max(s.response_len for s in samples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention = torch.zeros(b, length, dtype=torch.long)
    mask = torch.zeros(b, width)
    served = torch.zeros(b, width)
    adv = torch.zeros(b, width)
    for i, (s, a) in enumerate(zip(samples, advantages, strict=True)):
        n, r = len(s.input_ids), s.response_len
        input_ids[i, :n] = torch.tensor(s.input_ids)
        attention[i, :n] = 1
        mask[i, :r] = torch.tensor(s.loss_mask, dtype=torch.float32)
        served[i, :r] = torch.tensor(s.logprobs)
        adv[i, :r] = a * mask[i, :r]
    temperature = torch.tensor([s.temperature for s in samples]).view(b, 1, 1)
    return Padded(
        input_ids,
        attention,
        mask,
        served,
        adv,
        temperature,
        [s.prompt_len for s in samples],
        [len(s.input_ids) for s in samples],
    )


def response_logprobs(model: Any, batch: Padded) -> torch.Tensor:
    """log p(token) of every response token under `model`: [B, R] (0 where padded)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention).logits  # [B, L, V]
    logits = logits[:, :-1].float() / batch.temperature  # position t predicts token t + 1
    targets = batch.input_ids[:, 1:]  # [B, L-1]
    token_logprobs = (
        torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    )  # [B, L-1]
    out = torch.zeros_like(batch.mask)
    for i, (start, end) in enumerate(zip(batch.starts, batch.lengths, strict=True)):
        out[i, : end - start] = token_logprobs[i, start - 1 : end - 1]
    return out


class LocalBackend:
    def __init__(self, model: Any, tokenizer: Any, config: LocalConfig) -> None:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(config.seed)
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            target_modules=LORA_TARGETS,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(model, lora)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate)

    def load_adapter(self, path: Path) -> None:
        """Continue from a published version (a restart resumes from the live one)."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        set_peft_model_state_dict(self.model, load_peft_weights(str(path), device="cpu"))

    def save_adapter(self, path: Path) -> None:
        self.model.save_pretrained(str(path))

    def step(self, samples: Sequence[Sample], advantages: Sequence[float]) -> dict[str, float]:
        """One optimiser step over all samples (micro-batched, token-mean over the whole batch)."""
        assert len(samples) == len(advantages) and samples
        total_tokens = sum(sum(s.loss_mask) for s in samples)
        assert total_tokens > 0, "no token to train on"
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        loss_total = 0.0
        size = self.config.micro_batch_size
        for lo in range(0, len(samples), size):
            batch = pad(samples[lo : lo + size], advantages[lo : lo + size], self.pad_id)
            logprobs = response_logprobs(self.model, batch)  # [B, R], with grad
            # One optimiser step per batch: every micro-batch sees the weights of the step's
            # start, so pi_old is pi_theta itself (no second forward pass needed).
            old = logprobs.detach()
            loss, metrics = policy_loss(
                logprobs,
                old,
                batch.served,
                batch.advantages,
                batch.mask,
                clip_ratio=self.config.clip_ratio,
                tis_cap=self.config.tis_cap,
            )
            # The KL to the base model is always measured (token-mean, low-variance estimator):
            # the one number that shows a policy drifting off towards collapse. It costs one
            # forward pass without grad; it is a penalty only with kl_coef > 0 (else it is taken
            # of the detached logprobs, so that no graph is built for it). It is the KL at the
            # step's start: the first step reports 0.
            kl = self._kl(batch, logprobs if self.config.kl_coef > 0 else old)
            if self.config.kl_coef > 0:
                loss = loss + self.config.kl_coef * kl
            share = float(batch.mask.sum()) / total_tokens  # token-mean over the whole batch
            sums["kl_to_base"] = sums.get("kl_to_base", 0.0) + float(kl.detach()) * share
            (loss * share).backward()  # type: ignore[no-untyped-call]
            loss_total += float(loss.detach()) * share
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value * share
            with torch.no_grad():
                gap = ((old - batch.served).abs() * batch.mask).sum() / batch.mask.sum().clamp(min=1)
            sums["serve_train_logprob_gap"] = sums.get("serve_train_logprob_gap", 0.0) + float(gap) * share
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.config.max_grad_norm
        )
        self.optimizer.step()
        return {"loss": loss_total, "grad_norm": float(norm), "tokens": float(total_tokens), **sums}

    def _kl(self, batch: Padded, logprobs: torch.Tensor) -> torch.Tensor:
        from verl.trainer.ppo import core_algos

        with torch.no_grad(), self.model.disable_adapter():
            reference = response_logprobs(self.model, batch)
        kl: torch.Tensor = core_algos.kl_penalty(logprobs, reference, "low_var_kl")  # type: ignore[arg-type]  # [B, R]
        return (kl * batch.mask).sum() / batch.mask.sum().clamp(min=1)
