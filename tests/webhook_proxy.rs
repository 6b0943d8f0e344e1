//! Outbound webhooks ignore the proxy variables of the environment and go through a proxy
//! only when `WEBHOOK_PROXY_URL` says so. Alone in its binary: it sets process-wide
//! environment variables.

mod common;

use std::time::Duration;

use common::receiver::{Receiver, Reply};
use common::{eventually, TestApp};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

async fn push_one(app: &TestApp, target: &Receiver) {
    app.create_queue(json!({"name": "q"})).await;
    app.subscribe(
        json!({"queue": "q", "consumerGroup": "g", "consumerName": "c",
                         "subscriptionType": "webhook",
                         "handlerConfig": {"url": target.url("/hook")}}),
    )
    .await;
    let (status, _) = app.publish(json!({"queue": "q", "payload": "hello"})).await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn pushes_use_a_proxy_only_when_configured() {
    let proxy = Receiver::start(Reply::Status(200)).await;
    let proxy_url = format!("http://{}", proxy.address);
    for variable in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "all_proxy",
    ] {
        std::env::set_var(variable, &proxy_url);
    }

    let target = Receiver::start(Reply::Status(200)).await;
    let app = TestApp::spawn().await;
    push_one(&app, &target).await;
    assert!(eventually(WAIT, || async { target.delivered().len() == 1 }).await);
    assert!(
        proxy.received().is_empty(),
        "the environment's proxy is not used"
    );

    let direct = Receiver::start(Reply::Status(200)).await;
    let proxied = TestApp::spawn_with(|env| {
        env.insert("WEBHOOK_PROXY_URL".into(), proxy_url.clone());
    })
    .await;
    push_one(&proxied, &direct).await;
    assert!(
        eventually(WAIT, || async { proxy.delivered().len() == 1 }).await,
        "the configured proxy carries the push"
    );
    assert!(direct.received().is_empty());
}
