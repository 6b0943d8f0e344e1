-- A dead letter sent back to its original queue (POST /queues/{name}/redrive) is marked
-- 'redriven' in the dead-letter queue's records: final, and never redriven twice.
ALTER TABLE message_records DROP CONSTRAINT message_records_status_check;
ALTER TABLE message_records ADD CONSTRAINT message_records_status_check
    CHECK (status IN ('scheduled', 'published', 'consumed', 'failed', 'dead_letter', 'expired',
                      'cancelled', 'redriven'));
