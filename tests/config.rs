//! Start-up configuration: defaults, and a bad or missing value stopping the binary with one
//! line naming the variable.

use std::collections::HashMap;
use std::process::Command;

use mq::config::Config;

fn valid_env() -> HashMap<&'static str, String> {
    HashMap::from([
        (
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres".to_owned(),
        ),
        ("REDIS_URL", "redis://127.0.0.1:6379".to_owned()),
        ("JWT_SECRET", "k3Jd9Qm2Xv8Lp4Rt7Wz1Yc6Nb5Hg0Fs3".to_owned()),
        (
            "INTERNAL_SERVICE_TOKEN",
            "T9vQ2mX7pL4rW8zY1cN6bH5gF0sK3dJq".to_owned(),
        ),
    ])
}

fn load(env: &HashMap<&'static str, String>) -> Result<Config, mq::config::ConfigError> {
    Config::from_lookup(|name| env.get(name).cloned())
}

#[test]
fn defaults_follow_the_contract() {
    let config = load(&valid_env()).unwrap();
    assert_eq!(config.port, 3010);
    assert_eq!(config.redis_key_prefix, "mq:");
    assert!(
        config.redis_cluster_nodes.is_empty(),
        "a single Redis by default"
    );
    assert_eq!(config.max_message_size, 1_048_576);
    assert_eq!(config.default_ttl_secs, 604_800);
    assert_eq!(config.max_queue_length, 10_000);
    assert_eq!(config.consumer_timeout_ms, 30_000);
    assert_eq!(config.message_batch_size, 50);
    assert_eq!(config.max_batch_size, 1000);
    assert_eq!(config.max_concurrent_consumers, 5);
    assert_eq!(config.processing_timeout_ms, 15_000);
    assert_eq!(config.max_delay_ms, 604_800_000);
    assert_eq!(config.dedup_window_ms, 86_400_000);
    assert_eq!(config.max_request_bytes, 16_777_216);
    assert!(config.webhook_denied_networks.is_empty());
    assert!(config.metrics_enabled);
    assert_eq!(config.health_check_interval_secs, 30);
    assert!(config.encryption.is_none());
    assert!(!config.dev_mode);
    assert_eq!(config.tenant_publish_rps, 10_000);
}

#[test]
fn each_bad_value_names_its_variable() {
    let cases: &[(&str, Option<&str>)] = &[
        ("DATABASE_URL", None),
        ("DATABASE_URL", Some("mysql://localhost/db")),
        ("REDIS_URL", None),
        ("REDIS_URL", Some("localhost:6379")),
        ("JWT_SECRET", None),
        ("JWT_SECRET", Some("   ")),
        ("INTERNAL_SERVICE_TOKEN", None),
        ("PORT", Some("70000")),
        ("MAX_MESSAGE_SIZE", Some("abc")),
        ("MAX_MESSAGE_SIZE", Some("0")),
        ("MAX_BATCH_SIZE", Some("-5")),
        ("DEDUP_WINDOW_MS", Some("1.5")),
        ("MQ_ENCRYPTION_KEY", Some("c2hvcnQ=")),
        ("MQ_ENCRYPTION_KEY", Some("!!!not-base64!!!")),
        ("WEBHOOK_DENIED_NETWORKS", Some("10.0.0.0/8,not-a-network")),
        ("METRICS_ENABLED", Some("maybe")),
        ("REDIS_KEY_PREFIX", Some("mq{x}:")),
        ("AUTH_SERVICE_URL", Some("ftp://auth")),
        ("JWT_SECRET", Some("short-secret")),
        (
            "JWT_SECRET",
            Some("dev-only-jwt-secret-change-me-0123456789abcdef"),
        ),
        (
            "INTERNAL_SERVICE_TOKEN",
            Some("please-change-me-please-change-me-please"),
        ),
        ("MQ_ENCRYPTION_KEYS", Some("k1")),
        ("MQ_ENCRYPTION_ACTIVE_KEY", Some("nope")),
        ("TENANT_RATE_LIMIT_RPS", Some("fast")),
        ("TENANT_MAX_QUEUES", Some("0")),
        ("TENANT_MAX_SUBSCRIPTIONS", Some("lots")),
        ("QUEUE_MAX_SUBSCRIPTIONS", Some("-1")),
        ("METRICS_GAUGE_INTERVAL_MS", Some("1e3")),
        ("WEBHOOK_PROXY_URL", Some("socks5://proxy:1080")),
        ("REDIS_CLUSTER_NODES", Some("10.0.0.1:7000,10.0.0.2")),
        ("REDIS_CLUSTER_NODES", Some("redis://10.0.0.1:7000")),
    ];
    for (variable, value) in cases {
        let mut env = valid_env();
        match value {
            Some(value) => env.insert(variable, (*value).to_owned()),
            None => env.remove(variable),
        };
        let error = load(&env).expect_err(&format!("{variable}={value:?} must be refused"));
        assert_eq!(error.variable, *variable);
        let line = error.to_string();
        assert!(line.contains(variable) && !line.contains('\n'), "{line}");
    }
}

