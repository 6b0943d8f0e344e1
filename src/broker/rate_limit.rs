//! Per-tenant limits, counted in Redis so that every instance enforces the same budget:
//! publish requests and payload bytes, configuration changes and monitoring views, per
//! one-second window.

use std::sync::LazyLock;

use deadpool_redis::redis;
use uuid::Uuid;

use super::scripts::{self, LuaScript};
use super::Broker;
use crate::error::ApiResult;

static ADMIT: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: request count, byte count of this window. ARGV: request limit, byte limit (0 = none),
-- bytes of this request. Returns 1 when admitted.
local requests = redis.call('INCR', KEYS[1])
local bytes = redis.call('INCRBY', KEYS[2], ARGV[3])
if requests == 1 then
  redis.call('PEXPIRE', KEYS[1], 2000)
  redis.call('PEXPIRE', KEYS[2], 2000)
end
local request_limit, byte_limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if (request_limit > 0 and requests > request_limit) or (byte_limit > 0 and bytes > byte_limit) then
  return 0
end
return 1
"#,
    )
});

static ADMIT_ONE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: the call count of this window. ARGV: the limit. Returns 1 when admitted.
local calls = redis.call('INCR', KEYS[1])
if calls == 1 then redis.call('PEXPIRE', KEYS[1], 2000) end
if calls > tonumber(ARGV[1]) then return 0 end
return 1
"#,
    )
});

impl Broker {
    /// Counts one call of `budget` against the tenant's window of the current second; false
    /// when it is over `limit`.
    pub async fn admit_call(
        &self,
        tenant_id: Uuid,
        unix_second: i64,
        budget: &str,
        limit: u64,
    ) -> ApiResult<bool> {
        let key = self.keys.budget_window(tenant_id, unix_second, budget);
        let limit = limit.to_string();
        let mut pipeline = redis::pipe();
        ADMIT_ONE.add_to(&mut pipeline, &[&key], &[limit.as_bytes()]);
        let mut connection = self.connection().await?;
        let (admitted,): (i64,) = scripts::run(&mut connection, &pipeline, &[&ADMIT_ONE]).await?;
        Ok(admitted == 1)
    }

    /// Counts one publish request of `bytes` payload bytes against the tenant's window of
    /// the current second; false when it is over a limit.
    pub async fn admit_publish(
        &self,
        tenant_id: Uuid,
        unix_second: i64,
        bytes: u64,
        max_requests: u64,
        max_bytes: u64,
    ) -> ApiResult<bool> {
        let (requests_key, bytes_key) = self.keys.rate_window(tenant_id, unix_second);
        let mut pipeline = redis::pipe();
        let (max_requests, max_bytes, bytes) = (
            max_requests.to_string(),
            max_bytes.to_string(),
            bytes.to_string(),
        );
        ADMIT.add_to(
            &mut pipeline,
            &[&requests_key, &bytes_key],
            &[
                max_requests.as_bytes(),
                max_bytes.as_bytes(),
                bytes.as_bytes(),
            ],
        );
        let mut connection = self.connection().await?;
        let (admitted,): (i64,) = scripts::run(&mut connection, &pipeline, &[&ADMIT]).await?;
        Ok(admitted == 1)
    }
}
