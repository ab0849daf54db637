"""The `verl` backend's CPU-testable half: claimed batches as VERL `DataProto`, and the Hydra
overrides that configure VERL's Ray PPO trainer (`python -m verl.trainer.main_ppo`) for many GPUs
and nodes with the same algorithm settings as the local backend.

The GPU run itself needs GPUs, Ray and vLLM (the `gpu` and `verl` extras); README, "Trainer on
GPUs", gives the steps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lightloop.settings import TrainerSettings
from lightloop.trainer.rebuild import Sample

_ESTIMATORS = {"grpo": "grpo", "rloo": "rloo", "reinforce_plus_plus": "reinforce_plus_plus"}


def to_dataproto(
    samples: Sequence[Sample],
    advantages: Sequence[float],
    rewards: Sequence[float],
    groups: Sequence[str],
    pad_id: int,
) -> object:
    """VERL's layout: prompts left-padded to the longest prompt, responses right-padded.

    input_ids, attention_mask, position_ids: [B, P + R]; prompts [B, P]; responses,
    response_mask, rollout_log_probs, advantages, token_level_rewards: [B, R];
    non-tensors: uid (the group, as VERL's GRPO expects), rollout_id."""
    from verl import DataProto

    b = len(samples)
    assert b == len(advantages) == len(rewards) == len(groups) and b > 0
    p = max(s.prompt_len for s in samples)
    r = max(s.response_len for s in samples)
    prompts = torch.full((b, p), pad_id, dtype=torch.long)
    responses = torch.full((b, r), pad_id, dtype=torch.long)
    prompt_attention = torch.zeros(b, p, dtype=torch.long)
    response_attention = torch.zeros(b, r, dtype=torch.long)
    response_mask = torch.zeros(b, r)
    logprobs = torch.zeros(b, r)
    token_rewards = torch.zeros(b, r)
    for i, s in enumerate(samples):
        prompt, response = s.input_ids[: s.prompt_len], s.input_ids[s.prompt_len :]
        prompts[i, p - len(prompt) :] = torch.tensor(prompt)
        prompt_attention[i, p - len(prompt) :] = 1
        responses[i, : len(response)] = torch.tensor(response)
        response_attention[i, : len(response)] = 1
        response_mask[i, : len(response)] = torch.tensor(s.loss_mask, dtype=torch.float32)
        logprobs[i, : len(response)] = torch.tensor(s.logprobs)
        token_rewards[i, len(response) - 1] = rewards[i]  # outcome reward on the last token
    attention = torch.cat([prompt_attention, response_attention], dim=1)  # [B, P + R]
    position_ids = torch.clamp(torch.cumsum(attention, dim=1) - 1, min=0)
    adv = torch.tensor(list(advantages), dtype=torch.float32).unsqueeze(1) * response_mask  # [B, R]
    return DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": attention,
            "position_ids": position_ids,
            "response_mask": response_mask,
            "rollout_log_probs": logprobs,
            "advantages": adv,
            "token_level_rewards": token_rewards,
        },
        non_tensors={
            "uid": np.array(list(groups), dtype=object),
            "rollout_id": np.array([s.rollout_id for s in samples], dtype=object),
        },
        meta_info={"temperature": samples[0].temperature},
    )


def verl_overrides(
    settings: TrainerSettings, model_path: str, *, gpus_per_node: int, nodes: int
) -> list[str]:
    """Hydra overrides for VERL's `ppo_trainer` config matching lightloop's trainer settings."""
    return [
        f"algorithm.adv_estimator={_ESTIMATORS[settings.algorithm]}",
        f"algorithm.norm_adv_by_std_in_grpo={'true' if settings.algorithm == 'grpo' else 'false'}",
        f"actor_rollout_ref.model.path={model_path}",
        f"actor_rollout_ref.model.lora_rank={settings.lora_rank}",
        f"actor_rollout_ref.model.lora_alpha={settings.lora_alpha}",
        "actor_rollout_ref.model.target_modules=all-linear",
        f"actor_rollout_ref.actor.optim.lr={settings.learning_rate}",
        f"actor_rollout_ref.actor.clip_ratio={settings.clip_ratio}",
        "actor_rollout_ref.actor.loss_agg_mode=token-mean",
        f"actor_rollout_ref.actor.use_kl_loss={'true' if settings.kl_coef > 0 else 'false'}",
        f"actor_rollout_ref.actor.kl_loss_coef={settings.kl_coef}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={settings.micro_batch_size}",
        "actor_rollout_ref.rollout.name=vllm",
        f"trainer.n_gpus_per_node={gpus_per_node}",
        f"trainer.nnodes={nodes}",
        "trainer.logger=[console]",
    ]
