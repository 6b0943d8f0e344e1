-- A message its dead-letter queue refuses for good (schema, limits, ACL) is set aside once
-- instead of being redelivered forever: its attempt is recorded as 'set_aside' and the
-- message itself kept in the record quarantine with the reason.
ALTER TABLE consumption_records DROP CONSTRAINT consumption_records_status_check;
ALTER TABLE consumption_records ADD CONSTRAINT consumption_records_status_check
    CHECK (status IN ('delivered', 'acked', 'failed', 'filtered', 'dead_letter', 'expired',
                      'set_aside'));
ALTER TABLE record_quarantine DROP CONSTRAINT record_quarantine_source_check;
ALTER TABLE record_quarantine ADD CONSTRAINT record_quarantine_source_check
    CHECK (source IN ('stream', 'journal', 'dead_letter'));
