//! Typed settings read once from the environment and validated before anything starts.
//!
//! Names and defaults follow the configuration table of API.md. Every problem is reported as
//! one line naming the variable, because that line is all an operator sees when a container
//! refuses to start.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use base64::Engine;

#[derive(Clone)]
pub struct Config {
    pub port: u16,
    pub database_url: String,
    pub database_max_connections: u32,
    pub redis_url: String,
    /// Seed nodes of a Redis Cluster (`redis://host:port` each); empty: the single Redis at
    /// `redis_url`.
    pub redis_cluster_nodes: Vec<String>,
    /// Replicas that must confirm a publish (Redis `WAIT`) before it answers; 0: none.
    pub redis_min_replicas_ack: u32,
    pub redis_pool_size: usize,
    pub redis_key_prefix: String,
    pub jwt_secret: String,
    pub internal_service_token: String,
    /// Master keys for encrypted queues, by key id, and the one new messages use.
    pub encryption: Option<KeyRing>,
    /// Development mode: allows default or short secrets.
    pub dev_mode: bool,
    /// Per-tenant publish limits (0 = unlimited): requests and payload bytes per second.
    pub tenant_publish_rps: u64,
    pub tenant_publish_bytes_per_sec: u64,
    /// Queue and subscription changes one tenant may make per second, on all instances
    /// together (0: no limit).
    pub tenant_change_rps: u64,
    /// Monitoring views (`/metrics`, `/metrics/topics`, `/metrics/consumers`) one tenant may
    /// read per second (0: no limit).
    pub tenant_monitoring_rps: u64,
    /// How long a tenant's monitoring view is reused (0: read at every call).
    pub monitoring_cache_ms: u64,
    /// Webhook pushes one tenant may have in flight at once, over all its subscriptions.
    pub webhook_tenant_concurrency: usize,
    /// Queues a tenant may create (those the service creates count, but are never refused).
    pub tenant_max_queues: u64,
    /// Payload bytes a tenant may store over all its queues (0: no limit).
    pub tenant_max_bytes: u64,
    /// Subscriptions a tenant may have, in all, and to one queue.
    pub tenant_max_subscriptions: u64,
    pub queue_max_subscriptions: u64,
    /// How often the retention job trims streams.
    pub retention_interval_ms: u64,
    /// How often records past their queue's retention are removed from PostgreSQL.
    pub record_retention_interval_ms: u64,
    pub max_message_size: usize,
    /// Bytes of messages one pull (or one webhook take) hands out at most, beyond the first.
    pub pull_max_bytes: usize,
    pub default_ttl_secs: u64,
    pub max_queue_length: u64,
    pub consumer_timeout_ms: u64,
    pub message_batch_size: usize,
    pub max_batch_size: usize,
    pub max_concurrent_consumers: usize,
    pub processing_timeout_ms: u64,
    pub max_delay_ms: u64,
    pub dedup_window_ms: u64,
    pub max_request_bytes: usize,
    pub webhook_denied_networks: Vec<Cidr>,
    /// The proxy outbound webhooks go through; none unless set (HTTP_PROXY and the like are
    /// ignored, so a variable meant for something else never reroutes tenants' pushes).
    pub webhook_proxy_url: Option<String>,
    pub metrics_enabled: bool,
    pub metrics_max_queue_series: usize,
    /// One tenant's share of those series; its further queues count under its `_other`.
    pub metrics_tenant_queue_series: usize,
    /// How long the per-queue gauges of a scrape are reused (0: read at every scrape).
    pub metrics_gauge_interval_ms: u64,
    pub health_check_interval_secs: u64,
    /// After SIGTERM: how long `/health` answers 503 while requests are still served (so a
    /// load balancer stops sending), then how long in-flight work may take in all.
    pub shutdown_drain_ms: u64,
    pub shutdown_grace_ms: u64,
    pub dependency_timeout_ms: u64,
    pub log_format: LogFormat,
    pub auth_service_url: Option<String>,
    pub user_service_url: Option<String>,
    pub audit_service_url: Option<String>,
    /// Whether every publish is audited (`message_published`), as the seed design does.
    pub audit_publishes: bool,
    pub notification_service_url: Option<String>,
}

