"""The exception tree shared by lightloop's packages; the CLI turns each into one clear line."""


class LightloopError(Exception):
    """Base of every error lightloop raises on purpose; its message is meant for the user."""


class ConfigError(LightloopError):
    """Settings or the YAML file are invalid."""


class ModelLoadError(LightloopError):
    """The model named (`smollm2`, `tiny`, a folder, or for a tokenizer a Hub id already in the
    local cache) cannot be resolved or loaded."""
