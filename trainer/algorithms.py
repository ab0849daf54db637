"""Advantages and the policy loss, from VERL's `core_algos` (which run on CPU).

Advantages are computed per rollout (one scalar reward each, grouped by `rollouts.group_id`) and
then spread over the trained tokens of every sample the rollout produced, so a rollout split into
several samples still counts once in its group's statistics.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ALGORITHMS = ("grpo", "rloo", "reinforce_plus_plus")


@dataclass(frozen=True)
class Scored:
    rollout_id: str
    group: str
    reward: float


def drop_flat_groups(scored: Sequence[Scored]) -> tuple[list[Scored], int]:
    """Keep groups whose rewards differ (a group that all scored the same teaches nothing to a
    group-relative estimator); the number of groups dropped."""
    by_group: dict[str, list[Scored]] = defaultdict(list)
    for s in scored:
        by_group[s.group].append(s)
    kept: list[Scored] = []
    dropped = 0
    for members in by_group.values():
        rewards = [m.reward for m in members]
        if len(members) > 1 and max(rewards) - min(rewards) > 1e-12:
            kept += members
        else:
            dropped += 1
    return kept, dropped


def rollout_advantages(scored: Sequence[Scored], algorithm: str) -> dict[str, float]:
    """One advantage per rollout, by VERL's outcome estimators."""
    from verl.trainer.ppo import core_algos

    if not scored:
        return {}
    n = len(scored)
    rewards = torch.tensor([[s.reward] for s in scored], dtype=torch.float32)  # [N, 1]
    mask = torch.ones(n, 1)  # [N, 1]: one "token" per rollout carries its reward
    index = np.array([s.group for s in scored], dtype=object)
    if algorithm == "grpo":
        advantages, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index)
    elif algorithm == "rloo":
        advantages, _ = core_algos.compute_rloo_outcome_advantage(rewards, mask, index)
    elif algorithm == "reinforce_plus_plus":
        # REINFORCE++ whitens returns over the batch (its baseline is the batch, not the group).
        from verl.trainer.config import AlgoConfig

        advantages, _ = core_algos.compute_reinforce_plus_plus_outcome_advantage(
            rewards, mask, config=AlgoConfig(gamma=1.0)
        )
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    values = advantages[:, 0].tolist()
    assert all(math.isfinite(v) for v in values), "non-finite advantage"
    return {s.rollout_id: float(v) for s, v in zip(scored, values, strict=True)}


def tis_weights(
    old_logprobs: torch.Tensor, served_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance weights for the serving/training gap: min(pi_old / pi_served, cap)
    per token, 0 where masked, no gradient. All tensors [B, R]."""
    with torch.no_grad():
        return torch.exp(torch.clamp(old_logprobs - served_logprobs, max=math.log(cap))) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    served_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_ratio: float,
    tis_cap: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip, token-mean (VERL's `compute_policy_loss_vanilla`), with truncated importance
    sampling for the gap between serving and training: each token is weighted by
    min(pi_old / pi_served, tis_cap), pi_served being the logprob the engine recorded.

    All tensors [B, R]; `old_logprobs` is the trainer's own at the start of the step (no grad)."""
    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig

    assert logprobs.shape == old_logprobs.shape == served_logprobs.shape == advantages.shape == mask.shape
    config = ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_mini_batch_size=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=clip_ratio,
        clip_ratio_low=clip_ratio,
        clip_ratio_high=clip_ratio,
        loss_agg_mode="token-mean",
        use_torch_compile=False,
    )
    weights = tis_weights(old_logprobs, served_logprobs, mask, tis_cap)
    vanilla: Any = core_algos.get_policy_loss_fn("vanilla")  # type: ignore[no-untyped-call]
    loss, metrics = vanilla(
        old_log_prob=old_logprobs,
        log_prob=logprobs,
        advantages=advantages,
        response_mask=mask,
        loss_agg_mode="token-mean",
        config=config,
        rollout_is_weights=weights,
    )
    metrics = {k.removeprefix("actor/"): float(v) for k, v in metrics.items()}
    metrics["tis_weight_mean"] = float((weights.sum() / mask.sum().clamp(min=1)).item())
    return loss, metrics
