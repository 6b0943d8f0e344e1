-- Records are removed once older than their queue's retentionMs (the record-retention worker):
-- consumption rows and quarantined entries are found by queue and time through these.
CREATE INDEX consumption_records_topic_created_idx ON consumption_records (topic_id, created_at);
CREATE INDEX record_quarantine_topic_created_idx ON record_quarantine (topic_id, created_at);
