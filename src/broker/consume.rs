//! Consumer groups and at-least-once delivery on Redis Streams.
//!
//! A consumer group of a queue is a Redis consumer group of the same name on each partition
//! stream. A delivered entry stays in the group's pending list until it is finally settled
//! (acked, filtered, expired or dead-lettered), so backlog and lag stay right. Beside it, per
//! partition and group:
//!
//! - `inflight`: entry → ack deadline of the current delivery. A deadline that passes is a
//!   failed attempt (the reclaimer settles it).
//! - `retry`: entry → when a failed entry may be delivered again (the retry schedule). Due
//!   retries are delivered before new entries, to this group only.
//! - `attempts`: entry → deliveries made.
//!
//! Every change is one Lua script over one partition's keys, so concurrent consumers, the
//! reclaimer and several service instances never deliver one entry twice at once or lose one.
//! Policy (how long to wait, when to dead-letter) is decided in Rust and passed in.

use std::sync::LazyLock;

use deadpool_redis::redis::{self, FromRedisValue};
use uuid::Uuid;

use super::keys::PartitionKeys;
use super::scripts::{self, LuaScript};
use super::{Broker, RECORDER_GROUP};
use crate::error::{ApiError, ApiResult};

static ENSURE_GROUP: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: stream, deletion tombstone. ARGV: group, start id ('$' or '0'), recorder group.
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[3], '0', 'MKSTREAM')
end
local created = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2])
if type(created) == 'table' and created.err then return 0 end
return 1
"#,
    )
});

static DESTROY_GROUP: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: stream, inflight, retry, attempts, trimmed counts. ARGV: group.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('XGROUP', 'DESTROY', KEYS[1], ARGV[1])
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('HDEL', KEYS[5], ARGV[1])
return 1
"#,
    )
});

static TAKE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: stream, inflight, retry, attempts.
-- ARGV: group, consumer, how many, now (ms), ack deadline of these deliveries (ms),
-- '1' for in-order delivery (nothing new while an entry of this partition is in flight or
-- waiting for its retry).
-- Returns {entry id, {field, value, ...}, deliveries} for each delivery: due retries first.
local stream, inflight, retry, attempts = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local want = tonumber(ARGV[3])
local ordered = ARGV[6] == '1'
local out = {}
if ordered then
  if redis.call('ZCARD', inflight) > 0 then return out end
  want = 1
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', retry, '-inf', ARGV[4], 'LIMIT', 0, want)) do
  redis.call('ZREM', retry, id)
  local entry = redis.call('XRANGE', stream, id, id)
  if #entry == 0 then
    -- Purged or trimmed while it waited: nothing left to deliver.
    redis.call('XACK', stream, ARGV[1], id)
    redis.call('HDEL', attempts, id)
  else
    local deliveries = (tonumber(redis.call('HGET', attempts, id)) or 1) + 1
    redis.call('HSET', attempts, id, deliveries)
    redis.call('ZADD', inflight, ARGV[5], id)
    redis.call('XCLAIM', stream, ARGV[1], ARGV[2], 0, id, 'JUSTID')
    out[#out + 1] = {id, entry[1][2], deliveries}
  end
end
local remaining = want - #out
if ordered and redis.call('ZCARD', retry) > 0 then remaining = 0 end
if remaining > 0 and redis.call('EXISTS', stream) == 1 then
  local read = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', remaining, 'STREAMS', stream, '>')
  if type(read) == 'table' and read.err then
    -- The group is gone (Redis lost its data): recreate it over what the stream holds.
    redis.call('XGROUP', 'CREATE', stream, ARGV[1], '0')
    read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', remaining, 'STREAMS', stream, '>')
  end
  if read then
    for _, entry in ipairs(read[1][2]) do
      redis.call('ZADD', inflight, ARGV[5], entry[1])
      out[#out + 1] = {entry[1], entry[2], 1}
    end
  end
end
return out
"#,
    )
});

