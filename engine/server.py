"""Run the engine: load the model, start the batcher, serve HTTP until stopped."""

from __future__ import annotations

import logging

import torch
import uvicorn

from lightloop.engine.api import EngineServer, create_app
from lightloop.engine.batcher import Batcher
from lightloop.engine.lora import LoraRuntime
from lightloop.models import load_model
from lightloop.settings import EngineSettings, Settings

log = logging.getLogger(__name__)


def build(settings: Settings) -> tuple[EngineServer, Batcher]:
    engine: EngineSettings = settings.engine
    if engine.threads:
        torch.set_num_threads(engine.threads)
    loaded = load_model(engine.model, settings.model_cache, max_model_len=engine.max_model_len)
    lora = LoraRuntime(loaded.model)
    batcher = Batcher(loaded, lora, max_batch_size=engine.max_batch_size)
    served = engine.served_model_name or engine.model
    server = EngineServer(
        loaded,
        batcher,
        lora,
        served,
        api_key=engine.api_key.get_secret_value() if engine.api_key else None,
        lora_root=(engine.lora_root or settings.checkpoints).resolve(),
        runtime_lora=engine.allow_runtime_lora_updating,
    )
    return server, batcher


def serve(settings: Settings) -> None:
    server, batcher = build(settings)
    batcher.start()
    config = uvicorn.Config(
        create_app(server),
        host=settings.engine.host,
        port=settings.engine.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=5,
    )
    log.info(
        "serving %s as %r on http://%s:%d/v1",
        settings.engine.model,
        server.served_name,
        settings.engine.host,
        settings.engine.port,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        batcher.stop()
