"""The bench's hands on local infrastructure: a fresh pair of topics and a database for each
workload, processors as child processes (so /proc shows their CPU and memory), a backlog, the
simulator's latency, and a drain measured until the group has committed everything."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import psycopg
import uvloop

from paystream.config import Settings
from paystream.migrations import migrate
from paystream_tooling import queries
from paystream_tooling.ceilings import third_party_capacity
from paystream_tooling.devenv.kafka import KafkaCluster
from paystream_tooling.devenv.processes import ChildProcess, answers_ok, free_port, spawn_processor
from paystream_tooling.devenv.stack import SimulatorProcess, Stack
from paystream_tooling.load import document, produce
from paystream_tooling.meter import Drained, Meter, members_assigned, wait

Progress = Callable[[str], None]


class Bench:
    def __init__(
        self,
        stack: Stack,
        gateway: SimulatorProcess,
        progress: Progress,
        profile_dir: Path | None = None,
    ) -> None:
        self.stack = stack
        self.gateway = gateway
        self.progress = progress
        self.profile_dir = profile_dir
        self._n = 0
        self.ports: list[int] = []
        """The dashboard ports of the processors last started."""

    def fresh(self, partitions: int = 3, cluster: KafkaCluster | None = None) -> Settings:
        """Settings for a workload: topics and a database of its own, on the stack's broker or
        replicated on `cluster`."""
        self._n += 1
        name = f"b{self._n}_{int(time.time())}"
        topics = [f"online_{name}", f"offline_{name}"]
        if cluster is None:
            self.stack.create_topics(topics, partitions)
        else:
            cluster.create_topics(topics, partitions)
        return self.stack.settings(
            kafka_bootstrap_servers=(cluster or self.stack.kafka).bootstrap,
            database_url=self.stack.fresh_database(f"bench_{name}"),
            online_topic=topics[0],
            offline_topic=topics[1],
            group_id=f"bench-{name}",
            gateway_url=self.gateway.url,
            log_url=self.gateway.url,
        )

    def set_latency(self, latency_ms: float) -> None:
        request = urllib.request.Request(
            self.gateway.url + "/faults",
            data=orjson.dumps({"latency_ms": latency_ms, "max_delay_ms": max(latency_ms, 1)}),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

    def _profile(self, pid: int, name: str) -> subprocess.Popen[bytes] | None:
        """py-spy samples the processor until it exits; collapsed stacks go to PROFILE_DIR."""
        if self.profile_dir is None:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        output = self.profile_dir / f"{name}.txt"
        return subprocess.Popen(
            [
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @contextlib.contextmanager
    def processors(
        self, settings: Settings, instances: int, label: str
    ) -> Iterator[list[ChildProcess]]:
        """`instances` processors on their own dashboard ports, ready; stopped at the end."""
        procs: list[ChildProcess] = []
        self.ports = []
        try:
            for i in range(instances):
                port = free_port()
                self.ports.append(port)
                own = settings.model_copy(update={"web_port": port, "log_level": "warning"})
                proc = spawn_processor(own, self.stack.home / f"processor-{label}-{i}.log")
                procs.append(proc)
                ready = functools.partial(answers_ok, f"http://127.0.0.1:{port}/health/ready")
                proc.wait_until(ready, 60, "ready")
            yield procs
        finally:
            for proc in procs:
                proc.stop(60)

    def backlog(self, settings: Settings, kind: str, count: int, rng: random.Random) -> None:
        """Preload `count` fresh payments of one kind onto its topic."""
        topic = settings.online_topic if kind == "online" else settings.offline_topic
        produce(
            settings.kafka_bootstrap_servers, [(topic, document(rng, kind)) for _ in range(count)]
        )

    def capacity(self, path: str, body: bytes, concurrency: int, seconds: float) -> float:
        """The most calls per second the third party answers at `path`: with as many callers as
        the processor has calls in flight, and with four times as many, so that at a long
        latency the callers' own concurrency is not what is measured.

        Run on the processor's event loop, so that the load generator is as lean as it is.
        """
        return max(
            uvloop.run(third_party_capacity(self.gateway.url + path, body, callers, seconds))
            for callers in (concurrency, 4 * concurrency)
        )

    def keep_many(self, settings: Settings, count: int) -> None:
        """`count` kept records already in the database (of a topic nobody reads, reported and
        unresolved, of three reasons), as after a long outage of accounts or of the gateway."""

        async def work() -> None:
            async with await psycopg.AsyncConnection.connect(settings.database_dsn) as conn:
                await migrate(conn)
                await conn.execute(queries.query("keep_many"), {"count": count})
                await conn.commit()

        asyncio.run(work())

    def drain(
        self,
        settings: Settings,
        instances: int = 1,
        backlog: Callable[[], None] | None = None,
        pages: int = 0,
    ) -> Drained:
        """Start processors on the backlog and measure them until it is drained.

        With `backlog`, the backlog is produced only once every instance holds its partitions,
        so that the first one up does not take all of it before the others join. With `pages`,
        that many dashboard pages watch the first instance throughout.
        """
        profiler = None
        with (
            self.processors(settings, instances, settings.group_id) as procs,
            _watching(self.ports, pages),
        ):
            if backlog is not None:
                wait(lambda: members_assigned(settings) == instances, 60)
            profiler = self._profile(procs[0].pid, settings.group_id)
            self._statements(settings, None)
            meter = Meter(procs)
            if backlog is not None:
                backlog()
            # For a backlog, latency counts from the processor's start, not from production.
            result = meter.until_drained(settings, 1800, latency_from_ms=meter.started_at * 1000)
            self._statements(settings, self._profile_path(settings.group_id, "statements"))
        if profiler is not None:
            profiler.wait(60)
        return result

    def _profile_path(self, name: str, kind: str) -> Path | None:
        return None if self.profile_dir is None else self.profile_dir / f"{name}-{kind}.txt"

    def _statements(self, settings: Settings, path: Path | None) -> None:
        """While profiling (PostgreSQL loads pg_stat_statements then): forget the statements
        counted so far (`path` None), or write those of the drain's database by total time."""
        if self.profile_dir is None:
            return
        with psycopg.connect(self.stack.admin_url, autocommit=True) as conn:
            conn.execute(queries.query("statements_extension"))
            if path is None:
                conn.execute(queries.query("statements_reset"))
                return
            rows = conn.execute(
                queries.query("statements_by_time"), {"database": settings.database_url}
            ).fetchall()
        lines = [f"{'total ms':>10} {'calls':>8} {'ms/call':>8} {'rows':>9}  statement"]
        for total_ms, calls, per_call_ms, returned, text in rows:
            one_line = " ".join(text.split())[:160]
            lines.append(
                f"{total_ms:10.0f} {calls:8d} {per_call_ms:8.2f} {returned:9d}  {one_line}"
            )
        path.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def _watching(ports: list[int], pages: int) -> Iterator[None]:
    """`pages` dashboard pages open on the feed of the processor at the first of `ports` (as a
    browser's EventSource reads it), until the block ends."""
    stop = threading.Event()
    url = f"http://127.0.0.1:{ports[0]}/events" if ports else ""
    readers = [
        threading.Thread(target=_read_feed, args=(url, stop), daemon=True) for _ in range(pages)
    ]
    for reader in readers:
        reader.start()
    try:
        yield
    finally:
        stop.set()
        for reader in readers:
            reader.join(10)


def _read_feed(url: str, stop: threading.Event) -> None:
    """Read the feed's snapshots as they come, as a page does, until `stop` (checked between
    snapshots, which come every second)."""
    with urllib.request.urlopen(url, timeout=30) as response:
        while not stop.is_set() and response.readline():
            pass