static SETTLE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: stream, inflight, retry, attempts, journal, deletion tombstone.
-- ARGV: 1 group, 2 entry id, 3 outcome, 4 expected deadline ('' = any current delivery),
-- 5 required deliveries count ('' = any), 6 retry at (ms, outcome 'failed'), 7 recorder group,
-- 8 message id, 9 subscription id, 10 processing ms, 11 error, 12 now (ms), 13 consumer.
-- Outcomes: 'failed' schedules a retry; 'acked', 'filtered', 'expired', 'dead_letter' finish.
-- An ack also finishes an entry waiting for its retry (its late success still counts).
local stream, inflight, retry, attempts, journal = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, outcome = ARGV[2], ARGV[3]
-- The queue was deleted: nothing to settle, and no journal to bring back.
if redis.call('EXISTS', KEYS[6]) == 1 then return 0 end
local deadline = redis.call('ZSCORE', inflight, id)
if ARGV[4] ~= '' then
  if deadline ~= ARGV[4] then return 0 end
elseif not deadline then
  if outcome ~= 'acked' or not redis.call('ZSCORE', retry, id) then return 0 end
end
local deliveries = tonumber(redis.call('HGET', attempts, id)) or 1
if ARGV[5] ~= '' and deliveries ~= tonumber(ARGV[5]) then return 0 end
redis.call('ZREM', inflight, id)
if outcome == 'failed' then
  redis.call('ZADD', retry, ARGV[6], id)
else
  redis.call('ZREM', retry, id)
  redis.call('XACK', stream, ARGV[1], id)
  redis.call('HDEL', attempts, id)
end
if redis.call('EXISTS', journal) == 0 then
  redis.call('XGROUP', 'CREATE', journal, ARGV[7], '0', 'MKSTREAM')
end
redis.call('XADD', journal, '*', 'k', 'delivery', 'o', outcome, 'id', ARGV[8], 'sub', ARGV[9],
  'n', deliveries, 'ms', ARGV[10], 'err', ARGV[11], 't', ARGV[12], 'off', id, 'ra', ARGV[6],
  'ci', ARGV[13])
return 1
"#,
    )
});

static GROUP_STATS: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: stream, trimmed counts. ARGV: group, consumer.
-- Returns {lag, group pending, consumer pending, entries trimmed before the group read them}.
local trimmed = tonumber(redis.call('HGET', KEYS[2], ARGV[1])) or 0
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, 0, trimmed} end
for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = {}
  for i = 1, #info, 2 do group[info[i]] = info[i + 1] end
  if group['name'] == ARGV[1] then
    local lag = group['lag']
    if not lag then
      lag = #redis.call('XRANGE', KEYS[1], '(' .. group['last-delivered-id'], '+', 'COUNT', 100000)
    end
    local mine = 0
    local summary = redis.call('XPENDING', KEYS[1], ARGV[1])
    for _, consumer in ipairs(summary[4] or {}) do
      if consumer[1] == ARGV[2] then mine = tonumber(consumer[2]) end
    end
    return {lag, group['pending'], mine, trimmed}
  end
end
return {0, 0, 0, trimmed}
"#,
    )
});

/// One delivery taken from a partition.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub partition: u16,
    pub entry_id: String,
    /// The envelope (JSON text), if the entry has one.
    pub envelope: Option<String>,
    /// 1 for the first delivery.
    pub attempt: u32,
    /// The ack deadline given to this delivery (exact score text, for settling).
    pub deadline: String,
}

/// How a delivery ends, or why it will be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Acked,
    Filtered,
    Expired,
    DeadLetter,
    /// Retried at the given time (ms).
    Failed {
        retry_at_ms: i64,
    },
}

impl Outcome {
    /// The outcome's name, as journaled and as the event label of metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Acked => "acked",
            Outcome::Filtered => "filtered",
            Outcome::Expired => "expired",
            Outcome::DeadLetter => "dead_letter",
            Outcome::Failed { .. } => "failed",
        }
    }
}

/// Which delivery a settlement applies to, and what to record of it.
#[derive(Debug, Clone)]
pub struct Settlement<'a> {
    pub group: &'a str,
    pub partition: u16,
    pub entry_id: &'a str,
    pub outcome: Outcome,
    /// Only the delivery with this deadline (the reclaimer's view), or any current one.
    pub expected_deadline: Option<&'a str>,
    /// Only if this many deliveries were made (a nack of an older delivery does nothing).
    pub expected_attempt: Option<u32>,
    pub message_id: &'a str,
    pub subscription_id: Uuid,
    pub processing_ms: Option<i64>,
    pub error: Option<&'a str>,
    pub now_ms: i64,
    /// When the message was published (ms), if known: not stored, for latency metrics.
    pub published_at_ms: Option<i64>,
}

