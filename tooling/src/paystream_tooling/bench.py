"""`paystream bench`: how fast the processor drains a backlog, next to the ceilings it could reach.

Everything runs on this machine: broker, database, gateway (the simulator with a fixed latency)
and the processor, which runs as its own process so its CPU time and peak RSS can be read from
/proc. Ceilings are measured in the same run: raw consumer read rate, raw batched insert rate,
the gateway's and the log API's own capacities (the third party answers both kinds of call) and
the Little's-law bound (in-flight limit ÷ gateway latency).
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from paystream.config import Settings
from paystream_tooling.ceilings import Ceilings
from paystream_tooling.devenv.stack import SimulatorProcess, Stack
from paystream_tooling.harness import Bench, Progress
from paystream_tooling.workloads import WORKLOADS, Run, Sizes


def run(
    home: Path, sizes: Sizes, progress: Progress, profile_dir: Path | None = None
) -> dict[str, Any]:
    """Every workload on a local stack of its own under `home`: the report as one JSON object."""
    # While profiling, PostgreSQL also counts each statement's time (pg_stat_statements).
    statements = {"shared_preload_libraries": "pg_stat_statements"} if profile_dir else None
    stack = Stack(home, postgres_settings=statements)
    with stack:
        gateway = SimulatorProcess(home, stack.settings())
        gateway.start("--latency-ms", "20", "--rate", "0", "--decline-rate", "0.1")
        try:
            state = Run(
                bench=Bench(stack, gateway, progress, profile_dir),
                sizes=sizes,
                in_flight=Settings().gateway_max_in_flight,
                rng=random.Random(42),
                ceilings=Ceilings(),
            )
            rows = [row for step in WORKLOADS for row in step(state)]
        finally:
            gateway.stop()
    return {"workloads": [asdict(row) for row in rows], "ceilings": state.ceilings.as_json()}
