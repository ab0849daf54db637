"""The proxy's exception tree. `lightloop.proxy.http.error_response` turns each into
OpenAI-shaped JSON (`{"error": {"message", "type", "code"}}`) in one place."""

from lightloop.errors import LightloopError


class ProxyError(LightloopError):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        # The request parameter at fault (OpenAI's `error.param`), so a form can mark it.
        self.param = param


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"


class Forbidden(ProxyError):
    """A valid key whose scope does not cover the route (an agent key on an admin route)."""

    status = 403
    type = "permission_error"


class NotFound(ProxyError):
    status = 404
    type = "not_found_error"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"


class Conflict(ProxyError):
    status = 409
    type = "conflict_error"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"


class Unprocessable(ProxyError):
    status = 422
    type = "invalid_request_error"


class TooManyRollouts(ProxyError):
    """The cap on rollouts in flight is reached: finish some first (keeps training data fresh)."""

    status = 429
    type = "rate_limit_error"


class UpstreamFailed(ProxyError):
    """No engine answered (connection refused, reset, timed out): 502."""

    status = 502
    type = "upstream_error"


class UpstreamUnavailable(ProxyError):
    """The engines answered 5xx on every try: 503."""

    status = 503
    type = "upstream_unavailable"


class DatabaseDown(ProxyError):
    """A route that needs an answer from Postgres now (rewards) cannot get one: 503, retry."""

    status = 503
    type = "database_unavailable"


class RecordingUnavailable(ProxyError):
    """The batch writer did not confirm the rows in time (it is failing and being restarted): 503,
    retry; `/health` says why."""

    status = 503
    type = "recording_unavailable"
