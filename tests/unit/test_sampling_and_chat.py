"""The engine's pure parts: sampling distributions, stop strings, tool calls, detokenizing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightloop.engine.chat import normalise_messages, parse_tool_calls
from lightloop.engine.errors import BadRequest
from lightloop.engine.sampling import find_stop, processed_logprobs, sample, top_k


def test_greedy_logprobs_are_the_raw_log_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert torch.allclose(processed_logprobs(logits, 0.0, 0.5), torch.log_softmax(logits, -1))


def test_temperature_scales_before_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert torch.allclose(processed_logprobs(logits, 0.5, 1.0), torch.log_softmax(logits / 0.5, -1))


def test_top_p_keeps_the_smallest_nucleus_and_renormalises() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    lp = processed_logprobs(probs.log(), 1.0, 0.8)[0]
    kept = lp.exp()
    assert kept[2] == 0 and kept[3] == 0
    assert kept[:2].tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8])
    # top_p below the first token's mass still keeps that token.
    assert processed_logprobs(probs.log(), 1.0, 0.1)[0].exp()[0] == pytest.approx(1.0)


def test_sampling_follows_the_distribution_and_greedy_takes_the_max() -> None:
    lp = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    g = torch.Generator().manual_seed(0)
    counts = [0, 0, 0]
    for _ in range(2000):
        counts[sample(lp, False, g)] += 1
    assert counts[0] / 2000 == pytest.approx(0.7, abs=0.05)
    assert sample(lp, True, None) == 0
    assert top_k(lp, 2) == [(0, pytest.approx(math.log(0.7))), (1, pytest.approx(math.log(0.2)))]


@pytest.mark.parametrize(
    ("text", "start", "expected"),
    [("hello world", 6, 6), ("hello wor", 6, None), ("ab END cd", 0, 3), ("xEN", 2, None), ("xEND", 3, 1)],
)
def test_find_stop_sees_strings_across_the_old_and_new_text(
    text: str, start: int, expected: int | None
) -> None:
    assert find_stop(text, ("world", "END"), start) == expected


def test_tool_calls_are_parsed_like_vllms_hermes_parser() -> None:
    text = 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Sure."
    assert calls[0]["function"]["name"] == "add"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert calls[0]["id"].startswith("chatcmpl-tool-")
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert parse_tool_calls("plain") == ("plain", [])


def test_messages_are_normalised_for_plain_templates() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ],
        },
    ]
    out = normalise_messages(messages, template_knows_tools=False)
    assert out[0]["content"] == "ab"
    assert out[1]["content"] == '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    with pytest.raises(BadRequest):
        normalise_messages([{"content": "no role"}], template_knows_tools=False)
    with pytest.raises(BadRequest):
        normalise_messages([{"role": "user", "content": [{"type": "image_url"}]}], template_knows_tools=False)
