"""Waiting between rounds, one way for every loop: a pause that ends early when the work is
stopping (or is woken), and pauses that double while a dependency keeps failing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


async def pause(seconds: float, stop: asyncio.Event, *wake: asyncio.Event) -> None:
    """Wait `seconds`, or until `stop` (or one of the `wake` events) is set."""
    events = (stop, *wake)
    if any(event.is_set() for event in events):
        return
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@dataclass(slots=True)
class Backoff:
    """Pauses from `initial_s`, doubling after each failure up to `max_s`; `reset()` once the
    dependency answers again."""

    initial_s: float
    max_s: float
    _next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self._next_s = self.initial_s

    def next_s(self) -> float:
        current = self._next_s
        self._next_s = min(current * 2, self.max_s)
        return current

    def reset(self) -> None:
        self._next_s = self.initial_s
