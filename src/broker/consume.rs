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
-- KEYS[1] the queue's `announced` key; then per partition slot s = 1, 2, ... (visited in
-- that order): KEYS[1 + 4(s-1) + k] for k = 1..4: stream, inflight, retry, attempts.
-- ARGV: 1 group, 2 consumer, 3 how many, 4 now (ms), 5 ack deadline of these deliveries
-- (ms), 6 '1' for in-order delivery (nothing new from a partition while one of its entries
-- is in flight or waiting for its retry), 7 the partition number of each slot, comma
-- separated, 8 the most entry bytes to take (the first entry is taken whatever its size;
-- the last may pass the budget by less than its own size), 9 the most bytes one entry can
-- have (reads ask for no more entries than the budget left can surely hold, at least one).
-- Returns {next retry time ('' if none or not needed), {partition, entry id, {field, value,
-- ...}, deliveries}, ...}: due retries of a partition before its new entries; or {'gone', ...}
-- when the group does not exist. Finding nothing clears `announced`, so the next publish
-- wakes this consumer.
local want = tonumber(ARGV[3])
local ordered = ARGV[6] == '1'
local budget, entry_most = tonumber(ARGV[8]), tonumber(ARGV[9])
local partitions = {}
for p in string.gmatch(ARGV[7], '[^,]+') do partitions[#partitions + 1] = p end
local out = {''}
local taken = 0
local bytes = 0
local function size(fields)
  local n = 0
  for i = 2, #fields, 2 do n = n + #fields[i] end
  return n
end
for slot = 1, #partitions do
  if taken >= want or (taken > 0 and bytes >= budget) then break end
  local base = 1 + 4 * (slot - 1)
  local stream, inflight, retry, attempts = KEYS[base + 1], KEYS[base + 2], KEYS[base + 3], KEYS[base + 4]
  local room = want - taken
  local blocked = false
  if ordered then
    room = 1
    blocked = redis.call('ZCARD', inflight) > 0
  end
  if not blocked then
    local got = 0
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', retry, '-inf', ARGV[4], 'LIMIT', 0, room)) do
      local entry = redis.call('XRANGE', stream, id, id)
      local over = #entry > 0 and taken + got > 0 and bytes + size(entry[1][2]) > budget
      if over then
        -- Full: nothing newer may go ahead of this retry.
        bytes = budget
        break
      end
      redis.call('ZREM', retry, id)
      if #entry == 0 then
        -- Purged or trimmed while it waited: nothing left to deliver.
        redis.call('XACK', stream, ARGV[1], id)
        redis.call('HDEL', attempts, id)
      else
        bytes = bytes + size(entry[1][2])
        local deliveries = (tonumber(redis.call('HGET', attempts, id)) or 1) + 1
        redis.call('HSET', attempts, id, deliveries)
        redis.call('ZADD', inflight, ARGV[5], id)
        redis.call('XCLAIM', stream, ARGV[1], ARGV[2], 0, id, 'JUSTID')
        out[#out + 1] = {partitions[slot], id, entry[1][2], deliveries}
        got = got + 1
      end
    end
    local remaining = room - got
    if ordered and (got > 0 or redis.call('ZCARD', retry) > 0) then remaining = 0 end
    if remaining > 0 and redis.call('EXISTS', stream) == 1 then
      while remaining > 0 do
        local left = budget - bytes
        if taken + got > 0 and left <= 0 then break end
        local count = math.min(remaining, math.max(1, math.floor(left / entry_most)))
        local read = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', count, 'STREAMS', stream, '>')
        if type(read) == 'table' and read.err then
          -- Only creating a subscription makes a group: a missing one was deleted (or lost
          -- with Redis's data), and the caller stops instead of bringing it back.
          if string.find(read.err, 'NOGROUP', 1, true) then
            out[1] = 'gone'
            return out
          end
          return redis.error_reply(read.err)
        end
        local entries = (read and read[1][2]) or {}
        local deadlines = {}
        for _, entry in ipairs(entries) do
          deadlines[#deadlines + 1] = ARGV[5]
          deadlines[#deadlines + 1] = entry[1]
          -- Bounded, as `unpack` is by the Lua stack.
          if #deadlines >= 2000 then
            redis.call('ZADD', inflight, unpack(deadlines))
            deadlines = {}
          end
          out[#out + 1] = {partitions[slot], entry[1], entry[2], 1}
          bytes = bytes + size(entry[2])
          got = got + 1
        end
        if #deadlines > 0 then redis.call('ZADD', inflight, unpack(deadlines)) end
        remaining = remaining - #entries
        if #entries < count then break end
      end
    end
    taken = taken + got
  end
end
if taken == 0 then redis.call('DEL', KEYS[1]) end
if taken < want then
  -- The caller may sleep: tell it when the next retry of this group falls due.
  local next_retry = nil
  for slot = 1, #partitions do
    local first = redis.call('ZRANGE', KEYS[1 + 4 * (slot - 1) + 3], 0, 0, 'WITHSCORES')
    if first[2] and (not next_retry or tonumber(first[2]) < next_retry) then
      next_retry = tonumber(first[2])
    end
  end
  if next_retry then out[1] = string.format('%.0f', next_retry) end
end
return out
"#,
    )
});

/// Settlements per script call: a call holds Redis for its whole batch (about 10 µs each).
const SETTLE_CHUNK: usize = 100;

static SETTLE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- Settles a batch of deliveries of one queue (one call instead of one per delivery: the
-- per-call cost in Redis is most of a lone settlement's).
-- KEYS: 1 the deletion tombstone, 2 `announced`; then per settlement i = 1..N, from
-- k = 2 + 5(i-1): k+1 stream, k+2 inflight, k+3 retry, k+4 attempts, k+5 journal.
-- ARGV: 1 recorder group, 2 consumer, 3 wake channel, 4 this instance, 5 queue id,
-- 6 announcement lifetime (ms), 7 the guest tenant whose subscription settles ('' for the
-- queue owner's: `gt` in the journal keeps a guest's outcomes out of the owner's records);
-- then per settlement i, from a = 7 + 11(i-1): a+1 group, a+2 entry id, a+3 outcome,
-- a+4 expected deadline ('' = any current delivery), a+5 required deliveries count
-- ('' = any), a+6 retry at (ms, outcome 'failed'), a+7 message id, a+8 subscription id,
-- a+9 processing ms, a+10 error, a+11 now (ms).
-- Outcomes: 'failed' schedules a retry; 'acked', 'filtered', 'expired', 'dead_letter',
-- 'set_aside' finish. An ack also finishes an entry waiting for its retry (its late success
-- still counts).
-- A retry due sooner than any other of the group here is announced (`t`), so consumers
-- sleeping on other instances wake for it. Finishing the last delivery in flight of a group
-- on a partition, with later entries in its stream, announces the queue ready (`r`) unless
-- an announcement stands: an in-order consumer it held back, on any instance, takes the next.
-- One delivery (group, partition, entry) appears at most once in a call.
-- Returns {applied 1, ..., applied N, announced}, each 1 or 0.
local function id_before(a, b)
  local ams, aseq = string.match(a, '(%d+)-(%d+)')
  local bms, bseq = string.match(b, '(%d+)-(%d+)')
  if not ams or not bms then return false end
  if #ams ~= #bms then return #ams < #bms end
  if ams ~= bms then return ams < bms end
  return tonumber(aseq) < tonumber(bseq)
end
local n = (#KEYS - 2) / 5
local out = {}
for i = 1, n + 1 do out[i] = 0 end
-- The queue was deleted: nothing to settle, and no journal to bring back.
if redis.call('EXISTS', KEYS[1]) == 1 then return out end
local journals = {}
-- Removals are made once per key at the end, not once per settlement: the caller never puts
-- one delivery twice into a call, so no settlement here reads what another removes.
local removals, removal_order, leaving_retry = {}, {}, {}
local function later(command, key, extra, member)
  local name = command .. ' ' .. key .. (extra and (' ' .. extra) or '')
  local removal = removals[name]
  if not removal then
    removal = {command, key, extra, {}}
    removals[name] = removal
    removal_order[#removal_order + 1] = name
  end
  local members = removal[4]
  members[#members + 1] = member
end
-- Per inflight set a finishing settlement emptied: its stream and the lowest id finished.
local finished, order = {}, {}
for i = 1, n do
  local k, a = 2 + 5 * (i - 1), 7 + 11 * (i - 1)
  local stream, inflight, retry, attempts, journal = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3],
    KEYS[k + 4], KEYS[k + 5]
  local id, outcome, retry_at = ARGV[a + 2], ARGV[a + 3], ARGV[a + 6]
  local deadline = redis.call('ZSCORE', inflight, id)
  local current
  if ARGV[a + 4] ~= '' then
    current = deadline == ARGV[a + 4]
  else
    current = deadline or (outcome == 'acked' and redis.call('ZSCORE', retry, id))
  end
  local deliveries = 0
  if current then
    deliveries = tonumber(redis.call('HGET', attempts, id)) or 1
    if ARGV[a + 5] ~= '' and deliveries ~= tonumber(ARGV[a + 5]) then current = false end
  end
  if current then
    out[i] = 1
    later('ZREM', inflight, nil, id)
    if outcome == 'failed' then
      local first = redis.call('ZRANGE', retry, 0, 0, 'WITHSCORES')
      redis.call('ZADD', retry, retry_at, id)
      -- (With removals from this retry set still to come, `first` may be one of them:
      -- announcing then is at worst one wake-up too many.)
      if not first[2] or tonumber(retry_at) < tonumber(first[2])
          or leaving_retry[retry] then
        redis.call('PUBLISH', ARGV[3], 't ' .. ARGV[4] .. ' ' .. ARGV[5] .. ' ' .. retry_at)
      end
    else
      later('ZREM', retry, nil, id)
      -- Finished while waiting for its retry: it is still first in the retry set until the
      -- removals at the end.
      if not deadline then leaving_retry[retry] = true end
      later('XACK', stream, ARGV[a + 1], id)
      later('HDEL', attempts, nil, id)
      local seen = finished[inflight]
      if not seen then
        finished[inflight] = {stream, id}
        order[#order + 1] = inflight
      elseif id_before(id, seen[2]) then
        seen[2] = id
      end
    end
    if not journals[journal] then
      journals[journal] = true
      if redis.call('EXISTS', journal) == 0 then
        redis.call('XGROUP', 'CREATE', journal, ARGV[1], '0', 'MKSTREAM')
      end
    end
    redis.call('XADD', journal, '*', 'k', 'delivery', 'o', outcome, 'id', ARGV[a + 7],
      'sub', ARGV[a + 8], 'n', deliveries, 'ms', ARGV[a + 9], 'err', ARGV[a + 10],
      't', ARGV[a + 11], 'off', id, 'ra', retry_at, 'ci', ARGV[2], 'gt', ARGV[7])
  end
end
for _, name in ipairs(removal_order) do
  local removal = removals[name]
  if removal[3] then
    redis.call(removal[1], removal[2], removal[3], unpack(removal[4]))
  else
    redis.call(removal[1], removal[2], unpack(removal[4]))
  end
end
for _, inflight in ipairs(order) do
  if redis.call('ZCARD', inflight) == 0 then
    local seen = finished[inflight]
    local last = redis.call('XREVRANGE', seen[1], '+', '-', 'COUNT', 1)[1]
    if last and id_before(seen[2], last[1]) then
      if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[6]) then
        redis.call('PUBLISH', ARGV[3], 'r ' .. ARGV[4] .. ' ' .. ARGV[5])
        out[n + 1] = 1
      end
      break
    end
  end
end
return out
"#,
    )
});

static OVERDUE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: per partition slot p = 1..P the stream (KEYS[p]); then per group g = 1..G and slot p,
-- KEYS[P + 2((g-1)P + p) - 1] inflight and KEYS[P + 2((g-1)P + p)] attempts.
-- ARGV: 1 now (ms), 2 most deliveries per group and partition, 3 P.
-- Returns {next deadline after now ('' if none), {group, slot, entry id, deadline,
-- deliveries, envelope or ''}, ...} for the deliveries whose ack deadline passed.
local partitions = tonumber(ARGV[3])
local groups = (#KEYS - partitions) / (2 * partitions)
local out = {''}
local next_deadline = nil
for g = 1, groups do
  for p = 1, partitions do
    local at = partitions + 2 * ((g - 1) * partitions + p)
    local inflight, attempts = KEYS[at - 1], KEYS[at]
    local overdue = redis.call('ZRANGEBYSCORE', inflight, '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
    for i = 1, #overdue, 2 do
      local id = overdue[i]
      local envelope = ''
      local entry = redis.call('XRANGE', KEYS[p], id, id)
      if #entry > 0 then
        local fields = entry[1][2]
        for f = 1, #fields, 2 do
          if fields[f] == 'e' then envelope = fields[f + 1] end
        end
      end
      local deliveries = tonumber(redis.call('HGET', attempts, id)) or 1
      out[#out + 1] = {g, p, id, overdue[i + 1], deliveries, envelope}
    end
    local later = redis.call('ZRANGEBYSCORE', inflight, '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if later[2] and (not next_deadline or tonumber(later[2]) < next_deadline) then
      next_deadline = tonumber(later[2])
    end
  end
end
if next_deadline then out[1] = string.format('%.0f', next_deadline) end
return out
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
    /// The dead-letter queue refused the message: set aside in the record quarantine.
    SetAside,
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
            Outcome::SetAside => "set_aside",
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

/// How much one take may hand out.
#[derive(Debug, Clone, Copy)]
pub struct TakeLimit {
    /// Deliveries at most.
    pub count: usize,
    /// Bytes of entries at most (`PULL_MAX_BYTES`): the first is taken whatever its size,
    /// and the last may pass the budget by less than its own size.
    pub bytes: usize,
    /// The most bytes one entry can have, to size the reads.
    pub entry_most: usize,
}

/// What a take found.
#[derive(Debug, Clone, Default)]
pub struct Taken {
    pub deliveries: Vec<Delivery>,
    /// The consumer group does not exist (its subscription was deleted): nothing was taken
    /// that can be settled, and the taker should stop.
    pub gone: bool,
    /// When the taker found fewer than it wanted: the earliest retry of its group still to
    /// come, to wake up for.
    pub next_retry_ms: Option<i64>,
}

/// What settling did.
#[derive(Debug, Clone, Default)]
pub struct Settled {
    /// For each settlement, whether it took effect.
    pub applied: Vec<bool>,
    /// A settlement finished the last delivery in flight of its group with more entries
    /// behind it, and announced the queue ready to the other instances.
    pub announced_ready: bool,
}

/// Deliveries whose ack deadline passed, and when the next one passes.
#[derive(Debug, Clone, Default)]
pub struct Overdue {
    /// (index of the group in the request, delivery)
    pub deliveries: Vec<(usize, OverdueDelivery)>,
    pub next_deadline_ms: Option<i64>,
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
        let mut connection = self.connection().await?;
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
        let mut connection = self.connection().await?;
        let _: Vec<i64> = scripts::run(&mut connection, &pipeline, &[&DESTROY_GROUP]).await?;
        Ok(())
    }

    /// Takes up to `limit.count` deliveries (and about `limit.bytes` of entries, at least
    /// one) for `consumer` of `group`, visiting partitions from `first_partition` on
    /// (callers rotate it for fairness), in one round trip. `in_order` delivers one entry
    /// of a partition at a time, in stream order, across all instances.
    #[allow(clippy::too_many_arguments)]
    pub async fn take(
        &self,
        queue_id: Uuid,
        partition_count: u16,
        first_partition: u16,
        group: &str,
        consumer: &str,
        limit: TakeLimit,
        now_ms: i64,
        deadline_ms: i64,
        in_order: bool,
    ) -> ApiResult<Taken> {
        let partition_count = partition_count.max(1);
        let order: Vec<u16> = (0..partition_count)
            .map(|step| (first_partition + step) % partition_count)
            .collect();
        let announced = self.keys.partition(queue_id, 0).announced;
        let mut keys: Vec<String> = Vec::with_capacity(1 + 4 * order.len());
        keys.push(announced);
        for partition in &order {
            let stream = self.keys.partition(queue_id, *partition).stream;
            let group_keys = self.keys.group(queue_id, *partition, group);
            keys.extend([
                stream,
                group_keys.inflight,
                group_keys.retry,
                group_keys.attempts,
            ]);
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let (now, deadline) = (now_ms.to_string(), deadline_ms.to_string());
        let partitions = order
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let want = limit.count.to_string();
        let budget = limit.bytes.to_string();
        let entry_most = limit.entry_most.max(1).to_string();
        let mut pipeline = redis::pipe();
        TAKE.add_to(
            &mut pipeline,
            &keys,
            &[
                group.as_bytes(),
                consumer.as_bytes(),
                want.as_bytes(),
                now.as_bytes(),
                deadline.as_bytes(),
                if in_order { b"1" } else { b"0" },
                partitions.as_bytes(),
                budget.as_bytes(),
                entry_most.as_bytes(),
            ],
        );
        let mut connection = self.connection().await?;
        let (reply,): (redis::Value,) = scripts::run(&mut connection, &pipeline, &[&TAKE]).await?;
        let (next_retry, entries) = parse_take(reply)?;
        if next_retry.as_deref() == Some("gone") {
            return Ok(Taken {
                gone: true,
                ..Taken::default()
            });
        }
        let next_retry_ms = next_retry.and_then(|text| text.parse().ok());
        Ok(Taken {
            gone: false,
            deliveries: entries
                .into_iter()
                .map(|(partition, entry_id, fields, attempt)| Delivery {
                    partition,
                    envelope: envelope_field(&fields),
                    entry_id,
                    attempt,
                    deadline: deadline.clone(),
                })
                .collect(),
            next_retry_ms,
        })
    }

    /// Applies settlements; returns for each whether it took effect.
    pub async fn settle(
        &self,
        queue_id: Uuid,
        consumer_instance: &str,
        guest_tenant: Option<Uuid>,
        settlements: &[Settlement<'_>],
    ) -> ApiResult<Settled> {
        if settlements.is_empty() {
            return Ok(Settled::default());
        }
        let tombstone = self.keys.partition(queue_id, 0);
        let (deleted, announced) = (&tombstone.deleted, &tombstone.announced);
        let shared = [
            RECORDER_GROUP.to_owned(),
            consumer_instance.to_owned(),
            self.keys.wake_channel(),
            self.origin.to_string(),
            queue_id.to_string(),
            super::ANNOUNCEMENT_LIFETIME_MS.to_string(),
            guest_tenant.map(|t| t.to_string()).unwrap_or_default(),
        ];
        let chunks = settle_chunks(settlements);
        let mut pipeline = redis::pipe();
        for &chunk in &chunks {
            let mut keys: Vec<String> = Vec::with_capacity(2 + 5 * chunk.len());
            let mut args: Vec<String> = Vec::with_capacity(shared.len() + 11 * chunk.len());
            args.extend(shared.iter().cloned());
            for s in chunk {
                let (stream, journal) = self.keys.stream_and_journal(queue_id, s.partition);
                let group = self.keys.group(queue_id, s.partition, s.group);
                keys.extend([stream, group.inflight, group.retry, group.attempts, journal]);
                let retry_at = match s.outcome {
                    Outcome::Failed { retry_at_ms } => retry_at_ms.to_string(),
                    _ => String::new(),
                };
                args.extend([
                    s.group.to_owned(),
                    s.entry_id.to_owned(),
                    s.outcome.as_str().to_owned(),
                    s.expected_deadline.unwrap_or_default().to_owned(),
                    s.expected_attempt
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                    retry_at,
                    s.message_id.to_owned(),
                    s.subscription_id.to_string(),
                    s.processing_ms.map(|ms| ms.to_string()).unwrap_or_default(),
                    s.error.unwrap_or_default().chars().take(1000).collect(),
                    s.now_ms.to_string(),
                ]);
            }
            let keys: Vec<&str> = [deleted.as_str(), announced.as_str()]
                .into_iter()
                .chain(keys.iter().map(String::as_str))
                .collect();
            let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
            SETTLE.add_to(&mut pipeline, &keys, &args);
        }
        let mut connection = self.connection().await?;
        let replies: Vec<Vec<i64>> = scripts::run(&mut connection, &pipeline, &[&SETTLE]).await?;
        if replies.len() != chunks.len() {
            return Err(unexpected("settle replies"));
        }
        let mut settled = Settled::default();
        for (chunk, mut reply) in chunks.iter().zip(replies) {
            if reply.len() != chunk.len() + 1 {
                return Err(unexpected("settle reply"));
            }
            settled.announced_ready |= reply.pop() == Some(1);
            settled.applied.extend(reply.into_iter().map(|a| a == 1));
        }
        Ok(settled)
    }

    /// Deliveries of each of `groups` whose ack deadline passed by `now_ms`, up to `limit`
    /// per group and partition, with their envelopes and attempt counts; and the next
    /// deadline of any of them still to come. One round trip for the whole queue.
    pub async fn overdue(
        &self,
        queue_id: Uuid,
        partition_count: u16,
        groups: &[&str],
        now_ms: i64,
        limit: usize,
    ) -> ApiResult<Overdue> {
        if groups.is_empty() {
            return Ok(Overdue::default());
        }
        let partition_count = partition_count.max(1);
        let mut keys: Vec<String> = self
            .keys
            .partitions(queue_id, partition_count)
            .map(|keys| keys.stream)
            .collect();
        for group in groups {
            for partition in 0..partition_count {
                let group_keys = self.keys.group(queue_id, partition, group);
                keys.extend([group_keys.inflight, group_keys.attempts]);
            }
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let (now, limit, partitions) = (
            now_ms.to_string(),
            limit.to_string(),
            partition_count.to_string(),
        );
        let mut pipeline = redis::pipe();
        OVERDUE.add_to(
            &mut pipeline,
            &keys,
            &[now.as_bytes(), limit.as_bytes(), partitions.as_bytes()],
        );
        let mut connection = self.connection().await?;
        let (reply,): (Vec<redis::Value>,) =
            scripts::run(&mut connection, &pipeline, &[&OVERDUE]).await?;
        let mut items = reply.into_iter();
        let next_deadline_ms = items
            .next()
            .and_then(|first| String::from_redis_value(&first).ok())
            .and_then(|text| text.parse().ok());
        let mut deliveries = Vec::new();
        for item in items {
            let (group, slot, entry_id, deadline, attempt, envelope): (
                usize,
                u16,
                String,
                String,
                u32,
                String,
            ) = FromRedisValue::from_redis_value(&item).map_err(|_| unexpected("overdue item"))?;
            deliveries.push((
                group.saturating_sub(1),
                OverdueDelivery {
                    partition: slot.saturating_sub(1),
                    entry_id,
                    deadline,
                    attempt,
                    envelope: (!envelope.is_empty()).then_some(envelope),
                },
            ));
        }
        Ok(Overdue {
            deliveries,
            next_deadline_ms,
        })
    }

    /// The envelope of one stream entry, if it is still stored.
    pub async fn read_envelope(
        &self,
        queue_id: Uuid,
        partition: u16,
        entry_id: &str,
    ) -> ApiResult<Option<String>> {
        let keys = self.keys.partition(queue_id, partition);
        let mut connection = self.connection().await?;
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
        let mut connection = self.connection().await?;
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

/// Splits settlements, in order, into script calls of at most `SETTLE_CHUNK`, each naming a
/// delivery (group, partition, entry) at most once: the script defers its removals to the
/// end, so a delivery named twice (an ack request repeating an id) goes to the next call,
/// which sees the first one's effect, as settling them one by one would.
fn settle_chunks<'s, 'a>(settlements: &'s [Settlement<'a>]) -> Vec<&'s [Settlement<'a>]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut named = std::collections::HashSet::new();
    for (at, s) in settlements.iter().enumerate() {
        let delivery = (s.group, s.partition, s.entry_id);
        if at - start == SETTLE_CHUNK || named.contains(&delivery) {
            chunks.push(&settlements[start..at]);
            start = at;
            named.clear();
        }
        named.insert(delivery);
    }
    if start < settlements.len() {
        chunks.push(&settlements[start..]);
    }
    chunks
}

fn unexpected(what: &str) -> ApiError {
    ApiError::internal(format!("unexpected Redis reply: {what}"))
}

/// A taken entry: partition, id, fields, deliveries made.
type TakenEntry = (u16, String, Vec<(String, String)>, u32);

/// `{next retry, '' or 'gone', {partition, id, {field, value, ...}, deliveries}, ...}`
fn parse_take(reply: redis::Value) -> ApiResult<(Option<String>, Vec<TakenEntry>)> {
    let redis::Value::Array(items) = reply else {
        return Err(unexpected("take reply"));
    };
    let mut items = items.into_iter();
    let next_retry = items
        .next()
        .and_then(|first| String::from_redis_value(&first).ok())
        .filter(|text| !text.is_empty());
    let entries = items
        .map(|item| {
            let redis::Value::Array(parts) = item else {
                return Err(unexpected("take item"));
            };
            let [partition, id, fields, attempt]: [redis::Value; 4] = parts
                .try_into()
                .map_err(|_| unexpected("take item length"))?;
            let partition =
                u16::from_redis_value(&partition).map_err(|_| unexpected("partition"))?;
            let id = String::from_redis_value(&id).map_err(|_| unexpected("entry id"))?;
            let flat = Vec::<String>::from_redis_value(&fields).unwrap_or_default();
            let fields = flat
                .chunks(2)
                .filter_map(|pair| Some((pair.first()?.clone(), pair.get(1)?.clone())))
                .collect();
            let attempt = u32::from_redis_value(&attempt).map_err(|_| unexpected("attempt"))?;
            Ok((partition, id, fields, attempt))
        })
        .collect::<ApiResult<_>>()?;
    Ok((next_retry, entries))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn acked<'a>(group: &'a str, partition: u16, entry_id: &'a str) -> Settlement<'a> {
        Settlement {
            group,
            partition,
            entry_id,
            outcome: Outcome::Acked,
            expected_deadline: None,
            expected_attempt: None,
            message_id: "m",
            subscription_id: Uuid::nil(),
            processing_ms: None,
            error: None,
            now_ms: 0,
            published_at_ms: None,
        }
    }

    #[test]
    fn a_call_names_each_delivery_once_and_holds_at_most_a_chunk() {
        let ids: Vec<String> = (0..250).map(|n| format!("1-{n}")).collect();
        let mut settlements: Vec<Settlement> = ids.iter().map(|id| acked("g", 0, id)).collect();
        // The same entry of another group or partition is another delivery.
        settlements.insert(3, acked("h", 0, &ids[0]));
        settlements.insert(4, acked("g", 1, &ids[0]));
        // Repeated: goes to the next call.
        settlements.insert(5, acked("g", 0, &ids[1]));
        let sizes: Vec<usize> = settle_chunks(&settlements)
            .iter()
            .map(|c| c.len())
            .collect();
        assert_eq!(sizes, vec![5, 100, 100, 48]);
        assert!(settle_chunks(&[]).is_empty());
    }
}
