"""What every command shares: the typer app, the consoles (rich is used by the CLI alone), the
settings read once with a one-sentence failure, and a database pool for one command's work."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console

from paystream.config import Settings
from paystream.errors import PaystreamError

app = typer.Typer(
    help="paystream: payments from Kafka, validated, stored exactly once; nothing lost.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Markdown reflows each paragraph of a docstring to the terminal, where "rich" kept the
    # source's line breaks and printed ragged half-lines.
    rich_markup_mode="markdown",
)
console = Console(stderr=True)
# Piped output keeps whole table rows rather than wrapping them at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)


def fail(exc: PaystreamError) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)  # one line, for grep and logs
    return typer.Exit(2)


def read_settings() -> Settings:
    """The settings, or exit 2 with one sentence: a secret file that cannot be read, a value of
    the wrong kind."""
    try:
        return Settings()
    except PaystreamError as exc:
        raise fail(exc) from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"PAYSTREAM_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        console.print(f"[bold red]error:[/] invalid settings: {problems}", soft_wrap=True)
        raise typer.Exit(2) from exc


def with_pool(settings: Settings, work: Any) -> Any:
    from paystream.app import open_pool

    async def main() -> Any:
        async with open_pool(settings) as pool:
            return await work(pool)

    try:
        return asyncio.run(main())
    except PaystreamError as exc:
        raise fail(exc) from exc
