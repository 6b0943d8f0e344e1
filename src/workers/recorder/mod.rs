//! Writes a `message_records` row for every stored message, and a `consumption_records` row
//! for every delivery attempt, behind the publish path.
//!
//! The recorder is a consumer group on each partition stream and journal (see
//! `broker::recorder`). It reads the partitions this instance wrote into
//! (`service::unrecorded`), in tenant turns of at most `TURN_PARTITIONS`, writes each turn's
//! entries (under a backlog, several turns') in one transaction, then acks them. A tenant
//! writing into a thousand partitions therefore delays another's records by one turn, not by
//! a thousand reads. When PostgreSQL is unreachable it keeps the batch and retries with
//! backoff; publishing is never held up, and the backlog waits in Redis (the group's lag), not
//! in memory, so a burst or an outage of any length is caught up afterwards. Every
//! `SWEEP_EVERY` each recorder also reads every partition of the active queues: what an
//! instance that crashed wrote but never read is recorded then, and what it read but never
//! recorded is claimed once idle for `STALE_AFTER_MS`.
//!
//! One tenant's entry can never stop the others': an entry PostgreSQL refuses is isolated by
//! splitting the batch until it stands alone, then set aside in `record_quarantine` (with a
//! log line and `mq_records_quarantined_total`) while every other entry is written. Writes are
//! idempotent, so a batch written again after a failure before its ack adds nothing.

mod entries;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::broker::recorder::{RecorderVisit, StreamEntry};
use crate::error::{ApiError, ApiResult};
use crate::service::partitions::{PartitionRef, QueueRef};
use crate::service::publish_audit;
use crate::service::turns::Lanes;
use crate::state::AppState;
use crate::store::records::RecordWriteError;

pub use entries::escape_control;

/// How often every active partition is read, for what an instance that died left.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// The first sweep after start: whatever an earlier run left, once every queue counts as
/// active again.
const FIRST_SWEEP: Duration = Duration::from_secs(3);
const STALE_AFTER_MS: u64 = 30_000;
/// Partitions read per turn, at most.
const TURN_PARTITIONS: usize = 64;
/// Entries read per turn, about (or `MESSAGE_BATCH_SIZE`, if larger): a cycle's fixed cost
/// (a script round trip, a transaction, the acks) is spread over this many rows. At 50 a
/// cycle, the recorder fell behind a saturating publish load on two cores.
const TURN_ENTRIES: usize = 500;
/// Entries written by one PostgreSQL transaction, about, while partitions have a backlog:
/// further turns are read into the batch until it holds this many (or half of
/// `TURN_BYTES`, or `BACKLOG_BATCH_TURNS` turns). Under
/// a saturating load a cycle's time is mostly its PostgreSQL round trips waiting for the
/// cores, not its rows, so a backlog is caught up by writing more rows per cycle; each turn
/// is still its own Redis round trip of about `TURN_ENTRIES`, so no call holds Redis longer.
/// (At 2 000 the recorder kept up as well, but publishes' p99 under that load rose by about
/// 10 ms: docs/PERFORMANCE.md.)
const BACKLOG_BATCH_ENTRIES: usize = 1000;
/// Turns read into one backlog batch, at most: a sweep's turns of many nearly empty
/// partitions read a few entries each, and the batch must not wait on dozens of them.
const BACKLOG_BATCH_TURNS: usize = 4;
/// Entries read per stream (and journal) per turn, at least.
const MIN_PER_PARTITION: usize = 8;
/// Entry bytes read per batch (one turn, or the turns of a backlog batch), about: a
/// partition's share of a turn's (for its stream, and again for its journal) is read by
/// one script.
const TURN_BYTES: usize = 4 << 20;
const MIN_BYTES_PER_PARTITION: usize = 64 << 10;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long an idle recorder waits after the first mark before it reads: the marks of the
/// publishes that follow are gathered into one cycle (one script per partition, one
/// PostgreSQL transaction) instead of a cycle per publish. A recorder with work left never
/// waits, so a backlog is read at full speed.
const GATHER: Duration = Duration::from_millis(20);

