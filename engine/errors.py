"""The engine's errors. Each carries the HTTP status and OpenAI error type the API answers with;
`lightloop.engine.api` turns them into OpenAI-shaped JSON in one place."""

from lightloop.errors import LightloopError


class EngineError(LightloopError):
    status = 500
    type = "InternalServerError"


class BadRequest(EngineError):
    status = 400
    type = "BadRequestError"


class Forbidden(EngineError):
    status = 403
    type = "PermissionDeniedError"


class NotFound(EngineError):
    status = 404
    type = "NotFoundError"
