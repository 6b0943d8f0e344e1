//! Redrive: dead letters sent back to the queue they came from (`x-original-queue`).
//!
//! A redriven message is published anew to its original queue (with the producer ACL of
//! the caller there) and its record in the dead-letter queue is marked `redriven`, which is
//! final: it is never redriven twice. The new message's id is derived from the dead letter's
//! (`<id>.redriven`), so two redrives racing for one message publish it once (the second is
//! a duplicate within the dedup window). The dead letter's entry itself stays in the
//! dead-letter stream until its retention, as every consumed entry does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::auth::Tenant;
use crate::domain::message::{MessageInput, PublishContext};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::service::messages::{self, MessageView};
use crate::service::{publish, queues};
use crate::state::AppState;

pub const MAX_REDRIVE: usize = 100;
const MAX_ID_CHARS: usize = 200;
const REDRIVEN_SUFFIX: &str = ".redriven";
/// Headers the dead-lettering added: the redriven message starts its deliveries afresh.
const DEAD_LETTER_HEADERS: &[&str] = &[
    "x-dead-letter-reason",
    "x-original-queue",
    "x-delivery-attempts",
    "x-last-error",
    "x-subscription-id",
    "x-consumer-group",
];

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedriveRequest {
    /// The dead letters to send back, 1-100 message ids.
    #[schema(example = json!(["0193e8a0-5c1e-7d4a-9a53-5d2b4c1e9f10"]))]
    pub message_ids: Option<Vec<String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RedriveResult {
    pub redriven: Vec<Redriven>,
    pub failed: Vec<RedriveFailure>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Redriven {
    pub message_id: String,
    /// The queue it went back to.
    pub queue: String,
    pub new_message_id: String,
}

/// A message that was not redriven, with the error it got.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedriveFailure {
    pub message_id: String,
    pub code: String,
    pub message: String,
}

pub async fn redrive(
    state: &AppState,
    tenant: &Tenant,
    queue_name: &str,
    request: RedriveRequest,
) -> ApiResult<RedriveResult> {
    let ids = request.message_ids.unwrap_or_default();
    if ids.is_empty() || ids.len() > MAX_REDRIVE {
        return Err(ApiError::validation(
            format!("messageIds must list 1 to {MAX_REDRIVE} message ids"),
            vec!["messageIds".into()],
        ));
    }
    // The queue itself must be the tenant's: a missing one fails the request as a whole.
    queues::require(state, tenant.tenant_id, queue_name).await?;
    let mut result = RedriveResult {
        redriven: Vec::new(),
        failed: Vec::new(),
    };
    let mut seen = std::collections::HashSet::new();
    for id in ids {
        if !seen.insert(id.clone()) {
            continue;
        }
        match redrive_one(state, tenant, queue_name, &id).await {
            Ok(done) => result.redriven.push(done),
            // An outage fails the request: the caller retries it whole, which is safe.
            Err(error) if error.code.status().is_server_error() => return Err(error),
            Err(error) => result.failed.push(RedriveFailure {
                message_id: id,
                code: error.code.as_str().to_owned(),
                message: error.message,
            }),
        }
    }
    Ok(result)
}

async fn redrive_one(
    state: &AppState,
    tenant: &Tenant,
    queue_name: &str,
    message_id: &str,
) -> ApiResult<Redriven> {
    // The lookup applies the consumer ACL of the dead-letter queue.
    let view = messages::get(state, tenant, queue_name, message_id).await?;
    let not_redrivable = |why: String| ApiError::new(ErrorCode::MessageNotRedrivable, why);
    if view.status == "redriven" {
        return Err(not_redrivable(format!(
            "message '{message_id}' was redriven already"
        )));
    }
    let (original, input) =
        redelivery(&view).map_err(|why| not_redrivable(format!("message '{message_id}' {why}")))?;
    let new_message_id = input.message_id.clone().unwrap_or_default();
    let context = PublishContext {
        now_ms: chrono::Utc::now().timestamp_millis(),
        trace_id: view.trace_id.clone(),
        producer_id: Some(tenant.principal.clone()).filter(|p| !p.is_empty()),
    };
    // The producer ACL of the original queue applies to the caller.
    let published = publish::publish_one(state, tenant, &original, input, &context).await?;
    let queue = queues::require(state, tenant.tenant_id, queue_name).await?;
    state
        .store
        .mark_redriven(queue.tenant_id, queue.id, view.partition, message_id)
        .await?;
    Ok(Redriven {
        message_id: message_id.to_owned(),
        queue: published.queue,
        new_message_id,
    })
}

/// Where a dead letter goes back to, and the message to publish there; or why it cannot go.
fn redelivery(view: &MessageView) -> Result<(String, MessageInput), String> {
    let headers: BTreeMap<String, String> = match &view.headers {
        Value::Object(map) => map
            .iter()
            .filter_map(|(name, value)| Some((name.clone(), value.as_str()?.to_owned())))
            .collect(),
        _ => BTreeMap::new(),
    };
    let original = headers
        .get("x-original-queue")
        .filter(|queue| !queue.is_empty())
        .cloned()
        .ok_or("is not a dead letter (no x-original-queue header)")?;
    if view.payload.is_null() {
        return Err(format!(
            "has no readable payload ({})",
            view.payload_error.as_deref().unwrap_or("not recorded yet")
        ));
    }
    let mut headers = headers;
    headers.retain(|name, _| !DEAD_LETTER_HEADERS.contains(&name.as_str()));
    let new_id = format!("{}{REDRIVEN_SUFFIX}", view.message_id);
    if new_id.chars().count() > MAX_ID_CHARS {
        return Err(format!(
            "has an id too long to derive a new one from (at most {} characters)",
            MAX_ID_CHARS - REDRIVEN_SUFFIX.len()
        ));
    }
    Ok((
        original,
        MessageInput {
            payload: Some(view.payload.clone()),
            headers: Some(headers),
            key: view.key.clone(),
            correlation_id: view.correlation_id.clone(),
            message_id: Some(new_id),
            ..MessageInput::default()
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dead_letter(headers: Value, payload: Value) -> MessageView {
        MessageView {
            message_id: "m-1".into(),
            queue: "orders.dlq".into(),
            status: "published".into(),
            partition: 0,
            offset: Some("1-0".into()),
            key: Some("k".into()),
            correlation_id: None,
            headers,
            payload,
            payload_error: None,
            published_at: chrono::Utc::now(),
            scheduled_at: None,
            expires_at: None,
            trace_id: None,
            retry_count: 0,
            deliveries: Vec::new(),
        }
    }

    #[test]
    fn a_dead_letter_goes_back_without_the_dead_letter_headers() {
        let view = dead_letter(
            json!({"x-original-queue": "orders", "x-last-error": "boom", "eventType": "e"}),
            json!({"n": 1}),
        );
        let (queue, input) = redelivery(&view).unwrap();
        assert_eq!(queue, "orders");
        assert_eq!(input.message_id.as_deref(), Some("m-1.redriven"));
        assert_eq!(input.payload, Some(json!({"n": 1})));
        assert_eq!(input.key.as_deref(), Some("k"));
        let headers = input.headers.unwrap();
        assert_eq!(headers.get("eventType").map(String::as_str), Some("e"));
        assert!(!headers.contains_key("x-last-error"));
        assert!(!headers.contains_key("x-original-queue"));
    }

    #[test]
    fn a_message_that_is_not_a_dead_letter_is_refused() {
        let view = dead_letter(json!({"eventType": "e"}), json!(1));
        assert!(redelivery(&view).unwrap_err().contains("not a dead letter"));
        let unreadable = dead_letter(json!({"x-original-queue": "orders"}), Value::Null);
        assert!(redelivery(&unreadable)
            .unwrap_err()
            .contains("no readable payload"));
    }
}
