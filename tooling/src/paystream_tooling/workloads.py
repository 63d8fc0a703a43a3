"""The workloads of `paystream bench`, in the order they run (WORKLOADS). Each is a function of
the run so far that drains one or more fresh backlogs or loads and returns their rows; a few
also measure a ceiling the later ones are compared with."""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import psycopg

from paystream.config import Settings
from paystream_tooling.ceilings import (
    Ceilings,
    bare_insert_ceiling,
    consumer_ceiling,
    database_ceiling,
    raw_copy_ceiling,
    stamped_insert_ceiling,
    third_party_ceiling,
)
from paystream_tooling.devenv.kafka import KafkaCluster
from paystream_tooling.harness import Bench
from paystream_tooling.load import REPORT, PacedLoad, document, produce
from paystream_tooling.meter import Drained, Meter, longest_store_gap_ms
from paystream_tooling.report import Workload, workload
from paystream_tooling.simulator.streams import Profile, plan

SCALE_IN_FLIGHT = 64
"""Gateway calls in flight per instance in the scale-out workload."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    offline: int = 200_000
    offline_scale: int = 600_000
    """The backlog drained by one instance and by two (offline_two_instances)."""
    online: int = 50_000
    mix: int = 100_000
    memory: int = 1_000_000
    watched_kept: int = 1_000_000
    """Kept records in the database while dashboard pages watch a drain."""
    scale: int = 8_000
    steady_s: float = 10.0
    steady_warmup_s: float = 2.0
    """Steady load before the measured part of the steady workload."""
    join_s: float = 8.0
    """Steady load during which a second instance joins (join-pause workloads)."""
    probe_s: float = 3.0
    """How long each capacity probe of the third party runs."""
    quiet_s: float | None = None
    """How long the rolling restart's quiet twin runs (None: as long as the restart took)."""
    restarted_nodes: int | None = None
    """How many of the cluster's three nodes the rolling restart restarts (None: all)."""
    capacity_drains: int = 3
    """Drains of a workload whose ceiling is the gateway's measured capacity: the probe and the
    drain share the cores with everything else, so one drain's ratio is a noisy draw
    (BENCHMARKS.md, how to read it)."""

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            offline=5_000,
            offline_scale=15_000,
            online=1_000,
            mix=2_000,
            memory=10_000,
            watched_kept=10_000,
            scale=400,
            steady_s=2.0,
            steady_warmup_s=0.5,
            join_s=3.0,
            probe_s=0.5,
            quiet_s=3.0,
            restarted_nodes=1,
            capacity_drains=1,
        )


@dataclass(slots=True, kw_only=True)
class Run:
    """What the workloads of one run share: the harness, the sizes, one seeded random source
    (so that every run offers the same payments) and the ceilings measured so far."""

    bench: Bench
    sizes: Sizes
    in_flight: int
    rng: random.Random
    ceilings: Ceilings

    def third_party(
        self,
        settings: Settings,
        drained: Drained,
        records: int,
        validations: int,
        gateway_per_s: float,
    ) -> float:
        """The third party's ceiling for a drain: `validations` gateway calls at
        `gateway_per_s`, and the reports delivered meanwhile at the log API's capacity."""
        return third_party_ceiling(
            settings,
            drained,
            records,
            validations=validations,
            gateway_per_s=gateway_per_s,
            log_per_s=self.ceilings.log_capacity_per_s,
        )


def offline(run: Run) -> list[Workload]:
    """An offline backlog, with the consumer's and the database's ceilings on the same rows."""
    bench, sizes = run.bench, run.sizes
    defaults = Settings()
    settings = bench.fresh()
    bench.progress(f"offline: preloading {sizes.offline} records")
    bench.backlog(settings, "offline", sizes.offline, run.rng)
    consumer = consumer_ceiling(settings, sizes.offline)
    shape = (sizes.offline, defaults.batch_size, defaults.batches_in_flight)
    database, stamped, bare, copy = (
        asyncio.run(ceiling(bench.fresh().database_url, *shape))
        for ceiling in (
            database_ceiling,
            stamped_insert_ceiling,
            bare_insert_ceiling,
            raw_copy_ceiling,
        )
    )
    run.ceilings = replace(
        run.ceilings,
        consumer_read_per_s=consumer,
        database_insert_per_s=database,
        stamped_insert_per_s=stamped,
        bare_insert_per_s=bare,
        raw_copy_per_s=copy,
    )
    bench.progress("offline: draining")
    drained = bench.drain(settings)
    return [_offline_row(run, "offline", sizes.offline, drained)]


