"""What a payment is and what can become of a Kafka record. Pure values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, TypeVar

_E = TypeVar("_E", bound=StrEnum)

PartitionId = tuple[str, int]
"""A partition of a topic: (topic, partition), as Kafka, the database's positions and the
writers' table all name it."""


class PaymentType(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


def _written_by_a_newer_version(cls: type[_E], value: object) -> _E | None:
    """A value of one of our sets that this version does not know, read back from the database:
    written by a newer version running beside this one (a rolling upgrade). Kept as it is, so
    that it is listed, shown and relayed raw; never fatal. Only text is taken."""
    if not isinstance(value, str):
        return None
    unknown = str.__new__(cls, value)
    unknown._name_ = value
    unknown._value_ = value
    return unknown


class ErrorType(StrEnum):
    """The log service's closed set of error types."""

    DATABASE = "database"
    NETWORK = "network"
    OTHER = "other"

    @classmethod
    def _missing_(cls, value: object) -> ErrorType | None:
        return _written_by_a_newer_version(cls, value)


class Reason(StrEnum):
    """Why a record was kept instead of stored; each maps to one error type."""

    MALFORMED = "malformed"
    INVALID = "invalid"
    WRONG_TOPIC = "wrong_topic"
    DUPLICATE = "duplicate"
    DECLINED = "declined"
    GATEWAY_UNAVAILABLE = "gateway_unavailable"
    UNKNOWN_ACCOUNT = "unknown_account"
    DATABASE_REJECTED = "database_rejected"
    EXPIRED = "expired"
    """Records that left Kafka unread (retention, deleted records): one kept row per run of them,
    with no raw bytes; nothing can be replayed."""
    TOPIC_RECREATED = "topic_recreated"
    """Records of a log deleted with its topic (created again since) that were never processed,
    as far as that log was seen to reach: one kept row, as for `expired`."""

    @classmethod
    def _missing_(cls, value: object) -> Reason | None:
        return _written_by_a_newer_version(cls, value)

    @property
    def error_type(self) -> ErrorType:
        """The log's type for this reason (`other` for one a newer version wrote)."""
        return _ERROR_TYPES.get(self, ErrorType.OTHER)

    @property
    def is_gap(self) -> bool:
        """Whether a row kept for this reason stands for records that are gone, not one record
        with its bytes: nothing to replay."""
        return self in (Reason.EXPIRED, Reason.TOPIC_RECREATED)

    @property
    def waits(self) -> bool:
        """Whether a record kept for this reason waits on something outside it (the gateway, an
        account, the database) and may yet be stored; the others are final."""
        return self in _WAITING


_ERROR_TYPES = {
    Reason.MALFORMED: ErrorType.OTHER,
    Reason.INVALID: ErrorType.OTHER,
    Reason.WRONG_TOPIC: ErrorType.OTHER,
    Reason.DUPLICATE: ErrorType.OTHER,
    Reason.DECLINED: ErrorType.NETWORK,
    Reason.GATEWAY_UNAVAILABLE: ErrorType.NETWORK,
    Reason.UNKNOWN_ACCOUNT: ErrorType.DATABASE,
    Reason.DATABASE_REJECTED: ErrorType.DATABASE,
    Reason.EXPIRED: ErrorType.OTHER,
    Reason.TOPIC_RECREATED: ErrorType.OTHER,
}


_WAITING = frozenset({Reason.GATEWAY_UNAVAILABLE, Reason.UNKNOWN_ACCOUNT, Reason.DATABASE_REJECTED})


# The values made once per record on the hot path (RecordId, Record, Payment and
# rules.Candidate) are NamedTuples, the others frozen dataclasses: both immutable and hashable,
# but a NamedTuple is built in 0.41 µs where a frozen dataclass takes 0.69 (four fields, Python
# 3.11), and four of them a record were a seventh of the processor's time in an offline drain.


class RecordId(NamedTuple):
    """A Kafka record's identity. The timestamp tells records apart if a topic is recreated."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


class Record(NamedTuple):
    """One record as read from Kafka."""

    id: RecordId
    value: bytes | None
    traceparent: str | None = None
    """The producer's W3C trace context from the record's headers (read only while tracing)."""


class Payment(NamedTuple):
    payment_id: str
    account_id: int
    payment_type: PaymentType
    credit_card: str | None
    amount: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Existing:
    """A payment found stored, and the record it was stored from (None when paystream did not
    store it, or its origin was purged)."""

    payment_id: str
    account_id: int
    payment_type: PaymentType
    credit_card: str | None
    amount: int
    origin: RecordId | None


@dataclass(frozen=True, slots=True)
class Approved:
    """The gateway approved the payment (HTTP 2xx)."""

    status: int


@dataclass(frozen=True, slots=True)
class Declined:
    """The gateway declined the payment definitively (a 4xx other than our credentials')."""

    status: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Kept:
    """A record that was not stored: why, in words safe to log (never card data)."""

    record: Record
    payment_id: str | None
    reason: Reason
    description: str
    amount: int | None = None
    """The payment's amount where it could be read, so that unresolved money can be summed."""
    attempted: bool = True
    """False when nothing was tried (the gateway's circuit was open): a replay that keeps the
    record again then does not spend one of its attempts."""

    @property
    def error_type(self) -> ErrorType:
        return self.reason.error_type

    @classmethod
    def of(
        cls,
        record: Record,
        payment: Payment,
        reason: Reason,
        description: str,
        *,
        attempted: bool = True,
    ) -> Kept:
        """A decoded payment kept instead of stored."""
        return cls(
            record=record,
            payment_id=payment.payment_id,
            reason=reason,
            description=description,
            amount=payment.amount,
            attempted=attempted,
        )
