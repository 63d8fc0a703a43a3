"""`paystream bench` runs end to end and reports every workload and ceiling (shape only: the
numbers themselves belong in BENCHMARKS.md, never in assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.infra  # it starts its own Kafka and PostgreSQL
@pytest.mark.timeout(600)  # every workload, the three-node cluster's rolling restart included
def test_bench_quick_reports_every_workload(tmp_path: Path) -> None:
    """The JSON report names each workload with every documented key, and its ceilings."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "paystream",
            "bench",
            "--quick",
            "--json",
            "--home",
            str(tmp_path / "b"),
        ],
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert 0 == result.returncode, result.stderr[-3000:]
    report = json.loads(result.stdout)
    names = [w["name"] for w in report["workloads"]]
    assert {"offline", "online-20ms", "online-100ms", "original-mix"} <= set(names)
    keys = {
        "name",
        "payments",
        "payments_per_s",
        "ceiling_per_s",
        "ceiling_ratio",
        "p50_ms",
        "p99_ms",
        "cpu_s_per_1000",
        "peak_rss_mb",
        "bound_by",
    }
    for workload in report["workloads"]:
        assert keys <= set(workload)
        assert workload["payments_per_s"] > 0
        assert 0 < workload["ceiling_ratio"]
    assert {
        "consumer_read_per_s",
        "database_insert_per_s",
        "gateway_capacity_20ms_per_s",
        "littles_law_20ms_per_s",
        "log_capacity_per_s",
        "bare_insert_per_s",
        "stamped_insert_per_s",
        "raw_copy_per_s",
    } <= set(report["ceilings"])
    # The rolling restart's row and its quiet twin, each with its longest stretch unstored.
    rolling = {w["name"]: w for w in report["workloads"] if w["name"].startswith("cluster-")}
    assert {"cluster-rolling-restart", "cluster-quiet"} == set(rolling)
    for row in rolling.values():
        assert 0 < row["longest_gap_ms"] <= row["seconds"] * 1000
    # What the database holds per stored payment, the retailer's table and paystream's.
    mix = next(w for w in report["workloads"] if w["name"] == "original-mix")
    sizes = mix["bytes_per_payment"]
    assert {"payments", "paystream.payment_origins", "paystream (all)"} <= set(sizes)
    assert all(size > 0 for size in sizes.values())
    offline = next(w for w in report["workloads"] if w["name"] == "offline")
    # An offline drain's headline ceiling: the bare idempotent insert (or the consumer, if lower).
    ceilings = report["ceilings"]
    assert offline["ceiling_per_s"] == min(
        ceilings["bare_insert_per_s"], ceilings["consumer_read_per_s"]
    )
    assert {
        "processor's statements",
        "bare insert and stamps",
        "bare idempotent insert",
        "raw COPY",
    } == set(offline["ratios"])
