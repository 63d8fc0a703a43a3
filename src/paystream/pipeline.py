"""One batch of Kafka records: load → decide → write, the rules in `paystream.rules`.

Decode; read which online records are done and which payments are stored; ask the gateway about
the rest, concurrently; then one transaction decides and writes every outcome. It is the only
place outcomes become durable, and the caller commits Kafka offsets only after it. Inside it, the
batch holds its partitions for its writer (`store.hold_partitions`): the batches of one owner
run side by side, while two owners of a partition (they overlap during a rebalance) take turns.
The re-check of which records already have an outcome then makes a redelivered record a no-op.
Every write is idempotent, so order between batches does not matter.

Records read from Kafka and kept records being replayed differ only in how their outcomes are
written (`FirstSight`, `Replay`).

A write the database refuses is judged by what the database does, never by the error's class
(`_judge`): if it takes a record like the batch's (a probe, rolled back) or has taken others
meanwhile, the refused record is isolated and kept; if not, the database refuses records like
these, and the batch waits (DatabaseRefusing). The batch is prepared once (`prepare`: decoded, and
the gateway asked) and only its `write` is retried.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from uuid import UUID, uuid4

import psycopg
import psycopg_pool

from paystream import rules, store, tracing
from paystream.codec import decode
from paystream.errors import DatabaseRefusing, DatabaseUnavailable, named
from paystream.gateway import Gateway
from paystream.metrics import DATABASE_SECONDS, KEPT, REDELIVERED, STORED
from paystream.model import Kept, PartitionId, Payment, PaymentType, Reason, Record, RecordId
from paystream.sealing import KeptCipher
from paystream.stamping import Stamping

log = logging.getLogger(__name__)

_LOAD_SECONDS = DATABASE_SECONDS.labels(step="load")
_WRITE_SECONDS = DATABASE_SECONDS.labels(step="write")


@dataclass(slots=True)
class BatchResult:
    stored: int = 0
    kept: int = 0
    redelivered: int = 0
    kept_reasons: dict[Reason, int] = field(default_factory=dict)

    def add(self, other: BatchResult) -> None:
        self.stored += other.stored
        self.kept += other.kept
        self.redelivered += other.redelivered
        for reason, count in other.kept_reasons.items():
            self.kept_reasons[reason] = self.kept_reasons.get(reason, 0) + count


class Outcomes(Protocol):
    """How a batch's kept records (and, for a replay, its newly stored ones) are written."""

    @property
    def kept_is_done(self) -> bool:
        """Whether a record found kept already has its outcome (not so for a kept one replayed)."""

    async def write(self, conn: store.Conn, stored: list[RecordId], kept: list[Kept]) -> None:
        """`stored`: the records whose payments this batch stored; `kept`: what it keeps."""

    async def stamp(self, conn: store.Conn, latest: Mapping[int, datetime]) -> None:
        """The accounts' stamps (`store.Inserted.latest`): left due, or applied at once."""


@dataclass(frozen=True, slots=True)
class FirstSight:
    """Records read from Kafka: the kept ones are written, their raw bytes sealed with a cipher."""

    cipher: KeptCipher | None
    kept_is_done: bool = True

    async def write(self, conn: store.Conn, stored: list[RecordId], kept: list[Kept]) -> None:
        await store.insert_kept(conn, kept, self.cipher)

    async def stamp(self, conn: store.Conn, latest: Mapping[int, datetime]) -> None:
        """Left due for a stamping pass (paystream.stamping): batches lock no account row."""
        await store.leave_stamps_due(conn, latest)


@dataclass(frozen=True, slots=True)
class Replay:
    """Kept records re-driven: resolved when their payment is stored now, updated when kept
    again (re-reported if the reason changed)."""

    kept_is_done: bool = False

    async def write(self, conn: store.Conn, stored: list[RecordId], kept: list[Kept]) -> None:
        await store.resolve_kept(conn, stored)
        await store.update_kept(conn, kept)

    async def stamp(self, conn: store.Conn, latest: Mapping[int, datetime]) -> None:
        """Applied at once: a kept record is resolved with its account stamped. Replays are
        few, and lock accounts in account order, as passes do."""
        await store.stamp_accounts(conn, latest)


