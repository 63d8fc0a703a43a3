-- Account stamps a batch leaves due, in its own transaction, for a stamping pass to apply
-- (paystream.stamping). Stamping each batch in its own transaction locked the same account
-- rows in every batch at once: with four transactions in flight they waited for each other and
-- each row grew a long chain of versions: PostgreSQL spent a fifth to a third more per payment
-- with two instances than with one. A pass applies what several batches left due, at most a few
-- times a second, one pass at a time.
-- No key, no index: rows are only appended and then taken all at once.
CREATE TABLE paystream.stamps_due (
    account_id integer NOT NULL,
    latest timestamp NOT NULL
);
