//! Redrive: dead letters sent back to the queue they came from.
//!
//! A dead letter names the subscription that gave up on it (`x-subscription-id`); the
//! subscription must still exist, be the caller's tenant's, and have this queue as its
//! dead-letter queue, and its queue is where the message goes back (never a name looked up
//! anew: a guest's dead letter names another tenant's queue, which is refused). The record is
//! claimed first (`redriven`, atomically, so two redrives racing publish once), then the
//! message is published again through the normal path with the caller's producer ACL and
//! limits, under the id `<id>.redriven`; a failed publish gives the claim back. The dead
//! letter's entry stays in the dead-letter stream until its retention.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::auth::Tenant;
use crate::crypto::{Binding, SealedPayload};
use crate::domain::message::{MessageInput, PublishContext};
use crate::domain::queue::Queue;
use crate::domain::subscription::Subscription;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::service::messages::{self, MessageView};
use crate::service::tenant_limits::{self, Budget};
use crate::service::{publish, queues, subscriptions};
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
    let dead_letters = queues::require(state, tenant.tenant_id, queue_name).await?;
    tenant_limits::admit(state, tenant.tenant_id, Budget::Changes).await?;
    let mut result = RedriveResult {
        redriven: Vec::new(),
        failed: Vec::new(),
    };
    let mut seen = HashSet::new();
    // Dead letters of one request mostly share a subscription: looked up once.
    let mut givers = Givers::new();
    for id in ids {
        if !seen.insert(id.clone()) {
            continue;
        }
        match redrive_one(state, tenant, &dead_letters, &mut givers, &id).await {
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
    dead_letters: &Queue,
    givers: &mut Givers,
    message_id: &str,
) -> ApiResult<Redriven> {
    let not_redrivable = |why: String| {
        ApiError::new(
            ErrorCode::MessageNotRedrivable,
            format!("message '{message_id}' {why}"),
        )
    };
    // The lookup applies the consumer ACL of the dead-letter queue.
    let view = messages::get(state, tenant, &dead_letters.name, message_id).await?;
    if view.status == "redriven" {
        return Err(not_redrivable("was redriven already".into()));
    }
    let subscription = giving_up_subscription(state, tenant, dead_letters, givers, &view)
        .await?
        .map_err(not_redrivable)?;
    // An outage fails the request (503); only a queue that is gone fails this message.
    let original = match queues::require(state, tenant.tenant_id, &subscription.queue).await {
        Err(error) if error.code == ErrorCode::QueueNotFound => {
            return Err(not_redrivable(format!(
                "came from queue '{}', which no longer exists",
                subscription.queue
            )))
        }
        other => other?,
    };
    let payload = plaintext(state, &original, dead_letters, &view)
        .await
        .map_err(not_redrivable)?;
    let input = redelivery(&view, payload).map_err(not_redrivable)?;
    let new_message_id = input.message_id.clone().unwrap_or_default();
    let claimed = state
        .store
        .claim_redrive(dead_letters.tenant_id, dead_letters.id, message_id)
        .await?
        .ok_or_else(|| {
            not_redrivable(
                "was redriven meanwhile, or is not recorded yet (try again in a second)".into(),
            )
        })?;
    let context = PublishContext {
        now_ms: chrono::Utc::now().timestamp_millis(),
        trace_id: view.trace_id.clone(),
        producer_id: Some(tenant.principal.clone()).filter(|p| !p.is_empty()),
    };
    // The producer ACL of the original queue applies to the caller.
    let published = publish::publish_one(state, tenant, &original.name, input, &context).await;
    let refusal = match published {
        Ok(result) if !result.duplicate => None,
        Ok(_) => Some(not_redrivable(format!(
            "cannot go back: queue '{}' already holds a message '{new_message_id}'",
            original.name
        ))),
        Err(error) => Some(error),
    };
    if let Some(error) = refusal {
        state
            .store
            .release_redrive(dead_letters.id, message_id, &claimed)
            .await?;
        return Err(error);
    }
    Ok(Redriven {
        message_id: message_id.to_owned(),
        queue: original.name,
        new_message_id,
    })
}

fn text_header<'a>(view: &'a MessageView, name: &str) -> Option<&'a str> {
    view.headers
        .get(name)?
        .as_str()
        .filter(|text| !text.is_empty())
}

/// The subscriptions a request's dead letters named, by the header's text (`None`: none such
/// of the caller's tenant).
type Givers = std::collections::HashMap<String, Option<Subscription>>;

