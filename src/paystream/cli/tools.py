"""`paystream demo` and `paystream bench`: the tools apart from the runtime (paystream.tools)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from paystream.cli.common import app, console, fail, out
from paystream.errors import Interrupted, PaystreamError


@app.command()
def demo(
    profile: Annotated[str, typer.Option(help="original or hostile")] = "original",
    records: int = 1038,
    rate: Annotated[float, typer.Option(help="records/s; the original is about 11.5")] = 11.5,
    seed: int = 0,
    simulator_port: int = 9000,
    kafka_port: Annotated[int, typer.Option(help="0 = any free port")] = 29092,
    postgres_port: Annotated[int, typer.Option(help="0 = any free port")] = 0,
    dashboard_port: Annotated[int, typer.Option(help="0 = any free port")] = 8000,
    home: Path = Path(".paystream/demo"),
    as_json: Annotated[
        bool, typer.Option("--json", help="print the report as one JSON object")
    ] = False,
    timeout_s: float = 600,
) -> None:
    """Bring up Kafka, PostgreSQL and the simulator locally, run the processor on the stream, and
    reconcile every record against the simulator's ledger. Exit 0 only if nothing was lost.

    Example: paystream demo --profile hostile --rate 100
    """
    from paystream.tools.demo import run_demo

    try:
        report = run_demo(
            profile=profile,
            records=records,
            rate=rate,
            seed=seed,
            simulator_port=simulator_port,
            kafka_port=kafka_port,
            postgres_port=postgres_port,
            dashboard_port=dashboard_port,
            home=home,
            timeout_s=timeout_s,
            console=console,
        )
    except Interrupted as exc:
        console.print(f"[yellow]{exc}[/]")
        raise typer.Exit(130) from exc
    except PaystreamError as exc:
        raise fail(exc) from exc
    if as_json:
        sys.stdout.write(json.dumps(report.as_json()) + "\n")
    else:
        from paystream.tools.demo import report_table

        out.print(report_table(report))
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="tiny sizes, to check the command works")] = False,
    home: Path = Path(".paystream/bench"),
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    profile: Annotated[
        Path | None, typer.Option(help="write py-spy collapsed stacks of each drain here")
    ] = None,
) -> None:
    """Measure throughput, latency, CPU and memory on local infrastructure, next to the ceilings
    measured in the same run (consumer read rate, database insert rate, gateway, Little's law).

    Example: paystream bench --json > bench.json
    """
    import shutil

    from paystream.tools import bench as benchmark
    from paystream.tools.report import tables
    from paystream.tools.workloads import Sizes

    if home.exists():
        shutil.rmtree(home)
    sizes = Sizes.quick() if quick else Sizes()
    try:
        result = benchmark.run(
            home, sizes, lambda text: console.print(f"[dim]{text}[/]"), profile_dir=profile
        )
    except PaystreamError as exc:
        raise fail(exc) from exc
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    for shown in tables(result):
        out.print(shown)
