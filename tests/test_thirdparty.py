"""The third party answering as a hostile or broken peer would: redirects, huge bodies, one
report refused for good. Faked at the transport (tests.peers); the database is the real one."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import orjson
import pytest
from aiohttp import web
from pyreqwest.client import Client

from paystream import store
from paystream.app import open_pool, topic_types
from paystream.errors import ConfigurationError, GatewayUnavailable, ReportFailed, ReportRefused
from paystream.gateway import Gateway
from paystream.model import ErrorType, Kept, Reason, Record, RecordId
from paystream.outbox import MAX_REFUSALS, LogClient, OutboxRelay
from paystream.pipeline import Pipeline
from paystream.thirdparty import MAX_ANSWER_BYTES, post, third_party_client
from tests.conftest import Env
from tests.peers import peer, status

CARD = "4111111111111111"
_ONLINE = {"account_id": 7, "payment_type": "online", "credit_card": CARD, "amount": 12}


def _gateway(client: Client, url: str) -> Gateway:
    return Gateway(client, url, max_in_flight=4, timeout_s=2, attempts=3, budget_s=3)


def _record(env: Env, offset: int, payment_id: str) -> Record:
    value = orjson.dumps({"payment_id": payment_id, **_ONLINE})
    record_id = RecordId(topic=env.online_topic, partition=0, offset=offset, timestamp_ms=1)
    return Record(id=record_id, value=value)


@pytest.mark.parametrize("elsewhere", [True, False], ids=["other-host", "same-host"])
async def test_a_gateway_redirect_is_never_followed_and_never_an_approval(
    env: Env, elsewhere: bool
) -> None:
    """A 307 from the gateway sends nothing where it points, stores nothing, and keeps the
    payment as waiting on the gateway, its description naming the status and the target host
    (never the payment); it is not retried, since the same URL answers the same."""
    async with peer(status(200)) as target:
        where = target.url if elsewhere else "/approved"
        async with peer(status(307, Location=f"{where}/payment")) as gateway_peer:
            settings = env.settings(gateway_url=gateway_peer.url)
            async with open_pool(settings) as pool, third_party_client(4) as client:
                pipeline = Pipeline(pool, _gateway(client, gateway_peer.url), topic_types(settings))
                result = await pipeline.process([_record(env, 0, "redirected-1")])
            assert [] == target.received
            assert 1 == len(gateway_peer.received)  # tried once: no retries, no second hop
    assert (0, 1) == (result.stored, result.kept)
    assert [(0,)] == env.query("SELECT count(*) FROM payments")
    ((reason, description),) = env.query("SELECT reason, description FROM paystream.kept_records")
    assert Reason.GATEWAY_UNAVAILABLE == reason
    host = target.url.removeprefix("http://") if elsewhere else "the same host"
    assert f"HTTP 307, a redirect to {host} (not followed)" in description
    assert CARD not in description


async def test_the_start_up_check_refuses_a_redirecting_gateway() -> None:
    """A gateway URL that redirects is a configuration error named in one sentence at start-up."""
    async with (
        peer(status(301, Location="https://gateway.example/payment")) as gateway_peer,
        third_party_client(2) as client,
    ):
        with pytest.raises(ConfigurationError, match=r"HTTP 301, a redirect to gateway\.example"):
            await _gateway(client, gateway_peer.url).check_credentials()


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        ("http://ev<il>.example/x", "an unreadable host"),
        ("http://[::1", "an unreadable host"),
        ("", "nowhere (no Location)"),
        ("//10.0.0.1:8443/pay", "10.0.0.1:8443"),
    ],
)
async def test_a_redirect_names_its_target_safely(location: str, shown: str) -> None:
    """Whatever a Location holds, the description names a host or says it cannot."""
    headers = {"Location": location} if location else {}
    async with peer(status(302, **headers)) as gateway_peer, third_party_client(2) as client:
        with pytest.raises(GatewayUnavailable, match="a redirect to") as raised:
            await _gateway(client, gateway_peer.url).validate("p", b"{}")
    assert f"a redirect to {shown} (not followed)" in str(raised.value)


async def test_a_log_api_redirect_is_not_a_delivery() -> None:
    """A report answered with a redirect is not delivered (the outbox sends it again), and the
    target receives nothing."""
    async with peer(status(200)) as target, peer(status(308, Location=target.url)) as log_api:
        async with third_party_client(2) as client:
            with pytest.raises(
                ReportFailed, match=r"HTTP 308, a redirect to 127\.0\.0\.1"
            ) as raised:
                await LogClient(client, log_api.url, 2).send("p", ErrorType.OTHER, "why")
        assert not isinstance(raised.value, ReportRefused)
        assert [] == target.received


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_an_oversized_answer_is_read_no_further_than_the_bound(declared: bool) -> None:
    """A 200 with a 256 MB body is answered by its status, after at most MAX_ANSWER_BYTES of
    it are read; the connection is dropped, so the server cannot send the rest."""
    total = 256 * 2**20
    chunk = b"x" * 2**20
    sent: list[int] = []
    ended = asyncio.Event()

    async def huge(request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        if declared:
            response.content_length = total
        await response.prepare(request)
        written = 0
        try:
            while written < total:
                await response.write(chunk)
                written += len(chunk)
        except (ConnectionResetError, ConnectionError):
            pass
        sent.append(written)
        ended.set()
        return response

    async with peer(huge) as gateway_peer, third_party_client(2) as client:
        started = time.monotonic()
        answer = await post(client, gateway_peer.url + "/payment", b"{}", timedelta(seconds=30))
        assert 200 == answer.status
        # The server notices the dropped connection once its socket buffers are full.
        await asyncio.wait_for(ended.wait(), 30)
    assert sent[0] < total // 4, f"{sent[0]} bytes sent: the answer was read far past the bound"
    assert time.monotonic() - started < 30
    assert MAX_ANSWER_BYTES < total


def _kept(env: Env, offset: int, payment_id: str) -> Kept:
    record = Record(
        id=RecordId(topic=env.offline_topic, partition=0, offset=offset, timestamp_ms=1),
        value=b"{}",
    )
    return Kept(record=record, payment_id=payment_id, reason=Reason.INVALID, description="bad")


async def _refusing(request: web.Request, body: bytes) -> web.StreamResponse:
    """A log API that takes every report but one, which it refuses for good."""
    if orjson.loads(body)["payment_id"] == "poison":
        return web.Response(status=422, text="unprocessable")
    return web.Response(status=201)


async def test_a_report_refused_for_good_slows_no_other_and_ends_undeliverable(env: Env) -> None:
    """A log API refusing one report (422) while taking the others: each round delivers the
    others and does not count as failed (no back-off for them); after MAX_REFUSALS refusals
    the report is undeliverable, no longer claimed, and listed with why."""
    settings = env.settings()
    async with (
        peer(_refusing) as log_api,
        open_pool(settings) as pool,
        third_party_client(4) as client,
    ):
        relay = OutboxRelay(pool, LogClient(client, log_api.url, 2), claim_batch=50, idle_s=0.1)
        async with pool.connection() as conn:
            await store.insert_kept(conn, [_kept(env, 0, "poison")])
        for round_no in range(MAX_REFUSALS):
            async with pool.connection() as conn:
                others = [
                    _kept(env, 1 + round_no * 10 + i, f"fine-{round_no}-{i}") for i in range(10)
                ]
                await store.insert_kept(conn, others)
                # The poison's own back-off is not what this test is about: make it due now.
                await conn.execute("UPDATE paystream.kept_records SET next_report_at = now()")
            done = await relay.relay_once()
            assert (10, 1, 0) == (done.delivered, done.refused, done.failed)
        assert (0, 0, 0) == _counts(await relay.relay_once())
        async with pool.connection() as conn:
            (row,) = await store.list_kept(conn, store.KeptFilter(payment_id="poison"))
            assert 1 == await store.undeliverable_reports(conn)
            assert 0 == await store.outbox_depth(conn)
    listed = row.as_json()
    assert listed["undeliverable"] is True
    assert listed["reported"] is False
    assert "log service refused the report (HTTP 422)" == listed["last_report_error"]
    poison = [b for path, b in log_api.received if b"poison" in b]
    assert MAX_REFUSALS == len(poison)
    assert 10 * MAX_REFUSALS == len(log_api.received) - len(poison)


def _counts(done: object) -> tuple[int, int, int]:
    from paystream.outbox import RelayRound

    assert isinstance(done, RelayRound)
    return done.delivered, done.refused, done.failed


async def test_a_log_api_refusing_everyone_for_our_sake_marks_nothing_undeliverable(
    env: Env,
) -> None:
    """A 404 (a wrong URL) or a 401 is about us, not about a report: the round fails and backs
    off, and no report is ever marked undeliverable by it."""
    settings = env.settings()
    async with (
        peer(status(404)) as log_api,
        open_pool(settings) as pool,
        third_party_client(4) as client,
    ):
        relay = OutboxRelay(pool, LogClient(client, log_api.url, 2), claim_batch=50, idle_s=0.1)
        async with pool.connection() as conn:
            await store.insert_kept(conn, [_kept(env, i, f"k-{i}") for i in range(3)])
        for _ in range(MAX_REFUSALS + 1):
            async with pool.connection() as conn:
                await conn.execute("UPDATE paystream.kept_records SET next_report_at = now()")
            assert (0, 0, 3) == _counts(await relay.relay_once())
        async with pool.connection() as conn:
            assert 0 == await store.undeliverable_reports(conn)
            assert 3 == await store.outbox_depth(conn)


async def test_an_answer_whose_body_never_ends_is_unanswered_within_the_timeout() -> None:
    """A peer that sends its status, then a body it never finishes (a byte a second), is an
    attempt that timed out after the call's timeout: its 200 is not an approval."""

    async def trickle(request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_length = 1_000
        await response.prepare(request)
        try:
            for _ in range(1_000):
                await response.write(b"x")
                await asyncio.sleep(1)  # the hostile peer's pace, not a wait of the test's
        except (ConnectionResetError, ConnectionError):
            pass
        return response

    async with peer(trickle) as gateway_peer, third_party_client(2) as client:
        started = time.monotonic()
        with pytest.raises(GatewayUnavailable, match="gateway timed out"):
            await _gateway(client, gateway_peer.url).validate("p", b"{}")
        assert time.monotonic() - started < 10  # attempts of 2 s within a 3 s budget
