"""The LiteLLM lane: every model that is not a policy model goes through LiteLLM's router as
usual; this CustomLogger records each call (streamed ones once, when complete) as a span and
`llm_calls` rows, without token ids (other providers do not return them)."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import orjson
from litellm.integrations.custom_logger import CustomLogger

from lightloop.proxy.attribution import Attribution, resolve
from lightloop.proxy.capture import from_response
from lightloop.proxy.errors import ProxyError
from lightloop.proxy.recorder import Recorder

log = logging.getLogger(__name__)

# Set by the app for a call it hands to LiteLLM (path attribution is gone from the URL by then);
# LiteLLM's logging tasks start inside the request and inherit it.
current_attribution: ContextVar[Attribution | None] = ContextVar("lightloop_attribution", default=None)

_OPERATIONS = {
    "acompletion": "chat",
    "completion": "chat",
    "atext_completion": "text_completion",
    "text_completion": "text_completion",
    "aembedding": "embeddings",
    "embedding": "embeddings",
    "aresponses": "chat",
    "responses": "chat",
}


def _ns(value: Any) -> int | None:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1e9)
    if isinstance(value, int | float):
        return int(value * 1e9)
    return None


# Keys LiteLLM adds to the request it logs (auth objects, its own bookkeeping): not the agent's.
_LITELLM_KEYS = frozenset({"metadata", "proxy_server_request", "secret_fields"})


def _json_safe(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value, default=str))


def _agents_request(body: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in body.items() if k not in _LITELLM_KEYS and not k.startswith("litellm_")}
    return dict(_json_safe(kept))


def _dump(obj: Any) -> dict[str, Any] | None:
    if obj is None:
        return None
    data = obj.model_dump() if hasattr(obj, "model_dump") else obj
    return _json_safe(data) if isinstance(data, dict) else None


class RecordingLogger(CustomLogger):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._record(
            kwargs, kwargs.get("complete_streaming_response") or response_obj, start_time, end_time, None
        )

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        exc = kwargs.get("exception")
        error = (type(exc).__name__ if exc is not None else "error", str(exc or "the call failed")[:2000])
        self._record(kwargs, None, start_time, end_time, error)

    def _record(
        self,
        kwargs: dict[str, Any],
        response_obj: Any,
        start_time: Any,
        end_time: Any,
        error: tuple[str, str] | None,
    ) -> None:
        try:
            self._record_unsafe(kwargs, response_obj, start_time, end_time, error)
        except Exception:  # recording must never break LiteLLM's own handling of the call
            log.exception("could not record a LiteLLM-lane call")

    def _record_unsafe(
        self,
        kwargs: dict[str, Any],
        response_obj: Any,
        start_time: Any,
        end_time: Any,
        error: tuple[str, str] | None,
    ) -> None:
        params = kwargs.get("litellm_params") or {}
        proxy_request = params.get("proxy_server_request") or {}
        attribution = current_attribution.get()
        if attribution is None:
            try:
                attribution, _ = resolve("/", proxy_request.get("headers") or {})
            except ProxyError:
                attribution = Attribution(None, "session")
        request = proxy_request.get("body") or {
            k: kwargs[k] for k in ("model", "messages", "input", "prompt") if k in kwargs
        }
        operation = _OPERATIONS.get(str(kwargs.get("call_type", "")), "chat")
        requested = str(request.get("model") or kwargs.get("model") or "")
        logging_object = kwargs.get("standard_logging_object") or {}
        call = self.recorder.open(
            attribution,
            operation=operation,
            provider=str(
                params.get("custom_llm_provider") or logging_object.get("custom_llm_provider") or "litellm"
            ),
            requested_model=requested,
            served_model=str(kwargs.get("model") or requested),
            policy_version=None,
            request=_agents_request(request),
            traceparent=((proxy_request.get("headers") or {}).get("traceparent") or "").encode() or None,
        )
        call.started_ns = _ns(start_time) or call.started_ns
        call.upstream = logging_object.get("api_base") or None
        response = _dump(response_obj)
        outcome = from_response(operation, response) if response is not None and error is None else None
        body = {"error": {"message": error[1], "type": error[0]}} if error else None
        self.recorder.close(
            call, outcome, error=(error[0], error[1], body or {}) if error else None, ended_ns=_ns(end_time)
        )
