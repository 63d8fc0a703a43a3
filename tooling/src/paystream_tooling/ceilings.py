"""The ceilings each workload is measured against, taken in the same run: how fast a bare
consumer reads, how fast the database takes the processor's statements, what the third party
answers, and the Little's-law bound of the calls in flight."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta

import psycopg
from confluent_kafka import Consumer

from paystream import store
from paystream.config import Settings
from paystream.migrations import migrate
from paystream.model import Payment, PaymentType, RecordId
from paystream.thirdparty import post, third_party_client
from paystream_tooling import queries
from paystream_tooling.meter import Drained


@dataclass(frozen=True, slots=True, kw_only=True)
class Ceilings:
    """Records (or calls) per second; 0 for one not measured yet. The gateway's are measured
    around the online drains at each of its two latencies."""

    consumer_read_per_s: float = 0.0
    database_insert_per_s: float = 0.0
    """The processor's own statements (accounts check, payments and their origins, stamps)."""
    bare_insert_per_s: float = 0.0
    """The payments alone, stored idempotently: what storing a payment costs the database."""
    stamped_insert_per_s: float = 0.0
    """The bare insert with the accounts stamped too: the least the mission writes."""
    raw_copy_per_s: float = 0.0
    """The same rows copied into a table shaped like payments: the database's raw intake."""
    log_capacity_per_s: float = 0.0
    littles_law_20ms_per_s: float = 0.0
    gateway_capacity_20ms_per_s: float = 0.0
    littles_law_100ms_per_s: float = 0.0
    gateway_capacity_100ms_per_s: float = 0.0

    def base(self) -> dict[str, float]:
        """The ceilings every workload has, named as `bound_by` names them."""
        return {"consumer": self.consumer_read_per_s, "database": self.database_insert_per_s}

    def offline(self) -> dict[str, float]:
        """An offline drain's ceilings: its headline database ceiling is the bare idempotent
        insert, which does not depend on our own design."""
        return {
            "consumer": self.consumer_read_per_s,
            "bare idempotent insert": self.bare_insert_per_s,
        }

    def database(self) -> dict[str, float]:
        """The four database ceilings an offline drain is also reported against."""
        return {
            "processor's statements": self.database_insert_per_s,
            "bare insert and stamps": self.stamped_insert_per_s,
            "bare idempotent insert": self.bare_insert_per_s,
            "raw COPY": self.raw_copy_per_s,
        }

    def littles_law(self, latency_ms: int) -> float:
        return self._at(latency_ms)[0]

    def gateway_capacity(self, latency_ms: int) -> float:
        return self._at(latency_ms)[1]

    def _at(self, latency_ms: int) -> tuple[float, float]:
        match latency_ms:
            case 20:
                return self.littles_law_20ms_per_s, self.gateway_capacity_20ms_per_s
            case 100:
                return self.littles_law_100ms_per_s, self.gateway_capacity_100ms_per_s
        raise ValueError(f"the bench runs the gateway at 20 or 100 ms, not {latency_ms}")

    def with_gateway(self, latency_ms: int, littles_law: float, capacity: float) -> Ceilings:
        """These ceilings, with the gateway's measured at `latency_ms`."""
        match latency_ms:
            case 20:
                return replace(
                    self, littles_law_20ms_per_s=littles_law, gateway_capacity_20ms_per_s=capacity
                )
            case 100:
                return replace(
                    self, littles_law_100ms_per_s=littles_law, gateway_capacity_100ms_per_s=capacity
                )
        raise ValueError(f"the bench runs the gateway at 20 or 100 ms, not {latency_ms}")

    def as_json(self) -> dict[str, float]:
        return {name: round(value, 1) for name, value in asdict(self).items() if value}


def consumer_ceiling(settings: Settings, records: int) -> float:
    """How fast one Python consumer reads the backlog, doing nothing with it."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"raw-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.online_topic, settings.offline_topic])
    read = 0
    started = 0.0
    deadline = time.monotonic() + 300
    while read < records and time.monotonic() < deadline:
        batch = consumer.consume(1000, 0.5)
        if batch and not started:
            started = time.monotonic()
        read += sum(1 for m in batch if m.error() is None)
    elapsed = time.monotonic() - started
    consumer.close()
    return read / elapsed if elapsed > 0 else 0.0


def _payments(records: int) -> tuple[list[Payment], list[RecordId]]:
    """The rows every database ceiling takes: offline payments to the 2 000 accounts, and a
    record of origin for each."""
    rng = random.Random(1)
    payments = [
        Payment(
            payment_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            account_id=rng.randint(1, 2000),
            payment_type=PaymentType.OFFLINE,
            credit_card="",
            amount=rng.randint(1, 500),
        )
        for _ in range(records)
    ]
    origins = [
        RecordId(topic="ceiling", partition=i % 3, offset=i, timestamp_ms=0) for i in range(records)
    ]
    return payments, origins


Writes = Callable[[store.Conn, int, int], Awaitable[None]]
"""One transaction's work: rows [start, end) of the ceiling's payments."""


async def _rate(database_url: str, records: int, batch: int, clients: int, write: Writes) -> float:
    """Rows per second when `clients` connections at once each write `batch` rows a
    transaction, until `records` rows are written."""
    chunks = iter(range(0, records, batch))

    async def client(conn: store.Conn) -> None:
        for start in chunks:
            async with conn.transaction():
                await write(conn, start, min(start + batch, records))

    async with contextlib.AsyncExitStack() as connections:
        conns = [
            await connections.enter_async_context(
                await psycopg.AsyncConnection.connect(database_url)
            )
            for _ in range(clients)
        ]
        started = time.monotonic()
        await asyncio.gather(*(client(conn) for conn in conns))
        return records / (time.monotonic() - started)


BATCHES_PER_STAMPING_PASS = 5
"""How many batches a stamping pass of the database ceiling covers: about as many as the
processor's passes (every stamp_interval_s, 0.25 s) cover at the rates of an offline drain."""


