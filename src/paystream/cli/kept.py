"""The kept records: `paystream errors` lists them, `replay` re-drives them, `show` tells the
whole story of one payment_id."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from paystream.cli.common import app, console, out, read_settings, with_pool
from paystream.model import ErrorType, Reason

if TYPE_CHECKING:
    from paystream.store import KeptFilter


def _kept_filter(
    error_type: ErrorType | None = None,
    reason: Reason | None = None,
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


TypeOption = Annotated[ErrorType | None, typer.Option("--type", help="the log's error type")]
ReasonOption = Annotated[Reason | None, typer.Option(help="why records were kept")]
SinceOption = Annotated[datetime | None, typer.Option(help="kept at or after (ISO time)")]


@app.command(rich_help_panel="Kept records")
def errors(
    error_type: TypeOption = None,
    reason: ReasonOption = None,
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
    """List kept records, oldest first (never card data).

    When --limit cuts the list, the table says "N of M shown" and --json/--jsonl say so on
    stderr; --all lists every row.

    Example: paystream errors --type network --unresolved --jsonl --all
    """
    from paystream import store

    settings = read_settings()
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

    listed, shown, total = with_pool(settings, work)
    truncated = shown < total
    if as_json or as_jsonl:
        if as_json:
            sys.stdout.write(json.dumps(listed, indent=2) + "\n")
        if truncated:
            console.print(f"{shown} of {total} shown: pass --all (or a larger --limit)")
        return
    out.print(_kept_table(listed, shown, total))


def _kept_table(listed: list[dict[str, object]], shown: int, total: int) -> Table:
    truncated = shown < total
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
        amount = i["amount"]
        if i["reported"]:
            reported = "yes"
        elif i["undeliverable"]:
            reported = f"undeliverable: {i['last_report_error']}"
        else:
            reported = "no"
        cells = (
            i["id"],
            i["payment_id"] or "—",
            i["error_type"],
            i["reason"],
            "—" if amount is None else f"{amount:,}",
            f"{i['topic']}/{i['partition']}@{i['offset']}"
            + ("" if i["last_offset"] is None else f"..{i['last_offset']}"),
            reported,
            i["error_description"],
        )
        # Text, not markup: ids and descriptions come from records, and `[/x]` in one would
        # otherwise end the listing with a markup error.
        table.add_row(*(Text(str(c)) for c in cells))
    return table


@app.command(rich_help_panel="Kept records")
def replay(
    ids: Annotated[
        list[int] | None, typer.Option("--id", help="kept record id (repeatable)")
    ] = None,
    error_type: TypeOption = None,
    reason: ReasonOption = None,
    since: SinceOption = None,
    batch: Annotated[int, typer.Option(help="records per transaction", min=1)] = 200,
) -> None:
    """Re-drive unresolved kept records through the pipeline (idempotent).

    Sealed records need their key in PAYSTREAM_KEPT_KEY_FILE; one that does not open stops the
    replay, changing nothing of its batch.

    Example: paystream replay --reason unknown_account
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from paystream.app import kept_cipher, make_gateway, third_party, topic_types
    from paystream.pipeline import Pipeline
    from paystream.replay import replay as run_replay

    settings = read_settings()
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

    result = with_pool(settings, work)
    out.print(
        f"replayed: stored {result.stored}, still kept {result.kept}"
        + (
            f" ({', '.join(f'{k}: {v}' for k, v in result.kept_reasons.items())})"
            if result.kept
            else ""
        )
    )


@app.command(rich_help_panel="Kept records")
def show(
    payment_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Everything that happened to one payment_id.

    Each record that carried it, what became of each (stored, kept and why), its reports to the
    log service and its replays. Exit 1 if no record carried it.

    Example: paystream show 382b8005-da4e-4004-b064-5d920d47e14b
    """
    from paystream import audit

    settings = read_settings()

    async def work(pool: Any) -> Any:
        async with pool.connection() as conn:
            return await audit.trail(conn, payment_id)

    trail = with_pool(settings, work)
    if as_json:
        sys.stdout.write(json.dumps(trail.as_json()) + "\n")
    else:
        out.print(audit.render(trail))
    raise typer.Exit(0 if trail.records else 1)
