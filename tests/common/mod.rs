//! Test harness: every test starts the real service in-process on its own port, with its own
//! PostgreSQL database and its own Redis key prefix, so tests run in parallel without seeing
//! each other. Both are removed when the `TestApp` is dropped.

#![allow(dead_code)]

pub mod contract;
pub mod proxy;
pub mod receiver;

use std::collections::HashMap;
use std::net::SocketAddr;

use deadpool_redis::redis;
use jsonwebtoken::{EncodingKey, Header};
use mq::config::Config;
use mq::Application;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use tokio::sync::oneshot;
use uuid::Uuid;

pub const JWT_SECRET: &str = "test-jwt-secret-that-is-long-enough-0123456789";
pub const SERVICE_TOKEN: &str = "test-internal-service-token-0123456789abcdef";

/// The PostgreSQL server tests create their databases on (any database name in it is replaced).
pub fn postgres_server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The seed nodes of the Redis Cluster the suite runs against (`scripts/test.sh --cluster`),
/// if it does.
pub fn redis_cluster_nodes() -> Option<String> {
    std::env::var("REDIS_CLUSTER_NODES")
        .ok()
        .filter(|nodes| !nodes.trim().is_empty())
}

/// For a test that puts a TCP proxy in front of Redis: the service uses the single Redis at
/// `REDIS_URL` even when the suite runs on a cluster (a cluster client would follow the
/// nodes' own addresses around the proxy).
pub fn single_redis(env: &mut HashMap<String, String>) {
    env.remove("REDIS_CLUSTER_NODES");
}

/// Points the service at a Redis where nothing listens (port 1): the single Redis, and on a
/// cluster run the cluster's seed nodes as well.
pub fn unreachable_redis(env: &mut HashMap<String, String>) {
    env.insert("REDIS_URL".into(), "redis://127.0.0.1:1".into());
    if redis_cluster_nodes().is_some() {
        env.insert("REDIS_CLUSTER_NODES".into(), "127.0.0.1:1".into());
    }
}

/// A test's own connection to the Redis the service uses: the single one, or the cluster.
#[derive(Clone)]
pub enum TestRedisConnection {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for TestRedisConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            TestRedisConnection::Single(connection) => connection.req_packed_command(cmd),
            TestRedisConnection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            TestRedisConnection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            TestRedisConnection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

fn cluster_client(nodes: &str) -> redis::cluster::ClusterClient {
    redis::cluster::ClusterClient::new(
        nodes
            .split(',')
            .map(|node| format!("redis://{}", node.trim()))
            .collect::<Vec<_>>(),
    )
    .expect("valid REDIS_CLUSTER_NODES")
}

/// `url` with its host and port replaced by `authority` (credentials and path kept).
pub fn with_authority(url: &str, authority: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL with a scheme");
    let (credentials, host_and_path) = match rest.split_once('@') {
        Some((credentials, host_and_path)) => (format!("{credentials}@"), host_and_path),
        None => (String::new(), rest),
    };
    let path = host_and_path
        .find('/')
        .map_or("", |slash| &host_and_path[slash..]);
    format!("{scheme}://{credentials}{authority}{path}")
}

/// The socket address a URL's host and port resolve to.
pub async fn url_socket_address(url: &str, default_port: u16) -> SocketAddr {
    let rest = url.split_once("://").expect("URL with a scheme").1;
    let host_and_path = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let authority = host_and_path.split(['/', '?']).next().unwrap_or_default();
    let authority = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:{default_port}")
    };
    tokio::net::lookup_host(authority)
        .await
        .expect("resolve host")
        .next()
        .expect("an address")
}

