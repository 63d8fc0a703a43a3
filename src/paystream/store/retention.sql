-- What `paystream prune` removes: bookkeeping that no longer says anything about a payment or a
-- kept record. Kept records themselves are never removed, nor the origin of a payment that is
-- still stored. Each statement is safe beside running processors.

-- prune_replays --
-- The history of replays older than the retention. The kept record keeps its count of replays
-- and, if one stored it, when it was resolved.
DELETE FROM paystream.replays WHERE replayed_at < now() - %(keep)s;

-- prune_done_ranges --
-- Spans wholly below their partition's position: already folded into it. A fold deletes what
-- it carries over; these are spans a fold could not delete (a position moved by a rebuild, a
-- restore, or a log read again from its start).
DELETE FROM paystream.done_ranges AS d
USING paystream.positions AS p
WHERE d.topic = p.topic AND d."partition" = p."partition" AND d.end_offset <= p.next_offset;

-- prune_positions --
-- Where the partitions of topics no longer read were done, untouched for the retention: with
-- their spans and their writers. Should such a topic be read again, its records are read from
-- the log's start, and each already stored is recognised by its origin.
-- (Every statement of a query sees the same snapshot: the spans and writers go with the positions
-- the last statement removes.)
WITH spans AS (
    DELETE FROM paystream.done_ranges AS d USING paystream.positions AS p
    WHERE (d.topic, d."partition") = (p.topic, p."partition")
        AND p.topic <> ALL(%(topics)s) AND p.updated_at < now() - %(keep)s
), writers AS (
    DELETE FROM paystream.partition_writers AS w USING paystream.positions AS p
    WHERE (w.topic, w."partition") = (p.topic, p."partition")
        AND p.topic <> ALL(%(topics)s) AND p.updated_at < now() - %(keep)s
)
DELETE FROM paystream.positions
WHERE topic <> ALL(%(topics)s) AND updated_at < now() - %(keep)s;

-- prune_origins --
-- Origins older than the retention whose payment is no longer stored (the retailer purged it),
-- or that a newer origin of the same payment_id replaced (it was stored again after a purge).
-- A payment still stored keeps its own origin: it tells a redelivery of its record from a
-- duplicate, and `paystream show` follows it.
DELETE FROM paystream.payment_origins AS o
WHERE o.stored_at < now() - %(keep)s
  AND (
    NOT EXISTS (SELECT FROM payments AS p WHERE p.payment_id = o.payment_id)
    OR EXISTS (
        SELECT FROM paystream.payment_origins AS n
        WHERE n.payment_id = o.payment_id AND n.stored_at > o.stored_at
    )
  );

-- table_sizes --
-- Bytes on disk of the retailer's payments table and of each of paystream's own (indexes and
-- TOAST included).
SELECT c.relname::text AS name, n.nspname = 'paystream' AS ours,
       pg_total_relation_size(c.oid) AS bytes
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND (n.nspname = 'paystream' OR c.oid = 'payments'::regclass)
ORDER BY ours, name;
