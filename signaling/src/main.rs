//! `conclave`: the all-in-one server.
//!
//! Settings come from, in increasing priority: built-in defaults, a TOML
//! file (`--config`), `CONCLAVE_*` environment variables, and flags.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use conclave_protocol::mls::{Identity, Principal};
use conclave_sfu::{Sfu, SfuConfig, SfuMetrics};
use conclave_signaling::sfu::{NoSfu, SfuControl};
use conclave_signaling::{AppState, CallConfig, auth, router_with_web};
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// Conclave server: end-to-end encrypted calls.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "CONCLAVE_CONFIG")]
    config: Option<PathBuf>,
    /// Address for HTTP (web app, API, WebSocket) [default: 127.0.0.1:8080].
    #[arg(long, env = "CONCLAVE_HTTP")]
    http: Option<SocketAddr>,
    /// Directory for the database and the token key [default: ./data].
    #[arg(long, env = "CONCLAVE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL (sqlite://... or postgres://...) [default: SQLite in the data directory].
    #[arg(long, env = "CONCLAVE_DATABASE_URL")]
    database_url: Option<String>,
    /// Name of this deployment (the MLS external sender's credential) [default: conclave].
    #[arg(long, env = "CONCLAVE_NAME")]
    name: Option<String>,
    /// Joins are batched for this long (ms) into one commit, per started 50
    /// members of the call [default: 200].
    #[arg(long, env = "CONCLAVE_BATCH_MS")]
    batch_ms: Option<u64>,
    /// The longest (ms) a large call batches joins [default: 2000].
    #[arg(long, env = "CONCLAVE_MAX_BATCH_MS")]
    max_batch_ms: Option<u64>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "CONCLAVE_LOG_JSON")]
    log_json: bool,
    /// UDP address of the embedded SFU [default: the HTTP IP, port 7882].
    #[arg(long, env = "CONCLAVE_SFU_BIND")]
    sfu_bind: Option<SocketAddr>,
    /// IP the SFU advertises to clients, when behind 1:1 NAT [default: the bind IP,
    /// or 127.0.0.1 if that is unspecified].
    #[arg(long, env = "CONCLAVE_SFU_ADVERTISED_IP")]
    sfu_advertised_ip: Option<IpAddr>,
    /// SFU worker threads [default: one per CPU].
    #[arg(long, env = "CONCLAVE_SFU_WORKERS")]
    sfu_workers: Option<usize>,
    /// Send a video frame's packets to a subscriber as one UDP GSO send
    /// where the kernel allows it [default: true].
    #[arg(long, env = "CONCLAVE_SFU_GSO")]
    sfu_gso: Option<bool>,
    /// Run signaling only, without the embedded SFU.
    #[arg(long, env = "CONCLAVE_NO_SFU")]
    no_sfu: bool,
    /// Directory of the built web app, served at `/` [default:
    /// client-sdk/web/dist/app of this source tree, if built].
    #[arg(long, env = "CONCLAVE_WEB_DIR")]
    web_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    http: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    name: Option<String>,
    batch_ms: Option<u64>,
    max_batch_ms: Option<u64>,
    log_json: Option<bool>,
    sfu_bind: Option<SocketAddr>,
    sfu_advertised_ip: Option<IpAddr>,
    sfu_workers: Option<usize>,
    sfu_gso: Option<bool>,
    no_sfu: Option<bool>,
    web_dir: Option<PathBuf>,
}

/// Reads the token-signing key from the data directory, creating it on first run.
fn token_key(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = dir.join("token.key");
    if let Ok(k) = std::fs::read(&path) {
        anyhow::ensure!(k.len() >= 32, "{} is too short", path.display());
        return Ok(k);
    }
    let mut k = vec![0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), k.as_mut_slice());
    std::fs::write(&path, &k).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(k)
}

