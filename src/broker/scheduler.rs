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

use super::scripts::{self, free_share_lua, prune_lapsed_lua, LuaScript};
use super::{Broker, RECORDER_GROUP};
use crate::error::ApiResult;

static RELEASE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(concat!(
        prune_lapsed_lua!(),
        free_share_lua!(),
        r#"
-- KEYS[1..6]: idempotency records, cancellation markers, expiring records, unrecorded index,
-- `announced`, bytes stored; then per partition slot s = 1, 2, ...: KEYS[6 + 6(s-1) + k] for
-- k = 1..6: delayed set, delayed envelopes, stream, journal, expiry watch, byte counts.
-- ARGV: 1 now (ms), 2 batch limit per partition, 3 recorder group, 4 the partition number of
-- each slot (comma separated), 5 wake channel, 6 this instance, 7 queue id,
-- 8 announcement lifetime (ms).
-- Returns {released, expired, 1 if a partition had more due than the limit, the earliest
-- time anything still waits for ('' if nothing), 1 if the queue holds nothing at all}.
-- Released messages are announced (`r`) unless an announcement is still standing; a queue
-- found empty loses its `announced` key, so the next publish announces it again.
prune_lapsed(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
local function ensure_group(key)
  if redis.call('EXISTS', key) == 0 then
    redis.call('XGROUP', 'CREATE', key, ARGV[3], '0', 'MKSTREAM')
  end
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local now = tonumber(ARGV[1])
local partitions = {}
for p in string.gmatch(ARGV[4], '[^,]+') do partitions[#partitions + 1] = p end
local released, expired, more, next_due, empty = 0, 0, 0, nil, true
for slot = 1, #partitions do
  local base = 6 + 6 * (slot - 1)
  local delayed, envelopes, stream, journal, expiry, bytes =
    KEYS[base + 1], KEYS[base + 2], KEYS[base + 3], KEYS[base + 4], KEYS[base + 5], KEYS[base + 6]
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, ARGV[2])
  for _, id in ipairs(due) do
    local stored = redis.call('HGET', envelopes, id)
    if stored then
      local bar = string.find(stored, '|', 1, true)
      local expires_at = tonumber(string.sub(stored, 1, bar - 1))
      if expires_at <= now then
        free_share(bytes, KEYS[6], redis.call('XLEN', stream) + redis.call('ZCARD', delayed), 1)
        ensure_group(journal)
        redis.call('XADD', journal, '*', 'k', 'expired', 'id', id, 't', ARGV[1])
        expired = expired + 1
      else
        ensure_group(stream)
        local offset = redis.call('XADD', stream, '*', 'e', string.sub(stored, bar + 1))
        redis.call('HSET', KEYS[4], id, partitions[slot] .. '|' .. offset)
        released = released + 1
      end
      redis.call('HDEL', envelopes, id)
    end
    redis.call('ZREM', delayed, id)
  end
  -- Stream messages whose ttl ran out: expired unless some consumer group already took them
  -- (a message delivered in time is not expired; one taken later is expired at delivery).
  local lapsed = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, ARGV[2])
  if #lapsed > 0 then
    local cursors = {}
    if redis.call('EXISTS', stream) == 1 then
      for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
        local group = {}
        for i = 1, #info, 2 do group[info[i]] = info[i + 1] end
        if group['name'] ~= ARGV[3] then cursors[#cursors + 1] = group['last-delivered-id'] end
      end
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
        ensure_group(journal)
        redis.call('XADD', journal, '*', 'k', 'expired', 'id', string.sub(member, bar + 1), 't', ARGV[1])
        expired = expired + 1
      end
      redis.call('ZREM', expiry, member)
    end
  end
  if math.max(#due, #lapsed) >= tonumber(ARGV[2]) then more = 1 end
  for _, set in ipairs({delayed, expiry}) do
    local first = tonumber(redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')[2] or '-1')
    if first >= 0 and (not next_due or first < next_due) then next_due = first end
  end
  if empty and (next_due or redis.call('XLEN', stream) > 0 or redis.call('XLEN', journal) > 0) then
    empty = false
  end
end
if released > 0 and redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[8]) then
  redis.call('PUBLISH', ARGV[5], 'r ' .. ARGV[6] .. ' ' .. ARGV[7])
end
if empty then redis.call('DEL', KEYS[5]) end
local next_text = ''
if next_due then next_text = string.format('%.0f', next_due) end
return {released, expired, more, next_text, empty and 1 or 0}
"#
    ))
});

