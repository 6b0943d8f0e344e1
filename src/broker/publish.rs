//! Storing a publish request: every message of it, in one Lua script over the queue's keys
//! (one hash slot, see `keys`).
//!
//! The script does, atomically: the idempotency check of every producer `messageId` against
//! the queue's records (whatever partition its `key` routes to), the backpressure check of
//! every partition the request touches, then — only when every partition has room — the
//! appends, the idempotency records and the index of not-yet-recorded messages. So two
//! concurrent publishes of one `messageId` cannot both be stored, a batch is stored entirely
//! or not at all, and a queue at its bound stores nothing more (and drops nothing to make
//! room). A connection lost while the script runs leaves the request either applied or not;
//! a producer that retries with the same `messageId`s stores it once.
//!
//! Backpressure counts the un-consumed backlog of the slowest consumer group (delivered but
//! unacked, plus not yet delivered), or the whole stream when no group reads it yet. The
//! recorder group (the service's own writer of `message_records`) is not a consumer and
//! never holds publishing back, and neither is a guest's group on a public queue
//! (`domain::subscription::is_guest_group`): what a guest has not read waits for it until
//! retention removes it. A queue's `maxLength` is shared evenly by its partitions, each
//! holding at most `ceil(maxLength / partitionCount)`; for the default single partition the
//! bound is exact.

use std::sync::LazyLock;

use deadpool_redis::redis;

use super::scripts::{self, prune_lapsed_lua, LuaScript};
use super::{Broker, RECORDER_GROUP};
use crate::domain::message::ValidMessage;
use crate::domain::queue::Queue;
use crate::error::{ApiError, ErrorCode};

/// Keys of the queue before the per-partition ones, and keys per partition.
const QUEUE_KEYS: usize = 7;
const PARTITION_KEYS: usize = 6;
/// Arguments before the per-message ones, and per message.
const HEAD_ARGS: usize = 9;
const MESSAGE_ARGS: usize = 11;

