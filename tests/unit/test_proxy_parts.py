"""The proxy's small pure parts: sessions, OTLP decoding, trace context, replica order, keys,
LiteLLM's derived config."""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from lightloop.errors import ConfigError
from lightloop.proxy import otlp
from lightloop.proxy.auth import load_or_create_master_key, request_key
from lightloop.proxy.errors import BadRequest, Forbidden, Unauthorized
from lightloop.proxy.keys import MASTER, Caller, Keys, require
from lightloop.proxy.litellm_routes import model_in_path, model_of, scope_of
from lightloop.proxy.routing import match
from lightloop.proxy.server import litellm_config
from lightloop.proxy.sessions import SessionIndex, chain
from lightloop.proxy.spans import trace_context
from lightloop.proxy.upstream import order
from lightloop.settings import load_settings

USER = {"role": "user", "content": "Question?"}


def test_a_call_continuing_an_earlier_one_joins_its_rollout() -> None:
    index = SessionIndex(100)
    index.remember([USER], {"role": "assistant", "content": "Answer."}, "r1")
    # The agent sends the reply back in another shape: None-free dict, content parts, extra keys.
    again = {"role": "assistant", "content": [{"type": "text", "text": "Answer."}], "refusal": None}
    assert index.find([USER, again, {"role": "user", "content": "More?"}]) == "r1"
    assert index.find([USER, {"role": "assistant", "content": "Other."}, USER]) is None
    assert index.find([USER]) is None
    assert index.find([{"role": "system", "content": "x"}, USER, again]) is None


def test_the_longest_earlier_conversation_wins_and_tool_calls_count() -> None:
    index = SessionIndex(100)
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    index.remember([USER], call, "r1")
    tool = {"role": "tool", "tool_call_id": "1", "content": "42"}
    reply = {"role": "assistant", "content": "It is 42."}
    index.remember([USER, call, tool], reply, "r2")
    assert index.find([USER, call, tool, reply, USER]) == "r2"
    other_args = {
        **call,
        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}],
    }
    assert index.find([USER, other_args, tool]) is None


def test_the_session_index_forgets_the_least_recently_used() -> None:
    index = SessionIndex(2)
    for i in range(3):
        index.remember([{"role": "user", "content": str(i)}], {"role": "assistant", "content": "a"}, f"r{i}")
    assert len(index) == 2
    assert index.find([{"role": "user", "content": "0"}, {"role": "assistant", "content": "a"}]) is None
    assert index.find([{"role": "user", "content": "2"}, {"role": "assistant", "content": "a"}]) == "r2"


