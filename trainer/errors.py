"""The trainer's exception tree."""

from lightloop.errors import LightloopError


class TrainerError(LightloopError):
    """Base of the trainer's errors."""


class PublishError(TrainerError):
    """A new version could not be made live on every engine; the previous one stays live."""
