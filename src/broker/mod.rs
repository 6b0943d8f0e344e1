//! Redis: the messages. Every Redis command of the service is issued below this module, and
//! every multi-key state change is one Lua script over the keys of one partition (one hash
//! slot; see `keys`).

mod connections;
pub mod consume;
pub mod keys;
pub mod publish;
pub mod rate_limit;
pub mod recorder;
pub mod retention;
pub mod scheduler;
mod scripts;
pub mod wake;

use std::sync::LazyLock;
use std::time::Duration;

use deadpool_redis::redis;
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};

use uuid::Uuid;

use crate::domain::queue::Queue;
use crate::error::ApiResult;
use keys::{KeyLayout, PartitionKeys};
use scripts::LuaScript;

/// The consumer group through which the service records every stored message in
/// PostgreSQL. Subscription group names start with a letter or digit, so they never collide.
pub const RECORDER_GROUP: &str = "__recorder";

/// How long a deleted queue's partitions refuse writes: far longer than any instance keeps a
/// queue in its cache (2 s, or while PostgreSQL is unreachable).
const DELETION_TOMBSTONE_MS: u64 = 24 * 3600 * 1000;

/// How long a queue's `announced` key stands at most: however it was left, a publish after
/// that announces the queue again (`service::wake`).
pub(crate) const ANNOUNCEMENT_LIFETIME_MS: u64 = 60_000;

/// How long a request waits for a pooled connection or a new one.
const POOL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Broker {
    /// Counted in the pool gauges of `/metrics`; commands go over `connections`.
    pool: Pool,
    connections: std::sync::Arc<connections::Connections>,
    keys: KeyLayout,
    /// For the dedicated Pub/Sub connection of wake-ups (`wake`): the single Redis, or each
    /// seed node of a cluster in turn (a cluster passes every PUBLISH to every node).
    wake_nodes: std::sync::Arc<[redis::Client]>,
    next_wake_node: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// This instance's id, as its announcements name it.
    origin: std::sync::Arc<str>,
    /// Replicas that must confirm a publish before it answers (`REDIS_MIN_REPLICAS_ACK`).
    replicas_to_confirm: u32,
}

/// The stats script's answer: length, delayed, pending, lag, oldest pending (ms, -1 for
/// none), unrecorded, original bytes, stored bytes.
type PartitionStatsReply = (u64, u64, u64, u64, i64, u64, u64, u64);

/// What Redis knows about a queue, summed over its partitions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStreamStats {
    pub message_count: u64,
    pub delayed_count: u64,
    pub pending_count: u64,
    pub lag: u64,
    /// Stream time (ms since epoch) of the oldest delivered-but-unacked entry.
    pub oldest_pending_ms: Option<u64>,
    /// Entries and events the recorder has not written to PostgreSQL yet.
    pub unrecorded: u64,
    /// Payload bytes published (since create or purge), as sent and as stored.
    pub original_bytes: u64,
    pub stored_bytes: u64,
}

/// Per partition: length, delayed, pending and lag summed over the consumer groups (the
/// recorder, ARGV[1], is not a consumer), and the
/// oldest pending entry's time (-1 when nothing is pending).
static PARTITION_STATS: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
local stream, delayed, journal, bytes = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local length, pending, lag, oldest, unrecorded = 0, 0, 0, -1, 0
if redis.call('EXISTS', stream) == 1 then
  length = redis.call('XLEN', stream)
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local group = {}
    for i = 1, #info, 2 do group[info[i]] = info[i + 1] end
    if group['name'] == ARGV[1] then
      unrecorded = unrecorded + group['pending'] + (group['lag'] or 0)
    else
    pending = pending + group['pending']
    if group['lag'] then
      lag = lag + group['lag']
    else
      -- Redis cannot derive the lag after deletions; count what lies past the group's cursor.
      lag = lag + #redis.call('XRANGE', stream, '(' .. group['last-delivered-id'], '+')
    end
    if group['pending'] > 0 then
      local summary = redis.call('XPENDING', stream, group['name'])
      local ms = tonumber(string.match(summary[2], '^(%d+)'))
      if oldest < 0 or ms < oldest then oldest = ms end
    end
    end
  end
end
-- Journal entries are deleted once recorded: what is left is not recorded yet.
unrecorded = unrecorded + redis.call('XLEN', journal)
local sizes = redis.call('HMGET', bytes, 'original', 'stored')
return {length, redis.call('ZCARD', delayed), pending, lag, oldest, unrecorded,
        tonumber(sizes[1]) or 0, tonumber(sizes[2]) or 0}
"#,
    )
});

/// Empties one partition but keeps the stream (and so its consumer groups): counts what is
/// stored and delayed, then removes it.
static PARTITION_PURGE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: stream, delayed set, delayed envelopes, byte counts, expiry watch, unrecorded index,
-- the queue's bytes stored.
local removed = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
local live = tonumber(redis.call('HGET', KEYS[4], 'live') or '0')
if live > 0 and redis.call('DECRBY', KEYS[7], string.format('%.0f', live)) < 0 then
  redis.call('SET', KEYS[7], '0')
