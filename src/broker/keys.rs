//! The Redis key layout. Nothing else in the service formats a Redis key.
//!
//! Every key of one queue carries the same Redis Cluster hash tag, `{<queue id>}`, so every
//! Lua script over a queue touches a single slot: one script stores a whole publish request
//! across partitions (a batch is stored entirely or not at all, and a `messageId` is one
//! idempotency record for the queue whatever partition its `key` routes to). Queues spread
//! over the cluster's slots; one queue lives on one node, as a RabbitMQ queue or a BullMQ
//! queue does.
//!
//! ```text
//! per partition p:
//! <prefix>{<queue id>}:<p>:stream    the partition's stream (the messages)
//! <prefix>{<queue id>}:<p>:delayed   sorted set of delayed message ids, scored by the time
//!                                    the scheduler handles them (due time, or expiry if sooner)
//! <prefix>{<queue id>}:<p>:delayed-envelopes  hash of delayed message id -> envelope
//! <prefix>{<queue id>}:<p>:bytes     hash: original and stored payload bytes published, and
//!                                    `live`: the stored bytes still there (an estimate: trims
//!                                    take their share of it; exact when the partition empties)
//! <prefix>{<queue id>}:<p>:expiry    sorted set of short-lived stream messages by expiry
//! <prefix>{<queue id>}:<p>:journal   stream of record events (scheduled, expired, cancelled,
//!                                    deliveries) for the recorder; deleted once recorded
//! <prefix>{<queue id>}:<p>:trimmed   hash: consumer group -> entries retention removed
//!                                    before the group read them
//! <prefix>{<queue id>}:<p>:inflight:<group>  entry id -> ack deadline of its delivery
//! <prefix>{<queue id>}:<p>:retry:<group>     entry id -> when a failed delivery is retried
//! <prefix>{<queue id>}:<p>:attempts:<group>  entry id -> deliveries made (absent = 1)
//! per queue:
//! <prefix>{<queue id>}:ids           hash: producer messageId -> where and when it was stored
//!                                    (idempotency records, kept DEDUP_WINDOW_MS)
//! <prefix>{<queue id>}:unrecorded    hash: messageId -> `<p>|<offset>` of stream messages the
//!                                    recorder has not written to PostgreSQL yet (so a lookup
//!                                    finds a message the moment its publish answered)
//! <prefix>{<queue id>}:cancelled     hash: messageId -> when it was cancelled (10 min)
//! <prefix>{<queue id>}:expiring      sorted set: `id:<messageId>` / `cancelled:<messageId>`
//!                                    -> when that record lapses; the publish, cancel and
//!                                    release scripts remove lapsed records as they pass
//! <prefix>{<queue id>}:stored        payload bytes stored now (streams and delayed sets), kept
//!                                    by the publish, trim and purge scripts; the tenant byte
//!                                    quota sums it over the tenant's queues
//! <prefix>{<queue id>}:announced     present while a wake-up for the queue's new messages went
//!                                    out and no consumer has found the queue empty since
//!                                    (see `service::wake`): later publishes skip announcing
//! <prefix>{<queue id>}:deleted       tombstone of a deleted queue (24 h): scripts that would
//!                                    write the queue do nothing, so a publish racing the
//!                                    deletion on another instance cannot bring it back
//! ```
//!
//! The wake-up channel (Pub/Sub, no key): `<prefix>wake`.
//!
//! Per tenant: `<prefix>{rate.<tenant id>}:<second>:requests|bytes`, publish counters of one
//! second (expire after two).
//!
//! Keys name the queue by its id, not its name: a queue deleted and created again under the
//! same name never sees the old queue's data. Every key has a fixed name (per consumer group
//! for delivery state), so deleting a queue removes all of them.

use std::fmt::Write;

use uuid::Uuid;

/// The suffixes of a partition's message data keys (delivery state per group aside).
const PARTITION_DATA: [&str; 6] = [
    "stream",
    "delayed",
    "delayed-envelopes",
    "journal",
    "bytes",
    "expiry",
];

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

