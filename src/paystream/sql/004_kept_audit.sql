-- What an operator needs to see what is at risk and to follow one payment:
-- the amount of a kept payment (where it could be read) so unresolved money can be summed;
-- which key sealed a kept record's raw bytes (NULL: stored in clear, as before encryption);
-- an index to find every record that carried a payment_id;
-- and the history of each replay of a kept record with its outcome.
ALTER TABLE paystream.kept_records ADD COLUMN amount numeric, ADD COLUMN raw_key text;

-- Amounts of rows kept before this migration, read from their raw bytes where those are a JSON
-- object with a positive whole amount (anything else stays NULL: unknown, not zero).
CREATE FUNCTION pg_temp.kept_amount(raw bytea) RETURNS numeric LANGUAGE plpgsql AS $$
DECLARE
    amount numeric;
BEGIN
    amount := (convert_from(raw, 'UTF8')::jsonb ->> 'amount')::numeric;
    RETURN CASE WHEN amount > 0 AND amount = trunc(amount) THEN amount END;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;
UPDATE paystream.kept_records SET amount = pg_temp.kept_amount(raw) WHERE raw IS NOT NULL;

CREATE INDEX kept_records_payment_id ON paystream.kept_records (payment_id);
CREATE INDEX kept_records_unresolved ON paystream.kept_records (reason) WHERE resolved_at IS NULL;

CREATE TABLE paystream.replays (
    kept_id bigint NOT NULL REFERENCES paystream.kept_records (id) ON DELETE CASCADE,
    replayed_at timestamptz NOT NULL DEFAULT now(),
    outcome text NOT NULL CHECK (outcome IN ('stored', 'kept')),
    reason text,
    description text,
    attempted boolean NOT NULL
);
CREATE INDEX replays_kept_id ON paystream.replays (kept_id);
