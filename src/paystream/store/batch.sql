-- The statements of a batch's transaction (paystream.pipeline). Lists travel as one JSON
-- document unpacked with json_to_recordset or json_array_elements_text (see store.queries.json).

-- hold_partitions --
-- Those of the partitions (t, p) whose writer is %(writer)s, locked FOR SHARE until the
-- transaction ends, in key order (the order take_partitions locks them in: no deadlock).
SELECT w.topic, w."partition"
FROM paystream.partition_writers AS w
JOIN json_to_recordset(%(partitions)s::json) AS r(t text, p int)
    ON (w.topic, w."partition") = (r.t, r.p)
WHERE w.writer = %(writer)s
ORDER BY 1, 2
FOR SHARE OF w;

-- take_partitions --
-- Make %(writer)s the writer of the partitions (t, p); waits for every transaction holding them.
INSERT INTO paystream.partition_writers (topic, "partition", writer)
SELECT t, p, %(writer)s FROM json_to_recordset(%(partitions)s::json) AS r(t text, p int)
ORDER BY 1, 2
ON CONFLICT (topic, "partition") DO UPDATE SET writer = EXCLUDED.writer, since = now();

-- processed_records --
-- The records with an outcome: stored from this very record (checked by payment id, i), or kept
-- (looked up by offset range per partition, one index range scan each).
SELECT o.topic, o."partition", o."offset", o.kafka_ts AS timestamp_ms
FROM json_to_recordset(%(stored)s::json) AS b(i text, t text, p int, o bigint, s bigint)
JOIN paystream.payment_origins AS o ON o.payment_id = b.i
    AND (o.topic, o."partition", o."offset", o.kafka_ts) = (b.t, b.p, b.o, b.s)
UNION ALL
SELECT k.topic, k."partition", k."offset", k.kafka_ts AS timestamp_ms
FROM json_to_recordset(%(kept)s::json) AS r(t text, p int, lo bigint, hi bigint)
JOIN paystream.kept_records AS k
    ON k.topic = r.t AND k."partition" = r.p AND k."offset" BETWEEN r.lo AND r.hi;

-- stored_payment_ids --
SELECT payment_id FROM payments
WHERE payment_id = ANY(ARRAY(SELECT value::varchar FROM json_array_elements_text(%(ids)s::json)));

-- existing_accounts --
-- Takes no lock: inserting a payment needs only its foreign key's KEY SHARE lock, which does not
-- conflict with another batch stamping the account.
SELECT account_id FROM accounts
WHERE account_id IN (SELECT value::int FROM json_array_elements_text(%(ids)s::json));

-- insert_payments --
-- Payments in id order (no deadlock); an id present already is skipped. The same statement
-- remembers which record each newly stored payment came from, replacing a stale origin that a
-- purge of payments left behind.
WITH batch AS (
    SELECT * FROM json_to_recordset(%(rows)s::json) AS r(
        i varchar, a int, t varchar, c varchar, m numeric,
        rt text, rp int, ro bigint, rs bigint)
), inserted AS (
    INSERT INTO payments (payment_id, account_id, payment_type, credit_card, amount)
    SELECT i, a, t, c, m FROM batch ORDER BY 1
    ON CONFLICT (payment_id) DO NOTHING
    RETURNING payment_id, account_id, created_on
), origins AS (
    INSERT INTO paystream.payment_origins (payment_id, topic, "partition", "offset", kafka_ts)
    SELECT i, rt, rp, ro, rs FROM batch JOIN inserted ON inserted.payment_id = batch.i
    ORDER BY 1
    ON CONFLICT (payment_id) DO UPDATE SET
        topic = EXCLUDED.topic, "partition" = EXCLUDED."partition",
        "offset" = EXCLUDED."offset", kafka_ts = EXCLUDED.kafka_ts, stored_at = now()
)
SELECT payment_id, account_id, created_on FROM inserted;

-- lock_accounts --
-- The accounts about to be stamped, locked in account order so that two batches never deadlock.
SELECT FROM accounts
WHERE account_id IN (SELECT value::int FROM json_array_elements_text(%(ids)s::json))
ORDER BY account_id
FOR NO KEY UPDATE;

-- stamp_accounts --
-- last_payment_date only moves forward, to the newest stored payment's created_on.
UPDATE accounts AS a SET last_payment_date = GREATEST(a.last_payment_date, s.latest)
FROM (
    SELECT a AS account_id, max(c) AS latest
    FROM json_to_recordset(%(rows)s::json) AS r(a int, c timestamp)
    GROUP BY a
) AS s
WHERE a.account_id = s.account_id;

-- existing_payments --
-- Stored payments and the record each came from (none if it was not stored by paystream).
SELECT p.payment_id, p.account_id, p.payment_type, p.credit_card, p.amount,
       o.topic, o."partition", o."offset", o.kafka_ts
FROM payments AS p LEFT JOIN paystream.payment_origins AS o USING (payment_id)
WHERE p.payment_id = ANY(ARRAY(SELECT value::varchar FROM json_array_elements_text(%(ids)s::json)));

-- insert_kept --
-- Keep records; one kept before is left as it is.
INSERT INTO paystream.kept_records
    (topic, "partition", "offset", kafka_ts, raw, raw_key,
     payment_id, error_type, reason, description, amount, traceparent)
SELECT t, p, o, s, decode(b, 'base64'), k, i, e, r, d, m, tp
FROM json_to_recordset(%(rows)s::json) AS j(
    t text, p int, o bigint, s bigint, b text, k text,
    i text, e text, r text, d text, m numeric, tp text)
ON CONFLICT (topic, "partition", "offset", kafka_ts) DO NOTHING;

-- resolve_kept --
-- A replay stored these kept records' payments.
WITH resolved AS (
    UPDATE paystream.kept_records AS k
    SET resolved_at = now(), replays = replays + 1
    FROM json_to_recordset(%(ids)s::json) AS r(t text, p int, o bigint, s bigint)
    WHERE (k.topic, k."partition", k."offset", k.kafka_ts) = (r.t, r.p, r.o, r.s)
    RETURNING k.id
)
INSERT INTO paystream.replays (kept_id, outcome, attempted)
SELECT id, 'stored', true FROM resolved;

-- update_kept --
-- A replay kept a record again. A new reason is a new fact, so it is reported again; a record
-- that was not tried keeps its count of replays.
WITH again AS (
    UPDATE paystream.kept_records SET
        replays = replays + %(attempted)s::int,
        reported_at = CASE WHEN reason = %(reason)s THEN reported_at END,
        next_report_at = CASE WHEN reason = %(reason)s THEN next_report_at ELSE now() END,
        report_refusals = CASE WHEN reason = %(reason)s THEN report_refusals ELSE 0 END,
        undeliverable_at = CASE WHEN reason = %(reason)s THEN undeliverable_at END,
        reason = %(reason)s, error_type = %(etype)s, description = %(desc)s
    WHERE (topic, "partition", "offset", kafka_ts) = (%(t)s, %(p)s, %(o)s, %(ts)s)
    RETURNING id
)
INSERT INTO paystream.replays (kept_id, outcome, reason, description, attempted)
SELECT id, 'kept', %(reason)s, %(desc)s, %(attempted)s FROM again;
