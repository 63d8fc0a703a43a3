-- The statements of a batch's transaction (paystream.pipeline). Lists travel as one JSON
-- document unpacked with json_to_recordset (its rows typed in store.documents, their keys named
-- as the columns below declare them) or json_array_elements_text (see store.queries.json).

-- hold_partitions --
-- Those of the partitions whose writer is %(writer)s, locked FOR SHARE until the transaction
-- ends, in key order (the order take_partitions locks them in: no deadlock).
SELECT w.topic, w."partition"
FROM paystream.partition_writers AS w
JOIN json_to_recordset(%(partitions)s::json) AS r(topic text, "partition" int)
    ON (w.topic, w."partition") = (r.topic, r."partition")
WHERE w.writer = %(writer)s
ORDER BY 1, 2
FOR SHARE OF w;

-- take_partitions --
-- Make %(writer)s the writer of the partitions; waits for every transaction holding them.
INSERT INTO paystream.partition_writers (topic, "partition", writer)
SELECT topic, "partition", %(writer)s
FROM json_to_recordset(%(partitions)s::json) AS r(topic text, "partition" int)
ORDER BY 1, 2
ON CONFLICT (topic, "partition") DO UPDATE SET writer = EXCLUDED.writer, since = now();

-- processed_records --
-- The records with an outcome: stored from this very record (its payment's newest origin), or
-- kept (looked up by offset range per partition, one index range scan each).
SELECT o.topic, o."partition", o."offset", o.kafka_ts AS timestamp_ms
FROM json_to_recordset(%(stored)s::json) AS b(
    payment_id text, topic text, "partition" int, "offset" bigint, kafka_ts bigint)
JOIN LATERAL paystream.origin_of(b.payment_id) AS o
    ON (o.topic, o."partition", o."offset", o.kafka_ts)
        = (b.topic, b."partition", b."offset", b.kafka_ts)
UNION ALL
SELECT k.topic, k."partition", k."offset", k.kafka_ts AS timestamp_ms
FROM json_to_recordset(%(kept)s::json) AS r(
    topic text, "partition" int, first_offset bigint, last_offset bigint)
JOIN paystream.kept_records AS k
    ON k.topic = r.topic AND k."partition" = r."partition"
    AND k."offset" BETWEEN r.first_offset AND r.last_offset;

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
-- appends which record each newly stored payment came from (a purge of payments may have left
-- an older origin of the same id behind: the newest is the payment's own).
WITH batch AS (
    SELECT * FROM json_to_recordset(%(rows)s::json) AS r(
        payment_id varchar, account_id int, payment_type varchar, credit_card varchar,
        amount numeric, topic text, "partition" int, "offset" bigint, kafka_ts bigint)
), inserted AS (
    INSERT INTO payments (payment_id, account_id, payment_type, credit_card, amount)
    SELECT payment_id, account_id, payment_type, credit_card, amount FROM batch ORDER BY 1
    ON CONFLICT (payment_id) DO NOTHING
    RETURNING payment_id, account_id, created_on
), origins AS (
    INSERT INTO paystream.payment_origins (payment_id, topic, "partition", "offset", kafka_ts)
    SELECT payment_id, b.topic, b."partition", b."offset", b.kafka_ts
    FROM batch AS b JOIN inserted USING (payment_id)
)
-- Per account the newest created_on stored (skipped NULL), then each payment_id skipped.
SELECT account_id, max(created_on) AS latest, NULL::varchar AS skipped
FROM inserted GROUP BY account_id
UNION ALL
SELECT NULL, NULL, b.payment_id
FROM batch AS b WHERE NOT EXISTS (SELECT FROM inserted AS i WHERE i.payment_id = b.payment_id);

-- leave_stamps_due --
-- The newest created_on a batch stored per account, for a stamping pass to apply.
INSERT INTO paystream.stamps_due (account_id, latest)
SELECT account_id, latest
FROM json_to_recordset(%(rows)s::json) AS r(account_id int, latest timestamp);

-- stamping_pass --
-- One stamping pass at a time, across every instance: only passes update accounts rows.
SELECT pg_advisory_xact_lock(%(key)s);

-- take_stamps_due --
-- Every stamp left due by a committed batch, newest per account; taken (deleted) by this pass.
WITH due AS (DELETE FROM paystream.stamps_due RETURNING account_id, latest)
SELECT account_id, max(latest) AS latest FROM due GROUP BY account_id;

-- lock_accounts --
-- The accounts about to be stamped, locked in account order: a pass never deadlocks with another
-- writer of accounts.
SELECT FROM accounts
WHERE account_id IN (SELECT value::int FROM json_array_elements_text(%(ids)s::json))
ORDER BY account_id
FOR NO KEY UPDATE;

-- stamp_accounts --
-- last_payment_date only moves forward, to the newest stored payment's created_on (one row per
-- account).
UPDATE accounts AS a SET last_payment_date = GREATEST(a.last_payment_date, s.latest)
FROM json_to_recordset(%(rows)s::json) AS s(account_id int, latest timestamp)
WHERE a.account_id = s.account_id;

-- existing_payments --
-- Stored payments and the record each came from (none if it was not stored by paystream).
SELECT p.payment_id, p.account_id, p.payment_type, p.credit_card, p.amount,
       o.topic, o."partition", o."offset", o.kafka_ts
FROM payments AS p LEFT JOIN LATERAL paystream.origin_of(p.payment_id) AS o ON true
WHERE p.payment_id = ANY(ARRAY(SELECT value::varchar FROM json_array_elements_text(%(ids)s::json)));

-- insert_kept --
-- Keep records; one kept before is left as it is.
INSERT INTO paystream.kept_records
    (topic, "partition", "offset", kafka_ts, raw, raw_key,
     payment_id, error_type, reason, description, amount, traceparent)
SELECT topic, "partition", "offset", kafka_ts, decode(raw, 'base64'), raw_key,
       payment_id, error_type, reason, description, amount, traceparent
FROM json_to_recordset(%(rows)s::json) AS j(
    topic text, "partition" int, "offset" bigint, kafka_ts bigint, raw text, raw_key text,
    payment_id text, error_type text, reason text, description text, amount numeric,
    traceparent text)
ON CONFLICT (topic, "partition", "offset", kafka_ts) DO NOTHING;

-- resolve_kept --
-- A replay stored these kept records' payments.
WITH resolved AS (
    UPDATE paystream.kept_records AS k
    SET resolved_at = now(), replays = replays + 1
    FROM json_to_recordset(%(ids)s::json) AS r(
        topic text, "partition" int, "offset" bigint, kafka_ts bigint)
    WHERE (k.topic, k."partition", k."offset", k.kafka_ts)
        = (r.topic, r."partition", r."offset", r.kafka_ts)
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
        reason = %(reason)s, error_type = %(error_type)s, description = %(description)s
    WHERE (topic, "partition", "offset", kafka_ts)
        = (%(topic)s, %(partition)s, %(offset)s, %(kafka_ts)s)
    RETURNING id
)
INSERT INTO paystream.replays (kept_id, outcome, reason, description, attempted)
SELECT id, 'kept', %(reason)s, %(description)s, %(attempted)s FROM again;
