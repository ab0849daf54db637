"""The `verl` backend: VERL's own actor worker (`ActorRolloutRefWorker`, FSDP) trains the LoRA
adapter on claimed batches converted to `DataProto`.

lightloop is the single controller: rollouts come from Postgres, not from VERL's rollout loop, so
the backend drives VERL's worker API directly (`compute_log_prob`, `update_actor`), as VERL's
`ray_trainer` does. One worker runs in the trainer's process (CPU, through `verl_cpu`, or one
GPU); `trainer.verl.nodes` x `gpus_per_node` > 1 runs a Ray worker group of the same class
(the `verl` extra installs Ray). README, "Trainer on GPUs", gives the steps."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightloop.settings import TrainerSettings
from lightloop.trainer.algorithms import tis_weights
from lightloop.trainer.errors import PublishError, TrainerError
from lightloop.trainer.local import LORA_TARGETS
from lightloop.trainer.publish import sha256_manifest
from lightloop.trainer.rebuild import Advantage, Sample
from lightloop.trainer.verl_cpu import use_cpu_platform

_ESTIMATORS = {"grpo": "grpo", "rloo": "rloo", "reinforce_plus_plus": "reinforce_plus_plus"}


def to_dataproto(
    samples: Sequence[Sample],
    advantages: Sequence[Advantage],
    pad_id: int,
    rewards: Sequence[float] | None = None,
    groups: Sequence[str] | None = None,
) -> Any:
    """VERL's layout: prompts left-padded to the longest prompt, responses right-padded.

    input_ids, attention_mask, position_ids: [B, P + R]; prompts [B, P]; responses,
    response_mask, rollout_log_probs, advantages, token_level_rewards: [B, R];
    non-tensors: uid (the group, as VERL's GRPO expects), rollout_id."""
    from verl import DataProto

    b = len(samples)
    rewards = rewards if rewards is not None else [0.0] * b
    groups = groups if groups is not None else [s.rollout_id for s in samples]
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
    adv = torch.zeros(b, r)  # [B, R]
    for i, s in enumerate(samples):
        prompt, response = s.input_ids[: s.prompt_len], s.input_ids[s.prompt_len :]
        prompts[i, p - len(prompt) :] = torch.tensor(prompt)
        prompt_attention[i, p - len(prompt) :] = 1
        responses[i, : len(response)] = torch.tensor(response)
        response_attention[i, : len(response)] = 1
        response_mask[i, : len(response)] = torch.tensor(s.loss_mask, dtype=torch.float32)
        logprobs[i, : len(response)] = torch.tensor(s.logprobs)
        token_rewards[i, len(response) - 1] = rewards[i]  # outcome reward on the last token
        # A number for the whole sample, or one per response position (turn credit).
        adv[i, : len(response)] = (
            torch.as_tensor(advantages[i], dtype=torch.float32) * response_mask[i, : len(response)]
        )
    attention = torch.cat([prompt_attention, response_attention], dim=1)  # [B, P + R]
    position_ids = torch.clamp(torch.cumsum(attention, dim=1) - 1, min=0)
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
            "temperature": torch.tensor([s.temperature for s in samples]),  # [B], per sample
        },
        non_tensors={
            "uid": np.array(list(groups), dtype=object),
            "rollout_id": np.array([s.rollout_id for s in samples], dtype=object),
        },
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
        # The local backend's modules, so both backends write adapters of the same shape.
        f"actor_rollout_ref.model.target_modules=[{','.join(LORA_TARGETS)}]",
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


def verl_config(settings: TrainerSettings, model_folder: Path, *, cpu: bool) -> Any:
    """VERL's `ppo_trainer` config composed with lightloop's settings (Hydra, as `main_ppo` does)."""
    import verl
    from hydra import compose, initialize_config_dir

    v = settings.verl
    overrides = verl_overrides(settings, str(model_folder), gpus_per_node=v.gpus_per_node, nodes=v.nodes)
    overrides += [
        f"actor_rollout_ref.actor.strategy={v.strategy}",
        # Micro-batches packed by tokens, so any batch size works (VERL's dynamic batch size).
        "actor_rollout_ref.actor.use_dynamic_bsz=true",
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true",
        f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={v.max_tokens_per_gpu}",
        f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={v.max_tokens_per_gpu}",
        # Each step is one optimiser step over the whole claimed batch (set per call).
        "actor_rollout_ref.actor.ppo_epochs=1",
    ]
    if cpu or importlib.util.find_spec("flash_attn") is None:
        # FlashAttention 2 is VERL's default; it needs CUDA and the flash-attn package (the `gpu`
        # extra). PyTorch's SDPA is the fallback; VERL's packed batches stay correct with it.
        overrides.append("+actor_rollout_ref.model.override_config.attn_implementation=sdpa")
    if cpu:
        # bf16 on a CPU is slower than fp32 and would put the trainer's logprobs ~1e-2 off the
        # CPU engine's (which serves in fp32).
        overrides += [
            "++actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
            "actor_rollout_ref.actor.fsdp_config.dtype=float32",
            # Memory is not what limits a CPU; recomputing activations would cost a forward pass.
            "actor_rollout_ref.model.enable_gradient_checkpointing=false",
            # Packing a batch into one sequence pays off with FlashAttention's varlen kernels; with
            # SDPA on a CPU it means attention over the whole batch under a block mask.
            "actor_rollout_ref.model.use_remove_padding=false",
        ]
    config_dir = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