fn with_database(server_url: &str, database: &str) -> String {
    let (base, query) = match server_url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (server_url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let root = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    format!("{root}/{database}{query}")
}

/// A private, empty PostgreSQL database, dropped with this value.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    /// Whether dropping this value drops the database (false for a second service's handle).
    owned: bool,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        let name = format!("mqtest_{}", Uuid::new_v4().simple());
        let admin_url = with_database(&postgres_server_url(), "postgres");
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("tests need PostgreSQL: run scripts/test.sh, which starts it");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("create test database");
        TestDatabase {
            url: with_database(&postgres_server_url(), &name),
            name,
            owned: true,
        }
    }

    fn borrowed(&self) -> TestDatabase {
        TestDatabase {
            name: self.name.clone(),
            url: self.url.clone(),
            owned: false,
        }
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block on async work: clean up
        // from a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    let admin_url = with_database(&postgres_server_url(), "postgres");
                    if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                        let _ = sqlx::query(&format!(
                            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                        ))
                        .execute(&mut admin)
                        .await;
                    }
                });
            }
        })
        .join();
    }
}

/// A Redis key prefix of this test's own; its keys are deleted with this value.
pub struct TestRedis {
    pub prefix: String,
    owned: bool,
    /// The service was started on the single Redis (`single_redis`) though the suite runs
    /// on a cluster: the test's own connection goes there too.
    single: bool,
}

impl TestRedis {
    pub fn new() -> TestRedis {
        TestRedis {
            prefix: format!("mqtest:{}:", Uuid::new_v4().simple()),
            owned: true,
            single: false,
        }
    }

    fn borrowed(&self) -> TestRedis {
        TestRedis {
            prefix: self.prefix.clone(),
            owned: false,
            single: self.single,
        }
    }

    pub async fn connection(&self) -> TestRedisConnection {
        if let Some(nodes) = redis_cluster_nodes().filter(|_| !self.single) {
            return TestRedisConnection::Cluster(
                cluster_client(&nodes)
                    .get_async_connection()
                    .await
                    .expect("tests on a cluster need it: run scripts/test.sh --cluster"),
            );
        }
        TestRedisConnection::Single(
            redis::Client::open(redis_url())
                .expect("valid REDIS_URL")
                .get_multiplexed_async_connection()
                .await
                .expect("tests need Redis: run scripts/test.sh, which starts it"),
        )
    }

    /// Every key under this test's prefix.
    pub async fn keys(&self) -> Vec<String> {
        let mut connection = self.connection().await;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut connection)
            .await
            .expect("KEYS");
        keys.sort();
        keys
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let pattern = format!("{}*", self.prefix);
        let _ = std::thread::spawn(move || {
            // A test behind a proxy used the single Redis even on a cluster run: both are
            // cleaned.
            if let Ok(mut connection) =
                redis::Client::open(redis_url()).and_then(|client| client.get_connection())
            {
                remove_matching(&mut connection, &pattern, false);
            }
            if let Some(nodes) = redis_cluster_nodes() {
                if let Ok(mut connection) = cluster_client(&nodes).get_connection() {
                    remove_matching(&mut connection, &pattern, true);
                }
            }
        })
        .join();
    }
}

/// Deletes the keys matching `pattern` (KEYS spans every master of a cluster; a DEL of keys
/// in several slots is refused there, so a cluster's are deleted one at a time).
fn remove_matching(
    connection: &mut impl redis::ConnectionLike,
    pattern: &str,
    one_at_a_time: bool,
) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query(connection)
        .unwrap_or_default();
    let chunk = if one_at_a_time { 1 } else { 1000 };
    for keys in keys.chunks(chunk) {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(connection);
    }
}

/// The environment a test service starts with; tests change entries before spawning.
/// A TCP port free a moment ago (a process started on it may still find it taken).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("address")
        .port()
}

/// The service binary `cargo test` builds, started with `env` alone; its standard error goes
/// to `stderr`.
pub fn spawn_service(
    env: &HashMap<String, String>,
    stderr: std::process::Stdio,
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_message-queue-service"))
        .env_clear()
        .envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start the service binary")
}

