"""Go tools the tests use, built from their modules with `go install` into our cache, once.

`python -m paystream_tooling.devenv.gotools CACHE_DIR` builds them all (CI does, before the tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from paystream.errors import DevenvError
from paystream_tooling.devenv.kafka import require_tool


@dataclass(frozen=True, slots=True)
class GoTool:
    name: str
    package: str
    version: str
    binary: str  # what `go install` names it: the package's last path element


TOXIPROXY = GoTool(
    "toxiproxy", "github.com/Shopify/toxiproxy/v2/cmd/server", "v2.5.0", binary="server"
)
PROMTOOL = GoTool(
    "promtool", "github.com/prometheus/prometheus/cmd/promtool", "v0.316.0", binary="promtool"
)
TOOLS = (TOXIPROXY, PROMTOOL)


def tool_path(cache_dir: Path, tool: GoTool) -> Path:
    return cache_dir / "go-bin" / f"{tool.name}-{tool.version}" / tool.binary


def go_tool(cache_dir: Path, tool: GoTool) -> Path:
    """The tool's binary, built on first use (promtool takes ~5 minutes on two cores)."""
    path = tool_path(cache_dir, tool)
    if path.exists():
        return path
    go = require_tool("go", f"install Go so that {tool.name} can be built from its module")
    result = subprocess.run(
        [go, "install", f"{tool.package}@{tool.version}"],
        env={**os.environ, "GOBIN": str(path.parent), "CGO_ENABLED": "0"},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not path.exists():
        raise DevenvError(
            f"Building {tool.name} {tool.version} with `go install` failed; check access to the "
            f"Go module proxy:\n{(result.stdout + result.stderr)[-2000:]}"
        )
    return path


def main() -> None:
    cache_dir = Path(sys.argv[1])
    for tool in TOOLS:
        print(f"{tool.name}: {go_tool(cache_dir, tool)}", flush=True)


if __name__ == "__main__":
    main()
