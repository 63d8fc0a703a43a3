-- A stored payment's own origin: the newest of its payment_id's (a purge of payments may have
-- left older ones behind, 009). One definition for every statement that reads an origin;
-- PostgreSQL inlines it (SQL, stable, one SELECT), so a lookup stays one probe of the hash index.
CREATE FUNCTION paystream.origin_of(id varchar) RETURNS SETOF paystream.payment_origins
LANGUAGE sql STABLE AS $$
    SELECT * FROM paystream.payment_origins WHERE payment_id = id ORDER BY stored_at DESC LIMIT 1
$$;
