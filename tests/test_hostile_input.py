"""Whatever a producer sends — any bytes, any JSON in any field, any header — each record ends
stored or kept and listed, nothing stops the processor, and the records after it are processed.

Generated records go through the real path: a Kafka message becomes a record as the consumer
makes it (`kafka.record_of`), then the pipeline decodes, validates and writes it in the real
PostgreSQL; a corpus of the values found goes through the broker to a running processor."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg_pool
import pytest
from aiohttp import web
from confluent_kafka import Message, Producer
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from paystream import rules, store
from paystream.app import open_pool, topic_types
from paystream.cli.kept import _kept_table
from paystream.codec import MAX_KEPT_ID_BYTES
from paystream.gateway import Gateway
from paystream.kafka import record_of
from paystream.model import Record, RecordId
from paystream.pipeline import Pipeline
from paystream.text import control_at
from paystream.thirdparty import third_party_client
from tests.conftest import Env, SimulatorClient, new_env, reconcile_now, settle
from tests.peers import peer
from tests.test_tracing import traced

CARD = "4847171163467501036"
Headers = list[tuple[str, str | bytes | None]] | None

# Values a hostile or buggy producer sends in a field, beyond what st.text() draws on its own.
hostile_strings = st.sampled_from(
    [
        "nul\x00id",
        "\x00",
        "\x1b[2J\x1b[31mred",
        "\x7f\x85\x9f",
        "[/x] [bold]markup",
        "\u202eevil\u202c",
        "\ud800",  # a lone surrogate: json.dumps writes it as the escape \ud800
        "a\udfffb",
        "\ufeffbom",
        " ",
        "x" * 101,
        "y" * 5000,
        "'; DROP TABLE payments; --",
    ]
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | hostile_strings,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    """A payment-shaped JSON text with any value in any field, then mangled as producers do:
    duplicate keys, deep nesting, a byte-order mark, a byte that is not UTF-8, cut short."""
    online = draw(st.booleans())
    fields: dict[str, Any] = {
        "payment_id": draw(st.uuids().map(str) | json_values),
        "account_id": draw(st.integers(1, 2000) | json_values),
        "payment_type": draw(st.just("online" if online else "offline") | json_values),
        "credit_card": draw(st.just(CARD) | json_values),
        "amount": draw(st.integers(1, 500) | json_values),
    }
    if draw(st.booleans()):
        fields[draw(st.text(max_size=8) | hostile_strings)] = draw(json_values)
    text = json.dumps({k: v for k, v in fields.items() if draw(st.integers(0, 9)) > 0})
    match draw(st.integers(0, 9)):
        case 0:  # duplicate keys: a second amount, or a second payment_id
            key = draw(st.sampled_from(["amount", "payment_id"]))
            text = text[:-1] + f', "{key}": {json.dumps(draw(json_values))}}}'
        case 1:
            text = text[:-1] + ', "deep": ' + "[" * 1100 + "]" * 1100 + "}"
        case 2:
            text = "\ufeff" + text
        case _:
            pass
    raw = text.encode("utf-8", "surrogatepass")
    match draw(st.integers(0, 9)):
        case 0:
            at = draw(st.integers(0, len(raw)))
            raw = (
                raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])) + raw[at:]
            )
        case 1:
            raw = raw[: draw(st.integers(0, len(raw)))]
        case _:
            pass
    return raw


header_values = st.one_of(
    st.none(),
    st.binary(max_size=80),
    st.just(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    st.just(b"00-\x00bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    st.just(b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01\n"),
)


@dataclass
class World:
    """A database, a gateway that approves all but `decline` payments, and the pipeline."""

    env: Env
    runner: asyncio.Runner
    pool: psycopg_pool.AsyncConnectionPool
    pipeline: Pipeline
    offsets: Iterator[int]


async def _gateway_answer(request: web.Request, body: bytes) -> web.StreamResponse:
    return web.Response(status=402 if b"decline" in body else 200)


@pytest.fixture(scope="module")
def world(stack: Any) -> Iterator[World]:
    env = new_env(stack)
    with asyncio.Runner() as runner:

        async def open_all(
            resources: contextlib.AsyncExitStack,
        ) -> tuple[psycopg_pool.AsyncConnectionPool, Pipeline]:
            gateway_peer = await resources.enter_async_context(peer(_gateway_answer))
            settings_ = env.settings(gateway_url=gateway_peer.url)
            pool = await resources.enter_async_context(open_pool(settings_))
            client = await resources.enter_async_context(third_party_client(16))
            gateway = Gateway(
                client, gateway_peer.url, max_in_flight=16, timeout_s=2, attempts=1, budget_s=2
            )
            return pool, Pipeline(pool, gateway, topic_types(settings_))

        resources = contextlib.AsyncExitStack()
        pool, pipeline = runner.run(open_all(resources))
        try:
            yield World(
                env=env, runner=runner, pool=pool, pipeline=pipeline, offsets=itertools.count()
            )
        finally:
            runner.run(resources.aclose())


def _message(world: World, value: bytes, header: bytes | None, online: bool) -> Record:
    env = world.env
    headers: Headers = None if header is None else [("traceparent", header)]
    message = Message(
        topic=env.online_topic if online else env.offline_topic,
        partition=next(world.offsets) % 3,
        offset=next(world.offsets),
        timestamp=(1, 1_700_000_000_000),
        value=value,
        headers=headers,
    )
    return record_of(message, tracing_on=True)


def _ordinary(world: World) -> Record:
    payment = {
        "payment_id": f"ordinary-{random.Random(next(world.offsets)).getrandbits(64)}",
        "account_id": 1,
        "payment_type": "offline",
        "credit_card": "",
        "amount": 1,
    }
    return _message(world, orjson.dumps(payment), None, online=False)


def _place(record: Record) -> tuple[str, int, int]:
    return record.id.topic, record.id.partition, record.id.offset


def _outcomes(env: Env, records: list[Record]) -> dict[tuple[str, int, int], str]:
    """Each record's outcome: 'stored', or its kept reason. A record with both, or neither,
    shows up as a missing or a doubled key."""
    coordinates = [_place(r) for r in records]
    rows = env.query(
        'SELECT topic, "partition", "offset", \'stored\' FROM paystream.payment_origins'
        ' WHERE (topic, "partition", "offset") IN (SELECT * FROM unnest(%s::text[],'
        " %s::int[], %s::bigint[]))"
        ' UNION ALL SELECT topic, "partition", "offset", reason FROM paystream.kept_records'
        ' WHERE (topic, "partition", "offset") IN (SELECT * FROM unnest(%s::text[],'
        " %s::int[], %s::bigint[]))",
        [list(c) for c in zip(*coordinates, strict=True)] * 2,
    )
    found: dict[tuple[str, int, int], str] = {}
    for topic, partition, offset, outcome in rows:
        assert (topic, partition, offset) not in found, "a record both stored and kept"
        found[(topic, partition, offset)] = outcome
    return found


@settings(max_examples=60)
@given(st.lists(st.tuples(documents(), header_values, st.booleans()), min_size=1, max_size=6))
def test_every_record_ends_stored_or_kept_and_listed(
    world: World, produced: list[tuple[bytes, bytes | None, bool]]
) -> None:
    """Any bytes with any header, on either topic: the batch is processed without an error,
    each record is stored or kept with its raw bytes intact, the kept ones list and render
    with printable ids and descriptions that never hold the card, and an ordinary payment after
    them is stored."""
    records = [_message(world, value, header, online) for value, header, online in produced]
    records.append(_ordinary(world))
    result = world.runner.run(world.pipeline.process(records))

    assert len(records) == result.stored + result.kept + result.redelivered
    outcomes = _outcomes(world.env, records)
    assert {(r.id.topic, r.id.partition, r.id.offset) for r in records} == outcomes.keys()
    assert (
        "stored"
        == outcomes[(records[-1].id.topic, records[-1].id.partition, records[-1].id.offset)]
    )

    async def listed() -> list[store.KeptRow]:
        async with world.pool.connection() as conn:
            return await store.latest_kept(conn, len(records))

    by_place = {(k.topic, k.partition, k.offset): k for k in world.runner.run(listed())}
    for record in records:
        kept = by_place.get(_place(record))
        if kept is None:
            continue
        assert record.value == kept.raw
        assert None is control_at(kept.description)
        assert None is control_at(kept.payment_id or "")
        assert CARD not in kept.description
        orjson.dumps(kept.as_json())
    console = Console(file=None, record=True, width=200)
    rows = [k.as_json() for k in by_place.values()]
    console.print(_kept_table(rows, len(rows), len(rows)))


# Text of every width: one unit (ASCII; 2-, 3- and 4-byte UTF-8; a combining mark; Unicode's
# noncharacters) repeated to a size in bytes from nothing to a megabyte.
_UNITS = ["a", "é", "€", "\U00020000", "e\u0301", "\ufdd0", "\uffff", "\U0010fffe"]
_SIZES = [0, 1, 99, 100, 101, 400, 401, 2_700, 8_200, 1_000_000]
_AMOUNTS = [0, 1, 10**15, 10**15 + 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**1000]


@st.composite
def wide_text(draw: st.DrawFn) -> str:
    unit = draw(st.sampled_from(_UNITS))
    return unit * (draw(st.sampled_from(_SIZES)) // len(unit.encode()))


@st.composite
def sized_records(draw: st.DrawFn) -> tuple[bytes, bytes | None, bool]:
    """An ordinary payment but for one field (payment_id, account_id as text, payment_type,
    credit_card) or its header, drawn at a width from 0 to 1 MB, or its amount at an edge of
    64 bits or of NUMERIC."""
    online = draw(st.booleans())
    fields: dict[str, object] = {
        "payment_id": f"sized-{draw(st.uuids())}",
        "account_id": 1,
        "payment_type": "online" if online else "offline",
        "credit_card": CARD,
    }
    header = None
    where = draw(st.sampled_from([*fields, "header", "amount"]))
    if where == "header":
        header = draw(wide_text()).encode()
    elif where != "amount":
        fields[where] = draw(wide_text())
    amount = draw(st.sampled_from(_AMOUNTS)) if where == "amount" else 7
    # orjson writes no integer beyond 64 bits: the amount is spliced in as the JSON number.
    value = orjson.dumps(fields)[:-1] + b',"amount":' + str(amount).encode() + b"}"
    return value, header, online


@settings(max_examples=40)
@given(st.lists(sized_records(), min_size=1, max_size=3))
def test_a_field_of_any_width_ends_stored_or_kept_and_stops_nothing(
    world: World, produced: list[tuple[bytes, bytes | None, bool]]
) -> None:
    """Each field and header, at any width in bytes and in any plane, and amounts at the edges of
    64 bits and NUMERIC, through the real write path: each record ends stored or kept (by the
    codec, never refused by the database), a kept one listed under an id of at most
    MAX_KEPT_ID_BYTES, and an ordinary payment after them is stored."""
    records = [_message(world, value, header, online) for value, header, online in produced]
    records.append(_ordinary(world))
    result = world.runner.run(world.pipeline.process(records))

    assert len(records) == result.stored + result.kept + result.redelivered
    outcomes = _outcomes(world.env, records)
    assert {_place(r) for r in records} == outcomes.keys()
    assert "stored" == outcomes[_place(records[-1])]
    # The codec refuses what the schema cannot hold: the database never has to.
    assert "database_rejected" not in outcomes.values()
    widths = world.env.query("SELECT max(octet_length(payment_id)) FROM paystream.kept_records")
    assert (widths[0][0] or 0) <= MAX_KEPT_ID_BYTES


def test_a_corpus_of_hostile_records_amid_a_stream_stops_nothing(
    env: Env, simulator: SimulatorClient
) -> None:
    """The values found above, through the broker to a running processor with tracing on, amid
    an ordinary stream: each is kept and reported, and the stream is processed."""
    corpus = [
        (
            b'{"payment_id": "nul\\u0000id", "account_id": 1, "payment_type": "offline",'
            b' "credit_card": "", "amount": 5}',
            None,
        ),
        (
            b'{"payment_id": "no-account", "account_id": 99999, "payment_type": "offline",'
            b' "credit_card": "", "amount": 5}',
            b"00-\x00" + b"0" * 50,
        ),
        (
            b'{"payment_id": "no-account", "account_id": 99999, "payment_type": "offline",'
            b' "credit_card": "", "amount": 5}',
            b"00-\x00" + b"0" * 50,
        ),
        (b'{"payment_id": "\\u001b[2J[/x]", "amount": 1}', b"\xff\xfe"),
        (b'{"payment_id": "\\ud800"}', None),
        (b"\xef\xbb\xbf{}", None),
        (
            b'{"payment_id": "big", "account_id": 1, "payment_type": "offline",'
            b' "credit_card": "\\u0000", "amount": 5}',
            None,
        ),
        (b'{"payment_id": "deep", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}", None),
    ]
    producer = Producer({"bootstrap.servers": env.bootstrap})
    for value, header in corpus:
        headers: Headers = None if header is None else [("traceparent", header)]
        producer.produce(env.offline_topic, value, headers=headers, partition=0)
    assert 0 == producer.flush(10)
    settings_ = env.settings()
    simulator.start(records=200, seed=23, profile="hostile")
    with traced():
        asyncio.run(settle(env, simulator, settings_))
    report = reconcile_now(env, simulator, settings_)
    assert [] == report.problems
    kept = env.query(
        'SELECT "offset", error_type, reported_at IS NOT NULL FROM paystream.kept_records'
        ' WHERE topic = %s AND "partition" = 0 AND "offset" < %s ORDER BY 1',
        (env.offline_topic, len(corpus)),
    )
    # Two records of an unknown account (kept with their NUL-holding header), the rest invalid.
    types = ["database" if o in (1, 2) else "other" for o in range(len(corpus))]
    assert [(o, t, True) for o, t in enumerate(types)] == kept


async def test_a_record_whose_keeping_is_refused_too_is_kept_bare(env: Env) -> None:
    """Should the database refuse a record and then its kept row as well (a value the codec let
    through), the record is kept bare: its coordinates and raw bytes, a fixed description, no
    payment_id; the rest of the batch is stored and nothing raises."""
    values = [
        orjson.dumps(
            {
                "payment_id": payment_id,
                "account_id": 1,
                "payment_type": "offline",
                "credit_card": "",
                "amount": amount,
            }
        )
        for payment_id, amount in [("a", 1), ("refuse", 5000), ("b", 2)]
    ]
    records = [
        Record(
            id=RecordId(topic=env.offline_topic, partition=0, offset=offset, timestamp_ms=1),
            value=value,
        )
        for offset, value in enumerate(values)
    ]
    settings_ = env.settings(gateway_url="http://127.0.0.1:9")
    async with open_pool(settings_) as pool, third_party_client(2) as client:
        # After open_pool: its migrations make the table.
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("ALTER TABLE payments ADD CONSTRAINT small CHECK (amount < 1000)")
            await conn.execute(
                "ALTER TABLE paystream.kept_records ADD CONSTRAINT no_refuse"
                " CHECK (payment_id <> 'refuse')"
            )
        gateway = Gateway(
            client, settings_.gateway_url, max_in_flight=2, timeout_s=1, attempts=1, budget_s=1
        )
        result = await Pipeline(pool, gateway, topic_types(settings_)).process(records)
    assert (2, 1) == (result.stored, result.kept)
    assert [(1, None, "database_rejected", rules.BARE_DESCRIPTION, values[1])] == env.query(
        'SELECT "offset", payment_id, reason, description, raw FROM paystream.kept_records'
    )
