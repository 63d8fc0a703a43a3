"""The exceptions paystream raises. A caller knows from the class alone how to react.

PaystreamError
├── ConfigurationError      bad settings: fix the configuration, do not retry
│   └── SealedRecordUnreadable  a kept record's key is missing or wrong: fix the key file
├── DevenvError             local infrastructure could not start: read the message
├── Interrupted             the operator stopped a command (Ctrl-C, SIGTERM): exit 130
├── Unanswered              an HTTP call to the third party got no answer: the caller decides
├── AttemptFailed           one gateway attempt failed transiently: retry within the budget
├── Misconfigured           the gateway's answer says our settings are wrong: no retry until fixed
│   ├── CredentialsRefused  it refused our credentials
│   └── Redirected          it answered with a redirect: its URL is not where it is
├── GatewayUnavailable      transient gateway failure: retry later, keep the payment meanwhile
│   └── CircuitOpen         nothing was sent (the breaker is open): as above, no attempt spent
├── ReportFailed            the log service did not take a report: the outbox sends it again
│   └── ReportRefused       it refused this one report: sent again, alone, a few times at most
└── DatabaseUnavailable     the database cannot be reached or failed transiently: retry the batch
    └── DatabaseRefusing    it answers, but refuses what no record's data explains: wait, alarmed
"""

from __future__ import annotations

from paystream.model import RecordId


class PaystreamError(Exception):
    """Something paystream could not do."""


class ConfigurationError(PaystreamError):
    """The configuration is wrong; the message says what to change. Retrying will not help."""


class SealedRecordUnreadable(ConfigurationError):
    """A kept record's sealed raw bytes do not open with the configured keys. Nothing was
    changed; add the right key to PAYSTREAM_KEPT_KEY_FILE and try again."""


class DevenvError(PaystreamError):
    """Local infrastructure (broker, database, simulator) could not start; the message says why."""


class Interrupted(PaystreamError):
    """Ctrl-C or SIGTERM during a command; everything was stopped. Exit 130, like a shell."""


class Unanswered(PaystreamError):
    """A call to the third party got no HTTP answer: it timed out or the connection failed.
    Whether that is worth a retry is the caller's to say (the gateway: yes, within its budget;
    the outbox: later)."""

    def __init__(self, reason: str, *, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class AttemptFailed(PaystreamError):
    """One gateway attempt failed in a way worth retrying (no answer, 5xx, 408, 425, 429).
    Retried within the budget; then it becomes GatewayUnavailable."""


class Misconfigured(PaystreamError):
    """The gateway's answer says our settings for it are wrong: an outage of ours, not the
    payment's decline. Not retried: with the same settings every retry gets the same answer."""


class CredentialsRefused(Misconfigured):
    """The gateway refused our credentials (401, 403, 407)."""


class Redirected(Misconfigured):
    """The gateway answered with a redirect (3xx): the configured URL is not where it is. Not
    followed: the payment's body, card number included, would go wherever it points."""


class GatewayUnavailable(PaystreamError):
    """The gateway did not answer definitively (timeout, 5xx, 429, reset). Retry, then keep."""


class CircuitOpen(GatewayUnavailable):
    """The circuit breaker refused the call, so the gateway was not asked. Keep the payment; it
    was not tried, so a re-validation that ends here does not count against its attempts."""


class ReportFailed(PaystreamError):
    """The log service did not take a report; the message says how. The report stays due and
    the outbox sends it again after a back-off."""


class ReportRefused(ReportFailed):
    """The log service refused this report for what it says (a 4xx about its body), while the
    service itself is up. The report is sent again after its own back-off, without slowing the
    others; after a few refusals it is marked undeliverable (still kept, listed and alerted on)."""


class DatabaseUnavailable(PaystreamError):
    """The database is unreachable or failed transiently. Commit nothing; retry the batch."""

    def __init__(self, message: str, *, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause
        """The driver's error, as `named` calls it: a label with few values."""

    @classmethod
    def caused_by(cls, exc: BaseException) -> DatabaseUnavailable:
        """The error for a driver's exception (one of store.DATABASE_ERRORS): named by its class
        and SQLSTATE, never by its message, which may quote the statement's values."""
        return cls(f"database unavailable: {named(exc)}", cause=named(exc))


class DatabaseRefusing(DatabaseUnavailable):
    """The database answers but refuses a write that no record's own data explains: it refuses
    records like these too (read-only, a permission revoked, a trigger on every payment, a full
    disk), or refuses even the bare keep of one record (`record`). Nothing is kept or skipped:
    the batch waits and is retried, and its partitions count as stalled (paystream.stalls)."""

    def __init__(self, message: str, *, cause: str, record: RecordId | None = None) -> None:
        super().__init__(message, cause=cause)
        self.record = record
        """The record that blocks intake at its partition, when one record does."""


def named(exc: BaseException) -> str:
    """A driver's error by its class and SQLSTATE (`InsufficientPrivilege 42501`)."""
    state = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__} {state}" if state else type(exc).__name__
