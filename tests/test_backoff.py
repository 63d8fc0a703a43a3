"""The one way every loop waits between rounds (paystream.backoff)."""

from __future__ import annotations

import asyncio
import time

from paystream.backoff import Backoff, pause


def test_backoff_doubles_up_to_its_cap_and_starts_over_on_reset() -> None:
    """Pauses double after each failure, never past the cap, and reset() starts them over."""
    backoff = Backoff(initial_s=0.2, max_s=1.0)
    assert [0.2, 0.4, 0.8, 1.0, 1.0] == [backoff.next_s() for _ in range(5)]
    backoff.reset()
    assert 0.2 == backoff.next_s()


async def test_pause_ends_when_an_event_is_set() -> None:
    """A pause of a minute ends as soon as one of its events (stop, a wake-up) is set."""
    stop, wake = asyncio.Event(), asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, wake.set)
    await asyncio.wait_for(pause(60, stop, wake), timeout=10)
    assert wake.is_set()
    assert not stop.is_set()


async def test_pause_with_its_event_set_returns_at_once() -> None:
    """A loop told to stop does not wait out one more pause."""
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(pause(60, stop), timeout=1)


async def test_pause_lasts_its_time_when_nothing_is_set() -> None:
    """Without an event, the pause is the time it was given."""
    started = time.monotonic()
    await pause(0.05, asyncio.Event())
    assert time.monotonic() - started >= 0.05
