-- The seed design's names for the last columns of consumption_records: how long the
-- consumer took, its error, and when the attempt was settled. Nothing outside the service
-- reads the old names, so no views keep them.
ALTER TABLE consumption_records RENAME COLUMN processing_ms TO processing_time_ms;
ALTER TABLE consumption_records RENAME COLUMN error TO error_message;
ALTER TABLE consumption_records RENAME COLUMN processed_at TO consumed_at;
