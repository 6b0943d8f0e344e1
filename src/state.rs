//! What every handler and worker shares.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::FromRef;
use chrono::{DateTime, Utc};

use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::config::Config;
use crate::domain::ack_token::AckSigner;
use crate::metrics::Metrics;
use crate::service::partitions::{PartitionDirectory, SubscriptionDirectory};
use crate::service::queue_cache::QueueCache;
use crate::service::signals::QueueSignals;
use crate::store::Store;
use crate::workers::recorder::RecorderStatus;
use crate::workers::scheduler::SchedulerStatus;
use crate::workers::Workers;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub broker: Broker,
    pub metrics: Arc<Metrics>,
    pub workers: Workers,
    pub auth: Arc<Authenticator>,
    pub queue_cache: Arc<QueueCache>,
    pub recorder: Arc<RecorderStatus>,
    pub scheduler: Arc<SchedulerStatus>,
    pub partitions: Arc<PartitionDirectory>,
    pub subscriptions: Arc<SubscriptionDirectory>,
    pub signals: Arc<QueueSignals>,
    pub ack_signer: Arc<AckSigner>,
    pub webhooks: Arc<crate::service::webhook::WebhookClient>,
    pub stats: Arc<crate::stats::Stats>,
    pub sealer: Arc<crate::crypto::Sealer>,
    pub faults: Arc<crate::faults::Faults>,
    /// Posts audit events to `AUDIT_SERVICE_URL`, when it is set.
    pub audit_forwarder: Option<Arc<crate::workers::audit_forwarder::AuditForwarder>>,
    /// Distinguishes this process among several instances (consumer names in Redis).
    pub instance_id: String,
    pub started_at: DateTime<Utc>,
    pub started: Instant,
}

impl FromRef<AppState> for Arc<Authenticator> {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

impl FromRef<AppState> for Arc<Metrics> {
    fn from_ref(state: &AppState) -> Self {
        state.metrics.clone()
    }
}

impl AppState {
    /// A subscription was created, changed or deleted here: workers reload them now.
    pub fn subscription_changed(&self) {
        self.subscriptions.expire();
    }
}
