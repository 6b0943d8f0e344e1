//! What idle webhook subscriptions cost: Redis commands a second, the service's CPU and its
//! resident memory, for several numbers of subscriptions nobody publishes to.
//!
//! Start the service (`scripts/run.sh`, or let `scripts/bench.sh` do it), then:
//!
//! ```sh
//! cargo bench --bench idle
//! ```
//!
//! Settings (environment): `BENCH_URL` (http://127.0.0.1:3010), `JWT_SECRET` (the development
//! secret of .env.example), `REDIS_URL` (redis://127.0.0.1:6379, the service's Redis),
//! `BENCH_IDLE_COUNTS` (`0,100,1000`: subscriptions per step), `BENCH_IDLE_PER_TENANT` (10
//! queues per tenant, one webhook subscription each, 4 partitions), `BENCH_IDLE_SECONDS` (10,
//! the measured window), `BENCH_IDLE_SETTLE_SECONDS` (5, waited before it), `BENCH_SERVICE_PID`
//! (default: the process named `message-queue-service`).
//!
//! The Redis figure counts every command the server processed in the window, so nothing else
//! should use that Redis meanwhile; the benchmark's own two `INFO` calls are subtracted.

use std::time::{Duration, Instant};

use deadpool_redis::redis;
use serde_json::json;

#[path = "support/mod.rs"]
mod support;

use support::setting;

struct Tenant {
    token: String,
    queues: Vec<String>,
}

/// CPU seconds the process used so far (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn service_pid() -> u32 {
    if let Ok(pid) = std::env::var("BENCH_SERVICE_PID") {
        return pid.parse().expect("BENCH_SERVICE_PID is a number");
    }
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|name| name.trim() == "message-queue-s")
        })
        .expect("no running message-queue-service; start it or set BENCH_SERVICE_PID")
}

async fn commands_processed(
    redis: &mut redis::aio::MultiplexedConnection,
) -> (u64, Vec<(String, u64)>) {
    let stats: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(redis)
        .await
        .expect("INFO stats");
    let total = stats
        .lines()
        .find_map(|line| line.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let commands: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .expect("INFO commandstats");
    let per_command = commands
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect();
    (total, per_command)
}

async fn create(
    http: &reqwest::Client,
    url: &str,
    subscriptions: usize,
    per_tenant: usize,
) -> Vec<Tenant> {
    let mut tenants: Vec<Tenant> = Vec::new();
    for n in 0..subscriptions {
        if n % per_tenant == 0 {
            tenants.push(Tenant {
                token: support::tenant_token(),
                queues: Vec::new(),
            });
        }
        let tenant = tenants.last_mut().unwrap();
        let name = support::unique_name("idle");
        for (path, body) in [
            ("queues", json!({"name": name, "partitionCount": 4})),
            (
                "subscriptions",
                json!({"queue": name, "consumerGroup": "idle", "consumerName": "idle-1", "subscriptionType": "webhook",
                       "handlerConfig": {"url": "http://127.0.0.1:9/never-called"}}),
            ),
        ] {
            let response = http
                .post(format!("{url}/api/v1/mq/{path}"))
                .bearer_auth(&tenant.token)
                .json(&body)
                .send()
                .await
                .expect("is the service running?");
            assert!(
                response.status().is_success(),
                "creating {path}: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        tenant.queues.push(name);
    }
    tenants
}

async fn delete(http: &reqwest::Client, url: &str, tenants: &[Tenant]) {
    for tenant in tenants {
        for queue in &tenant.queues {
            let _ = http
                .delete(format!("{url}/api/v1/mq/queues/{queue}"))
                .bearer_auth(&tenant.token)
                .send()
                .await;
        }
    }
}

#[tokio::main]
async fn main() {
    let url = support::service_url();
    let http = reqwest::Client::new();
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut redis = redis::Client::open(redis_url)
        .expect("REDIS_URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let pid = service_pid();
    let counts: Vec<usize> = std::env::var("BENCH_IDLE_COUNTS")
        .unwrap_or_else(|_| "0,100,1000".into())
        .split(',')
        .map(|n| n.trim().parse().expect("BENCH_IDLE_COUNTS: numbers"))
        .collect();
    let per_tenant = setting("BENCH_IDLE_PER_TENANT", 10).max(1) as usize;
    let window = Duration::from_secs(setting("BENCH_IDLE_SECONDS", 10).max(1));
    let settle = Duration::from_secs(setting("BENCH_IDLE_SETTLE_SECONDS", 5));

    for subscriptions in counts {
        let created = Instant::now();
        let tenants = create(&http, &url, subscriptions, per_tenant).await;
        let created_in = created.elapsed();
        tokio::time::sleep(settle).await;
        let (commands_before, per_command_before) = commands_processed(&mut redis).await;
        let cpu_before = cpu_seconds(pid);
        let started = Instant::now();
        tokio::time::sleep(window).await;
        let (commands_after, per_command_after) = commands_processed(&mut redis).await;
        let cpu_after = cpu_seconds(pid);
        let seconds = started.elapsed().as_secs_f64();
        let commands = commands_after.saturating_sub(commands_before + 2);
        let mut busiest: Vec<(String, u64)> = per_command_after
            .into_iter()
            .map(|(name, calls)| {
                let before = per_command_before
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0, |(_, c)| *c);
                (name, calls.saturating_sub(before))
            })
            .filter(|(name, calls)| *calls > 0 && name != "info")
            .collect();
        busiest.sort_by_key(|(_, calls)| std::cmp::Reverse(*calls));
        let busiest: Vec<String> = busiest
            .iter()
            .take(5)
            .map(|(name, calls)| format!("{name} {:.0}/s", *calls as f64 / seconds))
            .collect();
        println!(
            "idle {subscriptions} webhook subscriptions ({} tenants, created in {:.1} s): Redis {:.0} commands/s [{}]; service CPU {:.2} % of a core; RSS {:.1} MB",
            tenants.len(),
            created_in.as_secs_f64(),
            commands as f64 / seconds,
            busiest.join(", "),
            (cpu_after - cpu_before) / seconds * 100.0,
            rss_mb(pid),
        );
        delete(&http, &url, &tenants).await;
    }
}
