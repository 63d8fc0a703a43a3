"""Waiting until something holds, or failing when it does not in time: the one way the tools and
the tests wait on a condition. Never a fixed sleep: the pause between checks is only the pace
of the polling."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

EVERY_S = 0.05


class TimedOut(AssertionError):
    """A condition did not hold in time. An AssertionError, so that a test reads it as a
    failure of what it waited for."""


def until(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    *,
    every_s: float = EVERY_S,
    failed: Callable[[], str | None] = lambda: None,
) -> None:
    """Check `condition` until it holds; raise TimedOut naming `what` if it does not within
    `timeout_s`. `failed` is asked before each check: a message ends the wait at once (a child
    process that died), with that message."""
    deadline = time.monotonic() + timeout_s
    while True:
        problem = failed()
        if problem is not None:
            raise TimedOut(f"{problem} (waiting for {what})")
        if condition():
            return
        if time.monotonic() >= deadline:
            raise TimedOut(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


async def until_async(
    condition: Callable[[], bool] | Callable[[], Awaitable[bool]],
    timeout_s: float,
    what: str,
    *,
    every_s: float = EVERY_S,
) -> None:
    """`until` for the event loop: an async function `condition` is awaited; a plain one runs in
    a thread, since it may block (a query, an HTTP call)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if inspect.iscoroutinefunction(condition):
            held = await condition()
        else:
            held = await asyncio.to_thread(condition)
        if held:
            return
        if time.monotonic() >= deadline:
            raise TimedOut(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(every_s)
