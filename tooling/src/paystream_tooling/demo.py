"""`paystream demo`: the whole scenario on local infrastructure, reconciled against the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from paystream import logs
from paystream.app import Totals, open_pool, run_processor
from paystream.config import Settings
from paystream.errors import Interrupted
from paystream.lag import committed_lag
from paystream_tooling import queries
from paystream_tooling.devenv.processes import ensure_port_free, free_port
from paystream_tooling.devenv.stack import SimulatorProcess, Stack
from paystream_tooling.reconcile import Reconciliation, reconcile


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, headers={"Accept": "application/json"}) as response:
        response.raise_for_status()
        return await response.json()


async def _counts(database_url: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(queries.query("outcome_counts"))
        row = await cursor.fetchone()
    assert row is not None
    return {"stored": row[0], "kept": row[1], "reported": row[2]}


def _progress(status: dict[str, Any], counts: dict[str, int], lag: int, elapsed: float) -> Table:
    table = Table(title=f"paystream demo — {elapsed:.0f} s", min_width=60)
    table.add_column("")
    table.add_column("count", justify="right")
    total = status.get("records", 0)
    table.add_row("records produced", f"{status.get('delivered', 0)} / {total}")
    table.add_row("payments stored", str(counts["stored"]))
    table.add_row("records kept", str(counts["kept"]))
    table.add_row("reports delivered", str(counts["reported"]))
    table.add_row("consumer lag", str(lag))
    return table


def report_table(report: Reconciliation) -> Table:
    table = Table(title="reconciliation against the simulator's ledger")
    table.add_column("")
    table.add_column("value", justify="right")
    rows: list[tuple[str, object]] = [
        ("records sent", report.records),
        ("distinct payments", report.payments),
        ("stored", report.stored),
        *((f"kept: {kind}", count) for kind, count in sorted(report.kept.items())),
        ("reports delivered", report.reported),
        ("duplicate reports", report.duplicate_reports),
        ("wrong error type", report.wrong_type),
        ("wrong account dates", report.bad_account_dates),
        ("uncommitted records", report.uncommitted),
        ("doubled", report.doubled),
        ("lost", report.lost),
        ("seconds", f"{report.seconds:.1f}"),
    ]
    for name, value in rows:
        style = "bold red" if name in ("lost", "doubled") and value else ""
        table.add_row(name, str(value), style=style)
    return table


def run_demo(
    *,
    profile: str,
    records: int,
    rate: float,
    seed: int,
    simulator_port: int,
    kafka_port: int,
    postgres_port: int,
    dashboard_port: int,
    home: Path,
    timeout_s: float,
    console: Console,
) -> Reconciliation:
    for piece in ("kafka", "postgres", "simulator.log"):
        path = home / piece
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    dashboard_port = dashboard_port or free_port()
    ensure_port_free("127.0.0.1", dashboard_port, "the dashboard", "pass --dashboard-port")
    stack = Stack(home, kafka_port=kafka_port, postgres_port=postgres_port)
    console.print("starting Kafka (jars from Maven on first run) and PostgreSQL …")
    simulator: SimulatorProcess | None = None
    with stack:
        settings = stack.settings(group_id="paystream", web_port=0)
        simulator = SimulatorProcess(home, settings, port=simulator_port)
        simulator.start("--records", str(records), "--rate", str(rate), "--seed", str(seed))
        try:
            console.print(f"  Kafka       {stack.kafka.bootstrap}   (log {stack.kafka.log_path})")
            console.print(f"  PostgreSQL  {stack.database_url()}")
            console.print(f"  simulator   {simulator.url}   (API docs {simulator.url}/docs)")
            settings = stack.settings(
                group_id="paystream",
                gateway_url=simulator.url,
                log_url=simulator.url,
                web_port=dashboard_port,
            )
            console.print(f"  dashboard   http://127.0.0.1:{dashboard_port}/   (metrics /metrics)")
            console.print(f"  processor   logs in {home.resolve() / 'processor.log'}")
            logs.configure("info", path=home / "processor.log")
            return asyncio.run(_run(settings, simulator.url, profile, timeout_s, console))
        finally:
            simulator.stop()


async def _run(
    settings: Settings, simulator_url: str, profile: str, timeout_s: float, console: Console
) -> Reconciliation:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    totals = Totals()
    topics = [settings.online_topic, settings.offline_topic]
    started = time.monotonic()
    async with open_pool(settings):
        pass  # our tables exist before the progress display first counts them
    async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as group:
        processor = group.create_task(run_processor(settings, stop, totals=totals))
        try:
            await _get_json(session, f"{simulator_url}/start?profile={profile}")
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                while not interrupted.is_set():
                    if processor.done():
                        break
                    status = await _get_json(session, f"{simulator_url}/status")
                    counts = await _counts(settings.database_url)
                    lag = await asyncio.to_thread(
                        committed_lag, settings.kafka_bootstrap_servers, settings.group_id, topics
                    )
                    live.update(_progress(status, counts, lag, time.monotonic() - started))
                    settled = counts["kept"] == counts["reported"]
                    if status.get("done") and lag == 0 and settled and status["delivered"]:
                        break
                    if time.monotonic() - started > timeout_s:
                        console.print("[yellow]timed out waiting for the stream to drain[/]")
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(interrupted.wait(), timeout=0.5)
            console.print()
        finally:
            stop.set()
    if interrupted.is_set():
        raise Interrupted("interrupted; everything was shut down")
    elapsed = time.monotonic() - started
    async with aiohttp.ClientSession() as session:
        ledger = await _get_json(session, f"{simulator_url}/ledger")
        logs = await _get_json(session, f"{simulator_url}/logs")
    lag = committed_lag(settings.kafka_bootstrap_servers, settings.group_id, topics)
    with psycopg.connect(settings.database_url) as conn:
        report = reconcile(conn, ledger["records"], logs, lag)
    report.seconds = elapsed
    return report