#[test]
fn optional_values_parse() {
    let mut env = valid_env();
    env.insert(
        "MQ_ENCRYPTION_KEY",
        "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=".into(),
    );
    env.insert(
        "WEBHOOK_DENIED_NETWORKS",
        "10.0.0.0/8, 169.254.0.0/16".into(),
    );
    env.insert("METRICS_ENABLED", "false".into());
    env.insert("REDIS_CLUSTER_NODES", "10.0.0.1:7000, redis-2:7001,".into());
    let config = load(&env).unwrap();
    assert_eq!(
        config.redis_cluster_nodes,
        ["redis://10.0.0.1:7000", "redis://redis-2:7001"]
    );
    let ring = config.encryption.unwrap();
    assert_eq!(ring.active, "default");
    assert_eq!(ring.key("default").unwrap()[..4], *b"0123");
    assert_eq!(config.webhook_denied_networks.len(), 2);
    assert!(!config.metrics_enabled);
}

#[test]
fn the_binary_refuses_to_start_with_one_line_naming_the_variable() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_message-queue-service"));
    command.env_clear();
    for (name, value) in valid_env() {
        command.env(name, value);
    }
    command.env("MAX_MESSAGE_SIZE", "lots");
    let output = command.output().expect("run the binary");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("MAX_MESSAGE_SIZE"), "{stderr}");

    command
        .env_remove("MAX_MESSAGE_SIZE")
        .env_remove("JWT_SECRET");
    let output = command.output().expect("run the binary");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(
        stderr.trim(),
        "invalid configuration: JWT_SECRET is required but not set"
    );
}

#[test]
fn development_mode_allows_default_secrets() {
    let mut env = valid_env();
    env.insert(
        "JWT_SECRET",
        "dev-only-jwt-secret-change-me-0123456789abcdef".into(),
    );
    env.insert("INTERNAL_SERVICE_TOKEN", "short".into());
    assert_eq!(load(&env).unwrap_err().variable, "JWT_SECRET");
    env.insert("MQ_DEV_MODE", "true".into());
    assert!(load(&env).unwrap().dev_mode);
}

#[test]
fn key_rings_name_their_active_key() {
    let mut env = valid_env();
    let one = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
    let two = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=";
    env.insert("MQ_ENCRYPTION_KEYS", format!("k1:{one},k2:{two}"));
    assert_eq!(
        load(&env).unwrap_err().variable,
        "MQ_ENCRYPTION_ACTIVE_KEY",
        "several keys need an active one"
    );
    env.insert("MQ_ENCRYPTION_ACTIVE_KEY", "k2".into());
    let ring = load(&env).unwrap().encryption.unwrap();
    assert_eq!(ring.active, "k2");
    assert!(ring.key("k1").is_some() && ring.key("k2").is_some() && ring.key("k3").is_none());
    env.insert("MQ_ENCRYPTION_KEYS", format!("k1:{one},k1:{two}"));
    assert_eq!(load(&env).unwrap_err().variable, "MQ_ENCRYPTION_KEYS");
}
