-- The seed design's column names and columns, for operators and services that query these
-- tables. The project's own columns and statuses stay.

ALTER TABLE message_records RENAME COLUMN partition TO partition_id;
ALTER TABLE message_records RENAME COLUMN stream_offset TO offset_value;
ALTER TABLE message_records RENAME COLUMN payload_bytes TO payload_size;
ALTER TABLE message_records
    ADD COLUMN content_type TEXT,
    -- The JWT sub of the producer, or the name of the platform service that published.
    ADD COLUMN producer_id  TEXT,
    -- When the message was first acked by a consumer.
    ADD COLUMN consumed_at  TIMESTAMPTZ;
-- Rows written before: the time of their last change is the best known consumption time.
UPDATE message_records SET consumed_at = updated_at WHERE status = 'consumed';

ALTER TABLE consumption_records
    -- The consumer (subscription's consumerName) and the service instance that delivered.
    ADD COLUMN consumer_instance TEXT,
    -- The stream entry id of the delivered message (text: a Redis id is not an integer).
    ADD COLUMN offset_value      TEXT,
    ADD COLUMN processed_at      TIMESTAMPTZ,
    -- For a failed attempt to be retried: when.
    ADD COLUMN next_retry_at     TIMESTAMPTZ,
    ADD COLUMN retry_count       INTEGER NOT NULL DEFAULT 0;
UPDATE consumption_records
   SET processed_at = created_at, retry_count = GREATEST(attempt - 1, 0);