/// A delivery whose ack deadline passed.
#[derive(Debug, Clone)]
pub struct OverdueDelivery {
    pub partition: u16,
    pub entry_id: String,
    pub deadline: String,
    pub attempt: u32,
    pub envelope: Option<String>,
}

/// A consumer group's position on a queue, summed over partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    pub lag: u64,
    pub pending: u64,
    pub consumer_pending: u64,
    /// Entries retention removed before the group read them.
    pub trimmed: u64,
}

impl Broker {
    /// Creates consumer group `group` on every partition, starting at new messages (`latest`)
    /// or at everything stored (`earliest`). A group that exists keeps its position.
    pub async fn ensure_consumer_group(
        &self,
        queue_id: Uuid,
        partition_count: u16,
        group: &str,
        from_earliest: bool,
    ) -> ApiResult<()> {
        let start = if from_earliest { "0" } else { "$" };
        let mut pipeline = redis::pipe();
        for keys in self.keys.partitions(queue_id, partition_count) {
            ENSURE_GROUP.add_to(
                &mut pipeline,
                &[&keys.stream, &keys.deleted],
                &[
                    group.as_bytes(),
                    start.as_bytes(),
                    RECORDER_GROUP.as_bytes(),
                ],
            );
        }
        let mut connection = self.pool.get().await?;
        let _: Vec<i64> = scripts::run(&mut connection, &pipeline, &[&ENSURE_GROUP]).await?;
        Ok(())
    }

    /// Removes consumer group `group` and its delivery state from every partition. A Redis
    /// that cannot be reached is an error: the caller keeps the subscription for a retry.
    pub async fn destroy_consumer_group(
        &self,
        queue_id: Uuid,
        partition_count: u16,
        group: &str,
    ) -> ApiResult<()> {
        let mut pipeline = redis::pipe();
        for partition in 0..partition_count {
            let keys = self.keys.partition(queue_id, partition);
            let group_keys = self.keys.group(queue_id, partition, group);
            DESTROY_GROUP.add_to(
                &mut pipeline,
                &[
                    &keys.stream,
                    &group_keys.inflight,
                    &group_keys.retry,
                    &group_keys.attempts,
                    &keys.trimmed,
                ],
                &[group.as_bytes()],
            );
        }
        let mut connection = self.pool.get().await?;
        let _: Vec<i64> = scripts::run(&mut connection, &pipeline, &[&DESTROY_GROUP]).await?;
        Ok(())
    }

    /// Takes up to `count` deliveries for `consumer` of `group`, visiting partitions from
    /// `first_partition` on (callers rotate it for fairness). `in_order` delivers one entry
    /// of a partition at a time, in stream order, across all instances.
    #[allow(clippy::too_many_arguments)]
    pub async fn take(
        &self,
        queue_id: Uuid,
        partition_count: u16,
        first_partition: u16,
        group: &str,
        consumer: &str,
        count: usize,
        now_ms: i64,
        deadline_ms: i64,
        in_order: bool,
    ) -> ApiResult<Vec<Delivery>> {
        let mut connection = self.pool.get().await?;
        let (now, deadline) = (now_ms.to_string(), deadline_ms.to_string());
        let mut taken = Vec::new();
        for step in 0..partition_count {
            let partition = (first_partition + step) % partition_count;
            let remaining = count - taken.len();
            if remaining == 0 {
                break;
            }
            let keys = self.keys.partition(queue_id, partition);
            let group_keys = self.keys.group(queue_id, partition, group);
            let mut pipeline = redis::pipe();
            let want = remaining.to_string();
            TAKE.add_to(
                &mut pipeline,
                &[
                    &keys.stream,
                    &group_keys.inflight,
                    &group_keys.retry,
                    &group_keys.attempts,
                ],
                &[
                    group.as_bytes(),
                    consumer.as_bytes(),
                    want.as_bytes(),
                    now.as_bytes(),
                    deadline.as_bytes(),
                    if in_order { b"1" } else { b"0" },
                ],
            );
            let (reply,): (redis::Value,) =
                scripts::run(&mut connection, &pipeline, &[&TAKE]).await?;
            for (entry_id, fields, attempt) in parse_take(reply)? {
                taken.push(Delivery {
                    partition,
                    envelope: envelope_field(&fields),
                    entry_id,
                    attempt,
                    deadline: deadline.clone(),
                });
            }
        }
        Ok(taken)
    }

