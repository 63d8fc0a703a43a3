"""Kafka bytes → Payment or a precise reason; never an exception, never card data in a reason."""

from __future__ import annotations

import hashlib
import json

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from paystream import codec
from paystream.codec import MAX_KEPT_ID_BYTES, DecodeError, decode, kept_id
from paystream.model import Payment, PaymentType, Reason
from paystream.text import control_at, visible

CARD = "4847171163467501036"


def _doc(**changes: object) -> bytes:
    document: dict[str, object] = {
        "payment_id": "382b8005-da4e-4004-b064-5d920d47e14b",
        "account_id": 496,
        "payment_type": "online",
        "credit_card": CARD,
        "amount": 23,
        "delay": 360,
    }
    document.update(changes)
    return orjson.dumps({k: v for k, v in document.items() if v is not ...})


def test_original_message_decodes() -> None:
    """The captured original message, unknown `delay` field and all, is a payment."""
    assert Payment(
        payment_id="382b8005-da4e-4004-b064-5d920d47e14b",
        account_id=496,
        payment_type=PaymentType.ONLINE,
        credit_card=CARD,
        amount=23,
    ) == decode(_doc(), PaymentType.ONLINE)


@pytest.mark.parametrize(
    ("value", "reason", "words"),
    [
        (b"", Reason.MALFORMED, "empty message"),
        (b'{"payment_id": "x",', Reason.MALFORMED, "not valid JSON"),
        (b'{"payment_id": "\xff"}', Reason.MALFORMED, "not UTF-8"),
        (b"[1, 2]", Reason.MALFORMED, "JSON list, not an object"),
        (_doc(amount=...), Reason.INVALID, "amount must be an integer, got null"),
        (_doc(amount=12.5), Reason.INVALID, "a fractional number"),
        (_doc(amount=0), Reason.INVALID, "amount must be positive"),
        (_doc(amount=-3), Reason.INVALID, "amount must be positive"),
        (_doc(amount=True), Reason.INVALID, "got a boolean"),
        (_doc(account_id="12"), Reason.INVALID, "account_id must be an integer, got a string"),
        (_doc(account_id=2**40), Reason.INVALID, "out of range"),
        (_doc(payment_id=""), Reason.INVALID, "payment_id is missing"),
        (_doc(payment_id="x" * 101), Reason.INVALID, "payment_id is 101 characters"),
        (_doc(payment_type="crypto"), Reason.INVALID, "payment_type must be"),
        (_doc(payment_type="offline", credit_card=""), Reason.WRONG_TOPIC, "arrived on the online"),
        (_doc(credit_card=123), Reason.INVALID, "credit_card must be a string"),
        (b"[" * 5000 + b"]" * 5000, Reason.MALFORMED, "not valid JSON: depth limit exceeded"),
        (b'"\\ud800"', Reason.MALFORMED, "not valid JSON: no low surrogate in string"),
        (b"\xef\xbb\xbf" + _doc(), Reason.MALFORMED, "starts with a UTF-8 byte-order mark"),
        (_doc(payment_id="nul\x00id"), Reason.INVALID, "U+0000 (NUL) at position 3"),
        (_doc(payment_id="tab\tid"), Reason.INVALID, "control character U+0009 at position 3"),
        (_doc(payment_id="c1\x85"), Reason.INVALID, "control character U+0085"),
        (_doc(credit_card="4111\x00"), Reason.INVALID, "credit_card holds U+0000 (NUL)"),
        (
            b'{"payment_id": "p", "account_id": 18446744073709551616}',
            Reason.INVALID,
            "beyond the 64-bit integer",
        ),
        (b'{"payment_id": "p", "account_id": 1e3}', Reason.INVALID, "a decimal point or an exp"),
        (b'{"payment_id": "p", "account_id": 1e999}', Reason.MALFORMED, "number is infinity"),
        (_doc()[:-1] + b', "amount": 2300}', Reason.INVALID, "amount given more than once"),
        (_doc()[:-1] + b', "\\u0061mount": 1}', Reason.INVALID, "amount given more than once"),
        (
            _doc()[:-1] + b', "x": "\\u0041", "deep": ' + b"[" * 1000 + b"]" * 1000 + b"}",
            Reason.INVALID,
            "nests too deeply to tell",
        ),
    ],
)
def test_bad_input_gets_a_precise_reason(value: bytes, reason: Reason, words: str) -> None:
    """Each kind of bad record is named precisely."""
    result = decode(value, PaymentType.ONLINE)
    assert isinstance(result, DecodeError)
    assert reason == result.reason
    assert words in result.description


def test_a_field_nested_or_escaped_elsewhere_is_not_a_repetition() -> None:
    """Only the outer object's own fields count: the same name inside a nested object, or an
    escape in a value, leave the payment as it is."""
    nested = _doc()[:-1] + b', "extra": {"amount": 1, "payment_id": "x"}, "note": "caf\\u00e9"}'
    assert isinstance(decode(nested, PaymentType.ONLINE), Payment)


