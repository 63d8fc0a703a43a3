"""The JSON documents the statements unpack with json_to_recordset: each statement's rows have a
type here, and a document's keys are the names of the columns its statement declares for it,
the same name for the same thing in every statement (tests/test_store.py checks every statement
against its row type). The encoders build each row as a literal of its type, so mypy checks the
keys they write.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, TypedDict

import msgspec

from paystream.model import Kept, PartitionId, Payment, RecordId
from paystream.store.queries import json

if TYPE_CHECKING:
    from paystream.store.positions import Span


class PartitionRow(TypedDict):
    topic: str
    partition: int


class RecordRow(PartitionRow):
    offset: int
    kafka_ts: int


class StoredCheckRow(RecordRow):
    """A record whose payment, if stored, must have come from it."""

    payment_id: str


class OffsetRangeRow(PartitionRow):
    first_offset: int
    last_offset: int


class PaymentRow(msgspec.Struct, gc=False):
    """A payment and the record it came from (topic, partition, offset, kafka_ts). A Struct where
    the other rows are TypedDicts: it is the one row made per payment, and msgspec makes and
    encodes it in 0.29 µs where a dict and orjson take 0.61."""

    payment_id: str
    account_id: int
    payment_type: str
    credit_card: str | None
    amount: int
    topic: str
    partition: int
    offset: int
    kafka_ts: int


class StampRow(TypedDict):
    account_id: int
    latest: datetime
    """The newest created_on stored for the account, which orjson writes in ISO 8601 (in C: an
    isoformat() per account was 4 % of the processor's time in an offline drain)."""


class KeptRecordRow(RecordRow):
    raw: str | None
    """Base64 of the raw bytes (sealed with a key, raw_key)."""
    raw_key: str | None
    payment_id: str | None
    error_type: str
    reason: str
    description: str
    amount: int | None
    traceparent: str | None


class PositionRow(PartitionRow):
    next_offset: int


class LogRow(PartitionRow):
    topic_id: str | None
    seen_end: int | None


class SpanRow(PartitionRow):
    first_offset: int
    end_offset: int


_ENCODER = msgspec.json.Encoder()

ROWS: dict[tuple[str, str], type] = {
    ("hold_partitions", "partitions"): PartitionRow,
    ("take_partitions", "partitions"): PartitionRow,
    ("processed_records", "stored"): StoredCheckRow,
    ("processed_records", "kept"): OffsetRangeRow,
    ("insert_payments", "rows"): PaymentRow,
    ("leave_stamps_due", "rows"): StampRow,
    ("stamp_accounts", "rows"): StampRow,
    ("insert_kept", "rows"): KeptRecordRow,
    ("resolve_kept", "ids"): RecordRow,
    ("record_done", "spans"): SpanRow,
    ("lock_positions", "partitions"): PartitionRow,
    ("ranges_beyond", "positions"): PositionRow,
    ("move_positions", "positions"): PositionRow,
    ("start_positions", "positions"): PositionRow,
    ("position_logs", "partitions"): PartitionRow,
    ("mark_logs", "logs"): LogRow,
}
"""Which row type each statement's document parameter holds, by (query, parameter)."""


def partitions(keys: Iterable[PartitionId]) -> str:
    rows: list[PartitionRow] = [{"topic": t, "partition": p} for t, p in sorted(set(keys))]
    return json(rows)


def _record(i: RecordId) -> RecordRow:
    return {
        "topic": i.topic,
        "partition": i.partition,
        "offset": i.offset,
        "kafka_ts": i.timestamp_ms,
    }


def records(ids: Iterable[RecordId]) -> str:
    return json([_record(i) for i in ids])


def stored_checks(checks: Iterable[tuple[RecordId, str]]) -> str:
    rows: list[StoredCheckRow] = [
        {
            "payment_id": pid,
            "topic": i.topic,
            "partition": i.partition,
            "offset": i.offset,
            "kafka_ts": i.timestamp_ms,
        }
        for i, pid in checks
    ]
    return json(rows)


def offset_ranges(ranges: Mapping[PartitionId, tuple[int, int]]) -> str:
    rows: list[OffsetRangeRow] = [
        {"topic": t, "partition": p, "first_offset": lo, "last_offset": hi}
        for (t, p), (lo, hi) in ranges.items()
    ]
    return json(rows)


def payments(stored: Sequence[Payment], origins: Sequence[RecordId]) -> str:
    rows = [
        PaymentRow(
            p.payment_id,
            p.account_id,
            p.payment_type,
            p.credit_card,
            p.amount,
            origin.topic,
            origin.partition,
            origin.offset,
            origin.timestamp_ms,
        )
        for p, origin in zip(stored, origins, strict=True)
    ]
    return _ENCODER.encode(rows).decode()


def stamps(latest: Mapping[int, datetime]) -> str:
    rows: list[StampRow] = [
        {"account_id": account, "latest": newest} for account, newest in latest.items()
    ]
    return json(rows)


def kept(
    kept: Kept, raw: bytes | None, raw_key: str | None, traceparent: str | None
) -> KeptRecordRow:
    """One kept record's row, with its raw bytes as they are to be stored (sealed or not)."""
    return {
        "topic": kept.record.id.topic,
        "partition": kept.record.id.partition,
        "offset": kept.record.id.offset,
        "kafka_ts": kept.record.id.timestamp_ms,
        "raw": None if raw is None else base64.b64encode(raw).decode(),
        "raw_key": raw_key,
        "payment_id": kept.payment_id,
        "error_type": kept.error_type.value,
        "reason": kept.reason.value,
        "description": kept.description,
        "amount": kept.amount,
        "traceparent": traceparent,
    }


def positions(offsets: Mapping[PartitionId, int]) -> str:
    rows: list[PositionRow] = [
        {"topic": t, "partition": p, "next_offset": o} for (t, p), o in sorted(offsets.items())
    ]
    return json(rows)


def logs(marks: Mapping[PartitionId, tuple[str | None, int | None]]) -> str:
    rows: list[LogRow] = [
        {"topic": t, "partition": p, "topic_id": i, "seen_end": e}
        for (t, p), (i, e) in sorted(marks.items())
    ]
    return json(rows)


def spans(done: Mapping[PartitionId, Span]) -> str:
    rows: list[SpanRow] = [
        {"topic": t, "partition": p, "first_offset": f, "end_offset": e}
        for (t, p), (f, e) in sorted(done.items())
    ]
    return json(rows)