def test_traceparent_joins_the_agents_trace_and_bad_ones_start_a_new_one() -> None:
    trace_id, parent = trace_context(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert (trace_id, parent) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    for bad in (None, b"garbage", b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"):
        trace_id, parent = trace_context(bad)
        assert len(trace_id) == 32 and parent is None


def test_replica_order_is_stable_per_rollout_and_spreads_rollouts() -> None:
    replicas = ["http://a:8000", "http://b:8000", "http://c:8000"]
    assert order(replicas, "r1") == order(list(reversed(replicas)), "r1")
    firsts = {order(replicas, f"r{i}")[0] for i in range(60)}
    assert firsts == set(replicas)
    # Losing a replica moves only the rollouts that were on it.
    moved = [
        i
        for i in range(60)
        if order(replicas, f"r{i}")[0] != "http://c:8000"
        and order(replicas[:2], f"r{i}")[0] != order(replicas, f"r{i}")[0]
    ]
    assert moved == []


def _protobuf_request() -> bytes:
    request = trace_service_pb2.ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    attr = resource_spans.resource.attributes.add()
    attr.key, attr.value.string_value = "service.name", "agent"
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "agent.scope"
    span = scope_spans.spans.add()
    span.trace_id = bytes(range(1, 17))
    span.span_id = bytes(range(1, 9))
    span.parent_span_id = bytes(range(9, 17))
    span.name = "chat gpt"
    span.kind = 3
    span.start_time_unix_nano = 1_700_000_000_000_000_000
    span.end_time_unix_nano = 1_700_000_000_500_000_000
    for key, setter in (
        ("gen_ai.usage.input_tokens", ("int_value", 12)),
        ("lightloop.rollout.id", ("string_value", "r7")),
        ("gen_ai.request.model", ("string_value", "gpt")),
    ):
        a = span.attributes.add()
        a.key = key
        setattr(a.value, *setter)
    array = span.attributes.add()
    array.key = "gen_ai.response.finish_reasons"
    array.value.array_value.values.add().string_value = "stop"
    event = span.events.add()
    event.name = "gen_ai.choice"
    event.time_unix_nano = 1_700_000_000_100_000_000
    span.status.code = 1
    return request.SerializeToString()


def test_otlp_protobuf_becomes_span_rows() -> None:
    rows, protobuf = otlp.decode(_protobuf_request(), b"application/x-protobuf")
    assert protobuf
    (row,) = rows
    assert row["trace_id"] == bytes(range(1, 17)).hex() and row["span_id"] == bytes(range(1, 9)).hex()
    assert row["parent_span_id"] == bytes(range(9, 17)).hex()
    assert row["kind"] == "CLIENT" and row["status_code"] == "OK"
    assert row["attributes"]["gen_ai.usage.input_tokens"] == 12
    assert row["attributes"]["gen_ai.response.finish_reasons"] == ["stop"]
    assert row["rollout_id"] == "r7" and row["model"] == "gpt" and row["input_tokens"] == 12
    assert row["resource"] == {"service.name": "agent"} and row["scope"] == "agent.scope"
    assert row["events"][0]["name"] == "gen_ai.choice"
    assert (row["end_time"] - row["start_time"]).total_seconds() == 0.5
    media, body = otlp.encode_response(True)
    assert media == b"application/x-protobuf"
    trace_service_pb2.ExportTraceServiceResponse().ParseFromString(body)


def test_otlp_json_uses_hex_ids_and_gzip_is_undone() -> None:
    body = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "0102030405060708090a0b0c0d0e0f10",
                                "spanId": "0102030405060708",
                                "name": "x",
                                "startTimeUnixNano": "1700000000000000000",
                            }
                        ]
                    }
                ]
            }
        ]
    }
    raw = otlp.decompress(gzip.compress(json.dumps(body).encode()), b"gzip")
    (row,) = otlp.decode(raw, b"application/json; charset=utf-8")[0]
    assert row["trace_id"] == "0102030405060708090a0b0c0d0e0f10" and row["status_code"] == "UNSET"


@pytest.mark.parametrize(
    "span",
    [
        {"traceId": "zz", "spanId": "0102030405060708", "startTimeUnixNano": "1"},
        {
            "traceId": "0102030405060708090a0b0c0d0e0f10",
            "spanId": "0000000000000000",
            "startTimeUnixNano": "1",
        },
        {"traceId": "0102030405060708090a0b0c0d0e0f10", "spanId": "0102030405060708"},
        {
            "traceId": "0102030405060708090a0b0c0d0e0f10",
            "spanId": "0102030405060708",
            "startTimeUnixNano": "soon",
        },
    ],
)
def test_otlp_bad_spans_are_refused(span: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        otlp.decode(
            json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}).encode(), b"application/json"
        )


_GOOD_SPAN = {
    "traceId": "0102030405060708090a0b0c0d0e0f10",
    "spanId": "0102030405060708",
    "startTimeUnixNano": "1",
}