def test_an_offline_field_given_twice_counts_by_its_last_value() -> None:
    """An offline record has one reader: a repeated field counts by its last value, as in most
    JSON readers (an online one is refused: the gateway reads the record too)."""
    twice = _doc(payment_type="offline", credit_card="")[:-1] + b', "amount": 2300}'
    result = decode(twice, PaymentType.OFFLINE)
    assert isinstance(result, Payment)
    assert 2300 == result.amount


def test_an_id_the_database_cannot_hold_travels_escaped() -> None:
    """A payment_id with control characters is refused by the codec and travels with its
    error escaped: printable, storable, and telling exactly what arrived."""
    result = decode(_doc(payment_id="nul\x00id\x1b[2J"), PaymentType.ONLINE)
    assert isinstance(result, DecodeError)
    assert "nul\\u0000id\\u001b[2J" == result.payment_id


def test_readable_payment_id_is_kept_with_the_error() -> None:
    """When the id is readable it travels with the error, so the report can name it."""
    result = decode(_doc(amount=-1), PaymentType.ONLINE)
    assert isinstance(result, DecodeError)
    assert result.payment_id == "382b8005-da4e-4004-b064-5d920d47e14b"


def test_an_over_long_payment_id_travels_with_its_error_as_it_arrived() -> None:
    """An id longer than the schema's 100 characters is invalid but kept and reported as it
    arrived while it fits MAX_KEPT_ID_BYTES, so the log service can find the record; the
    description gives its size in characters and bytes."""
    long_id = "ab" * 75
    result = decode(_doc(payment_id=long_id), PaymentType.ONLINE)
    assert isinstance(result, DecodeError)
    assert long_id == result.payment_id
    assert "payment_id is 150 characters (150 bytes of UTF-8)" in result.description


@given(st.text(min_size=1, max_size=3000))
def test_a_kept_id_fits_its_bound_and_tells_ids_apart(payment_id: str) -> None:
    """Any id, of any width, is kept in at most MAX_KEPT_ID_BYTES of UTF-8; an id that fits is
    kept as itself (escaped), and two ids that differ give two kept ids."""
    kept = kept_id(payment_id)
    assert len(kept.encode("utf-8", "surrogatepass")) <= MAX_KEPT_ID_BYTES
    if len(visible(payment_id).encode("utf-8", "surrogatepass")) <= MAX_KEPT_ID_BYTES:
        assert visible(payment_id) == kept
    assert kept != kept_id(payment_id + "x")
    assert kept == kept_id(payment_id)


def test_a_wide_payment_id_is_refused_with_its_size_and_kept_by_a_digest() -> None:
    """1 500 characters from the CJK Extension B block (6 000 bytes) are invalid, the
    description says how wide, and the id kept is a prefix of it with a digest of the whole."""
    wide = "\U00020000" * 1500
    result = decode(_doc(payment_id=wide), PaymentType.OFFLINE)
    assert isinstance(result, DecodeError)
    assert Reason.INVALID == result.reason
    assert "payment_id is 1500 characters (6000 bytes of UTF-8)" in result.description
    assert result.payment_id is not None
    assert result.payment_id.startswith("\U00020000" * 10)
    assert result.payment_id.endswith(hashlib.sha256(wide.encode()).hexdigest()[:32])
    assert kept_id(wide) == result.payment_id


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "payment_id": json_values,
            "account_id": json_values,
            "payment_type": st.sampled_from(["online", "offline"]) | json_values,
            "credit_card": st.just(CARD) | json_values,
            "amount": json_values,
        },
    )
)
def test_any_document_decodes_or_is_rejected_without_card_data(document: dict[str, object]) -> None:
    """Whatever arrives, decode returns a value (never raises) and no reason echoes the card."""
    result = decode(orjson.dumps(document), PaymentType.ONLINE)
    if isinstance(result, DecodeError):
        assert CARD not in result.description
        shown = [result.description, result.payment_id or ""]
        assert [None, None] == [control_at(text) for text in shown]
    else:
        assert result.amount > 0
        assert 1 <= result.account_id <= 2**31 - 1


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(value: bytes) -> None:
    """Random bytes are a payment or a decode error, never an exception."""
    assert isinstance(decode(value, PaymentType.OFFLINE), Payment | DecodeError)


_EDGES = st.sampled_from([0, -1, 2**31 - 1, 2**31, 10**15, 10**15 + 1, 2**63, 2**64, True, ""])
_TOKENS = st.sampled_from(
    [b"1e400", b"1.0", b"-0", b"1E2", b"1" * 30, b'"\\ud800"', b'"\\udc00x"', b'"\\u0041"', b"[]"]
)
"""Values as only bytes can give them: beyond a double, written as a float, escaped."""
_PLAIN = st.text(st.sampled_from("ab-9 \u00e9\u20ac"), max_size=3)
_TEXT = st.text(
    st.sampled_from("ab-9 \x00\x1f\x7f\x85\xa0\u00e9\u2028\ud800"), min_size=0, max_size=3
)


