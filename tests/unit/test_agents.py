"""Calling the user's agent: off the runner's event loop, with its reward checked."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from lightloop.agents import AgentCaller


async def _ticks_while(caller: AgentCaller) -> tuple[Any, int]:
    """What the call returns, and how often the caller's loop ran meanwhile (every 10 ms)."""
    ticks = 0
    call = asyncio.ensure_future(caller.call({"id": "t"}, None))  # type: ignore[arg-type]
    while not call.done():
        await asyncio.sleep(0.01)
        ticks += 1
    return call.result(), ticks


async def test_an_async_agent_that_blocks_its_loop_does_not_block_the_runner() -> None:
    async def blocks(task: dict[str, Any], llm: Any) -> float:
        time.sleep(0.5)  # noqa: ASYNC251 (sync code inside an async agent: the point)
        return 0.75

    caller = AgentCaller(blocks)
    try:
        reward, ticks = await _ticks_while(caller)
    finally:
        caller.close()
    assert reward == (0.75, None)
    # Heartbeats run on the caller's loop: it kept running while the agent blocked.
    assert ticks >= 10, ticks


async def test_sync_agents_and_awaitables_they_return_are_called_too() -> None:
    async def later() -> float:
        return 0.25

    caller = AgentCaller(lambda task, llm: later())
    try:
        assert await caller.call({}, None) == (0.25, None)  # type: ignore[arg-type]
        caller.agent = lambda task, llm: None
        assert await caller.call({}, None) == (None, None)  # type: ignore[arg-type]
        # Feedback text for prompt optimisation's reflection rides along with the reward.
        caller.agent = lambda task, llm: (1, "right answer")
        assert await caller.call({}, None) == (1.0, "right answer")  # type: ignore[arg-type]
    finally:
        caller.close()


@pytest.mark.parametrize(
    ("returned", "error"),
    [
        ("1.0", "return a float reward"),
        (True, "return a float reward"),
        (float("nan"), "finite"),
        ((1.0, 2), "feedback text"),
        ((1.0, "x", "y"), "feedback text"),
        (("1", "x"), "return a float reward"),
    ],
)
async def test_a_reward_that_is_not_a_finite_number_is_an_error(returned: Any, error: str) -> None:
    async def agent(task: dict[str, Any], llm: Any) -> Any:
        return returned

    caller = AgentCaller(agent)
    try:
        with pytest.raises((TypeError, ValueError), match=error):
            await caller.call({}, None)  # type: ignore[arg-type]
    finally:
        caller.close()


async def test_the_agents_exception_reaches_the_caller() -> None:
    async def fails(task: dict[str, Any], llm: Any) -> float:
        raise RuntimeError("agent bug")

    caller = AgentCaller(fails)
    try:
        with pytest.raises(RuntimeError, match="agent bug"):
            await caller.call({}, None)  # type: ignore[arg-type]
    finally:
        caller.close()
