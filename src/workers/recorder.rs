//! Writes a `message_records` row for every stored message, behind the publish path.
//!
//! The recorder is a consumer group on each partition stream (see `broker::recorder`): it
//! reads new entries in batches, inserts them with one multi-row statement, then acks them.
//! When PostgreSQL is unreachable it keeps the batch and retries with backoff; publishing is
//! never held up, and the backlog waits in Redis (the group's lag), not in memory, so a
//! burst or an outage of any length is caught up afterwards. Entries an instance read but
//! never recorded (it crashed) are claimed by another after `STALE_AFTER`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::keys::KeyLayout;
use crate::broker::recorder::{RecorderRead, StreamEntry};
use crate::domain::message::Envelope;
use crate::error::ApiResult;
use crate::service::partitions::PartitionRef;
use crate::state::AppState;
use crate::store::records::{NewConsumptionRecord, NewMessageRecord, RecordStatusChange};

const BLOCK_MS: u64 = 1000;
/// The key under which a record holds a sealed payload.
pub const SEALED_RECORD_KEY: &str = "$sealed";
const STREAMS_REFRESH: Duration = Duration::from_secs(2);
const CLAIM_EVERY: Duration = Duration::from_secs(10);
const STALE_AFTER_MS: u64 = 30_000;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What `/status` and `/health` show of the recorder.
#[derive(Default)]
pub struct RecorderStatus {
    recorded: AtomicU64,
    failures: AtomicU64,
    retrying: AtomicBool,
    waiting: AtomicU64,
    last_success_ms: AtomicI64,
    last_error: Mutex<Option<String>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecorderReport {
    pub status: &'static str,
    pub recorded: u64,
    pub consecutive_failures: u64,
    pub waiting_batch: u64,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

impl RecorderStatus {
    pub fn report(&self) -> RecorderReport {
        let last_success_ms = self.last_success_ms.load(Ordering::Relaxed);
        RecorderReport {
            status: if self.retrying.load(Ordering::Relaxed) {
                "retrying"
            } else {
                "ok"
            },
            recorded: self.recorded.load(Ordering::Relaxed),
            consecutive_failures: self.failures.load(Ordering::Relaxed),
            waiting_batch: self.waiting.load(Ordering::Relaxed),
            last_success_at: (last_success_ms > 0)
                .then(|| DateTime::from_timestamp_millis(last_success_ms))
                .flatten(),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn succeeded(&self, count: usize) {
        self.recorded.fetch_add(count as u64, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.retrying.store(false, Ordering::Relaxed);
        self.waiting.store(0, Ordering::Relaxed);
        self.last_success_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    fn failed(&self, waiting: usize, error: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.retrying.store(true, Ordering::Relaxed);
        self.waiting.store(waiting as u64, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error);
        }
    }
}

pub async fn run(state: AppState, shutdown: CancellationToken) {
    let consumer = format!("recorder-{}", state.instance_id);
    let batch_size = state.config.message_batch_size.max(100);
    let mut owners: HashMap<String, PartitionRef> = HashMap::new();
    let mut streams: Vec<String> = Vec::new();
    let mut refreshed: Option<Instant> = None;
    let mut claimed: Instant = Instant::now() - CLAIM_EVERY;
    let mut waiting: Vec<StreamEntry> = Vec::new();
    let mut backoff = Duration::from_millis(250);

    while !shutdown.is_cancelled() {
        if refreshed.is_none_or(|at| at.elapsed() >= STREAMS_REFRESH) {
            match load_streams(&state).await {
                Ok((new_owners, new_streams)) => {
                    owners = new_owners;
                    streams = new_streams;
                    refreshed = Some(Instant::now());
                }
                // Redis down: keep the streams known so far.
                Err(error) => tracing::debug!(error = %error, "recorder could not refresh streams"),
            }
        }

        if waiting.is_empty() {
            let read = if claimed.elapsed() >= CLAIM_EVERY {
                claimed = Instant::now();
                claim_stale(&state, &consumer, &streams, batch_size)
                    .await
                    .map(RecorderRead::Entries)
            } else if streams.is_empty() {
                pause(&shutdown, Duration::from_millis(BLOCK_MS)).await;
                continue;
            } else {
                state
                    .broker
                    .read_for_recorder(&consumer, &streams, batch_size, BLOCK_MS)
                    .await
            };
            match read {
                Ok(RecorderRead::Entries(entries)) => waiting = entries,
                Ok(RecorderRead::StreamsChanged) => {
                    refreshed = None;
                    continue;
                }
                Err(error) => {
                    // A stream deleted since the last refresh fails the read: refresh now.
                    refreshed = None;
                    tracing::debug!(error = %error, "recorder read failed");
                    pause(&shutdown, backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        if waiting.is_empty() {
            continue;
        }

        match record(&state, &owners, &waiting).await {
            Ok(()) => {
                state.recorder.succeeded(waiting.len());
                waiting.clear();
                backoff = Duration::from_millis(250);
            }
            Err(error) => {
                tracing::warn!(error = %error, waiting = waiting.len(), "recording messages failed; will retry");
                state.recorder.failed(waiting.len(), error.message.clone());
                pause(&shutdown, backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn pause(shutdown: &CancellationToken, duration: Duration) {
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        () = shutdown.cancelled() => {}
    }
}

/// The message streams and journals of every partition that exist, and whose they are.
async fn load_streams(state: &AppState) -> ApiResult<(HashMap<String, PartitionRef>, Vec<String>)> {
    let partitions = state.partitions.current(&state.store).await;
    let mut owners = HashMap::with_capacity(partitions.len() * 2);
    for partition in partitions.iter() {
        let keys = state
            .broker
            .keys()
            .partition(partition.queue_id, partition.partition);
        owners.insert(keys.stream, *partition);
        owners.insert(keys.journal, *partition);
    }
    let candidates: Vec<String> = owners.keys().cloned().collect();
    let streams = state.broker.prepare_recorder(&candidates).await?;
    Ok((owners, streams))
}

async fn claim_stale(
    state: &AppState,
    consumer: &str,
    streams: &[String],
    batch_size: usize,
) -> ApiResult<Vec<StreamEntry>> {
    let mut entries = Vec::new();
    for stream in streams {
        entries.extend(
            state
                .broker
                .claim_stale_for_recorder(consumer, stream, STALE_AFTER_MS, batch_size)
                .await?,
        );
        if entries.len() >= batch_size {
            break;
        }
    }
    Ok(entries)
}

/// Writes what `entries` say (new records, delivery attempts, then status changes), then
/// acks them all: those that cannot be recorded (a deleted queue, an unreadable entry)
/// included, since retrying them would never succeed.
async fn record(
    state: &AppState,
    owners: &HashMap<String, PartitionRef>,
    entries: &[StreamEntry],
) -> ApiResult<()> {
    // One row per message per statement: a message released in this very batch is written
    // as published, not also as scheduled; of several status changes the highest counts.
    let mut records: HashMap<(Uuid, String), NewMessageRecord> = HashMap::new();
    let mut changes: HashMap<(Uuid, String), RecordStatusChange> = HashMap::new();
    let mut attempts = Vec::new();
    for entry in entries {
        let Some(owner) = owners.get(&entry.stream) else {
            continue;
        };
        let journal = KeyLayout::is_journal(&entry.stream);
        let envelope = || {
            entry
                .field("e")
                .and_then(|text| serde_json::from_str::<Envelope>(text).ok())
        };
        match (journal, entry.field("k")) {
            (false, _) | (true, Some("scheduled")) => {
                let Some(envelope) = envelope() else {
                    continue;
                };
                let record = if journal {
                    to_record(owner, "scheduled", None, envelope)
                } else {
                    to_record(owner, "published", Some(&entry.id), envelope)
                };
                let key = (record.topic_id, record.message_id.clone());
                if record.status == "published" || !records.contains_key(&key) {
                    records.insert(key, record);
                }
            }
            (true, Some(event @ ("expired" | "cancelled"))) => {
                let status = if event == "expired" {
                    "expired"
                } else {
                    "cancelled"
                };
                note_status(&mut changes, owner, entry.field("id"), status, 0);
            }
            (true, Some("delivery")) => {
                let Some(attempt) = delivery_attempt(owner, entry) else {
                    continue;
                };
                let retries = if attempt.status == "failed" {
                    attempt.attempt
                } else {
                    attempt.attempt - 1
                };
                if let Some(status) = message_status_after(attempt.status) {
                    note_status(
                        &mut changes,
                        owner,
                        Some(&attempt.message_id),
                        status,
                        retries,
                    );
                }
                attempts.push(attempt);
            }
            (true, _) => {}
        }
    }
    let records: Vec<NewMessageRecord> = records.into_values().collect();
    state.store.insert_message_records(&records).await?;
    state.store.insert_consumption_records(&attempts).await?;
    let changes: Vec<RecordStatusChange> = changes.into_values().collect();
    state.store.change_record_statuses(&changes).await?;
    state.broker.ack_recorded(entries).await
}

/// The message status a delivery outcome leads to (a filtered message is unchanged).
fn message_status_after(outcome: &str) -> Option<&'static str> {
    match outcome {
        "acked" => Some("consumed"),
        "failed" => Some("failed"),
        "dead_letter" => Some("dead_letter"),
        "expired" => Some("expired"),
        _ => None,
    }
}

/// Status precedence within one batch, matching the store's rule.
fn rank(status: &str) -> u8 {
    match status {
        "scheduled" => 0,
        "published" => 1,
        "failed" => 2,
        "dead_letter" => 3,
        "consumed" => 4,
        _ => 5,
    }
}

fn note_status(
    changes: &mut HashMap<(Uuid, String), RecordStatusChange>,
    owner: &PartitionRef,
    message_id: Option<&str>,
    status: &'static str,
    retries: i32,
) {
    let Some(message_id) = message_id.filter(|id| !id.is_empty()) else {
        return;
    };
    let change = changes
        .entry((owner.queue_id, message_id.to_owned()))
        .or_insert_with(|| RecordStatusChange {
            topic_id: owner.queue_id,
            tenant_id: owner.tenant_id,
            partition: i32::from(owner.partition),
            message_id: message_id.to_owned(),
            status,
            retries,
        });
    if rank(status) > rank(change.status) {
        change.status = status;
    }
    change.retries = change.retries.max(retries);
}

/// A `delivery` journal event as a consumption record.
fn delivery_attempt(owner: &PartitionRef, entry: &StreamEntry) -> Option<NewConsumptionRecord> {
    let status = match entry.field("o")? {
        "acked" => "acked",
        "failed" => "failed",
        "filtered" => "filtered",
        "expired" => "expired",
        "dead_letter" => "dead_letter",
        _ => return None,
    };
    let at = entry
        .field("t")
        .and_then(|t| t.parse::<i64>().ok())
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or_else(Utc::now);
    Some(NewConsumptionRecord {
        tenant_id: owner.tenant_id,
        topic_id: owner.queue_id,
        subscription_id: entry.field("sub")?.parse().ok()?,
        message_id: entry.field("id").unwrap_or_default().to_owned(),
        attempt: entry.field("n").and_then(|n| n.parse().ok()).unwrap_or(1),
        status,
        processing_ms: entry
            .field("ms")
            .and_then(|ms| ms.parse::<i64>().ok())
            .map(|ms| i32::try_from(ms).unwrap_or(i32::MAX)),
        error: entry
            .field("err")
            .filter(|e| !e.is_empty())
            .map(str::to_owned),
        created_at: at,
    })
}

fn to_record(
    owner: &PartitionRef,
    status: &'static str,
    offset: Option<&str>,
    envelope: Envelope,
) -> NewMessageRecord {
    // A sealed payload is recorded sealed: PostgreSQL never holds an encrypted queue's
    // plaintext.
    let (payload, payload_bytes) = match &envelope.sealed {
        Some(sealed) => (
            serde_json::json!({ SEALED_RECORD_KEY: sealed }).to_string(),
            sealed.original_bytes,
        ),
        None => {
            let text = envelope.payload.to_string();
            let length = text.len();
            (text, length)
        }
    };
    let timestamp = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
    NewMessageRecord {
        topic_id: owner.queue_id,
        tenant_id: owner.tenant_id,
        partition: i32::from(owner.partition),
        status,
        stream_offset: offset.map(str::to_owned),
        message_key: envelope.key,
        correlation_id: envelope.correlation_id,
        headers: serde_json::to_string(&envelope.headers).unwrap_or_else(|_| "{}".into()),
        payload_bytes: i32::try_from(payload_bytes).unwrap_or(i32::MAX),
        payload,
        trace_id: envelope.trace_id,
        published_at: timestamp(envelope.published_at),
        scheduled_at: envelope.scheduled_at.map(timestamp),
        expires_at: timestamp(envelope.expires_at),
        message_id: envelope.message_id,
    }
}
