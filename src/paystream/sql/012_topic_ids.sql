-- A position belongs to one log. Kafka gives every topic an id (a UUID) of its own, so a topic
-- deleted and created again under the same name is told apart from the one a position was
-- recorded in, whatever their offsets (paystream.position). seen_end is how far that log was
-- last seen to reach (its end as the consumer fetched it), so that records of a log that is gone
-- can be kept as a gap as far as they are known. NULL in both: recorded before they were kept
-- (the topic's id is adopted when the partition is next placed).
ALTER TABLE paystream.positions ADD COLUMN topic_id text, ADD COLUMN seen_end bigint;
