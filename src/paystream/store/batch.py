"""The reads and writes of a batch (batch.sql). Every function takes a connection; none opens a
transaction: the pipeline runs them in its one transaction per batch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from psycopg.rows import class_row, kwargs_row, scalar_row

from paystream import tracing
from paystream.model import Existing, Kept, PartitionId, Payment, PaymentType, RecordId
from paystream.sealing import KeptCipher
from paystream.store import documents
from paystream.store.queries import Conn, json, query


async def hold_partitions(
    conn: Conn, writer: UUID, partitions: Iterable[PartitionId]
) -> set[PartitionId]:
    """Hold, until the transaction ends, those of the partitions `writer` writes; return the
    others, which it must take over (`take_partitions`) before writing their records.

    Held FOR SHARE, so the batches of one writer never wait for each other; rows are locked in
    key order, the order `take_partitions` locks them in, so no two transactions deadlock here.
    """
    wanted = set(partitions)
    cursor = await conn.execute(
        query("hold_partitions"), {"partitions": documents.partitions(wanted), "writer": writer}
    )
    return wanted - {(t, p) for t, p in await cursor.fetchall()}


async def take_partitions(conn: Conn, writer: UUID, partitions: Iterable[PartitionId]) -> None:
    """Make `writer` the writer of these partitions (commit it at once). Waits until every
    transaction holding them for their previous writer has ended, so a record is never decided
    by two writers at the same time (two owners of a partition overlap during a rebalance)."""
    await conn.execute(
        query("take_partitions"),
        {"partitions": documents.partitions(partitions), "writer": writer},
    )


async def processed_records(
    conn: Conn,
    records: Sequence[RecordId],
    *,
    stored_as: Mapping[RecordId, str] | None = None,
    kept: bool = True,
) -> set[RecordId]:
    """Which of these records already have a durable outcome.

    A record is done when (with `kept`) it is kept, or when it is in `stored_as` and the stored
    payment of the payment_id given there came from this very record. Leave out of `stored_as`
    a record about to be inserted: the insert's conflict tells a redelivery apart more cheaply.
    Kept records are looked up by offset range per partition, one index range scan each, not
    one probe a record.
    """
    stored = list((stored_as or {}).items())
    offsets: dict[PartitionId, list[int]] = {}
    if kept:
        for i in records:
            offsets.setdefault((i.topic, i.partition), []).append(i.offset)
    if not stored and not offsets:
        return set()
    ranges = {key: (min(o), max(o)) for key, o in offsets.items()}
    cursor = conn.cursor(row_factory=class_row(RecordId))
    await cursor.execute(
        query("processed_records"),
        {"stored": documents.stored_checks(stored), "kept": documents.offset_ranges(ranges)},
    )
    found = await cursor.fetchall()
    if not found:
        return set()
    asked = set(records) | set(stored_as or ())
    return {i for i in found if i in asked}


async def stored_payment_ids(conn: Conn, payment_ids: Sequence[str]) -> set[str]:
    if not payment_ids:
        return set()
    cursor = conn.cursor(row_factory=scalar_row)
    await cursor.execute(query("stored_payment_ids"), {"ids": json(list(payment_ids))})
    return set(await cursor.fetchall())


async def existing_accounts(conn: Conn, account_ids: Iterable[int]) -> set[int]:
    """Which of these accounts exist (taking no lock)."""
    wanted = sorted(set(account_ids))
    if not wanted:
        return set()
    cursor = conn.cursor(row_factory=scalar_row)
    await cursor.execute(query("existing_accounts"), {"ids": json(wanted)})
    return set(await cursor.fetchall())


@dataclass(frozen=True, slots=True)
class Inserted:
    """What inserting payments did: per account, the newest created_on it stored (what the
    account is stamped with); and the payment_ids it skipped, stored already."""

    latest: dict[int, datetime]
    skipped: set[str]


async def insert_payments(
    conn: Conn, payments: Sequence[Payment], origins: Sequence[RecordId]
) -> Inserted:
    """Insert, each with the record it came from (`origins`, one per payment); a payment_id
    already present is skipped. The rows come back per account, not per payment: the Python
    side of a batch then builds no object per stored payment."""
    latest: dict[int, datetime] = {}
    skipped: set[str] = set()
    if payments:
        cursor = await conn.execute(
            query("insert_payments"), {"rows": documents.payments(payments, origins)}
        )
        for account_id, newest, payment_id in await cursor.fetchall():
            if payment_id is None:
                latest[account_id] = newest
            else:
                skipped.add(payment_id)
    return Inserted(latest, skipped)


async def leave_stamps_due(conn: Conn, latest: Mapping[int, datetime]) -> None:
    """Leave these account stamps (`Inserted.latest`) due, in the batch's transaction, for a
    stamping pass (`apply_stamps_due`). The batch locks no account row."""
    if latest:
        await conn.execute(query("leave_stamps_due"), {"rows": documents.stamps(latest)})


_STAMPING = 0x7061_7374  # "past": the advisory lock of stamping passes


async def apply_stamps_due(conn: Conn) -> None:
    """A stamping pass: take every stamp left due by a committed batch and apply it. In the
    caller's transaction, which must end soon: it holds the lock that lets one pass run at a
    time, across instances.

    last_payment_date only moves forward, to the newest stored payment's created_on.
    """
    await conn.execute(query("stamping_pass"), {"key": _STAMPING})
    cursor = await conn.execute(query("take_stamps_due"))
    await stamp_accounts(conn, dict(await cursor.fetchall()))


async def stamp_accounts(conn: Conn, latest: Mapping[int, datetime]) -> None:
    """Stamp these accounts now (`Inserted.latest`): a stamping pass, or a replay, whose few
    accounts are stamped in its own transaction. The rows are locked in account order first."""
    if latest:
        await conn.execute(query("lock_accounts"), {"ids": json(sorted(latest))})
        await conn.execute(query("stamp_accounts"), {"rows": documents.stamps(latest)})


def _existing(
    *,
    payment_id: str,
    account_id: int,
    payment_type: str,
    credit_card: str | None,
    amount: Decimal,
    topic: str | None,
    partition: int | None,
    offset: int | None,
    kafka_ts: int | None,
) -> Existing:
    origin = None
    if topic is not None and partition is not None and offset is not None and kafka_ts is not None:
        origin = RecordId(topic=topic, partition=partition, offset=offset, timestamp_ms=kafka_ts)
    return Existing(
        payment_id=payment_id,
        account_id=account_id,
        payment_type=PaymentType(payment_type),
        credit_card=credit_card,
        amount=int(amount),
        origin=origin,
    )


async def existing_payments(conn: Conn, payment_ids: Iterable[str]) -> dict[str, Existing]:
    """The stored payments of these ids, and the record each came from."""
    wanted = sorted(set(payment_ids))
    if not wanted:
        return {}
    cursor = conn.cursor(row_factory=kwargs_row(_existing))
    await cursor.execute(query("existing_payments"), {"ids": json(wanted)})
    return {e.payment_id: e for e in await cursor.fetchall()}


async def insert_kept(conn: Conn, kept: Sequence[Kept], cipher: KeptCipher | None = None) -> None:
    """Keep records durably (their raw bytes sealed, with a `cipher`); a record kept before is
    left as it is."""
    if not kept:
        return
    rows = []
    here = tracing.current_traceparent()
    for k in kept:
        raw, key = k.record.value, None
        if raw is not None and cipher is not None:
            sealed = cipher.seal(k.record.id, raw)
            raw, key = sealed.value, sealed.key
        rows.append(documents.kept(k, raw, key, k.record.traceparent or here))
    await conn.execute(query("insert_kept"), {"rows": json(rows)})


async def resolve_kept(conn: Conn, ids: Sequence[RecordId]) -> None:
    """A replay stored these kept records' payments."""
    if ids:
        await conn.execute(query("resolve_kept"), {"ids": documents.records(ids)})


async def update_kept(conn: Conn, kept: Sequence[Kept]) -> None:
    """A replay kept these records again. A new reason is a new fact, so it is reported again.
    A record that was not tried (`Kept.attempted`) keeps its count of replays."""
    for k in kept:
        await conn.execute(
            query("update_kept"),
            {
                "reason": k.reason.value,
                "error_type": k.error_type.value,
                "description": k.description,
                "attempted": k.attempted,
                "topic": k.record.id.topic,
                "partition": k.record.id.partition,
                "offset": k.record.id.offset,
                "kafka_ts": k.record.id.timestamp_ms,
            },
        )
