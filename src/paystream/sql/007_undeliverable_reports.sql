-- A report the log service refuses for what it says (a 4xx about its body) is sent again after
-- its own back-off, a few times; then it is undeliverable: no longer claimed by the relay, still
-- kept, listed with why (last_report_error) and counted apart from the outbox.
ALTER TABLE paystream.kept_records
    ADD COLUMN report_refusals integer NOT NULL DEFAULT 0,
    ADD COLUMN undeliverable_at timestamptz;

-- The outbox is what is still to deliver: the relay's claims and the depth read this index.
DROP INDEX paystream.kept_records_unreported;
CREATE INDEX kept_records_unreported ON paystream.kept_records (id)
    WHERE reported_at IS NULL AND undeliverable_at IS NULL;
