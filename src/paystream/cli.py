"""The `paystream` command: demo, run, simulator, errors, replay."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from paystream.config import Settings
from paystream.errors import PaystreamError

if TYPE_CHECKING:
    from paystream.store import KeptFilter

app = typer.Typer(
    help="paystream: payments from Kafka, validated, stored exactly once; nothing lost.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
# Piped output keeps whole table rows rather than wrapping them at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)


def _fail(exc: PaystreamError) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)  # one line, for grep and logs
    return typer.Exit(2)


def _settings() -> Settings:
    """The settings, or exit 2 with one sentence: a secret file that cannot be read, a value of
    the wrong kind."""
    try:
        return Settings()
    except PaystreamError as exc:
        raise _fail(exc) from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"PAYSTREAM_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        console.print(f"[bold red]error:[/] invalid settings: {problems}", soft_wrap=True)
        raise typer.Exit(2) from exc


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def _collect_garbage_rarely() -> None:
    """Tune the cyclic garbage collector for a stream of short-lived objects.

    Reference counting frees nearly all of the processor's garbage: draining 50 000 online
    payments, 2 600 collections found 1 424 objects in cycles, yet took 2.3 s of the run's 8.4 s
    of CPU (make bench, online-20ms). Collections at 50 000 new objects instead of 700, with the
    startup heap frozen out of full passes, take a few percent; cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@app.command()
def run() -> None:
    """Run the processor until SIGTERM / Ctrl-C, configured by PAYSTREAM_* variables or .env.

    Example: PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS=broker:9092 paystream run
    """
    import uvloop

    from paystream import logs
    from paystream.app import run_processor

    settings = _settings()
    logs.configure(settings.log_level)
    _collect_garbage_rarely()
    provider = None
    if settings.otlp_endpoint:  # set, and not to the empty string compose passes for unset
        from paystream import tracing

        provider = tracing.configure_otlp(settings.otlp_endpoint)

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        await run_processor(settings, stop)

    try:
        # uvloop's event loop: 7 % less CPU per online payment than asyncio's (make bench).
        uvloop.run(main())
    except PaystreamError as exc:
        raise _fail(exc) from exc
    finally:
        if provider is not None:
            provider.shutdown()  # the spans still batched go out before we exit


@app.command()
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
    """Run the third-party service (gateway, log API, producer) on http://HOST:PORT (https with
    --tls-cert and --tls-key).

    Example: paystream simulator --port 9000 --profile hostile --rate 100
    """
    import uvicorn

    from paystream.devenv.processes import ensure_port_free
    from paystream.simulator.service import create_asgi_app
    from paystream.simulator.state import Faults, Simulator, SimulatorConfig
    from paystream.simulator.streams import Profile

    settings = _settings()
    try:
        ensure_port_free(host, port, "the simulator", "pass --port with a free one")
    except PaystreamError as exc:
        raise _fail(exc) from exc
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


def _with_pool(settings: Settings, work: Any) -> Any:
    from paystream.app import open_pool

    async def main() -> Any:
        async with open_pool(settings) as pool:
            return await work(pool)

    try:
        return asyncio.run(main())
    except PaystreamError as exc:
        raise _fail(exc) from exc


def _kept_filter(
    error_type: str | None = None,
    reason: str | None = None,
    topic: str | None = None,
    since: datetime | None = None,
    unresolved: bool = False,
    ids: list[int] | None = None,
) -> KeptFilter:
    from paystream.store import KeptFilter  # imported late: psycopg is slow to import

    return KeptFilter(
        error_type=error_type,
        reason=reason,
        topic=topic,
        since=since,
        unresolved_only=unresolved,
        ids=ids,
    )


TypeOption = Annotated[str | None, typer.Option("--type", help="database, network or other")]
SinceOption = Annotated[datetime | None, typer.Option(help="kept at or after (ISO time)")]