async def _stamp(conn: store.Conn, latest: Mapping[int, datetime], nth_batch: int) -> None:
    """A ceiling's batch leaves its stamps due, as the processor's do; every few batches
    (BATCHES_PER_STAMPING_PASS) a stamping pass follows, in the same transaction."""
    await store.leave_stamps_due(conn, latest)
    if nth_batch % BATCHES_PER_STAMPING_PASS == BATCHES_PER_STAMPING_PASS - 1:
        await store.apply_stamps_due(conn)


async def database_ceiling(database_url: str, records: int, batch: int, clients: int) -> float:
    """How fast the database takes the same rows through the same statements as the processor,
    `batch` rows a transaction and `clients` transactions at a time, as the processor sends them
    (one client with small batches took half as many rows a second here), with a stamping pass
    after every few batches (BATCHES_PER_STAMPING_PASS)."""
    payments, origins = _payments(records)

    async def write(conn: store.Conn, start: int, end: int) -> None:
        chunk = payments[start:end]
        await store.existing_accounts(conn, [p.account_id for p in chunk])
        inserted = await store.insert_payments(conn, chunk, origins[start:end])
        await _stamp(conn, inserted.latest, start // batch)

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await migrate(conn)  # the table of origins
    return await _rate(database_url, records, batch, clients, write)


async def bare_insert_ceiling(database_url: str, records: int, batch: int, clients: int) -> float:
    """How fast the database stores the same payments idempotently and nothing else: one
    `INSERT … SELECT FROM json_to_recordset … ON CONFLICT DO NOTHING RETURNING` a transaction,
    into the original `payments` table (its key, its foreign key to accounts)."""
    documents = _bare_documents(records, batch)

    async def write(conn: store.Conn, start: int, end: int) -> None:
        cursor = await conn.execute(
            queries.query("bare_insert"), {"rows": documents[start // batch]}
        )
        await cursor.fetchall()

    return await _rate(database_url, records, batch, clients, write)


async def stamped_insert_ceiling(
    database_url: str, records: int, batch: int, clients: int
) -> float:
    """The bare insert, plus the mission's other write: each account stamped with its newest
    payment. Stamped the cheapest way measured here: left due in the transaction, applied by a
    pass every few batches (BATCHES_PER_STAMPING_PASS), as the processor does. No origins, no
    accounts check, no record of what is done: what any design storing and stamping must write."""
    documents = _bare_documents(records, batch)

    async def write(conn: store.Conn, start: int, end: int) -> None:
        cursor = await conn.execute(
            queries.query("bare_insert"), {"rows": documents[start // batch]}
        )
        # One created_on a transaction (now()): each account's newest is that of any of its rows.
        latest = {account: created for _, account, created in await cursor.fetchall()}
        await _stamp(conn, latest, start // batch)

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await migrate(conn)  # the table of stamps due
    return await _rate(database_url, records, batch, clients, write)


def _bare_documents(records: int, batch: int) -> list[str]:
    """The ceilings' payments as the bare inserts take them, a document a transaction."""
    payments, _ = _payments(records)
    return [
        store.json(
            [
                {
                    "payment_id": p.payment_id,
                    "account_id": p.account_id,
                    "payment_type": p.payment_type.value,
                    "credit_card": p.credit_card,
                    "amount": p.amount,
                }
                for p in payments[start : start + batch]
            ]
        )
        for start in range(0, records, batch)
    ]


async def raw_copy_ceiling(database_url: str, records: int, batch: int, clients: int) -> float:
    """How fast the database takes the same rows by COPY into a table shaped like `payments`
    (its columns, defaults, key and indexes; no foreign key, no conflict handling)."""
    payments, _ = _payments(records)
    rows = [
        (p.payment_id, p.account_id, p.payment_type.value, p.credit_card, p.amount)
        for p in payments
    ]
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute(queries.query("copy_target"))
        await conn.commit()

    async def write(conn: store.Conn, start: int, end: int) -> None:
        cursor = conn.cursor()
        async with cursor.copy(queries.query("copy_rows")) as copy:
            for row in rows[start:end]:
                await copy.write_row(row)

    return await _rate(database_url, records, batch, clients, write)


async def third_party_capacity(url: str, body: bytes, concurrency: int, seconds: float) -> float:
    """Calls per second the third party answers at `url` with `concurrency` callers, each
    waiting for its answer before the next call (connections opened beforehand, not timed)."""
    timeout = timedelta(seconds=30)
    async with third_party_client(concurrency) as client:

        async def caller(until: float) -> int:
            calls = 0
            while time.monotonic() < until:
                await post(client, url, body, timeout)
                calls += 1
            return calls

        async def callers(for_s: float) -> int:
            until = time.monotonic() + for_s
            return sum(await asyncio.gather(*(caller(until) for _ in range(concurrency))))

        await callers(0.5)
        started = time.monotonic()
        calls = await callers(seconds)
        return calls / (time.monotonic() - started)


def third_party_ceiling(
    settings: Settings,
    run: Drained,
    records: int,
    *,
    validations: int,
    gateway_per_s: float,
    log_per_s: float,
) -> float:
    """Records per second the third party can serve for this run: its time goes to the
    validations and to the error reports of kept records (declined, duplicate, ...) delivered
    before the run was drained, each kind of call at the capacity measured for it."""
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(queries.query("reported_by"), {"until": run.finished_at}).fetchone()
    reports = int(row[0]) if row else 0
    return records / (validations / gateway_per_s + reports / log_per_s)
