-- The outbox of error reports: kept rows whose reported_at is NULL (paystream.outbox).

-- claim_reports --
-- Lease the oldest due reports for %(lease_s)s; rows another relay is claiming are skipped, not
-- waited for.
UPDATE paystream.kept_records
SET next_report_at = now() + %(lease_s)s * interval '1 second'
WHERE id IN (
    SELECT id FROM paystream.kept_records
    WHERE reported_at IS NULL AND undeliverable_at IS NULL AND next_report_at <= now()
    ORDER BY id LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id, payment_id, error_type, description, traceparent;

-- mark_reported --
UPDATE paystream.kept_records
SET reported_at = now(), report_attempts = report_attempts + 1
WHERE id = ANY(%(ids)s::bigint[]);

-- mark_report_failed --
-- Back off per row: 1 s, 2 s, 4 s ... capped at 30 s.
UPDATE paystream.kept_records SET
    report_attempts = report_attempts + 1,
    last_report_error = %(error)s,
    next_report_at = now() + least(30, 2 ^ least(report_attempts, 5)) * interval '1 second'
WHERE id = ANY(%(ids)s::bigint[]);

-- mark_report_refused --
-- Refused for what it says: back off per row as above; the %(max_refusals)s-th refusal makes the
-- report undeliverable (never claimed again, still kept). Returns the rows that became so now.
WITH refused AS (
    UPDATE paystream.kept_records SET
        report_attempts = report_attempts + 1,
        report_refusals = report_refusals + 1,
        last_report_error = %(error)s,
        next_report_at = now() + least(30, 2 ^ least(report_attempts, 5)) * interval '1 second',
        undeliverable_at = CASE WHEN report_refusals + 1 >= %(max_refusals)s THEN now() END
    WHERE id = ANY(%(ids)s::bigint[])
    RETURNING id, undeliverable_at
)
SELECT id FROM refused WHERE undeliverable_at IS NOT NULL ORDER BY id;

-- undeliverable_reports --
SELECT count(*) FROM paystream.kept_records
WHERE reported_at IS NULL AND undeliverable_at IS NOT NULL;

-- outbox_depth --
-- Reports still to deliver (the undeliverable ones are counted apart).
SELECT count(*) FROM paystream.kept_records
WHERE reported_at IS NULL AND undeliverable_at IS NULL;

-- oldest_unreported_age_s --
-- Seconds since the oldest record still unreported was kept; 0 if none is.
SELECT coalesce(extract(epoch FROM now() - min(kept_at)), 0)::float8
FROM paystream.kept_records
WHERE reported_at IS NULL AND undeliverable_at IS NULL;
