"""The `paystream` command: run, simulator, errors, replay, show, demo, bench. Each module
registers its commands on the one typer app."""

from paystream.cli import kept, processor, tools
from paystream.cli.common import app

__all__ = ["app", "kept", "processor", "tools"]
