-- Where each partition's records are done (paystream.consumer, paystream.position). Lists travel
-- as one JSON document, as in batch.sql (rows typed in store.documents).

-- record_done --
-- A batch's spans of offsets, one per partition, made durable with its outcomes.
INSERT INTO paystream.done_ranges (topic, "partition", first_offset, end_offset)
SELECT topic, "partition", first_offset, end_offset
FROM json_to_recordset(%(spans)s::json) AS r(
    topic text, "partition" int, first_offset bigint, end_offset bigint)
ON CONFLICT DO NOTHING;

-- lock_positions --
-- The positions of these partitions, locked in key order until the transaction ends (two folds
-- of a partition take turns; no deadlock).
SELECT w.topic, w."partition", w.next_offset
FROM paystream.positions AS w
JOIN json_to_recordset(%(partitions)s::json) AS r(topic text, "partition" int)
    ON (w.topic, w."partition") = (r.topic, r."partition")
ORDER BY 1, 2
FOR UPDATE OF w;

-- ranges_beyond --
-- The spans of these partitions that reach past their positions, in order.
SELECT d.topic, d."partition", d.first_offset, d.end_offset
FROM paystream.done_ranges AS d
JOIN json_to_recordset(%(positions)s::json) AS r(topic text, "partition" int, next_offset bigint)
    ON (d.topic, d."partition") = (r.topic, r."partition") AND d.end_offset > r.next_offset
ORDER BY 1, 2, 3, 4;

-- move_positions --
-- Set positions (inserting those missing) and drop the spans they cover. `overwrite`: move them
-- back as well (a partition read again from its start); otherwise they only move forward.
WITH moved AS (
    INSERT INTO paystream.positions AS w (topic, "partition", next_offset)
    SELECT topic, "partition", next_offset
    FROM json_to_recordset(%(positions)s::json) AS r(topic text, "partition" int, next_offset bigint)
    ORDER BY 1, 2
    ON CONFLICT (topic, "partition") DO UPDATE SET
        next_offset = CASE WHEN %(overwrite)s THEN EXCLUDED.next_offset
                           ELSE greatest(w.next_offset, EXCLUDED.next_offset) END,
        updated_at = now()
    RETURNING topic, "partition", next_offset
)
DELETE FROM paystream.done_ranges AS d
USING moved
WHERE (d.topic, d."partition") = (moved.topic, moved."partition")
    AND (%(overwrite)s OR d.end_offset <= moved.next_offset);

-- start_positions --
-- A position for each partition that has none yet (another instance may have made one).
INSERT INTO paystream.positions (topic, "partition", next_offset)
SELECT topic, "partition", next_offset
FROM json_to_recordset(%(positions)s::json) AS r(topic text, "partition" int, next_offset bigint)
ORDER BY 1, 2
ON CONFLICT (topic, "partition") DO NOTHING;

-- keep_gap --
-- Records that left Kafka unread, kept as one row per run of them; reported like any kept record.
-- No record has a negative Kafka timestamp: -1 marks an expired run, -2 a deleted log's.
INSERT INTO paystream.kept_records
    (topic, "partition", "offset", last_offset, kafka_ts, raw, payment_id, error_type, reason,
     description)
VALUES (%(topic)s, %(partition)s, %(first)s, %(last)s, %(kafka_ts)s, NULL, NULL, 'other',
        %(reason)s, %(description)s)
ON CONFLICT (topic, "partition", "offset", kafka_ts) DO NOTHING;

-- position_logs --
-- Each position as recorded (not folded), the log it belongs to (its topic's id) and how far
-- that log was seen to reach.
SELECT w.topic, w."partition", w.next_offset, w.topic_id, w.seen_end
FROM paystream.positions AS w
JOIN json_to_recordset(%(partitions)s::json) AS r(topic text, "partition" int)
    ON (w.topic, w."partition") = (r.topic, r."partition");

-- mark_logs --
-- Positions' logs: a topic id given (not NULL) becomes the position's, its seen end starting
-- afresh when the id is another; a seen end only moves forward within one log.
UPDATE paystream.positions AS w
SET topic_id = coalesce(r.topic_id, w.topic_id),
    seen_end = CASE WHEN r.topic_id IS DISTINCT FROM w.topic_id AND r.topic_id IS NOT NULL
                    THEN r.seen_end
                    ELSE greatest(w.seen_end, r.seen_end) END
FROM json_to_recordset(%(logs)s::json) AS r(
    topic text, "partition" int, topic_id text, seen_end bigint)
WHERE (w.topic, w."partition") = (r.topic, r."partition");
