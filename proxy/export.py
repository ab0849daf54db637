"""Optional export of the proxy's own spans to an OTLP/HTTP endpoint (a collector, Phoenix,
Jaeger...), with the same ids as the rows in `spans`, batched off the request path."""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

_RESOURCE = Resource.create({"service.name": "lightloop-proxy"})
_SCOPE = InstrumentationScope("lightloop.proxy")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _ns(value: Any) -> int:
    return int(value.timestamp() * 1e9)


def _attribute(value: Any) -> Any:
    # OTel attributes are scalars or lists of one scalar type; anything else travels as text.
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return str(value)


def to_readable_span(row: dict[str, Any]) -> ReadableSpan:
    context = SpanContext(
        int(row["trace_id"], 16), int(row["span_id"], 16), is_remote=False, trace_flags=_SAMPLED
    )
    parent = (
        SpanContext(
            int(row["trace_id"], 16), int(row["parent_span_id"], 16), is_remote=True, trace_flags=_SAMPLED
        )
        if row.get("parent_span_id")
        else None
    )
    status = (
        Status(StatusCode.ERROR, row.get("status_message")) if row["status_code"] == "ERROR" else Status()
    )
    return ReadableSpan(
        name=row["name"],
        context=context,
        parent=parent,
        resource=_RESOURCE,
        attributes={k: _attribute(v) for k, v in row["attributes"].items()},
        kind=SpanKind.CLIENT,
        status=status,
        start_time=_ns(row["start_time"]),
        end_time=_ns(row["end_time"]),
        instrumentation_scope=_SCOPE,
    )


class SpanExport:
    def __init__(self, endpoint: str) -> None:
        self._processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))

    def export(self, row: dict[str, Any]) -> None:
        self._processor.on_end(to_readable_span(row))

    def close(self) -> None:
        self._processor.shutdown()  # type: ignore[no-untyped-call]
