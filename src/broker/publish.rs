//! Appending messages to a queue's partition streams.
//!
//! One Lua script per partition does, atomically: the idempotency check, the backpressure
//! check, the append, and the idempotency record. So two concurrent publishes of one
//! `messageId` cannot both be stored, and a queue at its bound stores nothing more (and drops
//! nothing to make room).
//!
//! Backpressure counts the un-consumed backlog of the slowest consumer group (delivered but
//! unacked, plus not yet delivered), or the whole stream when no group reads it yet. The
//! recorder group (the service's own writer of `message_records`) is not a consumer and
//! never holds publishing back, and neither is a guest's group on a public queue
//! (`domain::subscription::is_guest_group`): what a guest has not read waits for it until
//! retention removes it. A queue's `maxLength` is shared evenly by its partitions,
//! each holding at most `ceil(maxLength / partitionCount)`: every check stays inside one
//! partition's hash slot, and for the default single partition the bound is exact.

use std::sync::LazyLock;

use deadpool_redis::redis;

use super::scripts::{self, prune_lapsed_lua, LuaScript};
use super::{Broker, RECORDER_GROUP};
use crate::domain::message::ValidMessage;
use crate::domain::queue::Queue;
use crate::error::{ApiError, ErrorCode};

static PUBLISH: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(concat!(
        prune_lapsed_lua!(),
        r#"
-- KEYS[1] stream, KEYS[2] delayed set, KEYS[3] delayed envelopes, KEYS[4] journal,
-- KEYS[5] byte counts, KEYS[6] expiry watch, KEYS[7] idempotency records, KEYS[8]
-- cancellation markers, KEYS[9] expiring records, KEYS[10] deletion tombstone.
-- ARGV[1] backlog bound of this partition, ARGV[2] idempotency window (ms), ARGV[3] recorder
-- group, ARGV[4] now (ms).
-- Message i, ARGV[4 + 10(i-1) + n] for n = 1..10: '1' when it has a producer id,
-- publishedAt, scheduledAt ('' if none), hold-until score ('' = deliver now), expiresAt,
-- message id, envelope, original payload bytes, stored payload bytes, '1' to watch its expiry.
local stream, delayed, envelopes, journal, bytes = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ids, expiring = KEYS[7], KEYS[9]
-- The queue was deleted (on another instance, while this one still knew it): store nothing.
if redis.call('EXISTS', KEYS[10]) == 1 then return {'gone'} end
local limit = tonumber(ARGV[1])
local now = tonumber(ARGV[4])
local count = (#ARGV - 4) / 10
prune_lapsed(ids, KEYS[8], expiring, now)

local function arg(i, n) return ARGV[4 + 10 * (i - 1) + n] end

local function previous(i)
  if arg(i, 1) ~= '1' then return false end
  local lapses = tonumber(redis.call('ZSCORE', expiring, 'id:' .. arg(i, 6)))
  if not lapses or lapses <= now then return false end
  return redis.call('HGET', ids, arg(i, 6))
end

local function ensure_group(key)
  if redis.call('EXISTS', key) == 0 then
    redis.call('XGROUP', 'CREATE', key, ARGV[3], '0', 'MKSTREAM')
  end
end

-- The un-consumed backlog: the slowest consumer group's pending plus undelivered entries (the
-- whole stream while no group reads it), plus the messages still waiting to be released.
local function backlog()
  local waiting = redis.call('ZCARD', delayed)
  if redis.call('EXISTS', stream) == 0 then return waiting end
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
  if consumers == 0 then return waiting + redis.call('XLEN', stream) end
  return waiting + worst
end

local fresh = 0
for i = 1, count do
  if not previous(i) then fresh = fresh + 1 end
end
if fresh > 0 then
  local current = backlog()
  if current + fresh > limit then return {'full', tostring(current)} end
end
local results = {'ok'}
for i = 1, count do
  local earlier = previous(i)
  if earlier then
    results[#results + 1] = 'd|' .. earlier
  else
    local offset = ''
    local envelope = arg(i, 7)
    if arg(i, 4) == '' then
      ensure_group(stream)
      offset = redis.call('XADD', stream, '*', 'e', envelope)
      if arg(i, 10) == '1' then
        redis.call('ZADD', KEYS[6], arg(i, 5), offset .. '|' .. arg(i, 6))
      end
      results[#results + 1] = 'n|' .. offset
    else
      -- Stored as '<expiresAt>|<envelope>' so the scheduler tells expiry without decoding.
      redis.call('ZADD', delayed, arg(i, 4), arg(i, 6))
      redis.call('HSET', envelopes, arg(i, 6), arg(i, 5) .. '|' .. envelope)
      ensure_group(journal)
      redis.call('XADD', journal, '*', 'k', 'scheduled', 'e', envelope)
      results[#results + 1] = 's|'
    end
    if arg(i, 1) == '1' then
      redis.call('HSET', ids, arg(i, 6), offset .. '|' .. arg(i, 2) .. '|' .. arg(i, 3))
      redis.call('ZADD', expiring, now + tonumber(ARGV[2]), 'id:' .. arg(i, 6))
    end
    redis.call('HINCRBY', bytes, 'original', arg(i, 8))
    redis.call('HINCRBY', bytes, 'stored', arg(i, 9))
  end
end
return results
"#
    ))
});

/// Where a message was stored, or where it had been stored before (a duplicate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The stream entry id; `None` while the message waits for its delivery time.
    pub offset: Option<String>,
    pub duplicate: bool,
    /// For a duplicate, the original's publish time (ms).
    pub original_published_at: Option<i64>,
    /// For a duplicate, the original's requested delivery time (ms), if it had one.
    pub original_scheduled_at: Option<i64>,
}

