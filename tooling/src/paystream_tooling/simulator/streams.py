"""The streams the simulator produces, and the outcome each record must have (the README's
"What happens to each payment").

Pure and deterministic for a seed: the same options always give the same records.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from paystream.codec import kept_id
from paystream.text import visible

ORIGINAL_RECORDS = 1038
ORIGINAL_PAYMENTS = 515
ONLINE_SHARE = 0.69
ACCOUNTS = 2000


class Expect(StrEnum):
    """What must become of a record. STORE: its payment is stored once; if several records carry
    the same payment_id, exactly one of them is stored and the others are kept as `other`."""

    STORE = "store"
    NETWORK = "network"
    DATABASE = "database"
    OTHER = "other"


class Profile(StrEnum):
    ORIGINAL = "original"
    HOSTILE = "hostile"


@dataclass(frozen=True, slots=True, kw_only=True)
class Planned:
    topic_type: str  # "online" or "offline": the topic it is sent to
    value: bytes
    payment_id: str | None
    expect: Expect
    kind: str  # what the record is, e.g. "valid", "duplicate", "malformed-json"


def is_declined(payment_id: str, decline_rate: float) -> bool:
    """The gateway's deterministic verdict: the same payment is always declined or always not."""
    digest = hashlib.sha256(payment_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < decline_rate


def _payment(rng: random.Random, *, online: bool, account_id: int | None = None) -> dict[str, Any]:
    return {
        "payment_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "account_id": account_id if account_id is not None else rng.randint(1, ACCOUNTS),
        "payment_type": "online" if online else "offline",
        "credit_card": "".join(rng.choice("0123456789") for _ in range(19)) if online else "",
        "amount": rng.randint(1, 500),
        "delay": rng.randint(50, 500),
    }


def _encode(document: Any) -> bytes:
    return orjson.dumps(document)


def _valid_expectation(document: dict[str, Any], decline_rate: float) -> Expect:
    if document["payment_type"] == "online" and is_declined(document["payment_id"], decline_rate):
        return Expect.NETWORK
    if not 1 <= document["account_id"] <= ACCOUNTS:
        return Expect.DATABASE
    return Expect.STORE


def original(
    rng: random.Random, records: int = ORIGINAL_RECORDS, decline_rate: float = 0.1
) -> list[Planned]:
    """Like the original stream: about half the records are exact duplicates of an earlier one."""
    payments = max(1, round(records * ORIGINAL_PAYMENTS / ORIGINAL_RECORDS))
    documents = [_payment(rng, online=rng.random() < ONLINE_SHARE) for _ in range(payments)]
    sends = [d for d in documents for _ in range(2)]
    sends += rng.choices(documents, k=max(0, records - len(sends)))
    sends = sends[:records]
    rng.shuffle(sends)
    seen: set[str] = set()
    planned = []
    for document in sends:
        pid = document["payment_id"]
        planned.append(
            Planned(
                topic_type=document["payment_type"],
                value=_encode(document),
                payment_id=pid,
                expect=_valid_expectation(document, decline_rate),
                kind="duplicate" if pid in seen else "valid",
            )
        )
        seen.add(pid)
    return planned


def _hostile_one(rng: random.Random, decline_rate: float) -> Planned:
    """One record of what production sends and the original never did."""
    online = rng.random() < ONLINE_SHARE
    topic = "online" if online else "offline"
    doc = _payment(rng, online=online)
    pid = doc["payment_id"]

    def bad(kind: str, value: bytes, payment_id: str | None = pid, on: str = topic) -> Planned:
        return Planned(
            topic_type=on, value=value, payment_id=payment_id, expect=Expect.OTHER, kind=kind
        )

    match rng.randrange(20):
        case 0:
            return bad("malformed-json", _encode(doc)[:-7], None)
        case 1:
            return bad("not-utf8", b'{"payment_id": "\xff\xfe\xfd", "amount": 1}', None)
        case 2:
            return bad("empty", b"", None)
        case 3:
            del doc["amount"]
            return bad("missing-field", _encode(doc))
        case 4:
            doc["account_id"] = str(doc["account_id"])
            return bad("mistyped-field", _encode(doc))
        case 5:
            doc["account_id"] = rng.randint(ACCOUNTS + 1, 10 * ACCOUNTS)
            return Planned(
                topic_type=topic,
                value=_encode(doc),
                payment_id=pid,
                expect=_valid_expectation(doc, decline_rate),
                kind="unknown-account",
            )
        case 6:
            doc["amount"] = -rng.randint(0, 100)
            return bad("non-positive-amount", _encode(doc))
        case 7:
            doc["amount"] = rng.randint(1, 100) + 0.5
            return bad("fractional-amount", _encode(doc))
        case 8:
            return bad("wrong-topic", _encode(doc), on="offline" if online else "online")
        case 9:
            doc["payment_type"] = "crypto"
            return bad("unknown-payment-type", _encode(doc))
        case 10:
            return bad("not-an-object", _encode([doc]), None)
        case 11:
            doc["account_id"] = 2**40
            return bad("overflowing-account", _encode(doc))
        case 12:
            # 1 400 characters of 4 bytes before the id: over its column, and over an index entry's
            # limit if it were kept whole; kept by a prefix and a digest (codec.kept_id).
            doc["payment_id"] = "\U00020000" * 1400 + pid
            return bad("wide-id", _encode(doc), kept_id(doc["payment_id"]))
        case 13:
            doc["payment_id"] = pid[:8] + "\x00" + pid[8:]  # PostgreSQL text cannot hold it
            return bad("nul-in-id", _encode(doc), visible(doc["payment_id"]))
        case 14:
            doc["payment_id"] = "\x1b[2J" + pid  # a terminal's clear-screen
            return bad("control-in-id", _encode(doc), visible(doc["payment_id"]))
        case 15:
            return bad("byte-order-mark", b"\xef\xbb\xbf" + _encode(doc), None)
        case 16:
            lone = _encode(doc).replace(pid.encode(), b"\\ud800" + pid.encode())
            return bad("lone-surrogate", lone, None)
        case 17:
            doc["amount"] = "2**70"  # a placeholder: orjson writes no integer beyond 64 bits
            huge = _encode(doc).replace(b'"2**70"', str(2**70).encode())
            return bad("amount-beyond-64-bits", huge)
        case 18:
            # An amount given twice: the gateway might read one and the processor store the other.
            doc["payment_type"] = "online"
            twice = _encode(doc)[:-1] + b',"amount":' + str(doc["amount"] * 100).encode() + b"}"
            return bad("duplicate-keys", twice, on="online")
        case _:
            doc["payment_id"] = "'; DROP TABLE payments; --" + pid
            doc["credit_card"] = "<script>alert(1)</script>" if online else ""
            return Planned(
                topic_type=topic,
                value=_encode(doc),
                payment_id=doc["payment_id"],
                expect=_valid_expectation(doc, decline_rate),
                kind="injection-looking",
            )


def hostile(
    rng: random.Random, records: int = ORIGINAL_RECORDS, decline_rate: float = 0.1
) -> list[Planned]:
    """The original mix, with a quarter of the records replaced by hostile ones, including
    payments re-sent under the same payment_id with different content."""
    base = original(rng, records - records // 4, decline_rate)
    extra = [_hostile_one(rng, decline_rate) for _ in range(records // 4 - records // 20)]
    # Same payment_id, different content: another valid payment the processor must not store twice.
    for _ in range(records // 20):
        source = orjson.loads(rng.choice(base).value)
        source["amount"] = int(source["amount"]) + rng.randint(1, 50)
        extra.append(
            Planned(
                topic_type=source["payment_type"],
                value=_encode(source),
                payment_id=source["payment_id"],
                expect=_valid_expectation(source, decline_rate),
                kind="conflicting-content",
            )
        )
    planned = base + extra
    rng.shuffle(planned)
    return planned


def plan(profile: Profile, *, records: int, seed: int, decline_rate: float) -> list[Planned]:
    rng = random.Random(seed)
    if profile is Profile.HOSTILE:
        return hostile(rng, records, decline_rate)
    return original(rng, records, decline_rate)