class VerlBackend:
    """Trains with VERL's actor worker; the trainer loop drives it like the local backend.

    Per step: pi_old from the workers (one forward: VERL's `compute_log_prob`), truncated IS
    weights min(pi_old / pi_served, tis_cap) against the logprobs recorded at serving time, then
    one `update_actor` over the whole batch (VERL's `ppo_loss`, PPO-clip, token-mean)."""

    def __init__(self, settings: TrainerSettings, model_folder: Path, adapters: Sequence[str] = ()) -> None:
        self.settings = settings
        self.model_folder = model_folder
        # The policy's adapter (None) and the agents' (by name). VERL's actor holds one LoRA
        # adapter, so each gets workers of its own, started on its first use; on GPUs they share
        # one resource pool (colocated, as VERL colocates its roles).
        self._names: list[str | None] = [None, *adapters]
        self._adapters: dict[str | None, Path] = {}
        self._workers: dict[str | None, Any] = {}
        self._pool: Any = None

    def load_adapter(self, path: Path, adapter: str | None = None) -> None:
        """Continue from a published version: VERL loads it when the workers start."""
        self._check(adapter)
        if adapter in self._workers:
            raise TrainerError("the verl backend loads an adapter only before its first step")
        self._adapters[adapter] = path

    def save_adapter(self, path: Path, adapter: str | None = None) -> None:
        """Rank 0 writes the adapter, maybe on another machine; check that what this process sees
        in `path` (a shared volume, perhaps NFS with its client cache) is what it wrote."""
        written = _rank0(self.workers(adapter).export_adapter(str(path)))
        seen = sha256_manifest(path)
        if seen != written:
            raise PublishError(
                f"the adapter the workers wrote is not what the trainer sees in {path} "
                f"(wrote {sorted(written)}, sees {sorted(seen)}); is the checkpoint folder shared?"
            )

    def _check(self, adapter: str | None) -> None:
        if adapter not in self._names:
            raise KeyError(f"no adapter {adapter!r} in this backend (it has {self._names})")

    def workers(self, adapter: str | None = None) -> Any:
        self._check(adapter)
        if adapter not in self._workers:
            v = self.settings.verl
            single = v.nodes * v.gpus_per_node == 1
            if single:
                cpu = _on_cpu(v.device, gpus=torch.cuda.device_count())
            else:
                cpu = _on_cpu(v.device, gpus=_ray_gpus(v.ray_address))
            config = verl_config(self.settings, self.model_folder, cpu=cpu)
            if adapter in self._adapters:
                config.actor_rollout_ref.model.lora_adapter_path = str(self._adapters[adapter])
            if single:
                self._workers[adapter] = _in_process(config.actor_rollout_ref, cpu=cpu)
            else:
                if self._pool is None:
                    self._pool = _ray_pool(v.nodes, v.gpus_per_node, cpu=cpu, groups=len(self._names))
                self._workers[adapter] = _ray_group(config.actor_rollout_ref, self._pool, cpu=cpu)
        return self._workers[adapter]

    def step(
        self, samples: Sequence[Sample], advantages: Sequence[Advantage], adapter: str | None = None
    ) -> dict[str, float]:
        from verl.utils import tensordict_utils as tu

        assert len(samples) == len(advantages) and samples
        workers = self.workers(adapter)
        samples, advantages = _fill(
            samples, advantages, self.settings.verl.nodes * self.settings.verl.gpus_per_node
        )
        data = to_dataproto(samples, advantages, pad_id=0)
        mask = data.batch["response_mask"]  # [B, R]
        tokens = float(mask.sum())
        assert tokens > 0, "no token to train on"
        old = _log_probs(workers, data)  # [B, R]
        served = data.batch["rollout_log_probs"]  # [B, R]
        data.batch["old_log_probs"] = old
        weights = tis_weights(old, served, mask, self.settings.tis_cap)
        data.batch["rollout_is_weights"] = weights
        if self.settings.kl_coef > 0:
            data.batch["ref_log_prob"] = _log_probs(workers, data, base=True)
        b = len(samples)
        batch = _no_padding(data)
        tu.assign_non_tensor(
            batch,
            calculate_entropy=False,
            distillation_use_topk=False,
            distillation_only=False,
            global_batch_size=b,
            mini_batch_size=b,  # one optimiser step per training step, as the local backend
            epochs=1,
            seed=self.settings.seed,
            dataloader_kwargs={"shuffle": False},
            compute_loss=True,
        )
        metrics = tu.get(workers.update_actor(batch), "metrics")
        # The local backend's names (VERL's, without "actor/"), so steps compare across backends.
        names = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl")
        return {
            "loss": _mean(metrics["actor/pg_loss"]),
            "grad_norm": _mean(metrics["grad_norm"]),
            "tokens": tokens,
            **{name: _mean(metrics[f"actor/{name}"]) for name in names if f"actor/{name}" in metrics},
            "tis_weight_mean": float(weights.sum() / tokens),
            "serve_train_logprob_gap": float(((old - served).abs() * mask).sum() / tokens),
        }