/// mimalloc: MLS group state is cloned (tree and all) for every commit, and
/// glibc's malloc spent about half of a 500-member rekey's CPU on it.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let file: FileConfig = match &args.config {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => FileConfig::default(),
    };
    let log_json = args.log_json || file.log_json.unwrap_or(false);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let http = args
        .http
        .or(file.http)
        .unwrap_or(([127, 0, 0, 1], 8080).into());
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("data"));
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let database_url = args.database_url.or(file.database_url).unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            data_dir.join("conclave.db").display()
        )
    });
    let name = args.name.or(file.name).unwrap_or_else(|| "conclave".into());
    let batch_ms = args.batch_ms.or(file.batch_ms).unwrap_or(200);
    let max_batch_ms = args.max_batch_ms.or(file.max_batch_ms).unwrap_or(2000);

    let server = Identity::generate(Principal::server(&name)?)?;
    let config = CallConfig {
        batch_window: Duration::from_millis(batch_ms),
        max_batch_window: Duration::from_millis(max_batch_ms),
        ..CallConfig::default()
    };
    // The media plane, in-process.
    let sfu_registry = prometheus::Registry::new();
    let (sfu, sfu_events) = if args.no_sfu || file.no_sfu.unwrap_or(false) {
        (None, None)
    } else {
        let defaults = SfuConfig::default();
        let bind = args
            .sfu_bind
            .or(file.sfu_bind)
            .unwrap_or_else(|| SocketAddr::new(http.ip(), defaults.bind.port()));
        let config = SfuConfig {
            bind,
            advertised_ip: args.sfu_advertised_ip.or(file.sfu_advertised_ip),
            workers: args
                .sfu_workers
                .or(file.sfu_workers)
                .unwrap_or(defaults.workers),
            udp_gso: args.sfu_gso.or(file.sfu_gso).unwrap_or(defaults.udp_gso),
            ..defaults
        };
        let metrics = SfuMetrics::new(&sfu_registry).context("SFU metrics")?;
        let (sfu, events) = Sfu::start(config, metrics).context("starting the SFU")?;
        (Some(Arc::new(sfu)), Some(events))
    };
    let control: Arc<dyn SfuControl> = match &sfu {
        Some(s) => s.clone(),
        None => Arc::new(NoSfu),
    };
    let state = AppState::open(
        &database_url,
        server,
        config,
        control,
        &token_key(&data_dir)?,
        Duration::from_secs(15 * 60),
    )
    .await
    .context("opening the database")?;

    if state.db.admin_count().await? == 0 {
        let (password, generated) = match std::env::var("CONCLAVE_ADMIN_PASSWORD") {
            Ok(p) if p.chars().count() >= 8 => (p, false),
            _ => {
                let mut b = [0u8; 12];
                rand::Rng::fill(&mut rand::thread_rng(), &mut b);
                (
                    b.iter().map(|x| format!("{x:02x}")).collect::<String>(),
                    true,
                )
            }
        };
        let hash = auth::hash_password(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
        state
            .db
            .create_user(
                &state.org_id,
                "admin",
                "Administrator",
                &hash,
                &state.default_group,
                true,
            )
            .await?;
        if generated {
            #[allow(clippy::print_stdout)]
            {
                println!("First run: created user 'admin' with one-time password {password}");
                println!("Sign in and reset it (POST /admin/users/{{id}}/reset).");
            }
        } else {
            tracing::info!(
                "first run: created user 'admin' with the password from CONCLAVE_ADMIN_PASSWORD"
            );
        }
    }

    state.metrics.also_render(sfu_registry);
    if let Some(events) = sfu_events {
        state.hub.attach_sfu_events(events);
    }

    // The web app: an explicit directory must hold it; the default is used if built.
    let web_dir = match args.web_dir.or(file.web_dir) {
        Some(dir) => {
            anyhow::ensure!(
                dir.join("index.html").is_file(),
                "{} has no index.html (build the web app: cd client-sdk/web && npm ci && npm run build)",
                dir.display()
            );
            Some(dir)
        }
        None => {
            let dir = PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../client-sdk/web/dist/app"
            ));
            if dir.join("index.html").is_file() {
                Some(dir)
            } else {
                tracing::warn!(
                    "the web app is not built (cd client-sdk/web && npm ci && npm run build); / shows a status page"
                );
                None
            }
        }
    };

    let listener = tokio::net::TcpListener::bind(http)
        .await
        .with_context(|| format!("binding {http}"))?;
    tracing::info!(addr = %http, db = %redact(&database_url), "conclave listening; open http://{http}/");
    axum::serve(listener, router_with_web(state, web_dir.as_deref()))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving HTTP")?;
    if let Some(sfu) = sfu {
        sfu.shutdown();
    }
    Ok(())
}

/// Hides a password in a database URL for logging.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}
