"""The proxy's exception tree; `lightloop.proxy` turns each into OpenAI-shaped JSON in one place."""

from lightloop.errors import LightloopError


class ProxyError(LightloopError):
    status = 500
    type = "internal_error"


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
