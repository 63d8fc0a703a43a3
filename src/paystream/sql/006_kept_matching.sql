-- The kept records an operator's filter selects (paystream errors, replay, the dashboard), in
-- one place for every query that lists or counts them. A filter left NULL matches all. Plain
-- SQL and STABLE, so the planner inlines it into the calling query (its id range, ORDER BY and
-- LIMIT reach the index).
CREATE OR REPLACE FUNCTION paystream.kept_matching(
    etype text, why text, from_topic text, since timestamptz, unresolved boolean,
    ids bigint[], max_replays int, pid text
) RETURNS SETOF paystream.kept_records
LANGUAGE sql STABLE AS $$
    SELECT * FROM paystream.kept_records
    WHERE (etype IS NULL OR error_type = etype)
        AND (why IS NULL OR reason = why)
        AND (from_topic IS NULL OR topic = from_topic)
        AND (since IS NULL OR kept_at >= since)
        AND (NOT unresolved OR resolved_at IS NULL)
        AND (ids IS NULL OR id = ANY(ids))
        AND (max_replays IS NULL OR replays < max_replays)
        AND (pid IS NULL OR payment_id = pid)
$$;