/// The subscription that dead-lettered the message into this queue, the caller's tenant's
/// on a queue of the same tenant; or why the message is no dead letter that can go back. An
/// outage is the outer error.
async fn giving_up_subscription(
    state: &AppState,
    tenant: &Tenant,
    dead_letters: &Queue,
    givers: &mut Givers,
    view: &MessageView,
) -> ApiResult<Result<Subscription, String>> {
    let Some(id) = text_header(view, "x-subscription-id") else {
        return Ok(Err(
            "is not a dead letter (no x-subscription-id header)".into()
        ));
    };
    if !givers.contains_key(id) {
        let found = match subscriptions::require(state, tenant.tenant_id, id).await {
            Ok(subscription) => Some(subscription),
            Err(error) if error.code == ErrorCode::SubscriptionNotFound => None,
            Err(error) => return Err(error),
        };
        givers.insert(id.to_owned(), found);
    }
    let Some(subscription) = givers.get(id).cloned().flatten() else {
        return Ok(Err(format!(
            "names subscription '{id}', which no longer exists: publish it again yourself"
        )));
    };
    if subscription.dead_letter_queue != dead_letters.name {
        return Ok(Err(format!(
            "is not a dead letter of subscription '{id}' (its dead-letter queue is '{}')",
            subscription.dead_letter_queue
        )));
    }
    if subscription.queue_tenant_id != tenant.tenant_id {
        return Ok(Err(format!(
            "came from another tenant's public queue '{}': only its owner publishes there",
            subscription.queue
        )));
    }
    Ok(Ok(subscription))
}

/// The dead letter's payload in plaintext. A dead letter of an encrypted queue kept in an
/// unencrypted dead-letter queue holds the original sealed form, opened here with the
/// original queue's key and binding.
async fn plaintext(
    state: &AppState,
    original: &Queue,
    dead_letters: &Queue,
    view: &MessageView,
) -> Result<Value, String> {
    if view.payload.is_null() {
        return Err(format!(
            "has no readable payload ({})",
            view.payload_error.as_deref().unwrap_or("not recorded yet")
        ));
    }
    if !original.encrypted || dead_letters.encrypted {
        return Ok(view.payload.clone());
    }
    let sealed: SealedPayload = serde_json::from_value(view.payload.clone())
        .map_err(|_| "holds a plaintext payload of an encrypted queue: not sent back".to_owned())?;
    let (sealer, tenant_id, queue_id, message_id) = (
        state.sealer.clone(),
        original.tenant_id,
        original.id,
        view.message_id.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let binding = Binding {
            tenant_id,
            queue_id,
            message_id: &message_id,
        };
        sealer
            .open(&sealed, binding)
            .map_err(|error| error.to_string())
    })
    .await
    .map_err(|error| format!("could not be opened: {error}"))?
    .map_err(|error| format!("could not be opened: {error}"))
}

/// The message to publish again; or why it cannot go.
fn redelivery(view: &MessageView, payload: Value) -> Result<MessageInput, String> {
    let headers: BTreeMap<String, String> = match &view.headers {
        Value::Object(map) => map
            .iter()
            .filter(|(name, _)| !DEAD_LETTER_HEADERS.contains(&name.as_str()))
            .filter_map(|(name, value)| Some((name.clone(), value.as_str()?.to_owned())))
            .collect(),
        _ => BTreeMap::new(),
    };
    let new_id = format!("{}{REDRIVEN_SUFFIX}", view.message_id);
    if new_id.chars().count() > MAX_ID_CHARS {
        return Err(format!(
            "has an id too long to derive a new one from (at most {} characters)",
            MAX_ID_CHARS - REDRIVEN_SUFFIX.len()
        ));
    }
    Ok(MessageInput {
        payload: Some(payload),
        headers: Some(headers),
        key: view.key.clone(),
        correlation_id: view.correlation_id.clone(),
        content_type: view.content_type.clone(),
        message_id: Some(new_id),
        ..MessageInput::default()
    })
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
            content_type: Some("application/vnd.orders+json".into()),
            deliveries: Vec::new(),
        }
    }

    #[test]
    fn a_dead_letter_goes_back_without_the_dead_letter_headers() {
        let view = dead_letter(
            json!({"x-original-queue": "orders", "x-last-error": "boom", "eventType": "e"}),
            json!({"n": 1}),
        );
        let input = redelivery(&view, json!({"n": 1})).unwrap();
        assert_eq!(input.message_id.as_deref(), Some("m-1.redriven"));
        assert_eq!(input.payload, Some(json!({"n": 1})));
        assert_eq!(input.key.as_deref(), Some("k"));
        assert_eq!(
            input.content_type.as_deref(),
            Some("application/vnd.orders+json"),
            "the producer's content type goes back with it"
        );
        let headers = input.headers.unwrap();
        assert_eq!(headers.get("eventType").map(String::as_str), Some("e"));
        assert!(!headers.contains_key("x-last-error"));
        assert!(!headers.contains_key("x-original-queue"));
    }

    #[test]
    fn an_id_too_long_for_the_suffix_is_refused() {
        let mut view = dead_letter(json!({}), json!(1));
        view.message_id = "m".repeat(195);
        assert!(redelivery(&view, json!(1))
            .unwrap_err()
            .contains("too long"));
    }
}
