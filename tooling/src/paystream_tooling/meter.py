"""What a run of processors measured: wall clock, CPU and peak memory read from /proc, the whole
machine's busy share, and produce → stored latency read from the database."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import psycopg
from confluent_kafka.admin import AdminClient

from paystream.config import Settings
from paystream.lag import GroupLag
from paystream_tooling import polling, queries
from paystream_tooling.devenv.processes import ChildProcess


class Drained(NamedTuple):
    """What one run of processors measured."""

    seconds: float
    cpu_s: float
    peak_rss_mb: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    machine_busy: float
    finished_at: float
    """Wall-clock time the run was found drained."""
    others_cpu_s: dict[str, float]
    """CPU seconds of the other servers on the machine during the run: PostgreSQL (every
    backend, those that ended included) and the Kafka broker."""


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


_KINDS = {"postgres": "postgresql", "java": "broker"}
"""The other servers' processes, by their command name."""


def _others_cpu_s() -> dict[str, float]:
    """CPU seconds so far of PostgreSQL's and the broker's processes (a process's children that
    ended and were waited for count in its own figures)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[str, float] = dict.fromkeys(_KINDS.values(), 0.0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # ended meanwhile
            continue
        name, fields = text.split("(", 1)[1].rsplit(")", 1)
        kind = _KINDS.get(name)
        if kind is not None:
            values = fields.split()
            found[kind] += sum(int(v) for v in values[11:15]) / ticks
    return found


def _machine_ticks() -> tuple[int, int]:
    """(all, idle) CPU ticks of the whole machine so far."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]


def _machine_busy_since(before: tuple[int, int]) -> float:
    total, idle = _machine_ticks()
    return 1 - (idle - before[1]) / max(total - before[0], 1)


class Meter:
    """Wall clock, CPU and memory of running processors, and the whole machine's busy share,
    from its creation until the group has drained its topics."""

    def __init__(self, procs: list[ChildProcess]) -> None:
        self._procs = procs
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        self._cpu0 = sum(_proc_cpu_s(p.pid) for p in procs)
        self._machine0 = _machine_ticks()
        self._others0 = _others_cpu_s()

    def until_drained(
        self,
        settings: Settings,
        timeout_s: float,
        *,
        latency_from_ms: float,
        produced_from_ms: float = 0.0,
    ) -> Drained:
        """Once everything to drain has been produced: wait until the group has committed it."""
        topics = [settings.online_topic, settings.offline_topic]
        with GroupLag(settings.kafka_bootstrap_servers, settings.group_id, topics) as lag:
            ends = lag.watermarks()
            wait(lambda: sum(lag.behind(ends).values()) == 0, timeout_s)
        seconds = time.monotonic() - self.started_monotonic
        finished_at = time.time()
        busy = _machine_busy_since(self._machine0)
        cpu = sum(_proc_cpu_s(p.pid) for p in self._procs) - self._cpu0
        others = {k: round(v - self._others0[k], 2) for k, v in _others_cpu_s().items()}
        rss = max(_peak_rss_mb(p.pid) for p in self._procs)
        p50, p99, worst = _latency(settings.database_url, latency_from_ms, produced_from_ms)
        return Drained(seconds, cpu, rss, p50, p99, worst, busy, finished_at, others)


def members_assigned(settings: Settings) -> int:
    """How many members of the group hold at least one partition."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    future = admin.describe_consumer_groups([settings.group_id])[settings.group_id]
    group = future.result(timeout=10)
    return sum(1 for m in group.members if m.assignment and m.assignment.topic_partitions)


def wait(condition: Callable[[], bool], timeout_s: float) -> None:
    polling.until(condition, timeout_s, "a benchmark step", every_s=0.1)


def _latency(
    database_url: str, since_ms: float, produced_from_ms: float = 0.0
) -> tuple[float, float, float]:
    """Produce (or processor start, for a backlog) → stored, over the stored payments produced
    from `produced_from_ms` on: the median, the 99th percentile and the worst."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            queries.query("store_latency_ms"),
            {"since_ms": since_ms, "produced_from_ms": produced_from_ms},
        ).fetchone()
    if row is None:
        return 0.0, 0.0, 0.0
    return float(row[0] or 0), float(row[1] or 0), float(row[2] or 0)


def longest_store_gap_ms(database_url: str, produced_from_ms: float) -> float:
    """The longest stretch between two batches storing payments produced from
    `produced_from_ms` on."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            queries.query("longest_store_gap_ms"), {"produced_from_ms": produced_from_ms}
        ).fetchone()
    return 0.0 if row is None else float(row[0] or 0)