def _written(value: object) -> bytes:
    """As a JSON writer writes it, any integer and any text included (a lone surrogate becomes
    bytes that are not UTF-8)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _mostly(
    valid: st.SearchStrategy[object], *near: st.SearchStrategy[object]
) -> st.SearchStrategy[bytes]:
    """A field's value as written: valid seven times in eight, else a near miss, else anything."""
    far = st.one_of(_EDGES, json_values).map(_written) | _TOKENS
    missed = st.one_of(*near).map(_written) | _TOKENS if near else far
    return st.integers(0, 15).flatmap(
        lambda dice: far if dice == 0 else missed if dice == 1 else valid.map(_written)
    )


_FIELDS = {
    "payment_id": _mostly(
        st.builds(lambda head, tail: head + tail, st.sampled_from(["p-1", "x" * 98]), _PLAIN),
        _TEXT,
        st.just("y" * 101),
    ),
    "account_id": _mostly(
        st.integers(min_value=1, max_value=2000), st.sampled_from([0, -1, 2**31 - 1, 2**31])
    ),
    "payment_type": _mostly(st.sampled_from(PaymentType)),
    "credit_card": _mostly(
        st.sampled_from([CARD, "", None]), _TEXT.map(lambda t: CARD + t), st.just("9" * 101)
    ),
    "amount": _mostly(
        st.integers(min_value=1, max_value=10**6), st.sampled_from([0, -1, 10**15, 10**15 + 1])
    ),
    "delay": _mostly(st.integers(min_value=0, max_value=1000), st.sampled_from([-1, 0.5, 2**64])),
    "note": _mostly(json_values),
}


@st.composite
def _near_payments(draw: st.DrawFn, topic: PaymentType) -> bytes:
    """JSON objects near a payment of `topic`, written pair by pair: a field may be missing, come
    twice or be unknown, and the text is sometimes spliced with bytes no JSON writer emits."""
    fields = _FIELDS | {
        "payment_type": _mostly(
            st.just(topic.value), st.sampled_from([*PaymentType, topic.title(), f"{topic} "])
        )
    }
    keys = [name for name in fields if name != "note" and draw(st.integers(0, 15))]
    keys += draw(st.lists(st.sampled_from(sorted(fields)), max_size=2))
    pairs = [orjson.dumps(key) + b":" + draw(fields[key]) for key in draw(st.permutations(keys))]
    text = draw(st.sampled_from([b"", b" ", b"\n"])) + b"{" + b",".join(pairs) + b"}"
    if not draw(st.integers(0, 15)):
        at = draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:at] + draw(st.binary(max_size=4)) + text[at:]
    return text


@settings(max_examples=1000)
@given(st.data(), st.sampled_from(PaymentType))
def test_the_typed_reading_answers_as_the_precise_one(
    data: st.DataObject, topic: PaymentType
) -> None:
    """The usual shape is typed straight from the bytes; whatever the bytes, the answer is the
    one the field-by-field reading gives: the same payment, or the same reason in the same
    words."""
    value = data.draw(_near_payments(topic))
    answer = decode(value, topic)
    assert codec._precisely(value, topic) == answer
    event("a payment" if isinstance(answer, Payment) else answer.reason)


def _offline_with(**fields: bytes) -> bytes:
    """An offline payment's JSON with these fields' values written as given (raw bytes)."""
    written = {
        "payment_id": b'"p-1"',
        "account_id": b"1",
        "payment_type": b'"offline"',
        "amount": b"5",
        **fields,
    }
    return b"{" + b",".join(b'"%s":%s' % (k.encode(), v) for k, v in written.items()) + b"}"


@pytest.mark.parametrize(
    "value",
    [
        _offline_with(delay=b"[" * 100_000 + b"]" * 100_000),
        _offline_with(note=b"{" + b'"a":{' * 5_000 + b"}" * 5_001),
        _offline_with(amount=b"9" * 100_000),
        _offline_with(delay=b"9" * 300),
        _offline_with(delay=b"9" * 5_000),
        _offline_with(delay=b"1e99999999999"),
        _offline_with(payment_id=b'"' + b"p" * 10_000_000 + b'"'),
        _offline_with(payment_id=b'"p\\u0000"'),
        _offline_with(credit_card=b'"4\\u0000"'),
        _offline_with() + b" " * 100_000,
    ],
    ids=[
        "nested 100 000 deep",
        "an unknown object 5 000 deep",
        "an amount of 100 000 digits",
        "a delay of 300 digits",
        "a delay of 5 000 digits",
        "a delay beyond any double",
        "a payment_id of 10 MB",
        "a NUL in the payment_id",
        "a NUL in the card",
        "100 000 spaces after the object",
    ],
)
def test_the_two_readings_answer_alike_at_the_extremes(value: bytes) -> None:
    """What a hostile producer sends at the limits of nesting, number size and length, through
    both readings: the same answer, and no exception from either."""
    assert codec._precisely(value, PaymentType.OFFLINE) == decode(value, PaymentType.OFFLINE)
