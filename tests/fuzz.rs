//! Property tests (bounded, run in CI with the suite): the message filter and request
//! decoding never panic on any input, and filters behave consistently.

use std::collections::BTreeMap;

use mq::api::extract::decode_json;
use mq::domain::filter::{Filter, MessageView};
use mq::domain::message::MessageInput;
use mq::domain::queue::{CreateQueueRequest, Queue, QueueDefaults, UpdateQueueRequest};
use mq::domain::subscription::CreateSubscriptionRequest;
use proptest::prelude::*;
use serde_json::{json, Value};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e9f64..1e9).prop_map(|n| json!(n)),
        "[a-z.$]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("headers.kind"),
            Just("payload.a.b"),
            Just("key"),
            Just("$or"),
            Just("gt"),
            Just("prefix"),
            Just("exists"),
            Just("anythingBut"),
            Just("lte")
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    "[a-z]{1,6}".boxed(),
                    Just("headers.kind".to_owned()).boxed(),
                    Just("payload.a".to_owned()).boxed(),
                    Just("payload.a.b".to_owned()).boxed(),
                    Just("key".to_owned()).boxed(),
                    Just("$or".to_owned()).boxed(),
                    Just("gt".to_owned()).boxed(),
                    Just("exists".to_owned()).boxed(),
                    Just("prefix".to_owned()).boxed(),
                    Just("anythingBut".to_owned()).boxed(),
                ],
                inner,
                0..6,
            )
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn filters_never_panic(filter in json_value(), payload in json_value(), kind in "[a-z]{0,4}", key in proptest::option::of("[a-z]{0,4}")) {
        if let Ok(filter) = Filter::parse(&filter) {
            let headers: BTreeMap<String, String> = [("kind".to_owned(), kind)].into();
            let view = MessageView { headers: &headers, payload: &payload, key: key.as_deref() };
            let first = filter.matches(&view);
            prop_assert_eq!(first, filter.matches(&view), "evaluation is deterministic");
        }
    }

    #[test]
    fn an_or_of_one_filter_is_that_filter(payload in json_value(), bound in -100i64..100) {
        let plain = Filter::parse(&json!({"payload.a": {"gt": bound}})).unwrap();
        let wrapped = Filter::parse(&json!({"$or": [{"payload.a": {"gt": bound}}]})).unwrap();
        let headers = BTreeMap::new();
        let view = MessageView { headers: &headers, payload: &payload, key: None };
        prop_assert_eq!(plain.matches(&view), wrapped.matches(&view));
    }

    #[test]
    fn request_decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_json::<CreateQueueRequest>(&bytes);
        let _ = decode_json::<UpdateQueueRequest>(&bytes);
        let _ = decode_json::<MessageInput>(&bytes);
        let _ = decode_json::<CreateSubscriptionRequest>(&bytes);
    }

    #[test]
    fn queue_validation_never_panics(body in json_value()) {
        let text = body.to_string();
        if let Ok(request) = decode_json::<CreateQueueRequest>(text.as_bytes()) {
            let defaults = QueueDefaults { max_length: 10, encryption_available: true };
            if let Ok(queue) = Queue::create(uuid::Uuid::nil(), request, defaults, chrono::Utc::now()) {
                if let Ok(update) = decode_json::<UpdateQueueRequest>(text.as_bytes()) {
                    let _ = queue.updated(update, chrono::Utc::now());
                }
            }
        }
    }
}
