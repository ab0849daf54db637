"""Agent functions the e2e tests run through `lightloop run` (real runner, proxy and engine)."""

from __future__ import annotations

import time
from typing import Any

from lightloop.llm import LLM


def one_call(task: dict[str, Any], llm: LLM) -> float:
    """One chat call; the reward depends on the reply, so a group's rewards usually differ."""
    answer = llm.openai(max_retries=0).chat.completions.create(
        model=llm.model,
        messages=[{"role": "user", "content": str(task.get("question", task))}],
        max_tokens=4,
        temperature=1.0,
    )
    return float(len(answer.choices[0].message.content or "") % 2)


async def async_one_call(task: dict[str, Any], llm: LLM) -> float:
    answer = await llm.async_openai(max_retries=0).chat.completions.create(
        model=llm.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    return 0.5 if answer.choices else 0.0


async def async_blocks(task: dict[str, Any], llm: LLM) -> float:
    """Blocks its event loop for longer than the test proxy's 2 s lease, as an async agent that
    calls sync code does; the runner's heartbeats must go on regardless."""
    time.sleep(3.0)  # noqa: ASYNC251 (the point of this agent)
    return await async_one_call(task, llm)


def hang(task: dict[str, Any], llm: LLM) -> float:
    """One call, then never returns: the runner holding it is killed by the test."""
    one_call(task, llm)
    while True:
        time.sleep(3600)


def raises(task: dict[str, Any], llm: LLM) -> float:
    raise RuntimeError(f"agent bug on task {task['id']}")


def bad_return(task: dict[str, Any], llm: LLM) -> Any:
    return "not a number"


not_callable = 42


# The system prompt the prompt tests register as a baseline; the agent never changes it.
KEYWORD_BASELINE = "Answer the question."


def keyword_agent(task: dict[str, Any], llm: LLM) -> tuple[float, str]:
    """Asks with an unchanged system prompt; the test's model echoes the system prompt it was
    served, so the reward (the task's keyword in the reply) depends on the prompt's wording,
    and the feedback says what was missing."""
    answer = llm.openai(max_retries=2).chat.completions.create(
        model=llm.model,
        messages=[
            {"role": "system", "content": KEYWORD_BASELINE},
            {"role": "user", "content": f"A question about {task['keyword']}."},
        ],
        max_tokens=8,
    )
    reply = (answer.choices[0].message.content or "").lower()
    if task["keyword"] in reply:
        return 1.0, "correct"
    return 0.0, f"MISSING keyword '{task['keyword']}'"
