"""`lightloop trainer`: build the trainer from settings and run it until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from lightloop.errors import ConfigError
from lightloop.settings import Settings
from lightloop.trainer.local import LocalBackend, LocalConfig
from lightloop.trainer.loop import Backend, Trainer
from lightloop.trainer.publish import HttpEngine, Publisher

log = logging.getLogger(__name__)


def build(settings: Settings, database_url: str) -> tuple[Trainer, list[HttpEngine]]:
    t = settings.trainer
    policies = {p.name: p for p in settings.policy}
    name = t.policy or settings.policy[0].name
    if name not in policies:
        raise ConfigError(
            f"LIGHTLOOP_TRAINER__POLICY: {name!r} is not a policy model ({', '.join(policies)})"
        )
    policy = policies[name]
    api_key = policy.api_key.get_secret_value() if policy.api_key else None
    engines = [HttpEngine(url, api_key) for url in (t.engines or policy.upstreams)]
    # Agents with adapters of their own are trained beside the policy's, from the same steps.
    agents = {agent: policy.adapter_of(agent) for agent in policy.agents}
    backend = make_backend(settings, list(agents.values()))
    publisher = Publisher(
        name, policy.base_model, settings.checkpoints, engines, t.keep_versions, list(agents.values())
    )
    trainer = Trainer(
        t, name, database_url, backend, publisher, heartbeat=settings.trainer_heartbeat, agents=agents
    )
    return trainer, engines


def make_backend(settings: Settings, adapters: list[str] | None = None) -> Backend:
    """The configured backend, holding the policy's adapter and `adapters` (agents' adapters)."""
    from lightloop.models import load_model, model_folder

    t = settings.trainer
    spec = t.model or settings.engine.model
    if t.backend == "verl":
        from lightloop.trainer.verl_backend import VerlBackend

        return VerlBackend(t, model_folder(spec, settings.model_cache), adapters or ())
    loaded = load_model(spec, settings.model_cache)
    return LocalBackend(
        loaded.model,
        loaded.tokenizer,
        LocalConfig(
            lora_rank=t.lora_rank,
            lora_alpha=t.lora_alpha,
            learning_rate=t.learning_rate,
            clip_ratio=t.clip_ratio,
            tis_cap=t.tis_cap,
            kl_coef=t.kl_coef,
            micro_batch_size=t.micro_batch_size,
            seed=t.seed,
        ),
        adapters or (),
    )


def serve(settings: Settings, database_url: str, max_steps: int | None = None) -> int:
    trainer, engines = build(settings, database_url)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            return await trainer.run(stop, max_steps)
        finally:
            for engine in engines:
                await engine.close()

    return asyncio.run(main())
