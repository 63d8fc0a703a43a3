"""Prometheus metrics. Labels carry types and outcomes, never payment data."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECORDS = Counter("paystream_records_total", "Kafka records processed", ["topic"])
STORED = Counter("paystream_payments_stored_total", "Payments stored", ["payment_type"])
KEPT = Counter("paystream_records_kept_total", "Records kept instead of stored", ["reason"])
REDELIVERED = Counter(
    "paystream_records_redelivered_total", "Records seen again whose outcome was already durable"
)
REPORTS = Counter("paystream_reports_total", "Error reports sent to the log service", ["outcome"])
BATCH_SIZE = Histogram(
    "paystream_batch_records",
    "Records per processed batch",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)
BATCH_SECONDS = Histogram("paystream_batch_seconds", "Time to process one batch end to end")
DATABASE_SECONDS = Histogram(
    "paystream_database_seconds",
    "Time of a batch's database work, by step: load (what is done already), write (the "
    "transaction and its commit); the gateway calls between are excluded",
    ["step"],
)
GATEWAY_CALLS = Counter("paystream_gateway_calls_total", "Gateway calls by outcome", ["outcome"])
GATEWAY_SECONDS = Histogram("paystream_gateway_seconds", "Gateway call latency")
RECORDS_EXPIRED = Counter(
    "paystream_records_expired_total",
    "Records that left Kafka unread (retention, deleted records), each run kept as a gap",
    ["topic"],
)
REWINDS = Counter(
    "paystream_position_rewinds_total",
    "Partitions read again from an earlier position: the database behind what was made durable "
    "(database_behind), a position past the log's end (beyond_end), or a topic deleted and "
    "created again (recreated)",
    ["topic", "cause"],
)
STAMP_PASSES = Counter(
    "paystream_stamp_passes_total",
    "Stamping passes run: each applies the account stamps that batches left due",
)
DB_FAILURES = Counter("paystream_database_failures_total", "Batch transactions that failed")
OUTBOX_DEPTH = Gauge("paystream_outbox_depth", "Kept records not yet reported to the log service")
OUTBOX_OLDEST_AGE = Gauge(
    "paystream_outbox_oldest_age_seconds",
    "Seconds since the oldest record not yet reported to the log service was kept; 0 if none",
)
REPORTS_UNDELIVERABLE = Gauge(
    "paystream_reports_undeliverable",
    "Kept records whose report the log service refused for good (listed by paystream errors)",
)
DATABASE_UP = Gauge(
    "paystream_database_up",
    "1 while the database answered this instance's last check (every 5 s), else 0",
)
CONSUMER_LAG = Gauge("paystream_consumer_lag", "Records behind the end", ["topic", "partition"])
BROKER_UP = Gauge(
    "paystream_broker_up",
    "0 while the Kafka client reports every broker down (a timed-out request, a refused "
    "connection), else 1",
)
PARTITION_STALLED = Gauge(
    "paystream_partition_stalled_seconds",
    "How long intake at the partition has been stalled: a batch of its records has failed to "
    "become durable for longer than PAYSTREAM_STALL_AFTER_S. Labelled with the record that "
    "blocks it (offset) and the database's error; absent while the partition is not stalled",
    ["topic", "partition", "offset", "error"],
)
CIRCUIT_OPEN = Gauge(
    "paystream_gateway_circuit_open",
    "1 while the gateway circuit breaker is open (0 once its cool-down has passed)",
)
# What is at risk, by reason; refreshed from the shared database every few seconds by every
# instance (they agree: aggregate with max, not sum).
KEPT_UNRESOLVED = Gauge(
    "paystream_kept_unresolved", "Kept records not resolved by a replay", ["reason"]
)
KEPT_UNRESOLVED_AMOUNT = Gauge(
    "paystream_kept_unresolved_amount",
    "Total amount of the unresolved kept payments (those whose amount could be read)",
    ["reason"],
)
KEPT_OLDEST_AGE = Gauge(
    "paystream_kept_oldest_unresolved_age_seconds",
    "Age in business time (its Kafka timestamp) of the oldest unresolved kept record; 0 if none",
    ["reason"],
)
