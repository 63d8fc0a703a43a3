-- paystream's own tables live in their own schema; the retailer's tables are never altered.
CREATE SCHEMA IF NOT EXISTS paystream;

-- Which Kafka record each stored payment came from. Tells a redelivery (same record) from a
-- duplicate (another record with the same payment_id). No foreign key: the simulator's /start
-- deletes from payments.
CREATE TABLE paystream.payment_origins (
    payment_id varchar(100) PRIMARY KEY,
    topic text NOT NULL,
    "partition" integer NOT NULL,
    "offset" bigint NOT NULL,
    kafka_ts bigint NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payment_origins_record ON paystream.payment_origins (topic, "partition", "offset");

-- Every record that did not become a stored payment, with its raw bytes. Doubles as the outbox of
-- error reports: rows with reported_at NULL are still to be delivered to the log service.
CREATE TABLE paystream.kept_records (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    "partition" integer NOT NULL,
    "offset" bigint NOT NULL,
    kafka_ts bigint NOT NULL,
    raw bytea,
    payment_id text,
    error_type text NOT NULL CHECK (error_type IN ('database', 'network', 'other')),
    reason text NOT NULL,
    description text NOT NULL,
    kept_at timestamptz NOT NULL DEFAULT now(),
    reported_at timestamptz,
    report_attempts integer NOT NULL DEFAULT 0,
    next_report_at timestamptz NOT NULL DEFAULT now(),
    last_report_error text,
    resolved_at timestamptz,
    replays integer NOT NULL DEFAULT 0,
    UNIQUE (topic, "partition", "offset", kafka_ts)
);
CREATE INDEX kept_records_unreported ON paystream.kept_records (id)
    WHERE reported_at IS NULL;
CREATE INDEX kept_records_kept_at ON paystream.kept_records (kept_at);
