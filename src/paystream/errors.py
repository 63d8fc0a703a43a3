"""The exceptions paystream raises. A caller knows from the class alone how to react.

PaystreamError
├── ConfigurationError    bad settings: fix the configuration, do not retry
│   └── SealedRecordUnreadable  a kept record's key is missing or wrong: fix the key file
├── DevenvError           local infrastructure could not start: read the message
├── GatewayUnavailable    transient gateway failure: retry later, keep the payment meanwhile
│   └── CircuitOpen       nothing was sent (the breaker is open): as above, no attempt spent
└── DatabaseUnavailable   the database cannot be reached or failed transiently: retry the batch
"""


class PaystreamError(Exception):
    """Something paystream could not do."""


class ConfigurationError(PaystreamError):
    """The configuration is wrong; the message says what to change. Retrying will not help."""


class SealedRecordUnreadable(ConfigurationError):
    """A kept record's sealed raw bytes do not open with the configured keys. Nothing was
    changed; add the right key to PAYSTREAM_KEPT_KEY_FILE and try again."""


class DevenvError(PaystreamError):
    """Local infrastructure (broker, database, simulator) could not start; the message says why."""


class GatewayUnavailable(PaystreamError):
    """The gateway did not answer definitively (timeout, 5xx, 429, reset). Retry, then keep."""


class CircuitOpen(GatewayUnavailable):
    """The circuit breaker refused the call, so the gateway was not asked. Keep the payment; it
    was not tried, so a re-validation that ends here does not count against its attempts."""


class DatabaseUnavailable(PaystreamError):
    """The database is unreachable or failed transiently. Commit nothing; retry the batch."""
