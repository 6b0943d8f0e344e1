//! What every handler and worker shares.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::FromRef;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::config::Config;
use crate::domain::ack_token::AckSigner;
use crate::metrics::Metrics;
use crate::service::activity::ActiveQueues;
use crate::service::due::DueQueues;
use crate::service::partitions::{QueueDirectory, SubscriptionDirectory};
use crate::service::queue_cache::QueueCache;
use crate::service::signals::QueueSignals;
use crate::service::wake::Announcement;
use crate::store::Store;
use crate::workers::recorder::RecorderStatus;
use crate::workers::scheduler::SchedulerStatus;
use crate::workers::Workers;

/// The shared state: one pointer, so handing it to a request or a task costs one reference
/// count, not one per part.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub config: Arc<Config>,
    pub store: Store,
    pub broker: Broker,
    pub metrics: Arc<Metrics>,
    pub workers: Workers,
    pub auth: Arc<Authenticator>,
    pub queue_cache: QueueCache,
    pub recorder: RecorderStatus,
    pub scheduler: SchedulerStatus,
    pub queue_directory: QueueDirectory,
    pub subscriptions: SubscriptionDirectory,
    /// Wakes this instance's consumers of a queue (long-polls, webhook serving tasks).
    pub signals: QueueSignals,
    /// The queues that may hold anything, for the sweeping workers.
    pub activity: ActiveQueues,
    /// The partitions written here that the recorder has not read since.
    pub unrecorded: crate::service::unrecorded::UnrecordedWrites,
    /// What each publishing tenant stores, for `TENANT_MAX_BYTES`.
    pub byte_quotas: crate::service::byte_quota::ByteQuotas,
    /// When a retry falls due in a queue: its consumers here are woken then.
    pub retry_timers: DueQueues,
    /// When an ack deadline of a delivery made here passes: the reclaimer looks then.
    pub deadline_timers: DueQueues,
    pub ack_signer: AckSigner,
    pub webhooks: crate::service::webhook::WebhookClient,
    pub stats: crate::stats::Stats,
    /// Each tenant's monitoring views, reused for `MONITORING_CACHE_MS`.
    pub monitoring_views: crate::service::monitoring::MonitoringViews,
    pub sealer: Arc<crate::crypto::Sealer>,
    pub faults: crate::faults::Faults,
    /// Posts audit events to `AUDIT_SERVICE_URL`, when it is set.
    pub audit_forwarder: Option<Arc<crate::workers::audit_forwarder::AuditForwarder>>,
    /// Tenants whose `audit-logs` queue refused events lately (`service::publish_audit`).
    pub full_audit_queues: crate::service::publish_audit::FullAuditQueues,
    /// Distinguishes this process among several instances (consumer names in Redis, the
    /// origin of wake-ups).
    pub instance_id: String,
    pub started_at: DateTime<Utc>,
    pub started: Instant,
    /// Cancelled when the service begins to stop: `/health` answers 503, long polls answer.
    pub stopping: tokio_util::sync::CancellationToken,
}

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
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
    /// A subscription was created or changed here: the workers of every instance read it
    /// again now (it alone).
    pub async fn subscription_changed(&self, subscription_id: Uuid) {
        self.subscriptions.changed(subscription_id);
        self.announce(&Announcement::SubscriptionsChanged {
            subscription_id: Some(subscription_id),
        })
        .await;
    }

    /// A queue was created, changed or deleted here: every instance forgets what it cached
    /// of it, and its consumers look at it again (a resumed queue is served at once).
    pub async fn queue_changed(&self, queue_id: Uuid, tenant_id: Uuid, name: &str) {
        self.queue_cache.invalidate(tenant_id, name);
        self.queue_directory.touch(queue_id);
        self.signals.notify(queue_id);
        self.announce(&Announcement::QueueChanged {
            queue_id,
            tenant_id,
            name: name.to_owned(),
        })
        .await;
    }

    /// A subscription was deleted here: every instance reloads the subscriptions and drops
    /// what it kept of this one.
    pub async fn subscription_deleted(&self, subscription_id: Uuid) {
        self.forget_subscription_here(subscription_id);
        self.announce(&Announcement::SubscriptionDeleted { subscription_id })
            .await;
    }

    /// What this process kept of a deleted subscription goes (here, or when heard of).
    pub fn forget_subscription_here(&self, subscription_id: Uuid) {
        self.subscriptions.changed(subscription_id);
        self.stats.forget_subscription(subscription_id);
    }

    /// A queue was deleted here: every instance drops what it kept of it (cache, timers,
    /// signals, statistics, metric series) and reloads the subscriptions that went with it.
    pub async fn queue_deleted(&self, queue_id: Uuid, tenant_id: Uuid, name: &str) {
        self.forget_queue_here(queue_id, tenant_id, name);
        self.announce(&Announcement::QueueDeleted {
            queue_id,
            tenant_id,
            name: name.to_owned(),
        })
        .await;
    }

    /// What this process kept of a deleted queue goes (here, or when heard of). Its waiting
    /// consumers are woken first, so they look again and find it gone.
    pub fn forget_queue_here(&self, queue_id: Uuid, tenant_id: Uuid, name: &str) {
        self.queue_cache.invalidate(tenant_id, name);
        self.queue_directory.touch(queue_id);
        self.subscriptions.queue_gone();
        self.signals.notify(queue_id);
        self.signals.forget(queue_id);
        self.metrics.forget_queue(tenant_id, name);
        self.stats.forget_queue(queue_id);
        self.activity.forget(queue_id);
        self.scheduler.timers.forget(queue_id);
        self.retry_timers.forget(queue_id);
        self.deadline_timers.forget(queue_id);
    }

    /// Tells the other instances; one that misses it catches up within its safety refresh.
    async fn announce(&self, announcement: &Announcement) {
        if let Err(error) = self.broker.announce(announcement).await {
            tracing::debug!(error = %error, "announcement not sent; other instances catch up on their own");
        }
    }
}
