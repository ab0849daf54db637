"""Assembling the engine's answers into rows: pure functions, no I/O."""

from __future__ import annotations

import json
from typing import Any

from lightloop.proxy.attribution import Attribution
from lightloop.proxy.capture import Call, build_rows, from_response, from_stream, parse_events


def call(**overrides: Any) -> Call:
    base: dict[str, Any] = {
        "span_id": "a" * 16,
        "trace_id": "b" * 32,
        "parent_span_id": None,
        "operation": "chat",
        "provider": "vllm",
        "rollout_id": "r1",
        "attribution": Attribution("r1", "path", 2, "g", "agent-x", "t"),
        "seq": 3,
        "requested_model": "policy",
        "served_model": "policy-v2",
        "policy_version": 2,
        "request": {
            "model": "policy",
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.5,
            "n": 2,
        },
        "started_ns": 1_700_000_000_000_000_000,
    }
    return Call(**{**base, **overrides})


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


RESPONSE = {
    "id": "chatcmpl-1",
    "model": "policy-v2",
    "prompt_token_ids": [1, 2, 3],
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "yes"},
            "logprobs": {"content": [{"token": "y", "logprob": -0.1}, {"token": "es", "logprob": -0.2}]},
            "finish_reason": "stop",
            "token_ids": [7, 8],
        },
        {
            "index": 1,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            "logprobs": {"content": [{"token": "<t>", "logprob": -0.3}]},
            "finish_reason": "tool_calls",
            "token_ids": [9],
        },
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
}


def test_a_non_streamed_answer_becomes_one_row_per_choice() -> None:
    outcome = from_response("chat", RESPONSE)
    span, rows = build_rows(call(), outcome, 1_700_000_000_250_000_000)
    assert [r["choice_index"] for r in rows] == [0, 1]
    assert rows[0]["prompt_token_ids"] == [1, 2, 3] == rows[1]["prompt_token_ids"]
    assert rows[0]["completion_token_ids"] == [7, 8] and rows[1]["completion_token_ids"] == [9]
    assert rows[0]["completion_logprobs"] == [-0.1, -0.2]
    assert [r["finish_reason"] for r in rows] == ["stop", "tool_calls"]
    assert rows[0]["latency_ms"] == 250.0
    assert rows[0]["policy_version"] == 2 and rows[0]["attempt"] == 2 and rows[0]["seq"] == 3
    # The arrays are not kept twice: the response JSON leaves them out.
    assert "token_ids" not in json.dumps(rows[0]["response"]) and "logprobs" not in json.dumps(
        rows[0]["response"]
    )
    assert rows[0]["response"]["choices"][1]["message"]["tool_calls"][0]["function"]["name"] == "f"
    attributes = span["attributes"]
    assert span["name"] == "chat policy" and span["status_code"] == "UNSET"
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "vllm"
    assert attributes["gen_ai.request.model"] == "policy"
    assert attributes["gen_ai.response.model"] == "policy-v2"
    assert attributes["gen_ai.response.id"] == "chatcmpl-1"
    assert attributes["gen_ai.response.finish_reasons"] == ["stop", "tool_calls"]
    assert attributes["gen_ai.usage.input_tokens"] == 3 and attributes["gen_ai.usage.output_tokens"] == 3
    assert attributes["gen_ai.request.temperature"] == 0.5 and attributes["gen_ai.request.choice.count"] == 2
    assert attributes["lightloop.rollout.id"] == "r1" and attributes["lightloop.policy.version"] == 2
    assert attributes["lightloop.group.id"] == "g" and attributes["lightloop.agent"] == "agent-x"
    assert span["input_tokens"] == 3 and span["output_tokens"] == 3


