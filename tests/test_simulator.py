"""The simulator: every endpoint, the fault knobs, and /start producing the ledger's stream."""

from __future__ import annotations

import asyncio
import base64
import time
import urllib.error
import urllib.request
from collections import Counter

import aiohttp
import psycopg
import pytest
from confluent_kafka import Consumer

from paystream.migrations import migrate
from paystream_tooling.polling import until
from paystream_tooling.simulator.streams import is_declined
from tests.conftest import Env, SimulatorClient


def _post(url: str, body: bytes, timeout_s: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _payment(pid: str, delay: int = 0) -> bytes:
    return (
        f'{{"payment_id": "{pid}", "account_id": 1, "payment_type": "online",'
        f' "credit_card": "4111", "amount": 10, "delay": {delay}}}'
    ).encode()


def _find_ids(declined: bool, count: int = 3) -> list[str]:
    ids = [f"pay-{i}" for i in range(200) if is_declined(f"pay-{i}", 0.1) is declined]
    return ids[:count]


def test_home_page_has_start_and_logs_buttons(simulator: SimulatorClient) -> None:
    """GET / is the original's HTML page with its two buttons."""
    with urllib.request.urlopen(simulator.url + "/", timeout=10) as response:
        page = response.read().decode()
    assert 'href="/start"' in page
    assert 'href="/logs"' in page


def test_openapi_documents_every_endpoint(simulator: SimulatorClient) -> None:
    """The OpenAPI schema lists the gateway, log API, start and fault endpoints."""
    paths = set(simulator.request("GET", "/openapi.json")["paths"])
    assert {"/", "/start", "/logs", "/log", "/payment", "/faults", "/status", "/ledger"} <= paths


def test_gateway_verdicts_are_deterministic(simulator: SimulatorClient) -> None:
    """The same payment always gets the same answer: 200 approves, 402 declines."""
    for pid in _find_ids(declined=False):
        assert [_post(simulator.url + "/payment", _payment(pid))[0] for _ in range(2)] == [200, 200]
    for pid in _find_ids(declined=True):
        assert [_post(simulator.url + "/payment", _payment(pid))[0] for _ in range(2)] == [402, 402]


def test_gateway_rejects_non_json(simulator: SimulatorClient) -> None:
    """A body that is not a JSON payment is a 400."""
    assert _post(simulator.url + "/payment", b"not json")[0] == 400


def test_gateway_latency_follows_the_delay_field(simulator: SimulatorClient) -> None:
    """The answer takes about `delay` ms, capped by max_delay_ms."""
    simulator.faults(max_delay_ms=300)
    pid = _find_ids(declined=False)[0]
    started = time.monotonic()
    _post(simulator.url + "/payment", _payment(pid, delay=250))
    assert time.monotonic() - started >= 0.25
    started = time.monotonic()
    _post(simulator.url + "/payment", _payment(pid, delay=0))
    fast = time.monotonic() - started
    assert fast < 0.25


def test_fault_knobs_error_outage_and_recovery(simulator: SimulatorClient) -> None:
    """error_rate=1 and the outage switch answer 503; clearing them restores 200."""
    pid = _find_ids(declined=False)[0]
    simulator.faults(error_rate=1.0)
    assert _post(simulator.url + "/payment", _payment(pid))[0] == 503
    simulator.faults(error_rate=0.0, gateway_outage=True)
    assert _post(simulator.url + "/payment", _payment(pid))[0] == 503
    simulator.faults(gateway_outage=False)
    assert _post(simulator.url + "/payment", _payment(pid))[0] == 200


def test_hanging_calls_outlast_the_client_timeout(simulator: SimulatorClient) -> None:
    """hang_rate=1 keeps the call open past a 0.5 s client timeout."""
    simulator.faults(hang_rate=1.0, hang_s=5)
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        _post(simulator.url + "/payment", _payment("hang-1"), timeout_s=0.5)


def test_dropped_connections(simulator: SimulatorClient) -> None:
    """drop_rate=1 aborts the connection without an HTTP answer."""
    simulator.faults(drop_rate=1.0)

    async def call() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(simulator.url + "/payment", data=_payment("drop-1")) as response,
        ):
            await response.read()

    with pytest.raises(aiohttp.ClientError):
        asyncio.run(call())


