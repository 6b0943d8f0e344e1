//! Per-tenant budgets of calls that cost every tenant something: configuration changes
//! (each one reloads what the workers know, on every instance) and monitoring views (each
//! reads the stores). One tenant calling them in a loop gets 429 with `Retry-After`, not
//! the others' share of the service.

use uuid::Uuid;

use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::state::AppState;

#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// Queue and subscription create, update, pause, resume, purge, delete.
    Changes,
    /// `GET /metrics`, `/metrics/topics`, `/metrics/consumers`.
    Monitoring,
}

impl Budget {
    fn name(self) -> &'static str {
        match self {
            Budget::Changes => "changes",
            Budget::Monitoring => "monitoring",
        }
    }

    fn limit(self, state: &AppState) -> u64 {
        match self {
            Budget::Changes => state.config.tenant_change_rps,
            Budget::Monitoring => state.config.tenant_monitoring_rps,
        }
    }
}

/// Counts one call against the tenant's budget; 429 when over it. A Redis that cannot count
/// lets the call through: the call itself then says what is wrong.
pub async fn admit(state: &AppState, tenant_id: Uuid, budget: Budget) -> ApiResult<()> {
    let limit = budget.limit(state);
    if limit == 0 {
        return Ok(());
    }
    let second = chrono::Utc::now().timestamp();
    match state
        .broker
        .admit_call(tenant_id, second, budget.name(), limit)
        .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "tenant is over its limit of {limit} {} per second",
                match budget {
                    Budget::Changes => "queue and subscription changes",
                    Budget::Monitoring => "monitoring views",
                }
            ),
        )
        .with_retry_after(1)),
        Err(error) => {
            tracing::debug!(error = %error, "tenant budget not counted; call let through");
            Ok(())
        }
    }
}
