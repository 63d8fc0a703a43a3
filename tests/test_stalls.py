"""Which partitions count as stalled, and what the alarm says of each: pure, on a fake clock."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from paystream.stalls import Stalls


def _stalls() -> tuple[Stalls, list[float]]:
    now = [100.0]
    return Stalls(after_s=60, clock=lambda: now[0]), now


def test_a_partition_stalls_once_its_batch_has_failed_for_the_threshold() -> None:
    """A failing batch's partitions count as stalled only after `after_s` from its first
    failure, however often it fails again meanwhile, and no longer once it is durable."""
    stalls, now = _stalls()
    stalls.failing(1, {("offline", 2): 417}, "refused", "InsufficientPrivilege 42501")
    now[0] += 59
    stalls.failing(1, {("offline", 2): 417}, "refused again", "InsufficientPrivilege 42501")
    assert {} == stalls.stalled()
    now[0] += 1
    stalled = stalls.stalled()
    assert [("offline", 2)] == list(stalled)
    assert (100.0, 417, "refused again") == (
        stalled[("offline", 2)].since,
        stalled[("offline", 2)].offset,
        stalled[("offline", 2)].error,
    )
    stalls.cleared(1)
    assert {} == stalls.stalled()


def test_a_partition_is_reported_once_by_its_longest_waiting_batch() -> None:
    """Two failing batches of one partition: the one failing longest names the record."""
    stalls, now = _stalls()
    stalls.failing(1, {("online", 0): 10}, "first", "DiskFull 53100")
    now[0] += 30
    stalls.failing(2, {("online", 0): 90, ("online", 1): 5}, "second", "DiskFull 53100")
    now[0] += 40
    assert [
        {
            "partition": "online/0",
            "record": "online/0@10",
            "error": "first",
            "seconds": 70.0,
        }
    ] == stalls.as_json()


def test_the_metric_holds_one_series_per_stalled_partition_and_none_after() -> None:
    """Exported with the blocking record's offset and the error's class, valued by how long;
    once the batch is durable the series is gone, so the alert stops."""
    registry = CollectorRegistry()
    gauge = Gauge(
        "stalled_seconds", "test", ["topic", "partition", "offset", "error"], registry=registry
    )
    stalls, now = _stalls()
    stalls.failing(3, {("offline", 1): 42}, "refused", "ReadOnlySqlTransaction 25006")
    now[0] += 75
    stalls.export(gauge)
    labels = {
        "topic": "offline",
        "partition": "1",
        "offset": "42",
        "error": "ReadOnlySqlTransaction 25006",
    }
    assert 75.0 == registry.get_sample_value("stalled_seconds", labels)
    stalls.cleared(3)
    stalls.export(gauge)
    assert None is registry.get_sample_value("stalled_seconds", labels)
