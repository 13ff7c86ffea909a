//! Conclave's control plane: authenticated WebSocket sessions, calls, and
//! the MLS delivery service that carries each call's key exchange without
//! ever holding a key.
//!
//! - [`call`]: one call's state machine (membership, batching, commit ordering).
//! - [`hub`]: sessions and call tasks at run time.
//! - [`ws`]: the WebSocket endpoint and message validation.
//! - [`auth`]: session tokens.
//! - [`metrics`]: Prometheus metrics.
//! - [`sfu`]: the interface to the media plane.

pub mod auth;
pub mod call;
pub mod hub;
pub mod metrics;
pub mod sfu;
pub mod ws;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::Html;
use axum::routing::get;

pub use call::CallConfig;

/// Everything request handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Sessions and calls.
    pub hub: hub::Hub,
    /// Token issuer and verifier.
    pub tokens: auth::Tokens,
    /// Metrics.
    pub metrics: Arc<metrics::Metrics>,
}

const STATUS_PAGE: &str = include_str!("status.html");

/// The HTTP application: status page, health, metrics and the WebSocket.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(STATUS_PAGE) }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.metrics.render() }),
        )
        .route("/ws", get(ws::upgrade))
        .with_state(state)
}
