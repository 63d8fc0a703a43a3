"""The JSON documents the statements unpack: every key a statement declares for a document is
one its row type (store.documents) has, and the other way round, and what each encoder writes
is exactly that. No database needed: the statements are read from the package's .sql files."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import get_type_hints

import orjson
import pytest

from paystream.model import Kept, Payment, PaymentType, Reason, Record, RecordId
from paystream.store import documents
from paystream.store.queries import _all as runtime_queries
from paystream.store.queries import json

_RECORDSET = re.compile(r"json_to_recordset\(%\((\w+)\)s::json\)\s+AS\s+\w+\(([^)]*)\)", re.S)

RECORD = RecordId(topic="online", partition=2, offset=7, timestamp_ms=1_700_000_000_000)
PAYMENT = Payment(
    payment_id="p-1", account_id=3, payment_type=PaymentType.ONLINE, credit_card="4", amount=5
)
KEPT = Kept(
    record=Record(id=RECORD, value=b"{}"),
    payment_id="p-1",
    reason=Reason.DECLINED,
    description="declined",
    amount=5,
)

ENCODED: dict[tuple[str, str], Callable[[], str]] = {
    ("hold_partitions", "partitions"): lambda: documents.partitions([("online", 1)]),
    ("take_partitions", "partitions"): lambda: documents.partitions([("online", 1)]),
    ("processed_records", "stored"): lambda: documents.stored_checks([(RECORD, "p-1")]),
    ("processed_records", "kept"): lambda: documents.offset_ranges({("online", 1): (3, 9)}),
    ("insert_payments", "rows"): lambda: documents.payments([PAYMENT], [RECORD]),
    ("leave_stamps_due", "rows"): lambda: documents.stamps({3: datetime(2026, 1, 1)}),
    ("stamp_accounts", "rows"): lambda: documents.stamps({3: datetime(2026, 1, 1)}),
    ("insert_kept", "rows"): lambda: json([documents.kept(KEPT, b"{}", None, None)]),
    ("resolve_kept", "ids"): lambda: documents.records([RECORD]),
    ("record_done", "spans"): lambda: documents.spans({("online", 1): (3, 9)}),
    ("lock_positions", "partitions"): lambda: documents.partitions([("online", 1)]),
    ("ranges_beyond", "positions"): lambda: documents.positions({("online", 1): 3}),
    ("move_positions", "positions"): lambda: documents.positions({("online", 1): 3}),
    ("start_positions", "positions"): lambda: documents.positions({("online", 1): 3}),
    ("position_logs", "partitions"): lambda: documents.partitions([("online", 1)]),
    ("mark_logs", "logs"): lambda: documents.logs({("online", 1): ("AAAAAAAAAAAAAAAAAAAAAA", 9)}),
}
"""One call of each statement's encoder, as the store makes it."""


def declared() -> dict[tuple[str, str], list[str]]:
    """Each (statement, parameter) of the runtime unpacked with json_to_recordset: the columns it
    declares. (The tooling's one, the bench's bare insert ceiling, encodes its rows itself.)"""
    found: dict[tuple[str, str], list[str]] = {}
    for name, text in runtime_queries().items():
        for parameter, columns in _RECORDSET.findall(text):
            found[(name, parameter)] = [
                column.split()[0].strip('"') for column in columns.split(",") if column.strip()
            ]
    return found


def test_every_document_a_statement_unpacks_has_a_row_type_and_an_encoder() -> None:
    statements = declared()
    assert len(statements) >= 13  # the parsing found the statements (none lost to the regex)
    assert set(statements) == set(documents.ROWS)
    assert set(statements) == set(ENCODED)


@pytest.mark.parametrize("statement", sorted(documents.ROWS))
def test_a_statement_declares_exactly_its_row_types_keys(statement: tuple[str, str]) -> None:
    keys = set(get_type_hints(documents.ROWS[statement]))  # a TypedDict's keys, inherited too
    columns = declared()[statement]
    assert len(columns) == len(set(columns)), "a column declared twice"
    assert set(columns) == keys


@pytest.mark.parametrize("statement", sorted(ENCODED))
def test_an_encoder_writes_exactly_the_columns_its_statement_declares(
    statement: tuple[str, str],
) -> None:
    rows = orjson.loads(ENCODED[statement]())
    assert rows  # the sample made a row to look at
    for row in rows:
        assert set(declared()[statement]) == set(row)
