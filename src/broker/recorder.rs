//! The Redis side of the message recorder: a consumer group (`RECORDER_GROUP`) on every
//! partition stream. Its pending list and lag are the recorder's durable backlog: nothing is
//! held in memory that a crash could lose, and a restart resumes where it stopped.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use deadpool_redis::redis::{self, FromRedisValue};

use uuid::Uuid;

use super::keys::{KeyLayout, PartitionKeys};
use super::scripts::{self, LuaScript};
use super::{Broker, RECORDER_GROUP};
use crate::error::{ApiError, ApiResult};

/// Ids one acknowledging command names at most.
const IDS_PER_COMMAND: usize = 500;

/// Reads one partition for the recorder: what the recorder group has not read yet from its
/// stream and journal and, on a sweep, what another recorder read and left unrecorded for
/// longer than the given idle time. One slot, one round trip per pipeline of partitions.
///
/// A script holds Redis while it runs, so it stops at a byte budget per key: 50 entries of
/// 1 MB in one script held every other client for 70 ms. The first read takes one entry;
/// each next read at most as many as were read before it (the count doubles) and as many as
/// the budget left holds at the average size seen so far. Small entries come in a handful of
/// reads; a read overshoots the budget only when entries far larger than those before them
/// follow, and then by at most as many entries as were read before. The stream and the
/// journal each have the budget, so neither starves the other.
static READ: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        r#"
-- KEYS: stream, journal, deletion tombstone. ARGV: recorder group, consumer, most entries per
-- key, claim idle time in ms ('' = claim nothing), most bytes per key (at least one entry).
-- Returns {state, 1 if a key had more, stream entries, journal entries}; state 0: read,
-- 1: the queue was deleted, 2: a key is not a stream (nothing can be read from it). Each entry
-- is {id, {field, value, ...}}.
if redis.call('EXISTS', KEYS[3]) == 1 then return {1, 0, {}, {}} end
local most, budget = tonumber(ARGV[3]), tonumber(ARGV[5])
local more, unreadable = 0, false
local bytes, counted = 0, 0
local function failed(reply) return type(reply) == 'table' and reply.err ~= nil end
-- How many entries the next read may take, at most `left`.
local function chunk(left)
  if counted == 0 then return 1 end
  local fits = math.floor((budget - bytes) * counted / math.max(bytes, 1))
  return math.max(1, math.min(left, fits, counted))
