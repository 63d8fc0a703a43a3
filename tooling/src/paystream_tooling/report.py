"""A workload's row in the report: its rate next to the lowest of its ceilings, what bounds it,
and the tables `paystream bench` prints."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from rich.table import Table

from paystream_tooling.meter import Drained


@dataclass(slots=True, kw_only=True)
class Workload:
    name: str
    payments: int
    payments_per_s: float
    ceiling_per_s: float
    ceiling_ratio: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_s_per_1000: float
    peak_rss_mb: float
    bound_by: str
    machine_busy: float
    """Share of all the machine's cores busy during the run (every process, not just ours)."""
    seconds: float
    instances: int = 1
    run_ratios: list[float] | None = None
    """When the workload was drained several times: each drain's ceiling ratio, ascending. The
    row is the median drain."""
    ratios: dict[str, float] | None = None
    """The rate's ratio to each of several ceilings (the offline drains': the database's)."""
    others_cpu_s_per_1000: dict[str, float] | None = None
    """CPU seconds per 1 000 payments of the other servers during the run (PostgreSQL, the
    broker), next to the processor's `cpu_s_per_1000`."""
    longest_gap_ms: float | None = None
    """Under a steady load: the longest stretch with no payment stored."""
    bytes_per_payment: dict[str, int] | None = None
    """After the drain: bytes on disk per stored payment of the retailer's payments table and of
    each of paystream's own tables (indexes and TOAST included), and of paystream's in all."""


def _bound(
    rate: float, ceiling_name: str, ceiling: float, utilisation: float, machine_busy: float
) -> str:
    if utilisation > 0.85:
        return f"processor CPU ({utilisation:.0%} of a core per instance)"
    if rate / ceiling >= 0.7:
        return f"{ceiling_name} ceiling"
    if machine_busy > 0.8:
        # Broker, database, gateway and processor compete for the same cores.
        return f"the shared cores ({machine_busy:.0%} busy; processor {utilisation:.0%} of one)"
    # Well below every ceiling and not CPU-bound: the time each batch takes end to end.
    return f"batch latency, under the {ceiling_name} ceiling (CPU {utilisation:.0%} of a core)"


def workload(
    name: str,
    records: int,
    run: Drained,
    ceilings: dict[str, float],
    instances: int = 1,
    bound_by: str | None = None,
    against: dict[str, float] | None = None,
) -> Workload:
    """The row of a run that drained `records`, against the lowest of `ceilings` (and its ratio
    to each of `against`)."""
    rate = records / run.seconds
    bound_name, ceiling = min(ceilings.items(), key=lambda item: item[1])
    utilisation = run.cpu_s / run.seconds / instances
    return Workload(
        name=name,
        payments=records,
        payments_per_s=round(rate, 1),
        ceiling_per_s=round(ceiling, 1),
        ceiling_ratio=round(rate / ceiling, 3),
        p50_ms=round(run.p50_ms, 1),
        p99_ms=round(run.p99_ms, 1),
        max_ms=round(run.max_ms, 1),
        cpu_s_per_1000=round(run.cpu_s / records * 1000, 3),
        peak_rss_mb=round(run.peak_rss_mb, 1),
        bound_by=bound_by or _bound(rate, bound_name, ceiling, utilisation, run.machine_busy),
        machine_busy=round(run.machine_busy, 2),
        seconds=round(run.seconds, 2),
        instances=instances,
        ratios=None
        if against is None
        else {name: round(rate / value, 3) for name, value in against.items() if value},
        others_cpu_s_per_1000={
            name: round(cpu_s / records * 1000, 3) for name, cpu_s in run.others_cpu_s.items()
        },
    )


def tables(result: dict[str, Any]) -> list[Table | str]:
    """The report as `paystream bench` prints it: the workloads, how the median drains ranged,
    and the ceilings."""
    shown: list[Table | str] = []
    table = Table(title="paystream bench")
    columns = [
        f.name
        for f in fields(Workload)
        if f.name
        not in (
            "seconds",
            "run_ratios",
            "ratios",
            "others_cpu_s_per_1000",
            "longest_gap_ms",
            "bytes_per_payment",
        )
    ]
    for column in columns:
        table.add_column(column, justify="left" if column in ("name", "bound_by") else "right")
    for row in result["workloads"]:
        table.add_row(*(str(row[c]) for c in columns))
    shown.append(table)
    for row in result["workloads"]:
        if against := row.get("ratios"):
            shown.append(
                f"{row['name']}: "
                + ", ".join(f"{ratio:.2f} of the {name}" for name, ratio in against.items())
            )
        if row["name"].startswith("online-"):  # one gateway call a payment
            shown.append(
                f"{row['name']}: the processor's CPU per gateway call, with the rest of its"
                f" payment's path: {row['cpu_s_per_1000'] * 1000:.0f} µs"
            )
        if others := row.get("others_cpu_s_per_1000"):
            shown.append(
                f"{row['name']}: CPU s per 1 000 payments: processor {row['cpu_s_per_1000']}, "
                + ", ".join(f"{name} {cpu}" for name, cpu in others.items())
            )
        if (gap := row.get("longest_gap_ms")) is not None:
            shown.append(
                f"{row['name']}: the longest stretch with no payment stored: {gap:,.0f} ms,"
                f" the worst produce → stored latency {row['max_ms']:,.0f} ms"
            )
        if sizes := row.get("bytes_per_payment"):
            shown.append(
                f"{row['name']}: bytes on disk per stored payment: "
                + ", ".join(f"{name} {size:,}" for name, size in sizes.items())
            )
        if ratios := row["run_ratios"]:
            shown.append(
                f"{row['name']}: the median of {len(ratios)} drains, whose ratios were "
                + ", ".join(f"{r:.3f}" for r in ratios)
            )
    ceilings = Table(title="ceilings measured in the same run")
    ceilings.add_column("ceiling")
    ceilings.add_column("per second", justify="right")
    for name, value in result["ceilings"].items():
        ceilings.add_row(name, f"{value:,.0f}")
    shown.append(ceilings)
    return shown
