"""The tooling's commands on the `paystream` CLI: `simulator`, `demo` and `bench`. Installed, this
module is loaded by the CLI through the `paystream.commands` entry point."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from paystream.cli.common import app, console, fail, out, read_settings
from paystream.errors import Interrupted, PaystreamError


@app.command(rich_help_panel="Tooling")
def simulator(
    host: str = "127.0.0.1",
    port: int = 9000,
    profile: Annotated[str, typer.Option(help="original or hostile")] = "original",
    records: Annotated[int, typer.Option(help="records per /start")] = 1038,
    rate: Annotated[float, typer.Option(help="records per second; 0 = as fast as possible")] = 11.5,
    seed: int = 0,
    decline_rate: float = 0.1,
    latency_ms: Annotated[
        float | None, typer.Option(help="fixed gateway latency (default: the `delay` field)")
    ] = None,
    max_delay_ms: float = 1000,
    error_rate: float = 0.0,
    hang_rate: float = 0.0,
    drop_rate: float = 0.0,
    token_file: Annotated[
        Path | None,
        typer.Option(help="demand the token in this file on POST /payment and POST /log"),
    ] = None,
    auth_header: Annotated[
        str, typer.Option(help="header carrying the token (Authorization: as a Bearer token)")
    ] = "Authorization",
    tls_cert: Annotated[
        Path | None, typer.Option(help="serve HTTPS with this PEM certificate")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="the certificate's PEM key")] = None,
) -> None:
    """Run the retailer's third-party service: gateway, log API and record producer.

    On http://HOST:PORT (https with --tls-cert and --tls-key).

    Example: paystream simulator --port 9000 --profile hostile --rate 100
    """
    import uvicorn

    from paystream_tooling.devenv.processes import ensure_port_free
    from paystream_tooling.simulator.service import create_asgi_app
    from paystream_tooling.simulator.state import Faults, Simulator, SimulatorConfig
    from paystream_tooling.simulator.streams import Profile

    settings = read_settings()
    try:
        ensure_port_free(host, port, "the simulator", "pass --port with a free one")
    except PaystreamError as exc:
        raise fail(exc) from exc
    config = SimulatorConfig(
        kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
        database_url=settings.database_dsn,
        online_topic=settings.online_topic,
        offline_topic=settings.offline_topic,
        records=records,
        rate=rate,
        seed=seed,
        profile=Profile(profile),
        token=None if token_file is None else token_file.read_text().strip(),
        auth_header=auth_header,
    )
    faults = Faults.model_validate(
        {
            "decline_rate": decline_rate,
            "latency_ms": latency_ms,
            "max_delay_ms": max_delay_ms,
            "error_rate": error_rate,
            "hang_rate": hang_rate,
            "drop_rate": drop_rate,
        }
    )
    service = create_asgi_app(Simulator(config, faults))
    uvicorn.run(
        service,
        host=host,
        port=port,
        log_level="warning",
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
    )


@app.command(rich_help_panel="Tooling")
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
    """Run the whole system locally and check every record: exit 0 only if nothing was lost.

    Brings up Kafka, PostgreSQL and the simulator, runs the processor on the stream, and
    reconciles every record against the simulator's ledger.

    Example: paystream demo --profile hostile --rate 100
    """
    from paystream_tooling.demo import run_demo

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
        from paystream_tooling.demo import report_table

        out.print(report_table(report))
    raise typer.Exit(0 if report.ok else 1)


@app.command(rich_help_panel="Tooling")
def bench(
    quick: Annotated[bool, typer.Option(help="tiny sizes, to check the command works")] = False,
    home: Path = Path(".paystream/bench"),
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    profile: Annotated[
        Path | None, typer.Option(help="write py-spy collapsed stacks of each drain here")
    ] = None,
) -> None:
    """Measure throughput, latency, CPU and memory against ceilings measured in the same run.

    On local infrastructure. The ceilings: the consumer's read rate, the database's insert
    rates, the gateway, Little's law.

    Example: paystream bench --json > bench.json
    """
    import shutil

    from paystream_tooling import bench as benchmark
    from paystream_tooling.report import tables
    from paystream_tooling.workloads import Sizes

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
