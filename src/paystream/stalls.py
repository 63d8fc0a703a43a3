"""Partitions whose intake has stopped: a batch of their records has failed to become durable
for longer than PAYSTREAM_STALL_AFTER_S while its records wait.

A stall is never a silent wait: whatever keeps a batch from the database (an outage, a server
that refuses every payment, one record whose very bare keep is refused) shows here, and from
here in the metric `paystream_partition_stalled_seconds` (an alert rule fires on it), in
readiness, on the dashboard and in `paystream status`. Each names the record that blocks, the
database's error and how long the stall has lasted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from paystream.model import PartitionId


@dataclass(frozen=True, slots=True, kw_only=True)
class Blocked:
    """A partition's records waiting behind a batch that failed: since when (monotonic
    seconds), the record that blocks them, and the error (in words safe to log)."""

    since: float
    offset: int
    error: str
    cause: str
    """The error's class and SQLSTATE: a label with few values."""


class Stalls:
    """The batches of this process that are failing, and which of their partitions count as
    stalled. Kept by the consumer, read by the monitor and readiness."""

    def __init__(self, after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.after_s = after_s
        self._clock = clock
        self._failing: dict[int, dict[PartitionId, Blocked]] = {}  # by the batch's number

    def failing(
        self, batch: int, blocked: Mapping[PartitionId, int], error: str, cause: str
    ) -> None:
        """The batch numbered `batch` failed (again): `blocked` holds, per partition, the offset
        of the record that blocks it. A stall lasts from the batch's first failure."""
        now = self._clock()
        known = self._failing.setdefault(batch, {})
        for key, offset in blocked.items():
            since = known[key].since if key in known else now
            known[key] = Blocked(since=since, offset=offset, error=error, cause=cause)

    def cleared(self, batch: int) -> None:
        """The batch is durable (or given up on as the process stops)."""
        self._failing.pop(batch, None)

    def failing_now(self) -> bool:
        """Whether a batch is failing now: the database is away, or refuses its writes (a
        read-only server answers every read all the same)."""
        return bool(self._failing)

    def stalled(self) -> dict[PartitionId, Blocked]:
        """Each stalled partition's longest-waiting blocker."""
        horizon = self._clock() - self.after_s
        found: dict[PartitionId, Blocked] = {}
        for blocked in self._failing.values():
            for key, each in blocked.items():
                if each.since <= horizon and (key not in found or each.since < found[key].since):
                    found[key] = each
        return found

    def export(self, gauge: Gauge) -> None:
        """Set the gauge to the stalls of now: one series per stalled partition."""
        now = self._clock()
        gauge.clear()
        for (topic, partition), each in self.stalled().items():
            labels = (topic, str(partition), str(each.offset), each.cause)
            gauge.labels(*labels).set(now - each.since)

    def as_json(self) -> list[dict[str, Any]]:
        """The stalls, for the dashboard and `paystream status`."""
        now = self._clock()
        return [
            {
                "partition": f"{topic}/{partition}",
                "record": f"{topic}/{partition}@{each.offset}",
                "error": each.error,
                "seconds": round(now - each.since, 1),
            }
            for (topic, partition), each in sorted(self.stalled().items())
        ]
