//! Trimming streams, and the lease that makes one instance do it.
//!
//! An entry is removed once it is older than the queue's `retentionMs`, or once every
//! consumer group has acked it (and the recorder has recorded it). While a queue has no
//! consumer group, only retention removes entries: they are its un-consumed backlog.

use std::sync::LazyLock;

use deadpool_redis::redis;

use super::scripts::{self, LuaScript};
use super::{Broker, RECORDER_GROUP};
use crate::error::ApiResult;
use crate::service::partitions::PartitionRef;

static TRIM: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: stream. ARGV: retention cutoff (ms), recorder group. Returns the entries removed.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function before(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local minid = ARGV[1] .. '-0'
local safe, consumers = nil, 0
for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = {}
  for i = 1, #info, 2 do group[info[i]] = info[i + 1] end
  if group['name'] ~= ARGV[2] then consumers = consumers + 1 end
  -- Everything before the group's oldest pending entry (or its cursor) is acked by it.
  local bound = group['last-delivered-id']
  if group['pending'] > 0 then bound = redis.call('XPENDING', KEYS[1], group['name'])[2] end
  if safe == nil or before(bound, safe) then safe = bound end
end
if consumers > 0 and safe ~= nil and before(minid, safe) then minid = safe end
return redis.call('XTRIM', KEYS[1], 'MINID', minid)
"#,
    )
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
        let mut connection = self.pool.get().await?;
        let (held,): (i64,) = scripts::run(&mut connection, &pipeline, &[&LEASE]).await?;
        Ok(held == 1)
    }

    /// Trims each partition to its retention cutoff (ms) and past what every group acked;
    /// returns the entries removed.
    pub async fn trim(&self, partitions: &[(PartitionRef, i64)]) -> ApiResult<u64> {
        if partitions.is_empty() {
            return Ok(0);
        }
        let mut pipeline = redis::pipe();
        let cutoffs: Vec<String> = partitions
            .iter()
            .map(|(_, cutoff)| cutoff.to_string())
            .collect();
        for ((partition, _), cutoff) in partitions.iter().zip(&cutoffs) {
            let keys = self.keys.partition(partition.queue_id, partition.partition);
            TRIM.add_to(
                &mut pipeline,
                &[&keys.stream],
                &[cutoff.as_bytes(), RECORDER_GROUP.as_bytes()],
            );
        }
        let mut connection = self.pool.get().await?;
        let removed: Vec<u64> = scripts::run(&mut connection, &pipeline, &[&TRIM]).await?;
        Ok(removed.into_iter().sum())
    }
}
