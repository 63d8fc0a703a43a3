"""Kept records as operators see them (kept.sql): listed, counted, summed by reason, and the
trail of one payment. Listings never carry a record's raw bytes, which may hold card data; a
replay reads them through `KeptRow.record`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from psycopg.rows import scalar_row

from paystream.codec import kept_id
from paystream.model import ErrorType, PaymentType, Reason, Record, RecordId
from paystream.sealing import KeptCipher, open_raw
from paystream.store.queries import Conn, fetch_all, fetch_one, typed_row


@dataclass(frozen=True, slots=True, kw_only=True)
class KeptRow:
    """A row of paystream.kept_records, read by column name."""

    id: int
    topic: str
    partition: int
    offset: int
    last_offset: int | None
    """For a gap (reason `expired`): its last missing offset; None for a record."""
    kafka_ts: int
    raw: bytes | None
    raw_key: str | None
    payment_id: str | None
    error_type: ErrorType
    reason: Reason
    description: str
    amount: Decimal | None
    kept_at: datetime
    reported_at: datetime | None
    report_attempts: int
    last_report_error: str | None
    undeliverable_at: datetime | None
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
            "last_offset": self.last_offset,
            "error_description": self.description,
            "amount": None if self.amount is None else int(self.amount),
            "kept_at": self.kept_at.isoformat(),
            "reported": self.reported_at is not None,
            "undeliverable": self.undeliverable_at is not None,
            "last_report_error": self.last_report_error,
            "resolved": self.resolved_at is not None,
            "replays": self.replays,
        }


_KEPT_ROW = typed_row(KeptRow)


@dataclass(frozen=True, slots=True, kw_only=True)
class KeptFilter:
    """Which kept records a listing or a replay is about; every field left None matches all."""

    error_type: ErrorType | None = None
    reason: Reason | None = None
    topic: str | None = None
    since: datetime | None = None
    unresolved_only: bool = False
    ids: Sequence[int] | None = None
    max_replays: int | None = None
    payment_id: str | None = None

    def params(self) -> dict[str, object]:
        return {
            # As kept records carry it: a wide id is found by its prefix and digest.
            "pid": None if self.payment_id is None else kept_id(self.payment_id),
            "etype": None if self.error_type is None else self.error_type.value,
            "reason": None if self.reason is None else self.reason.value,
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
    return await fetch_all(
        conn, _KEPT_ROW, "list_kept", {**where.params(), "after": after_id, "limit": limit}
    )


async def count_kept(conn: Conn, where: KeptFilter = KeptFilter()) -> int:
    return int(await fetch_one(conn, scalar_row, "count_kept", where.params()) or 0)


async def latest_kept(conn: Conn, limit: int) -> list[KeptRow]:
    """The most recently kept records, newest first."""
    return await fetch_all(conn, _KEPT_ROW, "latest_kept", {"limit": limit})


@dataclass(frozen=True, slots=True, kw_only=True)
class KeptSummary:
    """The kept records of one reason: how many, how many a replay resolved, and what is still
    unresolved: how many, their total amount (where it could be read) and the oldest's business
    time (its Kafka timestamp, or when it was kept if the record had none)."""

    reason: Reason
    error_type: ErrorType
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
    return await fetch_all(conn, typed_row(KeptSummary), "kept_by_reason")


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredPayment:
    """A stored payment without its card number, and the record it came from (if known)."""

    payment_id: str
    account_id: int
    payment_type: PaymentType
    amount: Decimal
    created_on: datetime
    topic: str | None
    partition: int | None
    offset: int | None
    kafka_ts: int | None
    stored_at: datetime | None


async def stored_payment(conn: Conn, payment_id: str) -> StoredPayment | None:
    return await fetch_one(conn, typed_row(StoredPayment), "stored_payment", {"pid": payment_id})


class ReplayOutcome(StrEnum):
    STORED = "stored"
    KEPT = "kept"


@dataclass(frozen=True, slots=True, kw_only=True)
class Replayed:
    kept_id: int
    replayed_at: datetime
    outcome: ReplayOutcome
    reason: Reason | None
    description: str | None
    attempted: bool


async def replays_of(conn: Conn, kept_ids: Sequence[int]) -> list[Replayed]:
    return await fetch_all(conn, typed_row(Replayed), "replays_of", {"ids": list(kept_ids)})
