"""The harness the fault-injection suites share (test_chaos, test_partitions): seeded rounds,
a processor started on demand on a hostile stream, and the full oracle at the end of each round,
recorded for chaos-report.json."""

from __future__ import annotations

import contextlib
import os
import random
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from paystream_tooling.devenv.processes import ChildProcess, spawn_processor
from paystream_tooling.devenv.stack import Stack
from paystream_tooling.polling import TimedOut
from paystream_tooling.reconcile import Reconciliation
from tests import chaos_report
from tests.conftest import (
    Env,
    SimulatorClient,
    new_env,
    reconcile_now,
    running_simulator,
    settled,
    unreported,
    unresolved_gateway_failures,
    wait_for,
)

ROUNDS = int(os.environ.get("PAYSTREAM_CHAOS_ROUNDS", "1"))
RANDOM = os.environ.get("PAYSTREAM_CHAOS_RANDOM") == "1"
RECORDS = 400
RATE = 80  # records/s: the stream lasts ~5 s, long enough for faults to land mid-stream


def seeds(scenario: str) -> list[int]:
    if RANDOM:
        return [random.randrange(2**31) for _ in range(ROUNDS)]
    return [zlib.crc32(scenario.encode()) % 1000 + i for i in range(ROUNDS)]


def record(
    scenario: str,
    seed: int,
    report: Reconciliation,
    recover_s: float,
    noticed_s: float | None = None,
) -> None:
    """One round for chaos-report.json; `noticed_s`: how long the processor took to notice the
    fault, where it is one a processor must notice."""
    chaos_report.ROUNDS.append(
        {
            "scenario": scenario,
            "seed": seed,
            "records": report.records,
            "lost": report.lost,
            "doubled": report.doubled,
            "duplicate_reports": report.duplicate_reports,
            "recover_s": round(recover_s, 2),
            "noticed_s": None if noticed_s is None else round(noticed_s, 2),
            "problems": report.problems[:10],
        }
    )


def check(
    env: Env,
    simulator: SimulatorClient,
    settings: Any,
    scenario: str,
    seed: int,
    fault_ended: float,
    noticed_s: float | None = None,
) -> None:
    try:
        wait_for(lambda: settled(env, simulator, settings), 120, f"{scenario} to settle")
    except TimedOut as exc:
        raise TimedOut(f"{exc}: {unsettled(env, simulator, settings)}") from None
    recover_s = time.monotonic() - fault_ended
    report = reconcile_now(env, simulator, settings)
    record(scenario, seed, report, recover_s, noticed_s)
    assert report.problems == [], f"{scenario} seed {seed}"
    assert report.ok


def unsettled(env: Env, simulator: SimulatorClient, settings: Any) -> str:
    """What a round that did not settle still waits for, for its failure message."""
    from paystream.lag import GroupLag

    topics = [settings.online_topic, settings.offline_topic]
    with GroupLag(settings.kafka_bootstrap_servers, settings.group_id, topics) as lag:
        behind = {f"{t}/{p}": n for (t, p), n in lag.behind().items() if n}
    durable = env.query(
        "SELECT topic || '/' || partition, next_offset FROM paystream.positions ORDER BY 1"
    )
    ranges = env.query("SELECT count(*) FROM paystream.done_ranges")[0][0]
    return (
        f"producer {simulator.status()}, records behind {behind} (the database's positions"
        f" {dict(durable)}, {ranges} done ranges unfolded), unreported {unreported(env)},"
        f" awaiting re-validation {unresolved_gateway_failures(env)}"
    )


def chaos_settings(env: Env, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "gateway_timeout_s": 1.0,
        "gateway_budget_s": 2.0,
        "gateway_attempts": 3,
        "revalidate_every_s": 1.0,
        "batch_size": 100,
    }
    values.update(overrides)
    return env.settings(**values)


@contextlib.contextmanager
def processes(settings: Any, folder: Path) -> Iterator[Callable[..., ChildProcess]]:
    """Start `paystream run` processes on demand; whatever still runs is killed at the end."""
    started: list[ChildProcess] = []

    def start(own: Any = None) -> ChildProcess:
        """One more processor, with these settings or `own`."""
        proc = spawn_processor(own or settings, folder / f"processor-{len(started)}.log")
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.running():
                proc.kill()


@contextlib.contextmanager
def stream_under_faults(
    stack: Stack, folder: Path, seed: int, **faults: Any
) -> Iterator[tuple[Env, SimulatorClient, Any]]:
    """A processor running on the hostile stream, with the simulator's `faults` set from the
    start. Yields (env, simulator, settings)."""
    env = new_env(stack)
    with running_simulator(env) as simulator:
        settings = chaos_settings(env)
        simulator.faults(**faults)
        with processes(settings, folder) as start:
            start()
            simulator.start(records=RECORDS, seed=seed, profile="hostile", rate=RATE)
            yield env, simulator, settings


def produced_at_least(
    simulator: SimulatorClient, share: float, records: int = RECORDS
) -> Callable[[], bool]:
    """Whether `share` of a stream of `records` has been delivered."""
    return lambda: simulator.status().get("delivered", 0) >= share * records
