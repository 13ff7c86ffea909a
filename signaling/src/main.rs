//! `conclave`: the all-in-one server.
//!
//! Today it serves the status page and a health check; accounts, calls, the
//! MLS delivery service and the embedded SFU arrive with issues 3 and 4.

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use axum::response::Html;
use axum::routing::get;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Conclave server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address for HTTP (web app, API, WebSocket).
    #[arg(long, env = "CONCLAVE_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "CONCLAVE_LOG_JSON")]
    log_json: bool,
}

const STATUS_PAGE: &str = include_str!("status.html");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let app = Router::new()
        .route("/", get(|| async { Html(STATUS_PAGE) }))
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("binding {}", args.http))?;
    tracing::info!(addr = %args.http, "conclave listening; open http://{}/", args.http);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving HTTP")?;
    Ok(())
}
