"""The vLLM flags lightloop's configuration needs, so deployments derive them instead of
hard-coding them (`lightloop vllm-args`: compose and Kubernetes pass its output to `vllm serve`).

- `--max-loras`: adapters vLLM runs in one batch. Every adapter of the policy (its own and each
  agent's), and of any other policy served by the same engines, has up to
  `trainer.keep_versions` versions loaded (rollouts pinned to an older one finish on it), and
  any of them may be in the same batch; fewer slots would make vLLM swap adapters in and out
  between batches.
- `--max-lora-rank`: the smallest rank vLLM accepts that holds the trainer's `lora_rank`
  (vLLM sizes its LoRA buffers by it)."""

from __future__ import annotations

from lightloop.errors import ConfigError
from lightloop.settings import PolicyModelSettings, Settings

# The ranks `vllm serve --max-lora-rank` accepts.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def max_loras(policies: list[PolicyModelSettings], keep_versions: int) -> int:
    return sum(len(p.adapters()) for p in policies) * keep_versions


def max_lora_rank(lora_rank: int) -> int:
    for rank in VLLM_LORA_RANKS:
        if rank >= lora_rank:
            return rank
    raise ConfigError(
        f"LIGHTLOOP_TRAINER__LORA_RANK={lora_rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}"
    )


def vllm_args(settings: Settings, policy: str | None = None) -> list[str]:
    """The flags for `vllm serve` serving `policy` (the trainer's, by default) to lightloop."""
    chosen = _policy(settings, policy)
    t = settings.trainer
    return [
        "--enable-lora",
        "--max-lora-rank",
        str(max_lora_rank(t.lora_rank)),
        "--max-loras",
        str(max_loras(_sharing(settings, chosen), t.keep_versions)),
        # The trainer compares its logprobs with those the engine served after temperature.
        "--logprobs-mode",
        "processed_logprobs",
    ]


def _policy(settings: Settings, name: str | None) -> PolicyModelSettings:
    policies = {p.name: p for p in settings.policy}
    name = name or settings.trainer.policy or settings.policy[0].name
    if name not in policies:
        raise ConfigError(f"{name!r} is not a policy model ({', '.join(policies)})")
    return policies[name]


def _sharing(settings: Settings, chosen: PolicyModelSettings) -> list[PolicyModelSettings]:
    """`chosen` and every policy served by one of its engines: their adapters share the slots."""
    engines = _engines(chosen)
    return [p for p in settings.policy if p is chosen or engines & _engines(p)]


def _engines(policy: PolicyModelSettings) -> set[str]:
    # `http://vllm:8000`, `http://vllm:8000/` and `http://vllm:8000/v1` are one engine.
    return {url.rstrip("/").removesuffix("/v1") for url in policy.upstreams}
