use std::process::ExitCode;
use std::time::Duration;

use mq::config::Config;
use mq::Application;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Start-up waits this long for PostgreSQL (e.g. a container still booting) before giving up.
const DATABASE_WAIT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let command = std::env::args().nth(1);
    if command.as_deref() == Some("token") {
        return token();
    }
    if command.as_deref() != Some("healthcheck") {
        mq::memory::start_with_allocator_settings();
    }
    mq::memory::configure_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
        .block_on(run())
}

async fn run() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return healthcheck().await;
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    mq::telemetry::init(config.log_format);
    let port = config.port;

    let application = match build_with_retry(config).await {
        Ok(application) => application,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "start-up failed");
            eprintln!(
                "start-up failed: {error:#}\n\
                 check that PostgreSQL (DATABASE_URL) and Redis (REDIS_URL, or \
                 REDIS_CLUSTER_NODES) answer; scripts/ensure-deps.sh starts both locally"
            );
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(("0.0.0.0", port)).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "cannot listen on port {port} (PORT): {error}\n\
                 stop what holds the port, or set PORT to a free one"
            );
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        port,
        console = format!("http://localhost:{port}/console"),
        "message-queue-service listening"
    );
    match application.serve(listener, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(error = %error, "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn build_with_retry(config: Config) -> anyhow::Result<Application> {
    let deadline = tokio::time::Instant::now() + DATABASE_WAIT;
    let mut delay = Duration::from_millis(250);
    loop {
        match Application::build(config.clone()).await {
            Ok(application) => return Ok(application),
            Err(error) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "dependencies not ready; retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received; draining");
}

/// `message-queue-service token ...`: a development JWT on standard output (`dev_token`).
fn token() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(2).collect();
    match mq::dev_token::run(&args, |name| std::env::var(name).ok()) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(2)
        }
    }
}

/// `message-queue-service healthcheck`: exit 0 when the local service's health route answers
/// 200. For container health checks, where the image has no curl.
async fn healthcheck() -> ExitCode {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let port = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(3010);
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /api/v1/mq/health HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<bool, std::io::Error>(
            head.starts_with(b"HTTP/1.0 200") || head.starts_with(b"HTTP/1.1 200"),
        )
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
