"""Kafka bytes → Payment, or a precise reason why not. The only place the wire format lives."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, TypeGuard

import msgspec
import orjson

from paystream.model import Payment, PaymentType, Reason
from paystream.text import codepoint, control_at, visible

MAX_ID_CHARS = 100  # payments.payment_id varchar(100)
MAX_CARD_CHARS = 100  # payments.credit_card varchar(100)
MAX_ACCOUNT_ID = 2**31 - 1  # accounts.account_id integer
MAX_AMOUNT = 10**15  # far above any real payment; keeps numbers sane in reports and sums
MAX_KEPT_ID_BYTES = 400
"""A kept record's payment_id, as written, listed, reported and looked up, is at most this many
bytes of UTF-8: it is indexed, and an index entry holds at most about 2 700 bytes. Every id the
payments table holds (100 characters of at most 4 bytes) fits whole."""
_DIGEST_CHARS = 32  # hex digits of SHA-256 ending a cut id: 128 bits, no two ids collide
_MAX_PARSER_WORDS = 120  # the parser's own account of what is wrong, cut to a readable line
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeError:
    reason: Reason
    description: str
    payment_id: str | None
    amount: int | None = None


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def kept_id(payment_id: str) -> str:
    """The payment_id as a kept record carries it (written, listed, reported, looked up): control
    characters escaped (`visible`), so that a valid id reads as itself and any other can be
    stored and sent; and, past MAX_KEPT_ID_BYTES, cut to a prefix ending in `…` and a digest of
    the whole id, so that the same id always finds its rows and no value can make the write
    fail. The id as it arrived is in the record's raw bytes, kept with it."""
    shown = visible(payment_id)
    encoded = shown.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_KEPT_ID_BYTES:
        return shown
    digest = "…sha256:" + hashlib.sha256(encoded).hexdigest()[:_DIGEST_CHARS]
    room = MAX_KEPT_ID_BYTES - len(digest.encode())
    prefix = encoded[:room].decode("utf-8", "ignore")  # a character cut in two is dropped
    return prefix + digest


def _readable_id(document: dict[str, Any]) -> str | None:
    """The payment_id of a refused record, as kept (`kept_id`), if it is a non-empty string."""
    value = document.get("payment_id")
    if isinstance(value, str) and value:
        return kept_id(value)
    return None


def _too_long(field: str, value: str, limit: int) -> str:
    """Why a text field over its column's length is refused: its size, never its content."""
    size = len(value.encode("utf-8", "surrogatepass"))
    return (
        f"{field} is {len(value)} characters ({size} bytes of UTF-8); the payments table holds"
        f" at most {limit} characters"
    )


def _unreadable(value: bytes, exc: orjson.JSONDecodeError) -> DecodeError:
    """Why bytes are not a JSON text, in the parser's words (which name a position and what was
    expected there, never the content)."""
    words = visible(str(exc))[:_MAX_PARSER_WORDS]
    if value.startswith(_UTF8_BOM):
        what = "starts with a UTF-8 byte-order mark, which JSON does not allow"
    elif "utf-8" in words.lower():  # the parser's words here say 'surrogates', misleadingly
        what = "is not UTF-8 text"
    else:
        what = f"is not valid JSON: {words}"
    return DecodeError(
        reason=Reason.MALFORMED,
        description=f"message ({len(value)} bytes) {what}",
        payment_id=None,
    )


_PAYMENT_TYPES = {t.value: t for t in PaymentType}

_FIELDS = ("payment_id", "account_id", "payment_type", "credit_card", "amount")
_QUOTED_FIELDS = tuple(f'"{name}"'.encode() for name in _FIELDS)


