"""The verl backend's CPU half: DataProto conversion, and overrides VERL's own config accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightloop.settings import TrainerSettings
from lightloop.trainer.rebuild import Sample
from lightloop.trainer.verl_backend import to_dataproto, verl_overrides


def test_samples_become_a_dataproto_in_verls_layout() -> None:
    samples = [
        Sample("r1", [1, 2, 3, 10, 11, 12], 3, [1, 0, 1], [-0.5, 0.0, -0.7]),
        Sample("r2", [4, 5, 20], 2, [1], [-0.2]),
    ]
    data = to_dataproto(samples, [1.0, -1.0], pad_id=0, rewards=[1.0, 0.0], groups=["g", "g"])
    batch = data.batch  # type: ignore[attr-defined]
    assert batch["prompts"].tolist() == [[1, 2, 3], [0, 4, 5]]  # left-padded
    assert batch["responses"].tolist() == [[10, 11, 12], [20, 0, 0]]  # right-padded
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]]
    assert batch["position_ids"][1].tolist()[:4] == [0, 0, 1, 2]
    assert batch["response_mask"].tolist() == [[1, 0, 1], [1, 0, 0]]
    assert batch["advantages"].tolist() == [[1, 0, 1], [-1, 0, 0]]
    assert batch["token_level_rewards"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert list(data.non_tensor_batch["uid"]) == ["g", "g"]  # type: ignore[attr-defined]
    # VERL's own estimator runs on it as its trainer would.
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    adv, _ = compute_grpo_outcome_advantage(
        batch["token_level_rewards"], batch["response_mask"], data.non_tensor_batch["uid"]
    )  # type: ignore[attr-defined]
    assert torch.sign(adv[:, 0]).tolist() == [1.0, -1.0]


def test_the_overrides_compose_with_verls_ppo_trainer_config() -> None:
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = Path(verl.__file__).parent / "trainer" / "config"
    overrides = verl_overrides(
        TrainerSettings(algorithm="rloo", kl_coef=0.01), "/models/smollm2", gpus_per_node=8, nodes=2
    )
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    assert config.algorithm.adv_estimator == "rloo"
    assert config.actor_rollout_ref.model.lora_rank == 8
    assert config.actor_rollout_ref.actor.use_kl_loss is True
    assert config.trainer.nnodes == 2 and config.trainer.n_gpus_per_node == 8
    assert list(config.actor_rollout_ref.model.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_the_cpu_config_trains_in_fp32_with_token_packed_micro_batches() -> None:
    from lightloop.trainer.verl_backend import verl_config

    settings = TrainerSettings(backend="verl", verl={"max_tokens_per_gpu": 4096, "strategy": "fsdp"})
    config = verl_config(settings, Path("/models/tiny"), cpu=True).actor_rollout_ref
    assert config.model.path == "/models/tiny"
    assert config.model.override_config.attn_implementation == "sdpa"
    assert config.actor.fsdp_config.mixed_precision.param_dtype == "fp32"
    assert config.actor.strategy == "fsdp"
    assert config.actor.use_dynamic_bsz and config.rollout.log_prob_use_dynamic_bsz
    assert config.actor.ppo_max_token_len_per_gpu == 4096
    assert config.model.enable_gradient_checkpointing is False
    # On GPUs VERL's defaults stand (bf16, activation checkpointing); without flash-attn
    # installed (as here) attention falls back to SDPA.
    gpu = verl_config(settings, Path("/models/tiny"), cpu=False).actor_rollout_ref
    assert gpu.actor.fsdp_config.get("mixed_precision") is None
    assert gpu.model.enable_gradient_checkpointing is True
    assert gpu.model.override_config.attn_implementation == "sdpa"


def test_a_batch_is_filled_to_a_multiple_of_the_workers_with_samples_that_carry_no_loss() -> None:
    from lightloop.trainer.verl_backend import _fill

    samples = [Sample(f"r{i}", [1, 2, 3], 2, [1], [-0.5]) for i in range(5)]
    filled, advantages = _fill(samples, [1.0] * 5, workers=4)
    assert len(filled) == 8 and advantages == [1.0] * 5 + [0.0] * 3
    assert [s.loss_mask for s in filled[5:]] == [[0]] * 3
    assert _fill(samples, [1.0] * 5, workers=1)[0] == samples


def test_the_device_follows_the_workers_gpus_not_the_drivers() -> None:
    from lightloop.trainer.errors import TrainerError
    from lightloop.trainer.verl_backend import _on_cpu

    assert _on_cpu("auto", gpus=16) is False  # a RayJob: the driver has none, the workers 16
    assert _on_cpu("auto", gpus=0) is True
    assert _on_cpu("cpu", gpus=8) is True
    assert _on_cpu("cuda", gpus=1) is False
    with pytest.raises(TrainerError, match="no GPU"):
        _on_cpu("cuda", gpus=0)