def _fill(
    samples: Sequence[Sample], advantages: Sequence[Advantage], workers: int
) -> tuple[list[Sample], list[Advantage]]:
    """Pad the batch to a multiple of the workers (VERL splits it evenly) with copies that carry
    no loss: their mask is zero, so the token-mean over the batch is unchanged."""
    samples, advantages = list(samples), list(advantages)
    while len(samples) % workers:
        blank = samples[0]
        samples.append(replace(blank, loss_mask=[0] * blank.response_len))
        advantages.append(0.0)
    return samples, advantages


def _no_padding(data: Any) -> Any:
    from verl.workers.utils.padding import left_right_2_no_padding

    return left_right_2_no_padding(data.to_tensordict())


def _log_probs(workers: Any, data: Any, *, base: bool = False) -> torch.Tensor:
    """Per-token logprobs of the responses under the current weights (or the base model): [B, R]."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    batch = _no_padding(data)
    tu.assign_non_tensor(batch, calculate_entropy=False, compute_loss=False, no_lora_adapter=base)
    output = workers.compute_log_prob(batch)
    padded: torch.Tensor = no_padding_2_padding(tu.get(output, "log_probs"), batch).float()
    mask: torch.Tensor = data.batch["response_mask"]
    return padded * mask


def _mean(value: Any) -> float:
    """VERL reports a metric as a value or a list (one per micro-batch and rank)."""
    values = value if isinstance(value, list) else [value]
    return float(np.mean([float(v) for v in values]))


def _in_process(config: Any, *, cpu: bool) -> Any:
    """One worker in this process (CPU, or the one GPU), set up the way torchrun would."""
    import os
    import socket

    import torch.distributed as dist

    from lightloop.trainer.verl_worker import LightloopActorWorker

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # VERL's Worker reads its rank and rendezvous from the environment (Ray or torchrun
        # set them); a single in-process worker is rank 0 of 1.
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    worker = LightloopActorWorker(config, "actor", cpu=cpu)
    worker.init_model()
    return worker


def _on_cpu(device: str, *, gpus: float) -> bool:
    """Where the workers run. `auto` looks at the GPUs the workers would get: the driver's own
    for one in-process worker, the Ray cluster's for a group (a RayJob's driver runs on a head
    node without GPUs)."""
    if device == "auto":
        return gpus == 0
    if device == "cuda" and gpus == 0:
        raise TrainerError("LIGHTLOOP_TRAINER__VERL__DEVICE=cuda, but the workers have no GPU")
    return device == "cpu"


def _ray_gpus(address: str | None) -> float:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    return float(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]


def _rank0(result: Any) -> dict[str, str]:
    # In process a worker method returns its value; a Ray group returns one per rank.
    values = result if isinstance(result, list) else [result]
    written: dict[str, str] = values[0]
    assert written, "rank 0 writes the adapter"
    return written


def _ray_pool(nodes: int, per_node: int, *, cpu: bool, groups: int) -> Any:
    """The GPUs (or CPU processes) of every node, shared by `groups` worker groups (one per
    adapter): each worker of a group takes 1/groups of a GPU, as VERL colocates its roles."""
    import ray
    from verl.single_controller.ray import RayResourcePool

    assert ray.is_initialized(), "_ray_gpus() joined the cluster"
    if cpu:
        use_cpu_platform()  # the group asks the platform which Ray resource a worker needs
    return RayResourcePool(process_on_nodes=[per_node] * nodes, use_gpu=not cpu, max_colocate_count=groups)


def _ray_group(config: Any, pool: Any, *, cpu: bool) -> Any:
    """A Ray worker group of the same worker class, one per GPU (or CPU process) on each node."""
    import ray
    from verl.single_controller.ray import RayClassWithInitArgs, RayWorkerGroup

    from lightloop.trainer.verl_worker import LightloopActorWorker

    worker = RayClassWithInitArgs(cls=ray.remote(LightloopActorWorker), config=config, role="actor", cpu=cpu)
    group: Any = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=worker)
    group.init_model()  # methods of the worker class, bound on the group by VERL
    return group
