//! Delayed and scheduled messages: releasing them into their stream when due, cancelling and
//! finding them while they wait.
//!
//! A waiting message is a member of the partition's `delayed` sorted set, scored by the time
//! the scheduler must handle it, with its envelope in the `delayed-envelopes` hash. Release is
//! one Lua script per partition: take what is due, append it to the stream (or, when its
//! expiry has passed, journal it as expired), remove it from the set. Being one script, a
//! message is moved exactly once however many instances run the scheduler, and a crash
//! between two steps cannot happen.

use std::sync::LazyLock;

use deadpool_redis::redis;

use super::scripts::{self, prune_lapsed_lua, LuaScript};
use super::{Broker, RECORDER_GROUP};
use crate::error::ApiResult;
use crate::service::partitions::PartitionRef;

static RELEASE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(concat!(
        prune_lapsed_lua!(),
        r#"
-- KEYS: delayed set, delayed envelopes, stream, journal, expiry watch, idempotency records,
-- cancellation markers, expiring records, unrecorded index.
-- ARGV: now (ms), batch limit, recorder group, partition number.
prune_lapsed(KEYS[6], KEYS[7], KEYS[8], tonumber(ARGV[1]))
local function ensure_group(key)
  if redis.call('EXISTS', key) == 0 then
    redis.call('XGROUP', 'CREATE', key, ARGV[3], '0', 'MKSTREAM')
  end
end
local now = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[2])
local released, expired = 0, 0
for _, id in ipairs(due) do
  local stored = redis.call('HGET', KEYS[2], id)
  if stored then
    local bar = string.find(stored, '|', 1, true)
    local expires_at = tonumber(string.sub(stored, 1, bar - 1))
    if expires_at <= now then
      ensure_group(KEYS[4])
      redis.call('XADD', KEYS[4], '*', 'k', 'expired', 'id', id, 't', ARGV[1])
      expired = expired + 1
    else
      ensure_group(KEYS[3])
      local offset = redis.call('XADD', KEYS[3], '*', 'e', string.sub(stored, bar + 1))
      redis.call('HSET', KEYS[9], id, ARGV[4] .. '|' .. offset)
      released = released + 1
    end
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[1], id)
end
-- Stream messages whose ttl ran out: expired unless some consumer group already took them
-- (a message delivered in time is not expired; one taken later is expired at delivery).
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, ARGV[2])
if #lapsed > 0 then
  local cursors = {}
  if redis.call('EXISTS', KEYS[3]) == 1 then
    for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[3])) do
      local group = {}
      for i = 1, #info, 2 do group[info[i]] = info[i + 1] end
      if group['name'] ~= ARGV[3] then cursors[#cursors + 1] = group['last-delivered-id'] end
    end
  end
  local function parse(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    return tonumber(ms), tonumber(seq)
  end
  local function taken(entry)
    local em, es = parse(entry)
    for _, cursor in ipairs(cursors) do
      local cm, cs = parse(cursor)
      if cm > em or (cm == em and cs >= es) then return true end
    end
    return false
  end
  for _, member in ipairs(lapsed) do
    local bar = string.find(member, '|', 1, true)
    if not taken(string.sub(member, 1, bar - 1)) then
      ensure_group(KEYS[4])
      redis.call('XADD', KEYS[4], '*', 'k', 'expired', 'id', string.sub(member, bar + 1), 't', ARGV[1])
      expired = expired + 1
    end
    redis.call('ZREM', KEYS[5], member)
  end
end
local next_delayed = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2] or '-1')
local next_expiry = tonumber(redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')[2] or '-1')
local next_due = next_delayed
if next_due < 0 or (next_expiry >= 0 and next_expiry < next_due) then next_due = next_expiry end
return {released, expired, math.max(#due, #lapsed), tostring(next_due)}
"#
    ))
});

static CANCEL: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(concat!(
        prune_lapsed_lua!(),
        r#"
-- KEYS: delayed set, delayed envelopes, journal, cancellation markers, idempotency records,
-- expiring records, deletion tombstone.
-- ARGV: message id, now (ms), recorder group, how long the marker lasts (ms), partition.
-- Returns 1 when cancelled now, 2 when cancelled before, 0 when not waiting here. The marker
-- keeps the envelope, so a lookup shows the cancelled message until its record is written.
if redis.call('EXISTS', KEYS[7]) == 1 then return 0 end
local now = tonumber(ARGV[2])
prune_lapsed(KEYS[5], KEYS[4], KEYS[6], now)
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  local lapses = tonumber(redis.call('ZSCORE', KEYS[6], 'cancelled:' .. ARGV[1]))
  if lapses and lapses > now then return 2 end
  return 0
end
local stored = redis.call('HGET', KEYS[2], ARGV[1]) or ''
redis.call('HDEL', KEYS[2], ARGV[1])
-- Until the recorder has written the cancellation, this marker answers a repeated cancel
-- and a lookup: '<partition>|<expiresAt>|<envelope>'.
redis.call('HSET', KEYS[4], ARGV[1], ARGV[5] .. '|' .. stored)
redis.call('ZADD', KEYS[6], now + tonumber(ARGV[4]), 'cancelled:' .. ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[3], ARGV[3], '0', 'MKSTREAM')
end
redis.call('XADD', KEYS[3], '*', 'k', 'cancelled', 'id', ARGV[1], 't', ARGV[2])
return 1
"#
    ))
});

/// How long a cancelled message's marker outlives its cancellation: far longer than the
/// recorder takes to record it, after which the record answers.
const CANCELLED_MARKER_MS: u64 = 10 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancellation {
    Cancelled,
    AlreadyCancelled,
    /// Released, expired, or never delayed here.
    NotWaiting,
}