end
redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
return removed
"#,
    )
});

/// The key layout this release writes (`keys`); recorded once earlier data was moved to it.
const CURRENT_LAYOUT: &str = "queue-tags";

/// Renames a partition's keys from the layout of earlier releases to the current one: KEYS
/// are (old, new) pairs. Returns how many keys moved. Keys already at their new name stay.
static MOVE_KEYS: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
local moved = 0
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('EXISTS', KEYS[i + 1]) == 0 then
    redis.call('RENAME', KEYS[i], KEYS[i + 1])
    moved = moved + 1
  end
end
return moved
"#,
    )
});

impl Broker {
    /// Moves the Redis data of earlier releases (partition-wide hash tags) to the current
    /// layout (queue-wide tags): `queues` are (queue id, partitions, consumer groups). Only a
    /// single Redis can rename across hash slots; returns the keys moved.
    pub async fn move_earlier_layout(&self, queues: &[(Uuid, u16, Vec<String>)]) -> ApiResult<u64> {
        if self.is_cluster() {
            // The earlier layout could not run on a cluster: there is nothing to move.
            return Ok(0);
        }
        let mut connection = self.connection().await?;
        let marker = self.keys.layout_marker();
        let done: Option<String> = redis::cmd("GET")
            .arg(&marker)
            .query_async(&mut connection)
            .await?;
        if done.is_some() {
            return Ok(0);
        }
        let mut moved = 0;
        for (queue_id, partition_count, groups) in queues {
            let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
            for partition in 0..*partition_count {
                let pairs = self
                    .keys
                    .earlier_partition_layout(*queue_id, partition, &groups);
                let keys: Vec<&str> = pairs
                    .iter()
                    .flat_map(|(old, new)| [old.as_str(), new.as_str()])
                    .collect();
                let mut pipeline = redis::pipe();
                MOVE_KEYS.add_to(&mut pipeline, &keys, &[]);
                let (count,): (u64,) =
                    scripts::run(&mut connection, &pipeline, &[&MOVE_KEYS]).await?;
                moved += count;
            }
        }
        let () = redis::cmd("SET")
            .arg(&marker)
            .arg(CURRENT_LAYOUT)
            .query_async(&mut connection)
            .await?;
        Ok(moved)
    }

    /// Builds the pool; connections are made on first use, so a Redis that is down at start-up
    /// shows in health instead of stopping the service.
    pub fn new(
        url: &str,
        cluster_nodes: &[String],
        replicas_to_confirm: u32,
        pool_size: usize,
        key_prefix: &str,
        origin: &str,
    ) -> anyhow::Result<Broker> {
        let mut config = deadpool_redis::Config::from_url(url);
        config.pool = Some(PoolConfig {
            max_size: pool_size,
            timeouts: Timeouts {
                wait: Some(POOL_TIMEOUT),
                create: Some(POOL_TIMEOUT),
                recycle: Some(POOL_TIMEOUT),
            },
            ..PoolConfig::default()
        });
        let pool = config.create_pool(Some(Runtime::Tokio1))?;
        let (connections, wake_nodes) = if cluster_nodes.is_empty() {
            let shared =
                connections::SharedConnections::new(redis::Client::open(url)?, POOL_TIMEOUT);
            (
                connections::Connections::Single(shared),
                vec![redis::Client::open(url)?],
            )
        } else {
            // The cluster's nodes take the credentials of REDIS_URL.
            let credentials = redis::IntoConnectionInfo::into_connection_info(url)?.redis;
            let nodes = cluster_nodes
                .iter()
                .map(|node| {
                    let mut info = redis::IntoConnectionInfo::into_connection_info(node.as_str())?;
                    info.redis.username.clone_from(&credentials.username);
                    info.redis.password.clone_from(&credentials.password);
                    Ok(info)
                })
                .collect::<redis::RedisResult<Vec<_>>>()?;
            let cluster = connections::ClusterConnections::new(&nodes, POOL_TIMEOUT)?;
            let seeds = nodes
                .into_iter()
                .map(redis::Client::open)
                .collect::<Result<_, _>>()?;
            (connections::Connections::Cluster(cluster), seeds)
        };
        Ok(Broker {
            pool,
            keys: KeyLayout::new(key_prefix),
            connections: std::sync::Arc::new(connections),
            wake_nodes: wake_nodes.into(),
            next_wake_node: std::sync::Arc::default(),
            origin: origin.into(),
            replicas_to_confirm,
        })
    }

    /// A connection for ordinary commands (see `connections`).
    async fn connection(&self) -> ApiResult<connections::RedisConnection> {
        Ok(self.connections.get().await?)
    }

