-- Listing, counting and tracing kept and stored payments (paystream errors, replay, trace, the
-- dashboard). Never the card number: listings read kept rows' raw bytes only to replay them.

-- list_kept --
SELECT id, topic, "partition", "offset", last_offset, kafka_ts, raw, raw_key, payment_id,
    error_type, reason, description, amount, kept_at, reported_at, report_attempts,
    last_report_error, undeliverable_at, resolved_at, replays
FROM paystream.kept_matching(%(etype)s::text, %(reason)s::text, %(topic)s::text,
    %(since)s::timestamptz, %(unresolved)s::boolean, %(ids)s::bigint[], %(max_replays)s::int,
    %(pid)s::text)
WHERE id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- count_kept --
SELECT count(*)
FROM paystream.kept_matching(%(etype)s::text, %(reason)s::text, %(topic)s::text,
    %(since)s::timestamptz, %(unresolved)s::boolean, %(ids)s::bigint[], %(max_replays)s::int,
    %(pid)s::text);

-- latest_kept --
SELECT id, topic, "partition", "offset", last_offset, kafka_ts, raw, raw_key, payment_id,
    error_type, reason, description, amount, kept_at, reported_at, report_attempts,
    last_report_error, undeliverable_at, resolved_at, replays
FROM paystream.kept_records
ORDER BY id DESC
LIMIT %(limit)s;

-- kept_by_reason --
-- Per reason: how many were kept and resolved, and of the unresolved their count, amount and
-- the oldest's business time (its Kafka timestamp, or when it was kept if it had none).
SELECT reason, min(error_type) AS error_type, count(*) AS kept,
    count(resolved_at) AS resolved,
    count(*) FILTER (WHERE resolved_at IS NULL) AS unresolved,
    coalesce(sum(amount) FILTER (WHERE resolved_at IS NULL), 0) AS unresolved_amount,
    min(CASE WHEN kafka_ts > 0 THEN to_timestamp(kafka_ts / 1000.0) ELSE kept_at END)
        FILTER (WHERE resolved_at IS NULL) AS oldest_unresolved
FROM paystream.kept_records
GROUP BY reason
ORDER BY kept DESC;

-- stored_payment --
-- A stored payment without its card number, and the record it came from.
SELECT p.payment_id, p.account_id, p.payment_type, p.amount, p.created_on,
    o.topic, o."partition", o."offset", o.kafka_ts, o.stored_at
FROM payments AS p LEFT JOIN LATERAL paystream.origin_of(p.payment_id) AS o ON true
WHERE p.payment_id = %(pid)s;

-- replays_of --
SELECT kept_id, replayed_at, outcome, reason, description, attempted
FROM paystream.replays
WHERE kept_id = ANY(%(ids)s::bigint[])
ORDER BY replayed_at;