def test_a_stream_is_assembled_with_tool_call_deltas_and_two_choices() -> None:
    raw = sse(
        {
            "id": "chatcmpl-2",
            "model": "m",
            "created": 5,
            "prompt_token_ids": [4, 5],
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}},
                {"index": 1, "delta": {"role": "assistant"}},
            ],
        },
        {
            "id": "chatcmpl-2",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "Hel"},
                    "token_ids": [10],
                    "logprobs": {"content": [{"logprob": -1.0}]},
                }
            ],
        },
        {
            "id": "chatcmpl-2",
            "choices": [
                {
                    "index": 1,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_9",
                                "type": "function",
                                "function": {"name": "look", "arguments": ""},
                            }
                        ]
                    },
                    "token_ids": [20],
                    "logprobs": {"content": [{"logprob": -2.0}]},
                }
            ],
        },
        {
            "id": "chatcmpl-2",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "lo"},
                    "token_ids": [11],
                    "logprobs": {"content": [{"logprob": -1.5}]},
                }
            ],
        },
        {
            "id": "chatcmpl-2",
            "choices": [
                {
                    "index": 1,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]},
                    "token_ids": [21],
                    "logprobs": {"content": [{"logprob": -2.5}]},
                }
            ],
        },
        {
            "id": "chatcmpl-2",
            "choices": [
                {
                    "index": 1,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
                    "token_ids": [22],
                    "logprobs": {"content": [{"logprob": -3.0}]},
                }
            ],
        },
        {
            "id": "chatcmpl-2",
            "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop", "token_ids": []},
                {"index": 1, "delta": {}, "finish_reason": "tool_calls"},
            ],
        },
    )
    outcome = from_stream("chat", raw)
    assert outcome.response_id == "chatcmpl-2" and outcome.prompt_token_ids == [4, 5]
    first, second = outcome.choices
    assert first.text == "Hello" and first.token_ids == [10, 11] and first.logprobs == [-1.0, -1.5]
    assert second.token_ids == [20, 21, 22] and second.finish_reason == "tool_calls"
    assert second.tool_calls == [
        {"id": "call_9", "type": "function", "function": {"name": "look", "arguments": '{"a":1}'}}
    ]
    assert outcome.response["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    _, rows = build_rows(call(), outcome, 1_700_000_000_100_000_000)
    assert rows[0]["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


def test_an_aborted_stream_keeps_its_partial_tokens() -> None:
    raw = sse(
        {
            "id": "x",
            "prompt_token_ids": [1],
            "choices": [{"index": 0, "delta": {"content": "a"}, "token_ids": [5]}],
        }
    )
    torn = raw.replace(b"data: [DONE]\n\n", b'data: {"id": "x", "choi')
    outcome = from_stream("chat", torn)
    _, rows = build_rows(call(), outcome, 1_700_000_000_100_000_000, aborted=True)
    assert rows[0]["finish_reason"] == "abort" and rows[0]["completion_token_ids"] == [5]


def test_a_call_that_never_got_an_answer_is_one_failed_row() -> None:
    span, rows = build_rows(
        call(),
        None,
        1_700_000_000_100_000_000,
        error=("upstream_error", "refused", {"error": {"message": "refused"}}),
    )
    assert len(rows) == 1 and rows[0]["finish_reason"] == "error" and rows[0]["completion_token_ids"] is None
    assert rows[0]["response"] == {"error": {"message": "refused"}}
    assert span["status_code"] == "ERROR" and span["status_message"] == "refused"
    assert span["attributes"]["error.type"] == "upstream_error"


def test_text_completions_take_prompt_ids_from_the_choice() -> None:
    outcome = from_response(
        "text_completion",
        {
            "id": "cmpl-1",
            "choices": [
                {
                    "index": 0,
                    "text": "x",
                    "token_ids": [3],
                    "prompt_token_ids": [1, 2],
                    "logprobs": {"token_logprobs": [-0.7]},
                    "finish_reason": "length",
                }
            ],
        },
    )
    assert outcome.prompt_token_ids == [1, 2]
    assert outcome.choices[0].logprobs == [-0.7] and outcome.choices[0].token_ids == [3]


def test_parse_events_skips_comments_done_and_crlf() -> None:
    raw = b': keep-alive\r\n\r\ndata: {"a": 1}\r\n\r\ndata: [DONE]\r\n\r\n'
    assert list(parse_events(raw)) == [{"a": 1}]
