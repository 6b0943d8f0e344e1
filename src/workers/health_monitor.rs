//! Checks Redis and PostgreSQL every `HEALTH_CHECK_INTERVAL` seconds, so `/metrics` shows a
//! dependency going down even when no request is failing, and logs each change of state.
//! On the same beat it hands memory freed since the last check back to the OS.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::service::health;
use crate::state::AppState;

pub async fn run(state: AppState, shutdown: CancellationToken) {
    let interval = Duration::from_secs(state.config.health_check_interval_secs);
    let mut last_up: Option<(bool, bool)> = None;
    loop {
        let report = health::check(&state).await;
        let up = (report.redis.up, report.postgres.up);
        if last_up != Some(up) {
            if report.all_up() {
                tracing::info!("dependencies up");
            } else {
                tracing::warn!(redis_up = up.0, postgres_up = up.1, "dependency down");
            }
            last_up = Some(up);
        }
        // Off the async threads: trimming walks every arena.
        let _ = tokio::task::spawn_blocking(crate::memory::release_freed).await;
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
