//! Cross-cutting HTTP behaviour: authentication, malformed input, body limits, unknown routes,
//! request ids. Every failure must be the contract's error body, and the service must stay up.

mod common;

use common::{assert_error, read, sign, TestApp, JWT_SECRET};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::json;
use uuid::Uuid;

const QUEUES: &str = "/api/v1/mq/queues";

async fn assert_still_healthy(app: &TestApp) {
    let response = app
        .anonymous(Method::GET, "/api/v1/mq/health")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "service unhealthy after bad input");
}

#[tokio::test]
async fn bad_credentials_are_401_with_the_contract_body() {
    let app = TestApp::spawn().await;
    let now = chrono::Utc::now().timestamp();
    let tenant = Uuid::new_v4().to_string();
    let forged = jsonwebtoken::encode(
        &Header::default(),
        &json!({"tenant_id": tenant, "sub": "x", "exp": now + 600}),
        &EncodingKey::from_secret(b"some-other-secret"),
    )
    .unwrap();
    let wrong_algorithm = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &json!({"tenant_id": tenant, "sub": "x", "exp": now + 600}),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let valid = sign(json!({"tenant_id": tenant, "sub": "x", "exp": now + 600}));
    let unsigned = {
        let mut parts: Vec<&str> = valid.split('.').collect();
        parts[2] = "";
        parts.join(".")
    };
    let cases: Vec<(&str, Option<String>)> = vec![
        ("absent", None),
        ("not bearer", Some("Basic dXNlcjpwYXNz".into())),
        ("empty bearer", Some("Bearer ".into())),
        ("garbage", Some("Bearer not.a.jwt".into())),
        ("forged", Some(format!("Bearer {forged}"))),
        ("wrong algorithm", Some(format!("Bearer {wrong_algorithm}"))),
        ("signature stripped", Some(format!("Bearer {unsigned}"))),
        (
            "expired beyond leeway",
            Some(format!(
                "Bearer {}",
                sign(json!({"tenant_id": tenant, "exp": now - 120}))
            )),
        ),
        (
            "no exp",
            Some(format!("Bearer {}", sign(json!({"tenant_id": tenant})))),
        ),
        (
            "no tenant",
            Some(format!(
                "Bearer {}",
                sign(json!({"sub": "x", "exp": now + 600}))
            )),
        ),
        (
            "tenant not a uuid",
            Some(format!(
                "Bearer {}",
                sign(json!({"tenant_id": "acme", "exp": now + 600}))
            )),
        ),
    ];
    for (case, authorization) in cases {
        let mut request = app.anonymous(Method::GET, QUEUES);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let (status, body) = read(request.send().await.unwrap()).await;
        assert_error(status, &body, 401, "MQ_UNAUTHORIZED");
        assert!(
            !body["message"].as_str().unwrap().contains(JWT_SECRET),
            "{case}"
        );
    }
    // Within the 60 s leeway an expired token is still accepted.
    let recently_expired = sign(json!({"tenant_id": tenant, "exp": now - 20}));
    let response = app
        .anonymous(Method::GET, QUEUES)
        .bearer_auth(recently_expired)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_still_healthy(&app).await;
}

#[tokio::test]
async fn authentication_comes_before_body_validation() {
    let app = TestApp::spawn().await;
    let response = app
        .anonymous(Method::POST, QUEUES)
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_error(status, &body, 401, "MQ_UNAUTHORIZED");
}

#[tokio::test]
async fn malformed_and_mistyped_bodies_are_400() {
    let app = TestApp::spawn().await;
    for raw in [
        "{\"name\": ",
        "not json at all",
        "",
        "[1,2",
        "{\"name\":\"q\"} trailing",
        "\u{0}",
    ] {
        let response = app
            .request(Method::POST, QUEUES)
            .header("content-type", "application/json")
            .body(raw.to_owned())
            .send()
            .await
            .unwrap();
        let (status, body) = read(response).await;
        assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    }
    let (status, body) = app
        .call(Method::POST, QUEUES, Some(json!(["a", "list"])))
        .await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    let (status, body) = app
        .call(
            Method::POST,
            QUEUES,
            Some(json!({"name": "q", "isPublic": "yes", "partitionCount": 1.5})),
        )
        .await;
    assert_error(status, &body, 400, "MQ_VALIDATION_ERROR");
    assert_eq!(
        body["details"]["fields"],
        json!(["isPublic"]),
        "first type error is named: {body}"
    );
    assert_still_healthy(&app).await;
}

#[tokio::test]
async fn a_body_over_max_request_bytes_is_413() {
    let app = TestApp::spawn_with(|env| {
        env.insert("MAX_REQUEST_BYTES".into(), "1048576".into());
    })
    .await;
    let five_megabytes = format!(
        "{{\"name\":\"q\",\"description\":\"{}\"}}",
        "x".repeat(5 * 1024 * 1024)
    );
    let response = app
        .request(Method::POST, QUEUES)
        .header("content-type", "application/json")
        .body(five_megabytes)
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_error(status, &body, 413, "MQ_MESSAGE_TOO_LARGE");
    assert_still_healthy(&app).await;
}

#[tokio::test]
async fn a_five_megabyte_body_within_the_request_limit_gets_a_validation_error() {
    let app = TestApp::spawn().await;
    let body = json!({"name": "q", "description": "x".repeat(5 * 1024 * 1024)});
    let (status, error) = app.call(Method::POST, QUEUES, Some(body.clone())).await;
    assert_error(status, &error, 400, "MQ_VALIDATION_ERROR");
    assert_eq!(error["details"]["fields"], json!(["description"]));
    assert_still_healthy(&app).await;
}

#[tokio::test]
async fn unknown_routes_are_mq_not_found_whatever_the_credential() {
    let app = TestApp::spawn().await;
    for (method, path) in [
        (Method::GET, "/api/v1/mq/nope"),
        (Method::GET, "/"),
        (Method::DELETE, "/api/v1/mq/status"),
        (Method::PATCH, "/api/v1/mq/queues/orders"),
    ] {
        for authenticated in [false, true] {
            let request = if authenticated {
                app.request(method.clone(), path)
            } else {
                app.anonymous(method.clone(), path)
            };
            let (status, body) = read(request.send().await.unwrap()).await;
            assert_error(status, &body, 404, "MQ_NOT_FOUND");
        }
    }
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = TestApp::spawn().await;
    let response = app
        .anonymous(Method::GET, "/api/v1/mq/health")
        .header("x-request-id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-123");
    let response = app.anonymous(Method::GET, QUEUES).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let generated = response.headers()["x-request-id"].to_str().unwrap();
    Uuid::parse_str(generated).expect("generated request id is a UUID");
    let response = app.anonymous(Method::GET, "/nowhere").send().await.unwrap();
    assert!(response.headers().contains_key("x-request-id"));
}
