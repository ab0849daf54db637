"""Stopping a background task for certain.

`task.cancel()` is a request the task can lose: on Python 3.11, `asyncio.wait_for` drops a
cancellation that arrives just as its inner awaitable finishes (fixed in 3.12), and a loop
around such a call then goes on for ever, so `await task` after one cancel can hang a close.
`stop_task` asks again until the task has ended."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

# How long one cancellation gets before it is repeated: long enough for a task's own clean-up
# after it (a transaction's rollback), so that only a lost cancellation is repeated.
_RECANCEL_S = 2.0

log = logging.getLogger(__name__)


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended, cancelling again while it runs on. An error
    the task ended with (not its cancellation) is logged, not raised: the caller is stopping."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_RECANCEL_S)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task %s ended with %s: %s", task.get_name(), type(exc).__name__, exc)
