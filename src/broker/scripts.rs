//! Lua scripts run by hash (EVALSHA), loaded on first use or after a Redis restart.

use deadpool_redis::redis::{self, Pipeline};
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;

use super::connections::RedisConnection;

/// Lua defining `prune_lapsed(ids, cancelled, expiring, now)`, which removes up to 100
/// idempotency records and cancellation markers whose time has passed. Put before the body of
/// the scripts that hold a partition's `ids`, `cancelled` and `expiring` keys, so lapsed
/// records go as messages pass instead of each holding a key with its own expiry.
macro_rules! prune_lapsed_lua {
    () => {
        r#"
local function prune_lapsed(ids, cancelled, expiring, now)
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', expiring, '-inf', now, 'LIMIT', 0, 100)) do
    local kind, id = string.match(member, '^(%a+):(.*)$')
    if kind == 'id' then redis.call('HDEL', ids, id) end
    if kind == 'cancelled' then redis.call('HDEL', cancelled, id) end
    redis.call('ZREM', expiring, member)
  end
end
"#
    };
}
pub(super) use prune_lapsed_lua;

/// Lua defining `free_share(bytes, stored, held, leaving)`: `leaving` of the `held` messages
/// of a partition (stream entries and delayed messages) leave it, taking their share of its
/// stored payload bytes (`live` in its byte counts) off the partition and the queue's
/// `stored` total. Shares, because a removed entry's size is not read back; all of it when
/// nothing is left, so the estimate is exact whenever a partition empties.
macro_rules! free_share_lua {
    () => {
        r#"
local function free_share(bytes, stored, held, leaving)
  local live = tonumber(redis.call('HGET', bytes, 'live') or '0')
  if live <= 0 or leaving <= 0 then return end
  local freed = live
  if held > leaving then freed = math.floor(live * leaving / held) end
  if freed <= 0 then return end
  redis.call('HINCRBY', bytes, 'live', string.format('%.0f', -freed))
  if redis.call('DECRBY', stored, string.format('%.0f', freed)) < 0 then
    redis.call('SET', stored, '0')
  end
end
"#
    };
}
pub(super) use free_share_lua;

pub struct LuaScript {
    source: &'static str,
    hash: String,
}

impl LuaScript {
    pub fn new(source: &'static str) -> LuaScript {
        LuaScript {
            source,
            hash: redis::Script::new(source).get_hash().to_owned(),
        }
    }

    /// Adds one invocation to `pipeline`.
    pub fn add_to<'p>(
        &self,
        pipeline: &'p mut Pipeline,
        keys: &[&str],
        args: &[&[u8]],
    ) -> &'p mut Pipeline {
        let command = pipeline
            .cmd("EVALSHA")
            .arg(&self.hash)
            .arg(keys.len())
            .arg(keys);
        for arg in args {
            command.arg(*arg);
        }
        pipeline
    }
}

/// Invocations sent in one round trip by the sweeps over every partition or subscription.
/// A connection's buffers keep the size of the largest command it ever sent: bounded
/// chunks keep them small however many queues there are.
pub const PIPELINE_CHUNK: usize = 128;

/// Runs `script` once per item (`add` adds one invocation to the pipeline), in pipelines of
/// at most `PIPELINE_CHUNK`; the replies in item order. On a cluster, where a pipeline must
/// stay within one hash slot, each invocation goes alone, `PIPELINE_CHUNK` of them at a time
/// (the cluster connection pipelines concurrent commands to each node by itself).
pub async fn run_chunked<T: redis::FromRedisValue, I>(
    connection: &mut RedisConnection,
    script: &LuaScript,
    items: impl IntoIterator<Item = I>,
    mut add: impl FnMut(&mut Pipeline, I),
) -> redis::RedisResult<Vec<T>> {
    if connection.is_cluster() {
        let alone = items.into_iter().map(|item| {
            let mut pipeline = redis::pipe();
            add(&mut pipeline, item);
            pipeline
        });
        return each_alone(connection, alone, &[script]).await;
    }
    let mut replies = Vec::new();
    let mut pipeline = redis::pipe();
    let mut queued = 0;
    for item in items {
        add(&mut pipeline, item);
        queued += 1;
        if queued == PIPELINE_CHUNK {
            replies.extend(run::<Vec<T>>(connection, &pipeline, &[script]).await?);
            pipeline = redis::pipe();
            queued = 0;
        }
    }
    if queued > 0 {
        replies.extend(run::<Vec<T>>(connection, &pipeline, &[script]).await?);
    }
    Ok(replies)
}

/// Sends `commands` (of any hash slots, each replying with `T`), in pipelines of at most
/// `PIPELINE_CHUNK` on a single Redis, each alone on a cluster; the replies in order.
pub async fn run_commands<T: redis::FromRedisValue>(
    connection: &mut RedisConnection,
    commands: Vec<redis::Cmd>,
) -> redis::RedisResult<Vec<T>> {
    if connection.is_cluster() {
        let alone = commands.into_iter().map(|command| {
            let mut pipeline = redis::pipe();
            pipeline.add_command(command);
            pipeline
        });
        return each_alone(connection, alone, &[]).await;
    }
    let mut replies = Vec::with_capacity(commands.len());
    let mut commands = commands.into_iter().peekable();
    while commands.peek().is_some() {
        let mut pipeline = redis::pipe();
        for command in commands.by_ref().take(PIPELINE_CHUNK) {
            pipeline.add_command(command);
        }
        replies.extend(pipeline.query_async::<Vec<T>>(connection).await?);
    }
    Ok(replies)
}

/// Sends each single-slot pipeline (of one command) alone, `PIPELINE_CHUNK` in flight, as a
/// cluster needs; the reply of each, in order.
async fn each_alone<T: redis::FromRedisValue>(
    connection: &RedisConnection,
    pipelines: impl Iterator<Item = Pipeline>,
    scripts: &[&LuaScript],
) -> redis::RedisResult<Vec<T>> {
    let mut replies = Vec::new();
    let mut in_flight = FuturesOrdered::new();
    for pipeline in pipelines {
        let mut connection = connection.clone();
        in_flight.push_back(async move {
            let mut reply: Vec<T> = run(&mut connection, &pipeline, scripts).await?;
            reply.pop().ok_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::TypeError, "no reply in a pipeline"))
            })
        });
        if in_flight.len() >= PIPELINE_CHUNK {
            if let Some(reply) = in_flight.next().await {
                replies.push(reply?);
            }
        }
    }
    while let Some(reply) = in_flight.next().await {
        replies.push(reply?);
    }
    Ok(replies)
}

/// Runs `pipeline` of script invocations; when Redis lost the scripts (restart, flush), loads
/// them and runs it again. EVALSHA fails before executing anything, so a retry cannot apply
/// an invocation twice.
pub async fn run<T: redis::FromRedisValue>(
    connection: &mut impl redis::aio::ConnectionLike,
    pipeline: &Pipeline,
    scripts: &[&LuaScript],
) -> redis::RedisResult<T> {
    match pipeline.query_async(connection).await {
        Err(error) if error.kind() == redis::ErrorKind::NoScriptError => {
            for script in scripts {
                let _: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(script.source)
                    .query_async(connection)
                    .await?;
            }
            pipeline.query_async(connection).await
        }
        other => other,
    }
}