@pytest.mark.parametrize(
    "body",
    [
        {"resourceSpans": 5},
        {"resourceSpans": [5]},
        {"resourceSpans": [{"scopeSpans": [{"spans": [{**_GOOD_SPAN, "status": 5}]}]}]},
        {"resourceSpans": [{"scopeSpans": [{"spans": [{**_GOOD_SPAN, "startTimeUnixNano": "9" * 26}]}]}]},
        *(
            {
                "resourceSpans": [
                    {"scopeSpans": [{"spans": [{**_GOOD_SPAN, "attributes": [{"key": "k", "value": v}]}]}]}
                ]
            }
            for v in (
                {"intValue": "abc"},
                {"intValue": None},
                {"intValue": str(2**64)},
                {"doubleValue": "x"},
                {"arrayValue": [1]},
                {"kvlistValue": 3},
            )
        ),
    ],
)
def test_an_otlp_body_of_the_wrong_shape_is_a_bad_request_not_a_crash(body: dict[str, object]) -> None:
    with pytest.raises(BadRequest, match=r"OTLP|64-bit|time"):
        otlp.decode(json.dumps(body).encode(), b"application/json")


def test_otlp_attributes_of_any_type_land_in_text_columns_as_text() -> None:
    span = {
        **_GOOD_SPAN,
        "attributes": [{"key": "gen_ai.request.model", "value": {"intValue": "7"}}],
        "status": {"code": 2, "message": {"nested": 1}},
    }
    (row,), _ = otlp.decode(
        json.dumps({"resourceSpans": [{"scopeSpans": [{"scope": {"name": 5}, "spans": [span]}]}]}).encode(),
        b"application/json",
    )
    assert (row["model"], row["status_message"], row["scope"]) == ("7", "{'nested': 1}", "5")


def test_otlp_protobuf_ids_are_base64_in_its_json_mapping() -> None:
    assert base64.b64decode("AQIDBAUGBwg=") == bytes(range(1, 9))
    with pytest.raises(BadRequest):
        otlp.decompress(b"x", b"br")


def test_a_key_is_read_from_each_header_clients_send_it_in() -> None:
    assert request_key({"headers": [(b"authorization", b"Bearer sk-secret")]}) == b"sk-secret"
    assert request_key({"headers": [(b"x-api-key", b"sk-secret")]}) == b"sk-secret"
    assert request_key({"headers": [(b"api-key", b"sk-secret")]}) == b"sk-secret"
    assert request_key({"headers": []}) is None
    # Another scheme is not a bearer token: the whole value is compared, and matches no key.
    assert request_key({"headers": [(b"authorization", b"Basic sk-secret")]}) == b"Basic sk-secret"


async def test_only_the_master_key_and_scoped_keys_are_callers_and_no_key_is_refused() -> None:
    async def no_database() -> Any:
        raise AssertionError("a key that is not lightloop's costs no query")

    keys = Keys(b"sk-master", no_database, cache_s=5)
    assert await keys.identify(b"sk-master") == MASTER
    assert await keys.identify(b"sk-some-virtual-key") is None  # LiteLLM's to judge
    with pytest.raises(Unauthorized):
        await keys.identify(None)
    with pytest.raises(Forbidden, match="admin key"):
        require(Caller("agent", "runner-1"), "admin", "GET /metrics")
    require(Caller("admin", "ops"), "agent", "POST /v1/rewards")


@pytest.mark.parametrize(
    ("path", "admin_routes", "scope"),
    [
        ("/health/liveliness", False, "open"),
        ("/v1/embeddings", False, "agent"),
        ("/embeddings", False, "agent"),
        ("/openai/v1/responses", False, "agent"),
        ("/v1/messages", False, "agent"),
        ("/v1/models", False, "agent"),
        ("/openai/deployments/gpt/embeddings", False, "agent"),
        ("/v1/files", False, "admin"),
        ("/v1/responses/resp_1", False, "admin"),
        ("/v1/vector_stores/vs_1/files/f_1", False, "admin"),
        ("/key/generate", False, None),
        ("/ui", False, None),
        ("/user/new", False, None),
        ("/config/update", False, None),
        ("/key/generate", True, "admin"),
        ("/ui", True, "admin"),
        ("/key/generate/", False, None),
        ("/openai/v1/chat/completions", False, None),  # LiteLLM's pass-through to OpenAI
        ("/openai/v1/embeddings", False, None),
        ("/openai/v1/chat/completions", True, "admin"),
        ("/v1/models/policy", False, "agent"),
        ("/engines/Qwen/Qwen3-8B/embeddings", False, "agent"),
    ],
)
def test_litellm_routes_on_the_agent_port(path: str, admin_routes: bool, scope: str | None) -> None:
    assert scope_of(path, admin_routes) == scope


