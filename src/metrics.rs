//! Prometheus metrics of the process, rendered at `GET /metrics`.
//!
//! Labels are bounded: HTTP metrics use the matched route template (never the raw path) and a
//! known method (others share `other`), so a client cannot grow the series count by inventing
//! URLs or methods; per-queue series are capped (`METRICS_MAX_QUEUE_SERIES`) and freed when
//! their queue is deleted.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use uuid::Uuid;

pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    pub dependency_up: IntGaugeVec,
    pub dependency_latency: GaugeVec,
    pub pool_connections: IntGaugeVec,
    messages: IntCounterVec,
    queue_messages: IntGaugeVec,
    delivery_latency: Histogram,
    pub record_writer_backlog: IntGauge,
    /// Entries the recorder set aside because PostgreSQL refused them, by source.
    pub records_quarantined: IntCounterVec,
    /// How often the per-queue gauges were read from the stores (at most once per
    /// `METRICS_GAUGE_INTERVAL_MS`, however many scrapes arrive).
    pub gauge_refreshes: prometheus::IntCounter,
    /// `message_published` events that reached neither `audit-logs` nor the audit service.
    pub audit_events_dropped: prometheus::IntCounter,
    /// When the per-queue gauges were last refreshed; held while refreshing, so concurrent
    /// scrapes wait for one refresh instead of each doing one.
    pub gauges_refreshed_at: tokio::sync::Mutex<Option<Instant>>,
    /// Which (tenant, queue) pairs have series of their own (bounded cardinality).
    queue_series: Mutex<QueueSeries>,
    max_queue_series: usize,
    /// A tenant's share: its queues past it count under (tenant, `_other`).
    tenant_queue_series: usize,
}

#[derive(Default)]
struct QueueSeries {
    /// Every (tenant, queue) label pair in use, (tenant, `_other`) included.
    labels: HashSet<(Uuid, String)>,
    /// Named queues per tenant (its `_other` aside).
    per_tenant: HashMap<Uuid, usize>,
}

impl QueueSeries {
    fn remove(&mut self, key: &(Uuid, String)) -> bool {
        let removed = self.labels.remove(key);
        if removed && key.1 != OTHER {
            if let Some(count) = self.per_tenant.get_mut(&key.0) {
                *count -= 1;
                if *count == 0 {
                    self.per_tenant.remove(&key.0);
                }
            }
        }
        removed
    }
}

