"""Rows as Postgres's binary COPY format, built here rather than by asyncpg's per-value codecs.

A call's token ids and logprobs are arrays of a thousand numbers and more; asyncpg encodes every
element in Python, which made the writer's COPY of `llm_calls` cost about 0.3 ms a row. Here an
array is one numpy conversion and one `tobytes()`: the format wants each element as its length
(4) and its big-endian value, which is a structured array of two big-endian int32 fields. The
other columns are packed with struct, a few per row.

A value a column cannot hold (an id past int32, a non-finite logprob, text in an int column)
raises `Unencodable`, a ValueError, before anything is sent: the writer keeps that row aside and
writes the rest (store/writer.py). Non-finite logprobs are refused rather than stored: no engine
returns one for a sampled token, and a NaN in training data poisons a whole step.

Format: https://www.postgresql.org/docs/current/sql-copy.html (Binary Format), arrays as
`array_send` writes them (src/backend/utils/adt/arrayfuncs.c).
"""

from __future__ import annotations

import array
import struct
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import REAL, BigInteger, DateTime, Double, Integer, Text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.types import TypeEngine

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)
_NULL = struct.pack("!i", -1)
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # Postgres's timestamp epoch
_MICROSECOND = timedelta(microseconds=1)
_INT4_OID, _FLOAT4_OID = 23, 700
_INT4 = struct.Struct("!ii")
_INT8 = struct.Struct("!iq")
_FLOAT8 = struct.Struct("!id")
_ARRAY = struct.Struct("!iiiiii")  # byte length, ndim 1, no nulls, element type, count, lower bound 1
_EMPTY_INT4_ARRAY = struct.pack("!iiii", 12, 0, 0, _INT4_OID)
_EMPTY_FLOAT4_ARRAY = struct.pack("!iiii", 12, 0, 0, _FLOAT4_OID)

Encoder = Callable[[Any], bytes]


class Unencodable(ValueError):
    """A value its column cannot hold; `column` is its index when known."""

    column: int | None = None


class NonFinite(Unencodable):
    """A NaN or infinite logprob: the writer stores the call without its logprobs instead."""


def _text(value: Any) -> bytes:
    data: bytes = value.encode()
    return struct.pack("!i", len(data)) + data


def _jsonb(value: Any) -> bytes:
    data: bytes = value  # JSON text as UTF-8 already (store/writer.py's _to_copy)
    return struct.pack("!ib", len(data) + 1, 1) + data  # jsonb's binary form: version 1, then text


def _int4(value: Any) -> bytes:
    return _INT4.pack(4, value)


def _int8(value: Any) -> bytes:
    return _INT8.pack(8, value)


def _float8(value: Any) -> bytes:
    return _FLOAT8.pack(8, value)


def _timestamptz(value: Any) -> bytes:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # as asyncpg takes a naive time for timestamptz
    return _INT8.pack(8, (value - _EPOCH) // _MICROSECOND)


_INT4_ELEMENTS = np.dtype([("length", ">i4"), ("value", ">i4")])
_FLOAT4_ELEMENTS = np.dtype([("length", ">i4"), ("value", ">f4")])


def _int4_array(value: Any) -> bytes:
    if len(value) == 0:
        return _EMPTY_INT4_ARRAY
    # array.array converts in C and checks as it goes: a float, a str or a nested list is a
    # TypeError (numpy would truncate 1.5 to 1 and read "7" as 7), a value past int32 an
    # OverflowError. Its "i" is a C int, 32 bits wherever CPython runs.
    try:
        ids = array.array("i", value)
    except OverflowError:
        raise Unencodable("a token id is outside int4") from None
    except TypeError:
        raise Unencodable("a token id array must be a flat list of integers: not storable") from None
    return _array(np.frombuffer(ids, dtype=np.int32), _INT4_ELEMENTS, _INT4_OID)


def _float4_array(value: Any) -> bytes:
    if len(value) == 0:
        return _EMPTY_FLOAT4_ARRAY
    try:
        numbers = np.frombuffer(array.array("d", value), dtype=np.float64)
    except (TypeError, OverflowError):
        raise Unencodable("a logprob array must be a flat list of numbers: not storable") from None
    if not np.isfinite(numbers).all():
        raise NonFinite("a logprob is not a finite number")
    with np.errstate(over="raise"):
        try:
            single = numbers.astype(np.float32)
        except FloatingPointError:
            raise Unencodable("a logprob is outside float4's range") from None
    return _array(single, _FLOAT4_ELEMENTS, _FLOAT4_OID)


def _array(values: np.ndarray[Any, Any], elements: np.dtype[Any], oid: int) -> bytes:
    body = np.empty(len(values), dtype=elements)
    body["length"] = 4
    body["value"] = values
    data = body.tobytes()
    return _ARRAY.pack(20 + len(data), 1, 0, oid, len(values), 1) + data


def encoder(column_type: TypeEngine[Any]) -> Encoder:
    """The encoder of one column's values (never None: NULL is the caller's)."""
    if isinstance(column_type, ARRAY):
        item = column_type.item_type
        if isinstance(item, Integer) and not isinstance(item, BigInteger):
            return _int4_array
        if isinstance(item, REAL):
            return _float4_array
    elif isinstance(column_type, JSONB):
        return _jsonb
    elif isinstance(column_type, Text):
        return _text
    elif isinstance(column_type, BigInteger):
        return _int8
    elif isinstance(column_type, Integer):
        return _int4
    elif isinstance(column_type, Double):
        return _float8
    elif isinstance(column_type, DateTime) and column_type.timezone:
        return _timestamptz
    raise TypeError(f"no binary COPY encoder for {column_type!r}")


def encode_rows(encoders: Sequence[Encoder], records: Sequence[Sequence[Any]]) -> bytes:
    """The COPY stream of `records` (header, rows, trailer); Unencodable names the column."""
    return HEADER + encode_tuples(encoders, records) + TRAILER


def encode_tuples(encoders: Sequence[Encoder], records: Sequence[Sequence[Any]]) -> bytes:
    """`records` as the stream's tuples, without its header and trailer (a stream may be built
    from several such pieces)."""
    return b"".join(encode_tuple(encoders, record) for record in records)


def encode_tuple(encoders: Sequence[Encoder], record: Sequence[Any]) -> bytes:
    """One record as a tuple of the stream; Unencodable says which column (`column`)."""
    parts = [struct.pack("!h", len(encoders))]
    for i, (encode, value) in enumerate(zip(encoders, record, strict=True)):
        if value is None:
            parts.append(_NULL)
            continue
        try:
            parts.append(encode(value))
        except Unencodable as exc:
            exc.column = i
            raise
        except (TypeError, ValueError, AttributeError, OverflowError, struct.error) as exc:
            refused = Unencodable(f"column {i}: {type(value).__name__} value not storable ({exc})")
            refused.column = i
            raise refused from None
    return b"".join(parts)
