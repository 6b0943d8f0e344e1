use std::process::ExitCode;
use std::time::Duration;

use mq::config::Config;
use mq::Application;

/// Start-up waits this long for PostgreSQL (e.g. a container still booting) before giving up.
const DATABASE_WAIT: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> ExitCode {
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
            eprintln!("start-up failed: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(("0.0.0.0", port)).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("cannot listen on port {port} (PORT): {error}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(port, "message-queue-service listening");
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
