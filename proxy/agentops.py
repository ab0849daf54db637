"""The two calls of AgentOps' API its SDK makes besides exporting spans, so that an agent traced
with the AgentOps SDK works against lightloop with no AgentOps account and no network:

    agentops.init(api_key=KEY, endpoint=PROXY, exporter_endpoint=PROXY + "/v1/traces")

- `POST /v3/auth/token` `{"api_key"}`: AgentOps trades the key for a token that the SDK then
  sends as `Authorization: Bearer` on its span exports. Here the token is the lightloop key itself,
  so the exports pass the proxy's usual key check; a key lightloop does not know is a 401.
- `POST /v4/logs/upload/` `{"body"}` with a `Trace-Id` header (the trace id in decimal): the
  output the SDK captured during a trace. Kept as a span of that trace (`agentops.logs`), so it
  lands in `spans` with the rest and follows the trace's rollout.

The spans themselves are standard OTLP/HTTP protobuf to `/v1/traces`; they name no rollout, and
join one by the `gen_ai.response.id` of the calls they report (proxy/recorder.py). Measured with
agentops 0.4.21 (README, "Agents' own tracing").
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from lightloop.proxy.errors import BadRequest, RecordingUnavailable, Unauthorized
from lightloop.proxy.http import Scope, Send, header, parse_json_object, respond_json
from lightloop.proxy.keys import Keys
from lightloop.proxy.recorder import Recorder
from lightloop.proxy.spans import new_span_id
from lightloop.store import WriterUnavailable

PROJECT = "lightloop"
LOG_LIMIT = 1_000_000  # characters of captured output kept per upload


async def auth_token(body: bytes, keys: Keys, send: Send) -> int:
    data = parse_json_object(body)
    key = data.get("api_key")
    if not isinstance(key, str) or not key:
        raise BadRequest("api_key must be a non-empty string", param="api_key")
    if await keys.identify(key.encode()) is None:  # Unauthorized for a revoked or made-up one
        raise Unauthorized("the API key is not valid for this proxy")
    await respond_json(send, 200, {"token": key, "project_id": PROJECT, "project_prem_status": "pro"})
    return 200


async def upload_logs(scope: Scope, body: bytes, recorder: Recorder, send: Send) -> int:
    data = parse_json_object(body)
    text = data.get("body")
    if not isinstance(text, str):
        raise BadRequest("body must be a string", param="body")
    raw = header(scope, b"trace-id")
    try:
        trace = int(raw or b"")
    except ValueError:
        raise BadRequest("Trace-Id must be the trace id as a decimal integer") from None
    if not 0 < trace < 2**128:
        raise BadRequest("Trace-Id must be a 128-bit trace id")
    span: dict[str, Any] = {
        "span_id": new_span_id(),
        "trace_id": f"{trace:032x}",
        "name": "agentops.logs",
        "kind": "INTERNAL",
        "start_time": _now(),
        "status_code": "UNSET",
        "attributes": {"agentops.logs": text[:LOG_LIMIT], "agentops.logs.truncated": len(text) > LOG_LIMIT},
        "scope": "agentops",
    }
    span["rollout_id"] = recorder.rollout_of_span(span)
    try:
        await recorder.writer.put("spans", span)
    except WriterUnavailable as exc:
        raise RecordingUnavailable(f"{exc}; retry the request") from None
    await respond_json(send, 200, {})
    return 200


def _now() -> datetime:
    return datetime.fromtimestamp(time.time(), UTC)
