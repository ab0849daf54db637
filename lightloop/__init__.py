"""lightloop: turn the LLM traffic of real agents into better models."""

from lightloop.errors import ConfigError, LightloopError, ModelLoadError
from lightloop.llm import LLM
from lightloop.runner import run
from lightloop.settings import EngineSettings, Settings, WriterSettings, load_settings

__all__ = [
    "LLM",
    "ConfigError",
    "EngineSettings",
    "LightloopError",
    "ModelLoadError",
    "Settings",
    "WriterSettings",
    "load_settings",
    "run",
]
__version__ = "0.1.0"