pub fn base_env(database_url: &str, redis_prefix: &str) -> HashMap<String, String> {
    [
        ("DATABASE_URL", database_url.to_owned()),
        ("REDIS_URL", redis_url()),
        (
            "REDIS_CLUSTER_NODES",
            redis_cluster_nodes().unwrap_or_default(),
        ),
        ("REDIS_KEY_PREFIX", redis_prefix.to_owned()),
        ("JWT_SECRET", JWT_SECRET.to_owned()),
        ("INTERNAL_SERVICE_TOKEN", SERVICE_TOKEN.to_owned()),
        ("PORT", "0".to_owned()),
        ("DATABASE_MAX_CONNECTIONS", "5".to_owned()),
        ("REDIS_POOL_SIZE", "8".to_owned()),
        ("DEPENDENCY_TIMEOUT_MS", "1000".to_owned()),
        // Tests that count stream entries must not see them trimmed mid-test; the retention
        // tests turn it on.
        ("RETENTION_INTERVAL_MS", "3600000".to_owned()),
        // Tests make changes and read the views in quick loops; the rate-limit tests set
        // their own.
        ("TENANT_CHANGE_RPS", "100000".to_owned()),
        ("TENANT_MONITORING_RPS", "100000".to_owned()),
        // Tests read a view right after what should change it; the reuse has its own test.
        ("MONITORING_CACHE_MS", "0".to_owned()),
        // A test that stops an instance does not wait for a load balancer.
        ("SHUTDOWN_DRAIN_MS", "0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

pub struct TestApp {
    pub address: SocketAddr,
    pub client: reqwest::Client,
    /// The tenant of `request`'s default token.
    pub tenant: Uuid,
    pub redis: TestRedis,
    /// The service's shared state, for fault injection and direct inspection.
    pub state: mq::state::AppState,
    workers: mq::workers::Workers,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    // Declared last: dropped after the server has been told to stop.
    pub database: TestDatabase,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// Starts the service with `customize` applied to its environment.
    pub async fn spawn_with(customize: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
        let database = TestDatabase::create().await;
        let url = database.url.clone();
        Self::start(database, &url, customize).await
    }

    /// Starts the service reaching its database through a TCP proxy the test can cut.
    /// `database.connect()` still reaches the database directly.
    pub async fn spawn_behind_postgres_proxy() -> (TestApp, proxy::TcpProxy) {
        let database = TestDatabase::create().await;
        let target = url_socket_address(&database.url, 5432).await;
        let proxy = proxy::TcpProxy::start(target).await;
        let proxied_url = with_authority(&database.url, &proxy.address.to_string());
        (Self::start(database, &proxied_url, |_| {}).await, proxy)
    }

    /// Starts the service reaching Redis through a TCP proxy the test can cut.
    pub async fn spawn_behind_redis_proxy() -> (TestApp, proxy::TcpProxy) {
        let target = url_socket_address(&redis_url(), 6379).await;
        let proxy = proxy::TcpProxy::start(target).await;
        let proxied_url = with_authority(&redis_url(), &proxy.address.to_string());
        let app = Self::spawn_with(|env| {
            single_redis(env);
            env.insert("REDIS_URL".into(), proxied_url);
        })
        .await;
        (app, proxy)
    }

    /// A second service instance on the same database and Redis keys, as in a deployment of
    /// several instances. Dropping it leaves the data to the first.
    pub async fn spawn_sibling(&self) -> TestApp {
        self.spawn_sibling_with(|_| {}).await
    }

    /// A sibling with `customize` applied to its environment (e.g. other encryption keys).
    pub async fn spawn_sibling_with(
        &self,
        customize: impl FnOnce(&mut HashMap<String, String>),
    ) -> TestApp {
        let mut sibling =
            Self::start_with(self.database.borrowed(), self.redis.borrowed(), customize).await;
        sibling.tenant = self.tenant;
        sibling
    }

    async fn start(
        database: TestDatabase,
        database_url: &str,
        customize: impl FnOnce(&mut HashMap<String, String>),
    ) -> TestApp {
        let url = database_url.to_owned();
        Self::start_with(database, TestRedis::new(), move |env| {
            env.insert("DATABASE_URL".into(), url);
            customize(env);
        })
        .await
    }

    async fn start_with(
        database: TestDatabase,
        mut redis: TestRedis,
        customize: impl FnOnce(&mut HashMap<String, String>),
    ) -> TestApp {
        let database_url = database.url.clone();
        let mut env = base_env(&database_url, &redis.prefix);
        if redis.single {
            // A sibling of a service on the single Redis uses it too.
            single_redis(&mut env);
        }
        customize(&mut env);
        redis.single = env
            .get("REDIS_CLUSTER_NODES")
            .is_none_or(|nodes| nodes.trim().is_empty());
        let config = Config::from_lookup(|name| env.get(name).cloned()).expect("valid test config");
        let application = Application::build(config).await.expect("service builds");
        let state = application.state().clone();
        let workers = state.workers.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("local address");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = application
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await;
        });
        TestApp {
            address,
            // Never through a proxy the environment names: tests talk to the service directly.
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("HTTP client"),
            tenant: Uuid::new_v4(),
            redis,
            state,
            workers,
            stop: Some(stop),
            server: Some(server),
            database,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    /// A request as this test's default tenant (principal "tester").
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.request_as(self.tenant, "tester", method, path)
    }

    pub fn request_as(
        &self,
        tenant: Uuid,
        principal: &str,
        method: Method,
        path: &str,
    ) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(token_for(tenant, principal))
    }

    pub fn anonymous(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// Sends `method path` (with a JSON body when given) as the default tenant; the answer
    /// is checked against the OpenAPI description (`contract`).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(self.tenant, "tester", method, path, body)
            .await
    }

    /// Sends `method path` (with a JSON body when given) as `principal` of `tenant`.
    pub async fn call_as(
        &self,
        tenant: Uuid,
        principal: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.request_as(tenant, principal, method.clone(), path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let (status, answer) = read(request.send().await.expect("request")).await;
        contract::check(method.as_str(), path, status, &answer);
        (status, answer)
    }

    /// Publishes `body` (a message with its `queue`) as the default tenant; the status and
    /// the answer.
    pub async fn publish(&self, body: Value) -> (u16, Value) {
        self.call(Method::POST, "/api/v1/mq/publish", Some(body))
            .await
    }

    /// Creates a subscription as the default tenant and returns it (asserting 201).
    pub async fn subscribe(&self, body: Value) -> Value {
        let (status, subscription) = self
            .call(Method::POST, "/api/v1/mq/subscriptions", Some(body))
            .await;
        assert_eq!(status, 201, "create subscription: {subscription}");
        subscription
    }

    /// A pull subscription of the default tenant reading `queue` from its start.
    pub async fn subscribe_pull(&self, queue: &str, group: &str) -> String {
        let subscription = self
            .subscribe(
                json!({"queue": queue, "consumerGroup": group, "consumerName": "c",
                              "subscriptionType": "redis_consumer",
                              "offsetResetPolicy": "earliest"}),
            )
            .await;
        subscription["id"].as_str().expect("id").to_owned()
    }

    /// Pulls up to `max` messages of the default tenant's subscription, waiting up to
    /// `wait_ms` for the first.
    pub async fn pull(&self, subscription: &str, max: u32, wait_ms: u32) -> Vec<Value> {
        let (status, body) = self
            .call(
                Method::POST,
                &format!("/api/v1/mq/subscriptions/{subscription}/pull"),
                Some(json!({"maxMessages": max, "waitMs": wait_ms})),
            )
            .await;
        assert_eq!(status, 200, "pull: {body}");
        body["messages"].as_array().cloned().unwrap_or_default()
    }

    /// Acks `ack_ids` on the default tenant's subscription; how many took effect.
    pub async fn ack(&self, subscription: &str, ack_ids: &[&str]) -> u64 {
        let (status, body) = self
            .call(
                Method::POST,
                &format!("/api/v1/mq/subscriptions/{subscription}/ack"),
                Some(json!({ "ackIds": ack_ids })),
            )
            .await;
        assert_eq!(status, 200, "ack: {body}");
        body["acked"].as_u64().expect("acked")
    }

    /// `GET /messages/{id}?queue=` as the default tenant.
    pub async fn lookup(&self, queue: &str, message_id: &str) -> (u16, Value) {
        let path = format!(
            "/api/v1/mq/messages/{}?queue={queue}",
            urlencode(message_id)
        );
        self.call(Method::GET, &path, None).await
    }

    /// `GET path` without credentials, as text (for `/metrics`).
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let response = self
            .anonymous(Method::GET, path)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// `GET path` without credentials, checked against the OpenAPI description.
    pub async fn get_anonymous(&self, path: &str) -> (u16, Value) {
        let (status, body) = read(
            self.anonymous(Method::GET, path)
                .send()
                .await
                .expect("request"),
        )
        .await;
        contract::check("GET", path, status, &body);
        (status, body)
    }

    pub async fn create_queue(&self, body: Value) -> Value {
        let (status, body) = self
            .call(Method::POST, "/api/v1/mq/queues", Some(body))
            .await;
        assert_eq!(status, 201, "create queue: {body}");
        body
    }

    /// Stops this instance's background workers (its HTTP routes go on), once they have
    /// started: they start with the server, a moment after `spawn` returns.
    pub async fn stop_workers(&self) {
        let started = eventually(std::time::Duration::from_secs(10), || async {
            self.state.workers.states().contains_key("recorder")
        })
        .await;
        assert!(started, "the workers started");
        self.state.workers.abort_all();
    }

    /// Stops the service abruptly, workers mid-step included, as a crashed process would.
    pub fn kill(&mut self) {
        self.workers.abort_all();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// Stops the server and waits for its graceful shutdown.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // The workers (the recorder writing audit events, above all) would otherwise go on
        // writing under the test's key prefix while its keys are being removed.
        self.workers.abort_all();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// A signed gateway JWT valid for an hour.
pub fn token_for(tenant: Uuid, principal: &str) -> String {
    sign(json!({
        "tenant_id": tenant.to_string(),
        "sub": principal,
        "exp": chrono::Utc::now().timestamp() + 3600,
    }))
}

pub fn sign(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign test token")
}

/// `text` percent-encoded for a URL path segment or query value.
pub fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Status and JSON body (Null when the body is empty or not JSON).
pub async fn read(response: Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Asserts the contract's error body: status, code, and a non-empty message.
pub fn assert_error(status: u16, body: &Value, expected_status: u16, expected_code: &str) {
    assert_eq!(status, expected_status, "unexpected status; body: {body}");
    assert_eq!(body["code"], expected_code, "unexpected code; body: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {body}"
    );
    assert!(body["details"].is_object(), "error without details: {body}");
}

/// The `stats` of one of the default tenant's subscriptions.
pub async fn subscription_stats(app: &TestApp, subscription: &str) -> Value {
    app.call(
        Method::GET,
        &format!("/api/v1/mq/subscriptions/{subscription}"),
        None,
    )
    .await
    .1["stats"]
        .clone()
}

/// The queue id of a queue resource.
pub fn queue_id(queue: &Value) -> Uuid {
    queue["id"]
        .as_str()
        .expect("queue id")
        .parse()
        .expect("UUID")
}

/// (entry id, envelope) of every entry of one partition stream of `queue`, in order.
pub async fn stream_entries(app: &TestApp, queue: &Value, partition: u16) -> Vec<(String, Value)> {
    let keys =
        mq::broker::keys::KeyLayout::new(&app.redis.prefix).partition(queue_id(queue), partition);
    let mut redis = app.redis.connection().await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&keys.stream)
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await
        .expect("XRANGE");
    entries
        .into_iter()
        .map(|(id, fields)| {
            let envelope = fields
                .into_iter()
                .find(|(name, _)| name == "e")
                .expect("envelope")
                .1;
            (id, serde_json::from_str(&envelope).expect("envelope JSON"))
        })
        .collect()
}

/// Pulls from the default tenant's subscription until `count` messages arrived or `timeout`
/// passed; what arrived.
pub async fn pull_until(
    app: &TestApp,
    subscription: &str,
    count: usize,
    timeout: std::time::Duration,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pulled = Vec::new();
    while pulled.len() < count && tokio::time::Instant::now() < deadline {
        let wanted = (count - pulled.len()) as u32;
        pulled.extend(app.pull(subscription, wanted, 200).await);
    }
    pulled
}

/// Polls `check` until it holds or `timeout` passes; whether it held.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
