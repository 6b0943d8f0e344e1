//! Connections to Redis.
//!
//! Ordinary commands go over a few shared, multiplexed connections: concurrent requests
//! pipeline on them, nothing is checked out or checked back (deadpool's check-out costs a
//! PING round trip each time), so a publish costs one round trip. A connection that fails
//! with an I/O error marks every shared connection stale (they share the server and the
//! network, so they are most likely gone too), and the next caller of each slot reconnects;
//! the wake listener does the same the moment its own connection drops, so the first request
//! after Redis comes back already succeeds.
//!
//! On a Redis Cluster (`REDIS_CLUSTER_NODES`), the redis crate's cluster connection takes
//! their place: it keeps a multiplexed connection to each node, sends each command and each
//! single-slot pipeline to its slot's master, follows MOVED and ASK, and reloads the slot map
//! when a node fails, so a promoted replica is found without a restart. A pipeline must stay
//! within one slot there; `scripts::run_chunked` and the other multi-queue callers send one
//! queue's commands per pipeline on a cluster.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, Value};

/// Enough to keep two cores busy; more only splits the pipelining.
const SHARED: usize = 4;
/// No command on a shared connection takes this long on a live server (blocking reads use
/// the pool): a reply this late means the connection is gone, and it is replaced.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive probes after this much silence, this often, this many times: a half-open
/// connection (the peer vanished without a reset) is dropped within seconds, not hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_PROBES: u32 = 3;
/// Unacknowledged data on a connection for this long drops it (TCP_USER_TIMEOUT).
const UNACKNOWLEDGED_LIMIT: Duration = Duration::from_secs(10);

/// Retries of a cluster command (MOVED, ASK, a node lost) before it fails, and the bounds of
/// the waits between them (about 50 ms with the crate's backoff factor): a request during a
/// failover answers 503 within a fraction of a second rather than waiting out the redis
/// crate's default of 16 retries with waits of over a second.
const CLUSTER_RETRIES: u32 = 3;
const CLUSTER_MIN_RETRY_WAIT_MS: u64 = 50;
const CLUSTER_MAX_RETRY_WAIT_MS: u64 = 500;

/// The TCP settings of every Redis connection the service makes itself.
pub fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::socket2::TcpKeepalive;
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_user_timeout(UNACKNOWLEDGED_LIMIT)
}

pub struct SharedConnections {
    client: redis::Client,
    config: AsyncConnectionConfig,
    slots: Vec<Slot>,
    next: AtomicUsize,
    /// Connections made before the last failure are stale.
    epoch: Arc<AtomicU64>,
}

#[derive(Default)]
struct Slot {
    current: RwLock<Option<SharedConnection>>,
    /// Held while connecting, so a reconnect storm opens one connection per slot.
    connecting: tokio::sync::Mutex<()>,
}

/// A cheap handle on one shared connection; reports when the connection breaks.
#[derive(Clone)]
pub struct SharedConnection {
    inner: MultiplexedConnection,
    made_in: u64,
    epoch: Arc<AtomicU64>,
}

impl SharedConnections {
    pub fn new(client: redis::Client, connect_timeout: Duration) -> SharedConnections {
        SharedConnections {
            client,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(connect_timeout)
                .set_response_timeout(RESPONSE_TIMEOUT)
                .set_tcp_settings(tcp_settings()),
            slots: (0..SHARED).map(|_| Slot::default()).collect(),
            next: AtomicUsize::new(0),
            epoch: Arc::default(),
        }
    }

    /// Makes every shared connection reconnect before its next use.
    pub fn suspect_all(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// One of the shared connections, connecting (again) when it is missing or broken.
    pub async fn get(&self) -> redis::RedisResult<SharedConnection> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        if let Some(healthy) = slot.healthy() {
            return Ok(healthy);
        }
        let _connecting = slot.connecting.lock().await;
        if let Some(healthy) = slot.healthy() {
            return Ok(healthy);
        }
        let made_in = self.epoch.load(Ordering::Relaxed);
        let connection = SharedConnection {
            inner: self
                .client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?,
            made_in,
            epoch: self.epoch.clone(),
        };
        *slot.current.write().unwrap_or_else(|p| p.into_inner()) = Some(connection.clone());
        Ok(connection)
    }
}

impl Slot {
    fn healthy(&self) -> Option<SharedConnection> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current
            .as_ref()
            .filter(|connection| connection.made_in == connection.epoch.load(Ordering::Relaxed))
            .cloned()
    }
}

impl SharedConnection {
    fn note<T>(&self, result: &Result<T, RedisError>) {
        if let Err(error) = result {
            if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
                // Only the first failure of an epoch starts a new one.
                let _ = self.epoch.compare_exchange(
                    self.made_in,
                    self.made_in + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
    }
}

impl ConnectionLike for SharedConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.inner.req_packed_command(cmd).await;
            self.note(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self
                .inner
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.note(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// The connections ordinary commands go over: shared ones to a single Redis, or one cluster
/// connection.
pub enum Connections {
    Single(SharedConnections),
    Cluster(ClusterConnections),
}

impl Connections {
    pub async fn get(&self) -> redis::RedisResult<RedisConnection> {
        match self {
            Connections::Single(shared) => shared.get().await.map(RedisConnection::Single),
            Connections::Cluster(cluster) => cluster.get().await.map(RedisConnection::Cluster),
        }
    }

    /// Makes the connections reconnect before their next use (a cluster connection finds
    /// its broken nodes itself).
    pub fn suspect_all(&self) {
        if let Connections::Single(shared) = self {
            shared.suspect_all();
        }
    }
}

/// A cluster connection, made on first use so that a cluster that is down at start-up shows
/// in health instead of stopping the service.
pub struct ClusterConnections {
    client: redis::cluster::ClusterClient,
    current: tokio::sync::OnceCell<ClusterConnection>,
}

impl ClusterConnections {
    pub fn new(
        nodes: &[redis::ConnectionInfo],
        connect_timeout: Duration,
    ) -> redis::RedisResult<Self> {
        let client = redis::cluster::ClusterClient::builder(nodes.to_vec())
            .connection_timeout(connect_timeout)
            .response_timeout(RESPONSE_TIMEOUT)
            .tcp_settings(tcp_settings())
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(CLUSTER_MIN_RETRY_WAIT_MS)
            .max_retry_wait(CLUSTER_MAX_RETRY_WAIT_MS)
            .build()?;
        Ok(ClusterConnections {
            client,
            current: tokio::sync::OnceCell::new(),
        })
    }

    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        self.current
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// One connection handle of either kind.
#[derive(Clone)]
pub enum RedisConnection {
    Single(SharedConnection),
    Cluster(ClusterConnection),
}

impl RedisConnection {
    /// On a cluster, a pipeline must not span hash slots.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(_))
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(connection) => connection.req_packed_command(cmd),
            RedisConnection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            RedisConnection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(connection) => connection.get_db(),
            RedisConnection::Cluster(connection) => connection.get_db(),
        }
    }
}
