"""The SQL paystream runs. Every function takes a connection; none opens a transaction."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

import orjson
import psycopg
import psycopg_pool
from psycopg import AsyncConnection
from psycopg.rows import TupleRow, class_row

from paystream import tracing
from paystream.model import Kept, Payment, Record, RecordId
from paystream.sealing import KeptCipher, open_raw

DATABASE_AWAY = (psycopg.OperationalError, psycopg_pool.PoolTimeout)
"""What a call raises when the database is away (unreachable, restarting, timed out, the pool
empty), as against a statement it refused: retry later, commit nothing."""

Conn = AsyncConnection[TupleRow]


def _json(rows: object) -> str:
    """Rows travel as one JSON document that SQL unpacks with json_to_recordset: orjson encodes
    it in C, where psycopg would build each array element in Python (a quarter of the
    processor's time when profiled)."""
    return orjson.dumps(rows).decode()


def _ids(ids: Sequence[RecordId]) -> str:
    return _json(
        [{"t": i.topic, "p": i.partition, "o": i.offset, "s": i.timestamp_ms} for i in ids]
    )


_IDS = "json_to_recordset(%s::json) AS r(t text, p int, o bigint, s bigint)"
_PAYMENT_IDS = "ARRAY(SELECT value::varchar FROM json_array_elements_text(%s::json))"
"""A list of payment ids as one JSON document (see `_json`), as an array for `= ANY(...)`."""


Partition = tuple[str, int]


def _partitions(partitions: Iterable[Partition]) -> str:
    return _json([{"t": t, "p": p} for t, p in sorted(set(partitions))])


async def hold_partitions(
    conn: Conn, writer: UUID, partitions: Iterable[Partition]
) -> set[Partition]:
    """Hold, until the transaction ends, those of the partitions `writer` writes; return the
    others, which it must take over (`take_partitions`) before writing their records.

    Held FOR SHARE, so the batches of one writer never wait for each other; rows are locked in
    key order, the order `take_partitions` locks them in, so no two transactions deadlock here.
    """
    wanted = set(partitions)
    cursor = await conn.execute(
        """
        SELECT w.topic, w."partition"
        FROM paystream.partition_writers AS w
        JOIN json_to_recordset(%s::json) AS r(t text, p int)
            ON (w.topic, w."partition") = (r.t, r.p)
        WHERE w.writer = %s
        ORDER BY 1, 2
        FOR SHARE OF w
        """,
        (_partitions(wanted), writer),
    )
    return wanted - {(t, p) for t, p in await cursor.fetchall()}


async def take_partitions(conn: Conn, writer: UUID, partitions: Iterable[Partition]) -> None:
    """Make `writer` the writer of these partitions (commit it at once). Waits until every
    transaction holding them for their previous writer has ended, so a record is never decided
    by two writers at the same time (two owners of a partition overlap during a rebalance)."""
    await conn.execute(
        """
        INSERT INTO paystream.partition_writers (topic, "partition", writer)
        SELECT t, p, %s FROM json_to_recordset(%s::json) AS r(t text, p int) ORDER BY 1, 2
        ON CONFLICT (topic, "partition") DO UPDATE SET writer = EXCLUDED.writer, since = now()
        """,
        (writer, _partitions(partitions)),
    )


async def processed_records(
    conn: Conn, checks: Sequence[tuple[RecordId, str | None]], *, kept: bool = True
) -> set[RecordId]:
    """Which of these records already have a durable outcome.

    A record is done when (with `kept`) it is kept, or when its payment_id is given and the
    stored payment of that id came from this very record. Pass no payment_id for a record about
    to be inserted: the insert's conflict tells a redelivery apart more cheaply. Kept records are
    looked up by offset range per partition, one index range scan each, not one probe a record.
    """
    stored = [(i, pid) for i, pid in checks if pid is not None]
    ranges: dict[tuple[str, int], tuple[int, int]] = {}
    if kept:
        for i, _ in checks:
            lo, hi = ranges.get((i.topic, i.partition), (i.offset, i.offset))
            ranges[(i.topic, i.partition)] = (min(lo, i.offset), max(hi, i.offset))
    if not stored and not ranges:
        return set()
    cursor = await conn.execute(
        """
        SELECT o.topic, o."partition", o."offset", o.kafka_ts
        FROM json_to_recordset(%s::json) AS b(i text, t text, p int, o bigint, s bigint)
        JOIN paystream.payment_origins AS o ON o.payment_id = b.i
            AND (o.topic, o."partition", o."offset", o.kafka_ts) = (b.t, b.p, b.o, b.s)
        UNION ALL
        SELECT k.topic, k."partition", k."offset", k.kafka_ts
        FROM json_to_recordset(%s::json) AS r(t text, p int, lo bigint, hi bigint)
        JOIN paystream.kept_records AS k
            ON k.topic = r.t AND k."partition" = r.p AND k."offset" BETWEEN r.lo AND r.hi
        """,
        (
            _json(
                [
                    {"i": pid, "t": i.topic, "p": i.partition, "o": i.offset, "s": i.timestamp_ms}
                    for i, pid in stored
                ]
            ),
            _json([{"t": t, "p": p, "lo": lo, "hi": hi} for (t, p), (lo, hi) in ranges.items()]),
        ),
    )
    asked = {i for i, _ in checks}
    found = (
        RecordId(topic=t, partition=p, offset=o, timestamp_ms=ts)
        for t, p, o, ts in await cursor.fetchall()
    )
    return {i for i in found if i in asked}


async def stored_payment_ids(conn: Conn, payment_ids: Sequence[str]) -> set[str]:
    if not payment_ids:
        return set()
    cursor = await conn.execute(
        f"SELECT payment_id FROM payments WHERE payment_id = ANY({_PAYMENT_IDS})",
        (_json(list(payment_ids)),),
    )
    return {row[0] for row in await cursor.fetchall()}


async def existing_accounts(conn: Conn, account_ids: Iterable[int]) -> set[int]:
    """Which of these accounts exist. Takes no lock: inserting a payment only needs the KEY SHARE
    lock of its foreign key, which does not conflict with another batch stamping the account."""
    wanted = sorted(set(account_ids))
    if not wanted:
        return set()
    cursor = await conn.execute(
        "SELECT account_id FROM accounts WHERE account_id IN"
        " (SELECT value::int FROM json_array_elements_text(%s::json))",
        (_json(wanted),),
    )
    return {row[0] for row in await cursor.fetchall()}


@dataclass(frozen=True, slots=True, kw_only=True)
class Inserted:
    payment_id: str
    account_id: int
    created_on: datetime


async def insert_payments(
    conn: Conn, payments: Sequence[Payment], origins: Sequence[RecordId] | None = None
) -> list[Inserted]:
    """Insert; a payment_id already present is skipped. Rows go in id order to avoid deadlocks.

    With `origins` (one per payment), the same statement remembers which record each newly
    stored payment came from, replacing a stale row a purge of payments left behind.
    """
    if not payments:
        return []
    rows = [
        {
            "i": p.payment_id,
            "a": p.account_id,
            "t": p.payment_type.value,
            "c": p.credit_card,
            "m": p.amount,
        }
        for p in payments
    ]
    if origins is not None:
        for row, origin in zip(rows, origins, strict=True):
            row.update(
                rt=origin.topic, rp=origin.partition, ro=origin.offset, rs=origin.timestamp_ms
            )
    statement = _INSERT_PAYMENTS + ("" if origins is None else _AND_ORIGINS) + _INSERTED
    cursor = await conn.execute(statement, (_json(rows),))
    return [
        Inserted(payment_id=r[0], account_id=r[1], created_on=r[2]) for r in await cursor.fetchall()
    ]


_INSERT_PAYMENTS = """
    WITH batch AS (
        SELECT * FROM json_to_recordset(%s::json) AS r(
            i varchar, a int, t varchar, c varchar, m numeric,
            rt text, rp int, ro bigint, rs bigint)
    ), inserted AS (
        INSERT INTO payments (payment_id, account_id, payment_type, credit_card, amount)
        SELECT i, a, t, c, m FROM batch ORDER BY 1
        ON CONFLICT (payment_id) DO NOTHING
        RETURNING payment_id, account_id, created_on
    )
"""

_AND_ORIGINS = """
    , origins AS (
        INSERT INTO paystream.payment_origins (payment_id, topic, "partition", "offset", kafka_ts)
        SELECT i, rt, rp, ro, rs FROM batch JOIN inserted ON inserted.payment_id = batch.i
        ORDER BY 1
        ON CONFLICT (payment_id) DO UPDATE SET
            topic = EXCLUDED.topic, "partition" = EXCLUDED."partition",
            "offset" = EXCLUDED."offset", kafka_ts = EXCLUDED.kafka_ts, stored_at = now()
    )
"""

_INSERTED = "SELECT payment_id, account_id, created_on FROM inserted"


async def stamp_accounts(conn: Conn, inserted: Sequence[Inserted]) -> None:
    """last_payment_date only moves forward, to the newest stored payment's created_on.

    The rows are locked first, in account order, so two batches can never deadlock on them; the
    caller does this last in its transaction, so the locks are held only until the commit.
    """
    if not inserted:
        return
    await conn.execute(
        "SELECT FROM accounts WHERE account_id IN"
        " (SELECT value::int FROM json_array_elements_text(%s::json))"
        " ORDER BY account_id FOR NO KEY UPDATE",
        (_json(sorted({i.account_id for i in inserted})),),
    )
    await conn.execute(
        """
        UPDATE accounts AS a SET last_payment_date = GREATEST(a.last_payment_date, s.latest)
        FROM (
            SELECT a AS account_id, max(c) AS latest
            FROM json_to_recordset(%s::json) AS r(a int, c timestamp)
            GROUP BY a
        ) AS s
        WHERE a.account_id = s.account_id
        """,
        (_json([{"a": i.account_id, "c": i.created_on.isoformat()} for i in inserted]),),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Existing:
    content: tuple[int, str, str | None, int]
    origin: RecordId | None


async def existing_payments(conn: Conn, payment_ids: Sequence[str]) -> dict[str, Existing]:
    if not payment_ids:
        return {}
    cursor = await conn.execute(
        f"""
        SELECT p.payment_id, p.account_id, p.payment_type, p.credit_card, p.amount,
               o.topic, o."partition", o."offset", o.kafka_ts
        FROM payments AS p LEFT JOIN paystream.payment_origins AS o USING (payment_id)
        WHERE p.payment_id = ANY({_PAYMENT_IDS})
        """,
        (_json(list(set(payment_ids))),),
    )
    found = {}
    for pid, account, ptype, card, amount, topic, partition, offset, ts in await cursor.fetchall():
        origin = (
            None
            if topic is None
            else RecordId(topic=topic, partition=partition, offset=offset, timestamp_ms=ts)
        )
        found[pid] = Existing(content=(account, ptype, card, int(amount)), origin=origin)
    return found


async def insert_kept(conn: Conn, kept: Sequence[Kept], cipher: KeptCipher | None = None) -> int:
    """Keep records durably (their raw bytes sealed, with a `cipher`); a record kept before is
    left as it is. Returns how many are new."""
    if not kept:
        return 0
    rows = []
    here = tracing.current_traceparent()
    for k in kept:
        raw, key = k.record.value, None
        if raw is not None and cipher is not None:
            sealed = cipher.seal(k.record.id, raw)
            raw, key = sealed.value, sealed.key
        rows.append(
            {
                "t": k.record.id.topic,
                "p": k.record.id.partition,
                "o": k.record.id.offset,
                "s": k.record.id.timestamp_ms,
                "b": None if raw is None else base64.b64encode(raw).decode(),
                "k": key,
                "i": k.payment_id,
                "e": k.error_type.value,
                "r": k.reason.value,
                "d": k.description,
                "m": k.amount,
                "tp": k.record.traceparent or here,
            }
        )
    cursor = await conn.execute(
        """
        INSERT INTO paystream.kept_records
            (topic, "partition", "offset", kafka_ts, raw, raw_key,
             payment_id, error_type, reason, description, amount, traceparent)
        SELECT t, p, o, s, decode(b, 'base64'), k, i, e, r, d, m, tp
        FROM json_to_recordset(%s::json) AS j(
            t text, p int, o bigint, s bigint, b text, k text,
            i text, e text, r text, d text, m numeric, tp text)
        ON CONFLICT (topic, "partition", "offset", kafka_ts) DO NOTHING
        RETURNING id
        """,
        (_json(rows),),
    )
    return len(await cursor.fetchall())


# --- the outbox of error reports -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    id: int
    payment_id: str | None
    error_type: str
    description: str
    traceparent: str | None = None


async def claim_reports(conn: Conn, limit: int, lease_s: float) -> list[Report]:
    """Lease the oldest due reports for `lease_s` (no other relay takes them meanwhile); rows
    another relay is claiming are skipped, not waited for. Oldest first."""
    cursor = await conn.execute(
        """
        UPDATE paystream.kept_records
        SET next_report_at = now() + %(lease_s)s * interval '1 second'
        WHERE id IN (
            SELECT id FROM paystream.kept_records
            WHERE reported_at IS NULL AND next_report_at <= now()
            ORDER BY id LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        )
        RETURNING id, payment_id, error_type, description, traceparent
        """,
        {"limit": limit, "lease_s": lease_s},
    )
    rows = sorted(await cursor.fetchall())
    return [
        Report(id=r[0], payment_id=r[1], error_type=r[2], description=r[3], traceparent=r[4])
        for r in rows
    ]


async def mark_reported(conn: Conn, ids: Sequence[int]) -> None:
    if ids:
        await conn.execute(
            "UPDATE paystream.kept_records SET reported_at = now(),"
            " report_attempts = report_attempts + 1 WHERE id = ANY(%s::bigint[])",
            (list(ids),),
        )


async def mark_report_failed(conn: Conn, ids: Sequence[int], error: str) -> None:
    """Back off per row: 1 s, 2 s, 4 s … capped at 30 s."""
    if ids:
        await conn.execute(
            """
            UPDATE paystream.kept_records SET
                report_attempts = report_attempts + 1,
                last_report_error = %s,
                next_report_at = now()
                    + least(30, 2 ^ least(report_attempts, 5)) * interval '1 second'
            WHERE id = ANY(%s::bigint[])
            """,
            (error, list(ids)),
        )


async def outbox_depth(conn: Conn) -> int:
    cursor = await conn.execute(
        "SELECT count(*) FROM paystream.kept_records WHERE reported_at IS NULL"
    )
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def oldest_unreported_age_s(conn: Conn) -> float:
    """Seconds since the oldest record still unreported was kept; 0 if none is."""
    cursor = await conn.execute(
        "SELECT coalesce(extract(epoch FROM now() - min(kept_at)), 0)"
        " FROM paystream.kept_records WHERE reported_at IS NULL"
    )
    row = await cursor.fetchone()
    return float(row[0]) if row else 0.0


# --- listing and replaying kept records ------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KeptRow:
    """A row of paystream.kept_records, read by column name."""

    id: int
    topic: str
    partition: int
    offset: int
    kafka_ts: int
    raw: bytes | None
    raw_key: str | None
    payment_id: str | None
    error_type: str
    reason: str
    description: str
    amount: Decimal | None
    kept_at: datetime
    reported_at: datetime | None
    report_attempts: int
    last_report_error: str | None
    resolved_at: datetime | None
    replays: int

    @property
    def record_id(self) -> RecordId:
        return RecordId(
            topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            timestamp_ms=self.kafka_ts,
        )

    def record(self, cipher: KeptCipher | None) -> Record:
        """The record as it arrived, to replay it. Raises SealedRecordUnreadable when its raw
        bytes are sealed with a key `cipher` does not hold."""
        raw = open_raw(cipher, self.id, self.record_id, self.raw, self.raw_key)
        return Record(id=self.record_id, value=None if raw is None else bytes(raw))

    def as_json(self) -> dict[str, object]:
        """What listings show of a kept record: never its raw bytes (they may hold card data)."""
        return {
            "id": self.id,
            "payment_id": self.payment_id,
            "error_type": self.error_type,
            "reason": self.reason,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "error_description": self.description,
            "amount": None if self.amount is None else int(self.amount),
            "kept_at": self.kept_at.isoformat(),
            "reported": self.reported_at is not None,
            "resolved": self.resolved_at is not None,
            "replays": self.replays,
        }


_KEPT_ROW = class_row(KeptRow)
_KEPT_COLUMNS = """id, topic, "partition", "offset", kafka_ts, raw, raw_key, payment_id,
    error_type, reason, description, amount, kept_at, reported_at, report_attempts,
    last_report_error, resolved_at, replays"""
_KEPT_FILTER = """
    (%(etype)s::text IS NULL OR error_type = %(etype)s)
    AND (%(reason)s::text IS NULL OR reason = %(reason)s)
    AND (%(topic)s::text IS NULL OR topic = %(topic)s)
    AND (%(since)s::timestamptz IS NULL OR kept_at >= %(since)s)
    AND (NOT %(unresolved)s OR resolved_at IS NULL)
    AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
    AND (%(max_replays)s::int IS NULL OR replays < %(max_replays)s)
    AND (%(pid)s::text IS NULL OR payment_id = %(pid)s)
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class KeptFilter:
    """Which kept records a listing or a replay is about; every field left None matches all."""

    error_type: str | None = None
    reason: str | None = None
    topic: str | None = None
    since: datetime | None = None
    unresolved_only: bool = False
    ids: Sequence[int] | None = None
    max_replays: int | None = None
    payment_id: str | None = None

    def params(self) -> dict[str, object]:
        return {
            "pid": self.payment_id,
            "etype": self.error_type,
            "reason": self.reason,
            "topic": self.topic,
            "since": self.since,
            "unresolved": self.unresolved_only,
            "ids": None if self.ids is None else list(self.ids),
            "max_replays": self.max_replays,
        }


async def list_kept(
    conn: Conn, where: KeptFilter = KeptFilter(), *, after_id: int = 0, limit: int = 1000
) -> list[KeptRow]:
    """Matching kept records with an id above `after_id`, in id order (pages for `after_id`)."""
    cursor = conn.cursor(row_factory=_KEPT_ROW)
    await cursor.execute(
        f"SELECT {_KEPT_COLUMNS} FROM paystream.kept_records WHERE {_KEPT_FILTER}"
        " AND id > %(after)s ORDER BY id LIMIT %(limit)s",
        {**where.params(), "after": after_id, "limit": limit},
    )
    return await cursor.fetchall()


async def count_kept(conn: Conn, where: KeptFilter = KeptFilter()) -> int:
    cursor = await conn.execute(
        f"SELECT count(*) FROM paystream.kept_records WHERE {_KEPT_FILTER}", where.params()
    )
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def latest_kept(conn: Conn, limit: int) -> list[KeptRow]:
    """The most recently kept records, newest first."""
    cursor = conn.cursor(row_factory=_KEPT_ROW)
    await cursor.execute(
        f"SELECT {_KEPT_COLUMNS} FROM paystream.kept_records ORDER BY id DESC LIMIT %s", (limit,)
    )
    return await cursor.fetchall()


@dataclass(frozen=True, slots=True, kw_only=True)
class KeptSummary:
    """The kept records of one reason: how many, how many a replay resolved, and what is still
    unresolved: how many, their total amount (where it could be read) and the oldest's business
    time (its Kafka timestamp, or when it was kept if the record had none)."""

    reason: str
    error_type: str
    kept: int
    resolved: int
    unresolved: int
    unresolved_amount: Decimal
    oldest_unresolved: datetime | None

    def oldest_age_s(self, now: float) -> float | None:
        """How long, at `now` (epoch seconds), the oldest unresolved record has waited."""
        if self.oldest_unresolved is None:
            return None
        return max(0.0, now - self.oldest_unresolved.timestamp())


async def kept_by_reason(conn: Conn) -> list[KeptSummary]:
    cursor = conn.cursor(row_factory=class_row(KeptSummary))
    await cursor.execute(
        """
        SELECT reason, min(error_type) AS error_type, count(*) AS kept,
            count(resolved_at) AS resolved,
            count(*) FILTER (WHERE resolved_at IS NULL) AS unresolved,
            coalesce(sum(amount) FILTER (WHERE resolved_at IS NULL), 0) AS unresolved_amount,
            min(CASE WHEN kafka_ts > 0 THEN to_timestamp(kafka_ts / 1000.0) ELSE kept_at END)
                FILTER (WHERE resolved_at IS NULL) AS oldest_unresolved
        FROM paystream.kept_records GROUP BY reason ORDER BY kept DESC
        """
    )
    return await cursor.fetchall()


async def resolve_kept(conn: Conn, ids: Sequence[RecordId]) -> None:
    """A replay stored these records' payments."""
    if ids:
        await conn.execute(
            f"""
            WITH resolved AS (
                UPDATE paystream.kept_records AS k
                SET resolved_at = now(), replays = replays + 1
                FROM {_IDS}
                WHERE (k.topic, k."partition", k."offset", k.kafka_ts) = (r.t, r.p, r.o, r.s)
                RETURNING k.id
            )
            INSERT INTO paystream.replays (kept_id, outcome, attempted)
            SELECT id, 'stored', true FROM resolved
            """,
            (_ids(ids),),
        )


async def update_kept(conn: Conn, kept: Sequence[Kept]) -> None:
    """A replay kept these records again. A new reason is a new fact, so it is reported again.
    A record that was not tried (`Kept.attempted`) keeps its count of replays."""
    for k in kept:
        await conn.execute(
            """
            WITH again AS (
                UPDATE paystream.kept_records SET
                    replays = replays + %(attempted)s::int,
                    reported_at = CASE WHEN reason = %(reason)s THEN reported_at END,
                    next_report_at =
                        CASE WHEN reason = %(reason)s THEN next_report_at ELSE now() END,
                    reason = %(reason)s, error_type = %(etype)s, description = %(desc)s
                WHERE (topic, "partition", "offset", kafka_ts) = (%(t)s, %(p)s, %(o)s, %(ts)s)
                RETURNING id
            )
            INSERT INTO paystream.replays (kept_id, outcome, reason, description, attempted)
            SELECT id, 'kept', %(reason)s, %(desc)s, %(attempted)s FROM again
            """,
            {
                "reason": k.reason.value,
                "etype": k.error_type.value,
                "desc": k.description,
                "attempted": k.attempted,
                "t": k.record.id.topic,
                "p": k.record.id.partition,
                "o": k.record.id.offset,
                "ts": k.record.id.timestamp_ms,
            },
        )


# --- one payment's trail ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredPayment:
    """A stored payment without its card number, and the record it came from (if known)."""

    payment_id: str
    account_id: int
    payment_type: str
    amount: Decimal
    created_on: datetime
    topic: str | None
    partition: int | None
    offset: int | None
    kafka_ts: int | None
    stored_at: datetime | None


async def stored_payment(conn: Conn, payment_id: str) -> StoredPayment | None:
    cursor = conn.cursor(row_factory=class_row(StoredPayment))
    await cursor.execute(
        """
        SELECT p.payment_id, p.account_id, p.payment_type, p.amount, p.created_on,
            o.topic, o."partition", o."offset", o.kafka_ts, o.stored_at
        FROM payments AS p LEFT JOIN paystream.payment_origins AS o USING (payment_id)
        WHERE p.payment_id = %s
        """,
        (payment_id,),
    )
    return await cursor.fetchone()


@dataclass(frozen=True, slots=True, kw_only=True)
class Replayed:
    kept_id: int
    replayed_at: datetime
    outcome: str
    reason: str | None
    description: str | None
    attempted: bool


async def replays_of(conn: Conn, kept_ids: Sequence[int]) -> list[Replayed]:
    cursor = conn.cursor(row_factory=class_row(Replayed))
    await cursor.execute(
        "SELECT kept_id, replayed_at, outcome, reason, description, attempted"
        " FROM paystream.replays WHERE kept_id = ANY(%s::bigint[]) ORDER BY replayed_at",
        (list(kept_ids),),
    )
    return await cursor.fetchall()
