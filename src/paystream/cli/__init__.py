"""The `paystream` command. The runtime's modules register their commands on the one typer app
(the processor's first); an installed tooling package adds its own (simulator, demo, bench)
through the `paystream.commands` entry point, which the runtime names but never imports."""

from importlib.metadata import entry_points

from paystream.cli import processor

# isort: split
from paystream.cli import kept  # listed after the processor's commands
from paystream.cli.common import app, console

for _entry in entry_points(group="paystream.commands"):
    try:
        _entry.load()  # registering its commands on `app` as it is imported
    except ImportError as _exc:  # a tooling installed without its dependencies
        console.print(f"[yellow]commands of {_entry.value} not loaded: {_exc}[/]")

__all__ = ["app", "kept", "processor"]