static PUBLISH: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(concat!(
        prune_lapsed_lua!(),
        r#"
-- KEYS[1] idempotency records, KEYS[2] unrecorded index, KEYS[3] cancellation markers,
-- KEYS[4] expiring records, KEYS[5] deletion tombstone, KEYS[6] `announced`, KEYS[7] bytes
-- stored; then per partition the request touches (slot s = 1, 2, ...),
-- KEYS[7 + 6(s-1) + k] for k = 1..6:
-- stream, delayed set, delayed envelopes, journal, byte counts, expiry watch.
-- ARGV[1] backlog bound of a partition, ARGV[2] idempotency window (ms), ARGV[3] recorder
-- group, ARGV[4] now (ms), ARGV[5] the partition numbers of the slots, comma separated,
-- ARGV[6] wake channel, ARGV[7] this instance, ARGV[8] queue id, ARGV[9] announcement
-- lifetime (ms).
-- Message i, ARGV[9 + 11(i-1) + n] for n = 1..11: its slot, '1' when it has a producer id,
-- publishedAt, scheduledAt ('' if none), hold-until score ('' = deliver now), expiresAt,
-- message id, envelope, original payload bytes, stored payload bytes, '1' to watch its expiry.
-- Returns {'gone'}, {'full', slot, backlog} (nothing stored), or {'ok', result per message}:
-- 'n|<p>|<offset>' stored, 's|<p>|' waiting for its time, or for a duplicate
-- 'd|<p>|<offset>|<publishedAt>|<scheduledAt>' of the original.
-- Wake-ups (`service::wake`): messages ready now are announced unless an announcement is
-- still standing (`announced`); a delayed message or expiry due sooner than anything its
-- partition waited for is announced with its time.
local ids, unrecorded, expiring = KEYS[1], KEYS[2], KEYS[4]
-- The queue was deleted (on another instance, while this one still knew it): store nothing.
if redis.call('EXISTS', KEYS[5]) == 1 then return {'gone'} end
local limit = tonumber(ARGV[1])
local now = tonumber(ARGV[4])
local count = (#ARGV - 9) / 11
local partitions = {}
for p in string.gmatch(ARGV[5], '[^,]+') do partitions[#partitions + 1] = p end

local function arg(i, n) return ARGV[9 + 11 * (i - 1) + n] end
local function key(slot, k) return KEYS[7 + 6 * (slot - 1) + k] end

-- Lapsed records only matter to a request that checks or writes one (a producer id, or a
-- delayed message a cancellation may name); `previous` ignores a lapsed record anyway, and
-- the scheduler's scripts prune as well. A plain publish skips the sweep.
for i = 1, count do
  if arg(i, 2) == '1' or arg(i, 5) ~= '' then
    prune_lapsed(ids, KEYS[3], expiring, now)
    break
  end
end

-- Asked again while storing: an earlier message of the same request may have stored the id.
local function previous(i)
  if arg(i, 2) ~= '1' then return false end
  local lapses = tonumber(redis.call('ZSCORE', expiring, 'id:' .. arg(i, 7)))
  if not lapses or lapses <= now then return false end
  return redis.call('HGET', ids, arg(i, 7))
end

-- Streams known to exist in this request: `backlog` saw entries in them, or they were
-- created here. A stream with entries was created with the recorder's group.
local existing = {}
local function ensure_group(stream)
  if existing[stream] then return end
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, ARGV[3], '0', 'MKSTREAM')
  end
  existing[stream] = true
end

-- The un-consumed backlog of a partition: the slowest consumer group's pending plus
-- undelivered entries (the whole stream while no group reads it), plus the messages still
-- waiting to be released. No group's backlog exceeds the stream's length, so while the
-- stream and the new messages fit, that is all it asks (consumed entries are trimmed by
-- retention, so this is the usual case); only near the bound does it read the groups.
local function backlog(slot, new)
  local stream = key(slot, 1)
  local waiting = redis.call('ZCARD', key(slot, 2))
  local length = redis.call('XLEN', stream)
  if length > 0 then existing[stream] = true end
  if waiting + length + new <= limit then return waiting + length end
  if length == 0 then return waiting end
  local worst, consumers = 0, 0
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local group = {}
    for j = 1, #info, 2 do group[info[j]] = info[j + 1] end
    -- Neither the recorder nor a guest's group (a name with ':') holds the owner back.
    if group['name'] ~= ARGV[3] and not string.find(group['name'], ':', 1, true) then
      consumers = consumers + 1
      local lag = group['lag']
      if not lag then
        lag = #redis.call('XRANGE', stream, '(' .. group['last-delivered-id'], '+', 'COUNT', limit + 1)
      end
      if lag + group['pending'] > worst then worst = lag + group['pending'] end
    end
  end
  if consumers == 0 then return waiting + length end
  return waiting + worst
end

-- Every partition must have room for its new messages, or nothing is stored.
local fresh = {}
for i = 1, count do
  if not previous(i) then
    local slot = tonumber(arg(i, 1))
    fresh[slot] = (fresh[slot] or 0) + 1
  end
end
for slot, new in pairs(fresh) do
  local current = backlog(slot, new)
  if current + new > limit then return {'full', tostring(slot), tostring(current)} end
end

-- The earliest time each touched partition waited for before this request, and the
-- earliest of the request's own delayed messages and expiries there.
local waited, sooner = {}, nil
local function will_wait(slot, at)
  if waited[slot] == nil then
    waited[slot] = false
    for _, k in ipairs({2, 6}) do
      local first = tonumber(redis.call('ZRANGE', key(slot, k), 0, 0, 'WITHSCORES')[2] or '-1')
      if first >= 0 and (not waited[slot] or first < waited[slot]) then waited[slot] = first end
    end
  end
  at = tonumber(at)
  if (not waited[slot] or at < waited[slot]) and (not sooner or at < sooner) then sooner = at end
end

local results = {'ok'}
local ready = 0
-- Written once per request (per partition for the byte counts) rather than per message.
local index, originals, stored = {}, {}, {}
local function flush_index()
  if #index > 0 then redis.call('HSET', unrecorded, unpack(index)) end
  index = {}
end
for i = 1, count do
  local slot = tonumber(arg(i, 1))
  local partition = partitions[slot]
  local earlier = previous(i)
  if earlier then
    results[#results + 1] = 'd|' .. earlier
  else
    local offset = ''
    local envelope = arg(i, 8)
    if arg(i, 5) == '' then
      ensure_group(key(slot, 1))
      offset = redis.call('XADD', key(slot, 1), '*', 'e', envelope)
      index[#index + 1] = arg(i, 7)
      index[#index + 1] = partition .. '|' .. offset
      -- Bounded, as `unpack` is by the Lua stack.
      if #index >= 1000 then flush_index() end
      if arg(i, 11) == '1' then
        will_wait(slot, arg(i, 6))
        redis.call('ZADD', key(slot, 6), arg(i, 6), offset .. '|' .. arg(i, 7))
      end
      ready = ready + 1
      results[#results + 1] = 'n|' .. partition .. '|' .. offset
    else
      -- Stored as '<expiresAt>|<envelope>' so the scheduler tells expiry without decoding.
      will_wait(slot, arg(i, 5))
      redis.call('ZADD', key(slot, 2), arg(i, 5), arg(i, 7))
      redis.call('HSET', key(slot, 3), arg(i, 7), arg(i, 6) .. '|' .. envelope)
      ensure_group(key(slot, 4))
      redis.call('XADD', key(slot, 4), '*', 'k', 'scheduled', 'e', envelope)
      results[#results + 1] = 's|' .. partition .. '|'
    end
    if arg(i, 2) == '1' then
      redis.call('HSET', ids, arg(i, 7),
        partition .. '|' .. offset .. '|' .. arg(i, 3) .. '|' .. arg(i, 4))
      redis.call('ZADD', expiring, now + tonumber(ARGV[2]), 'id:' .. arg(i, 7))
    end
    originals[slot] = (originals[slot] or 0) + tonumber(arg(i, 9))
    stored[slot] = (stored[slot] or 0) + tonumber(arg(i, 10))
  end
end
flush_index()
local stored_now = 0
for slot, bytes in pairs(originals) do
  local kept = string.format('%.0f', stored[slot])
  redis.call('HINCRBY', key(slot, 5), 'original', string.format('%.0f', bytes))
  redis.call('HINCRBY', key(slot, 5), 'stored', kept)
  redis.call('HINCRBY', key(slot, 5), 'live', kept)
  stored_now = stored_now + stored[slot]
end
if stored_now > 0 then redis.call('INCRBY', KEYS[7], string.format('%.0f', stored_now)) end
if ready > 0 and redis.call('SET', KEYS[6], '1', 'NX', 'PX', ARGV[9]) then
  redis.call('PUBLISH', ARGV[6], 'r ' .. ARGV[7] .. ' ' .. ARGV[8])
end
if sooner then
  redis.call('PUBLISH', ARGV[6], 'w ' .. ARGV[7] .. ' ' .. ARGV[8] .. ' ' .. string.format('%.0f', sooner))
end
return results
"#
    ))
});

static FIND_UNRECORDED: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS[1] unrecorded index, KEYS[2 + p] the stream of partition p. ARGV[1] message id.
-- Returns {partition, offset, envelope} of a stored message not recorded yet, or nil.
local at = redis.call('HGET', KEYS[1], ARGV[1])
if not at then return false end
local bar = string.find(at, '|', 1, true)
local partition = tonumber(string.sub(at, 1, bar - 1))
local offset = string.sub(at, bar + 1)
local stream = KEYS[2 + partition]
if not stream then return false end
local entry = redis.call('XRANGE', stream, offset, offset)
if #entry == 0 then return false end
local fields = entry[1][2]
for i = 1, #fields, 2 do
  if fields[i] == 'e' then return {tostring(partition), offset, fields[i + 1]} end
end
return false
"#,
    )
});

/// A stored message the recorder has not written to PostgreSQL yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnrecordedMessage {
    pub partition: u16,
    pub offset: String,
    /// The envelope (JSON text).
    pub envelope: String,
}

