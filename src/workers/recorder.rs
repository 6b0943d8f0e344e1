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

use crate::broker::recorder::StreamEntry;
use crate::domain::message::Envelope;
use crate::error::ApiResult;
use crate::state::AppState;
use crate::store::records::NewMessageRecord;

const BLOCK_MS: u64 = 1000;
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

/// Which queue partition a stream belongs to.
#[derive(Debug, Clone, Copy)]
struct StreamOwner {
    queue_id: Uuid,
    tenant_id: Uuid,
    partition: i32,
}

pub async fn run(state: AppState, shutdown: CancellationToken) {
    let consumer = format!("recorder-{}", state.instance_id);
    let batch_size = state.config.message_batch_size.max(100);
    let mut owners: HashMap<String, StreamOwner> = HashMap::new();
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
                // PostgreSQL or Redis down: keep the streams known so far.
                Err(error) => tracing::debug!(error = %error, "recorder could not refresh streams"),
            }
        }

        if waiting.is_empty() {
            let read = if claimed.elapsed() >= CLAIM_EVERY {
                claimed = Instant::now();
                claim_stale(&state, &consumer, &streams, batch_size).await
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
                Ok(entries) => waiting = entries,
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

async fn load_streams(state: &AppState) -> ApiResult<(HashMap<String, StreamOwner>, Vec<String>)> {
    let queues = state.store.list_all_queue_partitions().await?;
    let mut owners = HashMap::new();
    for queue in queues {
        for partition in 0..queue.partition_count.clamp(1, i32::from(u16::MAX)) {
            let keys = state.broker.keys().partition(queue.id, partition as u16);
            owners.insert(
                keys.stream,
                StreamOwner {
                    queue_id: queue.id,
                    tenant_id: queue.tenant_id,
                    partition,
                },
            );
        }
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

/// Inserts the records of `entries`, then acks them all (those that cannot be recorded, e.g.
/// of a deleted queue, included: retrying them would never succeed).
async fn record(
    state: &AppState,
    owners: &HashMap<String, StreamOwner>,
    entries: &[StreamEntry],
) -> ApiResult<()> {
    let records: Vec<NewMessageRecord> = entries
        .iter()
        .filter_map(|entry| {
            let owner = owners.get(&entry.stream)?;
            let envelope: Envelope = serde_json::from_str(entry.envelope.as_deref()?).ok()?;
            Some(to_record(owner, &entry.id, envelope))
        })
        .collect();
    state.store.insert_message_records(&records).await?;
    state.broker.ack_recorded(entries).await
}

fn to_record(owner: &StreamOwner, offset: &str, envelope: Envelope) -> NewMessageRecord {
    let payload = envelope.payload.to_string();
    let timestamp = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
    NewMessageRecord {
        topic_id: owner.queue_id,
        tenant_id: owner.tenant_id,
        partition: owner.partition,
        stream_offset: offset.to_owned(),
        message_key: envelope.key,
        correlation_id: envelope.correlation_id,
        headers: serde_json::to_string(&envelope.headers).unwrap_or_else(|_| "{}".into()),
        payload_bytes: i32::try_from(payload.len()).unwrap_or(i32::MAX),
        payload,
        trace_id: envelope.trace_id,
        published_at: timestamp(envelope.published_at),
        expires_at: timestamp(envelope.expires_at),
        message_id: envelope.message_id,
    }
}