    /// Whether the messages live on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(*self.connections, connections::Connections::Cluster(_))
    }

    pub fn keys(&self) -> &KeyLayout {
        &self.keys
    }

    pub async fn ping(&self) -> ApiResult<()> {
        let mut connection = self.connection().await?;
        let _: String = redis::cmd("PING").query_async(&mut connection).await?;
        Ok(())
    }

    /// (connections open, connections idle)
    pub fn pool_usage(&self) -> (usize, usize) {
        let status = self.pool.status();
        (status.size, status.available)
    }

    pub async fn queue_stats(&self, queue: &Queue) -> ApiResult<QueueStreamStats> {
        let mut all = self.queues_stats(std::slice::from_ref(queue)).await?;
        Ok(all.pop().unwrap_or_default())
    }

    /// Stats of many queues (monitoring views, Prometheus gauges), in bounded pipelines.
    pub async fn queues_stats(&self, queues: &[Queue]) -> ApiResult<Vec<QueueStreamStats>> {
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let partitions: Vec<PartitionKeys> = queues
            .iter()
            .flat_map(|queue| self.keys.partitions(queue.id, queue.partition_count))
            .collect();
        let mut connection = self.connection().await?;
        let partitions: Vec<PartitionStatsReply> = scripts::run_chunked(
            &mut connection,
            &PARTITION_STATS,
            partitions,
            |pipeline, keys| {
                PARTITION_STATS.add_to(
                    pipeline,
                    &[&keys.stream, &keys.delayed, &keys.journal, &keys.bytes],
                    &[RECORDER_GROUP.as_bytes()],
                );
            },
        )
        .await?;
        let mut partitions = partitions.into_iter();
        Ok(queues
            .iter()
            .map(|queue| {
                let mut stats = QueueStreamStats::default();
                for (length, delayed, pending, lag, oldest, unrecorded, original, stored) in
                    partitions.by_ref().take(usize::from(queue.partition_count))
                {
                    stats.original_bytes += original;
                    stats.stored_bytes += stored;
                    stats.message_count += length;
                    stats.delayed_count += delayed;
                    stats.pending_count += pending;
                    stats.lag += lag;
                    stats.unrecorded += unrecorded;
                    if let Ok(oldest) = u64::try_from(oldest) {
                        stats.oldest_pending_ms =
                            Some(stats.oldest_pending_ms.map_or(oldest, |o| o.min(oldest)));
                    }
                }
                stats
            })
            .collect())
    }

    /// Payload bytes the queues store now, summed (see `keys`: `stored`).
    pub async fn stored_bytes(&self, queue_ids: &[Uuid]) -> ApiResult<u64> {
        let commands = queue_ids
            .iter()
            .map(|queue_id| redis::Cmd::get(self.keys.stored(*queue_id)))
            .collect();
        let mut connection = self.connection().await?;
        let sizes: Vec<Option<i64>> = scripts::run_commands(&mut connection, commands).await?;
        Ok(sizes.into_iter().flatten().map(|n| n.max(0) as u64).sum())
    }

    /// Removes every stored and delayed message; returns how many.
    pub async fn purge_queue(&self, queue: &Queue) -> ApiResult<u64> {
        let mut pipeline = redis::pipe();
        for keys in self.keys.partitions(queue.id, queue.partition_count) {
            PARTITION_PURGE.add_to(
                &mut pipeline,
                &[
                    &keys.stream,
                    &keys.delayed,
                    &keys.delayed_envelopes,
                    &keys.bytes,
                    &keys.expiry,
                    &keys.unrecorded,
                    &keys.stored,
                ],
                &[],
            );
        }
        let mut connection = self.connection().await?;
        let removed: Vec<u64> =
            scripts::run(&mut connection, &pipeline, &[&PARTITION_PURGE]).await?;
        Ok(removed.into_iter().sum())
    }

    /// Removes all of the queue's keys: streams (with their consumer groups), delayed
    /// messages, journals, idempotency records, cancellation markers, counters, and the
    /// delivery state of `groups`; then leaves a tombstone for
    /// `DELETION_TOMBSTONE_MS`, so that an instance still holding the queue in its cache
    /// cannot write it back (the scripts that write a queue check it).
    pub async fn delete_queue(&self, queue: &Queue, groups: &[&str]) -> ApiResult<()> {
        let mut pipeline = redis::pipe();
        let queue_keys = self.keys.partition(queue.id, 0);
        pipeline
            .set(&queue_keys.deleted, "1")
            .arg("PX")
            .arg(DELETION_TOMBSTONE_MS)
            .ignore();
        // UNLINK: a large stream or hash is freed in the background.
        pipeline.unlink(queue_keys.queue_wide().as_slice()).ignore();
        for partition in 0..queue.partition_count {
            let keys = self.keys.partition(queue.id, partition);
            pipeline.unlink(keys.own().as_slice()).ignore();
            for group in groups {
                pipeline
                    .unlink(self.keys.group(queue.id, partition, group).all().as_slice())
                    .ignore();
            }
        }
        let mut connection = self.connection().await?;
        let () = pipeline.query_async(&mut connection).await?;
        Ok(())
    }
}