static CANCEL: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(concat!(
        prune_lapsed_lua!(),
        free_share_lua!(),
        r#"
-- KEYS: delayed set, delayed envelopes, journal, cancellation markers, idempotency records,
-- expiring records, deletion tombstone, stream, byte counts, the queue's bytes stored.
-- ARGV: message id, now (ms), recorder group, how long the marker lasts (ms), partition.
-- Returns 1 when cancelled now, 2 when cancelled before, 0 when not waiting here. The marker
-- keeps the envelope, so a lookup shows the cancelled message until its record is written.
if redis.call('EXISTS', KEYS[7]) == 1 then return 0 end
local now = tonumber(ARGV[2])
prune_lapsed(KEYS[5], KEYS[4], KEYS[6], now)
local held = redis.call('XLEN', KEYS[8]) + redis.call('ZCARD', KEYS[1])
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  local lapses = tonumber(redis.call('ZSCORE', KEYS[6], 'cancelled:' .. ARGV[1]))
  if lapses and lapses > now then return 2 end
  return 0
end
local stored = redis.call('HGET', KEYS[2], ARGV[1]) or ''
redis.call('HDEL', KEYS[2], ARGV[1])
free_share(KEYS[9], KEYS[10], held, 1)
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

/// What releasing one queue's due messages did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Release {
    pub queue_id: uuid::Uuid,
    pub released: u64,
    pub expired: u64,
    /// A partition had more due than one batch: release again at once.
    pub more_due: bool,
    /// The earliest time (ms) something still waits for, if anything does.
    pub next_due_ms: Option<i64>,
    /// The queue holds nothing at all: no message, delayed message or journal entry.
    pub empty: bool,
}

/// A queue to release: its id and partition count.
pub type QueueToRelease = (uuid::Uuid, u16);

impl Broker {
    /// Releases everything due at `now_ms` in each of `queues`, up to `batch` per partition:
    /// one script per queue, in bounded pipelines.
    pub async fn release_due(
        &self,
        queues: &[QueueToRelease],
        now_ms: i64,
        batch: usize,
    ) -> ApiResult<Vec<Release>> {
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let (now, limit) = (now_ms.to_string(), batch.to_string());
        let (channel, lifetime) = (
            self.keys.wake_channel(),
            super::ANNOUNCEMENT_LIFETIME_MS.to_string(),
        );
        let mut connection = self.connection().await?;
        let replies: Vec<(u64, u64, u8, String, u8)> = scripts::run_chunked(
            &mut connection,
            &RELEASE,
            queues,
            |pipeline, (queue_id, partition_count)| {
                let queue_keys = self.keys.partition(*queue_id, 0);
                let mut keys: Vec<String> = vec![
                    queue_keys.ids,
                    queue_keys.cancelled,
                    queue_keys.expiring,
                    queue_keys.unrecorded,
                    queue_keys.announced,
                    queue_keys.stored,
                ];
                for partition in self.keys.partitions(*queue_id, (*partition_count).max(1)) {
                    keys.extend([
                        partition.delayed,
                        partition.delayed_envelopes,
                        partition.stream,
                        partition.journal,
                        partition.expiry,
                        partition.bytes,
                    ]);
                }
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                let numbers = (0..(*partition_count).max(1))
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                let queue = queue_id.to_string();
                RELEASE.add_to(
                    pipeline,
                    &keys,
                    &[
                        now.as_bytes(),
                        limit.as_bytes(),
                        RECORDER_GROUP.as_bytes(),
                        numbers.as_bytes(),
                        channel.as_bytes(),
                        self.origin.as_bytes(),
                        queue.as_bytes(),
                        lifetime.as_bytes(),
                    ],
                );
            },
        )
        .await?;
        Ok(replies
            .into_iter()
            .zip(queues)
            .map(
                |((released, expired, more, next_due, empty), (queue_id, _))| Release {
                    queue_id: *queue_id,
                    released,
                    expired,
                    more_due: more == 1,
                    next_due_ms: next_due.parse().ok(),
                    empty: empty == 1,
                },
            )
            .collect())
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
                    &keys.stream,
                    &keys.bytes,
                    &keys.stored,
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
        let mut connection = self.connection().await?;
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
        let mut connection = self.connection().await?;
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
