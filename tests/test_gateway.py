"""The gateway client's in-flight limit and batch validation, against the real simulator."""

from __future__ import annotations

import asyncio
import random
import uuid

import orjson
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from paystream.errors import GatewayUnavailable
from paystream.gateway import (
    BreakerState,
    CircuitBreaker,
    Decision,
    Gateway,
    OldestFirst,
    idempotency_key,
)
from paystream.model import Approved, Declined
from paystream.thirdparty import third_party_client
from paystream_tooling.devenv.processes import free_port
from paystream_tooling.simulator.streams import is_declined
from tests.conftest import SimulatorClient, async_wait_for


def _body(payment_id: str) -> bytes:
    """An online payment as the gateway receives it."""
    return orjson.dumps(
        {
            "payment_id": payment_id,
            "account_id": 1,
            "payment_type": "online",
            "credit_card": "4111111111111111",
            "amount": 10,
        }
    )


_ID = "c0ffee00-0000-4000-8000-000000000000"
_BODY = _body(_ID)


async def _queue(slots: OldestFirst, priority: float, served: list[float]) -> None:
    await slots.acquire(priority)
    served.append(priority)
    slots.release()


async def test_waiters_get_the_slot_oldest_first() -> None:
    """Whatever order they arrive in, waiters are served by ascending priority."""
    slots = OldestFirst(1)
    served: list[float] = []
    await slots.acquire(0)  # the only slot, held while the waiters queue
    async with asyncio.TaskGroup() as group:
        for priority in (3.0, 1.0, 2.0):
            group.create_task(_queue(slots, priority, served))
        await async_wait_for(lambda: len(slots._waiters) == 3, 5, "three waiters")
        slots.release()
    assert [1.0, 2.0, 3.0] == served


async def test_a_cancelled_waiter_does_not_keep_a_slot() -> None:
    """A waiter cancelled while queued is skipped, and the limit is whole again afterwards."""
    slots = OldestFirst(1)
    served: list[float] = []
    await slots.acquire(0)
    async with asyncio.TaskGroup() as group:
        doomed = group.create_task(_queue(slots, 1.0, served))
        group.create_task(_queue(slots, 2.0, served))
        await async_wait_for(lambda: len(slots._waiters) == 2, 5, "two waiters")
        doomed.cancel()
        slots.release()
    assert [2.0] == served
    async with asyncio.timeout(5):  # free at once: nothing leaked
        await slots.acquire(9.0)
    slots.release()
    assert slots._free == 1


async def test_a_released_slot_goes_to_an_older_caller_asking_again() -> None:
    """The oldest batch keeps its pace: a slot released by one of its calls goes to its next
    call, asked for in the same step, rather than to a younger batch's queued call."""
    slots = OldestFirst(1)
    served: list[float] = []
    await slots.acquire(0)
    async with asyncio.TaskGroup() as group:
        group.create_task(_queue(slots, 1.0, served))
        await async_wait_for(lambda: len(slots._waiters) == 1, 5, "a younger waiter")
        slots.release()
        await slots.acquire(0)  # asked again in the same step as the release
        served.append(0.0)
        slots.release()
    assert [0.0, 1.0] == served


