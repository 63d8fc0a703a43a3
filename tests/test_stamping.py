"""Account stamps left due by batches and applied by stamping passes (paystream.stamping), on
the real database: what a pass applies, across pipelines, and how passes are shared."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from paystream.app import open_pool, topic_types
from paystream.gateway import Gateway
from paystream.model import Record, RecordId
from paystream.pipeline import Pipeline
from paystream.thirdparty import third_party_client
from tests.conftest import Env, async_wait_for, caught_up, processor

_WRONG_DATES = (
    "SELECT count(*) FROM accounts a WHERE last_payment_date IS DISTINCT FROM"
    " (SELECT max(created_on) FROM payments p WHERE p.account_id = a.account_id)"
)

_OFFSETS = itertools.count()
"""Offsets (and payment ids), never reused across tests and examples."""


def _records(env: Env, accounts: list[int], offsets: itertools.count[int]) -> list[Record]:
    """Offline payments to these accounts (the gateway is never asked about them)."""
    return [
        Record(
            id=RecordId(topic=env.offline_topic, partition=0, offset=offset, timestamp_ms=1),
            value=orjson.dumps(
                {
                    "payment_id": f"p-{offset}",
                    "account_id": account,
                    "payment_type": "offline",
                    "amount": 5,
                }
            ),
        )
        for account, offset in zip(accounts, offsets, strict=False)
    ]


def _gateway(client: Any) -> Gateway:
    """A gateway nobody answers at: only offline payments are processed here."""
    return Gateway(
        client, "http://127.0.0.1:9", max_in_flight=1, timeout_s=1, attempts=1, budget_s=1
    )


def _passes() -> float:
    return REGISTRY.get_sample_value("paystream_stamp_passes_total") or 0.0


async def test_a_pass_applies_the_stamps_every_pipeline_left_due(env: Env) -> None:
    """Two pipelines (two instances) each store a batch and leave its stamps due; the accounts
    stay unstamped until a pass, and one pass of either applies both batches' stamps."""
    settings_ = env.settings(gateway_url="http://127.0.0.1:9")
    async with open_pool(settings_) as pool, third_party_client(2) as client:
        gateway = _gateway(client)
        first, second = (Pipeline(pool, gateway, topic_types(settings_)) for _ in range(2))
        await first.process(_records(env, [1, 2, 3], _OFFSETS))
        await second.process(_records(env, [3, 4], _OFFSETS))
        # One row per account a batch stored for: account 3 is due twice.
        assert env.query("SELECT count(*) FROM paystream.stamps_due") == [(5,)]
        assert env.query("SELECT count(*) FROM accounts WHERE last_payment_date IS NOT NULL") == [
            (0,)
        ]
        await second.stamps.applied()
    assert env.query(_WRONG_DATES) == [(0,)]
    assert env.query("SELECT count(*) FROM accounts WHERE last_payment_date IS NOT NULL") == [(4,)]
    assert env.query("SELECT count(*) FROM paystream.stamps_due") == [(0,)]


async def test_calls_waiting_for_a_pass_share_the_next_one(env: Env) -> None:
    """Twenty batches asking for a pass while one runs are all served by one more pass, which
    waits out the interval since the last one began."""
    async with open_pool(env.settings()) as pool, third_party_client(2) as client:
        gateway = _gateway(client)
        pipeline = Pipeline(pool, gateway, topic_types(env.settings()), stamp_interval_s=0.2)
        before = _passes()
        await asyncio.gather(*(pipeline.stamps.applied() for _ in range(20)))
        assert _passes() - before == 2


async def test_a_pass_wanted_at_once_cuts_the_wait_short(env: Env) -> None:
    """A pass waits out the interval for other batches to share it, unless a call wants it at
    once (the consumer has no other batch on its way): it begins then, covering the waiter."""
    async with open_pool(env.settings()) as pool, third_party_client(2) as client:
        gateway = _gateway(client)
        pipeline = Pipeline(pool, gateway, topic_types(env.settings()), stamp_interval_s=3600)
        before = _passes()
        await pipeline.stamps.applied()  # the first pass has no interval to wait out
        await asyncio.wait_for(
            asyncio.gather(pipeline.stamps.applied(), pipeline.stamps.applied(at_once=True)),
            timeout=30,
        )
        assert _passes() - before == 2


async def test_an_idle_consumer_commits_without_waiting_out_the_interval(env: Env) -> None:
    """The processor's last batch (none other in flight) is stamped and its offsets committed
    at once, though a pass began just before (placing the partitions) and the interval is a
    minute: the accounts do not stay unstamped, nor the offsets uncommitted, for want of
    batches to share the pass with."""
    settings_ = env.settings(stamp_interval_s=60)
    producer = Producer({"bootstrap.servers": env.bootstrap})
    for record in _records(env, [7, 8, 9], _OFFSETS):
        producer.produce(env.offline_topic, record.value, partition=0)
    assert 0 == producer.flush(10)
    async with processor(settings_):
        await async_wait_for(lambda: caught_up(env, settings_), 30, "offsets at the end")
    assert env.query(_WRONG_DATES) == [(0,)]


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(
        st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=12),
        min_size=1,
        max_size=6,
    ),
    passes_after=st.sets(st.integers(min_value=0, max_value=5)),
)
def test_stamps_applied_after_any_mix_of_batches_and_passes(
    env: Env, batches: list[list[int]], passes_after: set[int]
) -> None:
    """Whatever batches store, and whichever of them a pass follows, once a pass follows the
    last batch every account's date is its newest stored payment's created_on."""
    env.execute("DELETE FROM payments")
    env.execute("UPDATE accounts SET last_payment_date = NULL")

    async def scenario() -> None:
        async with open_pool(env.settings()) as pool, third_party_client(2) as client:
            gateway = _gateway(client)
            pipeline = Pipeline(pool, gateway, topic_types(env.settings()), stamp_interval_s=0)
            for n, accounts in enumerate(batches):
                await pipeline.process(_records(env, accounts, _OFFSETS))
                if n in passes_after:
                    await pipeline.stamps.applied()
            await pipeline.stamps.applied()

    asyncio.run(scenario())
    assert env.query(_WRONG_DATES) == [(0,)]