/// One queue's state gauges: tenant, queue name, (state, value) pairs.
pub type QueueGauges = (Uuid, String, [(&'static str, u64); 4]);

/// The label value of series beyond the cap.
pub const OTHER: &str = "_other";

/// Every `event` of `mq_messages_total`.
const MESSAGE_EVENTS: [&str; 8] = [
    "published",
    "delivered",
    "acked",
    "failed",
    "dead_letter",
    "set_aside",
    "expired",
    "filtered",
];

/// The method label: a standard method, or `other` for anything a client made up.
fn known_method(method: &str) -> &str {
    match method {
        "GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS" => method,
        _ => "other",
    }
}

impl Metrics {
    pub fn new(max_queue_series: usize, tenant_queue_series: usize) -> Metrics {
        let registry = Registry::new_custom(Some("mq".into()), None)
            .expect("a constant, valid metrics prefix");
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by route and status"),
            &["method", "route", "status"],
        )
        .expect("valid metric definition");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route and status",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 25.0,
            ]),
            &["method", "route", "status"],
        )
        .expect("valid metric definition");
        let dependency_up = IntGaugeVec::new(
            Opts::new(
                "dependency_up",
                "1 when the dependency answered its last health check",
            ),
            &["dependency"],
        )
        .expect("valid metric definition");
        let dependency_latency = GaugeVec::new(
            Opts::new(
                "dependency_latency_seconds",
                "Round trip of the dependency's last health check",
            ),
            &["dependency"],
        )
        .expect("valid metric definition");
        let pool_connections = IntGaugeVec::new(
            Opts::new("pool_connections", "Connections of each pool by state"),
            &["pool", "state"],
        )
        .expect("valid metric definition");
        let messages = IntCounterVec::new(
            Opts::new(
                "messages_total",
                "Messages by queue and event: published, delivered, acked, failed, dead_lettered, expired, filtered",
            ),
            &["tenant", "queue", "event"],
        )
        .expect("valid metric definition");
        let queue_messages = IntGaugeVec::new(
            Opts::new(
                "queue_messages",
                "Messages of a queue by state: stored, pending, delayed, lag (at scrape time)",
            ),
            &["tenant", "queue", "state"],
        )
        .expect("valid metric definition");
        let delivery_latency = Histogram::with_opts(
            HistogramOpts::new(
                "delivery_latency_seconds",
                "Time from publish to ack of delivered messages",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0,
            ]),
        )
        .expect("valid metric definition");
        let record_writer_backlog = IntGauge::new(
            "record_writer_backlog",
            "Stream entries and events not yet written to PostgreSQL (at scrape time)",
        )
        .expect("valid metric definition");
        let records_quarantined = IntCounterVec::new(
            Opts::new(
                "records_quarantined_total",
                "Stream entries (source=stream) and journal events (source=journal) the record \
                 writer set aside in record_quarantine because PostgreSQL refused them",
            ),
            &["source"],
        )
        .expect("valid metric definition");
        let gauge_refreshes = prometheus::IntCounter::new(
            "queue_gauge_refreshes_total",
            "Reads of the per-queue gauges from Redis and PostgreSQL for scrapes",
        )
        .expect("valid metric definition");
        let audit_events_dropped = prometheus::IntCounter::new(
            "audit_events_dropped_total",
            "message_published audit events not stored in audit-logs (queue full, Redis down) \
             or not taken by the audit service",
        )
        .expect("valid metric definition");
        for collector in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(dependency_up.clone()),
            Box::new(dependency_latency.clone()),
            Box::new(pool_connections.clone()),
            Box::new(messages.clone()),
            Box::new(queue_messages.clone()),
            Box::new(delivery_latency.clone()),
            Box::new(record_writer_backlog.clone()),
            Box::new(records_quarantined.clone()),
            Box::new(gauge_refreshes.clone()),
            Box::new(audit_events_dropped.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        Metrics {
            registry,
            http_requests,
            http_duration,
            dependency_up,
            dependency_latency,
            pool_connections,
            messages,
            queue_messages,
            delivery_latency,
            record_writer_backlog,
            records_quarantined,
            gauge_refreshes,
            audit_events_dropped,
            gauges_refreshed_at: tokio::sync::Mutex::new(None),
            queue_series: Mutex::new(QueueSeries::default()),
            max_queue_series,
            tenant_queue_series,
        }
    }

    /// The (tenant, queue) labels of a queue: its own while its tenant is within its share
    /// (`tenant_queue_series`), then (tenant, `_other`); (`_other`, `_other`) once the
    /// whole cap is reached. One tenant's many queues cannot take the series of the others.
    fn queue_labels(&self, tenant_id: Uuid, queue: &str) -> (String, String) {
        let mut series = self.queue_series.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant_id, queue.to_owned());
        if series.labels.contains(&key) {
            return (tenant_id.to_string(), queue.to_owned());
        }
        let within_share =
            series.per_tenant.get(&tenant_id).copied().unwrap_or(0) < self.tenant_queue_series;
        let room = series.labels.len() < self.max_queue_series;
        if within_share && room {
            series.labels.insert(key);
            *series.per_tenant.entry(tenant_id).or_default() += 1;
            return (tenant_id.to_string(), queue.to_owned());
        }
        let tenant_other = (tenant_id, OTHER.to_owned());
        if !within_share && (series.labels.contains(&tenant_other) || room) {
            series.labels.insert(tenant_other);
            return (tenant_id.to_string(), OTHER.to_owned());
        }
        (OTHER.to_owned(), OTHER.to_owned())
    }

    /// Counts `count` messages of `queue` reaching `event`.
    pub fn count_messages(&self, tenant_id: Uuid, queue: &str, event: &str, count: u64) {
        if count == 0 {
            return;
        }
        let (tenant, queue) = self.queue_labels(tenant_id, queue);
        self.messages
            .with_label_values(&[tenant.as_str(), queue.as_str(), event])
            .inc_by(count);
    }

    pub fn observe_delivery_latency(&self, seconds: f64) {
        self.delivery_latency.observe(seconds.max(0.0));
    }

    /// Frees a deleted queue's series and its place under the cap.
    pub fn forget_queue(&self, tenant_id: Uuid, queue: &str) {
        let key = (tenant_id, queue.to_owned());
        let had_series = self
            .queue_series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        if had_series {
            self.remove_queue_series(tenant_id, queue);
        }
    }

    fn remove_queue_series(&self, tenant_id: Uuid, queue: &str) {
        let tenant = tenant_id.to_string();
        for event in MESSAGE_EVENTS {
            let _ = self
                .messages
                .remove_label_values(&[tenant.as_str(), queue, event]);
        }
    }

    /// Replaces the per-queue state gauges with those of every existing queue: queues deleted
    /// since the last scrape (on any instance) disappear and free their series.
    pub fn set_queue_gauges(&self, queues: &[QueueGauges]) {
        let existing: HashSet<(Uuid, &str)> = queues
            .iter()
            .map(|(tenant, name, _)| (*tenant, name.as_str()))
            .collect();
        let tenants: HashSet<Uuid> = queues.iter().map(|(tenant, _, _)| *tenant).collect();
        let gone: Vec<(Uuid, String)> = {
            let mut series = self.queue_series.lock().unwrap_or_else(|p| p.into_inner());
            // A guest's series (`<owner tenant>/<queue>`) lives as long as the owner's queue.
            // A tenant's `_other` lives while it has queues.
            let alive = |tenant: Uuid, name: &str| match name.split_once('/') {
                Some((owner, queue)) => owner
                    .parse::<Uuid>()
                    .is_ok_and(|owner| existing.contains(&(owner, queue))),
                None if name == OTHER => tenants.contains(&tenant),
                None => existing.contains(&(tenant, name)),
            };
            // A tenant's `_other` also lives while any of its named series does (a guest
            // may own no queue at all).
            let named: HashSet<Uuid> = series
                .labels
                .iter()
                .filter(|(tenant, name)| name != OTHER && alive(*tenant, name))
                .map(|(tenant, _)| *tenant)
                .collect();
            let gone = series
                .labels
                .iter()
                .filter(|(tenant, name)| {
                    !(alive(*tenant, name) || (name == OTHER && named.contains(tenant)))
                })
                .cloned()
                .collect::<Vec<_>>();
            for key in &gone {
                series.remove(key);
            }
            gone
        };
        for (tenant, name) in gone {
            self.remove_queue_series(tenant, &name);
        }
        self.queue_messages.reset();
        for (tenant_id, queue, states) in queues {
            let (tenant, queue) = self.queue_labels(*tenant_id, queue);
            for (state, value) in states {
                self.queue_messages
                    .with_label_values(&[tenant.as_str(), queue.as_str(), state])
                    .add(*value as i64);
            }
        }
    }

    pub fn observe_http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let method = known_method(method);
        let status = status.to_string();
        let labels = [method, route, status.as_str()];
        self.http_requests.with_label_values(&labels).inc();
        self.http_duration
            .with_label_values(&labels)
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(1000, 100)
    }
}

