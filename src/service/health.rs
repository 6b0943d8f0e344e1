//! Dependency checks behind `/health`, `/status` and the health monitor.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::ApiResult;
use crate::state::AppState;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DependencyCheck {
    pub status: &'static str,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    pub up: bool,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HealthReport {
    pub redis: DependencyCheck,
    pub postgres: DependencyCheck,
}

impl HealthReport {
    pub fn all_up(&self) -> bool {
        self.redis.up && self.postgres.up
    }
}

/// Checks both dependencies concurrently, each bounded by `DEPENDENCY_TIMEOUT_MS`, and
/// records the outcome in the metrics.
pub async fn check(state: &AppState) -> HealthReport {
    let timeout = Duration::from_millis(state.config.dependency_timeout_ms);
    let (redis, postgres) = tokio::join!(
        timed(timeout, state.broker.ping()),
        timed(timeout, state.store.ping()),
    );
    for (name, check) in [("redis", &redis), ("postgres", &postgres)] {
        state
            .metrics
            .dependency_up
            .with_label_values(&[name])
            .set(i64::from(check.up));
        state
            .metrics
            .dependency_latency
            .with_label_values(&[name])
            .set(check.latency_ms / 1000.0);
    }
    let (redis_open, redis_idle) = state.broker.pool_usage();
    let (pg_open, pg_idle) = state.store.pool_usage();
    let pools = &state.metrics.pool_connections;
    pools
        .with_label_values(&["redis", "open"])
        .set(redis_open as i64);
    pools
        .with_label_values(&["redis", "idle"])
        .set(redis_idle as i64);
    pools
        .with_label_values(&["postgres", "open"])
        .set(i64::from(pg_open));
    pools
        .with_label_values(&["postgres", "idle"])
        .set(pg_idle as i64);
    HealthReport { redis, postgres }
}

async fn timed(timeout: Duration, probe: impl Future<Output = ApiResult<()>>) -> DependencyCheck {
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, probe).await;
    let latency_ms = (started.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0;
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error.message),
        Err(_) => Some(format!("no answer within {} ms", timeout.as_millis())),
    };
    DependencyCheck {
        status: if error.is_none() { "up" } else { "down" },
        up: error.is_none(),
        latency_ms,
        error,
    }
}