def _offline_row(
    run: Run, name: str, records: int, drained: Drained, instances: int = 1
) -> Workload:
    """An offline drain against the bare idempotent insert, and each database ceiling."""
    ceilings = run.ceilings
    return workload(
        name, records, drained, ceilings.offline(), instances, against=ceilings.database()
    )


def offline_watched(run: Run, *, pages: int = 12) -> list[Workload]:
    """The offline backlog again, with a million kept records in the database and a dozen
    dashboard pages open on the processor: watching must not slow the payments (compare the
    offline row)."""
    bench, sizes = run.bench, run.sizes
    settings = bench.fresh()
    bench.progress(f"offline watched: {sizes.watched_kept} kept records, {pages} pages open")
    bench.keep_many(settings, sizes.watched_kept)
    bench.backlog(settings, "offline", sizes.offline, run.rng)
    drained = bench.drain(settings, pages=pages)
    return [_offline_row(run, "offline-watched", sizes.offline, drained)]


def offline_two_instances(run: Run) -> list[Workload]:
    """A backlog on 6 partitions drained by one instance, then another by two. Preloaded, and
    three times the offline backlog, so that the second instance's join (about a second, the
    first instance draining alone meanwhile) is a small part of the drain."""
    rows = []
    for instances in (1, 2):
        run.bench.progress(f"offline backlog on 6 partitions, {instances} instance(s)")
        settings = run.bench.fresh(partitions=6)
        run.bench.backlog(settings, "offline", run.sizes.offline_scale, run.rng)
        drained = run.bench.drain(settings, instances=instances)
        name = f"offline-{instances}-instance{'s' if instances > 1 else ''}"
        rows.append(_offline_row(run, name, run.sizes.offline_scale, drained, instances=instances))
    return rows


def log_capacity(run: Run) -> list[Workload]:
    """Every kept record is reported to the third party's log API, which shares its capacity
    with the gateway: online ceilings count both kinds of call."""
    capacity = run.bench.capacity("/log", REPORT, run.in_flight, run.sizes.probe_s)
    run.ceilings = replace(run.ceilings, log_capacity_per_s=capacity)
    return []


