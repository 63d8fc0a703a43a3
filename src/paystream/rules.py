"""What becomes of each record of a batch, given what was read about it. Pure: no I/O.

The pipeline gathers the facts and writes what these functions decide, in three steps:

1. `triage`, before the batch's transaction: a record that does not decode is kept; an online
   payment is kept when the gateway declined it or could not answer; one whose record already
   has an outcome is a redelivery; the rest are candidates for storing.
2. `decide`, in the transaction, its partitions held: a candidate whose record has an outcome
   meanwhile is a redelivery; one whose account does not exist is kept; of the candidates with
   the same payment_id the first is stored, and the others are settled against it.
3. `settle`, for each candidate whose payment_id turned out to be stored already: a redelivery
   when that payment came from this very record, otherwise a duplicate.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import NamedTuple

from paystream.codec import DecodeError
from paystream.errors import CircuitOpen, GatewayUnavailable
from paystream.model import (
    Approved,
    Declined,
    Existing,
    Kept,
    Payment,
    PaymentType,
    Reason,
    Record,
    RecordId,
)

Verdict = Approved | Declined | GatewayUnavailable
"""The gateway's answer about one payment (CircuitOpen, a GatewayUnavailable: it was not asked)."""

CONTENT = ("account_id", "payment_type", "credit_card", "amount")
"""The fields compared when the same payment_id arrives twice (a Payment's and an Existing's)."""


class Candidate(NamedTuple):  # made once a record: a NamedTuple (paystream.model says why)
    """A record whose payment may be stored. `validated` is False when the gateway was skipped
    because the payment_id was stored already: such a record can only end as a redelivery or a
    duplicate."""

    record: Record
    payment: Payment
    validated: bool


@dataclass(slots=True)
class Triaged:
    """A batch before its transaction: what may be stored, what is kept, how many are done."""

    candidates: list[Candidate] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    redelivered: int = 0

    @classmethod
    def of(cls, items: Sequence[Candidate | Kept]) -> Triaged:
        return cls(
            candidates=[i for i in items if isinstance(i, Candidate)],
            kept=[i for i in items if isinstance(i, Kept)],
        )

    def items(self) -> list[Candidate | Kept]:
        return [*self.candidates, *self.kept]

    def records(self) -> list[RecordId]:
        return [item.record.id for item in self.items()]


@dataclass(slots=True)
class Decided:
    """A batch's outcomes in its transaction. `store` holds one candidate per payment_id;
    `settle` those whose fate depends on the stored payment of their payment_id."""

    store: list[Candidate] = field(default_factory=list)
    settle: list[Candidate] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    redelivered: int = 0


Decoded = tuple[Record, Payment | DecodeError]


def needs_gateway(
    decoded: Sequence[Decoded], *, done: Set[RecordId], stored: Set[str]
) -> list[tuple[Record, Payment]]:
    """The online payments to ask the gateway about: not a record already done (a redelivery)
    nor a payment already stored (it can only end as a redelivery or a duplicate)."""
    return [
        (record, payment)
        for record, payment in decoded
        if isinstance(payment, Payment)
        and payment.payment_type is PaymentType.ONLINE
        and record.id not in done
        and payment.payment_id not in stored
    ]


def triage(
    decoded: Sequence[Decoded],
    *,
    done: Set[RecordId],
    stored: Set[str],
    verdicts: Mapping[Payment, Verdict],
) -> Triaged:
    """Step 1. `done` and `stored` were read for the online records only (`needs_gateway`), and
    `verdicts` holds the gateway's answer about each payment it was asked about."""
    triaged = Triaged()
    for record, payment in decoded:
        if isinstance(payment, DecodeError):
            triaged.kept.append(undecodable(record, payment))
        elif payment.payment_type is PaymentType.OFFLINE:
            triaged.candidates.append(Candidate(record, payment, True))
        elif record.id in done:
            triaged.redelivered += 1
        elif payment.payment_id in stored:
            triaged.candidates.append(Candidate(record, payment, False))
        elif isinstance(verdict := verdicts[payment], Approved):
            triaged.candidates.append(Candidate(record, payment, True))
        else:
            triaged.kept.append(judged(record, payment, verdict))
    return triaged


def undecodable(record: Record, error: DecodeError) -> Kept:
    return Kept(
        record=record,
        payment_id=error.payment_id,
        reason=error.reason,
        description=error.description,
        amount=error.amount,
    )


