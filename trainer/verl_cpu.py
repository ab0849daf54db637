"""VERL on a machine without an accelerator.

VERL 0.9.1 ships CUDA, ROCm and NPU platforms and registers its FSDP engine for `cuda` and `npu`
only. Through VERL's own extension points (`set_platform`, `EngineRegistry.register`) this adds a
CPU platform, so the very worker the GPU path runs (`ActorRolloutRefWorker`, FSDP2 over gloo)
runs here too: the `verl` backend is tested on CPU with VERL's code, not a stand-in."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch

_installed = False


def _device_module() -> types.ModuleType:
    # VERL calls the CUDA module's memory and naming functions; on CPU there is no device memory
    # to report, so they answer zero.
    module = types.ModuleType("lightloop_cpu_device")
    module.__dict__.update({k: getattr(torch.cpu, k) for k in dir(torch.cpu) if not k.startswith("_")})
    for name in ("memory_reserved", "memory_allocated", "max_memory_allocated", "max_memory_reserved"):
        setattr(module, name, lambda *args, **kwargs: 0)
    module.empty_cache = lambda: None  # type: ignore[attr-defined]
    module.mem_get_info = lambda *args: (0, 0)  # type: ignore[attr-defined]
    module.reset_peak_memory_stats = lambda *args: None  # type: ignore[attr-defined]
    module.get_device_name = lambda *args: "CPU"  # type: ignore[attr-defined]
    module.manual_seed = torch.manual_seed  # type: ignore[attr-defined]
    return module


def use_cpu_platform() -> None:
    """Make VERL run on the CPU in this process (idempotent). Call before building a worker."""
    global _installed
    if _installed:
        return
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import set_platform
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    device = _device_module()

    class CpuPlatform(PlatformBase):
        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> types.ModuleType:
            return device

        def is_available(self) -> bool:
            return True

        def current_device(self) -> Any:
            # VERL moves modules to `current_device()`; an int would mean cuda:N.
            return torch.device("cpu")

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            pass

        def synchronize(self, device_index: int | None = None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str) -> Iterator[None]:
            yield

        def profiler_start(self) -> None:
            pass

        def profiler_stop(self) -> None:
            pass

        def ray_resource_name(self) -> str:
            return "CPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    set_platform(CpuPlatform())
    EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")(
        FSDPEngineWithLMHead
    )
    _installed = True
