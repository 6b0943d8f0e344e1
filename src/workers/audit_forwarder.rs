//! Posts audit events to the audit service (`AUDIT_SERVICE_URL`) in batches, off every hot
//! path. The recorder hands batches over without waiting (`AuditForwarder::send`); at most
//! `CAPACITY` batches wait, and when the audit service is slow or down the oldest is dropped
//! (counted in `mq_audit_events_dropped_total`) — the events stay in the tenants' `audit-logs`
//! queues, the durable copy. Each batch is tried `ATTEMPTS` times with growing pauses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

const CAPACITY: usize = 256;
const ATTEMPTS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(10);

pub struct AuditForwarder {
    url: String,
    sender: mpsc::Sender<Vec<Value>>,
    receiver: Mutex<mpsc::Receiver<Vec<Value>>>,
    posted: AtomicU64,
}

impl AuditForwarder {
    pub fn new(url: String) -> AuditForwarder {
        let (sender, receiver) = mpsc::channel(CAPACITY);
        AuditForwarder {
            url,
            sender,
            receiver: Mutex::new(receiver),
            posted: AtomicU64::new(0),
        }
    }

    /// Queues a batch for the audit service; never waits. False when it was dropped.
    pub fn send(&self, events: Vec<Value>) -> bool {
        self.sender.try_send(events).is_ok()
    }

    /// Events the audit service accepted so far.
    pub fn posted(&self) -> u64 {
        self.posted.load(Ordering::Relaxed)
    }
}

pub async fn run(state: AppState, shutdown: CancellationToken) {
    let Some(forwarder) = state.audit_forwarder.clone() else {
        return;
    };
    let http = match reqwest::Client::builder()
        .no_proxy()
        .timeout(TIMEOUT)
        .build()
    {
        Ok(http) => http,
        Err(error) => {
            tracing::error!(error = %error, "audit forwarder cannot build its HTTP client");
            return;
        }
    };
    let mut receiver = forwarder.receiver.lock().await;
    loop {
        let events = tokio::select! {
            next = receiver.recv() => match next {
                Some(events) => events,
                None => return,
            },
            () = shutdown.cancelled() => return,
        };
        let count = events.len() as u64;
        let body = json!({ "events": events });
        let mut delivered = false;
        for attempt in 1..=ATTEMPTS {
            match http.post(&forwarder.url).json(&body).send().await {
                Ok(response) if response.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(response) => {
                    tracing::debug!(
                        status = response.status().as_u16(),
                        attempt,
                        "audit service refused a batch"
                    )
                }
                Err(error) => tracing::debug!(error = %error, attempt, "audit service unreachable"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250 * 4u64.pow(attempt))) => {}
                () = shutdown.cancelled() => return,
            }
        }
        if delivered {
            forwarder.posted.fetch_add(count, Ordering::Relaxed);
        } else {
            state.metrics.audit_events_dropped.inc_by(count);
            tracing::warn!(events = count, "audit service did not take a batch of message_published events; they stay in audit-logs");
        }
    }
}
