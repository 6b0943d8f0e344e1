//! The Redis side of the message recorder: a consumer group (`RECORDER_GROUP`) on every
//! partition stream. Its pending list and lag are the recorder's durable backlog: nothing is
//! held in memory that a crash could lose, and a restart resumes where it stopped.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use deadpool_redis::redis::{self, streams::StreamReadReply, FromRedisValue};

use uuid::Uuid;

use super::keys::KeyLayout;
use super::scripts::{self, LuaScript};
use super::{Broker, RECORDER_GROUP};
use crate::error::{ApiError, ApiResult};

/// Makes sure the stream (or journal) exists with the recorder group on it, so the recorder
/// can read it from now on; 0 when its queue was deleted.
static PREPARE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: stream, deletion tombstone. ARGV: recorder group.
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
return 1
"#,
    )
});

/// One entry of a message stream or a journal, handed to the recorder.
#[derive(Debug, Clone, Default)]
pub struct StreamEntry {
    pub stream: String,
    pub id: String,
    fields: BTreeMap<String, String>,
}

impl StreamEntry {
    pub fn new<'a>(
        stream: &str,
        id: &str,
        fields: impl IntoIterator<Item = (&'a str, String)>,
    ) -> StreamEntry {
        StreamEntry::from_fields(stream, id.to_owned(), fields.into_iter())
    }

    fn from_fields<'a>(
        stream: &str,
        id: String,
        fields: impl Iterator<Item = (&'a str, String)>,
    ) -> StreamEntry {
        StreamEntry {
            stream: stream.to_owned(),
            id,
            fields: fields
                .map(|(name, value)| (name.to_owned(), value))
                .collect(),
        }
    }

    /// A field of the entry: `e` (envelope), `k` (journal event kind), `id` (message id), ...
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    /// Bytes of field names and values.
    pub fn size(&self) -> usize {
        self.fields
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum()
    }

    /// Every field as one JSON object (text; control characters escaped by JSON).
    pub fn fields_json(&self) -> String {
        serde_json::to_string(&self.fields).unwrap_or_default()
    }
}

/// What a recorder read found.
#[derive(Debug)]
pub enum RecorderRead {
    Entries(Vec<StreamEntry>),
    /// One of the streams no longer exists: list them again.
    StreamsChanged,
}

/// How many entries the recorder group has pending on a stream (0 for a stream or group
/// that is gone: its queue was deleted).
static PENDING: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if type(pending) ~= 'table' or pending.err then return 0 end
return tonumber(pending[1]) or 0
"#,
    )
});

impl Broker {
    /// Creates each of `streams` (with the deletion tombstone of its queue) that is missing,
    /// with the recorder group; returns those whose queue still exists.
    pub async fn prepare_recorder(&self, streams: &[(String, String)]) -> ApiResult<Vec<String>> {
        if streams.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection().await?;
        let prepared: Vec<i64> = scripts::run_chunked(
            &mut connection,
            &PREPARE,
            streams,
            |pipeline, (stream, tombstone)| {
                PREPARE.add_to(pipeline, &[stream, tombstone], &[RECORDER_GROUP.as_bytes()]);
            },
        )
        .await?;
        Ok(streams
            .iter()
            .zip(prepared)
            .filter(|(_, prepared)| *prepared == 1)
            .map(|((stream, _), _)| stream.clone())
            .collect())
    }