/// Where a message was stored, or where it had been stored before (a duplicate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The partition it is in (for a duplicate, the original's).
    pub partition: u16,
    /// The stream entry id; `None` while the message waits for its delivery time.
    pub offset: Option<String>,
    pub duplicate: bool,
    /// For a duplicate, the original's publish time (ms).
    pub original_published_at: Option<i64>,
    /// For a duplicate, the original's requested delivery time (ms), if it had one.
    pub original_scheduled_at: Option<i64>,
}

/// The outcome of a publish: all of the request's messages were stored (or found stored
/// before), or none.
#[derive(Debug)]
pub enum PublishOutcome {
    /// One per input message, in input order.
    Stored(Vec<Stored>),
    /// A partition was at its bound (this backlog): nothing was stored.
    Full { backlog: u64 },
    /// The queue was deleted meanwhile (by another instance): nothing was stored.
    QueueDeleted,
}

/// How long a publish waits for `REDIS_MIN_REPLICAS_ACK` replicas to confirm its write.
const REPLICA_CONFIRM_TIMEOUT_MS: u64 = 1000;

impl Broker {
    /// Stores `messages` (each already assigned to a partition) atomically, in one round trip.
    pub async fn publish(
        &self,
        queue: &Queue,
        messages: &[ValidMessage],
        dedup_window_ms: u64,
        now_ms: i64,
    ) -> Result<PublishOutcome, ApiError> {
        let partition_bound = queue
            .max_length
            .div_ceil(u64::from(queue.partition_count.max(1)));
        // The partitions the request touches, in first-seen order; a message names its slot.
        let mut partitions: Vec<u16> = Vec::new();
        let slots: Vec<usize> = messages
            .iter()
            .map(
                |message| match partitions.iter().position(|p| *p == message.partition) {
                    Some(at) => at + 1,
                    None => {
                        partitions.push(message.partition);
                        partitions.len()
                    }
                },
            )
            .collect();
        let owned_keys = self.keys.publish_keys(queue.id, &partitions);
        debug_assert_eq!(
            owned_keys.len(),
            QUEUE_KEYS + PARTITION_KEYS * partitions.len()
        );
        let keys: Vec<&str> = owned_keys.iter().map(String::as_str).collect();
        let head = [
            partition_bound.to_string(),
            dedup_window_ms.to_string(),
            RECORDER_GROUP.to_owned(),
            now_ms.to_string(),
            partitions
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(","),
            self.keys.wake_channel(),
            self.origin.to_string(),
            queue.id.to_string(),
            super::ANNOUNCEMENT_LIFETIME_MS.to_string(),
        ];
        let per_message: Vec<[String; 7]> = messages
            .iter()
            .zip(&slots)
            .map(|(message, slot)| {
                let envelope = &message.envelope;
                [
                    slot.to_string(),
                    envelope.published_at.to_string(),
                    envelope
                        .scheduled_at
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    message
                        .hold_until
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    envelope.expires_at.to_string(),
                    message.original_bytes.to_string(),
                    message.stored_bytes.to_string(),
                ]
            })
            .collect();
        let mut args: Vec<&[u8]> = Vec::with_capacity(HEAD_ARGS + MESSAGE_ARGS * messages.len());
        args.extend(head.iter().map(|a| a.as_bytes()));
        for (message, fields) in messages.iter().zip(&per_message) {
            let [slot, published, scheduled, hold, expires, original, stored] = fields;
            args.push(slot.as_bytes());
            args.push(if message.idempotent { b"1" } else { b"0" });
            for value in [published, scheduled, hold, expires] {
                args.push(value.as_bytes());
            }
            args.push(message.envelope.message_id.as_bytes());
            args.push(message.encoded.as_bytes());
            args.push(original.as_bytes());
            args.push(stored.as_bytes());
            // Retention would remove it before it expires otherwise: watch its expiry.
            let envelope = &message.envelope;
            let short_lived = envelope.expires_at
                < envelope
                    .published_at
                    .saturating_add(queue.retention_ms as i64);
            args.push(if short_lived { b"1" } else { b"0" });
        }
        let mut pipeline = redis::pipe();
        PUBLISH.add_to(&mut pipeline, &keys, &args);
        let replicas = self.replicas_to_confirm;
        if replicas > 0 {
            // Same connection, same node, in the same round trip: the write is confirmed by
            // that many replicas before the producer hears it was stored.
            pipeline
                .cmd("WAIT")
                .arg(replicas)
                .arg(REPLICA_CONFIRM_TIMEOUT_MS);
        }
        let mut connection = self.connection().await?;
        let (reply, confirmed) = if replicas > 0 {
            let (reply, confirmed): (Vec<String>, u32) =
                scripts::run(&mut connection, &pipeline, &[&PUBLISH]).await?;
            (reply, confirmed)
        } else {
            let (reply,): (Vec<String>,) =
                scripts::run(&mut connection, &pipeline, &[&PUBLISH]).await?;
            (reply, 0)
        };
        if replicas > 0 && confirmed < replicas && reply.first().is_some_and(|r| r == "ok") {
            // Stored on the master, but a failover now could lose it: the producer retries
            // (an idempotency key makes the retry a duplicate, not a second message).
            tracing::warn!(
                confirmed,
                replicas,
                "a publish was not confirmed by enough replicas"
            );
            return Err(ApiError::unavailable("Redis replication"));
        }
        match reply.first().map(String::as_str) {
            Some("ok") if reply.len() == messages.len() + 1 => Ok(PublishOutcome::Stored(
                reply[1..]
                    .iter()
                    .map(|result| parse_result(result))
                    .collect::<Result<_, _>>()?,
            )),
            Some("full") => Ok(PublishOutcome::Full {
                backlog: reply
                    .get(2)
                    .and_then(|b| b.parse().ok())
                    .unwrap_or(partition_bound),
            }),
            Some("gone") => Ok(PublishOutcome::QueueDeleted),
            _ => Err(ApiError::internal(format!(
                "unexpected publish reply {reply:?}"
            ))),
        }
    }
}