def online(run: Run, *, latency_ms: int) -> list[Workload]:
    """An online backlog against a gateway of `latency_ms`. Bound by the measured third-party
    capacity rather than the computed Little's law, the row is the median of several drains,
    not a single draw; each is compared with the mean of the capacity measured just before and
    just after it (one probe alone drifts between runs), and a probe between two drains serves
    as the one after the first and the one before the second."""
    bench, sizes = run.bench, run.sizes
    bench.set_latency(latency_ms)
    little = run.in_flight / (latency_ms / 1000)
    body = document(random.Random(2), "online")

    def capacity() -> float:
        return bench.capacity("/payment", body, run.in_flight, sizes.probe_s)

    before = capacity()
    runs: list[tuple[Workload, float]] = []
    while not runs or (len(runs) < sizes.capacity_drains and runs[0][0].ceiling_per_s < little):
        settings = bench.fresh()
        bench.progress(f"online-{latency_ms}ms: preloading {sizes.online} records")
        bench.backlog(settings, "online", sizes.online, run.rng)
        drained = bench.drain(settings)
        after = capacity()
        mean = (before + after) / 2
        third_party = run.third_party(settings, drained, sizes.online, sizes.online, mean)
        ceilings = {
            **run.ceilings.base(),
            "third-party capacity": third_party,
            "Little's law": little,
        }
        runs.append((workload(f"online-{latency_ms}ms", sizes.online, drained, ceilings), mean))
        before = after
    runs.sort(key=lambda r: r[0].ceiling_ratio)
    row, mean = runs[len(runs) // 2]
    run.ceilings = run.ceilings.with_gateway(latency_ms, little, mean)
    if len(runs) > 1:
        row.run_ratios = [r.ceiling_ratio for r, _ in runs]
    return [row]


def scale_out(run: Run, *, instances: int) -> list[Workload]:
    """Each instance is held to a small in-flight limit, so the bound is the instances' own
    concurrency, while the gateway (still at 100 ms) and the database have room to spare."""
    bench, records = run.bench, run.sizes.scale
    settings = bench.fresh(partitions=6).model_copy(
        update={"gateway_max_in_flight": SCALE_IN_FLIGHT}
    )
    bench.progress(f"scale-out, {instances} instance(s) of {SCALE_IN_FLIGHT} calls in flight")
    backlog = functools.partial(bench.backlog, settings, "online", records, run.rng)
    drained = bench.drain(settings, instances=instances, backlog=backlog)
    ceilings = {
        **run.ceilings.base(),
        "third-party capacity": run.third_party(
            settings, drained, records, records, run.ceilings.gateway_capacity(100)
        ),
        "Little's law": SCALE_IN_FLIGHT * instances / 0.100,
    }
    return [workload(f"scale-out-{instances}", records, drained, ceilings, instances=instances)]


def original_mix(run: Run) -> list[Workload]:
    """The original stream's shape (half of it exact duplicates, 69 % online) at 20 ms."""
    bench, records = run.bench, run.sizes.mix
    bench.set_latency(20)
    settings = bench.fresh()
    planned = plan(Profile.ORIGINAL, records=records, seed=3, decline_rate=0.1)
    topic = {"online": settings.online_topic, "offline": settings.offline_topic}
    bench.progress(f"original-mix: preloading {records} records")
    produce(settings.kafka_bootstrap_servers, [(topic[p.topic_type], p.value) for p in planned])
    validations = len({p.payment_id for p in planned if p.topic_type == "online"})
    drained = bench.drain(settings)
    ceilings = {
        **run.ceilings.base(),
        "third-party capacity": run.third_party(
            settings, drained, records, validations, run.ceilings.gateway_capacity(20)
        ),
        "Little's law": run.ceilings.littles_law(20) * len(planned) / validations,
    }
    row = workload("original-mix", records, drained, ceilings)
    row.bytes_per_payment = bytes_per_payment(settings)
    return [row]


def bytes_per_payment(settings: Settings) -> dict[str, int]:
    """What the retailer's payments table and paystream's own take on disk per stored payment
    (each of paystream's tables, and all of them), and the kept records per kept record. Tables
    of a few rows weigh their first pages: read them from a drain of many records."""
    from paystream.store.queries import query

    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")  # what autovacuum would have reclaimed by now
        sizes = conn.execute(query("table_sizes")).fetchall()
        counted = conn.execute(
            "SELECT (SELECT count(*) FROM payments), (SELECT count(*) FROM paystream.kept_records)"
        ).fetchone()
    stored, kept = (max(int(n), 1) for n in counted or (0, 0))
    shown = {
        ("paystream." if ours else "") + name: round(size / stored) for name, ours, size in sizes
    }
    shown["paystream (all)"] = round(sum(size for _, ours, size in sizes if ours) / stored)
    kept_bytes = sum(size for name, ours, size in sizes if ours and name == "kept_records")
    shown["paystream.kept_records, per kept record"] = round(kept_bytes / kept)
    return shown


def steady(run: Run, *, rate: int = 1000) -> list[Workload]:
    """A steady offline+online load while the processor runs: true end-to-end latency, once
    the processor is warm (its first seconds open the gateway connections and prepare the
    statements: start-up, not steady state)."""
    sizes = run.sizes
    run.bench.progress(
        f"steady {rate}/s for {sizes.steady_warmup_s:.0f} s + {sizes.steady_s:.0f} s measured"
        " (true produce → stored latency)"
    )
    settings = run.bench.fresh()
    with run.bench.processors(settings, 1, "steady") as procs:
        load = PacedLoad(settings, run.rng, rate)
        load.produce(sizes.steady_warmup_s)
        meter = Meter(procs)
        measured = load.produce(sizes.steady_s)
        load.flush()
        drained = meter.until_drained(
            settings, 120, latency_from_ms=0, produced_from_ms=meter.started_at * 1000
        )
    bound = f"offered load ({rate}/s)"
    return [
        workload(f"steady-{rate}-per-s", measured, drained, run.ceilings.base(), bound_by=bound)
    ]


def join_pause(run: Run, *, protocol: str, rate: int = 500) -> list[Workload]:
    """A second instance joins one that carries a steady load: the end-to-end latency of what
    was produced meanwhile shows how long the join held payments up. With the classic protocol
    every partition of the first instance stops until the group has rebalanced; with KIP-848
    only those that move to the newcomer do."""
    bench, sizes = run.bench, run.sizes
    bench.progress(f"join under {rate}/s, {protocol} group protocol")
    settings = bench.fresh().model_copy(update={"group_protocol": protocol})
    with bench.processors(settings, 1, f"join-{protocol}") as procs:
        load = PacedLoad(settings, run.rng, rate)
        load.produce(sizes.steady_warmup_s)
        meter = Meter(procs)
        producing = threading.Thread(target=load.produce, args=(sizes.join_s,))
        producing.start()
        # The newcomer starts a second into the load (pacing the scenario, not waiting for a
        # result): its start-up checks and its join fall inside the measured window.
        time.sleep(1.0)
        with bench.processors(settings, 1, f"join-{protocol}-newcomer"):
            producing.join()
            load.flush()
            drained = meter.until_drained(
                settings, 120, latency_from_ms=0, produced_from_ms=meter.started_at * 1000
            )
    return [
        workload(
            f"join-pause-{protocol}",
            int(rate * sizes.join_s),
            drained,
            ceilings=run.ceilings.base(),
            bound_by=f"offered load ({rate}/s), a second instance joining",
            instances=2,
        )
    ]


def rolling_restart(run: Run, *, rate: int = 1000) -> list[Workload]:
    """A steady load on a cluster of three nodes (topics replicated three times, two in sync)
    through a rolling restart: each node stopped cleanly and started again, the next once no
    replica is out of sync. Then the same load for as long on the quiet cluster. Each row has
    its worst produce → stored latency and its longest stretch with no payment stored."""
    bench, sizes = run.bench, run.sizes
    rows = []
    cache = bench.stack.home.parent / "cache"
    bench.progress("a three-node cluster for the rolling restart")
    with KafkaCluster(bench.stack.home / "cluster", cache, size=3) as cluster:
        restart_s = 0.0
        for name in ("cluster-rolling-restart", "cluster-quiet"):
            settings = bench.fresh(cluster=cluster)
            with bench.processors(settings, 1, name) as procs:
                load = PacedLoad(settings, run.rng, rate)
                load.produce(sizes.steady_warmup_s)
                meter = Meter(procs)
                if name == "cluster-quiet":
                    quiet_s = restart_s if sizes.quiet_s is None else sizes.quiet_s
                    bench.progress(f"{name}: {rate}/s for {quiet_s:.0f} s")
                    measured = load.produce(quiet_s)
                else:
                    bench.progress(f"{name}: {rate}/s while each node restarts in turn")
                    stop = threading.Event()
                    with ThreadPoolExecutor(1) as producing:
                        produced = producing.submit(load.produce, 3600, stop)
                        try:
                            cluster.rolling_restart(
                                [settings.online_topic, settings.offline_topic],
                                nodes=sizes.restarted_nodes,
                            )
                        finally:
                            stop.set()
                        measured = produced.result()
                    restart_s = time.monotonic() - meter.started_monotonic
                load.flush()
                since_ms = meter.started_at * 1000
                drained = meter.until_drained(
                    settings, 180, latency_from_ms=0, produced_from_ms=since_ms
                )
            row = workload(
                name,
                measured,
                drained,
                run.ceilings.base(),
                bound_by=f"offered load ({rate}/s) on three nodes",
            )
            row.longest_gap_ms = round(longest_store_gap_ms(settings.database_url, since_ms), 1)
            rows.append(row)
    return rows


def memory(run: Run) -> list[Workload]:
    run.bench.progress(f"memory: {run.sizes.memory} record backlog")
    settings = run.bench.fresh()
    run.bench.backlog(settings, "offline", run.sizes.memory, run.rng)
    drained = run.bench.drain(settings)
    return [_offline_row(run, "offline-1m-backlog", run.sizes.memory, drained)]


WORKLOADS: tuple[Callable[[Run], list[Workload]], ...] = (
    offline,
    offline_watched,
    offline_two_instances,
    log_capacity,
    functools.partial(online, latency_ms=20),
    functools.partial(online, latency_ms=100),
    functools.partial(scale_out, instances=1),
    functools.partial(scale_out, instances=2),
    original_mix,
    steady,
    rolling_restart,
    functools.partial(join_pause, protocol="classic"),
    functools.partial(join_pause, protocol="consumer"),
    memory,
)
"""In order: a workload may use the ceilings that an earlier one measured."""
