//! Conclave's control plane: authenticated WebSocket sessions, calls, and
//! the MLS delivery service that carries each call's key exchange without
//! ever holding a key.
//!
//! - [`call`]: one call's state machine (membership, batching, commit ordering).
//! - [`hub`]: sessions and call tasks at run time.
//! - [`ws`]: the WebSocket endpoint and message validation.
//! - [`auth`]: session tokens.
//! - [`metrics`]: Prometheus metrics.
//! - [`db`]: durable state (sqlx: SQLite or PostgreSQL).
//! - [`api`]: sign-in, tokens, invitations and the admin API.
//! - [`sfu`]: the interface to the media plane.

pub mod api;
pub mod auth;
pub mod call;
pub mod db;
pub mod hub;
pub mod metrics;
pub mod sfu;
pub mod ws;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::Html;
use axum::routing::{get, post, put};

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
    /// Durable state.
    pub db: db::Db,
    /// The organisation this server serves.
    pub org_id: Arc<str>,
    /// The security group new users get.
    pub default_group: Arc<str>,
    /// An argon2 hash of nothing, checked when a login names no user.
    pub dummy_hash: Arc<str>,
}

impl AppState {
    /// Opens the database, creates the defaults and starts the audit writer.
    pub async fn open(
        db_url: &str,
        server: conclave_protocol::mls::Identity,
        config: CallConfig,
        sfu: Arc<dyn sfu::SfuControl>,
        token_secret: &[u8],
        token_ttl: std::time::Duration,
    ) -> Result<Self, db::DbError> {
        let db = db::Db::connect(db_url).await?;
        let (org_id, default_group) = db.ensure_defaults().await?;
        let metrics = Arc::new(
            metrics::Metrics::new()
                .map_err(|e| db::DbError::Sql(sqlx::Error::Configuration(Box::new(e))))?,
        );
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<hub::AuditRecord>();
        let writer_db = db.clone();
        let org = org_id.clone();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                if r.kind == "created" {
                    let by = r.user_id.as_deref().unwrap_or_default();
                    if let Err(e) = writer_db.call_started(&r.call_id, &org, by).await {
                        tracing::error!(error = %e, "audit: call start");
                    }
                }
                if r.kind == "ended"
                    && let Err(e) = writer_db.call_ended(&r.call_id).await
                {
                    tracing::error!(error = %e, "audit: call end");
                }
                let epoch = r.epoch.and_then(|e| i64::try_from(e).ok());
                if let Err(e) = writer_db
                    .record_event(
                        &r.call_id,
                        r.kind,
                        r.user_id.as_deref(),
                        r.device_id.as_deref(),
                        epoch,
                    )
                    .await
                {
                    tracing::error!(error = %e, "audit: event");
                }
            }
        });
        let hub = hub::Hub::new(server, config, sfu, metrics.clone()).with_audit(tx);
        let dummy_hash = auth::hash_password("conclave-dummy-password")
            .map_err(|_| db::DbError::NotFound("argon2"))?;
        Ok(Self {
            hub,
            tokens: auth::Tokens::new(token_secret, token_ttl),
            metrics,
            db,
            org_id: org_id.into(),
            default_group: default_group.into(),
            dummy_hash: dummy_hash.into(),
        })
    }
}

const STATUS_PAGE: &str = include_str!("status.html");

/// The HTTP application without the web app: a status page at `/`, health,
/// metrics, the API and the WebSocket.
pub fn router(state: AppState) -> Router {
    router_with_web(state, None)
}

/// The content security policy of the web app: its own scripts, styles and
/// worker only; connections to this origin (API, WebSocket); media from
/// in-page streams. Nothing from anywhere else.
const WEB_CSP: &str = "default-src 'self'; script-src 'self'; worker-src 'self'; \
    style-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; \
    connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The HTTP application. With `web_dir` (the built web app,
/// `client-sdk/web/dist/app`), `/` serves the app and its files; without it,
/// `/` is a status page.
pub fn router_with_web(state: AppState, web_dir: Option<&std::path::Path>) -> Router {
    use axum::http::{HeaderName, HeaderValue, header};
    use tower_http::services::{ServeDir, ServeFile};
    use tower_http::set_header::SetResponseHeaderLayer;

    let base = match web_dir {
        Some(dir) => Router::new()
            .route_service("/", ServeFile::new(dir.join("index.html")))
            .fallback_service(ServeDir::new(dir))
            .layer(SetResponseHeaderLayer::overriding(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(WEB_CSP),
            ))
            .layer(SetResponseHeaderLayer::overriding(
                HeaderName::from_static("x-content-type-options"),
                HeaderValue::from_static("nosniff"),
            ))
            .layer(SetResponseHeaderLayer::overriding(
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache"),
            )),
        None => Router::new().route("/", get(|| async { Html(STATUS_PAGE) })),
    };
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.metrics.render() }),
        )
        .route("/ws", get(ws::upgrade))
        .route("/api/login", post(api::login))
        .route("/api/token", post(api::machine_token))
        .route("/api/invitations", post(api::invite))
        .route("/api/guest", post(api::guest))
        .route("/admin/openapi.json", get(api::openapi))
        .route("/admin/users", get(api::list_users).post(api::create_user))
        .route(
            "/admin/users/{id}",
            get(api::get_user)
                .patch(api::update_user)
                .delete(api::delete_user),
        )
        .route("/admin/users/{id}/reset", post(api::reset_user))
        .route("/admin/users/{id}/remove", post(api::remove_user))
        .route("/admin/users/{id}/api-keys", post(api::create_api_key))
        .route(
            "/admin/groups",
            get(api::list_groups).post(api::create_group),
        )
        .route("/admin/groups/{id}/policy", put(api::set_policy))
        .route(
            "/admin/retention",
            get(api::get_retention).put(api::set_retention),
        )
        .route("/admin/calls", get(api::list_calls))
        .route("/admin/calls/{id}/events", get(api::call_events))
        .with_state(state)
        .merge(base)
}
