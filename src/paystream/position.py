"""Where a partition is read from, and what this instance knows it made durable there. Pure: no
I/O (the consumer reads the facts and acts on the answers).

The database owns the position: each batch's transaction records the span of offsets it made
durable (store.record_done), and a partition's recorded position is the end of the contiguous
done prefix (store.fold_positions). On every assignment the consumer reads from there, not from
the group's committed offset, which is still committed for lag tooling but trusted only by a
database that has recorded no position yet (an upgrade). The client never resets a position by
itself (auto.offset.reset=error): `resolve` chooses every start.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

Key = tuple[str, int]
"""(topic, partition)."""


class Source(StrEnum):
    """What a start position was read from."""

    RECORDED = "recorded"  # the database's position
    COMMITTED = "committed"  # the group's committed offset: no position recorded yet
    EARLIEST = "earliest"  # neither: a new group misses nothing


@dataclass(frozen=True, slots=True, kw_only=True)
class Start:
    """Where to read a partition from, and what that says."""

    offset: int
    source: Source
    expired: tuple[int, int] | None = None
    """First and last offsets that were wanted but left the log unread (retention, deleted
    records): kept as a gap, then reading goes on from the log start."""
    behind_by: int = 0
    """How far the recorded position is behind the group's committed offset (a database
    restored from a backup, or failed over with commits missing): that many records read again."""
    beyond_end: bool = False
    """The wanted position is past the log end: the topic was deleted and created again, or a
    leader election truncated it. Read what is there from its start."""


def resolve(recorded: int | None, committed: int | None, low: int, high: int) -> Start:
    """The start of a partition whose log holds offsets `low` … `high` - 1, given the database's
    `recorded` position and the group's `committed` offset (None: there is none)."""
    if recorded is not None:
        wanted, source = recorded, Source.RECORDED
    elif committed is not None:
        wanted, source = committed, Source.COMMITTED
    else:
        wanted, source = low, Source.EARLIEST
    behind_by = max(0, committed - recorded) if recorded is not None and committed else 0
    if wanted > high:
        return Start(offset=low, source=source, beyond_end=True)
    if wanted < low:
        return Start(offset=low, source=source, expired=(wanted, low - 1), behind_by=behind_by)
    return Start(offset=wanted, source=source, behind_by=behind_by)


class Progress:
    """What this instance knows it made durable, partition by partition: the end of the prefix
    of its batches that finished, counted from where it started reading.

    Batches carry the epoch of each partition they were fetched in; a partition's epoch moves on
    each time reading restarts there (an assignment, a rewind), and a batch of an older epoch
    then no longer moves its offset: what it did is durable, but it is not what this instance
    now reads from."""

    def __init__(self) -> None:
        self._next = 0
        self._oldest_unfinished = 0
        # A finished batch waiting for an older one keeps only its offsets, not its records.
        self._finished: dict[int, tuple[Mapping[Key, int], Mapping[Key, int]]] = {}
        self._epochs: dict[Key, int] = {}
        self._running: Counter[tuple[Key, int]] = Counter()  # batches begun, not finished
        self.durable: dict[Key, int] = {}

    def restart(self, key: Key, offset: int) -> None:
        """Reading `key` starts again at `offset`."""
        self._epochs[key] = self._epochs.get(key, 0) + 1
        self.durable[key] = offset

    def epochs(self, keys: Iterable[Key]) -> dict[Key, int]:
        return {key: self._epochs.get(key, 0) for key in keys}

    def settled(self, key: Key) -> bool:
        """Whether no batch fetched before reading `key` last restarted is still running: until
        then the database may lag behind `durable` there without having gone back."""
        current = self._epochs.get(key, 0)
        return not any(
            n for (k, epoch), n in self._running.items() if k == key and epoch != current
        )

    def begin(self, epochs: Mapping[Key, int]) -> int:
        """A batch fetched in `epochs` starts; its sequence number."""
        self._running.update(epochs.items())
        self._next += 1
        return self._next - 1

    def finish(self, seq: int, ends: Mapping[Key, int], epochs: Mapping[Key, int]) -> None:
        """Batch `seq`, fetched in `epochs`, made durable each partition up to its end."""
        self._running.subtract(epochs.items())
        self._running = +self._running  # drop the zeros
        self._finished[seq] = (epochs, ends)
        while self._oldest_unfinished in self._finished:
            fetched_in, offsets = self._finished.pop(self._oldest_unfinished)
            for key, offset in offsets.items():
                if fetched_in.get(key) == self._epochs.get(key, 0):
                    self.durable[key] = max(self.durable.get(key, 0), offset)
            self._oldest_unfinished += 1