def judged(record: Record, payment: Payment, verdict: Declined | GatewayUnavailable) -> Kept:
    """An online payment the gateway did not approve."""
    if isinstance(verdict, Declined):
        description = f"gateway declined the payment (HTTP {verdict.status})"
        return Kept.of(record, payment, Reason.DECLINED, description)
    if isinstance(verdict, CircuitOpen):
        description = f"gateway not asked: {verdict}"
        return Kept.of(record, payment, Reason.GATEWAY_UNAVAILABLE, description, attempted=False)
    description = f"gateway unavailable after retries: {verdict}"
    return Kept.of(record, payment, Reason.GATEWAY_UNAVAILABLE, description)


def decide(triaged: Triaged, *, done: Set[RecordId], accounts: Set[int]) -> Decided:
    """Step 2. `done`: the records of the batch that have an outcome by now (read with the
    partitions held); `accounts`: which of the candidates' accounts exist."""
    decided = Decided(kept=[k for k in triaged.kept if k.record.id not in done])
    decided.redelivered = len(triaged.kept) - len(decided.kept)
    first: set[str] = set()
    for candidate in triaged.candidates:
        payment = candidate.payment
        if candidate.record.id in done:
            decided.redelivered += 1
        elif payment.account_id not in accounts:
            decided.kept.append(
                Kept.of(
                    candidate.record,
                    payment,
                    Reason.UNKNOWN_ACCOUNT,
                    f"account {payment.account_id} does not exist",
                )
            )
        elif candidate.validated and payment.payment_id not in first:
            first.add(payment.payment_id)
            decided.store.append(candidate)
        else:
            decided.settle.append(candidate)
    return decided


def settle(candidate: Candidate, existing: Existing | None) -> Kept | None:
    """Step 3: None when the stored payment came from this very record (a redelivery), else why
    the record is kept. `existing`: the stored payment of its payment_id (None: there is none)."""
    payment = candidate.payment
    if existing is None:
        # The gateway was skipped because the id was stored, but that row is gone now.
        return Kept.of(
            candidate.record,
            payment,
            Reason.GATEWAY_UNAVAILABLE,
            "not validated: the stored payment it duplicated was removed",
        )
    if existing.origin == candidate.record.id:
        return None
    return Kept.of(
        candidate.record,
        payment,
        Reason.DUPLICATE,
        f"payment_id already stored from {_where(existing.origin)}"
        f" ({_difference(payment, existing)})",
    )


def rejected(item: Candidate | Kept, refusal: str) -> Kept:
    """A single record the database refused, while it took records like it: kept as a database
    error, described by what the database said (`refusal`: store.refusal, no card data)."""
    description = f"database rejected the record: {refusal}"
    if isinstance(item, Candidate):
        return Kept.of(item.record, item.payment, Reason.DATABASE_REJECTED, description)
    return dataclasses.replace(item, reason=Reason.DATABASE_REJECTED, description=description)


BARE_DESCRIPTION = "database rejected the record and its description; its raw bytes are kept"


def bare(kept: Kept) -> Kept:
    """A kept record reduced to what no value can make the database refuse: its coordinates,
    its raw bytes and a fixed description (no payment_id, no trace context)."""
    record = kept.record._replace(traceparent=None)
    return Kept(
        record=record,
        payment_id=None,
        reason=Reason.DATABASE_REJECTED,
        description=BARE_DESCRIPTION,
        amount=kept.amount,
    )


CANARY_PREFIX = "paystream-probe-"
"""How the payment_id of a probe's record begins (pipeline: written, then rolled back)."""


def canary(like: Candidate | Kept) -> Candidate | Kept:
    """A record like `like` that no value of its own can make the database refuse: a fresh
    payment_id, an amount of 1, no card, no raw bytes, and an offset no record has (-1)."""
    record = like.record
    place = record.id._replace(offset=-1, timestamp_ms=-(uuid.uuid4().int % 2**62) - 1)
    empty = Record(place, b"")
    if isinstance(like, Candidate):
        payment = like.payment._replace(
            payment_id=f"{CANARY_PREFIX}{uuid.uuid4().hex}", credit_card=None, amount=1
        )
        return Candidate(empty, payment, True)
    return Kept(record=empty, payment_id=None, reason=like.reason, description="a probe")


def _difference(new: Payment, existing: Existing) -> str:
    differing = [name for name in CONTENT if getattr(new, name) != getattr(existing, name)]
    if not differing:
        return "identical content"
    return "different " + ", ".join(differing)  # field names only, never card data


def _where(origin: RecordId | None) -> str:
    if origin is None:
        return "an earlier payment"
    return f"record {origin.topic}/{origin.partition}@{origin.offset}"
