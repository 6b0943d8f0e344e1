//! The monitoring views: `GET /metrics` (tenant), `/metrics/topics`, `/metrics/consumers`, the
//! all-tenant view of the internal API, and the per-queue gauges of the Prometheus scrape.
//!
//! Depth, pending, delayed and lag come from Redis (one pipelined round trip for all queues);
//! rates and latencies from the in-process windows of `stats`. PostgreSQL is read once per
//! view for the list of queues and subscriptions, never scanned for records.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::queue::Queue;
use crate::domain::subscription::{Subscription, SubscriptionStatus};
use crate::error::ApiResult;
use crate::metrics::QueueGauges;
use crate::service::subscriptions;
use crate::service::tenant_limits::{self, Budget};
use crate::state::AppState;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsView {
    pub redis_streams: StreamTotals,
    pub consumers: ConsumerTotals,
    pub performance: PerformanceView,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamTotals {
    pub total_streams: u64,
    pub total_consumer_groups: u64,
    pub total_messages: u64,
    pub pending_messages: u64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerTotals {
    pub active_consumers: u64,
    pub total_lag: u64,
    pub processing_rate: f64,
    pub error_rate: f64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PerformanceView {
    pub average_latency: f64,
    pub p95_latency: f64,
    pub p99_latency: f64,
    pub throughput: f64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicMetrics {
    pub name: String,
    pub message_count: u64,
    pub pending_count: u64,
    pub delayed_count: u64,
    pub lag: u64,
    pub publish_rate: f64,
    pub consume_rate: f64,
    pub subscription_count: u64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerMetrics {
    pub subscription_id: Uuid,
    pub queue: String,
    pub consumer_group: String,
    pub consumer_name: String,
    pub status: SubscriptionStatus,
    pub lag: u64,
    pub pending: u64,
    pub processing_rate: f64,
    pub error_rate: f64,
    pub avg_processing_ms: f64,
    pub last_consumed_at: Option<DateTime<Utc>>,
}

/// Rates round to what a dashboard shows.
fn rounded(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Each tenant's monitoring views, reused for `MONITORING_CACHE_MS`: a view reads every
/// queue and subscription of the tenant from both stores, so a dashboard refreshing it (or a
/// tenant calling it in a loop, within its budget) costs one read per interval.
#[derive(Default)]
pub struct MonitoringViews {
    overview: ViewCache<MetricsView>,
    topics: ViewCache<Vec<TopicMetrics>>,
    consumers: ViewCache<Vec<ConsumerMetrics>>,
    /// Views read from the stores (not reused), for the tests of the reuse.
    pub loads: AtomicU64,
}

struct ViewCache<T> {
    entries: Mutex<Entries<T>>,
}

struct Entries<T> {
    by_tenant: HashMap<Uuid, (Instant, T)>,
    pruned_at: Instant,
}

impl<T> Default for ViewCache<T> {
    fn default() -> Self {
        ViewCache {
            entries: Mutex::new(Entries {
                by_tenant: HashMap::new(),
                pruned_at: Instant::now(),
            }),
        }
    }
}

impl<T: Clone> ViewCache<T> {
    /// The tenant's view from the last `fresh_for`, else one loaded now (and kept).
    async fn get(
        &self,
        views: &MonitoringViews,
        tenant_id: Uuid,
        fresh_for: Duration,
        load: impl std::future::Future<Output = ApiResult<T>>,
    ) -> ApiResult<T> {
        if !fresh_for.is_zero() {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, view)) = entries.by_tenant.get(&tenant_id) {
                if at.elapsed() < fresh_for {
                    return Ok(view.clone());
                }
            }
        }
        views.loads.fetch_add(1, Ordering::Relaxed);
        let view = load.await?;
        if !fresh_for.is_zero() {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            // Views past their time go, once per interval: the map holds the tenants that
            // looked lately, not every tenant that ever looked.
            if entries.pruned_at.elapsed() >= fresh_for {
                entries.pruned_at = Instant::now();
                entries
                    .by_tenant
                    .retain(|_, (at, _)| at.elapsed() < fresh_for);
            }
            entries
                .by_tenant
                .insert(tenant_id, (Instant::now(), view.clone()));
        }
        Ok(view)
    }
}

fn views_fresh_for(state: &AppState) -> Duration {
    Duration::from_millis(state.config.monitoring_cache_ms)
}

/// `GET /metrics` of one tenant, or of all tenants (`None`, internal API).
pub async fn overview(state: &AppState, tenant_id: Option<Uuid>) -> ApiResult<MetricsView> {
    match tenant_id {
        Some(tenant) => {
            let cache = &state.monitoring_views.overview;
            tenant_view(state, cache, tenant, load_overview(state, Some(tenant))).await
        }
        None => load_overview(state, None).await,
    }
}

/// A tenant's view: counted against its monitoring budget, then reused or loaded.
async fn tenant_view<T: Clone>(
    state: &AppState,
    cache: &ViewCache<T>,
    tenant_id: Uuid,
    load: impl std::future::Future<Output = ApiResult<T>>,
) -> ApiResult<T> {
    tenant_limits::admit(state, tenant_id, Budget::Monitoring).await?;
    let views = &state.monitoring_views;
    cache
        .get(views, tenant_id, views_fresh_for(state), load)
        .await
}

/// The queues and subscriptions of one tenant, or of all (`None`).
async fn setup_of(
    state: &AppState,
    tenant_id: Option<Uuid>,
) -> ApiResult<(Vec<Queue>, Vec<Subscription>)> {
    tokio::try_join!(
        state.store.all_queues(tenant_id),
        state.store.subscriptions_of(tenant_id),
    )
}

async fn load_overview(state: &AppState, tenant_id: Option<Uuid>) -> ApiResult<MetricsView> {
    let (queues, subscriptions) = setup_of(state, tenant_id).await?;
    let streams = state.broker.queues_stats(&queues).await?;
    let groups: HashSet<(Uuid, &str)> = subscriptions
        .iter()
        .map(|s| (s.queue_id, s.delivery_group.as_str()))
        .collect();
    let performance = state.stats.performance(tenant_id);
    Ok(MetricsView {
        redis_streams: StreamTotals {
            total_streams: queues.iter().map(|q| u64::from(q.partition_count)).sum(),
            total_consumer_groups: groups.len() as u64,
            total_messages: streams.iter().map(|s| s.message_count).sum(),
            pending_messages: streams.iter().map(|s| s.pending_count).sum(),
        },
        consumers: ConsumerTotals {
            active_consumers: subscriptions
                .iter()
                .filter(|s| s.status == SubscriptionStatus::Active)
                .count() as u64,
            total_lag: streams.iter().map(|s| s.lag).sum(),
            processing_rate: rounded(performance.processing_rate),
            error_rate: rounded(performance.error_rate),
        },
        performance: PerformanceView {
            average_latency: rounded(performance.average_latency_ms),
            p95_latency: performance.p95_latency_ms,
            p99_latency: performance.p99_latency_ms,
            throughput: rounded(performance.throughput),
        },
    })
}

pub async fn topics(state: &AppState, tenant_id: Uuid) -> ApiResult<Vec<TopicMetrics>> {
    tenant_view(
        state,
        &state.monitoring_views.topics,
        tenant_id,
        load_topics(state, tenant_id),
    )
    .await
}

async fn load_topics(state: &AppState, tenant_id: Uuid) -> ApiResult<Vec<TopicMetrics>> {
    let (queues, subscriptions) = setup_of(state, Some(tenant_id)).await?;
    let streams = state.broker.queues_stats(&queues).await?;
    let mut subscription_counts: HashMap<Uuid, u64> = HashMap::new();
    for subscription in &subscriptions {
        *subscription_counts
            .entry(subscription.queue_id)
            .or_default() += 1;
    }
    Ok(queues
        .iter()
        .zip(streams)
        .map(|(queue, stream)| {
            let (publish_rate, consume_rate) = state.stats.queue_rates(queue.id);
            TopicMetrics {
                name: queue.name.clone(),
                message_count: stream.message_count,
                pending_count: stream.pending_count,
                delayed_count: stream.delayed_count,
                lag: stream.lag,
                publish_rate: rounded(publish_rate),
                consume_rate: rounded(consume_rate),
                subscription_count: subscription_counts.get(&queue.id).copied().unwrap_or(0),
            }
        })
        .collect())
}

pub async fn consumers(state: &AppState, tenant_id: Uuid) -> ApiResult<Vec<ConsumerMetrics>> {
    tenant_view(
        state,
        &state.monitoring_views.consumers,
        tenant_id,
        load_consumers(state, tenant_id),
    )
    .await
}

async fn load_consumers(state: &AppState, tenant_id: Uuid) -> ApiResult<Vec<ConsumerMetrics>> {
    let (queues, subscriptions) = setup_of(state, Some(tenant_id)).await?;
    let partitions: HashMap<Uuid, u16> = queues.iter().map(|q| (q.id, q.partition_count)).collect();
    let groups = subscriptions::positions(state, &subscriptions, |s| {
        partitions.get(&s.queue_id).copied().unwrap_or(1)
    })
    .await?;
    Ok(subscriptions
        .into_iter()
        .zip(groups)
        .map(|(subscription, group)| {
            let rates = state.stats.consumer_rates(subscription.id);
            ConsumerMetrics {
                subscription_id: subscription.id,
                queue: subscription.queue,
                consumer_group: subscription.consumer_group,
                consumer_name: subscription.consumer_name,
                status: subscription.status,
                lag: group.lag,
                pending: group.consumer_pending,
                processing_rate: rounded(rates.processing_rate),
                error_rate: rounded(rates.error_rate),
                avg_processing_ms: rounded(rates.avg_processing_ms),
                last_consumed_at: subscription.last_consumed_at,
            }
        })
        .collect())
}

/// Refreshes the per-queue gauges for a scrape unless they are younger than
/// `METRICS_GAUGE_INTERVAL_MS`. One refresh runs at a time and the scrapes that arrive meanwhile
/// wait for it, so a storm of scrapes costs one read of the stores per interval. A slow
/// dependency bounds the wait (`DEPENDENCY_TIMEOUT_MS`); the last values are served then.
pub async fn refresh_gauges_when_stale(state: &AppState) {
    let fresh_for = std::time::Duration::from_millis(state.config.metrics_gauge_interval_ms);
    let mut refreshed_at = state.metrics.gauges_refreshed_at.lock().await;
    if refreshed_at.is_some_and(|at| at.elapsed() < fresh_for) {
        return;
    }
    state.metrics.gauge_refreshes.inc();
    let timeout = std::time::Duration::from_millis(state.config.dependency_timeout_ms);
    match tokio::time::timeout(timeout, refresh_gauges(state)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(error = %error, "queue gauges not refreshed"),
        Err(_) => tracing::warn!("queue gauges not refreshed in time"),
    }
    *refreshed_at = Some(std::time::Instant::now());
}

/// Sets the per-queue gauges and the record-writer backlog for a Prometheus scrape.
async fn refresh_gauges(state: &AppState) -> ApiResult<()> {
    let queues = state.store.all_queues(None).await?;
    let streams = state.broker.queues_stats(&queues).await?;
    let mut backlog = state.recorder.report().waiting_batch;
    let gauges: Vec<QueueGauges> = queues
        .iter()
        .zip(&streams)
        .map(|(queue, stream)| {
            backlog += stream.unrecorded;
            (
                queue.tenant_id,
                queue.name.clone(),
                [
                    ("stored", stream.message_count),
                    ("pending", stream.pending_count),
                    ("delayed", stream.delayed_count),
                    ("lag", stream.lag),
                ],
            )
        })
        .collect();
    state.metrics.set_queue_gauges(&gauges);
    state.metrics.record_writer_backlog.set(backlog as i64);
    Ok(())
}