    /// Applies settlements; returns for each whether it took effect.
    pub async fn settle(
        &self,
        queue_id: Uuid,
        consumer_instance: &str,
        settlements: &[Settlement<'_>],
    ) -> ApiResult<Vec<bool>> {
        if settlements.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipeline = redis::pipe();
        for s in settlements {
            let keys = self.keys.partition(queue_id, s.partition);
            let group_keys = self.keys.group(queue_id, s.partition, s.group);
            let retry_at = match s.outcome {
                Outcome::Failed { retry_at_ms } => retry_at_ms.to_string(),
                _ => String::new(),
            };
            let args = [
                s.group.to_owned(),
                s.entry_id.to_owned(),
                s.outcome.as_str().to_owned(),
                s.expected_deadline.unwrap_or_default().to_owned(),
                s.expected_attempt
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                retry_at,
                RECORDER_GROUP.to_owned(),
                s.message_id.to_owned(),
                s.subscription_id.to_string(),
                s.processing_ms.map(|ms| ms.to_string()).unwrap_or_default(),
                s.error.unwrap_or_default().chars().take(1000).collect(),
                s.now_ms.to_string(),
                consumer_instance.to_owned(),
            ];
            let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
            SETTLE.add_to(
                &mut pipeline,
                &[
                    &keys.stream,
                    &group_keys.inflight,
                    &group_keys.retry,
                    &group_keys.attempts,
                    &keys.journal,
                    &keys.deleted,
                ],
                &args,
            );
        }
        let mut connection = self.pool.get().await?;
        let applied: Vec<i64> = scripts::run(&mut connection, &pipeline, &[&SETTLE]).await?;
        Ok(applied.into_iter().map(|a| a == 1).collect())
    }

    /// Deliveries of `group` whose ack deadline passed by `now_ms`, up to `limit` per
    /// partition, with their envelopes and attempt counts.
    pub async fn overdue(
        &self,
        queue_id: Uuid,
        partition_count: u16,
        group: &str,
        now_ms: i64,
        limit: usize,
    ) -> ApiResult<Vec<OverdueDelivery>> {
        let mut pipeline = redis::pipe();
        for partition in 0..partition_count {
            let group_keys = self.keys.group(queue_id, partition, group);
            pipeline
                .cmd("ZRANGEBYSCORE")
                .arg(&group_keys.inflight)
                .arg("-inf")
                .arg(now_ms)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit);
        }
        let mut connection = self.pool.get().await?;
        let per_partition: Vec<Vec<(String, String)>> =
            pipeline.query_async(&mut connection).await?;
        let overdue: Vec<(u16, String, String)> = per_partition
            .into_iter()
            .enumerate()
            .flat_map(|(partition, items)| {
                items
                    .into_iter()
                    .map(move |(id, deadline)| (partition as u16, id, deadline))
            })
            .collect();
        if overdue.is_empty() {
            return Ok(Vec::new());
        }
        let mut details = redis::pipe();
        for (partition, id, _) in &overdue {
            let keys = self.keys.partition(queue_id, *partition);
            let group_keys = self.keys.group(queue_id, *partition, group);
            details.cmd("XRANGE").arg(&keys.stream).arg(id).arg(id);
            details.hget(&group_keys.attempts, id);
        }
        let replies: Vec<redis::Value> = details.query_async(&mut connection).await?;
        let mut result = Vec::with_capacity(overdue.len());
        for ((partition, entry_id, deadline), pair) in overdue.into_iter().zip(replies.chunks(2)) {
            let envelope = parse_range_envelope(&pair[0]);
            let attempt = Option::<u32>::from_redis_value(&pair[1])
                .ok()
                .flatten()
                .unwrap_or(1);
            result.push(OverdueDelivery {
                partition,
                entry_id,
                deadline,
                attempt,
                envelope,
            });
        }
        Ok(result)
    }

