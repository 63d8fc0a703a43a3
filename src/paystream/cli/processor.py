"""`paystream run` (the processor) and `paystream rebuild` (read all Kafka retains again)."""

from __future__ import annotations

import asyncio
import gc
import signal
from typing import Annotated, Any

import typer
from rich.text import Text

from paystream.cli.common import app, console, fail, out, read_settings, with_pool
from paystream.errors import PaystreamError


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def _collect_garbage_rarely() -> None:
    """Tune the cyclic garbage collector for a stream of short-lived objects.

    Reference counting frees nearly all of the processor's garbage, yet the default thresholds
    (a collection every 700 new objects) cost about a quarter of its CPU (BENCHMARKS.md).
    Collections at 50 000 new objects, with the startup heap frozen out of full passes, take a
    few percent; cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@app.command(rich_help_panel="Processor")
def run() -> None:
    """Run the processor until SIGTERM or Ctrl-C.

    Configured by PAYSTREAM_* environment variables or a .env file.

    Example: PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS=broker:9092 paystream run
    """
    import uvloop

    from paystream import logs
    from paystream.app import run_processor

    settings = read_settings()
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
        raise fail(exc) from exc
    finally:
        if provider is not None:
            provider.shutdown()  # the spans still batched go out before we exit


@app.command(rich_help_panel="Processor")
def rebuild(
    yes: Annotated[
        bool, typer.Option("--yes", help="do it (without: say what it would do)")
    ] = False,
) -> None:
    """Fill the database again from everything Kafka retains.

    Every partition's recorded position goes back to its log start. For a new or damaged
    database (or one restored from a backup older than the retention). Running processors
    notice within seconds and read it all again; stopped ones do when started. Nothing is stored
    twice; reports may go out again.

    Example: paystream rebuild --yes
    """
    from paystream import store
    from paystream.cli.common import console, out, with_pool
    from paystream.lag import GroupLag

    settings = read_settings()
    topics = [settings.online_topic, settings.offline_topic]
    try:
        with GroupLag(settings.kafka_client(), settings.group_id, topics) as reader:
            bounds = reader.watermarks()
    except PaystreamError as exc:
        raise fail(exc) from exc
    starts = {key: low for key, (low, _) in bounds.items()}
    records = sum(high - low for low, high in bounds.values())
    if not yes:
        console.print(
            f"would read {records:,} records of {len(starts)} partitions again: pass --yes"
        )
        return

    async def work(pool: Any) -> None:
        async with pool.connection() as conn, conn.transaction():
            await store.move_positions(conn, starts, overwrite=True)

    with_pool(settings, work)
    out.print(f"{len(starts)} partitions will be read again from their start ({records:,} records)")


@app.command(rich_help_panel="Processor")
def prune(
    days: Annotated[
        int,
        typer.Option("--older-than-days", min=1, max=36_500, help="keep what is younger than this"),
    ] = 90,
    yes: Annotated[
        bool, typer.Option("--yes", help="do it (without: count what it would remove)")
    ] = False,
) -> None:
    """Remove paystream's bookkeeping that nothing needs any more.

    The history of replays older than the retention; spans already folded into their
    partition's position; positions of topics no longer read, untouched for the retention; and
    origins of payments no longer stored (or stored again since). Kept records are never
    removed, nor a stored payment's origin. Safe beside running processors.

    Example: paystream prune --older-than-days 30 --yes
    """
    from datetime import timedelta

    from paystream.store import retention

    settings = read_settings()
    topics = [settings.online_topic, settings.offline_topic]

    async def work(pool: Any) -> dict[str, int]:
        import psycopg

        async with pool.connection() as conn, conn.transaction():
            counts = await retention.prune(conn, timedelta(days=days), topics)
            if not yes:
                raise psycopg.Rollback  # counted, not removed
        return counts

    counts = with_pool(settings, work)
    said = ", ".join(f"{counts[name]:,} {name}" for name in retention.PRUNED)
    if yes:
        out.print(f"removed {said}")
    else:
        console.print(f"would remove {said}: pass --yes")


@app.command(name="migrate", rich_help_panel="Processor")
def migrate_schema() -> None:
    """Bring the database's schema to this version's, and exit.

    paystream's own tables only (the retailer's are never altered). A step before a rollout
    whose instances run with PAYSTREAM_MIGRATE=false: they wait until the schema is at their
    version. Safe beside running instances: migrations only add what the previous version does
    not read.
    """
    from paystream.migrations import schema_version

    settings = read_settings().model_copy(update={"migrate": True})

    async def work(pool: Any) -> int:
        async with pool.connection() as conn:
            return await schema_version(conn)

    out.print(f"the database's schema is at migration {with_pool(settings, work)}")


_STATUS_TIMEOUT_S = 5.0


@app.command(rich_help_panel="Processor")
def status() -> None:
    """What the processor running with these settings says of itself: ready or not and why,
    its lag, and each partition whose intake has stalled, with the record that blocks it, the
    database's error and how long it has lasted.

    Asks its web server (PAYSTREAM_WEB_HOST, PAYSTREAM_WEB_PORT). Exits 0 when it is ready, 1
    when it is not, 2 when it does not answer.
    """
    settings = read_settings()
    host = settings.web_host
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: reached on this machine's loopback
        host = "127.0.0.1"
    base = f"http://{f'[{host}]' if ':' in host else host}:{settings.web_port}"
    headers = {}
    if settings.operator_token is not None:
        headers["X-Paystream-Token"] = settings.operator_token.get_secret_value()
    try:
        ready = _get_json(base + "/health/ready", headers)
        state = _get_json(base + "/api/state", headers)
    except (OSError, ValueError) as exc:
        console.print(f"[bold red]error:[/] no processor answers at {base} ({exc})", soft_wrap=True)
        raise typer.Exit(2) from exc
    checks = ready.get("checks", {})
    failing = [name for name, ok in checks.items() if not ok]
    if ready.get("ready"):
        out.print("[green]ready[/]")
    else:
        out.print(f"[red]not ready[/]: {', '.join(failing) or 'starting'}")
    lag = state.get("lag") or {}
    out.print(f"lag: {sum(lag.values())} records behind ({len(lag)} partitions)")
    stalls = state.get("stalls") or []
    for stall in stalls:
        # The error is the database's words: printed as text, never read as markup.
        said = f" {stall['partition']} for {stall['seconds']:.0f} s at record {stall['record']}"
        out.print(Text.assemble(("stalled", "red"), said, ": ", str(stall["error"])))
    if not stalls:
        out.print("no partition is stalled")
    raise typer.Exit(0 if ready.get("ready") else 1)


def _get_json(url: str, headers: dict[str, str]) -> Any:
    """A JSON answer of the processor's own web server, whatever its status (readiness answers
    503 with its checks)."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=_STATUS_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())
