//! Pushing one message to a webhook: the request of API.md, its signature, and what its
//! answer means.
//!
//! Outbound safety: only http(s) URLs (checked when the subscription is written), redirects
//! are never followed, and the address a host resolves to is checked against
//! `WEBHOOK_DENIED_NETWORKS` at delivery time (so a DNS name cannot be pointed at a denied
//! network after the subscription was accepted). Proxy variables of the environment are
//! ignored; `WEBHOOK_PROXY_URL` sends pushes through a proxy on purpose (then names are
//! resolved by the proxy, and only IP literals are checked here).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use serde::Serialize;

use crate::broker::consume::Delivery;
use crate::config::Cidr;
use crate::domain::message::Envelope;
use crate::domain::retry::MAX_RETRY_DELAY_MS;
use crate::domain::signature;
use crate::domain::subscription::Subscription;

/// How a push ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    Delivered {
        elapsed_ms: i64,
    },
    Failed {
        error: String,
        /// A `Retry-After` the receiver asked for (429/503), bounded.
        retry_after_ms: Option<i64>,
        elapsed_ms: i64,
    },
}

/// The request body of API.md, serialized from the envelope without copying it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PushBody<'a> {
    message_id: &'a str,
    queue: &'a str,
    subscription_id: uuid::Uuid,
    payload: &'a serde_json::Value,
    headers: &'a std::collections::BTreeMap<String, String>,
    key: Option<&'a str>,
    correlation_id: Option<&'a str>,
    trace_id: Option<&'a str>,
    published_at: Option<DateTime<Utc>>,
    delivery_attempt: u32,
}

pub struct WebhookClient {
    http: reqwest::Client,
    denied: Arc<Vec<Cidr>>,
}

impl WebhookClient {
    /// A client for pushes: through `proxy` when one is configured, and otherwise directly,
    /// whatever `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` the process inherited.
    pub fn new(denied: Vec<Cidr>, proxy: Option<&str>) -> anyhow::Result<WebhookClient> {
        let denied = Arc::new(denied);
        let builder = match proxy {
            Some(url) => reqwest::Client::builder().proxy(reqwest::Proxy::all(url)?),
            None => reqwest::Client::builder().no_proxy(),
        };
        let http = builder
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver {
                denied: denied.clone(),
            }))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .user_agent(concat!("message-queue-service/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(WebhookClient { http, denied })
    }

    /// POSTs the message to the subscription's URL and says how it went.
    pub async fn push(
        &self,
        subscription: &Subscription,
        queue: &str,
        delivery: &Delivery,
        envelope: &Envelope,
        timeout: Duration,
    ) -> PushOutcome {
        let started = Instant::now();
        let elapsed = || started.elapsed().as_millis() as i64;
        let Some(url) = subscription.handler_config.url.as_deref() else {
            return PushOutcome::Failed {
                error: "subscription has no handlerConfig.url".into(),
                retry_after_ms: None,
                elapsed_ms: 0,
            };
        };
        if let Err(error) = self.check_literal_address(url) {
            return PushOutcome::Failed {
                error,
                retry_after_ms: None,
                elapsed_ms: 0,
            };
        }
        let body = serde_json::to_vec(&PushBody {
            message_id: &envelope.message_id,
            queue,
            subscription_id: subscription.id,
            payload: &envelope.payload,
            headers: &envelope.headers,
            key: envelope.key.as_deref(),
            correlation_id: envelope.correlation_id.as_deref(),
            trace_id: envelope.trace_id.as_deref(),
            published_at: DateTime::from_timestamp_millis(envelope.published_at),
            delivery_attempt: delivery.attempt,
        })
        .unwrap_or_default();
        let mut request = self
            .http
            .post(url)
            .timeout(timeout)
            .header(CONTENT_TYPE, "application/json")
            .header("x-mq-message-id", envelope.message_id.as_str())
            .header("x-mq-delivery-attempt", delivery.attempt.to_string());
        for (name, value) in &subscription.handler_config.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                request = request.header(name, value);
            }
        }
        if let Some(trace_id) = &envelope.trace_id {
            request = request.header(
                "traceparent",
                format!("00-{trace_id}-{:016x}-01", fastrand::u64(1..)),
            );
        }
        if let Some(secret) = &subscription.handler_config.secret {
            request = request.header(
                "x-mq-signature",
                signature::sign(secret, Utc::now().timestamp(), &body),
            );
        }
        match request.body(body).send().await {
            Ok(response) if response.status().is_success() => PushOutcome::Delivered {
                elapsed_ms: elapsed(),
            },
            Ok(response) => {
                let status = response.status();
                let retry_after_ms = matches!(status.as_u16(), 429 | 503)
                    .then(|| response.headers().get(RETRY_AFTER))
                    .flatten()
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.trim().parse::<i64>().ok())
                    .map(|seconds| (seconds.max(0) * 1000).min(MAX_RETRY_DELAY_MS as i64));
                PushOutcome::Failed {
                    error: format!("HTTP {}", status.as_u16()),
                    retry_after_ms,
                    elapsed_ms: elapsed(),
                }
            }
            Err(error) => PushOutcome::Failed {
                error: describe(&error, timeout),
                retry_after_ms: None,
                elapsed_ms: elapsed(),
            },
        }
    }

    /// A URL naming an IP address directly skips DNS, so the denied networks are checked here.
    fn check_literal_address(&self, url: &str) -> Result<(), String> {
        let host = reqwest::Url::parse(url)
            .map_err(|error| format!("invalid webhook URL: {error}"))?
            .host_str()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .unwrap_or_default();
        match host.parse::<IpAddr>() {
            Ok(address) if is_denied(&self.denied, address) => {
                Err(format!("address {address} is in WEBHOOK_DENIED_NETWORKS"))
            }
            _ => Ok(()),
        }
    }
}

fn is_denied(denied: &[Cidr], address: IpAddr) -> bool {
    denied.iter().any(|network| network.contains(address))
}

fn describe(error: &reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        format!("timed out after {} ms", timeout.as_millis())
    } else if error.is_connect() {
        // The innermost cause says why (refused, denied network, DNS).
        let mut cause: &dyn std::error::Error = error;
        while let Some(source) = cause.source() {
            cause = source;
        }
        format!("connection failed: {cause}")
    } else {
        format!("request failed: {error}")
    }
}

/// Resolves hosts with the system resolver and drops addresses in denied networks; a host
/// left with none cannot be connected to.
struct GuardedResolver {
    denied: Arc<Vec<Cidr>>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let denied = self.denied.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|address| !is_denied(&denied, address.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(format!(
                    "{host} resolves only to addresses in WEBHOOK_DENIED_NETWORKS"
                )
                .into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}
