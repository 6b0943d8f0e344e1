-- A message whose ttl passed before it could be delivered to a subscription is recorded as
-- an "expired" attempt of that subscription.
ALTER TABLE consumption_records DROP CONSTRAINT consumption_records_status_check;
ALTER TABLE consumption_records ADD CONSTRAINT consumption_records_status_check
    CHECK (status IN ('delivered', 'acked', 'failed', 'filtered', 'dead_letter', 'expired'));
CREATE INDEX message_subscriptions_topic_idx ON message_subscriptions (topic_id, consumer_group);