/// Secrets stay out of `Debug` so a logged config never leaks them.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("port", &self.port)
            .field("redis_key_prefix", &self.redis_key_prefix)
            .field("redis_cluster_nodes", &self.redis_cluster_nodes)
            .field("redis_min_replicas_ack", &self.redis_min_replicas_ack)
            .field("encryption", &self.encryption.is_some())
            .field("dev_mode", &self.dev_mode)
            .field("max_message_size", &self.max_message_size)
            .field("max_request_bytes", &self.max_request_bytes)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// An IP network in CIDR notation, e.g. `10.0.0.0/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub network: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address) {
            (IpAddr::V4(net), IpAddr::V4(addr)) => {
                prefix_matches(&net.octets(), &addr.octets(), self.prefix_len)
            }
            (IpAddr::V6(net), IpAddr::V6(addr)) => {
                prefix_matches(&net.octets(), &addr.octets(), self.prefix_len)
            }
            (IpAddr::V4(_), IpAddr::V6(addr)) => addr
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
            (IpAddr::V6(_), IpAddr::V4(addr)) => self.contains(IpAddr::V6(addr.to_ipv6_mapped())),
        }
    }
}

fn prefix_matches(network: &[u8], address: &[u8], prefix_len: u8) -> bool {
    let full_bytes = usize::from(prefix_len / 8);
    let rest_bits = prefix_len % 8;
    if network[..full_bytes] != address[..full_bytes] {
        return false;
    }
    if rest_bits == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest_bits);
    network[full_bytes] & mask == address[full_bytes] & mask
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("'{text}' is not in CIDR notation (address/prefix)"))?;
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("'{address}' is not an IP address"))?;
        let max_prefix = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max_prefix)
            .ok_or_else(|| format!("'{prefix}' is not a prefix length of 0..={max_prefix}"))?;
        Ok(Cidr {
            network,
            prefix_len,
        })
    }
}

/// Master encryption keys by id; `active` encrypts new messages, all of them decrypt.
#[derive(Clone)]
pub struct KeyRing {
    pub active: String,
    pub keys: Vec<(String, [u8; 32])>,
}

impl KeyRing {
    pub fn key(&self, id: &str) -> Option<&[u8; 32]> {
        self.keys
            .iter()
            .find(|(known, _)| known == id)
            .map(|(_, key)| key)
    }
}

const MIN_SECRET_LEN: usize = 32;
/// Values shipped in examples; never acceptable outside development.
const KNOWN_DEFAULT_SECRETS: &[&str] = &[
    "dev-only-jwt-secret-change-me-0123456789abcdef",
    "dev-only-service-token-change-me-0123456789",
    "secret",
    "changeme",
    "change-me",
];

fn decode_key(variable: &'static str, raw: &str) -> Result<[u8; 32], ConfigError> {
    base64::engine::general_purpose::STANDARD
        .decode(raw.as_bytes())
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes.as_slice()).ok())
        .ok_or_else(|| ConfigError {
            variable,
            problem: "must hold base64 encodings of exactly 32 bytes".into(),
        })
}

