//! Resources stay bounded whoever calls: metric series, scrape work, per-tenant quotas,
//! filter and handler sizes, schema patterns, and the async threads while large payloads
//! are validated, compressed and encrypted.

mod common;

use std::collections::BTreeSet;

use common::TestApp;
use reqwest::Method;
use serde_json::json;

fn samples<'a>(text: &'a str, metric: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{metric}{{")) || line.starts_with(&format!("{metric} "))
        })
        .collect()
}

fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let end = line[start..].find('"')? + start;
    Some(&line[start..end])
}

fn value(line: &str) -> f64 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn made_up_methods_share_one_series() {
    let app = TestApp::spawn().await;
    for n in 0..40 {
        let method = Method::from_bytes(format!("INVENTED{n}").as_bytes()).unwrap();
        app.anonymous(method, "/api/v1/mq/health")
            .send()
            .await
            .unwrap();
    }
    let (_, text) = app.get_text("/metrics").await;
    let methods: BTreeSet<&str> = samples(&text, "mq_http_requests_total")
        .into_iter()
        .filter_map(|line| label(line, "method"))
        .collect();
    assert!(methods.contains("other"), "{methods:?}");
    assert!(
        methods.iter().all(|m| ["GET", "other"].contains(m)),
        "{methods:?}"
    );
    let other: f64 = samples(&text, "mq_http_requests_total")
        .into_iter()
        .filter(|line| label(line, "method") == Some("other"))
        .map(value)
        .sum();
    assert_eq!(other, 40.0);
}

#[tokio::test]
async fn a_deleted_queue_frees_its_series() {
    let app = TestApp::spawn_with(|env| {
        env.insert("METRICS_MAX_QUEUE_SERIES".into(), "2".into());
        env.insert("METRICS_GAUGE_INTERVAL_MS".into(), "0".into());
    })
    .await;
    // audit-logs takes one of the two places; "first" the other.
    app.create_queue(json!({"name": "first"})).await;
    app.publish(json!({"queue": "first", "payload": 1})).await;
    let (_, text) = app.get_text("/metrics").await;
    let queues = |text: &str| -> BTreeSet<String> {
        samples(text, "mq_messages_total")
            .into_iter()
            .filter_map(|line| label(line, "queue").map(str::to_owned))
            .collect()
    };
    assert!(queues(&text).contains("first"), "{text}");
    let (status, _) = app
        .call(Method::DELETE, "/api/v1/mq/queues/first", None)
        .await;
    assert_eq!(status, 204);
    app.create_queue(json!({"name": "second"})).await;
    app.publish(json!({"queue": "second", "payload": 1})).await;
    let (_, text) = app.get_text("/metrics").await;
    let names = queues(&text);
    assert!(!names.contains("first"), "{names:?}");
    assert!(
        names.contains("second"),
        "the freed place is reused: {names:?}"
    );
    assert!(!names.contains("_other"), "{names:?}");
}

#[tokio::test]
async fn a_storm_of_scrapes_reads_the_stores_once() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let mut scrapes = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (client, url) = (app.client.clone(), app.url("/metrics"));
        scrapes.spawn(async move { client.get(url).send().await.unwrap().status().as_u16() });
    }
    while let Some(status) = scrapes.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let (_, text) = app.get_text("/metrics").await;
    let refreshes = samples(&text, "mq_queue_gauge_refreshes_total")
        .first()
        .map(|line| value(line))
        .unwrap();
    assert_eq!(
        refreshes, 1.0,
        "51 scrapes within the interval, one refresh"
    );
}