impl Broker {
    /// A message stored in a stream of the queue and not recorded yet, so that it can be
    /// looked up the moment its publish answered.
    pub async fn find_unrecorded(
        &self,
        queue: &Queue,
        message_id: &str,
    ) -> Result<Option<UnrecordedMessage>, ApiError> {
        let partitions: Vec<_> = self
            .keys
            .partitions(queue.id, queue.partition_count)
            .collect();
        let mut keys: Vec<&str> = vec![partitions[0].unrecorded.as_str()];
        keys.extend(partitions.iter().map(|p| p.stream.as_str()));
        let mut pipeline = redis::pipe();
        FIND_UNRECORDED.add_to(&mut pipeline, &keys, &[message_id.as_bytes()]);
        let mut connection = self.connection().await?;
        let (found,): (Option<(u16, String, String)>,) =
            scripts::run(&mut connection, &pipeline, &[&FIND_UNRECORDED]).await?;
        Ok(
            found.map(|(partition, offset, envelope)| UnrecordedMessage {
                partition,
                offset,
                envelope,
            }),
        )
    }
}

fn parse_result(result: &str) -> Result<Stored, ApiError> {
    let unexpected = || ApiError::internal(format!("unexpected publish result '{result}'"));
    let mut parts = result.split('|');
    let kind = parts.next().ok_or_else(unexpected)?;
    let partition = parts
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(unexpected)?;
    let offset = parts
        .next()
        .filter(|text| !text.is_empty())
        .map(str::to_owned);
    match kind {
        "n" | "s" => Ok(Stored {
            partition,
            offset,
            duplicate: false,
            original_published_at: None,
            original_scheduled_at: None,
        }),
        "d" => Ok(Stored {
            partition,
            offset,
            duplicate: true,
            original_published_at: parts.next().and_then(|t| t.parse().ok()),
            original_scheduled_at: parts.next().and_then(|t| t.parse().ok()),
        }),
        _ => Err(unexpected()),
    }
}

