"""VERL's actor worker, plus the one thing lightloop needs that VERL does not expose as a worker
method: the trained LoRA adapter written in PEFT's format, which vLLM and `lightloop engine`
load at run time. Ray imports this module by name in each worker process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.engine_workers import ActorRolloutRefWorker

from lightloop.trainer.publish import sha256_manifest
from lightloop.trainer.verl_cpu import use_cpu_platform


class LightloopActorWorker(ActorRolloutRefWorker):
    def __init__(self, config: Any, role: str = "actor", *, cpu: bool = False) -> None:
        if cpu:
            use_cpu_platform()
            # VERL would ask for "cpu:gloo,<device>:<backend>", which is "cpu:gloo,cpu:gloo" here;
            # the rendezvous comes from the environment (Ray's worker group or the trainer sets it).
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group("gloo")
        super().__init__(config, role)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)  # type: ignore[attr-defined, no-untyped-call, untyped-decorator]
    def export_adapter(self, path: str) -> dict[str, str]:
        """Write adapter_model.safetensors + adapter_config.json to `path` (rank 0 writes; every
        rank takes part, because gathering the sharded LoRA weights is a collective). Returns
        the sha256 of each file rank 0 wrote ({} on the other ranks)."""
        from safetensors.torch import save_file

        assert self.actor is not None, "init_model() builds the actor"
        engine: Any = self.actor.engine  # FSDP's engine takes base_sync_done; the base class does not
        params, peft_config = engine.get_per_tensor_param(base_sync_done=True)
        assert peft_config is not None, "the verl backend trains a LoRA adapter"
        tensors = {_peft_key(name): tensor.detach().to("cpu").contiguous() for name, tensor in params}
        if torch.distributed.get_rank() != 0:
            return {}
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.items()}
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
        for written in folder.iterdir():
            with open(written, "rb") as f:
                os.fsync(f.fileno())  # on a shared volume, other machines read it next
        return sha256_manifest(folder)


def _peft_key(name: str) -> str:
    # PEFT's files name weights without the adapter's name ("lora_A.weight", not
    # "lora_A.default.weight") and under "base_model.model.".
    name = name.replace(".default.", ".")
    return name if name.startswith("base_model.model.") else "base_model.model." + name
