"""Where a partition is read from, and what this instance knows it made durable there. Pure: no
I/O (the consumer reads the facts and acts on the answers).

The database owns the position: each batch's transaction records the span of offsets it made
durable (store.record_done), and a partition's recorded position is the end of the contiguous
done prefix (store.fold_positions). On every assignment that position decides where the consumer
reads (it seeks where the group's committed offset, read from at once, disagrees); the group's
offsets are still committed for lag tooling but trusted only by a database that has recorded no
position yet (an upgrade). The client never resets a position by itself
(auto.offset.reset=error): `resolve` chooses every start.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from paystream.model import PartitionId

log = logging.getLogger(__name__)


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
    """The wanted position is past the log end: a leader election truncated it (or the topic
    was created again before its id was recorded). Read what is there from its start."""
    recreated: bool = False
    """The recorded position is in another log: the topic was deleted and created again (its id
    changed). Read the new log from its start."""
    gone: tuple[int, int] | None = None
    """With `recreated`: first and last offsets of the deleted log that were never processed,
    as far as it was seen to reach; kept as a gap."""


def resolve(
    recorded: int | None,
    committed: int | None,
    low: int,
    high: int,
    *,
    other_log: bool = False,
    seen_end: int | None = None,
) -> Start:
    """The start of a partition whose log holds offsets `low` … `high` - 1, given the database's
    `recorded` position and the group's `committed` offset (None: there is none). `other_log`:
    the position was recorded in a log deleted since, which was last seen to end at `seen_end`
    (None: not known)."""
    if recorded is not None and other_log:
        gone = (recorded, seen_end - 1) if seen_end is not None and seen_end > recorded else None
        return Start(offset=low, source=Source.RECORDED, recreated=True, gone=gone)
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
        self._finished: dict[int, tuple[Mapping[PartitionId, int], Mapping[PartitionId, int]]] = {}
        self._epochs: dict[PartitionId, int] = {}
        self._running: Counter[tuple[PartitionId, int]] = Counter()  # batches begun, not finished
        self.durable: dict[PartitionId, int] = {}

    def restart(self, key: PartitionId, offset: int) -> None:
        """Reading `key` starts again at `offset`."""
        self._epochs[key] = self._epochs.get(key, 0) + 1
        self.durable[key] = offset

    def epochs(self, keys: Iterable[PartitionId]) -> dict[PartitionId, int]:
        return {key: self._epochs.get(key, 0) for key in keys}

    def settled(self, key: PartitionId) -> bool:
        """Whether no batch fetched before reading `key` last restarted is still running: until
        then the database may lag behind `durable` there without having gone back."""
        current = self._epochs.get(key, 0)
        return not any(
            n for (k, epoch), n in self._running.items() if k == key and epoch != current
        )

    def begin(self, epochs: Mapping[PartitionId, int]) -> int:
        """A batch fetched in `epochs` starts; its sequence number."""
        self._running.update(epochs.items())
        self._next += 1
        return self._next - 1

    def finish(
        self, seq: int, ends: Mapping[PartitionId, int], epochs: Mapping[PartitionId, int]
    ) -> None:
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


class Commits:
    """What to commit to Kafka, and when. The group's committed offsets are no longer what a
    restart trusts (the database's positions are), but lag tooling reads them, so they follow
    what this instance made durable (Progress.durable), under four rules:

    1. only partitions owned now: a new owner re-reads from its own start;
    2. only beyond the group's committed offset: never backwards, even when another owner got
       further meanwhile;
    3. one commit on its way at a time: the client sends a commit again when its connection
       breaks, so two on their way can land out of order. They did when the group's coordinator
       was killed: commits sent just before were answered twelve seconds later, after newer
       ones, and moved the group's offsets back. One that gets no answer within `answer_s`
       counts as failed (the client answers each, a timeout included, well before);
    4. after a commit that failed or could not be sent (a rebalance, the broker away), the next
       waits `retry_s` on `clock`, whatever asks for it — except the last one, on the way out.
    """

    def __init__(
        self,
        *,
        retry_s: float = 1.0,
        answer_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._retry_s = retry_s
        self._answer_s = answer_s
        self._clock = clock
        self._retry_at = 0.0
        self.owned: set[PartitionId] = set()
        self._committed: dict[
            PartitionId, int
        ] = {}  # the group's, read on assignment, raised by commits
        self._committing: dict[PartitionId, int] = {}  # the commit on its way
        self._sent_at = 0.0

    def assigned(
        self, keys: Iterable[PartitionId], committed: Mapping[PartitionId, int] | None
    ) -> None:
        """Partitions given to this instance, with the group's committed offset of each (None:
        it could not be read; absent: there is none)."""
        keys = set(keys)
        self.owned |= keys
        if committed is not None:
            for key in keys:
                if key in committed:
                    self._committed[key] = committed[key]
                else:
                    self._committed.pop(key, None)

    def revoked(self, keys: Iterable[PartitionId]) -> None:
        for key in keys:
            self.owned.discard(key)
            self._committing.pop(key, None)

    def committed(self, key: PartitionId) -> int | None:
        """The group's committed offset of a partition, as last known."""
        return self._committed.get(key)

    def answered(self, done: Mapping[PartitionId, int], failed: Mapping[PartitionId, int]) -> None:
        """The brokers' answer to a commit sent."""
        for key, offset in {**done, **failed}.items():
            if self._committing.get(key, -1) <= offset:
                self._committing.pop(key, None)
        for key, offset in done.items():
            self._committed[key] = max(self._committed.get(key, -1), offset)
        if failed:  # sent again after the pause while the partitions are ours (rule 4)
            self._retry_at = self._clock() + self._retry_s

    def ahead(self, durable: Mapping[PartitionId, int]) -> dict[PartitionId, int]:
        """Rules 1 and 2: what of `durable` a commit would move forward."""
        return {
            key: offset
            for key, offset in durable.items()
            if key in self.owned and offset > self._committed.get(key, -1)
        }

    @property
    def on_its_way(self) -> bool:
        """Whether a commit sent waits for its answer."""
        return bool(self._committing)

    def due(
        self, durable: Mapping[PartitionId, int], *, last: bool = False
    ) -> dict[PartitionId, int]:
        """What to send now: nothing while a commit is on its way (rule 3) or, unless it is
        the `last`, during the pause after a failure (rule 4); else `ahead`."""
        now = self._clock()
        if self._committing:
            if now - self._sent_at < self._answer_s:
                return {}
            log.warning(
                "an offset commit got no answer in %.0f s; counted as failed", now - self._sent_at
            )
            self._committing.clear()
            self._retry_at = now + self._retry_s
        if not last and now < self._retry_at:
            return {}
        return self.ahead(durable)

    def sending(self, offsets: Mapping[PartitionId, int]) -> None:
        """A commit of `offsets` is about to be sent (its answer may come before the call ends)."""
        self._committing.update(offsets)
        self._sent_at = self._clock()

    def not_sent(self, offsets: Mapping[PartitionId, int]) -> None:
        """The commit could not be sent (the assignment changed, the client refused)."""
        for key, offset in offsets.items():
            if self._committing.get(key) == offset:
                del self._committing[key]
        self._retry_at = self._clock() + self._retry_s