/// Middleware: counts and times every request under its route template.
pub async fn track_http(
    State(metrics): State<std::sync::Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    metrics.observe_http(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series_of(metrics: &Metrics, tenant: Uuid) -> Vec<String> {
        let text = metrics.render();
        let mut queues: Vec<String> = text
            .lines()
            .filter(|line| line.starts_with("mq_messages_total{"))
            .filter(|line| line.contains(&format!("tenant=\"{tenant}\"")))
            .filter_map(|line| {
                let start = line.find("queue=\"")? + 7;
                let end = start + line[start..].find('"')?;
                Some(line[start..end].to_owned())
            })
            .collect();
        queues.sort();
        queues
    }

    #[test]
    fn a_tenant_with_many_queues_keeps_to_its_share_of_series() {
        let metrics = Metrics::new(6, 2);
        let (wide, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for n in 0..50 {
            metrics.count_messages(wide, &format!("q{n}"), "published", 1);
        }
        metrics.count_messages(other, "a", "published", 1);
        metrics.count_messages(other, "b", "published", 1);
        assert_eq!(series_of(&metrics, wide), ["_other", "q0", "q1"]);
        assert_eq!(
            series_of(&metrics, other),
            ["a", "b"],
            "the other tenant's share is intact"
        );
        // The wide tenant's queues past its share all count under its `_other`.
        let text = metrics.render();
        assert!(text.contains(&format!(
            "mq_messages_total{{event=\"published\",queue=\"_other\",tenant=\"{wide}\"}} 48"
        )));
        // Deleting one of its named queues frees a place in its share.
        metrics.forget_queue(wide, "q0");
        metrics.count_messages(wide, "q-new", "published", 1);
        assert_eq!(series_of(&metrics, wide), ["_other", "q-new", "q1"]);
    }

    #[test]
    fn a_guests_series_outlive_a_scrape_while_the_owners_queues_do() {
        let metrics = Metrics::new(10, 1);
        let (owner, guest) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for queue in ["a", "b"] {
            metrics.count_messages(guest, &format!("{owner}/{queue}"), "acked", 1);
        }
        assert_eq!(
            series_of(&metrics, guest),
            [format!("{owner}/a"), "_other".into()]
        );
        // The guest owns no queue; the owner's queues still exist.
        let gauges = |name: &str| (owner, name.to_owned(), [("stored", 0); 4]);
        metrics.set_queue_gauges(&[gauges("a"), gauges("b")]);
        assert_eq!(
            series_of(&metrics, guest),
            [format!("{owner}/a"), "_other".into()]
        );
        // The owner's queues gone, so are the guest's series.
        metrics.set_queue_gauges(&[]);
        assert!(series_of(&metrics, guest).is_empty());
    }
}