/// What one release sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReleaseSweep {
    pub released: u64,
    pub expired: u64,
    /// Some partition had more due than one batch: sweep again at once.
    pub more_due: bool,
    /// The earliest time (ms) something waits for, if anything does.
    pub next_due_ms: Option<i64>,
    /// Queues that received messages in this sweep.
    pub released_to: Vec<uuid::Uuid>,
}

impl Broker {
    /// Releases everything due at `now_ms` on `partitions`, up to `batch` per partition.
    pub async fn release_due(
        &self,
        partitions: &[PartitionRef],
        now_ms: i64,
        batch: usize,
    ) -> ApiResult<ReleaseSweep> {
        let mut sweep = ReleaseSweep::default();
        if partitions.is_empty() {
            return Ok(sweep);
        }
        let (now, limit) = (now_ms.to_string(), batch.to_string());
        let mut connection = self.pool.get().await?;
        let replies: Vec<(u64, u64, usize, String)> = scripts::run_chunked(
            &mut connection,
            &RELEASE,
            partitions,
            |pipeline, partition| {
                let keys = self.keys.partition(partition.queue_id, partition.partition);
                RELEASE.add_to(
                    pipeline,
                    &[
                        &keys.delayed,
                        &keys.delayed_envelopes,
                        &keys.stream,
                        &keys.journal,
                        &keys.expiry,
                        &keys.ids,
                        &keys.cancelled,
                        &keys.expiring,
                        &keys.unrecorded,
                    ],
                    &[
                        now.as_bytes(),
                        limit.as_bytes(),
                        RECORDER_GROUP.as_bytes(),
                        partition.partition.to_string().as_bytes(),
                    ],
                );
            },
        )
        .await?;
        for ((released, expired, taken, next_due), partition) in replies.into_iter().zip(partitions)
        {
            if released > 0 && !sweep.released_to.contains(&partition.queue_id) {
                sweep.released_to.push(partition.queue_id);
            }
            sweep.released += released;
            sweep.expired += expired;
            sweep.more_due |= taken >= batch;
            if let Some(next) = next_due.parse::<f64>().ok().filter(|n| *n >= 0.0) {
                let next = next as i64;
                sweep.next_due_ms = Some(sweep.next_due_ms.map_or(next, |n| n.min(next)));
            }
        }
        Ok(sweep)
    }

    /// Cancels a waiting message.
    pub async fn cancel_delayed(
        &self,
        queue_id: uuid::Uuid,
        partition_count: u16,
        message_id: &str,
        now_ms: i64,
    ) -> ApiResult<Cancellation> {
        let now = now_ms.to_string();
        let marker_ms = CANCELLED_MARKER_MS.to_string();
        let mut pipeline = redis::pipe();
        for partition in 0..partition_count {
            let keys = self.keys.partition(queue_id, partition);
            CANCEL.add_to(
                &mut pipeline,
                &[
                    &keys.delayed,
                    &keys.delayed_envelopes,
                    &keys.journal,
                    &keys.cancelled,
                    &keys.ids,
                    &keys.expiring,
                    &keys.deleted,
                ],
                &[
                    message_id.as_bytes(),
                    now.as_bytes(),
                    RECORDER_GROUP.as_bytes(),
                    marker_ms.as_bytes(),
                    partition.to_string().as_bytes(),
                ],
            );
        }
        let mut connection = self.pool.get().await?;
        let outcomes: Vec<i64> = scripts::run(&mut connection, &pipeline, &[&CANCEL]).await?;
        Ok(if outcomes.contains(&1) {
            Cancellation::Cancelled
        } else if outcomes.contains(&2) {
            Cancellation::AlreadyCancelled
        } else {
            Cancellation::NotWaiting
        })
    }

    /// A message waiting for its time, or cancelled while it waited (its marker keeps it for
    /// a while): its partition, envelope (JSON text) and whether it was cancelled.
    pub async fn find_delayed(
        &self,
        queue_id: uuid::Uuid,
        partition_count: u16,
        message_id: &str,
    ) -> ApiResult<Option<WaitingMessage>> {
        let mut pipeline = redis::pipe();
        let partitions: Vec<_> = self.keys.partitions(queue_id, partition_count).collect();
        for keys in &partitions {
            pipeline.hget(&keys.delayed_envelopes, message_id);
        }
        if let Some(keys) = partitions.first() {
            pipeline.hget(&keys.cancelled, message_id);
        }
        let mut connection = self.pool.get().await?;
        let mut found: Vec<Option<String>> = pipeline.query_async(&mut connection).await?;
        let cancelled = found.pop().flatten();
        let waiting = found
            .into_iter()
            .enumerate()
            .find_map(|(partition, stored)| {
                let (_, envelope) = stored?
                    .split_once('|')
                    .map(|(e, v)| (e.to_owned(), v.to_owned()))?;
                Some(WaitingMessage {
                    partition: partition as u16,
                    envelope,
                    cancelled: false,
                })
            });
        Ok(waiting.or_else(|| {
            // '<partition>|<expiresAt>|<envelope>'
            let marker = cancelled?;
            let mut parts = marker.splitn(3, '|');
            let partition = parts.next()?.parse().ok()?;
            let envelope = parts.nth(1)?.to_owned();
            Some(WaitingMessage {
                partition,
                envelope,
                cancelled: true,
            })
        }))
    }
}

/// A delayed message as Redis holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingMessage {
    pub partition: u16,
    /// The envelope (JSON text).
    pub envelope: String,
    /// Cancelled while it waited.
    pub cancelled: bool,
}
