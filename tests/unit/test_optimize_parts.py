"""The optimiser's pure parts: whether a reflection reply holds a prompt (as GEPA will extract
it), the conversation shown to the reflection model, and the feedback line."""

from __future__ import annotations

from lightloop.optimize import _feedback, _proposed_text, _transcript
from lightloop.store.prompt_runs import Evaluation


def test_a_reply_holds_a_prompt_inside_fences_or_as_a_whole() -> None:
    assert _proposed_text("Here:\n```\nBe brief.\n```")
    assert _proposed_text("```text\nBe brief.\n```")  # a language tag is not the prompt
    assert _proposed_text("Be brief.")  # no fences: the whole reply
    assert not _proposed_text("   ")
    assert not _proposed_text("Here:\n```\n\n```")
    assert not _proposed_text("```text\n```")


def test_the_transcript_is_the_last_calls_messages_and_its_reply_with_tool_calls() -> None:
    calls = [
        {"messages": [{"role": "user", "content": "q"}], "response": None},
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "search", "arguments": '{"q": 1}'}}],
                },
                {"role": "tool", "content": "found"},
            ],
            "response": {"choices": [{"message": {"role": "assistant", "content": "done"}}]},
        },
    ]
    assert _transcript(calls).splitlines() == [
        "system: Be brief.",
        "user: q",
        'assistant: [tool call search({"q": 1})]',
        "tool: found",
        "assistant: done",
    ]
    assert _transcript([]) == "(no recorded call)"


def test_feedback_names_the_reward_a_failure_and_the_agents_text() -> None:
    assert _feedback(Evaluation("r", "t", "succeeded", 0.5, "too long")) == "reward 0.500. too long"
    assert _feedback(Evaluation("r", "t", "failed", None, None)) == "reward none (the agent failed)"
