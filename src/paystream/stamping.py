"""Account stamps: each batch leaves its stamps due in its own transaction, and stamping passes
apply them, several batches' at once.

A batch's transaction stores its payments and leaves, per account, the newest created_on it
stored due (`store.leave_stamps_due`); it locks no account row. A pass takes every stamp due
and applies it (`store.apply_stamps_due`), one pass at a time across instances. The consumer
commits a batch's Kafka offsets only once a pass that began after the batch's transaction has
ended, so offsets at the end of the topics mean the accounts are stamped too. Stamps left due by
an instance that stopped before its pass are applied by the next pass of any instance: every
instance runs one before it places partitions it was given (those of an instance that stopped
among them). (A replay stamps its few accounts in its own transaction: pipeline.Replay.) A pass
waits out the interval only while other batches may share it: the consumer's last batch in
flight, and the pass before placing partitions, have it begin at once.

Stamping inside each batch's transaction locked the same account rows in every batch: with four
batches in flight (two instances) they waited for each other, and PostgreSQL spent a fifth to a
third more per payment than with one instance (BENCHMARKS.md, round 13).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import psycopg_pool

from paystream import store
from paystream.errors import DatabaseUnavailable
from paystream.metrics import STAMP_PASSES


class Stamping:
    """The passes of one process: at most one at a time, and at most one every `interval_s`,
    so that the batches finishing meanwhile share the next one, unless nothing else is on its
    way to share it."""

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool, interval_s: float) -> None:
        self._pool = pool
        self._interval_s = interval_s
        self._lock = asyncio.Lock()
        self._asked = 0  # calls of `applied` so far
        self._covered = 0  # every call up to this one has seen a pass begin after it
        self._last_began = -float("inf")
        self._at_once = asyncio.Event()  # a call asked for a pass at once: no more waiting

    async def applied(self, *, at_once: bool = False) -> None:
        """Return once a pass that began after this call has ended: every stamp left due by a
        transaction that committed before the call is applied. Raises DatabaseUnavailable.

        `at_once`: the caller gains nothing by waiting out the interval (no other batch is on
        its way to share the pass, or partitions wait to be read until it ends); the pass
        begins at once, cutting short a wait under way, rather than hold the accounts unstamped
        and the offsets uncommitted."""
        self._asked += 1
        ticket = self._asked
        if at_once:
            self._at_once.set()
        async with self._lock:  # waiters take turns in the order they came
            if self._covered >= ticket:
                return
            wait_s = self._last_began + self._interval_s - time.monotonic()
            if wait_s > 0:
                # The batches finishing meanwhile join this pass.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._at_once.wait(), wait_s)
            self._at_once.clear()  # spent on this pass; a later call at once sets it again
            began, self._last_began = self._asked, time.monotonic()
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    await store.apply_stamps_due(conn)
            except store.DATABASE_ERRORS as exc:
                # Away, or refusing the stamps (a read-only server, a lock, a trigger on
                # accounts): either way the pass is tried again, and the batches wait for it.
                raise DatabaseUnavailable.caused_by(exc) from exc
            STAMP_PASSES.inc()
            self._covered = began
