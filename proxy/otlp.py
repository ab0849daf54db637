"""OTLP/HTTP trace ingest: `ExportTraceServiceRequest` as protobuf or JSON (optionally gzip'd)
into `spans` rows. Pure functions, no I/O.

Protobuf is turned into the OTLP JSON shape first, so one converter serves both; the only
difference is ids, base64 in protobuf's JSON mapping and hex in OTLP/JSON.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from lightloop.proxy.errors import BadRequest, PayloadTooLarge
from lightloop.proxy.http import parse_json_object

PROTOBUF = b"application/x-protobuf"

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# zlib's window bits: 16 + MAX_WBITS reads a gzip member, MAX_WBITS a zlib stream (HTTP's deflate).
_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


def decompress(body: bytes, encoding: bytes | None, limit: int | None = None) -> bytes:
    """The body without its Content-Encoding, at most `limit` bytes once decompressed: the raw
    body's limit holds for what it expands to (a gzip bomb is a 413, not a process killed for
    its memory)."""
    if not encoding or encoding.lower() == b"identity":
        return body
    wbits = _WBITS.get(encoding.lower())
    if wbits is None:
        raise BadRequest(f"unsupported Content-Encoding {encoding.decode(errors='replace')!r} (use gzip)")
    inflate = zlib.decompressobj(wbits)
    try:
        # max_length stops inflating one byte past the limit, whatever the ratio.
        out = inflate.decompress(body, 0 if limit is None else limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"the body is not valid {encoding.decode(errors='replace')}: {exc}") from None
    if limit is not None and len(out) > limit:
        raise PayloadTooLarge(
            f"the {encoding.decode(errors='replace')} body expands past the limit of {limit} bytes"
        )
    if not inflate.eof:
        raise BadRequest(f"the body is not valid {encoding.decode(errors='replace')}: it is cut short")
    return out


def decode(body: bytes, content_type: bytes | None) -> tuple[list[dict[str, Any]], bool]:
    """(span rows, whether the request was protobuf)."""
    media = (content_type or b"").split(b";")[0].strip().lower()
    if media == PROTOBUF:
        request = trace_service_pb2.ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise BadRequest(f"the body is not an OTLP ExportTraceServiceRequest: {exc}") from None
        return _spans(json_format.MessageToDict(request), ids_base64=True), True
    if media == b"application/json":
        return _spans(parse_json_object(body), ids_base64=False), False
    raise BadRequest("Content-Type must be application/x-protobuf or application/json (OTLP/HTTP)")


def _spans(data: dict[str, Any], *, ids_base64: bool) -> list[dict[str, Any]]:
    """The one boundary for a body of the wrong shape (a list where an object belongs, a number
    that is not one): the sender's error, a 400 naming it, never a 500."""
    try:
        return spans_from_json(data, ids_base64=ids_base64)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError, OSError) as exc:
        raise BadRequest(
            f"the body is not a valid OTLP ExportTraceServiceRequest: {type(exc).__name__}: {exc}"
        ) from None


def encode_response(protobuf: bool) -> tuple[bytes, bytes]:
    """The (content type, body) of a success answer, in the request's encoding."""
    if protobuf:
        return PROTOBUF, trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
    return b"application/json", b"{}"


def _id(value: Any, size: int, what: str, ids_base64: bool) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"a span has no {what}")
    try:
        raw = base64.b64decode(value, validate=True) if ids_base64 else bytes.fromhex(value)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} {value[:40]!r} is not {'base64' if ids_base64 else 'hex'}") from None
    if len(raw) != size or raw == bytes(size):
        raise BadRequest(f"{what} {value[:40]!r} must be {size} bytes and not all zero")
    return raw.hex()


def _value(v: Any) -> Any:
    if not isinstance(v, dict):
        return None
    if "stringValue" in v:
        return v["stringValue"]
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "intValue" in v:
        value = int(v["intValue"])
        if not _INT64_MIN <= value <= _INT64_MAX:  # OTLP's intValue is an int64
            raise BadRequest(f"intValue {str(value)[:40]} is outside the 64-bit range")
        return value
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "arrayValue" in v:
        return [_value(x) for x in (v["arrayValue"] or {}).get("values", [])]
    if "kvlistValue" in v:
        return attributes((v["kvlistValue"] or {}).get("values", []))
    if "bytesValue" in v:
        return v["bytesValue"]
    return None


def attributes(items: Any) -> dict[str, Any]:
    if not isinstance(items, list):
        return {}
    return {str(kv["key"]): _value(kv.get("value")) for kv in items if isinstance(kv, dict) and "key" in kv}


def _time(value: Any) -> datetime | None:
    if value in (None, "", 0, "0"):
        return None
    try:
        return datetime.fromtimestamp(int(value) / 1e9, UTC)
    except (TypeError, ValueError, OverflowError, OSError):  # OSError: a year past 9999
        raise BadRequest(f"time {str(value)[:40]!r} is not nanoseconds since the epoch") from None


def _enum(value: Any, names: dict[int, str], prefix: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, int):
        return names.get(value, str(value))
    return str(value).removeprefix(prefix)


def _str_or_none(value: Any) -> str | None:
    """A text column's value from an attribute of any type."""
    return None if value is None or value == "" else str(value)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def spans_from_json(data: dict[str, Any], *, ids_base64: bool) -> list[dict[str, Any]]:
    rows = []
    for resource_spans in data.get("resourceSpans") or []:
        resource = attributes((resource_spans.get("resource") or {}).get("attributes"))
        for scope_spans in resource_spans.get("scopeSpans") or []:
            scope = (scope_spans.get("scope") or {}).get("name")
            for s in scope_spans.get("spans") or []:
                if not isinstance(s, dict):
                    raise BadRequest("a span must be a JSON object")
                attrs = attributes(s.get("attributes"))
                start = _time(s.get("startTimeUnixNano"))
                if start is None:
                    raise BadRequest(f"span {s.get('name')!r} has no startTimeUnixNano")
                parent = s.get("parentSpanId")
                status = s.get("status") or {}
                rollout = attrs.get("lightloop.rollout.id") or resource.get("lightloop.rollout.id")
                rows.append(
                    {
                        "span_id": _id(s.get("spanId"), 8, "spanId", ids_base64),
                        "trace_id": _id(s.get("traceId"), 16, "traceId", ids_base64),
                        "parent_span_id": _id(parent, 8, "parentSpanId", ids_base64) if parent else None,
                        "name": str(s.get("name") or ""),
                        "kind": _enum(s.get("kind"), _KINDS, "SPAN_KIND_"),
                        "start_time": start,
                        "end_time": _time(s.get("endTimeUnixNano")),
                        "status_code": _enum(status.get("code"), _STATUS, "STATUS_CODE_") or "UNSET",
                        "status_message": _str_or_none(status.get("message")),
                        "attributes": attrs,
                        "events": [
                            {
                                "name": e.get("name"),
                                "time": str(_time(e.get("timeUnixNano")) or ""),
                                "attributes": attributes(e.get("attributes")),
                            }
                            for e in s.get("events") or []
                            if isinstance(e, dict)
                        ]
                        or None,
                        "resource": resource or None,
                        "scope": _str_or_none(scope),
                        "rollout_id": str(rollout) if rollout is not None else None,
                        "model": _str_or_none(
                            attrs.get("gen_ai.request.model") or attrs.get("gen_ai.response.model")
                        ),
                        "input_tokens": _int_or_none(attrs.get("gen_ai.usage.input_tokens")),
                        "output_tokens": _int_or_none(attrs.get("gen_ai.usage.output_tokens")),
                    }
                )
    return rows
