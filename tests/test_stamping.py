"""Account stamps left due by batches and applied by stamping passes (paystream.stamping), on
the real database: what a pass applies, across pipelines, and how passes are shared."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from paystream.app import open_pool, topic_types
from paystream.gateway import Gateway
from paystream.model import Record, RecordId
from paystream.pipeline import Pipeline
from paystream.thirdparty import third_party_client
from tests.conftest import Env

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