/// The outcome of a publish: per input message, `Some` when it is stored, in input order.
/// A partition at its bound stores none of its messages; the others are unaffected, so the
/// caller can say exactly which messages were stored.
#[derive(Debug)]
pub struct PublishOutcome {
    pub stored: Vec<Option<Stored>>,
    /// The backlog of the first partition found full.
    pub full_backlog: Option<u64>,
    /// The queue was deleted meanwhile (by another instance): nothing was stored.
    pub queue_deleted: bool,
}

impl Broker {
    /// Stores `messages` (each already assigned to a partition) in one round trip.
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
        let mut chunks: Vec<(u16, Vec<usize>)> = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            match chunks.iter_mut().find(|(p, _)| *p == message.partition) {
                Some((_, indexes)) => indexes.push(index),
                None => chunks.push((message.partition, vec![index])),
            }
        }
        let mut pipeline = redis::pipe();
        let bound = partition_bound.to_string();
        let window = dedup_window_ms.to_string();
        let now = now_ms.to_string();
        for (partition, indexes) in &chunks {
            let keys = self.keys.partition(queue.id, *partition);
            let per_message: Vec<[String; 6]> = indexes
                .iter()
                .map(|&i| {
                    let envelope = &messages[i].envelope;
                    [
                        envelope.published_at.to_string(),
                        envelope
                            .scheduled_at
                            .map(|t| t.to_string())
                            .unwrap_or_default(),
                        messages[i]
                            .hold_until
                            .map(|t| t.to_string())
                            .unwrap_or_default(),
                        envelope.expires_at.to_string(),
                        messages[i].original_bytes.to_string(),
                        messages[i].stored_bytes.to_string(),
                    ]
                })
                .collect();
            let all_keys: [&str; 10] = [
                &keys.stream,
                &keys.delayed,
                &keys.delayed_envelopes,
                &keys.journal,
                &keys.bytes,
                &keys.expiry,
                &keys.ids,
                &keys.cancelled,
                &keys.expiring,
                &keys.deleted,
            ];
            let mut args: Vec<&[u8]> = vec![
                bound.as_bytes(),
                window.as_bytes(),
                RECORDER_GROUP.as_bytes(),
                now.as_bytes(),
            ];
            for (n, &i) in indexes.iter().enumerate() {
                args.push(if messages[i].producer_id { b"1" } else { b"0" });
                let [published, scheduled, hold, expires, original, stored] = &per_message[n];
                for value in [published, scheduled, hold, expires] {
                    args.push(value.as_bytes());
                }
                args.push(messages[i].envelope.message_id.as_bytes());
                args.push(messages[i].encoded.as_bytes());
                args.push(original.as_bytes());
                args.push(stored.as_bytes());
                // Retention would remove it before it expires otherwise: watch its expiry.
                let envelope = &messages[i].envelope;
                let short_lived = envelope.expires_at
                    < envelope
                        .published_at
                        .saturating_add(queue.retention_ms as i64);
                args.push(if short_lived { b"1" } else { b"0" });
            }
            PUBLISH.add_to(&mut pipeline, &all_keys, &args);
        }
        let mut connection = self.pool.get().await?;
        let replies: Vec<Vec<String>> =
            scripts::run(&mut connection, &pipeline, &[&PUBLISH]).await?;

        let mut outcome = PublishOutcome {
            stored: vec![None; messages.len()],
            full_backlog: None,
            queue_deleted: false,
        };
        for ((_, indexes), reply) in chunks.iter().zip(replies) {
            match reply.first().map(String::as_str) {
                Some("ok") => {
                    for (&index, result) in indexes.iter().zip(&reply[1..]) {
                        outcome.stored[index] = Some(parse_result(result)?);
                    }
                }
                Some("full") => {
                    let backlog = reply
                        .get(1)
                        .and_then(|b| b.parse().ok())
                        .unwrap_or(partition_bound);
                    outcome.full_backlog.get_or_insert(backlog);
                }
                Some("gone") => outcome.queue_deleted = true,
                _ => {
                    return Err(ApiError::internal(format!(
                        "unexpected publish reply {reply:?}"
                    )))
                }
            }
        }
        Ok(outcome)
    }
}

