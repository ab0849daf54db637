"""stop_task ends a task that loses a cancellation, as a loop around Python 3.11's wait_for can."""

from __future__ import annotations

import asyncio
import logging

import pytest

from lightloop.aio import stop_task


async def test_a_task_that_swallows_a_cancellation_is_still_stopped() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 3:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)  # let it start
    await asyncio.wait_for(stop_task(task), 10)
    assert task.cancelled() and swallowed == 3


async def test_a_task_that_failed_is_left_as_it_is_and_its_error_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.wait({task})
    with caplog.at_level(logging.ERROR):
        await stop_task(task)
    assert "ended with RuntimeError: boom" in caplog.text
    with pytest.raises(RuntimeError):
        task.result()
