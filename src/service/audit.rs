//! The audit trail: every change to a queue or subscription is published as an event to the
//! tenant's `audit-logs` queue (who, what, when), where the audit service consumes it like any
//! other subscriber.
//!
//! Best effort: the change has happened when this runs, so a failure to record it (the
//! audit queue full or unreachable) is logged, not returned to the client.

use chrono::Utc;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::auth::Tenant;
use crate::domain::message::{PublishContext, SERVICE_PRODUCER};
use crate::service::system_queues::{self, AUDIT_LOGS};
use crate::state::AppState;

/// What kind of thing changed.
#[derive(Debug, Clone, Copy)]
pub enum Resource {
    Queue,
    Subscription,
}

pub async fn record(
    state: &AppState,
    tenant: &Tenant,
    action: &str,
    resource: Resource,
    id: Uuid,
    name: &str,
) {
    let kind = match resource {
        Resource::Queue => "queue",
        Resource::Subscription => "subscription",
    };
    let action = format!("{kind}.{action}");
    let mut body = Map::new();
    body.insert("action".into(), json!(action));
    body.insert("actor".into(), json!(tenant.principal));
    body.insert(
        "resource".into(),
        json!({"type": kind, "id": id, "name": name}),
    );
    body.insert("at".into(), json!(Utc::now()));
    body.insert(
        "source".into(),
        Value::String("message-queue-service".into()),
    );
    let context = PublishContext {
        now_ms: Utc::now().timestamp_millis(),
        trace_id: None,
        producer_id: Some(SERVICE_PRODUCER.to_owned()),
    };
    if let Err(error) = system_queues::publish_event(
        state,
        tenant.tenant_id,
        AUDIT_LOGS,
        body,
        Some(action.clone()),
        &context,
    )
    .await
    {
        tracing::warn!(error = %error, action, tenant = %tenant.tenant_id, "audit event not recorded");
    }
}
