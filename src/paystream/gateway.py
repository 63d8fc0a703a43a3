"""The third-party gateway: is this online payment valid?

2XX approves; a definitive non-2XX (most 4xx) declines; anything transient (timeout, connection
failure, 5xx, 408, 425, 429) is retried with back-off and jitter within a budget, then raises
GatewayUnavailable so the pipeline keeps the payment for later re-validation. A redirect (3xx) or
a refusal of our credentials says our settings are wrong, not the payment: it is kept the same
way, without retries, and the start-up check refuses to start on either.

Every call carries an `Idempotency-Key` derived from the payment_id alone: a timed-out call may
have been acted on by the provider, and the key makes its retries, later re-validations and the
calls of other instances the same request in the provider's eyes, so none can double an effect.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from enum import StrEnum

import stamina
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Gauge
from pyreqwest.client import Client

from paystream import tracing
from paystream.errors import (
    AttemptFailed,
    CircuitOpen,
    ConfigurationError,
    CredentialsRefused,
    GatewayUnavailable,
    Misconfigured,
    Redirected,
    Unanswered,
)
from paystream.metrics import GATEWAY_CALLS, GATEWAY_SECONDS
from paystream.model import Approved, Declined
from paystream.thirdparty import Answer, post

log = logging.getLogger(__name__)

_RETRY_FIRST_S = 0.05
"""The first pause before retrying a transient failure, jittered, then doubling: a gateway that
shed one call under load usually takes the next one a few tens of milliseconds later."""
_RETRY_MAX_S = 2.0
"""The longest pause between two attempts: past it, the budget (Settings.gateway_budget_s) is
better spent keeping the payment for re-validation than waiting."""

_TRANSIENT_STATUSES = frozenset({408, 425, 429})
# Our credentials refused: an outage of ours, not the payment's decline, and one that retrying
# with the same credentials cannot end (so no retries: they would be a storm of refusals).
_REFUSED_STATUSES = frozenset({401, 403, 407})


def idempotency_key(payment_id: str) -> str:
    """The key of every gateway call for this payment: the same from any instance, at any time,
    and a valid header value of fixed length whatever characters the payment_id holds. (A
    digest: uuid5 took 5 us a call, a twentieth of a payment's processing.)"""
    return hashlib.sha256(b"paystream idempotency\0" + payment_id.encode()).hexdigest()[:32]


Decision = Approved | Declined
"""The gateway's answer to one payment (rules.Verdict adds the answer that never came)."""


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Stops calling a gateway that keeps failing, so an outage is not a flood of timeouts.

    closed → (`threshold` transient failures in a row) → open for `cooldown_s` (doubling up to
    `max_cooldown_s` while probes keep failing) → half-open: one probe call decides.
    """

    def __init__(
        self,
        *,
        threshold: int = 20,
        cooldown_s: float = 2.0,
        max_cooldown_s: float = 30.0,
        open_gauge: Gauge | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """The defaults are Settings' gateway_breaker_* defaults. `open_gauge` reads 1 while the
        breaker is open; `clock` tells the time in seconds."""
        self._threshold = threshold
        self._base_cooldown_s = cooldown_s
        self._max_cooldown_s = max_cooldown_s
        self._cooldown_s = cooldown_s
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self._clock = clock
        if open_gauge is not None:
            # Read from the state when scraped: a gauge set on calls would stay at 1 after the
            # cool-down for as long as no call comes (an alert firing on an idle gateway).
            open_gauge.set_function(lambda: float(self.state is BreakerState.OPEN))

    @property
    def state(self) -> BreakerState:
        if self._failures < self._threshold:
            return BreakerState.CLOSED
        if self._clock() >= self._open_until:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def allow(self) -> bool:
        if self._failures < self._threshold:
            return True
        match self.state:
            case BreakerState.HALF_OPEN if not self._probing:
                self._probing = True
                return True
            case _:
                return False

    def succeeded(self) -> None:
        if self._failures or self._probing:
            self._failures = 0
            self._probing = False
            self._cooldown_s = self._base_cooldown_s

    def abandoned(self) -> None:
        """A call was cancelled before it had an outcome: a probe's turn passes to the next."""
        self._probing = False

    def failed(self) -> None:
        self._failures += 1
        if self._probing:
            self._cooldown_s = min(self._cooldown_s * 2, self._max_cooldown_s)
        self._probing = False
        if self._failures >= self._threshold:
            self._open_until = self._clock() + self._cooldown_s


class OldestFirst:
    """A limit on concurrent calls where a free slot goes to the oldest caller (lowest
    `priority`), whether it is queued or just arriving.

    Batches that validate at once would otherwise share the slots round-robin, finish their
    gateway calls together and then all wait on the database while the gateway idles. Served
    oldest batch first, one batch is written while the next is being validated.

    A released slot is handed over on the event loop's next turn, not at once: the caller that
    released it usually asks again in the same step (a lane moving to its batch's next payment),
    and handing over at once would give the slot to a queued younger batch every time.
    """

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self._handing_over = False

    async def acquire(self, priority: float) -> None:
        """Wait for a slot; `release` it when done."""
        if self._free > 0 and (not self._waiters or priority < self._waiters[0][0]):
            self._free -= 1
            return
        handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._arrivals), handed))
        if self._free > 0:  # free, but an older waiter (perhaps one since cancelled) is queued
            self._hand_over_soon()
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self.release()  # the slot was handed over just as this waiter was cancelled
            raise

    def release(self) -> None:
        self._free += 1
        if self._waiters:
            self._hand_over_soon()

    def _hand_over_soon(self) -> None:
        if not self._handing_over:
            self._handing_over = True
            asyncio.get_running_loop().call_soon(self._hand_over)

    def _hand_over(self) -> None:
        self._handing_over = False
        while self._free > 0 and self._waiters:
            _, _, handed = heapq.heappop(self._waiters)
            if not handed.done():  # a cancelled waiter is skipped
                self._free -= 1
                handed.set_result(None)


