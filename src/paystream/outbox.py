"""Relay kept records to the log service: claim, send, mark; retry later with back-off.

Reports are rows of paystream.kept_records, written in the same transaction as the outcome, so a
log-service outage only delays them. A relay claims rows in one short statement (SKIP LOCKED) that
leases them for longer than their sending can take, sends with no transaction open, then marks
them: several instances relay without sending a report twice, no row lock waits on the network,
and a relay that dies mid-way leaves its rows due again when the lease ends (at least once).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from datetime import timedelta

import orjson
import psycopg_pool
from opentelemetry.trace import SpanKind
from pyreqwest.client import Client

from paystream import store, tracing
from paystream.backoff import Backoff, pause
from paystream.errors import ReportFailed, ReportRefused, Unanswered
from paystream.metrics import REPORTS
from paystream.model import ErrorType
from paystream.thirdparty import post

log = logging.getLogger(__name__)

REPORTS_IN_FLIGHT = 32
"""Reports sent at once by one relay: enough to clear a backlog of kept records at the log API's
pace (it answers in milliseconds), few enough not to crowd the gateway's share of the client."""

_MARK_S = 10.0
"""Room in a claim's lease for marking its reports once sent (one short transaction)."""

_FAILING_PAUSE_MAX_S = 10.0
"""The longest pause between rounds while the log service fails: an outage is noticed within
it once over, without a storm of calls into it meanwhile."""

MAX_REFUSALS = 5
"""Refusals of one report (a 4xx about its body) after which it is marked undeliverable: its
back-off has by then given the log service about half a minute to change its mind."""

_NOT_ABOUT_THE_REPORT = frozenset({401, 403, 404, 405, 407, 408, 425, 429})
"""4xx answers that are about us or the service (credentials, a wrong URL, rate limits), not
about one report: they fail the whole round, and no report is ever marked undeliverable by them."""


def _refuses_the_report(status: int) -> bool:
    return 400 <= status < 500 and status not in _NOT_ABOUT_THE_REPORT


class LogClient:
    def __init__(self, client: Client, base_url: str, timeout_s: float) -> None:
        self._client = client
        self._url = base_url.rstrip("/") + "/log"
        self.timeout_s = timeout_s
        self._timeout = timedelta(seconds=timeout_s)

    async def send(
        self,
        payment_id: str | None,
        error_type: ErrorType,
        description: str,
        traceparent: str | None = None,
    ) -> None:
        """Report one error; `traceparent`: the trace the report continues (tracing)."""
        if not tracing.enabled():
            return await self._send(payment_id, error_type, description, {})
        with tracing.span("POST /log", parent=traceparent, kind=SpanKind.CLIENT):
            return await self._send(payment_id, error_type, description, tracing.headers())

    async def _send(
        self,
        payment_id: str | None,
        error_type: ErrorType,
        description: str,
        headers: dict[str, str],
    ) -> None:
        # The statement's model calls the field `error`, its curl example `error_type`: send both.
        body = {
            "payment_id": payment_id,
            "error_type": error_type.value,
            "error": error_type.value,
            "error_description": description,
        }
        try:
            answer = await post(self._client, self._url, orjson.dumps(body), self._timeout, headers)
        except Unanswered as exc:
            raise ReportFailed(f"log service unreachable: {exc}") from exc
        tracing.annotate("http.response.status_code", answer.status)
        if 200 <= answer.status < 300:
            return
        if _refuses_the_report(answer.status):
            raise ReportRefused(f"log service refused the report ({answer.describe()})")
        raise ReportFailed(f"log service answered {answer.describe()}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayRound:
    """What one round of the relay did with the reports it claimed."""

    delivered: int = 0
    failed: int = 0
    """Not taken because of the service (down, failing, misconfigured): the relay backs off."""
    refused: int = 0
    """Refused for what they say: each waits on its own back-off; the relay goes on."""


class OutboxRelay:
    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool,
        client: LogClient,
        *,
        claim_batch: int,
        idle_s: float,
        max_in_flight: int = REPORTS_IN_FLIGHT,
    ) -> None:
        self._pool = pool
        self._client = client
        self._claim_batch = claim_batch
        self._idle_s = idle_s
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(max_in_flight)
        # Every claimed report sent, each at most its timeout, max_in_flight at a time; and
        # room for the marking. A claim never lapses while its relay is still sending.
        self._lease_s = client.timeout_s * math.ceil(claim_batch / max_in_flight) + _MARK_S

    def wake(self) -> None:
        """New kept records are durable: relay without waiting for the idle timer."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(initial_s=2 * self._idle_s, max_s=_FAILING_PAUSE_MAX_S)
        while not stop.is_set():
            try:
                done = await self.relay_once()
            except store.DATABASE_ERRORS as exc:
                # Away, or refusing the outbox's own statements: the reports stay due either way.
                log.warning(
                    "outbox: database unavailable (%s, SQLSTATE %s)",
                    type(exc).__name__,
                    getattr(exc, "sqlstate", None),
                )
                done = RelayRound(failed=1)
            if not done.failed:
                backoff.reset()
                if done.delivered or done.refused:
                    continue  # there may be more due right now
            # Idle, or the log service is failing: wait, longer after each failing round.
            self._wake.clear()
            await pause(backoff.next_s() if done.failed else self._idle_s, stop, self._wake)

    async def relay_once(self) -> RelayRound:
        """Deliver one claimed batch of due reports."""
        async with self._pool.connection() as conn:
            reports = await store.claim_reports(conn, self._claim_batch, self._lease_s)
        if not reports:  # none due: the rest wait for their back-off or another relay's lease
            return RelayRound()
        outcomes = await asyncio.gather(*(self._send(r) for r in reports))
        delivered = [r.id for r, error in zip(reports, outcomes, strict=True) if error is None]
        failed: dict[str, list[int]] = {}
        refused: dict[str, list[int]] = {}
        for report, error in zip(reports, outcomes, strict=True):
            if error is not None:
                into = refused if isinstance(error, ReportRefused) else failed
                into.setdefault(str(error), []).append(report.id)
        async with self._pool.connection() as conn, conn.transaction():
            await store.mark_reported(conn, delivered)
            for why, ids in failed.items():
                await store.mark_report_failed(conn, ids, why)
            for why, ids in refused.items():
                undeliverable = await store.mark_report_refused(conn, ids, why, MAX_REFUSALS)
                for kept_id in undeliverable:
                    log.error("report of kept record %d is undeliverable: %s", kept_id, why)
        return RelayRound(
            delivered=len(delivered),
            failed=sum(map(len, failed.values())),
            refused=sum(map(len, refused.values())),
        )

    async def _send(self, report: store.Report) -> ReportFailed | None:
        async with self._slots:
            try:
                await self._client.send(
                    report.payment_id, report.error_type, report.description, report.traceparent
                )
            except ReportFailed as exc:
                REPORTS.labels(
                    outcome="refused" if isinstance(exc, ReportRefused) else "failed"
                ).inc()
                return exc
        REPORTS.labels(outcome="delivered").inc()
        return None
