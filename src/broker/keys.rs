//! The Redis key layout. Nothing else in the service formats a Redis key.
//!
//! Every key of one queue partition carries the same Redis Cluster hash tag,
//! `{<queue id>.<partition>}`, so each Lua script touches a single slot and the service runs
//! unchanged on Redis Cluster:
//!
//! ```text
//! <prefix>{<queue id>.<p>}:stream    the partition's stream (the messages)
//! <prefix>{<queue id>.<p>}:delayed   sorted set of delayed message ids, scored by the time
//!                                    the scheduler handles them (due time, or expiry if sooner)
//! <prefix>{<queue id>.<p>}:delayed-envelopes  hash of delayed message id -> envelope
//! <prefix>{<queue id>.<p>}:bytes     hash: original and stored payload bytes published
//! <prefix>{<queue id>.<p>}:expiry    sorted set of short-lived stream messages by expiry
//! <prefix>{<queue id>.<p>}:journal   stream of record events (scheduled, expired, cancelled)
//!                                    for the recorder; entries are deleted once recorded
//! <prefix>{<queue id>.<p>}:trimmed   hash: consumer group -> entries retention removed
//!                                    before the group read them
//! <prefix>{<queue id>.<p>}:ids       hash: producer messageId -> where and when it was stored
//!                                    (idempotency records, kept DEDUP_WINDOW_MS)
//! <prefix>{<queue id>.<p>}:cancelled hash: messageId -> when it was cancelled (10 min)
//! <prefix>{<queue id>.<p>}:expiring  sorted set: `id:<messageId>` / `cancelled:<messageId>`
//!                                    -> when that record lapses; the publish, cancel and
//!                                    release scripts remove lapsed records as they pass
//! <prefix>{<queue id>.<p>}:deleted   tombstone of a deleted queue (24 h): scripts that would
//!                                    write the partition do nothing, so a publish racing the
//!                                    deletion on another instance cannot bring it back
//! <prefix>{<queue id>.<p>}:inflight:<group>  entry id -> ack deadline of its delivery
//! <prefix>{<queue id>.<p>}:retry:<group>     entry id -> when a failed delivery is retried
//! <prefix>{<queue id>.<p>}:attempts:<group>  entry id -> deliveries made (absent = 1)
//! ```
//!
//! Per tenant: `<prefix>{rate.<tenant id>}:<second>:requests|bytes`, publish counters of one
//! second (expire after two).
//!
//! Keys name the queue by its id, not its name: a queue deleted and created again under the
//! same name never sees the old queue's data, and keys that outlive a deletion (idempotency
//! keys, which expire on their own) can never be mistaken for the new queue's.

use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct KeyLayout {
    prefix: String,
}

/// The delivery state of one consumer group on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupKeys {
    /// Sorted set: stream entry id → ack deadline (ms) of its current delivery.
    pub inflight: String,
    /// Sorted set: stream entry id → when its next delivery is due (ms), after a failure.
    pub retry: String,
    /// Hash: stream entry id → deliveries made so far (absent = 1).
    pub attempts: String,
}

impl GroupKeys {
    pub fn all(&self) -> [&str; 3] {
        [&self.inflight, &self.retry, &self.attempts]
    }
}

/// The keys of one queue partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionKeys {
    pub stream: String,
    pub delayed: String,
    pub delayed_envelopes: String,
    pub journal: String,
    /// Hash: `original` and `stored` payload bytes of the messages stored.
    pub bytes: String,
    /// Sorted set: `<entry id>|<message id>` → expiry (ms) of stream messages whose `ttlMs`
    /// ends before retention would remove them, so they are marked expired on time.
    pub expiry: String,
    /// Hash: consumer group → entries retention removed before the group read them.
    pub trimmed: String,
    /// Hash: producer message id → `<offset>|<published at>|<scheduled at>`.
    pub ids: String,
    /// Hash: message id → when it was cancelled (ms).
    pub cancelled: String,
    /// Sorted set: `id:<message id>` and `cancelled:<message id>` → when the record lapses.
    pub expiring: String,
    /// Present for a while after the queue was deleted.
    pub deleted: String,
}

impl PartitionKeys {
    /// Every key that holds this partition's data, for deletion (the tombstone aside).
    pub fn all(&self) -> [&str; 10] {
        [
            &self.stream,
            &self.delayed,
            &self.delayed_envelopes,
            &self.journal,
            &self.bytes,
            &self.expiry,
            &self.trimmed,
            &self.ids,
            &self.cancelled,
            &self.expiring,
        ]
    }
}

impl KeyLayout {
    pub fn new(prefix: impl Into<String>) -> Self {
        KeyLayout {
            prefix: prefix.into(),
        }
    }

    pub fn partition(&self, queue_id: Uuid, partition: u16) -> PartitionKeys {
        let tag = format!("{}{{{}.{}}}", self.prefix, queue_id, partition);
        PartitionKeys {
            stream: format!("{tag}:stream"),
            delayed: format!("{tag}:delayed"),
            delayed_envelopes: format!("{tag}:delayed-envelopes"),
            journal: format!("{tag}:journal"),
            bytes: format!("{tag}:bytes"),
            expiry: format!("{tag}:expiry"),
            trimmed: format!("{tag}:trimmed"),
            ids: format!("{tag}:ids"),
            cancelled: format!("{tag}:cancelled"),
            expiring: format!("{tag}:expiring"),
            deleted: format!("{tag}:deleted"),
        }
    }

    /// The delivery state of consumer group `group` on one partition.
    pub fn group(&self, queue_id: Uuid, partition: u16, group: &str) -> GroupKeys {
        let tag = format!("{}{{{}.{}}}", self.prefix, queue_id, partition);
        GroupKeys {
            inflight: format!("{tag}:inflight:{group}"),
            retry: format!("{tag}:retry:{group}"),
            attempts: format!("{tag}:attempts:{group}"),
        }
    }

    /// A lease held by one instance for a singleton job.
    pub fn lease(&self, name: &str) -> String {
        format!("{}lease:{name}", self.prefix)
    }

    /// A tenant's publish counters (requests, bytes) of one second, in one slot.
    pub fn rate_window(&self, tenant_id: Uuid, unix_second: i64) -> (String, String) {
        let tag = format!("{}{{rate.{}}}", self.prefix, tenant_id);
        (
            format!("{tag}:{unix_second}:requests"),
            format!("{tag}:{unix_second}:bytes"),
        )
    }

    /// Whether `key` is a partition's journal (as opposed to its message stream).
    pub fn is_journal(key: &str) -> bool {
        key.ends_with(":journal")
    }

    pub fn partitions(
        &self,
        queue_id: Uuid,
        count: u16,
    ) -> impl Iterator<Item = PartitionKeys> + '_ {
        (0..count).map(move |partition| self.partition(queue_id, partition))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').unwrap();
        let close = key[open..].find('}').unwrap() + open;
        &key[open + 1..close]
    }

    #[test]
    fn keys_of_a_partition_share_one_hash_tag() {
        let layout = KeyLayout::new("mq:");
        let id = Uuid::nil();
        let keys = layout.partition(id, 3);
        assert_eq!(keys.stream, format!("mq:{{{id}.3}}:stream"));
        let tags: Vec<_> = keys
            .all()
            .iter()
            .chain([&keys.deleted.as_str()])
            .map(|k| hash_tag(k).to_owned())
            .collect();
        assert!(tags.iter().all(|t| t == &tags[0]));
        assert_ne!(hash_tag(&layout.partition(id, 4).stream), tags[0]);
    }
}
