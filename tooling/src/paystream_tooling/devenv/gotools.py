"""Go tools the tests use, built into our cache once: from their modules with `go install`, or,
for a program of ours (tooling/go), with `go build`.

`python -m paystream_tooling.devenv.gotools CACHE_DIR` builds them all (CI does, before the tests).
"""

from __future__ import annotations

import hashlib
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
    """A module's package (`go install package@version`), or a folder of this repository holding
    a module of ours (`go build` there; `version` is then a digest of its files)."""
    version: str
    binary: str  # what `go install` names it: the package's last path element


def ours(name: str) -> GoTool:
    """A Go program of ours, in tooling/go/NAME of the checkout this tooling is installed from
    (editable), named by a digest of its sources."""
    folder = Path(__file__).resolve().parents[3] / "go" / name
    digest = hashlib.sha256()
    for source in sorted(folder.iterdir()):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return GoTool(name, str(folder), digest.hexdigest()[:12], binary=name)


TOXIPROXY = GoTool(
    "toxiproxy", "github.com/Shopify/toxiproxy/v2/cmd/server", "v2.5.0", binary="server"
)
PROMTOOL = GoTool(
    "promtool", "github.com/prometheus/prometheus/cmd/promtool", "v0.316.0", binary="promtool"
)
COMPOSECHECK = "composecheck"
"""Ours: a compose file loaded as `docker compose config` loads it (compose-go)."""


def tool_path(cache_dir: Path, tool: GoTool) -> Path:
    return cache_dir / "go-bin" / f"{tool.name}-{tool.version}" / tool.binary


def go_tool(cache_dir: Path, tool: GoTool) -> Path:
    """The tool's binary, built on first use (promtool takes ~5 minutes on two cores)."""
    path = tool_path(cache_dir, tool)
    if path.exists():
        return path
    go = require_tool("go", f"install Go so that {tool.name} can be built from its module")
    ours = Path(tool.package).is_dir()
    result = subprocess.run(
        [go, "build", "-o", str(path), "."]
        if ours
        else [go, "install", f"{tool.package}@{tool.version}"],
        cwd=tool.package if ours else None,
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
    for tool in (TOXIPROXY, PROMTOOL, ours(COMPOSECHECK)):
        print(f"{tool.name}: {go_tool(cache_dir, tool)}", flush=True)


if __name__ == "__main__":
    main()
