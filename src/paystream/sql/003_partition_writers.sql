-- Who writes the outcomes of each partition's records now: an owner of the partition, for one
-- assignment of it, or a replay. Every batch transaction holds its partitions' rows FOR SHARE, so
-- the batches of one writer run side by side; a new writer takes a row over with an UPDATE, which
-- waits until every transaction of the previous writer has ended. Replaces the per-partition
-- advisory lock, which serialised the batches of a single owner as well.
CREATE TABLE paystream.partition_writers (
    topic text NOT NULL,
    "partition" integer NOT NULL,
    writer uuid NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, "partition")
);
