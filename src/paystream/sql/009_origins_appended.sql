-- A stored payment's origin is appended, not upserted: the key on payment_id (a second B-tree of
-- random text keys, written by every stored payment) cost the batch insert about a third of its
-- time. A hash index answers the lookups by payment_id (show, a duplicate's description) for less.
-- A payment_id stored again after a purge of payments has several origins; the newest one
-- (stored_at) is its own, the statements that read origins take that one.
ALTER TABLE paystream.payment_origins DROP CONSTRAINT payment_origins_pkey;
CREATE INDEX payment_origins_payment_id ON paystream.payment_origins USING hash (payment_id);
