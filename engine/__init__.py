"""lightloop.engine: a CPU engine that speaks the part of vLLM's API lightloop uses."""

from lightloop.engine.api import EngineServer, create_app
from lightloop.engine.batcher import Batcher, Choice
from lightloop.engine.errors import BadRequest, EngineError, NotFound
from lightloop.engine.lora import Adapter, LoraRuntime, read_adapter
from lightloop.engine.sampling import SamplingParams, processed_logprobs
from lightloop.engine.server import build, serve

__all__ = [
    "Adapter",
    "BadRequest",
    "Batcher",
    "Choice",
    "EngineError",
    "EngineServer",
    "LoraRuntime",
    "NotFound",
    "SamplingParams",
    "build",
    "create_app",
    "processed_logprobs",
    "read_adapter",
    "serve",
]