class Gateway:
    """Validates through the shared third-party client, within the in-flight limit."""

    def __init__(
        self,
        client: Client,
        base_url: str,
        *,
        max_in_flight: int,
        timeout_s: float,
        attempts: int,
        budget_s: float,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._client = client
        self._url = base_url.rstrip("/") + "/payment"
        self._max_in_flight = max_in_flight
        self._slots = OldestFirst(max_in_flight)
        self._timeout = timedelta(seconds=timeout_s)
        self._attempts = attempts
        self._budget_s = budget_s
        self.breaker = breaker or CircuitBreaker()

    async def validate_all(
        self,
        payments: Sequence[tuple[str, bytes]],
        traceparents: Sequence[str | None] | None = None,
    ) -> list[Decision | GatewayUnavailable]:
        """Validate each (payment_id, body); the verdicts (or why there is none) in that order.
        `traceparents`: each payment's producer's trace context, its calls' parent (tracing).

        At most the in-flight limit of lanes work through the list: a task per payment, most of
        them queued on the limit, cost a sixth of the processor's CPU when profiled. The calls of
        an earlier `validate_all` go first.
        """
        priority = time.monotonic()
        pending = iter(enumerate(payments))
        answers: dict[int, Decision | GatewayUnavailable] = {}
        parents = traceparents if traceparents is not None and tracing.enabled() else None

        async def lane() -> None:
            for i, (payment_id, body) in pending:
                try:
                    if parents is None:
                        answers[i] = await self.validate(payment_id, body, priority)
                    else:
                        with tracing.span("paystream.gateway.validate", parent=parents[i]):
                            answers[i] = await self.validate(payment_id, body, priority)
                except GatewayUnavailable as exc:
                    answers[i] = exc

        async with asyncio.TaskGroup() as group:
            for _ in range(min(self._max_in_flight, len(payments))):
                group.create_task(lane())
        return [answers[i] for i in range(len(payments))]

    async def validate(
        self, payment_id: str, body: bytes, priority: float | None = None
    ) -> Decision:
        """POST the payment as it arrived. Raises GatewayUnavailable once the budget is spent
        (CircuitOpen when the breaker refused the first attempt, so nothing was sent).

        The first attempt is made directly: building a retry context costs about as much CPU as
        the HTTP call itself (profiled), and nearly every call succeeds the first time.
        """
        started = time.monotonic()
        priority = started if priority is None else priority
        headers = {"Idempotency-Key": idempotency_key(payment_id)}
        try:
            return await self._attempt(body, headers, priority)
        except Misconfigured as exc:
            raise GatewayUnavailable(str(exc)) from exc
        except AttemptFailed as exc:
            if self._attempts <= 1:
                raise GatewayUnavailable(str(exc)) from exc
        # stamina's first iteration runs at once: the back-off before it is this jittered pause.
        await asyncio.sleep(random.uniform(_RETRY_FIRST_S / 2, _RETRY_FIRST_S * 1.5))
        remaining_s = max(self._budget_s - (time.monotonic() - started), 0.001)
        try:
            async for attempt in stamina.retry_context(
                on=AttemptFailed,
                attempts=self._attempts - 1,
                timeout=remaining_s,
                wait_initial=_RETRY_FIRST_S,
                wait_max=_RETRY_MAX_S,
            ):
                with attempt:
                    return await self._attempt(body, headers, priority)
        except (AttemptFailed, Misconfigured, CircuitOpen) as exc:  # the first attempt was sent
            raise GatewayUnavailable(str(exc)) from exc
        raise AssertionError("unreachable: retry_context either returns or raises")

    async def _attempt(self, body: bytes, headers: Mapping[str, str], priority: float) -> Decision:
        if not self.breaker.allow():
            raise CircuitOpen("circuit open after repeated gateway failures")
        try:
            verdict = await self._call(body, headers, priority)
        except (AttemptFailed, Misconfigured):
            self.breaker.failed()
            raise
        except asyncio.CancelledError:
            self.breaker.abandoned()  # else a cancelled probe would leave it half-open for good
            raise
        self.breaker.succeeded()
        return verdict

    async def _call(self, body: bytes, headers: Mapping[str, str], priority: float) -> Decision:
        if not tracing.enabled():
            return await self._call_once(body, headers, priority)
        with tracing.span(
            "POST /payment", kind=SpanKind.CLIENT, attributes={"server.address": self._url}
        ):
            return await self._call_once(body, {**headers, **tracing.headers()}, priority)

    async def _call_once(
        self, body: bytes, headers: Mapping[str, str], priority: float
    ) -> Decision:
        await self._slots.acquire(priority)
        started = time.perf_counter()
        try:
            answer = await post(self._client, self._url, body, self._timeout, headers)
        except Unanswered as exc:
            _calls("timeout" if exc.timed_out else "connection_error").inc()
            raise AttemptFailed(f"gateway {exc}") from exc
        finally:
            self._slots.release()
            GATEWAY_SECONDS.observe(time.perf_counter() - started)
        status = answer.status
        _calls(status).inc()
        tracing.annotate("http.response.status_code", status)
        if 200 <= status < 300:
            return Approved(status)
        if status >= 500 or status in _TRANSIENT_STATUSES:
            raise AttemptFailed(f"gateway answered HTTP {status}")
        if status in _REFUSED_STATUSES:
            raise CredentialsRefused(_refusal(status))
        if answer.redirected:
            raise Redirected(_redirection(answer))
        return Declined(status)

    async def check_credentials(self) -> None:
        """At start-up: raise ConfigurationError if the gateway refuses our credentials or its
        certificate is not trusted. The call carries no payment (`{}`), so a gateway that takes
        us answers 4xx; one that cannot be reached is an outage, not a configuration error, and
        the processor starts anyway (payments wait, kept, until it is back)."""
        try:
            answer = await post(
                self._client, self._url, b"{}", self._timeout, {"Idempotency-Key": "check"}
            )
        except Unanswered as exc:
            if "certificate" in str(exc.__cause__).lower():
                raise ConfigurationError(
                    f"The gateway's TLS certificate at {self._url} is not trusted; set "
                    "PAYSTREAM_THIRD_PARTY_CA_FILE to the CA bundle that signed it."
                ) from exc
            log.warning("gateway not reachable at start-up (%s): payments wait until it is", exc)
            return
        if answer.status in _REFUSED_STATUSES:
            raise ConfigurationError(_refusal(answer.status) + ".")
        if answer.redirected:
            raise ConfigurationError(f"{_redirection(answer)}.")


def _refusal(status: int) -> str:
    return (
        f"the gateway refused our credentials (HTTP {status}); check PAYSTREAM_GATEWAY_TOKEN "
        "and PAYSTREAM_GATEWAY_AUTH_HEADER"
    )


def _redirection(answer: Answer) -> str:
    return (
        f"the gateway answered {answer.describe()}: set PAYSTREAM_GATEWAY_URL to where the "
        "gateway is (redirects are never followed: they would carry card numbers elsewhere)"
    )


@functools.cache
def _calls(outcome: int | str) -> Counter:
    """The gateway-calls counter of one outcome (looked up once: `labels` takes a lock)."""
    return GATEWAY_CALLS.labels(outcome=str(outcome))