def test_a_model_named_in_the_path_is_found() -> None:
    assert model_in_path("/openai/deployments/policy/embeddings") == "policy"
    assert model_in_path("/engines/policy/embeddings") == "policy"
    assert model_in_path("/engines/Qwen/Qwen3-8B/chat/completions") == "Qwen/Qwen3-8B"
    assert model_in_path("/v1/embeddings") is None
    found = match("/openai/deployments/Qwen/Qwen3-8B/chat/completions")
    assert found is not None and found[0].operation == "chat" and found[1] == {"model": "Qwen/Qwen3-8B"}


@pytest.mark.parametrize(
    ("body", "content_type", "model"),
    [
        (b'{"model": "policy"}', b"application/json", "policy"),
        (b'{"model": "policy"}', b"text/plain", "policy"),
        (b'{"model": "policy"}', None, "policy"),
        (b"model=policy&input=hi", b"application/x-www-form-urlencoded", "policy"),
        (
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\npolicy\r\n--b--\r\n',
            b"multipart/form-data; boundary=b",
            "policy",
        ),
        (b"not json", b"application/json", None),
        (b'{"model": 3}', b"application/json", None),
        (b"[1]", b"application/json", None),
    ],
)
def test_the_model_a_body_names_is_read_as_litellm_reads_it(
    body: bytes, content_type: bytes | None, model: str | None
) -> None:
    assert model_of(body, content_type) == model


def test_the_generated_master_key_is_kept_private_and_reused(tmp_path: Path) -> None:
    key, created = load_or_create_master_key(tmp_path)
    assert created and key.startswith("sk-") and len(key) == 67
    assert (tmp_path / "master.key").stat().st_mode & 0o077 == 0
    assert load_or_create_master_key(tmp_path) == (key, False)


def test_litellm_gets_its_keys_and_the_policy_models(tmp_path: Path) -> None:
    config = tmp_path / "lightloop.yaml"
    config.write_text(
        "home: /tmp/x\nwriter: {batch_size: 10}\n"
        "policy: [{name: p, base_model: tiny, upstreams: ['http://e:8000/v1/']}]\n"
        "model_list: [{model_name: gpt, litellm_params: {model: openai/gpt-4o}}]\n"
        "litellm_settings: {drop_params: true}\n"
    )
    derived = litellm_config(load_settings(config))
    assert set(derived) == {"model_list", "litellm_settings"}
    assert [m["model_name"] for m in derived["model_list"]] == ["gpt", "p"]
    assert derived["model_list"][1]["litellm_params"] == {
        "model": "hosted_vllm/tiny",
        "api_base": "http://e:8000/v1",
    }
    # A LiteLLM model the policy lane would take (the policy's name, or its `p/agent` alias): refused.
    for name in ("p", "p/planner"):
        config.write_text(
            "policy: [{name: p, base_model: tiny}]\n"
            f"model_list: [{{model_name: '{name}', litellm_params: {{model: openai/gpt-4o}}}}]\n"
        )
        with pytest.raises(ConfigError, match="policy lane would serve it"):
            litellm_config(load_settings(config))
    # The alias is read at the last slash, as the lane does: a policy named `org/p` owns
    # `org/p/planner`; a policy named `openai` does not own `openai/org/gpt`.
    config.write_text(
        "policy: [{name: org/p, base_model: tiny}]\n"
        "model_list: [{model_name: org/p/planner, litellm_params: {model: openai/gpt-4o}}]\n"
    )
    with pytest.raises(ConfigError, match="policy lane would serve it"):
        litellm_config(load_settings(config))
    config.write_text(
        "policy: [{name: openai, base_model: tiny}]\n"
        "model_list: [{model_name: openai/org/gpt, litellm_params: {model: openai/gpt-4o}}]\n"
    )
    assert [m["model_name"] for m in litellm_config(load_settings(config))["model_list"]] == [
        "openai/org/gpt",
        "openai",
    ]


