"""The writer's pure parts: row shaping and the spool encoding."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest

from lightloop.store.writer import SPECS, BatchWriter, _decode, _encode, _for_spool, _to_copy


def test_rows_take_model_defaults_for_missing_columns(tmp_path: object) -> None:
    w = BatchWriter("postgresql://x@127.0.0.1:1/x", tmp_path / "spool")  # type: ignore[operator]
    record = w._record("rollouts", {"id": "r1"})
    row = dict(zip(SPECS["rollouts"].columns, record, strict=True))
    assert row["mode"] == "train" and row["status"] == "running" and row["metadata"] == b"{}"
    assert isinstance(row["created_at"], datetime) and row["created_at"].tzinfo is not None
    assert row["group_id"] is None


def test_spool_encoding_round_trips_times_json_and_infinities() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    spec = SPECS["llm_calls"]
    values = {c: None for c in spec.columns} | {
        "span_id": "s",
        "rollout_id": "r",
        "seq": 1,
        "model": "m",
        "request": {"a": [1, "b"]},
        "completion_logprobs": [-math.inf, -0.25],
        "created_at": when,
    }
    record = tuple(values[c] for c in spec.columns)
    decoded = _decode(_encode({"llm_calls": [record]}))
    assert decoded == {"llm_calls": [record]}


def test_json_columns_are_serialised_for_copy() -> None:
    spec = SPECS["spans"]
    values = {c: None for c in spec.columns} | {"attributes": {"k": "v"}, "events": [{"name": "e"}]}
    copied = dict(zip(spec.columns, _to_copy(spec, tuple(values[c] for c in spec.columns)), strict=True))
    assert json.loads(copied["attributes"]) == {"k": "v"} and json.loads(copied["events"]) == [{"name": "e"}]


def test_undecodable_spool_data_raises() -> None:
    with pytest.raises(KeyError):
        _decode(b'{"no_such_table": []}')


def test_no_nul_reaches_copy_in_any_text_or_json_column() -> None:
    spec = SPECS["llm_calls"]
    values = {c: None for c in spec.columns} | {
        "span_id": "s",
        "model": "m\x00",
        "request": {"messages": [{"role": "user", "content": "read \x00 this"}]},
        "response": '{"choices": [{"message": {"content": "\\u0000"}}]}',
        "finish_reason": "stop\x00",
        "completion_token_ids": [0, 1],
    }
    copied = dict(zip(spec.columns, _to_copy(spec, tuple(values[c] for c in spec.columns)), strict=True))
    assert copied["model"] == "m\ufffd" and copied["finish_reason"] == "stop\ufffd"
    assert json.loads(copied["request"])["messages"][0]["content"] == "read \ufffd this"
    assert json.loads(copied["response"])["choices"][0]["message"]["content"] == "\ufffd"
    assert copied["completion_token_ids"] == [0, 1]


def test_a_spooled_row_reaches_copy_as_the_same_values_as_a_written_one() -> None:
    spec = SPECS["llm_calls"]
    values = {c: None for c in spec.columns} | {
        "span_id": "s",
        "request": {"messages": [{"role": "user", "content": "caf\u00e9 \x00", "n": 1.5}]},
        "response": {"k": [None, True, 2**62]},
        "completion_logprobs": [-math.inf, -0.25],
        "created_at": datetime(2026, 1, 2, tzinfo=UTC),
    }
    record = tuple(values[c] for c in spec.columns)
    ready, refused = _for_spool({"llm_calls": [record]})
    assert not refused
    (replayed,) = _decode(_encode(ready))["llm_calls"]
    assert _to_copy(spec, replayed) == _to_copy(spec, record)


def test_the_spool_refuses_only_the_rows_the_json_encoder_refuses() -> None:
    spec = SPECS["spans"]

    def row(span_id: str, attributes: dict[object, object]) -> tuple[object, ...]:
        return tuple(
            ({c: None for c in spec.columns} | {"span_id": span_id, "attributes": attributes}).values()
        )

    good, bad = row("a", {"k": 2**64}), row("b", {("a", 1): 1})  # a tuple key: neither encoder's
    ready, refused = _for_spool({"spans": [good, bad]})
    assert [r[0] for r in ready["spans"]] == ["a"]
    assert [(t, r[0]) for t, r, _ in refused] == [("spans", "b")]


def test_json_documents_are_encoded_once_when_queued_and_spool_and_copy_alike(tmp_path: object) -> None:
    w = BatchWriter("postgresql://x@127.0.0.1:1/x", tmp_path / "spool")  # type: ignore[operator]
    spec = SPECS["llm_calls"]
    sent = b'{"messages": [{"role": "user", "content": "caf\xc3\xa9 \\u0000"}]}'
    row_in = {"span_id": "s", "rollout_id": "r", "seq": 0, "model": "m", "request": sent}
    record = w._record("llm_calls", {**row_in, "response": {"n": 2**64}})
    row = dict(zip(spec.columns, record, strict=True))
    assert row["request"] is sent  # the agent's bytes, not a copy
    assert json.loads(row["response"]) == {"n": 2**64}  # past orjson's range: the stdlib's encoder
    copied = dict(zip(spec.columns, _to_copy(spec, record), strict=True))
    assert json.loads(copied["request"])["messages"][0]["content"] == "caf\u00e9 \ufffd"
    ready, refused = _for_spool({"llm_calls": [record]})
    (replayed,) = _decode(_encode(ready))["llm_calls"]
    assert not refused and _to_copy(spec, replayed) == _to_copy(spec, record)
    unencodable = w._record("spans", {"span_id": "t", "attributes": {("a", 1): 1}})
    assert dict(zip(SPECS["spans"].columns, unencodable, strict=True))["attributes"] == {("a", 1): 1}
