//! A Redis Cluster master killed while producers publish and a consumer pulls: the service
//! follows the promoted replica, answers 503 with `Retry-After` (never 500) in the gap, and
//! loses nothing it confirmed. The test runs a cluster of its own (9 `redis-server`
//! processes on free ports), so killing a master disturbs no other test.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestApp;
use deadpool_redis::redis;
use reqwest::Method;
use serde_json::{json, Value};

/// Three masters with two replicas each, started and removed by the test: after a failover
/// the promoted master still has a replica to confirm writes (`REDIS_MIN_REPLICAS_ACK=1`).
struct PrivateCluster {
    dir: PathBuf,
    nodes: Vec<(u16, Child)>,
}

impl PrivateCluster {
    fn start() -> PrivateCluster {
        let dir = std::env::temp_dir().join(format!("mq-failover-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("cluster directory");
        let nodes: Vec<(u16, Child)> = (0..9)
            .map(|_| {
                let port = cluster_port();
                let child = Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                    .arg("--cluster-config-file")
                    .arg(dir.join(format!("nodes-{port}.conf")))
                    .args(["--save", "", "--appendonly", "no"])
                    // Replicas sync as soon as they attach, not after Redis's default
                    // 5 s diskless-sync delay, during which a publish that needs one
                    // replica's ack is refused.
                    .args(["--repl-diskless-sync-delay", "0"])
                    .arg("--dir")
                    .arg(&dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server (scripts/test.sh installs it)");
                (port, child)
            })
            .collect();
        let cluster = PrivateCluster { dir, nodes };
        for (port, _) in &cluster.nodes {
            let started = Instant::now();
            while cluster.query::<String>(*port, &["PING"]).is_err() {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "node {port} up"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let created = Command::new("timeout")
            .arg("60")
            .arg("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|(port, _)| format!("127.0.0.1:{port}")),
            )
            .args(["--cluster-replicas", "2", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stdout)
        );
        cluster.wait_until_whole(Duration::from_secs(30));
        cluster
    }

    fn query<T: redis::FromRedisValue>(&self, port: u16, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(1))?;
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query(&mut connection)
    }

    fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `CLUSTER NODES` as seen by a node that is up.
    fn topology(&self) -> String {
        self.nodes
            .iter()
            .find_map(|(port, _)| self.query::<String>(*port, &["CLUSTER", "NODES"]).ok())
            .expect("a node answers")
    }

    /// Every slot served, and each of the three masters with its two replicas.
    fn wait_until_whole(&self, limit: Duration) {
        let started = Instant::now();
        loop {
            let topology = self.topology();
            // The link state is the eighth field ("disconnected" contains "connected").
            let healthy = |line: &&str| {
                !line.contains("fail") && line.split_whitespace().nth(7) == Some("connected")
            };
            let masters = topology
                .lines()
                .filter(|line| line.contains("master") && healthy(line))
                .count();
            let replicas = topology
                .lines()
                .filter(|line| line.contains("slave") && healthy(line))
                .count();
            let ok = self.nodes.iter().any(|(port, _)| {
                self.query::<String>(*port, &["CLUSTER", "INFO"])
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
            if ok && masters == 3 && replicas == 6 && self.replicas_in_sync() {
                return;
            }
            assert!(started.elapsed() < limit, "cluster whole:\n{topology}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every replica's link to its master is up: a write can be acknowledged by a replica.
    fn replicas_in_sync(&self) -> bool {
        self.nodes.iter().all(|(port, _)| {
            self.query::<String>(*port, &["INFO", "replication"])
                .is_ok_and(|info| {
                    info.contains("role:master") || info.contains("master_link_status:up")
                })
        })
    }

    /// The port of the master serving `key`'s slot.
    fn master_of(&self, key: &str) -> u16 {
        let slot: u16 = self
            .nodes
            .iter()
            .find_map(|(port, _)| self.query(*port, &["CLUSTER", "KEYSLOT", key]).ok())
            .expect("a node answers");
        for line in self.topology().lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !fields.get(2).is_some_and(|flags| flags.contains("master")) {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                matches!((low.parse::<u16>(), high.parse::<u16>()), (Ok(l), Ok(h)) if l <= slot && slot <= h)
            });
            if serves {
                let address = fields[1].split('@').next().unwrap();
                return address.rsplit_once(':').unwrap().1.parse().unwrap();
            }
        }
        panic!("no master serves slot {slot}");
    }

    fn kill(&mut self, port: u16) {
        let (_, child) = self.nodes.iter_mut().find(|(p, _)| *p == port).unwrap();
        child.kill().expect("SIGKILL the master");
        let _ = child.wait();
    }
}

/// A port that is free, and whose cluster bus port (10 000 above) is free too: taken from
/// 20 000–29 999, below the ephemeral range, where `free_port` could give a port whose bus
/// port does not exist.
fn cluster_port() -> u16 {
    loop {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 10_000) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_followed_to_its_replica_and_nothing_confirmed_is_lost() {
    let mut cluster = tokio::task::spawn_blocking(PrivateCluster::start)
        .await
        .unwrap();
    let seeds = cluster.seeds();
    let app = Arc::new(
        TestApp::spawn_with(|env| {
            env.insert("REDIS_CLUSTER_NODES".into(), seeds);
            // A publish answers once a replica holds it: what it confirmed survives.
            env.insert("REDIS_MIN_REPLICAS_ACK".into(), "1".into());
            // Deliveries whose acks the dead master took with it come back soon.
            env.insert("CONSUMER_TIMEOUT".into(), "2000".into());
        })
        .await,
    );
    let queue = app.create_queue(json!({"name": "q"})).await;
    let subscription = app.subscribe_pull("q", "g").await;
    let stream = mq::broker::keys::KeyLayout::new(&app.redis.prefix)
        .partition(common::queue_id(&queue), 0)
        .stream;

    let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
    let delivered = Arc::new(Mutex::new(BTreeSet::new()));
    let refused = Arc::new(Mutex::new(Vec::<(u16, bool)>::new()));
    let stop = tokio_util::sync::CancellationToken::new();

    let publisher = {
        let (app, confirmed, refused, stop) = (
            app.clone(),
            confirmed.clone(),
            refused.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let response = app
                    .request(Method::POST, "/api/v1/mq/publish")
                    .json(&json!({"queue": "q", "payload": n}))
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                if status == 201 {
                    confirmed.lock().unwrap().insert(n);
                } else {
                    let retry_after = response.headers().contains_key("retry-after");
                    refused.lock().unwrap().push((status, retry_after));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let consumer = {
        let (app, delivered, stop) = (app.clone(), delivered.clone(), stop.clone());
        let subscription = subscription.clone();
        tokio::spawn(async move {
            let pull = format!("/api/v1/mq/subscriptions/{subscription}/pull");
            let ack = format!("/api/v1/mq/subscriptions/{subscription}/ack");
            while !stop.is_cancelled() {
                let (status, body) = app
                    .call(
                        Method::POST,
                        &pull,
                        Some(json!({"maxMessages": 100, "waitMs": 200})),
                    )
                    .await;
                if status != 200 {
                    assert_eq!(status, 503, "a pull in the gap: {body}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let messages = body["messages"].as_array().cloned().unwrap_or_default();
                let ack_ids: Vec<Value> = messages.iter().map(|m| m["ackId"].clone()).collect();
                delivered
                    .lock()
                    .unwrap()
                    .extend(messages.iter().filter_map(|m| m["payload"].as_u64()));
                if !ack_ids.is_empty() {
                    // An ack lost in the gap only means the message comes again.
                    let _ = app
                        .call(Method::POST, &ack, Some(json!({ "ackIds": ack_ids })))
                        .await;
                }
            }
        })
    };

    let started = Instant::now();
    while confirmed.lock().unwrap().len() <= 10 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "publishing works before the kill: {} confirmed, refused {:?}",
            confirmed.lock().unwrap().len(),
            refused.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let master = cluster.master_of(&stream);
    let killed_at = Instant::now();
    cluster.kill(master);

    // The service finds the promoted replica without a restart.
    let mut promoted = None;
    let recovered = loop {
        let published = confirmed.lock().unwrap().len();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if promoted.is_none() && cluster.master_of(&stream) != master {
            promoted = Some(killed_at.elapsed());
        }
        if confirmed.lock().unwrap().len() > published + 5 {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "no publish succeeded within 20 s of the kill; the cluster sees:\n{}",
            cluster.topology()
        );
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    publisher.await.unwrap();
    consumer.await.unwrap();

    // Whatever was confirmed is delivered, at least once.
    let confirmed = confirmed.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing: Vec<u64> = confirmed
            .difference(&delivered.lock().unwrap())
            .copied()
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} confirmed messages never delivered, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        for message in app.pull(&subscription, 100, 200).await {
            delivered
                .lock()
                .unwrap()
                .extend(message["payload"].as_u64());
            let _ = app
                .ack(&subscription, &[message["ackId"].as_str().unwrap()])
                .await;
        }
    }
    let refused = refused.lock().unwrap().clone();
    assert!(
        refused
            .iter()
            .all(|(status, retry_after)| *status == 503 && *retry_after),
        "publishes in the gap answer 503 with Retry-After: {refused:?}"
    );
    assert!(
        recovered < Duration::from_secs(10),
        "publishing resumed {recovered:?} after the kill"
    );
    eprintln!(
        "failover: {} confirmed, {} refused in the gap, replica promoted after {promoted:?}, publishing resumed after {recovered:?}",
        confirmed.len(),
        refused.len()
    );
}
