"""The outcome rules of a batch (paystream.rules), without a broker, a database or a gateway."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence, Set

from hypothesis import given
from hypothesis import strategies as st

from paystream import rules
from paystream.codec import DecodeError
from paystream.errors import CircuitOpen, GatewayUnavailable
from paystream.model import (
    Approved,
    Declined,
    ErrorType,
    Existing,
    Kept,
    Payment,
    PaymentType,
    Reason,
    Record,
    RecordId,
)

CARD = "4847171163467501036"
KNOWN = frozenset({1, 2, 3})
APPROVED = Approved(200)


def _record(offset: int, topic: str = "online") -> Record:
    return Record(
        id=RecordId(topic=topic, partition=0, offset=offset, timestamp_ms=1000 + offset),
        value=b"{}",
    )


def _payment(pid: str = "p", *, online: bool = True, account: int = 1, amount: int = 10) -> Payment:
    return Payment(
        payment_id=pid,
        account_id=account,
        payment_type=PaymentType.ONLINE if online else PaymentType.OFFLINE,
        credit_card=CARD if online else None,
        amount=amount,
    )


def _existing(payment: Payment, origin: RecordId | None) -> Existing:
    return Existing(
        payment_id=payment.payment_id,
        account_id=payment.account_id,
        payment_type=payment.payment_type,
        credit_card=payment.credit_card,
        amount=payment.amount,
        origin=origin,
    )


def _triage(
    decoded: Sequence[rules.Decoded],
    verdict: rules.Verdict = APPROVED,
    *,
    done: Set[RecordId] = frozenset(),
    stored: Set[str] = frozenset(),
) -> rules.Triaged:
    asks = rules.needs_gateway(decoded, done=done, stored=stored)
    return rules.triage(
        decoded, done=done, stored=stored, verdicts={payment: verdict for _, payment in asks}
    )


def _only_kept(triaged: rules.Triaged) -> Kept:
    assert [] == triaged.candidates
    assert 1 == len(triaged.kept)
    return triaged.kept[0]


# --- step 1: before the transaction -----------------------------------------------------------


def test_a_record_that_does_not_decode_is_kept_with_its_reason_and_amount() -> None:
    error = DecodeError(
        reason=Reason.INVALID, description="amount must be positive", payment_id="x"
    )
    kept = _only_kept(_triage([(_record(0), error)]))
    assert (Reason.INVALID, "amount must be positive", "x") == (
        kept.reason,
        kept.description,
        kept.payment_id,
    )
    assert ErrorType.OTHER == kept.error_type


def test_only_online_payments_not_done_nor_stored_go_to_the_gateway() -> None:
    decoded: list[rules.Decoded] = [
        (_record(0), _payment("offline", online=False)),
        (_record(1), _payment("redelivered")),
        (_record(2), _payment("stored")),
        (_record(3), _payment("new")),
        (_record(4), DecodeError(reason=Reason.MALFORMED, description="x", payment_id=None)),
    ]
    asks = rules.needs_gateway(decoded, done={_record(1).id}, stored={"stored"})
    assert ["new"] == [payment.payment_id for _, payment in asks]


def test_a_declined_payment_is_kept_as_a_network_error_with_the_status() -> None:
    kept = _only_kept(_triage([(_record(0), _payment())], Declined(402)))
    assert (Reason.DECLINED, ErrorType.NETWORK) == (kept.reason, kept.error_type)
    assert "HTTP 402" in kept.description
    assert 10 == kept.amount


def test_an_unanswered_gateway_spends_an_attempt_and_an_open_circuit_does_not() -> None:
    unavailable = _only_kept(_triage([(_record(0), _payment())], GatewayUnavailable("HTTP 503")))
    not_asked = _only_kept(_triage([(_record(0), _payment())], CircuitOpen("circuit open")))
    assert (Reason.GATEWAY_UNAVAILABLE, True) == (unavailable.reason, unavailable.attempted)
    assert (Reason.GATEWAY_UNAVAILABLE, False) == (not_asked.reason, not_asked.attempted)
    assert "HTTP 503" in unavailable.description


def test_a_record_done_before_is_a_redelivery_and_a_stored_id_skips_validation() -> None:
    decoded: list[rules.Decoded] = [(_record(0), _payment("a")), (_record(1), _payment("b"))]
    triaged = _triage(decoded, done={_record(0).id}, stored={"b"})
    assert 1 == triaged.redelivered
    assert [(_record(1), False)] == [(c.record, c.validated) for c in triaged.candidates]


# --- step 2: in the transaction ---------------------------------------------------------------


def test_an_unknown_account_is_kept_as_a_database_error() -> None:
    triaged = _triage([(_record(0), _payment(account=9))])
    decided = rules.decide(triaged, done=set(), accounts=KNOWN)
    assert [] == decided.store
    [kept] = decided.kept
    assert (Reason.UNKNOWN_ACCOUNT, ErrorType.DATABASE) == (kept.reason, kept.error_type)
    assert "account 9 does not exist" == kept.description


def test_records_done_meanwhile_are_redeliveries_whatever_they_would_have_been() -> None:
    error = DecodeError(reason=Reason.MALFORMED, description="x", payment_id=None)
    decoded: list[rules.Decoded] = [(_record(0), _payment()), (_record(1), error)]
    decided = rules.decide(_triage(decoded), done={_record(0).id, _record(1).id}, accounts=KNOWN)
    assert (2, [], [], []) == (decided.redelivered, decided.store, decided.settle, decided.kept)


def test_the_first_record_of_a_payment_id_is_stored_and_the_others_settle_against_it() -> None:
    decoded: list[rules.Decoded] = [
        (_record(0), _payment("same")),
        (_record(1), _payment("same", amount=99)),
        (_record(2), _payment("other")),
    ]
    decided = rules.decide(_triage(decoded), done=set(), accounts=KNOWN)
    assert [0, 2] == [c.record.id.offset for c in decided.store]
    assert [1] == [c.record.id.offset for c in decided.settle]


# --- step 3: a payment_id stored already ------------------------------------------------------


def test_a_payment_stored_from_this_very_record_is_a_redelivery() -> None:
    candidate = rules.Candidate(record=_record(0), payment=_payment(), validated=False)
    assert rules.settle(candidate, _existing(candidate.payment, _record(0).id)) is None


def test_a_payment_stored_from_another_record_is_a_duplicate_naming_what_differs() -> None:
    payment = _payment(amount=10)
    candidate = rules.Candidate(record=_record(1), payment=payment, validated=True)
    same = rules.settle(candidate, _existing(payment, _record(0).id))
    other = rules.settle(candidate, _existing(_payment(amount=11, account=2), None))
    assert same is not None
    assert other is not None
    assert (Reason.DUPLICATE, ErrorType.OTHER) == (same.reason, same.error_type)
    assert "already stored from record online/0@0 (identical content)" in same.description
    assert "from an earlier payment (different account_id, amount)" in other.description


def test_a_duplicate_whose_stored_payment_was_removed_waits_for_validation() -> None:
    candidate = rules.Candidate(record=_record(0), payment=_payment(), validated=False)
    kept = rules.settle(candidate, None)
    assert kept is not None
    assert Reason.GATEWAY_UNAVAILABLE == kept.reason
    assert kept.reason.waits


def test_a_record_the_database_refuses_is_kept_as_rejected_whatever_it_was() -> None:
    candidate = rules.Candidate(record=_record(0), payment=_payment(), validated=True)
    declined = Kept.of(_record(1), _payment(), Reason.DECLINED, "gateway declined")
    for item in (candidate, declined):
        kept = rules.rejected(item, "NumericValueOutOfRange 22003: numeric field overflow")
        assert (Reason.DATABASE_REJECTED, item.record) == (kept.reason, kept.record)
        assert "NumericValueOutOfRange 22003: numeric field overflow" in kept.description


def test_a_canary_is_like_its_record_but_holds_nothing_of_its_own() -> None:
    """A probe's record: the same topic, partition, account and type; a fresh payment_id, an
    amount of 1, no card, no raw bytes, an offset no record has; a kept one, no payment_id."""
    candidate = rules.Candidate(record=_record(7), payment=_payment(), validated=True)
    probe = rules.canary(candidate)
    assert isinstance(probe, rules.Candidate)
    assert (candidate.record.id.topic, candidate.record.id.partition, -1, b"") == (
        probe.record.id.topic,
        probe.record.id.partition,
        probe.record.id.offset,
        probe.record.value,
    )
    assert probe.payment.payment_id.startswith(rules.CANARY_PREFIX)
    assert (candidate.payment.account_id, None, 1) == (
        probe.payment.account_id,
        probe.payment.credit_card,
        probe.payment.amount,
    )
    again = rules.canary(candidate)
    assert isinstance(again, rules.Candidate)
    assert probe.payment.payment_id != again.payment.payment_id
    declined = Kept.of(_record(1), _payment(), Reason.DECLINED, "gateway declined")
    kept = rules.canary(declined)
    assert isinstance(kept, Kept)
    assert (None, -1, b"") == (kept.payment_id, kept.record.id.offset, kept.record.value)


# --- every combination ------------------------------------------------------------------------

_VERDICTS: st.SearchStrategy[rules.Verdict] = st.sampled_from(
    [Approved(200), Declined(400), GatewayUnavailable("HTTP 503"), CircuitOpen("open")]
)


@st.composite
def _batches(draw: st.DrawFn) -> tuple[list[rules.Decoded], dict[str, rules.Verdict]]:
    """Records of a few payment ids (so that ids repeat), online or offline, some undecodable,
    with a gateway verdict per payment id."""
    decoded: list[rules.Decoded] = []
    for offset in range(draw(st.integers(0, 12))):
        record = _record(offset)
        if draw(st.booleans()) and draw(st.booleans()):
            error = DecodeError(reason=Reason.MALFORMED, description="not JSON", payment_id=None)
            decoded.append((record, error))
            continue
        payment = _payment(
            draw(st.sampled_from("abcde")),
            online=draw(st.booleans()),
            account=draw(st.integers(1, 5)),
            amount=draw(st.integers(1, 3)),
        )
        decoded.append((record, payment))
    verdicts: dict[str, rules.Verdict] = {pid: draw(_VERDICTS) for pid in "abcde"}
    return decoded, verdicts


def _run(
    decoded: list[rules.Decoded],
    verdicts: Mapping[str, rules.Verdict],
    done: Set[RecordId],
    stored: Mapping[str, Existing],
) -> tuple[list[rules.Candidate], list[Kept], int]:
    """The three steps as the pipeline runs them, the database played by `stored` (payments
    stored before the batch) and an insert that takes every payment_id not stored yet."""
    asks = rules.needs_gateway(decoded, done=done, stored=stored.keys())
    triaged = rules.triage(
        decoded,
        done=done,
        stored=stored.keys(),
        verdicts={p: verdicts[p.payment_id] for _, p in asks},
    )
    decided = rules.decide(triaged, done=done, accounts=KNOWN)
    inserted = [c for c in decided.store if c.payment.payment_id not in stored]
    after = dict(stored) | {
        c.payment.payment_id: _existing(c.payment, c.record.id) for c in inserted
    }
    kept, redelivered = list(decided.kept), triaged.redelivered + decided.redelivered
    for candidate in [c for c in decided.store if c not in inserted] + decided.settle:
        settled = rules.settle(candidate, after.get(candidate.payment.payment_id))
        if settled is None:
            redelivered += 1
        else:
            kept.append(settled)
    return inserted, kept, redelivered


@given(
    _batches(),
    st.sets(st.integers(0, 12)),
    st.dictionaries(st.sampled_from("abcde"), st.integers(-1, 12), max_size=3),
)
def test_every_record_ends_exactly_once_and_only_valid_payments_are_stored(
    batch: tuple[list[rules.Decoded], dict[str, rules.Verdict]],
    done_offsets: set[int],
    stored_from: dict[str, int],
) -> None:
    """Whatever the batch, the verdicts, the records done before and the payments stored before
    (from a record of the batch, or from elsewhere: offset -1): every record is stored, kept or
    a redelivery, once; a payment_id is stored at most once; a stored payment was valid."""
    decoded, verdicts = batch
    done = {_record(o).id for o in done_offsets}
    stored = {
        pid: _existing(_payment(pid), None if offset < 0 else _record(offset).id)
        for pid, offset in stored_from.items()
    }
    inserted, kept, redelivered = _run(decoded, verdicts, done, stored)

    ends = [c.record.id for c in inserted] + [k.record.id for k in kept]
    assert len(ends) == len(set(ends))
    assert len(decoded) == len(ends) + redelivered
    assert not set(ends) & done
    ids = [c.payment.payment_id for c in inserted]
    assert len(ids) == len(set(ids))
    assert not set(ids) & stored.keys()
    for candidate in inserted:
        payment = candidate.payment
        assert payment.account_id in KNOWN
        assert payment.payment_type is PaymentType.OFFLINE or verdicts[payment.payment_id] == (
            Approved(200)
        )
    for k in kept:
        assert CARD not in k.description
    reasons = Counter(k.reason for k in kept)
    declined = sum(
        1
        for record, payment in decoded
        if isinstance(payment, Payment)
        and payment.payment_type is PaymentType.ONLINE
        and record.id not in done
        and payment.payment_id not in stored
        and verdicts[payment.payment_id] == Declined(400)
    )
    assert declined == reasons[Reason.DECLINED]