/// A configuration problem: which variable, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: {} {}",
            self.variable, self.problem
        )
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads every setting through `lookup`, so tests can validate without touching the
    /// process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env { lookup: &lookup };
        let dev_mode = env.boolean("MQ_DEV_MODE", false)?;
        let shutdown_grace_ms = env.number("SHUTDOWN_GRACE_MS", 8000, 1000..=600_000)?;
        Ok(Config {
            port: env.number("PORT", 3010, 0..=65535)?,
            database_url: env.url("DATABASE_URL", &["postgres", "postgresql"])?,
            database_max_connections: env.number("DATABASE_MAX_CONNECTIONS", 20, 1..=1000)?,
            redis_url: env.url("REDIS_URL", &["redis", "rediss"])?,
            redis_cluster_nodes: env.cluster_nodes("REDIS_CLUSTER_NODES")?,
            redis_min_replicas_ack: env.number("REDIS_MIN_REPLICAS_ACK", 0, 0..=16)?,
            redis_pool_size: env.number("REDIS_POOL_SIZE", 10, 1..=10_000)?,
            redis_key_prefix: env.key_prefix("REDIS_KEY_PREFIX", "mq:")?,
            jwt_secret: env.strong_secret("JWT_SECRET", dev_mode)?,
            internal_service_token: env.strong_secret("INTERNAL_SERVICE_TOKEN", dev_mode)?,
            encryption: env.key_ring()?,
            dev_mode,
            tenant_publish_rps: env.number("TENANT_RATE_LIMIT_RPS", 10_000, 0..=u64::MAX)?,
            tenant_publish_bytes_per_sec: env.number(
                "TENANT_RATE_LIMIT_BYTES_PER_SEC",
                100 * 1024 * 1024,
                0..=u64::MAX,
            )?,
            tenant_change_rps: env.number("TENANT_CHANGE_RPS", 50, 0..=u64::MAX)?,
            tenant_monitoring_rps: env.number("TENANT_MONITORING_RPS", 20, 0..=u64::MAX)?,
            monitoring_cache_ms: env.number("MONITORING_CACHE_MS", 2000, 0..=600_000)?,
            webhook_tenant_concurrency: env.number(
                "WEBHOOK_TENANT_CONCURRENCY",
                100,
                1..=100_000,
            )?,
            tenant_max_queues: env.number("TENANT_MAX_QUEUES", 1000, 1..=1_000_000)?,
            tenant_max_bytes: env.number("TENANT_MAX_BYTES", 1 << 30, 0..=u64::MAX)?,
            tenant_max_subscriptions: env.number(
                "TENANT_MAX_SUBSCRIPTIONS",
                1000,
                1..=1_000_000,
            )?,
            queue_max_subscriptions: env.number("QUEUE_MAX_SUBSCRIPTIONS", 100, 1..=1_000_000)?,
            retention_interval_ms: env.number("RETENTION_INTERVAL_MS", 5000, 100..=3_600_000)?,
            record_retention_interval_ms: env.number(
                "RECORD_RETENTION_INTERVAL_MS",
                60_000,
                100..=86_400_000,
            )?,
            max_message_size: env.number("MAX_MESSAGE_SIZE", 1_048_576, 1..=usize::MAX)?,
            pull_max_bytes: env.number("PULL_MAX_BYTES", 16_777_216, 1..=usize::MAX)?,
            default_ttl_secs: env.number("DEFAULT_TTL", 604_800, 1..=u64::MAX)?,
            max_queue_length: env.number("MAX_QUEUE_LENGTH", 10_000, 1..=u64::MAX)?,
            consumer_timeout_ms: env.number("CONSUMER_TIMEOUT", 30_000, 1..=u64::MAX)?,
            message_batch_size: env.number("MESSAGE_BATCH_SIZE", 50, 1..=100_000)?,
            max_batch_size: env.number("MAX_BATCH_SIZE", 1000, 1..=100_000)?,
            max_concurrent_consumers: env.number("MAX_CONCURRENT_CONSUMERS", 5, 1..=10_000)?,
            processing_timeout_ms: env.number("PROCESSING_TIMEOUT_MS", 15_000, 1..=u64::MAX)?,
            max_delay_ms: env.number("MAX_DELAY_MS", 604_800_000, 1..=u64::MAX)?,
            dedup_window_ms: env.number("DEDUP_WINDOW_MS", 86_400_000, 1..=u64::MAX)?,
            max_request_bytes: env.number("MAX_REQUEST_BYTES", 16_777_216, 1..=usize::MAX)?,
            webhook_denied_networks: env.cidr_list("WEBHOOK_DENIED_NETWORKS")?,
            webhook_proxy_url: env.optional_url("WEBHOOK_PROXY_URL")?,
            metrics_enabled: env.boolean("METRICS_ENABLED", true)?,
            metrics_max_queue_series: env.number(
                "METRICS_MAX_QUEUE_SERIES",
                1000,
                1..=1_000_000,
            )?,
            metrics_tenant_queue_series: env.number(
                "METRICS_TENANT_QUEUE_SERIES",
                100,
                1..=1_000_000,
            )?,
            metrics_gauge_interval_ms: env.number(
                "METRICS_GAUGE_INTERVAL_MS",
                5000,
                0..=600_000,
            )?,
            health_check_interval_secs: env.number("HEALTH_CHECK_INTERVAL", 30, 1..=86_400)?,
            // The drain is part of the grace: requests still need time to finish after it.
            shutdown_drain_ms: env
                .number("SHUTDOWN_DRAIN_MS", 1000, 0..=shutdown_grace_ms / 2)?
                .min(shutdown_grace_ms / 2),
            shutdown_grace_ms,
            dependency_timeout_ms: env.number("DEPENDENCY_TIMEOUT_MS", 2000, 50..=60_000)?,
            log_format: env.log_format("LOG_FORMAT")?,
            auth_service_url: env.optional_url("AUTH_SERVICE_URL")?,
            user_service_url: env.optional_url("USER_SERVICE_URL")?,
            audit_service_url: env.optional_url("AUDIT_SERVICE_URL")?,
            audit_publishes: env.boolean("AUDIT_PUBLISHES", true)?,
            notification_service_url: env.optional_url("NOTIFICATION_SERVICE_URL")?,
        })
    }
}

struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    /// The trimmed value; an empty value counts as unset.
    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn number<T>(
        &self,
        name: &'static str,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + fmt::Display + Copy,
    {
        let Some(raw) = self.get(name) else {
            return Ok(default);
        };
        raw.parse::<T>()
            .ok()
            .filter(|value| range.contains(value))
            .ok_or_else(|| ConfigError {
                variable: name,
                problem: format!(
                    "must be a whole number from {} to {} (got '{raw}')",
                    range.start(),
                    range.end()
                ),
            })
    }

    fn url(&self, name: &'static str, schemes: &[&str]) -> Result<String, ConfigError> {
        let value = self.get(name).ok_or_else(|| ConfigError {
            variable: name,
            problem: "is required but not set".into(),
        })?;
        let scheme_ok = value
            .split_once("://")
            .is_some_and(|(scheme, rest)| schemes.contains(&scheme) && !rest.is_empty());
        if !scheme_ok {
            return Err(ConfigError {
                variable: name,
                problem: format!("must be a URL starting with {}://", schemes.join(":// or ")),
            });
        }
        Ok(value)
    }

    fn optional_url(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        if self.get(name).is_none() {
            return Ok(None);
        }
        self.url(name, &["http", "https"]).map(Some)
    }

    fn required_secret(&self, name: &'static str) -> Result<String, ConfigError> {
        self.get(name).ok_or_else(|| ConfigError {
            variable: name,
            problem: "is required but not set".into(),
        })
    }

    /// `host:port,host:port,...` as `redis://host:port` URLs.
    fn cluster_nodes(&self, name: &'static str) -> Result<Vec<String>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(Vec::new());
        };
        raw.split(',')
            .map(str::trim)
            .filter(|node| !node.is_empty())
            .map(|node| {
                let port = node.rsplit_once(':').and_then(|(host, port)| {
                    (!host.is_empty() && !host.contains('/')).then(|| port.parse::<u16>().ok())?
                });
                match port {
                    Some(port) if port > 0 => Ok(format!("redis://{node}")),
                    _ => Err(ConfigError {
                        variable: name,
                        problem: format!("has '{node}', which is not host:port"),
                    }),
                }
            })
            .collect()
    }

    fn key_prefix(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        let prefix = self.get(name).unwrap_or_else(|| default.to_owned());
        // Braces would break the Redis Cluster hash tags the key layout relies on.
        if prefix.contains(['{', '}']) || prefix.chars().any(char::is_whitespace) {
            return Err(ConfigError {
                variable: name,
                problem: "must not contain braces or whitespace".into(),
            });
        }
        Ok(prefix)
    }

    /// A secret that must not be a known default or short, unless in development mode.
    fn strong_secret(&self, name: &'static str, dev_mode: bool) -> Result<String, ConfigError> {
        let secret = self.required_secret(name)?;
        if dev_mode {
            return Ok(secret);
        }
        let weak = secret.len() < MIN_SECRET_LEN
            || KNOWN_DEFAULT_SECRETS
                .iter()
                .any(|d| secret.eq_ignore_ascii_case(d))
            || secret.contains("change-me");
        if weak {
            return Err(ConfigError {
                variable: name,
                problem: format!(
                    "must be a random secret of at least {MIN_SECRET_LEN} characters, not a default (set MQ_DEV_MODE=true to allow it in development)"
                ),
            });
        }
        Ok(secret)
    }

    /// `MQ_ENCRYPTION_KEY` (key id `default`) and/or `MQ_ENCRYPTION_KEYS` (`id:base64,...`),
    /// with `MQ_ENCRYPTION_ACTIVE_KEY` naming the key new messages use (needed when there are
    /// several).
    fn key_ring(&self) -> Result<Option<KeyRing>, ConfigError> {
        let mut keys: Vec<(String, [u8; 32])> = Vec::new();
        if let Some(raw) = self.get("MQ_ENCRYPTION_KEY") {
            keys.push(("default".to_owned(), decode_key("MQ_ENCRYPTION_KEY", &raw)?));
        }
        if let Some(raw) = self.get("MQ_ENCRYPTION_KEYS") {
            for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let (id, key) = entry.split_once(':').ok_or_else(|| ConfigError {
                    variable: "MQ_ENCRYPTION_KEYS",
                    problem: "must be a comma-separated list of <key id>:<base64 of 32 bytes>"
                        .into(),
                })?;
                let id = id.trim();
                if id.is_empty() || keys.iter().any(|(known, _)| known == id) {
                    return Err(ConfigError {
                        variable: "MQ_ENCRYPTION_KEYS",
                        problem: format!("has an empty or repeated key id '{id}'"),
                    });
                }
                keys.push((id.to_owned(), decode_key("MQ_ENCRYPTION_KEYS", key.trim())?));
            }
        }
        if keys.is_empty() {
            if self.get("MQ_ENCRYPTION_ACTIVE_KEY").is_some() {
                return Err(ConfigError {
                    variable: "MQ_ENCRYPTION_ACTIVE_KEY",
                    problem: "is set but no MQ_ENCRYPTION_KEY or MQ_ENCRYPTION_KEYS is".into(),
                });
            }
            return Ok(None);
        }
        let active = match self.get("MQ_ENCRYPTION_ACTIVE_KEY") {
            Some(id) if keys.iter().any(|(known, _)| *known == id) => id,
            Some(id) => {
                return Err(ConfigError {
                    variable: "MQ_ENCRYPTION_ACTIVE_KEY",
                    problem: format!("names key '{id}', which no configured key has"),
                })
            }
            None if keys.len() == 1 => keys[0].0.clone(),
            None => {
                return Err(ConfigError {
                    variable: "MQ_ENCRYPTION_ACTIVE_KEY",
                    problem: "is required when several encryption keys are configured".into(),
                })
            }
        };
        Ok(Some(KeyRing { active, keys }))
    }

    fn cidr_list(&self, name: &'static str) -> Result<Vec<Cidr>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(Vec::new());
        };
        raw.split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| {
                part.parse::<Cidr>().map_err(|problem| ConfigError {
                    variable: name,
                    problem: format!("has an invalid network: {problem}"),
                })
            })
            .collect()
    }

    fn boolean(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(|v| v.to_ascii_lowercase()).as_deref() {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => Err(ConfigError {
                variable: name,
                problem: format!("must be true or false (got '{other}')"),
            }),
        }
    }

    fn log_format(&self, name: &'static str) -> Result<LogFormat, ConfigError> {
        match self.get(name).as_deref() {
            None | Some("json") => Ok(LogFormat::Json),
            Some("pretty") => Ok(LogFormat::Pretty),
            Some(other) => Err(ConfigError {
                variable: name,
                problem: format!("must be json or pretty (got '{other}')"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_membership() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.200.3.4".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        let odd: Cidr = "192.168.0.0/20".parse().unwrap();
        assert!(odd.contains("192.168.15.255".parse().unwrap()));
        assert!(!odd.contains("192.168.16.0".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
    }
}
