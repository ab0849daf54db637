"""lightloop: turn the LLM traffic of real agents into better models."""

from lightloop.errors import ConfigError, LightloopError
from lightloop.settings import EngineSettings, Settings, WriterSettings, load_settings

__all__ = ["ConfigError", "EngineSettings", "LightloopError", "Settings", "WriterSettings", "load_settings"]
__version__ = "0.1.0"
