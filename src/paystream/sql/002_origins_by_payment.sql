-- Whether a record already stored its payment is now asked by payment_id (the primary key), so
-- the index by record is no longer read; dropping it spares every stored payment one index write.
DROP INDEX IF EXISTS paystream.payment_origins_record;
