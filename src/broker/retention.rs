//! Trimming streams, and the lease that makes one instance do it.
//!
//! An entry is removed once it is older than the queue's `retentionMs`, or once every
//! consumer group has acked it (and the recorder has recorded it). While a queue has no
//! consumer group, only retention removes entries: they are its un-consumed backlog. A group
//! that had not read an entry retention removed counts it (`trimmed`), and its subscriptions
//! show it as expired: a lagging guest of a public queue loses what it did not read in time,
//! and knows it.

use std::sync::LazyLock;

use deadpool_redis::redis;

use super::scripts::{self, free_share_lua, LuaScript};
use super::{Broker, RECORDER_GROUP};
use crate::error::ApiResult;
use crate::service::partitions::PartitionRef;

static TRIM: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(concat!(
        free_share_lua!(),
        r#"
-- KEYS: stream, trimmed counts, byte counts, delayed set, the queue's bytes stored.
-- ARGV: retention cutoff (ms), recorder group.
-- Returns {entries removed, what is left}: -2 when a consumer group reads the stream (acks
-- may free entries at any time), -1 when it is empty, else the time (ms) of its oldest
-- entry, before whose retention ends nothing can go. Entries a consumer group had not read
-- when they were removed are added to its count in KEYS[2] (its subscriptions show them as
-- expired).
if redis.call('EXISTS', KEYS[1]) == 0 then
  -- Delayed messages cancelled or expired while the stream was empty: none left at all.
  if redis.call('ZCARD', KEYS[4]) == 0 then free_share(KEYS[3], KEYS[5], 0, 1) end
  return {0, -1}
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function before(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local function successor(id)
  local ms, seq = parse(id)
  return string.format('%.0f-%.0f', ms, seq + 1)
end
local function fields(flat)
  local map = {}
  for i = 1, #flat, 2 do map[flat[i]] = flat[i + 1] end
  return map
end
local minid = ARGV[1] .. '-0'
local safe, consumers, groups = nil, 0, {}
for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = fields(info)
  groups[#groups + 1] = group
  if group['name'] ~= ARGV[2] then consumers = consumers + 1 end
  -- Everything before the group's oldest pending entry is acked by it; with nothing
  -- pending, everything up to its cursor is (so a consumed stream ends up empty).
  local bound = successor(group['last-delivered-id'])
  if group['pending'] > 0 then bound = redis.call('XPENDING', KEYS[1], group['name'])[2] end
  if safe == nil or before(bound, safe) then safe = bound end
end
if consumers > 0 and safe ~= nil and before(minid, safe) then minid = safe end
-- Groups whose cursor lies before the cut lose entries they never read. Where Redis cannot
-- place a cursor by position, the entries are counted before they go.
local lagging = {}
for _, group in ipairs(groups) do
  if group['name'] ~= ARGV[2] and before(successor(group['last-delivered-id']), minid) then
    local counted = false
    if not group['entries-read'] then
      counted = #redis.call('XRANGE', KEYS[1], '(' .. group['last-delivered-id'], '(' .. minid)
    end
    lagging[#lagging + 1] = {group['name'], group['entries-read'], counted}
  end
end
local length = redis.call('XLEN', KEYS[1])
local removed = redis.call('XTRIM', KEYS[1], 'MINID', minid)
local waiting = redis.call('ZCARD', KEYS[4])
if length - removed + waiting == 0 then
  free_share(KEYS[3], KEYS[5], 0, 1)
else
  free_share(KEYS[3], KEYS[5], length + waiting, removed)
end
if removed > 0 and #lagging > 0 then
  local stream = fields(redis.call('XINFO', 'STREAM', KEYS[1]))
  -- Positions 1..gone have left the stream (the service only ever trims its head).
  local gone = (tonumber(stream['entries-added']) or 0) - stream['length']
  for _, group in ipairs(lagging) do
    local unread = group[3]
    if not unread then unread = math.min(removed, gone - group[2]) end
    if unread > 0 then redis.call('HINCRBY', KEYS[2], group[1], unread) end
  end
end
local left = -2
if consumers == 0 then
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  left = -1
  if first then left = parse(first[1]) end
end
return {removed, left}
"#
    ))
});

static LEASE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: lease. ARGV: holder, ttl (ms). Returns 1 when the holder has the lease.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#,
    )
});

impl Broker {
    /// Takes or renews the lease `name` for `holder`; false while another holds it.
    pub async fn hold_lease(&self, name: &str, holder: &str, ttl_ms: u64) -> ApiResult<bool> {
        let key = self.keys.lease(name);
        let ttl = ttl_ms.to_string();
        let mut pipeline = redis::pipe();
        LEASE.add_to(&mut pipeline, &[&key], &[holder.as_bytes(), ttl.as_bytes()]);
        let mut connection = self.connection().await?;
        let (held,): (i64,) = scripts::run(&mut connection, &pipeline, &[&LEASE]).await?;
        Ok(held == 1)
    }

    /// Trims each partition to its retention cutoff (ms) and past what every group acked;
    /// returns, per partition, what was removed and what is left.
    pub async fn trim(&self, partitions: &[(PartitionRef, i64)]) -> ApiResult<Vec<Trimmed>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection().await?;
        let trimmed: Vec<(u64, i64)> = scripts::run_chunked(
            &mut connection,
            &TRIM,
            partitions,
            |pipeline, (partition, cutoff)| {
                let keys = self.keys.partition(partition.queue_id, partition.partition);
                TRIM.add_to(
                    pipeline,
                    &[
                        &keys.stream,
                        &keys.trimmed,
                        &keys.bytes,
                        &keys.delayed,
                        &keys.stored,
                    ],
                    &[cutoff.to_string().as_bytes(), RECORDER_GROUP.as_bytes()],
                );
            },
        )
        .await?;
        Ok(trimmed
            .into_iter()
            .map(|(removed, left)| Trimmed {
                removed,
                left: match left {
                    -2 => Left::ReadByGroups,
                    -1 => Left::Nothing,
                    oldest_ms => Left::Unread { oldest_ms },
                },
            })
            .collect())
    }
}

/// What trimming a partition did.
#[derive(Debug, Clone, Copy)]
pub struct Trimmed {
    pub removed: u64,
    pub left: Left,
}

/// What a trimmed partition still holds, as far as the next trim is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// Consumer groups read it: their acks may free entries at any time.
    ReadByGroups,
    /// Nothing.
    Nothing,
    /// Entries no group reads, the oldest stored at `oldest_ms`: only its age frees them.
    Unread { oldest_ms: i64 },
}