class _Trial:
    """One write of a batch: what the database had been seen to take when it began (a copy of
    the pipeline's `_took`), and the kinds of record it was shown to take since."""

    __slots__ = ("accepts", "took")

    def __init__(self, took: Counter[str]) -> None:
        self.took = took.copy()
        self.accepts: set[str] = set()


class Pipeline:
    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool,
        gateway: Gateway,
        topic_types: dict[str, PaymentType],
        *,
        on_kept: Callable[[], None] = lambda: None,
        cipher: KeptCipher | None = None,
        stamp_interval_s: float = 0.25,
    ) -> None:
        """With a `cipher`, kept records' raw bytes are sealed before they are written (and a
        replay opens them with it). `stamp_interval_s`: the least time between two stamping
        passes (`stamps`)."""
        self._pool = pool
        self.stamps = Stamping(pool, stamp_interval_s)
        """The passes that apply the account stamps batches leave due: a batch is complete
        once `stamps.applied()` returns after it."""
        self.cipher = cipher
        self._gateway = gateway
        self._topic_types = topic_types
        self._on_kept = on_kept
        self._writer = uuid4()
        self._first_sight = FirstSight(cipher)
        self.tally = BatchResult()
        """Everything this pipeline decided since it was made: batches and replays."""
        self._took: Counter[str] = Counter()
        """Transactions that stored payments, and that kept records: what shows the database
        takes records like a refused one (`_judge`)."""

    async def prepare(self, records: Sequence[Record]) -> rules.Triaged:
        """Decode the records and sort them out, the gateway asked about the online ones: what
        `write` makes durable. Raises DatabaseUnavailable only before the gateway is asked.

        A batch is prepared once and written until the database takes it: the gateway's
        verdicts wait in the result, so that a database that refuses writes for a while never
        has the third party asked again about the same payments."""
        return await self._prepare(records, self._first_sight)

    async def write(
        self,
        triaged: rules.Triaged,
        *,
        writer: UUID | None = None,
        spans: Mapping[PartitionId, store.Span] | None = None,
    ) -> BatchResult:
        """Make every prepared record's outcome durable; the accounts' stamps are left due, for a
        stamping pass (`stamps.applied()`). Raises DatabaseUnavailable (retry the write):
        DatabaseRefusing when the database answers but refuses records like these too.

        `writer` names who decides these records: the consumer passes one per assignment of its
        partitions; without it, this pipeline's own is used. `spans`: the offsets the records
        cover in each partition, recorded done with their outcomes (store.record_done).
        """
        return await self._written(triaged, writer or self._writer, self._first_sight, spans or {})

    async def process(
        self,
        records: Sequence[Record],
        *,
        writer: UUID | None = None,
        spans: Mapping[PartitionId, store.Span] | None = None,
    ) -> BatchResult:
        """`prepare`, then `write`."""
        return await self.write(await self.prepare(records), writer=writer, spans=spans)

    async def replay(self, records: Sequence[Record]) -> BatchResult:
        """Re-drive kept records: their kept rows are updated, or resolved when the payment is
        stored now, and the accounts stamped. Raises DatabaseUnavailable."""
        outcomes = Replay()
        return await self._written(
            await self._prepare(records, outcomes), self._writer, outcomes, {}
        )

    async def _prepare(self, records: Sequence[Record], outcomes: Outcomes) -> rules.Triaged:
        with tracing.span("paystream.decode"):
            decoded = [(r, decode(r.value, self._topic_types[r.id.topic])) for r in records]
        return await self._triage(decoded, outcomes)

    async def _written(
        self,
        triaged: rules.Triaged,
        writer: UUID,
        outcomes: Outcomes,
        spans: Mapping[PartitionId, store.Span],
    ) -> BatchResult:
        started = time.perf_counter()
        try:
            with tracing.span("paystream.transaction"):
                result = await self._write(triaged, writer, outcomes, spans, _Trial(self._took))
        except store.DATABASE_ERRORS as exc:
            if store.away(exc):
                raise DatabaseUnavailable.caused_by(exc) from exc
            # No record's write: recording the batch's spans done, once its parts were durable.
            raise DatabaseRefusing(
                f"the database refuses recording the batch done: {store.refusal(exc)}",
                cause=named(exc),
            ) from exc
        _WRITE_SECONDS.observe(time.perf_counter() - started)
        result.redelivered += triaged.redelivered
        REDELIVERED.inc(result.redelivered)
        self.tally.add(result)
        if result.kept:
            self._on_kept()
        return result

    async def _triage(self, decoded: list[rules.Decoded], outcomes: Outcomes) -> rules.Triaged:
        """Load what decides whether the gateway is asked, ask it, and sort the batch out."""
        online = [
            (r, p)
            for r, p in decoded
            if isinstance(p, Payment) and p.payment_type is PaymentType.ONLINE
        ]
        done: set[RecordId] = set()
        stored: set[str] = set()
        if online:
            started = time.perf_counter()
            try:
                done, stored = await self._load(online, outcomes)
            except store.DATABASE_ERRORS as exc:
                if store.away(exc):
                    raise DatabaseUnavailable.caused_by(exc) from exc
                # It answered, and refused the reading (a value it cannot compare, a policy, a
                # lock): knowing nothing is safe. The gateway is asked again (same
                # Idempotency-Key), the transaction's own re-check still tells redeliveries
                # apart, and a record the database refuses is isolated there.
                log.warning(
                    "reading what is done hit %s (SQLSTATE %s); validating the batch anew",
                    type(exc).__name__,
                    getattr(exc, "sqlstate", None),
                )
            _LOAD_SECONDS.observe(time.perf_counter() - started)
        # The connection went back to the pool before the (possibly slow) gateway calls.
        asks = rules.needs_gateway(decoded, done=done, stored=stored)
        with tracing.span("paystream.validate", attributes={"paystream.online": len(asks)}):
            verdicts = await self._validate(asks)
        return rules.triage(decoded, done=done, stored=stored, verdicts=verdicts)

    async def _load(
        self, online: list[tuple[Record, Payment]], outcomes: Outcomes
    ) -> tuple[set[RecordId], set[str]]:
        """Which online records are done, and which of the others' payments are stored."""
        with tracing.span("paystream.load"):
            async with self._pool.connection() as conn:
                await conn.set_autocommit(True)
                done = await store.processed_records(
                    conn, [r.id for r, _ in online], kept=outcomes.kept_is_done
                )
                stored = await store.stored_payment_ids(
                    conn, [p.payment_id for r, p in online if r.id not in done]
                )
        return done, stored

    async def _validate(self, asks: list[tuple[Record, Payment]]) -> dict[Payment, rules.Verdict]:
        """Ask the gateway once per distinct payment, up to its in-flight limit."""
        if not asks:
            return {}
        distinct: dict[Payment, Record] = {}
        for record, payment in asks:
            distinct.setdefault(payment, record)
        answers = await self._gateway.validate_all(
            [(p.payment_id, r.value or b"") for p, r in distinct.items()],
            traceparents=[r.traceparent for r in distinct.values()],
        )
        return dict(zip(distinct, answers, strict=True))

    async def _write(
        self,
        triaged: rules.Triaged,
        writer: UUID,
        outcomes: Outcomes,
        spans: Mapping[PartitionId, store.Span],
        trial: _Trial,
    ) -> BatchResult:
        """One transaction, which records `spans` done too. When the database refuses it, and
        takes records like these (`_judge`), split the batch until the refused record is
        isolated, and keep it; the spans are recorded once every part is durable."""
        try:
            result = await self._transaction(triaged, writer, outcomes, spans)
        except psycopg.Error as exc:
            if store.away(exc):
                raise
            await self._judge(exc, triaged, trial)
            items = triaged.items()
            if len(items) == 1:
                result = await self._keep_refused(items[0], exc, writer, outcomes)
            else:
                log.warning(
                    "batch of %d hit %s (SQLSTATE %s); isolating the record",
                    len(items),
                    type(exc).__name__,
                    exc.sqlstate,
                )
                middle = len(items) // 2
                result = BatchResult()
                for part in (items[:middle], items[middle:]):
                    got = await self._write(rules.Triaged.of(part), writer, outcomes, {}, trial)
                    result.add(got)
            if spans:
                async with self._pool.connection() as conn, conn.transaction():
                    await store.record_done(conn, spans)
            return result
        self._took.update(payments=result.stored > 0, kept=result.kept > 0)
        return result

    async def _judge(self, exc: psycopg.Error, triaged: rules.Triaged, trial: _Trial) -> None:
        """Return when the refusal is the data's: the database takes records like these, as
        shown by other batches' writes since this one began (`_took`), or by a probe. Raise
        DatabaseRefusing when it refuses them too: a read-only server, a permission revoked, a
        trigger on every payment, a full disk. What the error is called decides nothing."""
        for kind, items in (("payments", triaged.candidates), ("kept", triaged.kept)):
            if not items or kind in trial.accepts:
                continue
            if self._took[kind] > trial.took[kind]:
                trial.accepts.add(kind)
                continue
            failure = await self._probe(items, triaged)
            if failure is not None:
                await store.leave_refusing_server(self._pool, failure)
                raise DatabaseRefusing(
                    f"the database refuses {kind} like this batch's: {store.refusal(failure)}",
                    cause=named(failure),
                ) from exc
            trial.accepts.add(kind)

    async def _probe(
        self, items: Sequence[rules.Candidate] | Sequence[Kept], triaged: rules.Triaged
    ) -> psycopg.Error | None:
        """Write, and roll back, a record like the first of `items` whose own values can refuse
        nothing (a fresh id, an amount of 1, no card, no raw bytes; for a payment, one of an
        account that exists, so that it is stored rather than kept) through the batch's own
        statements: the error the database gives it, or None if it takes it."""
        partitions = {(r.topic, r.partition) for r in triaged.records()}
        try:
            async with (
                self._pool.connection() as conn,
                conn.transaction(force_rollback=True),
            ):
                like: rules.Candidate | Kept | None = items[0]
                if isinstance(like, rules.Candidate):
                    known = await store.existing_accounts(
                        conn, [c.payment.account_id for c in triaged.candidates]
                    )
                    like = next(
                        (c for c in triaged.candidates if c.payment.account_id in known), None
                    )
                if like is None:
                    return None  # no payment of the batch can be stored: none is refused for it
                await store.hold_partitions(conn, uuid4(), partitions)
                canary = rules.Triaged.of([rules.canary(like)])
                await self._write_in(conn, canary, self._first_sight, {})
        except psycopg.Error as exc:
            if store.away(exc):
                raise
            return exc
        return None

    async def _keep_refused(
        self, item: rules.Candidate | Kept, exc: psycopg.Error, writer: UUID, outcomes: Outcomes
    ) -> BatchResult:
        """Keep a single record the database refused, described by the database's own words.
        Should keeping it be refused too, keep it bare: its coordinates, its raw bytes and a fixed
        description. Should even that be refused, raise DatabaseRefusing: intake at its
        partition stalls, with the alarm (paystream.stalls), and nothing is skipped."""
        card = item.payment.credit_card if isinstance(item, rules.Candidate) else None
        kept = rules.rejected(item, store.refusal(exc, card))
        try:
            return await self._transaction(rules.Triaged(kept=[kept]), writer, outcomes, {})
        except psycopg.Error as again:
            if store.away(again):
                raise
            log.error(
                "the database refused keeping %s too (%s, SQLSTATE %s); keeping it bare",
                kept.record.id,
                type(again).__name__,
                again.sqlstate,
            )
        bare = rules.bare(kept)
        try:
            return await self._transaction(rules.Triaged(kept=[bare]), writer, outcomes, {})
        except psycopg.Error as last:
            if store.away(last):
                raise
            at = bare.record.id
            raise DatabaseRefusing(
                f"the database refuses even the bare keep of record "
                f"{at.topic}/{at.partition}@{at.offset}: {store.refusal(last)}",
                cause=named(last),
                record=at,
            ) from last

    async def _transaction(
        self,
        triaged: rules.Triaged,
        writer: UUID,
        outcomes: Outcomes,
        spans: Mapping[PartitionId, store.Span],
    ) -> BatchResult:
        """`_write_in` in one transaction that holds the batch's partitions for `writer`, after
        taking over those another writer had (a rebalance; replay and the consumer in turn)."""
        partitions = {(r.topic, r.partition) for r in triaged.records()}
        async with self._pool.connection() as conn:
            while True:
                async with conn.transaction():
                    others = await store.hold_partitions(conn, writer, partitions)
                    if not others:
                        return await self._write_in(conn, triaged, outcomes, spans)
                log.info("taking over the writing of %s", sorted(others))
                async with conn.transaction():
                    await store.take_partitions(conn, writer, others)

    async def _write_in(
        self,
        conn: store.Conn,
        triaged: rules.Triaged,
        outcomes: Outcomes,
        spans: Mapping[PartitionId, store.Span],
    ) -> BatchResult:
        # Authoritative re-check, the partitions held: another owner may have finished these. A
        # candidate that stored its payment before shows up below as a conflict from itself.
        done = await store.processed_records(
            conn,
            [c.record.id for c in triaged.candidates] + [k.record.id for k in triaged.kept],
            stored_as={k.record.id: k.payment_id for k in triaged.kept if k.payment_id is not None},
            kept=outcomes.kept_is_done,
        )
        accounts = await store.existing_accounts(
            conn, [c.payment.account_id for c in triaged.candidates if c.record.id not in done]
        )
        decided = rules.decide(triaged, done=done, accounts=accounts)
        inserted = await store.insert_payments(
            conn, [c.payment for c in decided.store], [c.record.id for c in decided.store]
        )
        stored, settling = decided.store, decided.settle
        if inserted.skipped:  # stored meanwhile by another batch, or by an earlier record
            stored = [c for c in decided.store if c.payment.payment_id not in inserted.skipped]
            settling = [c for c in decided.store if c.payment.payment_id in inserted.skipped]
            settling += decided.settle
        existing = await store.existing_payments(conn, (c.payment.payment_id for c in settling))
        kept, redelivered = decided.kept, decided.redelivered
        for candidate in settling:
            settled = rules.settle(candidate, existing.get(candidate.payment.payment_id))
            if settled is None:
                redelivered += 1
            else:
                kept.append(settled)
        await outcomes.write(conn, [c.record.id for c in stored], kept)
        await store.record_done(conn, spans)
        await outcomes.stamp(conn, inserted.latest)
        return _counted(stored, kept, redelivered)


def _counted(stored: list[rules.Candidate], kept: list[Kept], redelivered: int) -> BatchResult:
    """The batch's result, its metrics counted per batch: an update per record (≈ 1.3 µs each)
    took ≈ 5 ms of the event loop per batch of 4000."""
    for payment_type, count in Counter(c.payment.payment_type for c in stored).items():
        STORED.labels(payment_type=payment_type.value).inc(count)
    reasons = dict(Counter(k.reason for k in kept))
    for reason, count in reasons.items():
        KEPT.labels(reason=reason.value).inc(count)
    return BatchResult(
        stored=len(stored), kept=len(kept), redelivered=redelivered, kept_reasons=reasons
    )
