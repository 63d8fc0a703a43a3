"""Where each partition's records are done (positions.sql): the database owns the stream
position. Every function takes a connection; the caller holds the transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from paystream.model import PartitionId, Reason
from paystream.store import documents
from paystream.store.queries import Conn, query

Span = tuple[int, int]
"""[first offset, end offset): a batch's records of one partition, and the offsets between them
that hold no record (transaction markers, compacted records)."""


async def record_done(conn: Conn, spans: Mapping[PartitionId, Span]) -> None:
    """These spans have their outcomes durable (in the same transaction as those outcomes)."""
    if spans:
        await conn.execute(query("record_done"), {"spans": documents.spans(spans)})


async def fold_positions(
    conn: Conn, keys: Iterable[PartitionId], *, caps: Mapping[PartitionId, int] | None = None
) -> dict[PartitionId, int]:
    """The recorded position of each of these partitions that has one: its stored position,
    carried over every done span that joins on, and stored so. Partitions with none are absent.
    Locks their positions until the transaction ends. `caps`: a partition's spans that end past
    its cap are not carried over (they may be another log's)."""
    caps = caps or {}
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    cursor = await conn.execute(
        query("lock_positions"), {"partitions": documents.partitions(wanted)}
    )
    stored: dict[PartitionId, int] = {(t, p): o for t, p, o in await cursor.fetchall()}
    if not stored:
        return {}
    cursor = await conn.execute(query("ranges_beyond"), {"positions": documents.positions(stored)})
    folded = dict(stored)
    for topic, partition, first, end in await cursor.fetchall():
        key = (topic, partition)
        if first <= folded[key] < end <= caps.get(key, end):  # spans come in order: the
            folded[key] = end  # first one that leaves a hole stops the carrying
    moved = {key: offset for key, offset in folded.items() if offset > stored[key]}
    await move_positions(conn, moved)
    return folded


async def move_positions(
    conn: Conn, positions: Mapping[PartitionId, int], *, overwrite: bool = False
) -> None:
    """Set these positions, dropping the spans they cover: forward only, unless `overwrite`
    (a partition to be read again from an earlier offset, all its spans dropped)."""
    if positions:
        await conn.execute(
            query("move_positions"),
            {"positions": documents.positions(positions), "overwrite": overwrite},
        )


async def start_positions(conn: Conn, positions: Mapping[PartitionId, int]) -> None:
    """Give a position to each of these partitions that has none yet."""
    if positions:
        await conn.execute(query("start_positions"), {"positions": documents.positions(positions)})


class Log(NamedTuple):
    """A position as recorded, and the log it belongs to (None: not known)."""

    next_offset: int
    topic_id: str | None
    seen_end: int | None
    """How far the log was seen to reach."""


async def position_logs(conn: Conn, keys: Iterable[PartitionId]) -> dict[PartitionId, Log]:
    """The position of each of these partitions that has one, as recorded (not folded), with
    its log."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    cursor = await conn.execute(
        query("position_logs"), {"partitions": documents.partitions(wanted)}
    )
    return {(t, p): Log(o, i, e) for t, p, o, i, e in await cursor.fetchall()}


async def mark_logs(conn: Conn, marks: Mapping[PartitionId, tuple[str | None, int | None]]) -> None:
    """Record positions' logs: a topic id given replaces the position's (a seen end starts
    afresh with another id); a seen end only moves forward within one log."""
    if marks:
        await conn.execute(query("mark_logs"), {"logs": documents.logs(marks)})


async def keep_gap(
    conn: Conn, key: PartitionId, first: int, last: int, *, recreated: bool = False
) -> None:
    """Records `first`…`last` of a partition left Kafka unread: keep the gap (reported once).
    `recreated`: they were records of a log deleted with its topic (created again since)."""
    count = last - first + 1
    records = f"{count} record{'s' if count != 1 else ''}"
    what = f"{records} of {key[0]}/{key[1]} (offsets {first} to {last})"
    if recreated:
        description = (
            f"{what} were in a log deleted with its topic (the topic was created again) before "
            "they were processed; records past the last end seen may be gone too"
        )
    else:
        description = (
            f"{what} left Kafka unread (retention or deleted records) before they were processed"
        )
    await conn.execute(
        query("keep_gap"),
        {
            "topic": key[0],
            "partition": key[1],
            "first": first,
            "last": last,
            "kafka_ts": -2 if recreated else -1,
            "reason": (Reason.TOPIC_RECREATED if recreated else Reason.EXPIRED).value,
            "description": description,
        },
    )
