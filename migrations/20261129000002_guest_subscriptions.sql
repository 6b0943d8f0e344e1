-- The principal (JWT sub) that created a subscription: webhook pushes obey the queue's
-- allowedConsumers for it, as pulls do for the caller. NULL for older rows: admitted only
-- by an empty allowedConsumers.
ALTER TABLE message_subscriptions ADD COLUMN principal TEXT;

-- A consumer group belongs to its tenant: a guest of a public queue may use any group and
-- consumer name, including ones the owner uses, without colliding (or learning of them).
ALTER TABLE message_subscriptions DROP CONSTRAINT message_subscriptions_member_key;
ALTER TABLE message_subscriptions ADD CONSTRAINT message_subscriptions_member_key
    UNIQUE (topic_id, tenant_id, consumer_group, consumer_name);
DROP INDEX message_subscriptions_topic_idx;
CREATE INDEX message_subscriptions_topic_idx
    ON message_subscriptions (topic_id, tenant_id, consumer_group);
