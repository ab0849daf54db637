"""Stopping a background task for certain.

`task.cancel()` is a request the task can lose: on Python 3.11, `asyncio.wait_for` drops a
cancellation that arrives just as its inner awaitable finishes (fixed in 3.12), and a loop
around such a call then goes on for ever, so `await task` after one cancel can hang a close.
`stop_task` asks again until the task has ended."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

# How long one cancellation gets before it is repeated (a lost one, not a slow task).
_RECANCEL_S = 0.5


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended, cancelling again while it runs on."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_RECANCEL_S)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
