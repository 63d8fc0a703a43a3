"""The outbox of error reports (reports.sql): the kept rows not yet delivered to the log API."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psycopg.rows import scalar_row

from paystream.model import ErrorType
from paystream.store.queries import Conn, fetch_all, fetch_one, query, typed_row


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    id: int
    payment_id: str | None
    error_type: ErrorType
    description: str
    traceparent: str | None = None


async def claim_reports(conn: Conn, limit: int, lease_s: float) -> list[Report]:
    """Lease the oldest due reports for `lease_s` (no other relay takes them meanwhile); rows
    another relay is claiming are skipped, not waited for. Oldest first."""
    return sorted(
        await fetch_all(
            conn, typed_row(Report), "claim_reports", {"limit": limit, "lease_s": lease_s}
        ),
        key=lambda r: r.id,
    )


async def mark_reported(conn: Conn, ids: Sequence[int]) -> None:
    if ids:
        await conn.execute(query("mark_reported"), {"ids": list(ids)})


async def mark_report_failed(conn: Conn, ids: Sequence[int], error: str) -> None:
    """Each row is due again after its back-off (1 s, 2 s, 4 s … capped at 30 s)."""
    if ids:
        await conn.execute(query("mark_report_failed"), {"ids": list(ids), "error": error})


async def mark_report_refused(
    conn: Conn, ids: Sequence[int], error: str, max_refusals: int
) -> list[int]:
    """The log service refused these reports for what they say: each is due again after its own
    back-off, until its `max_refusals`-th refusal marks it undeliverable (no longer claimed,
    still kept and listed). Returns the ids marked undeliverable now."""
    if not ids:
        return []
    return await fetch_all(
        conn,
        scalar_row,
        "mark_report_refused",
        {"ids": list(ids), "error": error, "max_refusals": max_refusals},
    )


async def undeliverable_reports(conn: Conn) -> int:
    """Kept records whose report the log service refused for good."""
    return int(await fetch_one(conn, scalar_row, "undeliverable_reports") or 0)


async def outbox_depth(conn: Conn) -> int:
    return int(await fetch_one(conn, scalar_row, "outbox_depth") or 0)


async def oldest_unreported_age_s(conn: Conn) -> float:
    """Seconds since the oldest record still unreported was kept; 0 if none is."""
    return float(await fetch_one(conn, scalar_row, "oldest_unreported_age_s") or 0.0)
