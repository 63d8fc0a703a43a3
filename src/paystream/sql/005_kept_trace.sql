-- The trace a kept record was kept in (W3C traceparent, while tracing is on): its report to the
-- log API, sent later and perhaps by another instance, continues that trace.
ALTER TABLE paystream.kept_records ADD COLUMN IF NOT EXISTS traceparent text;