def _repeated_fields(value: bytes) -> list[str]:
    """The payment's fields that the message's object gives more than once. The parser keeps the
    last, while the gateway, which receives the message as it arrived, may read the first: it
    could approve one amount and paystream store another. (About 1.5 us a message.)

    A glance at the bytes clears nearly every message (no field name twice, no escape that could
    spell one); only the others are read again, keeping every pair of the outer object."""
    if b"\\u" not in value and not any(value.count(name) > 1 for name in _QUOTED_FIELDS):
        return []
    objects: list[list[str]] = []

    def keys_of(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append([key for key, _ in pairs])
        return dict(pairs)

    try:
        json.loads(value, object_pairs_hook=keys_of)  # valid: orjson has read it already
    except RecursionError:  # orjson nests to 1 024, Python's reader not quite so deep
        return ["a field (the message nests too deeply to tell which)"]
    outer = objects[-1]  # the hook sees inner objects first
    return [name for name in _FIELDS if outer.count(name) > 1]


def _has_control(field: str, value: str) -> str | None:
    """Why a text field holding a control character is refused, or None if it holds none."""
    at = control_at(value)
    if at is None:
        return None
    char = codepoint(value[at])
    if value[at] == "\x00":
        return f"{field} holds {char} (NUL) at position {at}, which the database cannot store"
    return f"{field} holds the control character {char} at position {at}"


class _Typed(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A payment as well-formed records carry it, typed and bounded as `decode` demands, checked
    in C while the bytes are read. An unknown field, a wrong type or a value out of bounds fails
    it, and `_precisely` then says what is wrong."""

    payment_id: Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
    account_id: Annotated[int, msgspec.Meta(ge=1, le=MAX_ACCOUNT_ID)]
    payment_type: PaymentType
    amount: Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]
    credit_card: Annotated[str, msgspec.Meta(max_length=MAX_CARD_CHARS)] | None = None
    delay: int | None = None
    """The original producer's; paystream does not read it."""


_TYPED = msgspec.json.Decoder(_Typed)


def decode(value: bytes | None, topic_type: PaymentType) -> Payment | DecodeError:
    """Decode one record's value. `topic_type` is what the record's topic says it must be.

    Descriptions name fields and types but never echo `credit_card`.

    A record of the usual shape is typed straight from its bytes (1.0 µs where `_precisely`
    takes 2.0); any other is read by `_precisely`, which gives the same answer for every value
    (tests/test_codec.py) and says what is wrong.
    """
    if value:
        try:
            typed = _TYPED.decode(value)
        except msgspec.MsgspecError:
            pass
        else:
            card = typed.credit_card
            if (
                typed.payment_type is topic_type
                and typed.payment_id.strip()
                and control_at(typed.payment_id) is None
                and (card is None or control_at(card) is None)
                and (topic_type is PaymentType.OFFLINE or not _repeated_fields(value))
            ):
                return Payment(
                    typed.payment_id, typed.account_id, typed.payment_type, card, typed.amount
                )
    return _precisely(value, topic_type)


def _precisely(value: bytes | None, topic_type: PaymentType) -> Payment | DecodeError:
    """`decode` field by field, naming the first thing wrong."""
    if not value:
        return DecodeError(reason=Reason.MALFORMED, description="empty message", payment_id=None)
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return _unreadable(value, exc)
    if not isinstance(document, dict):
        return DecodeError(
            reason=Reason.MALFORMED,
            description=f"message is a JSON {type(document).__name__}, not an object",
            payment_id=None,
        )

    def invalid(description: str, reason: Reason = Reason.INVALID) -> DecodeError:
        amount = document.get("amount")
        return DecodeError(
            reason=reason,
            description=description,
            payment_id=_readable_id(document),
            amount=amount if _is_int(amount) and 0 < amount <= MAX_AMOUNT else None,
        )

    # Only the online topic's payments have a second reader (the gateway); an offline one is read
    # by paystream alone, the last of a repeated field's values, and pays nothing for the check.
    if topic_type is PaymentType.ONLINE and (twice := _repeated_fields(value)):
        return invalid(f"{', '.join(twice)} given more than once: the payment is ambiguous")

    raw_id = document.get("payment_id")
    if not isinstance(raw_id, str) or not raw_id.strip():
        return invalid("payment_id is missing or not a non-empty string")
    if len(raw_id) > MAX_ID_CHARS:
        return invalid(_too_long("payment_id", raw_id, MAX_ID_CHARS))
    # An id is printable text: a control character in one is a producer's fault, and U+0000
    # cannot be stored at all. Refused here, before the database is ever asked.
    if refused := _has_control("payment_id", raw_id):
        return invalid(refused)

    account_id = document.get("account_id")
    if not _is_int(account_id):
        return invalid(f"account_id must be an integer, got {_json_type(account_id)}")
    if not 1 <= account_id <= MAX_ACCOUNT_ID:
        return invalid(f"account_id {account_id} is out of range")

    raw_type = document.get("payment_type")
    payment_type = _PAYMENT_TYPES.get(raw_type) if isinstance(raw_type, str) else None
    if payment_type is None:
        shown = repr(raw_type)[:40] if isinstance(raw_type, str) else _json_type(raw_type)
        return invalid(f"payment_type must be 'online' or 'offline', got {shown}")
    if payment_type is not topic_type:
        return invalid(
            f"payment_type '{payment_type}' arrived on the {topic_type} topic", Reason.WRONG_TOPIC
        )

    card = document.get("credit_card")
    if card is not None and not isinstance(card, str):
        return invalid(f"credit_card must be a string, got {_json_type(card)}")
    if card is not None and len(card) > MAX_CARD_CHARS:
        return invalid(_too_long("credit_card", card, MAX_CARD_CHARS))
    if card is not None and (refused := _has_control("credit_card", card)):
        return invalid(refused)  # a position and a code point: nothing of the number

    amount = document.get("amount")
    if not _is_int(amount):
        return invalid(f"amount must be an integer, got {_json_type(amount)}")
    if amount <= 0:
        return invalid(f"amount must be positive, got {amount}")
    if amount > MAX_AMOUNT:
        return invalid(f"amount {amount} exceeds the limit of {MAX_AMOUNT}")

    return Payment(
        payment_id=raw_id,
        account_id=account_id,
        payment_type=payment_type,
        credit_card=card,
        amount=amount,
    )


def _json_type(value: Any) -> str:
    match value:
        case None:
            return "null (or missing)"
        case bool():
            return "a boolean"
        case int():
            return "an integer"
        case float():
            return _number_kind(value)
        case str():
            return "a string"
        case list():
            return "an array"
        case _:
            return "an object"


_INT64 = 2**63


def _number_kind(value: float) -> str:
    """What a number the parser read as a float was: it reads integers beyond 64 bits so."""
    if not math.isfinite(value):
        return "a number beyond any numeric range"
    if not value.is_integer():
        return "a fractional number"
    if abs(value) >= _INT64:
        return "a number beyond the 64-bit integer range"
    return "a number written with a decimal point or an exponent"
