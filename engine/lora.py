"""LoRA adapters served beside the base model, as vLLM's runtime LoRA does.

Adapters are read from PEFT folders (adapter_config.json + adapter weights) and applied by
forward hooks on the base model's linear layers, per batch row: rows of one batch may use
different adapters, or none. The base weights are never modified, so the base model stays
servable and an adapter unloaded while requests still use it keeps serving them: each request
holds its Adapter object, and unloading only removes the name.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightloop.engine.errors import BadRequest, NotFound


@dataclass(eq=False)
class Adapter:
    name: str
    path: Path
    rank: int
    scaling: float
    # module name -> (A [r, in], B [out, r])
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)


def read_adapter(name: str, path: Path, model: nn.Module) -> Adapter:
    """Load and check a PEFT LoRA adapter against `model`; BadRequest when it is not one."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    if not path.is_dir():
        raise BadRequest(f"LoRA adapter path {str(path)!r} does not exist or is not a folder")
    if not (path / "adapter_config.json").is_file():
        raise BadRequest(f"{str(path)!r} is not a PEFT adapter: it has no adapter_config.json")
    if not (path / "adapter_model.safetensors").is_file():
        # peft would fall back to adapter_model.bin, read with torch.load: a pickle, which can
        # run code. Only safetensors are read.
        raise BadRequest(
            f"{str(path)!r} has no adapter_model.safetensors: only safetensors adapters are loaded "
            "(a .bin is a pickle, which can run code when read)"
        )
    try:
        config: Any = PeftConfig.from_pretrained(str(path))
        raw = load_peft_weights(str(path), device="cpu")
    except Exception as exc:  # peft raises ValueError, OSError, KeyError... for broken folders
        raise BadRequest(f"{str(path)!r} is not a readable PEFT adapter: {exc}") from None
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        raise BadRequest(f"{str(path)!r} is a {config.peft_type} adapter; only LoRA is served")
    rank = int(config.r)
    alpha = float(config.lora_alpha)
    scaling = alpha / math.sqrt(rank) if getattr(config, "use_rslora", False) else alpha / rank
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = tensor.float()
    if not pairs:
        raise BadRequest(f"{str(path)!r} holds no LoRA weights")
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_name, ab in pairs.items():
        target = modules.get(module_name)
        if not isinstance(target, nn.Linear) or set(ab) != {"lora_A", "lora_B"}:
            raise BadRequest(
                f"adapter {name!r} targets {module_name!r}, which this model has no linear layer for"
            )
        a, b = ab["lora_A"], ab["lora_B"]
        if a.shape != (rank, target.in_features) or b.shape != (target.out_features, rank):
            raise BadRequest(
                f"adapter {name!r} does not fit {module_name!r}: shapes {tuple(a.shape)}, {tuple(b.shape)}"
            )
        weights[module_name] = (a, b)
    return Adapter(name=name, path=path, rank=rank, scaling=scaling, weights=weights)


class LoraRuntime:
    """The adapters by name, and the hooks that apply them to the rows of each forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._adapters: dict[str, Adapter] = {}
        self._lock = threading.Lock()
        # Set by the batcher (its thread only) before each forward: the adapter of every row.
        self.row_adapters: list[Adapter | None] = []
        # Hooks go on every linear layer up front: adding hooks later, while the engine thread
        # runs a forward pass, would race with it.
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(self._hook(name))

    def get(self, name: str) -> Adapter | None:
        return self._adapters.get(name)

    def names(self) -> list[Adapter]:
        return list(self._adapters.values())

    def add(self, adapter: Adapter) -> None:
        with self._lock:
            if adapter.name in self._adapters:
                raise BadRequest(f"The lora adapter '{adapter.name}' has already been loaded.")
            self._adapters[adapter.name] = adapter

    def remove(self, name: str) -> Adapter:
        with self._lock:
            adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise NotFound(f"The lora adapter '{name}' cannot be found.")
        return adapter

    def _hook(self, module_name: str) -> Any:
        def apply(
            module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor | None:
            rows = self.row_adapters
            if not any(rows):
                return None
            x = inputs[0]  # [B, T, in]
            for adapter in {a for a in rows if a is not None}:
                ab = adapter.weights.get(module_name)
                if ab is None:
                    continue
                a, b = ab
                idx = [i for i, r in enumerate(rows) if r is adapter]
                delta = (x[idx] @ a.T) @ b.T * adapter.scaling  # [b, T, out]
                output[idx] += delta
            return output

        return apply