def test_log_accepts_either_key_and_lists_reports(simulator: SimulatorClient) -> None:
    """POST /log takes `error_type` or `error`, echoes with created_at; GET /logs shows both."""
    first = simulator.request(
        "POST", "/log", {"payment_id": "a", "error_type": "network", "error_description": "x"}
    )
    second = simulator.request(
        "POST", "/log", {"payment_id": "b", "error": "database", "error_description": "y"}
    )
    assert (first["error_type"], second["error_type"]) == ("network", "database")
    assert first["created_at"]
    assert [(e["payment_id"], e["error_type"]) for e in simulator.logs()] == [
        ("a", "network"),
        ("b", "database"),
    ]
    with urllib.request.urlopen(simulator.url + "/logs", timeout=10) as response:
        page = response.read().decode()
    assert "<table>" in page
    assert "database" in page


def test_log_rejects_non_json_and_has_an_outage_switch(simulator: SimulatorClient) -> None:
    """Non-JSON is a 4xx; during a log outage every report gets 503."""
    assert _post(simulator.url + "/log", b"{oops")[0] == 400
    simulator.faults(log_outage=True)
    status, _ = _post(simulator.url + "/log", b'{"payment_id": "a", "error_type": "other"}')
    assert status == 503
    assert simulator.logs() == []


def test_start_puts_the_ledger_stream_into_kafka(env: Env, simulator: SimulatorClient) -> None:
    """/start produces exactly the ledger's records, each at the partition/offset it names,
    and the original profile has the original's shape."""
    simulator.start(records=1038, seed=7)
    simulator.wait_produced()
    ledger = simulator.ledger()
    assert len(ledger) == 1038
    ids = Counter(e["payment_id"] for e in ledger)
    assert 500 <= len(ids) <= 530
    assert min(ids.values()) >= 2
    online = sum(e["topic"] == env.online_topic for e in ledger) / len(ledger)
    assert 0.6 < online < 0.78

    consumer = Consumer(
        {
            "bootstrap.servers": env.stack.kafka.bootstrap,
            "group.id": f"check-{env.name}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([env.online_topic, env.offline_topic])
    seen: dict[tuple[str | None, int | None, int | None], bytes | None] = {}
    try:

        def read_all() -> bool:
            for message in consumer.consume(500, 0.2):
                if message.error() is None:
                    key = (message.topic(), message.partition(), message.offset())
                    seen[key] = message.value()
            return len(seen) >= len(ledger)

        until(read_all, 30, "every produced record", every_s=0)
    finally:
        consumer.close()
    expected = {
        (e["topic"], e["partition"], e["offset"]): base64.b64decode(e["value_b64"]) for e in ledger
    }
    assert expected == seen


def test_start_clears_payments_and_logs(env: Env, simulator: SimulatorClient) -> None:
    """Like the original, /start deletes every payment and resets the logs; and the stamps a
    processor left due for the deleted payments, which a later pass would otherwise apply."""
    env.execute(
        "INSERT INTO payments (payment_id, account_id, payment_type, amount)"
        " VALUES ('old', 1, 'offline', 5)"
    )
    env.execute("UPDATE accounts SET last_payment_date = now() WHERE account_id = 1")
    asyncio.run(_migrate(env))
    env.execute("INSERT INTO paystream.stamps_due (account_id, latest) VALUES (2, now())")
    simulator.request("POST", "/log", {"payment_id": "a", "error_type": "other"})
    simulator.start(records=10)
    assert env.query("SELECT count(*) FROM payments") == [(0,)]
    assert env.query("SELECT count(last_payment_date) FROM accounts") == [(0,)]
    assert env.query("SELECT count(*) FROM paystream.stamps_due") == [(0,)]
    assert simulator.logs() == []


async def _migrate(env: Env) -> None:
    async with await psycopg.AsyncConnection.connect(env.database_url) as conn:
        await migrate(conn)
