//! `message-queue-service token`: the README's first requests need nothing but curl.

mod common;

use std::process::Command;

use common::TestApp;
use uuid::Uuid;

fn token_command(tenant: Uuid, dev_mode: bool) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_message-queue-service"));
    command
        .env_clear()
        .env("JWT_SECRET", common::JWT_SECRET)
        .args([
            "token",
            "--tenant",
            &tenant.to_string(),
            "--sub",
            "me",
            "--ttl",
            "5m",
        ]);
    if dev_mode {
        command.env("MQ_DEV_MODE", "true");
    }
    command.output().expect("run the binary")
}

#[tokio::test]
async fn the_token_command_mints_what_the_service_accepts_in_development_mode_only() {
    let app = TestApp::spawn().await;
    let tenant = Uuid::new_v4();
    let minted = token_command(tenant, true);
    assert!(minted.status.success(), "{minted:?}");
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    let response = app
        .client
        .post(format!("http://{}/api/v1/mq/queues", app.address))
        .bearer_auth(&token)
        .json(&serde_json::json!({"name": "first"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let queue: serde_json::Value = response.json().await.unwrap();
    assert_eq!(queue["tenantId"], tenant.to_string());

    let refused = token_command(tenant, false);
    assert_eq!(refused.status.code(), Some(2));
    assert!(refused.stdout.is_empty());
    let stderr = String::from_utf8(refused.stderr).unwrap();
    assert!(stderr.contains("MQ_DEV_MODE"), "{stderr}");
}
