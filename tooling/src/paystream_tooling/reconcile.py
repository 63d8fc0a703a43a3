"""The acceptance oracle (the README's "Guarantees and how they are checked"), checked against
the simulator's ledger.

Given what was sent (and what must become of each record), the final database state, the reports
the log service received and the consumer group's committed offsets, count what was lost or
doubled. Used by `paystream demo`, the end-to-end tests and the fault-injection suite.
"""

from __future__ import annotations

import base64
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import psycopg

from paystream_tooling import queries


@dataclass(slots=True, kw_only=True)
class Reconciliation:
    records: int = 0
    payments: int = 0
    stored: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    reported: int = 0
    lost: int = 0
    doubled: int = 0
    wrong_type: int = 0
    unreported: int = 0
    duplicate_reports: int = 0
    bad_account_dates: int = 0
    uncommitted: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.doubled
            or self.wrong_type
            or self.unreported
            or self.bad_account_dates
            or self.uncommitted
        )

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "problems": self.problems[:50]}


def _fields(value: bytes) -> tuple[int, str, str | None, int]:
    document = orjson.loads(value)
    return (
        document["account_id"],
        document["payment_type"],
        document.get("credit_card"),
        int(document["amount"]),
    )


def reconcile(
    conn: psycopg.Connection[Any],
    ledger: list[dict[str, Any]],
    logs: list[dict[str, Any]],
    uncommitted: int,
) -> Reconciliation:
    """Compare the final state with the ledger. `conn` reads the processor's database."""
    result = Reconciliation(records=len(ledger), uncommitted=uncommitted)
    payments = {
        pid: (account, ptype, card, int(amount))
        for pid, account, ptype, card, amount in conn.execute(queries.query("all_payments"))
    }
    origins = {(t, p, o): pid for pid, t, p, o in conn.execute(queries.query("all_origins"))}
    every_kept = conn.execute(queries.query("all_kept")).fetchall()
    # A kept row that a replay resolved became a stored payment; its report still went out.
    kept_rows = {
        (t, p, o): (etype, pid) for t, p, o, etype, pid, resolved in every_kept if not resolved
    }
    result.kept = dict(Counter(etype for etype, _ in kept_rows.values()))
    result.stored = len(payments)

    _check_stored(result, ledger, payments)
    _check_records(result, ledger, payments, origins, kept_rows)
    _check_reports(result, every_kept, logs)

    # 3. account dates equal the newest stored payment
    row = conn.execute(queries.query("bad_account_dates")).fetchone()
    result.bad_account_dates = int(row[0]) if row else 0
    if result.bad_account_dates:
        result.problems.append(
            f"{result.bad_account_dates} accounts have a wrong last_payment_date"
        )
    if uncommitted:
        result.problems.append(f"committed offsets are {uncommitted} records short of the end")
    return result


def _check_stored(
    result: Reconciliation,
    ledger: list[dict[str, Any]],
    payments: dict[str, tuple[int, str, str | None, int]],
) -> None:
    """1 and 2: every valid payment stored exactly once, with the fields of one of its records;
    nothing else stored."""
    valid: dict[str, list[tuple[int, str, str | None, int]]] = {}
    for entry in ledger:
        if entry["expect"] == "store":
            valid.setdefault(entry["payment_id"], []).append(
                _fields(base64.b64decode(entry["value_b64"]))
            )
    result.payments = len({e["payment_id"] for e in ledger if e["payment_id"]})
    for pid, versions in valid.items():
        if pid not in payments:
            result.lost += 1
            result.problems.append(f"valid payment {pid} is not stored")
        elif payments[pid] not in versions:
            result.wrong_type += 1
            result.problems.append(f"payment {pid} is stored with fields it never arrived with")
    for pid in payments.keys() - valid.keys():
        result.doubled += 1
        result.problems.append(f"payment {pid} is stored but should not be")


def _check_records(
    result: Reconciliation,
    ledger: list[dict[str, Any]],
    payments: dict[str, tuple[int, str, str | None, int]],
    origins: dict[tuple[str, int, int], str],
    kept_rows: dict[tuple[str, int, int], tuple[str, str | None]],
) -> None:
    """4: every record that was not stored is kept, with the right type."""
    for entry in ledger:
        key = (entry["topic"], entry["partition"], entry["offset"])
        if entry["offset"] is None:
            result.lost += 1
            result.problems.append(f"record {entry['kind']} was never delivered to Kafka")
            continue
        stored_here = origins.get(key) == entry["payment_id"] and entry["payment_id"] in payments
        kept = kept_rows.get(key)
        if stored_here and kept is not None:
            result.doubled += 1
            result.problems.append(f"record {key} is both stored and kept")
        elif stored_here:
            if entry["expect"] != "store":
                result.doubled += 1
                result.problems.append(f"record {key} ({entry['kind']}) was stored")
        elif kept is None:
            result.lost += 1
            result.problems.append(f"record {key} ({entry['kind']}) is neither stored nor kept")
        else:
            expected = "other" if entry["expect"] == "store" else entry["expect"]
            if kept[0] != expected:
                result.wrong_type += 1
                result.problems.append(
                    f"record {key} ({entry['kind']}) kept as {kept[0]}, expected {expected}"
                )


def _check_reports(
    result: Reconciliation, every_kept: list[tuple[Any, ...]], logs: list[dict[str, Any]]
) -> None:
    """4: each kept record reported at least once; duplicate reports counted apart."""
    want = Counter((pid, etype) for _, _, _, etype, pid, _ in every_kept)
    got = Counter((log.get("payment_id"), log.get("error_type")) for log in logs)
    result.reported = sum(min(got[k], n) for k, n in want.items())
    result.unreported = sum(max(0, n - got[k]) for k, n in want.items())
    result.duplicate_reports = sum(max(0, n - want[k]) for k, n in got.items())
    if result.unreported:
        result.problems.append(f"{result.unreported} kept records were never reported")