end
local function take(entries, found)
  for _, entry in ipairs(found) do
    -- (Redis 6.2 answers a claimed entry deleted meanwhile as nil.)
    if entry then
      entries[#entries + 1] = entry
      counted = counted + 1
      bytes = bytes + #entry[1]
      for _, value in ipairs(entry[2]) do bytes = bytes + #value end
    end
  end
end
local function full(entries) return #entries >= most or bytes >= budget end
local function read(key)
  if redis.call('EXISTS', key) == 0 then return {} end
  if redis.call('TYPE', key).ok ~= 'stream' then
    unreadable = true
    return {}
  end
  local entries = {}
  bytes, counted = 0, 0
  if ARGV[4] ~= '' then
    -- A claim scans at most ten pending entries per entry asked for: while it finds none
    -- idle (another recorder is recording them), it asks for twice as many.
    local cursor, ask = '0-0', 1
    for _ = 1, 16 do
      if full(entries) then break end
      local count = ask
      if counted > 0 then count = chunk(most - #entries) end
      local claimed = redis.pcall('XAUTOCLAIM', key, ARGV[1], ARGV[2], ARGV[4], cursor,
        'COUNT', count)
      if failed(claimed) then
        cursor = '0-0'
        break
      end
      take(entries, claimed[2])
      cursor = claimed[1]
      if cursor == '0-0' then break end
      if #claimed[2] == 0 then ask = math.min(ask * 2, most) end
    end
    if cursor ~= '0-0' then more = 1 end
  end
  local created = false
  while true do
    if full(entries) then more = 1 break end
    local wanted = chunk(most - #entries)
    local fresh = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', wanted,
      'STREAMS', key, '>')
    if failed(fresh) and not created and string.find(fresh.err, 'NOGROUP', 1, true) then
      -- A stream made before the recorder group was: it reads everything from the start.
      redis.pcall('XGROUP', 'CREATE', key, ARGV[1], '0')
      created = true
    elseif failed(fresh) then
      unreadable = true
      break
    else
      local found = fresh and fresh[1][2] or {}
      take(entries, found)
      if #found < wanted then break end
    end
  end
  return entries
end
local stream = read(KEYS[1])
local journal = read(KEYS[2])
if unreadable then return {2, more, stream, journal} end
return {0, more, stream, journal}
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

/// What reading one partition found.
#[derive(Debug, Default)]
pub struct PartitionRead {
    /// Its queue was deleted: nothing more will come.
    pub gone: bool,
    /// Its stream or journal cannot be read (not a stream): what could be read is here.
    pub unreadable: bool,
    /// The read stopped at its entry count or byte budget, or left entries to claim: read
    /// again.
    pub more: bool,
    pub entries: Vec<StreamEntry>,
}

/// One partition to read, and whether to claim what another recorder left idle that long.
pub struct RecorderVisit<'a> {
    pub keys: &'a PartitionKeys,
    pub claim_idle_ms: Option<u64>,
}

impl Broker {
    /// What the recorder group has not read from each partition yet, up to `most` entries
    /// of its stream and of its journal and about `budget` bytes in all (at least one entry),
    /// in pipelines of scripts.
    pub async fn read_for_recorder(
        &self,
        consumer: &str,
        visits: &[RecorderVisit<'_>],
        most: usize,
        budget: usize,
    ) -> ApiResult<Vec<PartitionRead>> {
        if visits.is_empty() {
            return Ok(Vec::new());
        }
        let most = most.max(1).to_string();
        let budget = budget.max(1).to_string();
        let mut connection = self.connection().await?;
        let replies: Vec<redis::Value> =
            scripts::run_chunked(&mut connection, &READ, visits, |pipeline, visit| {
                let claim = visit
                    .claim_idle_ms
                    .map(|ms| ms.to_string())
                    .unwrap_or_default();
                READ.add_to(
                    pipeline,
                    &[&visit.keys.stream, &visit.keys.journal, &visit.keys.deleted],
                    &[
                        RECORDER_GROUP.as_bytes(),
                        consumer.as_bytes(),
                        most.as_bytes(),
                        claim.as_bytes(),
                        budget.as_bytes(),
                    ],
                );
            })
            .await?;
        visits
            .iter()
            .zip(replies)
            .map(|(visit, reply)| parse_read(visit.keys, reply))
            .collect()
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
        // One command per key (ids in chunks), not one per entry: Redis spent more on
        // the commands than on the entries.
        let mut unrecorded: BTreeMap<Uuid, Vec<&str>> = BTreeMap::new();
        for (queue_id, message_id) in recorded {
            unrecorded.entry(*queue_id).or_default().push(message_id);
        }
        let mut read: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for entry in entries {
            read.entry(&entry.stream).or_default().push(&entry.id);
        }
        let mut commands = Vec::new();
        for (queue_id, message_ids) in &unrecorded {
            let index = self.keys.unrecorded(*queue_id);
            for chunk in message_ids.chunks(IDS_PER_COMMAND) {
                commands.push(redis::Cmd::hdel(&index, chunk));
            }
        }
        for (stream, ids) in &read {
            for chunk in ids.chunks(IDS_PER_COMMAND) {
                let mut ack = redis::cmd("XACK");
                ack.arg(*stream).arg(RECORDER_GROUP).arg(chunk);
                commands.push(ack);
                if KeyLayout::is_journal(stream) {
                    commands.push(redis::Cmd::xdel(*stream, chunk));
                }
            }
        }
        let mut connection = self.connection().await?;
        let _: Vec<redis::Value> = scripts::run_commands(&mut connection, commands).await?;
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

/// READ answers `{state, more, stream entries, journal entries}`, each entry
/// `{id, {field, value, ...}}`.
fn parse_read(keys: &PartitionKeys, reply: redis::Value) -> ApiResult<PartitionRead> {
    let unexpected = || ApiError::internal("unexpected recorder read reply");
    let redis::Value::Array(parts) = reply else {
        return Err(unexpected());
    };
    let mut parts = parts.into_iter();
    let (Some(gone), Some(more)) = (parts.next(), parts.next()) else {
        return Err(unexpected());
    };
    let number = |value: redis::Value| i64::from_redis_value(&value).map_err(|_| unexpected());
    let state = number(gone)?;
    let mut read = PartitionRead {
        gone: state == 1,
        unreadable: state == 2,
        more: number(more)? == 1,
        entries: Vec::new(),
    };
    for (key, entries) in [&keys.stream, &keys.journal].into_iter().zip(parts) {
        let redis::Value::Array(entries) = entries else {
            continue;
        };
        for item in entries {
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
            read.entries.push(StreamEntry::from_fields(key, id, pairs));
        }
    }
    Ok(read)
}
