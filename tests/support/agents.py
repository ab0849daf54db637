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