def test_recording_off_submits_nothing_and_the_in_flight_cap_frees_idle_rollouts(tmp_path: Path) -> None:
    from lightloop.proxy.attribution import Attribution
    from lightloop.proxy.errors import TooManyRollouts
    from lightloop.proxy.recorder import Recorder
    from lightloop.store import BatchWriter

    def open_call(recorder: Recorder, rollout: str) -> object:
        return recorder.open(
            Attribution(rollout, "header"),
            operation="chat",
            provider="vllm",
            requested_model="policy",
            served_model="m",
            policy_version=0,
            request={"messages": [USER]},
            traceparent=None,
            admit=True,
        )

    writer = BatchWriter("postgresql://unused@127.0.0.1:1/x", tmp_path / "spool")
    silent = Recorder(writer, 10, enabled=False)
    silent.close(open_call(silent, "r1"), None)  # type: ignore[arg-type]
    assert writer.queue_depth == 0

    capped = Recorder(writer, 10, max_in_flight=1, idle_s=3600)
    open_call(capped, "a")
    open_call(capped, "a")  # the same rollout goes on
    with pytest.raises(TooManyRollouts):
        open_call(capped, "b")
    capped.finished("a")
    open_call(capped, "b")
    forgetful = Recorder(writer, 10, max_in_flight=1, idle_s=-1)  # every rollout already idle
    open_call(forgetful, "a")
    open_call(forgetful, "b")


def test_a_pinned_rollout_gets_its_version_while_the_engines_keep_it() -> None:
    from lightloop.proxy.versions import LiveVersions
    from lightloop.settings import PolicyModelSettings

    versions = LiveVersions(
        [PolicyModelSettings(name="p", base_model="base")], "postgresql://unused", 1.0, keep=2, memory=2
    )
    versions.pin("r0", "p", 0)
    versions.set("p", 1)
    assert versions.served("p", "r0") == ("base", 0)  # the base model's round, v1 live
    assert versions.served("p", "free") == ("p-v1", 1)
    versions.pin("r1", "p", 1)
    versions.set("p", 2)
    assert versions.served("p", "r1") == ("p-v1", 1)
    assert versions.served("p") == ("p-v2", 2)
    versions.set("p", 3)
    # Only the newest two versions stay loaded: v1 is gone, so the live version answers; the
    # base model is never unloaded, so the v0 round keeps it.
    assert versions.served("p", "r1") == ("p-v3", 3)
    assert versions.served("p", "r0") == ("base", 0)
    # A pin is per policy, and pins are bounded (the oldest is forgotten).
    versions.pin("r2", "other", 2)
    assert versions.served("p", "r2") == ("p-v3", 3)
    versions.pin("r3", "p", 3)
    versions.pin("r4", "p", 2)
    assert versions.served("p", "r4") == ("p-v2", 2)
    versions.pin("r5", "p", 3)
    versions.pin("r6", "p", 3)
    assert versions.served("p", "r4") == ("p-v3", 3)  # forgotten: r5 and r6 are the two kept


