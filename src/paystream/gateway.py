"""The third-party gateway: is this online payment valid?

2XX approves; a definitive non-2XX (most 4xx) declines; anything transient (timeout, connection
failure, 5xx, 408, 425, 429) is retried with back-off and jitter within a budget, then raises
GatewayUnavailable so the pipeline keeps the payment for later re-validation.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import stamina

from paystream.errors import GatewayUnavailable
from paystream.metrics import GATEWAY_CALLS, GATEWAY_SECONDS

_TRANSIENT_STATUSES = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class Approved:
    status: int


@dataclass(frozen=True, slots=True)
class Declined:
    status: int


Verdict = Approved | Declined


class _Transient(Exception):
    """One attempt failed in a way worth retrying."""


class Gateway:
    """Owns one aiohttp session and the in-flight limit of validations."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        max_in_flight: int,
        timeout_s: float,
        attempts: int,
        budget_s: float,
    ) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/payment"
        self._slots = asyncio.Semaphore(max_in_flight)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._attempts = attempts
        self._budget_s = budget_s

    async def validate(self, body: bytes) -> Verdict:
        """POST the payment as it arrived. Raises GatewayUnavailable once the budget is spent."""
        try:
            async for attempt in stamina.retry_context(
                on=_Transient,
                attempts=self._attempts,
                timeout=self._budget_s,
                wait_initial=0.05,
                wait_max=2.0,
            ):
                with attempt:
                    return await self._attempt(body)
        except _Transient as exc:
            raise GatewayUnavailable(str(exc)) from exc
        raise AssertionError("unreachable: retry_context either returns or raises")

    async def _attempt(self, body: bytes) -> Verdict:
        async with self._slots:
            started = time.perf_counter()
            try:
                async with self._session.post(
                    self._url,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=self._timeout,
                ) as response:
                    await response.read()
                    status = response.status
            except TimeoutError as exc:
                GATEWAY_CALLS.labels(outcome="timeout").inc()
                raise _Transient("gateway timed out") from exc
            except aiohttp.ClientError as exc:
                GATEWAY_CALLS.labels(outcome="connection_error").inc()
                raise _Transient(f"gateway connection failed ({type(exc).__name__})") from exc
            finally:
                GATEWAY_SECONDS.observe(time.perf_counter() - started)
        GATEWAY_CALLS.labels(outcome=str(status)).inc()
        if 200 <= status < 300:
            return Approved(status)
        if status >= 500 or status in _TRANSIENT_STATUSES:
            raise _Transient(f"gateway answered HTTP {status}")
        return Declined(status)