@app.command()
def errors(
    error_type: TypeOption = None,
    reason: Annotated[str | None, typer.Option(help="e.g. declined, duplicate, malformed")] = None,
    topic: str | None = None,
    since: SinceOption = None,
    unresolved: Annotated[bool, typer.Option(help="only records not resolved by a replay")] = False,
    limit: Annotated[int, typer.Option(help="at most this many rows", min=1)] = 100,
    show_all: Annotated[bool, typer.Option("--all", help="every matching row")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON array")] = False,
    as_jsonl: Annotated[
        bool, typer.Option("--jsonl", help="stream one JSON object a line (for scripts)")
    ] = False,
) -> None:
    """List kept records (never card data), oldest first. When --limit cuts the list, the table
    says "N of M shown" and --json/--jsonl say so on stderr; --all lists every row.

    Example: paystream errors --type network --unresolved --jsonl --all
    """
    from paystream import store

    settings = _settings()
    where = _kept_filter(error_type, reason, topic, since, unresolved)
    wanted = None if show_all else limit
    page_rows = 1000

    async def work(pool: Any) -> tuple[list[dict[str, object]], int, int]:
        """Rows as JSON (none kept back when streamed), how many were shown, how many match."""
        listed: list[dict[str, object]] = []
        shown = 0
        async with pool.connection() as conn:
            # Each page its own statement: a reader slow to take the output (a pager) must not
            # leave a transaction idle, which the server ends (app.configure_session).
            await conn.set_autocommit(True)
            total = await store.count_kept(conn, where)
            after = 0
            while wanted is None or shown < wanted:
                size = page_rows if wanted is None else min(page_rows, wanted - shown)
                rows = await store.list_kept(conn, where, after_id=after, limit=size)
                if not rows:
                    break
                after, shown = rows[-1].id, shown + len(rows)
                items = [r.as_json() for r in rows]
                if as_jsonl:  # streamed page by page: memory stays flat whatever the count
                    sys.stdout.write("".join(json.dumps(i) + "\n" for i in items))
                    sys.stdout.flush()
                else:
                    listed.extend(items)
        return listed, shown, total

    listed, shown, total = _with_pool(settings, work)
    truncated = shown < total
    if as_json or as_jsonl:
        if as_json:
            sys.stdout.write(json.dumps(listed, indent=2) + "\n")
        if truncated:
            console.print(f"{shown} of {total} shown: pass --all (or a larger --limit)")
        return
    title = f"{shown} of {total} kept records shown" if truncated else f"{total} kept records"
    table = Table(
        title=title, caption="pass --all (or a larger --limit) for the rest" if truncated else None
    )
    for column in (
        "id",
        "payment_id",
        "type",
        "reason",
        "amount",
        "record",
        "reported",
        "description",
    ):
        table.add_column(column, justify="right" if column == "amount" else "left")
    for i in listed:
        table.add_row(
            str(i["id"]),
            str(i["payment_id"] or "—"),
            str(i["error_type"]),
            str(i["reason"]),
            "—" if i["amount"] is None else f"{i['amount']:,}",
            f"{i['topic']}/{i['partition']}@{i['offset']}",
            "yes" if i["reported"] else "no",
            str(i["error_description"]),
        )
    out.print(table)


@app.command()
def replay(
    ids: Annotated[
        list[int] | None, typer.Option("--id", help="kept record id (repeatable)")
    ] = None,
    error_type: TypeOption = None,
    reason: Annotated[
        str | None, typer.Option(help="e.g. unknown_account, gateway_unavailable")
    ] = None,
    since: SinceOption = None,
    batch: Annotated[int, typer.Option(help="records per transaction", min=1)] = 200,
) -> None:
    """Re-drive unresolved kept records through the pipeline (idempotent). Sealed records need
    their key in PAYSTREAM_KEPT_KEY_FILE; one that does not open stops the replay, changing
    nothing of its batch.

    Example: paystream replay --reason unknown_account
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from paystream.app import kept_cipher, make_gateway, third_party, topic_types
    from paystream.pipeline import Pipeline
    from paystream.replay import replay as run_replay

    settings = _settings()
    where = _kept_filter(error_type, reason, since=since, ids=ids)

    async def work(pool: Any) -> Any:
        cipher = kept_cipher(settings)
        with Progress(
            SpinnerColumn(), TextColumn("replaying: {task.completed} records"), console=console
        ) as progress:
            task = progress.add_task("replay", total=None)
            async with third_party(settings, settings.gateway_max_in_flight) as client:
                gateway = make_gateway(settings, client)
                pipeline = Pipeline(pool, gateway, topic_types(settings), cipher=cipher)
                return await run_replay(
                    pool,
                    pipeline,
                    set(topic_types(settings)),
                    where,
                    batch=batch,
                    on_progress=lambda n: progress.advance(task, n),
                )

    result = _with_pool(settings, work)
    out.print(
        f"replayed: stored {result.stored}, still kept {result.kept}"
        + (
            f" ({', '.join(f'{k}: {v}' for k, v in result.kept_reasons.items())})"
            if result.kept
            else ""
        )
    )


@app.command()
def show(
    payment_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Everything that happened to one payment_id: each record that carried it, what became of
    each (stored, kept and why), its reports to the log service and its replays. Exit 1 if no
    record carried it.

    Example: paystream show 382b8005-da4e-4004-b064-5d920d47e14b
    """
    from paystream import audit

    settings = _settings()

    async def work(pool: Any) -> Any:
        async with pool.connection() as conn:
            return await audit.trail(conn, payment_id)

    trail = _with_pool(settings, work)
    if as_json:
        sys.stdout.write(json.dumps(trail.as_json()) + "\n")
    else:
        out.print(audit.render(trail))
    raise typer.Exit(0 if trail.records else 1)


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
    from paystream.tools.demo import Interrupted, run_demo

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
        raise _fail(exc) from exc
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
        raise _fail(exc) from exc
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    for shown in tables(result):
        out.print(shown)