    /// New entries for the recorder, waiting up to `block_ms` when there are none.
    pub async fn read_for_recorder(
        &self,
        consumer: &str,
        streams: &[String],
        count: usize,
        block_ms: u64,
    ) -> ApiResult<RecorderRead> {
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(RECORDER_GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(streams);
        for _ in streams {
            command.arg(">");
        }
        // Blocking: a connection of its own, never a shared one.
        let mut connection = self.pool.get().await?;
        let reply: Option<StreamReadReply> = match command.query_async(&mut connection).await {
            Ok(reply) => reply,
            // A queue deleted since the caller listed its streams.
            Err(error) if matches!(error.code(), Some("NOGROUP" | "UNBLOCKED")) => {
                return Ok(RecorderRead::StreamsChanged)
            }
            Err(error) => return Err(error.into()),
        };
        Ok(RecorderRead::Entries(
            reply
                .map(|reply| {
                    reply
                        .keys
                        .into_iter()
                        .flat_map(|key| {
                            let stream = key.key;
                            key.ids.into_iter().map(move |entry| {
                                let fields = entry.map.iter().filter_map(|(name, value)| {
                                    Some((name.as_str(), lossy_text(value)?))
                                });
                                StreamEntry::from_fields(&stream, entry.id.clone(), fields)
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        ))
    }

    /// Takes over entries another recorder (or an earlier run of this one) read but did not
    /// record within `min_idle_ms`, e.g. because its instance crashed.
    pub async fn claim_stale_for_recorder(
        &self,
        consumer: &str,
        streams: &[String],
        min_idle_ms: u64,
        count: usize,
    ) -> ApiResult<Vec<StreamEntry>> {
        let mut connection = self.connection().await?;
        // Which streams have anything pending: one round trip per 128 streams. Nearly none
        // have (a recorder acks what it read), so they are the only ones claimed from.
        let pending: Vec<u64> =
            scripts::run_chunked(&mut connection, &PENDING, streams, |pipeline, stream| {
                PENDING.add_to(pipeline, &[stream], &[RECORDER_GROUP.as_bytes()]);
            })
            .await?;
        let mut entries = Vec::new();
        for (stream, _) in streams.iter().zip(pending).filter(|(_, n)| *n > 0) {
            if entries.len() >= count {
                break;
            }
            let reply: redis::RedisResult<redis::Value> = redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(RECORDER_GROUP)
                .arg(consumer)
                .arg(min_idle_ms)
                .arg("0")
                .arg("COUNT")
                .arg(count - entries.len())
                .query_async(&mut connection)
                .await;
            match reply {
                Ok(reply) => entries.extend(parse_autoclaim(stream, reply)?),
                // The stream's queue was deleted meanwhile: nothing left to record.
                Err(error) if error.code() == Some("NOGROUP") => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(entries)
    }

    /// Acknowledges recorded entries; journal entries are deleted too (nothing else reads
    /// them), so journals stay small. `recorded` names the (queue, message id) of stream
    /// messages now in PostgreSQL: lookups no longer need their index entry.
    pub async fn ack_recorded(
        &self,
        entries: &[StreamEntry],
        recorded: &[(Uuid, &str)],
    ) -> ApiResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipeline = redis::pipe();
        for (queue_id, message_id) in recorded {
            pipeline
                .hdel(&self.keys.partition(*queue_id, 0).unrecorded, *message_id)
                .ignore();
        }
        for entry in entries {
            pipeline
                .cmd("XACK")
                .arg(&entry.stream)
                .arg(RECORDER_GROUP)
                .arg(&entry.id)
                .ignore();
            if KeyLayout::is_journal(&entry.stream) {
                pipeline
                    .cmd("XDEL")
                    .arg(&entry.stream)
                    .arg(&entry.id)
                    .ignore();
            }
        }
        let mut connection = self.connection().await?;
        let () = pipeline.query_async(&mut connection).await?;
        Ok(())
    }
}

/// A field value as text; bytes that are not UTF-8 (never written by the service) are
/// replaced rather than dropped, so the recorder still sees, and can quarantine, the entry.
fn lossy_text(value: &redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        other => String::from_redis_value(other).ok(),
    }
}

/// XAUTOCLAIM answers `[next-id, [[id, [field, value, ...]], ...], [deleted ids]]`.
fn parse_autoclaim(stream: &str, reply: redis::Value) -> ApiResult<Vec<StreamEntry>> {
    let unexpected = || ApiError::internal("unexpected XAUTOCLAIM reply");
    let redis::Value::Array(parts) = reply else {
        return Err(unexpected());
    };
    let Some(redis::Value::Array(claimed)) = parts.into_iter().nth(1) else {
        return Err(unexpected());
    };
    let mut entries = Vec::with_capacity(claimed.len());
    for item in claimed {
        let redis::Value::Array(pair) = item else {
            continue;
        };
        let mut pair = pair.into_iter();
        let (Some(id), fields) = (pair.next(), pair.next()) else {
            continue;
        };
        let id = String::from_redis_value(&id).map_err(|_| unexpected())?;
        let fields: Vec<String> = match fields {
            Some(redis::Value::Array(values)) => values.iter().filter_map(lossy_text).collect(),
            _ => Vec::new(),
        };
        let pairs = fields
            .chunks(2)
            .filter_map(|pair| Some((pair.first()?.as_str(), pair.get(1)?.clone())));
        entries.push(StreamEntry::from_fields(stream, id, pairs));
    }
    Ok(entries)
}