/// The keys of one queue partition, with the queue-wide keys its scripts also use.
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
    /// Hash: producer message id → `<partition>|<offset>|<published at>|<scheduled at>`.
    pub ids: String,
    /// Hash: message id → `<partition>|<offset>` of stream messages not recorded yet.
    pub unrecorded: String,
    /// Hash: message id → when it was cancelled (ms).
    pub cancelled: String,
    /// Sorted set: `id:<message id>` and `cancelled:<message id>` → when the record lapses.
    pub expiring: String,
    /// Present while a wake-up for the queue went out and nobody found it empty since.
    pub announced: String,
    /// Payload bytes the queue stores now (all partitions), for the tenant byte quota.
    pub stored: String,
    /// Present for a while after the queue was deleted.
    pub deleted: String,
}

impl PartitionKeys {
    /// The keys that hold this partition's own data, for deletion.
    pub fn own(&self) -> [&str; 7] {
        [
            &self.stream,
            &self.delayed,
            &self.delayed_envelopes,
            &self.journal,
            &self.bytes,
            &self.expiry,
            &self.trimmed,
        ]
    }

    /// The queue-wide keys (the same for every partition of the queue), tombstone aside.
    pub fn queue_wide(&self) -> [&str; 6] {
        [
            &self.ids,
            &self.unrecorded,
            &self.cancelled,
            &self.expiring,
            &self.announced,
            &self.stored,
        ]
    }
}

impl KeyLayout {
    pub fn new(prefix: impl Into<String>) -> Self {
        KeyLayout {
            prefix: prefix.into(),
        }
    }

    fn tag(&self, queue_id: Uuid) -> String {
        format!("{}{{{}}}", self.prefix, queue_id)
    }

    pub fn partition(&self, queue_id: Uuid, partition: u16) -> PartitionKeys {
        let tag = self.tag(queue_id);
        let part = format!("{tag}:{partition}");
        PartitionKeys {
            stream: format!("{part}:stream"),
            delayed: format!("{part}:delayed"),
            delayed_envelopes: format!("{part}:delayed-envelopes"),
            journal: format!("{part}:journal"),
            bytes: format!("{part}:bytes"),
            expiry: format!("{part}:expiry"),
            trimmed: format!("{part}:trimmed"),
            ids: format!("{tag}:ids"),
            unrecorded: format!("{tag}:unrecorded"),
            cancelled: format!("{tag}:cancelled"),
            expiring: format!("{tag}:expiring"),
            announced: format!("{tag}:announced"),
            stored: self.stored(queue_id),
            deleted: format!("{tag}:deleted"),
        }
    }

    /// The keys of the publish script in its order: the queue's `ids`, `unrecorded`,
    /// `cancelled`, `expiring`, `deleted`, `announced` and `stored`, then per partition its `stream`,
    /// `delayed`, `delayed_envelopes`, `journal`, `bytes` and `expiry` (the same names
    /// `partition` gives). Built in place: this runs on every publish, where building every
    /// partition's full `PartitionKeys` cost more than the script's own argument parsing.
    pub fn publish_keys(&self, queue_id: Uuid, partitions: &[u16]) -> Vec<String> {
        const QUEUE_WIDE: [&str; 7] = [
            "ids",
            "unrecorded",
            "cancelled",
            "expiring",
            "deleted",
            "announced",
            "stored",
        ];
        let tag = self.tag(queue_id);
        let key = |middle: &str, suffix: &str| {
            let mut key = String::with_capacity(tag.len() + middle.len() + suffix.len() + 2);
            key.push_str(&tag);
            key.push_str(middle);
            key.push(':');
            key.push_str(suffix);
            key
        };
        let mut keys =
            Vec::with_capacity(QUEUE_WIDE.len() + PARTITION_DATA.len() * partitions.len());
        keys.extend(QUEUE_WIDE.iter().map(|suffix| key("", suffix)));
        let mut number = String::with_capacity(7);
        for partition in partitions {
            number.clear();
            // Writing to a String cannot fail.
            let _ = write!(number, ":{partition}");
            keys.extend(PARTITION_DATA.iter().map(|suffix| key(&number, suffix)));
        }
        keys
    }

    /// A partition's `stream` and `journal` alone (the names `partition` gives), for paths
    /// that run per delivery and need no other key.
    pub fn stream_and_journal(&self, queue_id: Uuid, partition: u16) -> (String, String) {
        let part = format!("{}:{partition}", self.tag(queue_id));
        (format!("{part}:stream"), format!("{part}:journal"))
    }

