"""One payment's trail: every record that carried its payment_id and what became of each.

Kafka tooling shows records; this shows outcomes: stored (from which record, when), kept (why,
reported to the log service or still waiting, each replay and what it decided). Card numbers are
never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from rich.console import Group
from rich.table import Table
from rich.text import Text

from paystream import store


@dataclass(frozen=True, slots=True, kw_only=True)
class Trail:
    payment_id: str
    stored: store.StoredPayment | None
    kept: list[store.KeptRow]
    replays: dict[int, list[store.Replayed]] = field(default_factory=dict)

    @property
    def records(self) -> int:
        """How many records are known to have carried the payment_id (a kept record that a
        replay stored is the stored payment's origin: one record)."""
        places: set[tuple[str | None, int | None, int | None]] = {
            (k.topic, k.partition, k.offset) for k in self.kept
        }
        if self.stored is not None:
            places.add((self.stored.topic, self.stored.partition, self.stored.offset))
        return len(places)

    def as_json(self) -> dict[str, object]:
        stored = self.stored
        return {
            "payment_id": self.payment_id,
            "stored": None
            if stored is None
            else {
                "account_id": stored.account_id,
                "payment_type": stored.payment_type,
                "amount": int(stored.amount),
                "created_on": stored.created_on.isoformat(),
                "record": _place(stored.topic, stored.partition, stored.offset),
                "record_time": _kafka_time(stored.kafka_ts),
                "stored_at": _iso(stored.stored_at),
            },
            "kept": [
                {
                    **k.as_json(),
                    "record_time": _kafka_time(k.kafka_ts),
                    "reported_at": _iso(k.reported_at),
                    "report_attempts": k.report_attempts,
                    "last_report_error": k.last_report_error,
                    "resolved_at": _iso(k.resolved_at),
                    "replay_history": [
                        {
                            "at": r.replayed_at.isoformat(),
                            "outcome": r.outcome,
                            "reason": r.reason,
                            "description": r.description,
                            "reached_gateway_or_database": r.attempted,
                        }
                        for r in self.replays.get(k.id, [])
                    ],
                }
                for k in self.kept
            ],
        }


async def trail(conn: store.Conn, payment_id: str) -> Trail:
    """Every record that carried the payment_id, however many (read a page at a time)."""
    where = store.KeptFilter(payment_id=payment_id)
    kept: list[store.KeptRow] = []
    while page := await store.list_kept(conn, where, after_id=kept[-1].id if kept else 0):
        kept += page
    replays: dict[int, list[store.Replayed]] = {}
    for replayed in await store.replays_of(conn, [k.id for k in kept]):
        replays.setdefault(replayed.kept_id, []).append(replayed)
    return Trail(
        payment_id=payment_id,
        stored=await store.stored_payment(conn, payment_id),
        kept=kept,
        replays=replays,
    )


def _place(topic: str | None, partition: int | None, offset: int | None) -> str | None:
    return None if topic is None else f"{topic}/{partition}@{offset}"


def _kafka_time(ts: int | None) -> str | None:
    if ts is None or ts <= 0:
        return None
    return datetime.fromtimestamp(ts / 1000, UTC).isoformat()


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _when(moment: datetime | None) -> str:
    return "—" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(trail: Trail) -> Group:
    """The trail as a heading and a table, one row a record."""
    stored = trail.stored
    if stored is not None:
        heading = Text.assemble(
            ("stored", "bold green"),
            f" for account {stored.account_id}: {stored.payment_type}, amount "
            f"{int(stored.amount):,}, created_on {_when(stored.created_on)}",
        )
    elif trail.kept:
        heading = Text.assemble(("not stored", "bold yellow"), f": kept {len(trail.kept)} times")
    else:
        heading = Text(f"no record carried payment_id {trail.payment_id!r}", style="bold red")
    # Text, not markup, wherever a value from a record or a peer is shown.
    table = Table(title=Text(f"payment {trail.payment_id}"), title_justify="left")
    for column in ("record", "record time", "outcome", "reported", "replays"):
        table.add_column(column)
    if stored is not None:
        table.add_row(
            _place(stored.topic, stored.partition, stored.offset) or "unknown",
            _kafka_time(stored.kafka_ts) or "—",
            Text(f"stored at {_when(stored.stored_at)}", style="green"),
            "—",
            "—",
        )
    for kept in trail.kept:
        if kept.reported_at is not None:
            reported = f"delivered {_when(kept.reported_at)} ({kept.report_attempts} attempts)"
        elif kept.undeliverable_at is not None:
            reported = (
                f"undeliverable since {_when(kept.undeliverable_at)}: {kept.last_report_error}"
            )
        else:
            reported = f"waiting ({kept.report_attempts} attempts"
            reported += f"; last: {kept.last_report_error})" if kept.last_report_error else ")"
        history = [
            f"{_when(r.replayed_at)}: {r.outcome}" + (f" ({r.reason})" if r.reason else "")
            for r in trail.replays.get(kept.id, [])
        ]
        outcome = f"kept #{kept.id}: {kept.reason} ({kept.error_type}): {kept.description}"
        if kept.resolved_at is not None:
            outcome += f"; resolved {_when(kept.resolved_at)}"
        table.add_row(
            _place(kept.topic, kept.partition, kept.offset) or "",
            _kafka_time(kept.kafka_ts) or "—",
            Text(outcome),
            Text(reported),
            Text("\n".join(history) or "none"),
        )
    return Group(heading, table)