/// What `/status` and `/health` show of the recorder.
#[derive(Default)]
pub struct RecorderStatus {
    recorded: AtomicU64,
    /// The most entries one transaction wrote.
    largest_batch: AtomicU64,
    quarantined: AtomicU64,
    failures: AtomicU64,
    retrying: AtomicBool,
    waiting: AtomicU64,
    last_success_ms: AtomicI64,
    last_error: Mutex<Option<String>>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecorderReport {
    pub status: &'static str,
    pub recorded: u64,
    pub quarantined: u64,
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
            quarantined: self.quarantined.load(Ordering::Relaxed),
            consecutive_failures: self.failures.load(Ordering::Relaxed),
            waiting_batch: self.waiting.load(Ordering::Relaxed),
            last_success_at: (last_success_ms > 0)
                .then(|| DateTime::from_timestamp_millis(last_success_ms))
                .flatten(),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    /// The most entries one transaction has written since start.
    pub fn largest_batch(&self) -> u64 {
        self.largest_batch.load(Ordering::Relaxed)
    }

    fn succeeded(&self, count: usize) {
        self.recorded.fetch_add(count as u64, Ordering::Relaxed);
        self.largest_batch
            .fetch_max(count as u64, Ordering::Relaxed);
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

/// Why a batch must be tried again as a whole.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error(transparent)]
    Store(#[from] RecordWriteError),
    #[error("acknowledging recorded entries failed: {0}")]
    Ack(ApiError),
    #[error("injected failure before the acknowledgement")]
    Injected,
    #[error("decoding entries failed: {0}")]
    Task(String),
}

pub async fn run(state: AppState, shutdown: CancellationToken) {
    let consumer = format!("recorder-{}", state.instance_id);
    let mut visits = Visits::default();
    // Shared, so decoding a large batch off the async threads does not copy it.
    let mut waiting: Arc<[StreamEntry]> = Arc::from([]);
    let mut owners = Owners::default();
    let mut backoff = Duration::from_millis(250);

    while !shutdown.is_cancelled() {
        if waiting.is_empty() {
            let marks = state.unrecorded.count();
            for partition in state.unrecorded.take() {
                visits.turns.due.push(partition.tenant_id, partition);
            }
            if visits.sweep_due() {
                visits.sweep(&state).await;
            }
            if visits.turns.is_empty() {
                tokio::select! {
                    () = state.unrecorded.marked_since(marks) => pause(&shutdown, GATHER).await,
                    () = tokio::time::sleep(visits.until_sweep()) => {}
                    () = shutdown.cancelled() => {}
                }
                continue;
            }
            match visits.read_batch(&state, &consumer).await {
                Ok((entries, read_from)) => {
                    waiting = entries.into();
                    owners = read_from;
                    backoff = Duration::from_millis(250);
                }
                Err(error) => {
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
                waiting = Arc::from([]);
                backoff = Duration::from_millis(250);
            }
            Err(error) => {
                tracing::warn!(error = %error, waiting = waiting.len(), "recording messages failed; will retry");
                state.recorder.failed(waiting.len(), error.to_string());
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

/// The partitions waiting to be read, in tenant turns: those written here
/// (`service::unrecorded`) and, every `SWEEP_EVERY`, every partition of the active queues,
/// where what another instance wrote and did not record (it died) is found and, once idle
/// for `STALE_AFTER_MS`, claimed.
struct Visits {
    /// Written partitions first, then what the sweep queued.
    turns: Lanes<PartitionRef>,
    /// Partitions whose next read also claims stale entries.
    claiming: HashSet<PartitionRef>,
    /// When the last sweep began (at start: as if `FIRST_SWEEP` before the first one, once
    /// the waker has marked every queue active).
    swept: Option<Instant>,
}

impl Default for Visits {
    fn default() -> Self {
        Visits {
            turns: Lanes::default(),
            claiming: HashSet::new(),
            swept: Instant::now().checked_sub(SWEEP_EVERY.saturating_sub(FIRST_SWEEP)),
        }
    }
}

impl Visits {
    fn sweep_due(&self) -> bool {
        self.swept.is_none_or(|at| at.elapsed() >= SWEEP_EVERY)
    }

    fn until_sweep(&self) -> Duration {
        self.swept.map_or(Duration::ZERO, |at| {
            SWEEP_EVERY.saturating_sub(at.elapsed())
        })
    }

    async fn sweep(&mut self, state: &AppState) {
        self.swept = Some(Instant::now());
        let active = state.activity.snapshot();
        let (queues, _) = state.queue_directory.lookup(&state.store, &active).await;
        for partition in queues.iter().flat_map(QueueRef::partitions) {
            self.turns.swept.push(partition.tenant_id, partition);
            self.claiming.insert(partition);
        }
    }

    /// Reads a turn and, while partitions have more, up to `BACKLOG_BATCH_TURNS` in all,
    /// until about `BACKLOG_BATCH_ENTRIES` entries or half of `TURN_BYTES` are in hand: one
    /// batch to write.
    async fn read_batch(
        &mut self,
        state: &AppState,
        consumer: &str,
    ) -> ApiResult<(Vec<StreamEntry>, Owners)> {
        let first = TURN_ENTRIES.max(state.config.message_batch_size);
        let mut batch = self.read(state, consumer, first, TURN_BYTES).await?;
        let mut bytes: usize = batch.entries.iter().map(StreamEntry::size).sum();
        let mut turns = 1;
        while batch.backlog
            && turns < BACKLOG_BATCH_TURNS
            && batch.entries.len() < BACKLOG_BATCH_ENTRIES
            && bytes < TURN_BYTES / 2
            && !self.turns.is_empty()
        {
            let entries = TURN_ENTRIES.min(BACKLOG_BATCH_ENTRIES - batch.entries.len());
            match self
                .read(state, consumer, entries, TURN_BYTES - bytes)
                .await
            {
                Ok(next) => {
                    turns += 1;
                    bytes += next.entries.iter().map(StreamEntry::size).sum::<usize>();
                    // A turn that found nothing (a sweep's claims, say) ends the batch.
                    batch.backlog = next.backlog && !next.entries.is_empty();
                    batch.entries.extend(next.entries);
                    batch.owners.extend(next.owners);
                }
                // What the earlier turns read is pending to this consumer and is written
                // now; the failed turn's partitions were queued again, to be claimed.
                Err(error) => {
                    tracing::debug!(error = %error, "recorder read failed");
                    break;
                }
            }
        }
        Ok((batch.entries, Arc::new(batch.owners)))
    }

    /// Reads one turn of partitions: at most `TURN_PARTITIONS`, each tenant's in turn, and
    /// about `entries` entries and `bytes` of them. Partitions that had more are read again
    /// at their next turn.
    async fn read(
        &mut self,
        state: &AppState,
        consumer: &str,
        entries: usize,
        bytes: usize,
    ) -> ApiResult<Turn> {
        let turn = self.turns.take(TURN_PARTITIONS, |_| 1);
        let keys: Vec<_> = turn
            .iter()
            .map(|(_, p)| state.broker.keys().partition(p.queue_id, p.partition))
            .collect();
        let visits: Vec<RecorderVisit> = turn
            .iter()
            .zip(&keys)
            .map(|((_, partition), keys)| RecorderVisit {
                keys,
                claim_idle_ms: self.claiming.contains(partition).then_some(STALE_AFTER_MS),
            })
            .collect();
        // Shared out over the turn's partitions, so that no script holds Redis long and no
        // batch is huge.
        let most = (entries / turn.len().max(1)).max(MIN_PER_PARTITION);
        let budget = (bytes / turn.len().max(1)).max(MIN_BYTES_PER_PARTITION);
        let reads = match state
            .broker
            .read_for_recorder(consumer, &visits, most, budget)
            .await
        {
            Ok(reads) => reads,
            Err(error) => {
                // Claimed on the way back: a chunk read before the failure left entries
                // pending to this consumer.
                for (tenant, partition) in turn {
                    self.claiming.insert(partition);
                    self.turns.swept.push(tenant, partition);
                }
                return Err(error);
            }
        };
        let mut entries = Vec::new();
        let mut owners = HashMap::with_capacity(turn.len() * 2);
        let mut backlog = false;
        for (((tenant, partition), keys), read) in turn.into_iter().zip(keys).zip(reads) {
            if read.unreadable {
                tracing::error!(
                    tenant = %partition.tenant_id,
                    queue = %partition.queue_id,
                    partition = partition.partition,
                    "a partition's stream or journal is not a stream; it is left out"
                );
            }
            if read.more && !read.gone && !read.unreadable {
                self.turns.due.push(tenant, partition);
                backlog = true;
            } else {
                self.claiming.remove(&partition);
            }
            entries.extend(read.entries);
            owners.insert(keys.stream, partition);
            owners.insert(keys.journal, partition);
        }
        if self.claiming.is_empty() {
            // A sweep of many partitions leaves no large allocation behind.
            self.claiming = HashSet::new();
        }
        Ok(Turn {
            entries,
            owners,
            backlog,
        })
    }
}

/// What one turn read.
struct Turn {
    entries: Vec<StreamEntry>,
    owners: HashMap<String, PartitionRef>,
    /// Some partition had more than the turn took.
    backlog: bool,
}

/// Which partition each stream and journal belongs to.
type Owners = Arc<HashMap<String, PartitionRef>>;

/// Above this much entry data, entries are decoded on the blocking pool.
const INLINE_READ_BYTES: usize = 64 * 1024;

/// Writes what `entries` say, isolating what PostgreSQL refuses, then acks them all: those
/// quarantined and those of a queue deleted meanwhile included, since retrying them would
/// never succeed.
async fn record(
    state: &AppState,
    owners: &Owners,
    entries: &Arc<[StreamEntry]>,
) -> Result<(), BatchError> {
    let mut readable = Vec::with_capacity(entries.len());
    for (entry, reading) in entries.iter().zip(read_entries(owners, entries).await?) {
        // No owner: the queue was deleted since the streams were listed.
        let Some((owner, reading)) = reading else {
            continue;
        };
        match reading {
            Ok(contribution) => readable.push((entry, owner, Some(contribution))),
            Err(reason) => quarantine(state, &owner, entry, &reason).await?,
        }
    }
    let recorded: Vec<(uuid::Uuid, String)> = readable
        .iter()
        .filter_map(|(_, owner, contribution)| match contribution {
            Some(entries::Contribution::Record(record)) if record.status == "published" => {
                Some((owner.queue_id, record.message_id.clone()))
            }
            _ => None,
        })
        .collect();
    let published = entries::newly_published(&readable);
    write_isolating(state, readable).await?;
    publish_audit::emit(state, published).await;
    if state.faults.recorder_ack_fails() {
        return Err(BatchError::Injected);
    }
    let recorded: Vec<(uuid::Uuid, &str)> =
        recorded.iter().map(|(q, id)| (*q, id.as_str())).collect();
    state
        .broker
        .ack_recorded(entries, &recorded)
        .await
        .map_err(BatchError::Ack)
}

type Reading = Option<(PartitionRef, Result<entries::Contribution, String>)>;

/// Each entry's owner and what it says (`None`: its queue is gone). Large envelopes are
/// decoded off the async threads.
async fn read_entries(
    owners: &Owners,
    batch: &Arc<[StreamEntry]>,
) -> Result<Vec<Reading>, BatchError> {
    fn read(owners: &HashMap<String, PartitionRef>, batch: &[StreamEntry]) -> Vec<Reading> {
        batch
            .iter()
            .map(|entry| {
                let owner = owners.get(&entry.stream)?;
                Some((*owner, entries::read(owner, entry)))
            })
            .collect()
    }
    if batch.iter().map(StreamEntry::size).sum::<usize>() <= INLINE_READ_BYTES {
        return Ok(read(owners, batch));
    }
    let (owners, batch) = (owners.clone(), batch.clone());
    tokio::task::spawn_blocking(move || read(&owners, &batch))
        .await
        .map_err(|error| BatchError::Task(error.to_string()))
}

type Readable<'a> = (&'a StreamEntry, PartitionRef, Option<entries::Contribution>);

/// Writes the contributions in one transaction; when PostgreSQL refuses it, splits the batch
/// in halves (in order) until each refused entry stands alone and is quarantined. Fails only
/// when PostgreSQL is unavailable.
async fn write_isolating(
    state: &AppState,
    mut readable: Vec<Readable<'_>>,
) -> Result<(), RecordWriteError> {
    let mut pending: Vec<&mut [Readable<'_>]> = vec![readable.as_mut_slice()];
    while let Some(part) = pending.pop() {
        let contributions = part
            .iter_mut()
            .filter_map(|(_, _, contribution)| contribution.take())
            .collect();
        let batch = entries::plan(contributions);
        match state.store.write_records(&batch).await {
            Ok(()) => {}
            Err(RecordWriteError::Rejected(reason)) if part.len() == 1 => {
                let (entry, owner, _) = &part[0];
                quarantine(state, owner, entry, &reason).await?;
            }
            Err(RecordWriteError::Rejected(_)) => {
                // The halves are planned again from their entries.
                for (entry, owner, contribution) in part.iter_mut() {
                    *contribution = entries::read(owner, entry).ok();
                }
                let (first, second) = part.split_at_mut(part.len() / 2);
                pending.push(second);
                pending.push(first);
            }
            Err(unavailable) => return Err(unavailable),
        }
    }
    Ok(())
}

/// Sets an entry aside for the operator, once, with one log line and a count.
async fn quarantine(
    state: &AppState,
    owner: &PartitionRef,
    entry: &StreamEntry,
    reason: &str,
) -> Result<(), RecordWriteError> {
    let described = entries::quarantined(owner, entry, reason);
    state.store.quarantine(&described).await?;
    state.recorder.quarantined.fetch_add(1, Ordering::Relaxed);
    state
        .metrics
        .records_quarantined
        .with_label_values(&[described.source])
        .inc();
    tracing::error!(
        tenant = %owner.tenant_id,
        queue = %owner.queue_id,
        partition = owner.partition,
        message_id = described.message_id.as_deref().unwrap_or_default(),
        entry = described.entry_id,
        error = described.error,
        "record entry quarantined: PostgreSQL refused it; every other entry is written"
    );
    Ok(())
}