    /// The queue's `unrecorded` index (the name `partition` gives).
    pub fn unrecorded(&self, queue_id: Uuid) -> String {
        format!("{}:unrecorded", self.tag(queue_id))
    }

    /// Payload bytes the queue stores now (the `stored` of its partitions' keys).
    pub fn stored(&self, queue_id: Uuid) -> String {
        format!("{}:stored", self.tag(queue_id))
    }

    /// The delivery state of consumer group `group` on one partition.
    pub fn group(&self, queue_id: Uuid, partition: u16, group: &str) -> GroupKeys {
        let part = format!("{}:{partition}", self.tag(queue_id));
        GroupKeys {
            inflight: format!("{part}:inflight:{group}"),
            retry: format!("{part}:retry:{group}"),
            attempts: format!("{part}:attempts:{group}"),
        }
    }

    /// The partition keys of the layout before queue-wide hash tags (`{<queue id>.<p>}`), for
    /// moving data stored by earlier releases: (old key, new key) pairs.
    pub fn earlier_partition_layout(
        &self,
        queue_id: Uuid,
        partition: u16,
        groups: &[&str],
    ) -> Vec<(String, String)> {
        let old = format!("{}{{{}.{}}}", self.prefix, queue_id, partition);
        let new = format!("{}:{partition}", self.tag(queue_id));
        let mut suffixes: Vec<String> = PARTITION_DATA.iter().map(|s| (*s).to_owned()).collect();
        for group in groups {
            for kind in ["inflight", "retry", "attempts"] {
                suffixes.push(format!("{kind}:{group}"));
            }
        }
        suffixes
            .into_iter()
            .map(|suffix| (format!("{old}:{suffix}"), format!("{new}:{suffix}")))
            .collect()
    }

    /// Records which key layout the data under this prefix follows.
    pub fn layout_marker(&self) -> String {
        format!("{}layout", self.prefix)
    }

    /// The Pub/Sub channel of wake-ups between instances (`service::wake`).
    pub fn wake_channel(&self) -> String {
        format!("{}wake", self.prefix)
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

    /// A tenant's count of `budget` calls (changes, monitoring views) in one second.
    pub fn budget_window(&self, tenant_id: Uuid, unix_second: i64, budget: &str) -> String {
        format!(
            "{}{{rate.{}}}:{unix_second}:{budget}",
            self.prefix, tenant_id
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
    fn every_key_of_a_queue_shares_one_hash_tag() {
        let layout = KeyLayout::new("mq:");
        let id = Uuid::nil();
        let keys = layout.partition(id, 3);
        assert_eq!(keys.stream, format!("mq:{{{id}}}:3:stream"));
        let group = layout.group(id, 5, "g");
        let tags: Vec<_> = keys
            .own()
            .iter()
            .chain(keys.queue_wide().iter())
            .chain([&keys.deleted.as_str()])
            .chain(group.all().iter())
            .map(|k| hash_tag(k).to_owned())
            .collect();
        assert!(tags.iter().all(|t| t == &tags[0]));
        assert_ne!(
            hash_tag(&layout.partition(Uuid::from_u128(1), 3).stream),
            tags[0]
        );
        assert_ne!(layout.partition(id, 4).stream, keys.stream);
    }

    #[test]
    fn single_key_helpers_name_the_partition_keys() {
        let layout = KeyLayout::new("mq:");
        let id = Uuid::from_u128(7);
        let keys = layout.partition(id, 2);
        assert_eq!(
            layout.stream_and_journal(id, 2),
            (keys.stream, keys.journal)
        );
        assert_eq!(layout.unrecorded(id), keys.unrecorded);
    }

    #[test]
    fn publish_keys_name_the_partition_keys() {
        let layout = KeyLayout::new("mq:");
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef);
        let keys = layout.publish_keys(id, &[3, 0, 12]);
        let queue = layout.partition(id, 0);
        let mut expected = vec![
            queue.ids,
            queue.unrecorded,
            queue.cancelled,
            queue.expiring,
            queue.deleted,
            queue.announced,
            queue.stored,
        ];
        for partition in [3, 0, 12] {
            let p = layout.partition(id, partition);
            expected.extend([
                p.stream,
                p.delayed,
                p.delayed_envelopes,
                p.journal,
                p.bytes,
                p.expiry,
            ]);
        }
        assert_eq!(keys, expected);
    }
}