    /// The envelope of one stream entry, if it is still stored.
    pub async fn read_envelope(
        &self,
        queue_id: Uuid,
        partition: u16,
        entry_id: &str,
    ) -> ApiResult<Option<String>> {
        let keys = self.keys.partition(queue_id, partition);
        let mut connection = self.pool.get().await?;
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&keys.stream)
            .arg(entry_id)
            .arg(entry_id)
            .query_async(&mut connection)
            .await?;
        Ok(parse_range_envelope(&reply))
    }

    /// Lag and pending of `group` (and of `consumer` in it) over all partitions.
    pub async fn group_stats(
        &self,
        queue_id: Uuid,
        partition_count: u16,
        group: &str,
        consumer: &str,
    ) -> ApiResult<GroupStats> {
        let mut all = self
            .groups_stats(&[(queue_id, partition_count, group, consumer)])
            .await?;
        Ok(all.pop().unwrap_or_default())
    }

    /// `group_stats` of many (queue, partitions, group, consumer), in bounded pipelines.
    pub async fn groups_stats(
        &self,
        groups: &[(Uuid, u16, &str, &str)],
    ) -> ApiResult<Vec<GroupStats>> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let mut partitions: Vec<(PartitionKeys, &str, &str)> = Vec::new();
        for (queue_id, count, group, consumer) in groups {
            for keys in self.keys.partitions(*queue_id, *count) {
                partitions.push((keys, group, consumer));
            }
        }
        let mut connection = self.pool.get().await?;
        let partitions: Vec<(u64, u64, u64, u64)> = scripts::run_chunked(
            &mut connection,
            &GROUP_STATS,
            partitions,
            |pipeline, (keys, group, consumer)| {
                GROUP_STATS.add_to(
                    pipeline,
                    &[&keys.stream, &keys.trimmed],
                    &[group.as_bytes(), consumer.as_bytes()],
                );
            },
        )
        .await?;
        let mut partitions = partitions.into_iter();
        Ok(groups
            .iter()
            .map(|(_, partition_count, _, _)| {
                partitions
                    .by_ref()
                    .take(usize::from(*partition_count))
                    .fold(
                        GroupStats::default(),
                        |sum, (lag, pending, mine, trimmed)| GroupStats {
                            lag: sum.lag + lag,
                            pending: sum.pending + pending,
                            consumer_pending: sum.consumer_pending + mine,
                            trimmed: sum.trimmed + trimmed,
                        },
                    )
            })
            .collect())
    }
}

fn unexpected(what: &str) -> ApiError {
    ApiError::internal(format!("unexpected Redis reply: {what}"))
}

/// A taken entry: id, fields, deliveries made.
type TakenEntry = (String, Vec<(String, String)>, u32);

/// `{ {id, {field, value, ...}, deliveries}, ... }`
fn parse_take(reply: redis::Value) -> ApiResult<Vec<TakenEntry>> {
    let redis::Value::Array(items) = reply else {
        return Ok(Vec::new());
    };
    items
        .into_iter()
        .map(|item| {
            let redis::Value::Array(parts) = item else {
                return Err(unexpected("take item"));
            };
            let [id, fields, attempt]: [redis::Value; 3] = parts
                .try_into()
                .map_err(|_| unexpected("take item length"))?;
            let id = String::from_redis_value(&id).map_err(|_| unexpected("entry id"))?;
            let flat = Vec::<String>::from_redis_value(&fields).unwrap_or_default();
            let fields = flat
                .chunks(2)
                .filter_map(|pair| Some((pair.first()?.clone(), pair.get(1)?.clone())))
                .collect();
            let attempt = u32::from_redis_value(&attempt).map_err(|_| unexpected("attempt"))?;
            Ok((id, fields, attempt))
        })
        .collect()
}

fn envelope_field(fields: &[(String, String)]) -> Option<String> {
    fields
        .iter()
        .find(|(name, _)| name == "e")
        .map(|(_, value)| value.clone())
}

/// The envelope of the one entry an `XRANGE id id` returned, if any.
fn parse_range_envelope(reply: &redis::Value) -> Option<String> {
    let entries: Vec<(String, Vec<(String, String)>)> =
        FromRedisValue::from_redis_value(reply).ok()?;
    let (_, fields) = entries.into_iter().next()?;
    envelope_field(&fields)
}
