"""The `local` backend: one process, CPU or one GPU, transformers + peft LoRA.

The base model stays frozen; a LoRA adapter on the attention projections is trained and saved in
PEFT's format, which vLLM and `lightloop engine` load at run time."""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightloop.trainer.algorithms import policy_loss
from lightloop.trainer.rebuild import Advantage, Sample

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
    # Run a micro-batch's common prompt prefix once (a GRPO group's tries share their prompt).
    share_prefix: bool = True
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class MicroBatch:
    """Up to `micro_batch_size` samples that share their first P tokens (P may be 0).

    The shared prefix is run once, and its KV cache is repeated for every row: the tries of one
    GRPO group share their whole prompt, so on an agent's long prompt and short answers most of the
    forward and backward pass is done once per group instead of once per try.

    prefix [1, P]; rest [B, C] = input_ids[P:], right-padded; attention [B, P + C];
    response tensors [B, R]: mask, served, advantages; temperature [B, 1, 1];
    predictors [B, R]: the index in `rest` of the position whose logits predict each response
    token (0 where padded)."""

    prefix: torch.Tensor
    rest: torch.Tensor
    attention: torch.Tensor
    mask: torch.Tensor
    served: torch.Tensor
    advantages: torch.Tensor
    temperature: torch.Tensor
    predictors: torch.Tensor
    valid: torch.Tensor  # [B, R]: 1 for the row's response tokens, 0 for padding

    @property
    def prefix_len(self) -> int:
        return int(self.prefix.shape[1])


def shared_prefix(samples: Sequence[Sample]) -> int:
    """The length of the samples' common prefix, at most the shortest prompt less one token: the
    logits that predict the first response token then come from the rest, for every row."""
    limit = min(s.prompt_len for s in samples) - 1
    first = samples[0].input_ids
    n = 0
    while n < limit and all(s.input_ids[n] == first[n] for s in samples[1:]):
        n += 1
    return max(n, 0)


def micro_batches(samples: Sequence[Sample], size: int) -> list[list[int]]:
    """Sample indices in micro-batches of at most `size`, samples with equal prompts together
    (sorted by token ids, so the longest common prefixes are neighbours). Pure."""
    order = sorted(range(len(samples)), key=lambda i: samples[i].input_ids)
    return [order[lo : lo + size] for lo in range(0, len(order), size)]


def pad(
    samples: Sequence[Sample], advantages: Sequence[Advantage], pad_id: int, share: bool = True
) -> MicroBatch:
    b = len(samples)
    p = shared_prefix(samples) if share else 0
    length = max(len(s.input_ids) for s in samples) - p
    width = max(s.response_len for s in samples)
    rest = torch.full((b, length), pad_id, dtype=torch.long)
    attention = torch.zeros(b, p + length, dtype=torch.long)
    attention[:, :p] = 1
    mask = torch.zeros(b, width)
    served = torch.zeros(b, width)
    adv = torch.zeros(b, width)
    predictors = torch.zeros(b, width, dtype=torch.long)
    valid = torch.zeros(b, width)
    for i, (s, a) in enumerate(zip(samples, advantages, strict=True)):
        n, r = len(s.input_ids), s.response_len
        rest[i, : n - p] = torch.tensor(s.input_ids[p:])
        attention[i, p:n] = 1
        mask[i, :r] = torch.tensor(s.loss_mask, dtype=torch.float32)
        served[i, :r] = torch.tensor(s.logprobs)
        adv[i, :r] = torch.as_tensor(a, dtype=torch.float32) * mask[i, :r]  # a: a number or [r]
        # Position t predicts token t + 1: response token j (absolute prompt_len + j) comes
        # from absolute position prompt_len + j - 1, which is rest index that minus p.
        predictors[i, :r] = torch.arange(r) + s.prompt_len - 1 - p
        valid[i, :r] = 1
    temperature = torch.tensor([s.temperature for s in samples]).view(b, 1, 1)
    prefix = torch.tensor([samples[0].input_ids[:p]], dtype=torch.long).view(1, p)
    return MicroBatch(prefix, rest, attention, mask, served, adv, temperature, predictors, valid)