/// The 429 for a queue at its bound.
pub fn queue_full(queue: &Queue, backlog: u64) -> ApiError {
    ApiError::new(
        ErrorCode::QueueFull,
        format!(
            "queue '{}' is full: its un-consumed backlog reached maxLength {}",
            queue.name, queue.max_length
        ),
    )
    .with_detail("backlog", serde_json::json!(backlog))
    .with_retry_after(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_parse() {
        let stored = parse_result("n|2|1-0").unwrap();
        assert_eq!(
            (stored.partition, stored.offset.as_deref(), stored.duplicate),
            (2, Some("1-0"), false)
        );
        let delayed = parse_result("s|0|").unwrap();
        assert_eq!((delayed.offset, delayed.duplicate), (None, false));
        let duplicate = parse_result("d|3|5-1|1700|").unwrap();
        assert_eq!(
            (duplicate.partition, duplicate.offset.as_deref()),
            (3, Some("5-1"))
        );
        assert_eq!(
            (
                duplicate.original_published_at,
                duplicate.original_scheduled_at
            ),
            (Some(1700), None)
        );
        let delayed_duplicate = parse_result("d|0||1700|1900").unwrap();
        assert_eq!(
            (
                delayed_duplicate.offset,
                delayed_duplicate.original_scheduled_at
            ),
            (None, Some(1900))
        );
        assert!(parse_result("x").is_err());
        assert!(parse_result("n|x|1-0").is_err());
    }
}