fn parse_result(result: &str) -> Result<Stored, ApiError> {
    let unexpected = || ApiError::internal(format!("unexpected publish result '{result}'"));
    let (kind, rest) = result.split_once('|').ok_or_else(unexpected)?;
    let offset = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    match kind {
        "n" | "s" => Ok(Stored {
            offset: offset(rest),
            duplicate: false,
            original_published_at: None,
            original_scheduled_at: None,
        }),
        "d" => {
            let mut parts = rest.split('|');
            let stored_offset = parts.next().ok_or_else(unexpected)?;
            Ok(Stored {
                offset: offset(stored_offset),
                duplicate: true,
                original_published_at: parts.next().and_then(|t| t.parse().ok()),
                original_scheduled_at: parts.next().and_then(|t| t.parse().ok()),
            })
        }
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
        let stored = parse_result("n|1-0").unwrap();
        assert_eq!(
            (stored.offset.as_deref(), stored.duplicate),
            (Some("1-0"), false)
        );
        let delayed = parse_result("s|").unwrap();
        assert_eq!((delayed.offset, delayed.duplicate), (None, false));
        let duplicate = parse_result("d|5-1|1700|").unwrap();
        assert_eq!(duplicate.offset.as_deref(), Some("5-1"));
        assert_eq!(
            (
                duplicate.original_published_at,
                duplicate.original_scheduled_at
            ),
            (Some(1700), None)
        );
        let delayed_duplicate = parse_result("d||1700|1900").unwrap();
        assert_eq!(
            (
                delayed_duplicate.offset,
                delayed_duplicate.original_scheduled_at
            ),
            (None, Some(1900))
        );
        assert!(parse_result("x").is_err());
    }
}