def test_a_compressed_otlp_body_is_bounded_by_what_it_expands_to() -> None:
    from lightloop.proxy.errors import PayloadTooLarge

    bomb = gzip.compress(b"\0" * 50_000_000)  # 50 MB of zeros in about 50 KB
    assert len(bomb) < 100_000
    with pytest.raises(PayloadTooLarge, match="expands past the limit of 10485760 bytes"):
        otlp.decompress(bomb, b"gzip", 10 * 1024 * 1024)
    small = b'{"resourceSpans": []}'
    assert otlp.decompress(gzip.compress(small), b"gzip", 1024) == small
    assert otlp.decompress(zlib.compress(small), b"deflate", 1024) == small
    with pytest.raises(BadRequest, match="cut short"):
        otlp.decompress(gzip.compress(small)[:-8], b"gzip", 1024)
    with pytest.raises(BadRequest, match="not valid gzip"):
        otlp.decompress(b"not gzip", b"gzip", 1024)


def test_only_the_end_of_a_stream_is_held_back() -> None:
    from lightloop.proxy.lane import _split_done

    chunk = b'data: {"choices": []}\n\n'
    assert _split_done(chunk) == (chunk, b"")
    assert _split_done(chunk + b"data: [DONE]\n\n") == (chunk, b"data: [DONE]\n\n")
    # [DONE] cut over two pieces: its start waits for the rest.
    assert _split_done(chunk + b"data: [DO") == (chunk, b"data: [DO")
    assert _split_done(b"data: [DO" + b"NE]\n\n") == (b"", b"data: [DONE]\n\n")
    # Half an event waits for its end: a stream broken off here leaves the agent whole events.
    assert _split_done(chunk + b'data: {"choi') == (chunk, b'data: {"choi')
    crlf = b'data: {"choices": []}\r\n\r\n'
    assert _split_done(crlf + b"data: [DONE]\r\n\r\n") == (crlf, b"data: [DONE]\r\n\r\n")


def test_remembering_with_the_keys_found_at_open_matches_hashing_the_whole_conversation() -> None:
    messages = [{"role": "system", "content": "s"}, USER]
    reply = {"role": "assistant", "content": "Answer."}
    with_keys, without = SessionIndex(10), SessionIndex(10)
    with_keys.remember(messages, reply, "r1", chain(messages))
    without.remember(messages, reply, "r1")
    follow_up = [*messages, reply, {"role": "user", "content": "More?"}]
    assert with_keys.find(follow_up) == without.find(follow_up) == "r1"
    assert with_keys.find(follow_up, chain(follow_up)) == "r1"


def test_a_policy_alias_names_its_agent_and_a_bad_agent_name_is_a_400(tmp_path: Path) -> None:
    from lightloop.proxy.lane import PolicyLane
    from lightloop.proxy.recorder import Recorder
    from lightloop.proxy.upstream import Upstreams
    from lightloop.proxy.versions import LiveVersions
    from lightloop.settings import PolicyModelSettings
    from lightloop.store import BatchWriter

    policies = [PolicyModelSettings(name="org/model", agents={"planner": {}}), PolicyModelSettings(name="p")]
    url = "postgresql://x@127.0.0.1:1/x"  # never connected to: nothing here starts
    lane = PolicyLane(
        {p.name: p for p in policies},
        LiveVersions([a for p in policies for a in p.adapters()], url, 1.0),
        Upstreams(1.0, 0),
        Recorder(BatchWriter(url, tmp_path / "spool"), 10),
    )
    assert lane.resolve("p") == ("p", None)
    assert lane.resolve("org/model") == ("org/model", None)
    assert lane.resolve("org/model/planner") == ("org/model", "planner")  # the policy's own slash
    assert lane.resolve("p/anyone") == ("p", "anyone")  # not listed: the policy's adapter serves it
    assert lane.resolve("gpt-4o") is None and lane.resolve("other/planner") is None
    for bad in ("p/two words", "p/", "p/v3", "p/" + "x" * 65):
        with pytest.raises(BadRequest, match="not an agent name"):
            lane.resolve(bad)