def state(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state now (a call: mypy would take a property read twice as unchanged)."""
    return breaker.state


def test_the_breaker_opens_probes_once_and_closes_on_success() -> None:
    """Closed until `threshold` failures in a row; open for the cool-down (the gauge says so
    until it has passed, call or no call); then exactly one probe; a successful one closes it."""
    now = [100.0]
    registry = CollectorRegistry()
    gauge = Gauge("circuit_open", "", registry=registry)
    breaker = CircuitBreaker(threshold=3, cooldown_s=1.0, open_gauge=gauge, clock=lambda: now[0])
    for _ in range(3):
        assert breaker.allow()
        breaker.failed()
    assert BreakerState.OPEN == state(breaker)
    assert not breaker.allow()
    assert 1 == registry.get_sample_value("circuit_open")
    now[0] += 0.999
    assert BreakerState.OPEN == state(breaker)
    now[0] += 0.001
    assert BreakerState.HALF_OPEN == state(breaker)
    assert 0 == registry.get_sample_value("circuit_open")  # no call needed
    assert breaker.allow()
    assert not breaker.allow()  # one probe at a time
    breaker.succeeded()
    assert BreakerState.CLOSED == state(breaker)
    assert breaker.allow()
    assert 0 == registry.get_sample_value("circuit_open")


def test_a_failed_probe_doubles_the_cooldown_up_to_its_cap() -> None:
    """Each failed probe opens the breaker for twice as long, never beyond `max_cooldown_s`; a
    successful one brings the cool-down back to its start."""
    now = [0.0]
    breaker = CircuitBreaker(threshold=1, cooldown_s=1.0, max_cooldown_s=3.0, clock=lambda: now[0])
    breaker.failed()
    opened_for = []
    for _ in range(4):
        start = now[0]
        while state(breaker) is BreakerState.OPEN:
            now[0] += 0.25
        opened_for.append(now[0] - start)
        assert breaker.allow()
        breaker.failed()
    assert [1.0, 2.0, 3.0, 3.0] == opened_for
    while state(breaker) is BreakerState.OPEN:
        now[0] += 0.25
    assert breaker.allow()
    breaker.succeeded()
    breaker.failed()
    start = now[0]
    while state(breaker) is BreakerState.OPEN:
        now[0] += 0.25
    assert 1.0 == now[0] - start


def test_a_cancelled_probe_lets_the_next_call_probe() -> None:
    """A half-open breaker whose probe was cancelled (no outcome) lets the next call probe,
    instead of refusing every call for good."""
    now = [0.0]
    breaker = CircuitBreaker(threshold=1, cooldown_s=0.2, clock=lambda: now[0])
    breaker.failed()
    now[0] += 0.2
    assert BreakerState.HALF_OPEN == state(breaker)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.abandoned()
    assert breaker.allow()


async def test_every_call_for_a_payment_carries_its_idempotency_key(
    simulator: SimulatorClient,
) -> None:
    """Retries of one payment, and a later re-validation of it, send the same Idempotency-Key,
    derived from its payment_id; another payment sends another."""
    simulator.faults(error_rate=1.0)
    async with third_party_client(4) as client:
        gateway = Gateway(
            client,
            simulator.url,
            max_in_flight=4,
            timeout_s=1,
            attempts=3,
            budget_s=5,
            breaker=CircuitBreaker(threshold=100),
        )
        with pytest.raises(GatewayUnavailable):
            await gateway.validate(_ID, _BODY)
        simulator.faults(error_rate=0)
        await gateway.validate(_ID, _BODY)
        other = str(uuid.UUID(int=1, version=4))
        await gateway.validate(other, _body(other))
    assert {idempotency_key(_ID): 4} == simulator.gateway_calls(_ID)
    assert {idempotency_key(other): 1} == simulator.gateway_calls(other)
    assert idempotency_key(_ID) != idempotency_key(other)


async def test_validate_all_answers_each_payment_in_order(simulator: SimulatorClient) -> None:
    """Verdicts come back in the order of the bodies, each the simulator's own for that id,
    with fewer lanes than payments."""
    rng = random.Random(7)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(300)]
    payments = [(pid, _body(pid)) for pid in ids]
    async with third_party_client(16) as client:
        gateway = Gateway(
            client, simulator.url, max_in_flight=16, timeout_s=2, attempts=2, budget_s=3
        )
        verdicts: list[Decision | GatewayUnavailable] = await gateway.validate_all(payments)
    expected = [Declined if is_declined(pid, 0.1) else Approved for pid in ids]
    assert expected == [type(v) for v in verdicts]
    assert Declined in expected
    assert Approved in expected


@pytest.mark.parametrize(
    ("faults", "reason"),
    [
        ({"hang_rate": 1.0, "hang_s": 5}, "gateway timed out"),
        ({"drop_rate": 1.0}, r"gateway connection failed \(\w+\)"),
        ({"error_rate": 1.0}, "gateway answered HTTP 503"),
    ],
)
async def test_a_failing_gateway_makes_the_payment_wait_with_the_reason(
    simulator: SimulatorClient, faults: dict[str, float], reason: str
) -> None:
    """Hangs past the timeout, dropped connections and 5xx are retried, then end in
    GatewayUnavailable saying which it was; the client is still usable afterwards."""
    simulator.faults(**faults)
    async with third_party_client(4) as client:
        gateway = Gateway(
            client, simulator.url, max_in_flight=4, timeout_s=0.3, attempts=2, budget_s=2
        )
        with pytest.raises(GatewayUnavailable, match=reason):
            await gateway.validate(_ID, _BODY)
        simulator.faults(hang_rate=0, drop_rate=0, error_rate=0)
        assert isinstance(await gateway.validate(_ID, _BODY), Approved | Declined)


async def test_refused_credentials_are_an_outage_tried_once(simulator: SimulatorClient) -> None:
    """A gateway refusing our credentials (401) makes the payment wait, never a decline, says
    which settings to check, and is not retried: the same credentials would be refused again."""
    simulator.faults(credentials_revoked=True)

    def refused() -> float:
        return REGISTRY.get_sample_value("paystream_gateway_calls_total", {"outcome": "401"}) or 0

    before = refused()
    async with third_party_client(4) as client:
        gateway = Gateway(
            client, simulator.url, max_in_flight=4, timeout_s=1, attempts=3, budget_s=5
        )
        with pytest.raises(GatewayUnavailable, match=r"refused our credentials \(HTTP 401\)"):
            await gateway.validate(_ID, _BODY)
    assert 1 == refused() - before


async def test_a_gateway_nobody_answers_on_is_unavailable() -> None:
    async with third_party_client(4) as client:
        gateway = Gateway(
            client,
            f"http://127.0.0.1:{free_port()}",
            max_in_flight=4,
            timeout_s=1,
            attempts=2,
            budget_s=2,
        )
        with pytest.raises(GatewayUnavailable, match=r"gateway connection failed \(\w+\)"):
            await gateway.validate(_ID, _BODY)