def response_logprobs(model: Any, batch: MicroBatch) -> torch.Tensor:
    """log p(token) of every response token under `model`: [B, R] (0 where padded)."""
    b, c = batch.rest.shape
    p = batch.prefix_len
    kwargs: dict[str, Any] = {}
    if p:
        # The prefix once, with grad when the caller has it on (the LoRA weights on k and v shape
        # the cached keys and values); logits_to_keep=1 skips the LM head on it.
        prefix_out = model(input_ids=batch.prefix, use_cache=True, logits_to_keep=1)
        cache = prefix_out.past_key_values
        if b > 1:
            cache.batch_repeat_interleave(b)
        kwargs = {"past_key_values": cache, "use_cache": True}
    positions = (torch.arange(c) + p).unsqueeze(0).expand(b, c)  # [B, C]
    logits = model(
        input_ids=batch.rest, attention_mask=batch.attention, position_ids=positions, **kwargs
    ).logits  # [B, C, V]
    # Only the positions that predict a response token go through log_softmax.
    picked = logits.gather(1, batch.predictors.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # [B, R, V]
    picked = picked.float() / batch.temperature
    targets = batch.rest.gather(1, (batch.predictors + 1).clamp(max=c - 1))  # [B, R]
    token_logprobs = torch.log_softmax(picked, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, R]
    return token_logprobs * batch.valid  # [B, R]


class LocalBackend:
    """The policy's LoRA adapter (`adapter=None`) and one per agent adapter (`adapters`, by name),
    all on one frozen base model, each with its own optimiser: one base model's memory however
    many agents are trained."""

    def __init__(self, model: Any, tokenizer: Any, config: LocalConfig, adapters: Sequence[str] = ()) -> None:
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
        # PEFT's names for the adapters: module keys, so not the adapters' own (they may hold dots).
        self._peft: dict[str | None, str] = {None: "default"}
        for i, name in enumerate(adapters, start=1):
            self._peft[name] = f"agent{i}"
            self.model.add_adapter(f"agent{i}", copy.deepcopy(lora))
        self.model.train()
        self._params = {
            peft: [p for n, p in self.model.named_parameters() if "lora_" in n and f".{peft}." in n]
            for peft in self._peft.values()
        }
        self.optimizers = {
            peft: torch.optim.AdamW(params, lr=config.learning_rate) for peft, params in self._params.items()
        }
        self.use(None)

    def use(self, adapter: str | None) -> str:
        """Make `adapter` the one that runs and trains; its PEFT name."""
        if adapter not in self._peft:
            raise KeyError(f"no adapter {adapter!r} in this backend (it has {sorted(map(str, self._peft))})")
        peft = self._peft[adapter]
        self.model.set_adapter(peft)
        for name, params in self._params.items():
            for p in params:
                p.requires_grad_(name == peft)
        return peft

    def load_adapter(self, path: Path, adapter: str | None = None) -> None:
        """Continue from a published version (a restart resumes from the live one)."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        peft = self._peft[adapter]
        set_peft_model_state_dict(self.model, load_peft_weights(str(path), device="cpu"), adapter_name=peft)

    def save_adapter(self, path: Path, adapter: str | None = None) -> None:
        """PEFT's files for one adapter, in `path` itself (PEFT puts an adapter not named
        `default` in a subfolder of its name)."""
        peft = self._peft[adapter]
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if peft == "default":
            self.model.save_pretrained(str(path), selected_adapters=[peft])
            return
        with tempfile.TemporaryDirectory(dir=path) as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[peft])
            for written in (Path(tmp) / peft).iterdir():
                written.rename(path / written.name)

    def step(
        self, samples: Sequence[Sample], advantages: Sequence[Advantage], adapter: str | None = None
    ) -> dict[str, float]:
        """One optimiser step of `adapter` (the policy's by default) over all samples
        (micro-batched, token-mean over the whole batch)."""
        assert len(samples) == len(advantages) and samples
        total_tokens = sum(sum(s.loss_mask) for s in samples)
        assert total_tokens > 0, "no token to train on"
        peft = self.use(adapter)
        optimizer = self.optimizers[peft]
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        loss_total = 0.0
        for chunk in micro_batches(samples, self.config.micro_batch_size):
            batch = pad(
                [samples[i] for i in chunk],
                [advantages[i] for i in chunk],
                self.pad_id,
                share=self.config.share_prefix,
            )
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
        norm = torch.nn.utils.clip_grad_norm_(self._params[peft], self.config.max_grad_norm)
        optimizer.step()
        return {"loss": loss_total, "grad_norm": float(norm), "tokens": float(total_tokens), **sums}

    def _kl(self, batch: MicroBatch, logprobs: torch.Tensor) -> torch.Tensor:
        from verl.trainer.ppo import core_algos

        with torch.no_grad(), self.model.disable_adapter():
            reference = response_logprobs(self.model, batch)
        kl: torch.Tensor = core_algos.kl_penalty(logprobs, reference, "low_var_kl")  # type: ignore[arg-type]  # [B, R]
        return (kl * batch.mask).sum() / batch.mask.sum().clamp(min=1)
