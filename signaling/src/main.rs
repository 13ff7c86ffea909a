//! `conclave`: the all-in-one server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use conclave_protocol::mls::{Identity, Principal};
use conclave_signaling::auth::Tokens;
use conclave_signaling::hub::Hub;
use conclave_signaling::metrics::Metrics;
use conclave_signaling::sfu::NoSfu;
use conclave_signaling::{AppState, CallConfig, router};
use tracing_subscriber::EnvFilter;

/// Conclave server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address for HTTP (web app, API, WebSocket).
    #[arg(long, env = "CONCLAVE_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Name of this deployment (the MLS external sender's credential).
    #[arg(long, env = "CONCLAVE_NAME", default_value = "conclave")]
    name: String,
    /// Membership changes are batched for this long (ms) into one commit.
    #[arg(long, env = "CONCLAVE_BATCH_MS", default_value_t = 200)]
    batch_ms: u64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "CONCLAVE_LOG_JSON")]
    log_json: bool,
}

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

    let server = Identity::generate(Principal::server(&args.name)?)?;
    let mut secret = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut secret);
    let metrics = Arc::new(Metrics::new()?);
    let config = CallConfig {
        batch_window: Duration::from_millis(args.batch_ms),
        ..CallConfig::default()
    };
    let state = AppState {
        hub: Hub::new(server, config, Arc::new(NoSfu), metrics.clone()),
        tokens: Tokens::new(&secret, Duration::from_secs(15 * 60)),
        metrics,
    };

    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("binding {}", args.http))?;
    tracing::info!(addr = %args.http, "conclave listening; open http://{}/", args.http);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving HTTP")?;
    Ok(())
}
