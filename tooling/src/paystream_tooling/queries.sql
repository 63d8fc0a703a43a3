-- What the tools read (paystream_tooling: the demo, the benchmark, the reconcile oracle) and what
-- the simulator resets. Never run by the processor.

-- all_payments --
SELECT payment_id, account_id, payment_type, credit_card, amount FROM payments;

-- all_origins --
-- Each payment_id's newest origin (one stored again after a purge has an older one too).
SELECT DISTINCT ON (payment_id) payment_id, topic, "partition", "offset"
FROM paystream.payment_origins
ORDER BY payment_id, stored_at DESC;

-- all_kept --
SELECT topic, "partition", "offset", error_type, payment_id, resolved_at IS NOT NULL AS resolved
FROM paystream.kept_records;

-- bad_account_dates --
-- Accounts whose last_payment_date is not their newest stored payment's created_on.
SELECT count(*) FROM accounts AS a
WHERE a.last_payment_date IS DISTINCT FROM
    (SELECT max(created_on) FROM payments AS p WHERE p.account_id = a.account_id);

-- outcome_counts --
SELECT (SELECT count(*) FROM payments) AS stored,
       (SELECT count(*) FROM paystream.kept_records) AS kept,
       (SELECT count(*) FROM paystream.kept_records WHERE reported_at IS NOT NULL) AS reported;

-- reported_by --
-- Reports delivered by %(until)s (epoch seconds).
SELECT count(*) FROM paystream.kept_records WHERE reported_at <= to_timestamp(%(until)s);

-- store_latency_ms --
-- Milliseconds from a record's production (or %(since_ms)s, if later) to its payment's storing,
-- for records produced from %(produced_from_ms)s on: the median, the 99th percentile, the worst.
SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), 0) AS p50,
       coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), 0) AS p99,
       coalesce(max(ms), 0) AS worst
FROM (SELECT extract(epoch FROM stored_at) * 1000 - greatest(kafka_ts, %(since_ms)s) AS ms
      FROM paystream.payment_origins WHERE kafka_ts >= %(produced_from_ms)s) AS t;

-- longest_store_gap_ms --
-- The longest stretch, in milliseconds, between two consecutive batches storing payments of
-- records produced from %(produced_from_ms)s on.
SELECT coalesce(max(gap), 0) AS longest
FROM (SELECT extract(epoch FROM stored_at - lag(stored_at) OVER (ORDER BY stored_at)) * 1000 AS gap
      FROM (SELECT DISTINCT stored_at FROM paystream.payment_origins
            WHERE kafka_ts >= %(produced_from_ms)s) AS batches) AS t;

-- reset_payments --
-- The simulator's /start: the retailer's tables as the original service leaves them.
-- Stamps a processor left due for payments deleted here are dropped too (paystream's table, if
-- a processor ever ran against this database).
DELETE FROM payments;
UPDATE accounts SET last_payment_date = NULL;
DO $$ BEGIN
    IF to_regclass('paystream.stamps_due') IS NOT NULL THEN
        DELETE FROM paystream.stamps_due;
    END IF;
END $$;

-- keep_many --
-- %(count)s kept records of a topic nobody reads: reported, unresolved, of three reasons, as a
-- long outage leaves them (the bench's watched drain).
INSERT INTO paystream.kept_records
    (topic, "partition", "offset", kafka_ts, raw, payment_id, error_type, reason, description,
     amount, reported_at)
SELECT 'archive', 0, g, 1700000000000 + g, NULL, 'kept-' || g,
    (ARRAY['network', 'database', 'other'])[g %% 3 + 1],
    (ARRAY['gateway_unavailable', 'unknown_account', 'invalid'])[g %% 3 + 1],
    'kept for the benchmark', g %% 1000, now()
FROM generate_series(1, %(count)s) AS g;

-- bare_insert --
-- The bare idempotent insert ceiling: the payments alone, nothing recorded beside them.
INSERT INTO payments (payment_id, account_id, payment_type, credit_card, amount)
SELECT payment_id, account_id, payment_type, credit_card, amount
FROM json_to_recordset(%(rows)s::json) AS r(
    payment_id varchar, account_id int, payment_type varchar, credit_card varchar,
    amount numeric)
ORDER BY 1
ON CONFLICT (payment_id) DO NOTHING
RETURNING payment_id, account_id, created_on;

-- copy_target --
-- The raw COPY ceiling's table: shaped like payments (columns, defaults, key, indexes).
CREATE TABLE IF NOT EXISTS copy_target (LIKE payments INCLUDING ALL);

-- copy_rows --
COPY copy_target (payment_id, account_id, payment_type, credit_card, amount) FROM STDIN;

-- statements_extension --
-- The bench's statement statistics while profiling (the server preloads the library then).
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;

-- statements_reset --
SELECT pg_stat_statements_reset();

-- statements_by_time --
-- The statements of one database (named by its URL's path) by the time they took, top 25.
SELECT s.total_exec_time, s.calls, s.total_exec_time / greatest(s.calls, 1), s.rows, s.query
FROM pg_stat_statements AS s
JOIN pg_database AS d ON d.oid = s.dbid
WHERE d.datname = split_part(split_part(%(database)s, '/', 4), '?', 1)
ORDER BY s.total_exec_time DESC
LIMIT 25;
