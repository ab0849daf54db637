"""Text as Postgres can store it.

Postgres's `text` and `jsonb` cannot hold U+0000: `jsonb` refuses the escape `\\u0000`
(SQLSTATE 22P05) and `text` the byte. Models do emit it (a sampled token that decodes to NUL,
seen from the tiny test model in CI), and agents pass it on from tool output (a binary file
read as text), so a refused row would lose a call the trainer needs. Every string bound for such
a column has U+0000 replaced by U+FFFD, the replacement character, which is what a reader of
the trace expects to see for a character that could not be kept. Token ids and logprobs are
numbers and are stored exactly, so training is unaffected.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

NUL = "\x00"
REPLACEMENT = "\ufffd"
# `\u0000` as a JSON escape: preceded by an even number of backslashes (zero included), so that
# an escaped backslash followed by the letters "u0000" (`\\u0000`) is left alone.
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def storable_text(value: str) -> str:
    """`value` with every U+0000 replaced by U+FFFD (the same object when it has none)."""
    return value.replace(NUL, REPLACEMENT) if NUL in value else value


def storable_json(document: str) -> str:
    """A JSON text whose strings hold no U+0000: `\\u0000` escapes become `\\ufffd`, and a raw
    NUL (invalid JSON, but seen in bodies passed on verbatim) becomes U+FFFD."""
    if "\\u0000" in document:  # a substring test first: the regex runs only on the rare hit
        document = _NUL_ESCAPE.sub(r"\1\\ufffd", document)
    return storable_text(document)


def storable_json_bytes(document: bytes) -> bytes:
    """`storable_json` for a JSON text as UTF-8 bytes (as the agent or engine sent it): the same
    object when it holds neither the escape nor a raw NUL, which is almost always."""
    if b"\\u0000" in document or b"\x00" in document:
        return storable_json(document.decode("utf-8", errors="replace")).encode()
    return document


def dump_json_bytes(value: Any) -> bytes:
    """`dump_json` as UTF-8 bytes, without the round trip through str in the common case."""
    try:
        data = orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        return dump_json(value).encode()
    return storable_json_bytes(data) if b"\\u0000" in data else data


def dump_json(value: Any) -> str:
    """`value` as a JSON text that `jsonb` accepts. orjson: about 5x the stdlib encoder on the
    proxy's request and response documents; what JSON cannot hold is written as its str(). An
    integer past 64 bits, which orjson refuses and jsonb keeps, goes through the stdlib encoder;
    what neither can encode (a key that is a tuple, a cycle) raises TypeError or ValueError."""
    try:
        text = orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:
        try:
            text = json.dumps(value, default=str, allow_nan=False)
        except RecursionError:  # a document nested past Python's limit: a bad value, like the rest
            raise ValueError("a JSON document nested too deep to encode") from None
    # Only the escape: neither encoder writes a raw NUL.
    return _NUL_ESCAPE.sub(r"\1\\ufffd", text) if "\\u0000" in text else text
