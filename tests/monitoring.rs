//! Health, status and Prometheus metrics.

mod common;

use common::{TestApp, JWT_SECRET, SERVICE_TOKEN};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn health_reports_both_dependencies_up() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get_anonymous("/api/v1/mq/health").await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["checks"]["redis"]["status"], "up");
    assert_eq!(body["checks"]["postgres"]["status"], "up");
    assert!(body["checks"]["redis"]["latencyMs"].as_f64().is_some());
    assert!(body["checks"]["postgres"]["latencyMs"].as_f64().is_some());
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["uptimeSeconds"].as_u64().is_some());
}

#[tokio::test]
async fn status_lists_workers_and_limits_without_secrets() {
    let app = TestApp::spawn_with(|env| {
        env.insert("MAX_BATCH_SIZE".into(), "77".into());
    })
    .await;
    let response = app
        .anonymous(Method::GET, "/api/v1/mq/status")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(
        !text.contains(JWT_SECRET) && !text.contains(SERVICE_TOKEN),
        "secret leaked: {text}"
    );
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["service"], "message-queue-service");
    assert_eq!(body["workers"]["health_monitor"], "running");
    assert_eq!(body["limits"]["maxBatchSize"], 77);
    assert_eq!(body["limits"]["encryptionEnabled"], false);
    assert!(body["startedAt"].as_str().unwrap().ends_with('Z'));
}

/// The value of the sample with exactly these labels, from Prometheus text format.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let label_text = label_text.strip_suffix('}')?;
            let mut found: Vec<(String, String)> = label_text
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    Some((key.to_owned(), value.trim_matches('"').to_owned()))
                })
                .collect();
            found.sort();
            let mut wanted: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            wanted.sort();
            (found == wanted).then(|| value.parse().ok()).flatten()
        })
}

#[tokio::test]
async fn prometheus_counts_requests_by_route_template_and_status() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "orders"})).await;
    for name in ["orders", "missing-1", "missing-2"] {
        app.request(Method::GET, &format!("/api/v1/mq/queues/{name}"))
            .send()
            .await
            .unwrap();
    }
    app.anonymous(Method::GET, "/no/such/route")
        .send()
        .await
        .unwrap();
    app.anonymous(Method::GET, "/api/v1/mq/health")
        .send()
        .await
        .unwrap();

    let response = app.anonymous(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let route = "/api/v1/mq/queues/{name}";
    let count = |status: &str| {
        sample(
            &text,
            "mq_http_requests_total",
            &[("method", "GET"), ("route", route), ("status", status)],
        )
    };
    assert_eq!(count("200"), Some(1.0), "{text}");
    assert_eq!(
        count("404"),
        Some(2.0),
        "raw paths are folded into the template"
    );
    assert_eq!(
        sample(
            &text,
            "mq_http_request_duration_seconds_count",
            &[("method", "GET"), ("route", route), ("status", "404")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "mq_http_requests_total",
            &[("method", "GET"), ("route", "unmatched"), ("status", "404")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "mq_dependency_up", &[("dependency", "redis")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "mq_dependency_up", &[("dependency", "postgres")]),
        Some(1.0)
    );
}

#[tokio::test]
async fn metrics_can_be_disabled() {
    let app = TestApp::spawn_with(|env| {
        env.insert("METRICS_ENABLED".into(), "false".into());
    })
    .await;
    let (status, body) = app.get_anonymous("/metrics").await;
    common::assert_error(status, &body, 404, "MQ_NOT_FOUND");
}
