//! message-queue-service: multi-tenant message middleware on Redis Streams and PostgreSQL.
//!
//! `Application` wires configuration, pools, workers and the router; the binary and the
//! integration tests both start the service through it.

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod crypto;
pub mod dev_token;
pub mod domain;
pub mod error;
pub mod faults;
pub mod memory;
pub mod metrics;
pub mod service;
pub mod state;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use auth::Authenticator;
use broker::Broker;
use config::Config;
use metrics::Metrics;
use state::{AppState, Shared};
use store::Store;
use workers::Workers;

pub struct Application {
    state: AppState,
}

impl Application {
    /// Connects to PostgreSQL (applying migrations) and prepares the Redis pool.
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        let store = Store::connect(&config.database_url, config.database_max_connections)
            .await
            .context("cannot connect to PostgreSQL (DATABASE_URL) or apply migrations")?;
        let instance_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let broker = Broker::new(
            &config.redis_url,
            &config.redis_cluster_nodes,
            config.redis_min_replicas_ack,
            config.redis_pool_size,
            &config.redis_key_prefix,
            &instance_id,
        )
        .context("cannot set up the Redis pool (REDIS_URL, REDIS_CLUSTER_NODES)")?;
        let metrics = Arc::new(Metrics::new(
            config.metrics_max_queue_series,
            config.metrics_tenant_queue_series,
        ));
        let sealer = Arc::new(crypto::Sealer::new(config.encryption.clone()));
        let ack_signer = domain::ack_token::AckSigner::new(&config.jwt_secret);
        let webhooks = service::webhook::WebhookClient::new(
            config.webhook_denied_networks.clone(),
            config.webhook_proxy_url.as_deref(),
        )
        .context("cannot build the webhook HTTP client (WEBHOOK_PROXY_URL)")?;
        let audit_forwarder = config
            .audit_service_url
            .clone()
            .map(|url| Arc::new(workers::audit_forwarder::AuditForwarder::new(url)));
        let state = AppState::new(Shared {
            auth: Arc::new(Authenticator::new(
                &config.jwt_secret,
                &config.internal_service_token,
            )),
            config: Arc::new(config),
            store,
            broker,
            metrics,
            workers: Workers::default(),
            queue_cache: service::queue_cache::QueueCache::default(),
            recorder: Default::default(),
            scheduler: Default::default(),
            queue_directory: Default::default(),
            subscriptions: Default::default(),
            signals: Default::default(),
            activity: Default::default(),
            unrecorded: Default::default(),
            byte_quotas: Default::default(),
            retry_timers: Default::default(),
            deadline_timers: Default::default(),
            ack_signer,
            webhooks,
            stats: Default::default(),
            sealer,
            faults: Default::default(),
            audit_forwarder,
            full_audit_queues: Default::default(),
            monitoring_views: Default::default(),
            instance_id,
            started_at: Utc::now(),
            started: Instant::now(),
            stopping: Default::default(),
        });
        Ok(Application { state })
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Starts the background workers, serves HTTP on `listener` until `shutdown` resolves,
    /// then lets in-flight requests and workers finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let stop_workers = CancellationToken::new();
        // Before the workers read any queue: data of an earlier release moves first.
        service::upgrade::move_earlier_redis_layout(&self.state).await;
        self.start_workers(&stop_workers);
        let router = api::router(self.state.clone());
        let stopping = self.state.stopping.clone();
        let config = self.state.config.clone();
        let drain = Duration::from_millis(config.shutdown_drain_ms);
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        let began = Arc::new(std::sync::OnceLock::new());
        let drained = {
            let (stopping, began) = (stopping.clone(), began.clone());
            let stop_workers = stop_workers.clone();
            async move {
                shutdown.await;
                let _ = began.set(Instant::now());
                tracing::info!(
                    drain_ms = drain.as_millis() as u64,
                    "stopping: /health answers 503, then no new connections"
                );
                stopping.cancel();
                tokio::time::sleep(drain).await;
                // No new webhook pushes or sweeps while the last requests finish: what the
                // workers have under way gets the rest of the grace too.
                stop_workers.cancel();
            }
        };
        let server = axum::serve(listener, router).with_graceful_shutdown(drained);
        // Past the grace period, whatever is still in flight is left: an unacked delivery
        // comes back after its deadline, nothing acknowledged is lost.
        let deadline = async {
            stopping.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        let result = tokio::select! {
            result = server => result,
            () = deadline => {
                tracing::warn!("requests still in flight at the end of the grace period; stopping anyway");
                Ok(())
            }
        };
        stop_workers.cancel();
        let spent = began.get().map_or(Duration::ZERO, Instant::elapsed);
        let left = grace.saturating_sub(spent);
        if tokio::time::timeout(left, self.state.workers.wait())
            .await
            .is_err()
        {
            tracing::warn!("workers still busy at the end of the grace period; stopping anyway");
        }
        result
    }

    fn start_workers(&self, shutdown: &CancellationToken) {
        let state = self.state.clone();
        self.state
            .workers
            .spawn("waker", shutdown.clone(), move |token| {
                workers::waker::run(state.clone(), token)
            });
        let state = self.state.clone();
        self.state
            .workers
            .spawn("health_monitor", shutdown.clone(), move |token| {
                workers::health_monitor::run(state.clone(), token)
            });
        let state = self.state.clone();
        self.state
            .workers
            .spawn("scheduler", shutdown.clone(), move |token| {
                workers::scheduler::run(state.clone(), token)
            });
        let state = self.state.clone();
        self.state
            .workers
            .spawn("dispatcher", shutdown.clone(), move |token| {
                workers::dispatcher::run(state.clone(), token)
            });
        let state = self.state.clone();
        self.state
            .workers
            .spawn("reclaimer", shutdown.clone(), move |token| {
                workers::reclaimer::run(state.clone(), token)
            });
        let state = self.state.clone();
        self.state
            .workers
            .spawn("retention", shutdown.clone(), move |token| {
                workers::retention::run(state.clone(), token)
            });
        let state = self.state.clone();
        self.state
            .workers
            .spawn("recorder", shutdown.clone(), move |token| {
                workers::recorder::run(state.clone(), token)
            });
        let state = self.state.clone();
        self.state
            .workers
            .spawn("record_retention", shutdown.clone(), move |token| {
                workers::record_retention::run(state.clone(), token)
            });
        if self.state.audit_forwarder.is_some() {
            let state = self.state.clone();
            self.state
                .workers
                .spawn("audit_forwarder", shutdown.clone(), move |token| {
                    workers::audit_forwarder::run(state.clone(), token)
                });
        }
    }
}
