-- The database owns the stream position: what it holds is what it has made durable, so a database
-- restored from a backup, or failed over to a standby that missed the last commits, is filled
-- again from Kafka's retained log rather than trusting the group's committed offsets.
--
-- positions: per partition, the offset below which every record has a durable outcome here.
-- done_ranges: each batch's span of offsets [first_offset, end_offset), written in the batch's own
-- transaction. Batches of a partition finish in any order; a range that starts at or below a
-- partition's position is folded into it (store.fold_positions), and deleted.
CREATE TABLE paystream.positions (
    topic text NOT NULL,
    "partition" integer NOT NULL,
    next_offset bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, "partition")
);

CREATE TABLE paystream.done_ranges (
    topic text NOT NULL,
    "partition" integer NOT NULL,
    first_offset bigint NOT NULL,
    end_offset bigint NOT NULL CHECK (end_offset > first_offset),
    PRIMARY KEY (topic, "partition", first_offset, end_offset)
);

-- Records that left Kafka unread (retention, deleted records) are kept as one gap row each run of
-- them: offset is the first missing one, last_offset the last, raw is NULL and kafka_ts is -1
-- (no record has that identity).
ALTER TABLE paystream.kept_records ADD COLUMN last_offset bigint;
