"""Aggregates chaos rounds into the table `make chaos` prints and chaos-report.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROUNDS: list[dict[str, Any]] = []
"""Every chaos round of this pytest session, written out when the session ends (conftest)."""


def summarize(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for r in rounds:
        row = table.setdefault(
            r["scenario"],
            {
                "scenario": r["scenario"],
                "rounds": 0,
                "records": 0,
                "lost": 0,
                "doubled": 0,
                "duplicate_reports": 0,
                "recover_s": 0.0,
                "noticed_s": None,
            },
        )
        row["rounds"] += 1
        row["records"] += r["records"]
        row["lost"] += r["lost"]
        row["doubled"] += r["doubled"]
        row["duplicate_reports"] += r["duplicate_reports"]
        row["recover_s"] = max(row["recover_s"], r["recover_s"])
        if r.get("noticed_s") is not None:
            row["noticed_s"] = max(row["noticed_s"] or 0.0, r["noticed_s"])
    return list(table.values())


def write(rounds: list[dict[str, Any]], path: Path = Path("chaos-report.json")) -> None:
    path.write_text(json.dumps(summarize(rounds), indent=2) + "\n")
    path.with_name("chaos-rounds.json").write_text(json.dumps(rounds, indent=2) + "\n")


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'scenario':<26}{'rounds':>7}{'records':>9}{'lost':>6}{'doubled':>9}"
        f"{'dup reports':>13}{'noticed s':>11}{'recover s':>11}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        noticed = "-" if row.get("noticed_s") is None else f"{row['noticed_s']:.1f}"
        lines.append(
            f"{row['scenario']:<26}{row['rounds']:>7}{row['records']:>9}{row['lost']:>6}"
            f"{row['doubled']:>9}{row['duplicate_reports']:>13}{noticed:>11}"
            f"{row['recover_s']:>11.1f}"
        )
    return "\n".join(lines)


def main() -> int:
    """Print the table; exit 1 if anything was lost or doubled (or no report exists)."""
    path = Path("chaos-report.json")
    if not path.exists():
        print("no chaos-report.json: the chaos suite did not run")
        return 1
    rows = json.loads(path.read_text())
    print(table(rows))
    return 1 if any(r["lost"] or r["doubled"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
