"""The simulator's streams and their expected outcomes (pure, no I/O)."""

from __future__ import annotations

from collections import Counter

from paystream_tooling.simulator.streams import Expect, Profile, is_declined, plan


def test_original_profile_has_the_original_shape() -> None:
    """1038 records, 515 payments each sent at least twice, ~69% online, offline cards empty."""
    records = plan(Profile.ORIGINAL, records=1038, seed=1, decline_rate=0.1)
    assert len(records) == 1038
    per_payment = Counter(r.payment_id for r in records)
    assert len(per_payment) == 515
    assert min(per_payment.values()) >= 2
    online = [r for r in records if r.topic_type == "online"]
    assert 0.62 < len(online) / len(records) < 0.76
    import orjson

    for record in records:
        document = orjson.loads(record.value)
        assert {
            "payment_id",
            "account_id",
            "payment_type",
            "credit_card",
            "amount",
            "delay",
        } == set(document)
        assert isinstance(document["amount"], int)
        assert 1 <= document["account_id"] <= 2000
        if record.topic_type == "offline":
            assert document["credit_card"] == ""


def test_streams_are_deterministic_per_seed() -> None:
    """The same seed gives the same bytes; another seed does not."""
    one = [r.value for r in plan(Profile.HOSTILE, records=300, seed=3, decline_rate=0.1)]
    two = [r.value for r in plan(Profile.HOSTILE, records=300, seed=3, decline_rate=0.1)]
    three = [r.value for r in plan(Profile.HOSTILE, records=300, seed=4, decline_rate=0.1)]
    assert one == two
    assert one != three


def test_declines_are_about_ten_percent_and_expected_as_network() -> None:
    """Online payments the gateway will decline are expected to be kept as `network`."""
    records = plan(Profile.ORIGINAL, records=2000, seed=2, decline_rate=0.1)
    online = {r.payment_id for r in records if r.topic_type == "online"}
    declined = {pid for pid in online if pid and is_declined(pid, 0.1)}
    assert 0.05 < len(declined) / len(online) < 0.15
    for record in records:
        if record.payment_id in declined:
            assert record.expect == Expect.NETWORK


def test_hostile_profile_covers_every_kind() -> None:
    """The hostile stream carries each kind of bad input with its expected error type."""
    records = plan(Profile.HOSTILE, records=2000, seed=5, decline_rate=0.1)
    kinds = {r.kind: r.expect for r in records}
    for kind in (
        "malformed-json",
        "not-utf8",
        "empty",
        "missing-field",
        "mistyped-field",
        "non-positive-amount",
        "fractional-amount",
        "wrong-topic",
        "unknown-payment-type",
        "not-an-object",
        "overflowing-account",
        "wide-id",
    ):
        assert kinds[kind] == Expect.OTHER, kind
    assert "unknown-account" in kinds
    assert "conflicting-content" in kinds
    assert "injection-looking" in kinds
    unknown = [r for r in records if r.kind == "unknown-account"]
    assert {Expect.DATABASE} <= {r.expect for r in unknown}
