//! Wake-ups instead of polling: consumers on one instance are woken by what happens on
//! another, and a retry wakes its consumers when it falls due.
//!
//! The waiting side of each test would also see the work by its slow safety look (a long
//! poll looks again every 5 s, a webhook task every 300 s), so each bound below sits well
//! under that look: meeting it shows the wake-up, not the look. The bounds are not speed
//! targets (those live in `benches/` and docs/PERFORMANCE.md); they leave a loaded machine
//! seconds of slack.

mod common;

use std::time::{Duration, Instant};

use common::receiver::{Receiver, Reply};
use common::{eventually, TestApp};
use reqwest::Method;
use serde_json::json;

/// Well under the long poll's 5 s look, with slack for a loaded machine.
const WOKEN_WITHIN: Duration = Duration::from_millis(2500);

#[tokio::test]
async fn a_publish_on_one_instance_wakes_a_long_poll_on_another() {
    let publisher = TestApp::spawn().await;
    let consumer = publisher.spawn_sibling().await;
    publisher.create_queue(json!({"name": "q"})).await;
    let subscription = publisher.subscribe_pull("q", "g").await;

    for round in 0..3 {
        let poll = {
            let (consumer, subscription) = (&consumer, subscription.clone());
            async move {
                let messages = consumer.pull(&subscription, 1, 20_000).await;
                (messages, Instant::now())
            }
        };
        let publish = async {
            // Let the poll find nothing and start waiting first.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (status, _) = publisher
                .publish(json!({"queue": "q", "payload": {"round": round}}))
                .await;
            assert_eq!(status, 201);
            Instant::now()
        };
        let ((messages, received_at), published_at) = tokio::join!(poll, publish);
        assert_eq!(messages.len(), 1, "round {round}: the poll got the message");
        assert_eq!(messages[0]["payload"]["round"], round);
        let waited = received_at.saturating_duration_since(published_at);
        assert!(
            waited < WOKEN_WITHIN,
            "round {round}: the poll was woken, not found by its 5 s look ({waited:?})"
        );
        let ack_id = messages[0]["ackId"].as_str().unwrap();
        assert_eq!(consumer.ack(&subscription, &[ack_id]).await, 1);
    }
}

#[tokio::test]
async fn a_publish_on_one_instance_wakes_a_webhook_served_by_another() {
    let publisher = TestApp::spawn().await;
    let server = publisher.spawn_sibling().await;
    // Only the sibling delivers: the publisher's workers (its dispatcher among them) stop.
    publisher.state.workers.abort_all();
    let receiver = Receiver::start(Reply::Status(200)).await;
    publisher.create_queue(json!({"name": "q"})).await;
    publisher
        .subscribe(
            json!({"queue": "q", "consumerGroup": "g", "consumerName": "g-1",
                          "subscriptionType": "webhook",
                          "handlerConfig": {"url": receiver.url("/")}}),
        )
        .await;

    // The first message also waits for the sibling to start serving the new subscription;
    // the later ones find its task asleep, with nothing but the wake-up to rouse it.
    for round in 0..4 {
        let (status, _) = publisher
            .publish(json!({"queue": "q", "payload": {"round": round}}))
            .await;
        assert_eq!(status, 201);
        let published_at = Instant::now();
        let bound = if round == 0 {
            Duration::from_secs(15)
        } else {
            WOKEN_WITHIN
        };
        assert!(
            eventually(bound, || async { receiver.delivered().len() > round }).await,
            "round {round}: the sibling pushed the message within {bound:?}"
        );
        let delivered = receiver.delivered();
        assert_eq!(delivered[round].json["payload"]["round"], round);
        assert!(delivered[round].at >= published_at.checked_sub(Duration::from_secs(1)).unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(server);
}

#[tokio::test]
async fn a_retry_wakes_its_long_poll_when_it_falls_due_and_not_before() {
    let app = TestApp::spawn().await;
    app.create_queue(json!({"name": "q"})).await;
    let subscription = app.subscribe_pull("q", "g").await;
    let (status, _) = app.publish(json!({"queue": "q", "payload": 1})).await;
    assert_eq!(status, 201);
    let first = app.pull(&subscription, 1, 5_000).await;
    assert_eq!(first.len(), 1);

    let nacked_at = Instant::now();
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/api/v1/mq/subscriptions/{subscription}/nack"),
            Some(json!({"ackIds": [first[0]["ackId"]], "delayMs": 300})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["nacked"], 1);
    // Nothing else is there: this poll can only end with the retry.
    let again = app.pull(&subscription, 1, 20_000).await;
    let waited = nacked_at.elapsed();
    assert_eq!(again.len(), 1, "the retry was delivered");
    assert_eq!(again[0]["messageId"], first[0]["messageId"]);
    assert_eq!(again[0]["deliveryAttempt"], 2, "{}", again[0]);
    assert!(
        waited >= Duration::from_millis(300),
        "not before its time ({waited:?})"
    );
    assert!(
        waited < Duration::from_millis(300) + WOKEN_WITHIN,
        "woken when due, not by the 5 s look ({waited:?})"
    );
}
