//! A real server on 127.0.0.1 and real WebSocket clients that run the MLS
//! agent from the client SDK, reacting to the server as a client would.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The allocator the `conclave` binary uses, for the server and the
/// in-process clients alike.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use conclave_client::{AgentConfig, AgentEvent, Identity, MlsAgent, Principal};
use conclave_protocol::mls::decode_signing_identity;
use conclave_protocol::signal::{
    Bytes, ClientEnvelope, ClientMessage, ErrorCode, RosterMember, ServerEnvelope, ServerMessage,
    apply_roster_update,
};
use conclave_signaling::auth::TokenKind;
use conclave_signaling::sfu::NoSfu;
use conclave_signaling::{AppState, CallConfig, router};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub state: AppState,
    pub db_url: String,
    pub password_hash: String,
}

/// A fresh SQLite database file for one test.
pub fn temp_db_url() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "conclave-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}/conclave.db?mode=rwc", dir.display())
}

pub const SECRET: &[u8] = b"test secret test secret test sec";

pub async fn start(config: CallConfig) -> TestServer {
    start_with(config, &temp_db_url()).await
}

pub async fn start_with(config: CallConfig, db_url: &str) -> TestServer {
    start_full(config, db_url, Arc::new(NoSfu)).await
}

/// A server with a real SFU on 127.0.0.1, its events wired to the hub.
pub async fn start_with_sfu(config: CallConfig) -> (TestServer, Arc<conclave_sfu::Sfu>) {
    let (sfu, events) = conclave_sfu::Sfu::start(
        conclave_sfu::SfuConfig {
            workers: 1,
            ..conclave_sfu::SfuConfig::loopback()
        },
        conclave_sfu::SfuMetrics::unregistered(),
    )
    .unwrap();
    let sfu = Arc::new(sfu);
    let server = start_full(config, &temp_db_url(), sfu.clone()).await;
    server.state.hub.attach_sfu_events(events);
    (server, sfu)
}

pub async fn start_full(
    config: CallConfig,
    db_url: &str,
    sfu: Arc<dyn conclave_signaling::sfu::SfuControl>,
) -> TestServer {
    let server = Identity::generate(Principal::server("test-server").unwrap()).unwrap();
    let state = AppState::open(
        db_url,
        server,
        config,
        sfu,
        SECRET,
        Duration::from_secs(600),
    )
    .await
    .unwrap();
    let password_hash = conclave_signaling::auth::hash_password("correct horse battery").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(state.clone());
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    TestServer {
        addr,
        state,
        db_url: db_url.to_owned(),
        password_hash,
    }
}

impl TestServer {
    /// Creates `username` (password "correct horse battery") if missing; returns its id.
    pub async fn user(&self, username: &str) -> String {
        if let Some(u) = self.state.db.user_by_username(username).await.unwrap() {
            return u.id;
        }
        self.state
            .db
            .create_user(
                &self.state.org_id,
                username,
                username,
                &self.password_hash,
                &self.state.default_group,
                false,
            )
            .await
            .unwrap()
            .id
    }

    /// A session token for `username` (created if missing).
    pub async fn token(&self, username: &str) -> String {
        let id = self.user(username).await;
        let u = self.state.db.user(&id).await.unwrap().unwrap();
        self.state
            .tokens
            .issue_versioned(&u.id, TokenKind::User, None, u.token_version)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// What a client has seen, for the test to assert on.
#[derive(Debug, Default, Clone)]
pub struct Status {
    pub joined: bool,
    pub epoch: Option<u64>,
    pub ready_epoch: Option<u64>,
    pub epoch_changed_at: Option<Instant>,
    pub commits_seen: u64,
    pub commits_sent: u64,
    pub roster_len: usize,
    pub removed: bool,
    pub errors: Vec<(ErrorCode, String)>,
    pub epoch_code: Option<String>,
    pub closed: bool,
    pub media_answers: Vec<(Option<u64>, String, u32, u32)>,
    pub media_closed: Vec<String>,
    pub key_packages_stored: Option<u32>,
    pub roster_recorders: usize,
    /// The roster as this client holds it (from `roster` and `roster_update`s);
    /// shared, so that polling a 500-member call's statuses stays cheap.
    pub roster: Arc<Vec<RosterMember>>,
    /// Each `roster_update`: (entries changed, entries gone).
    pub roster_updates: Vec<(usize, usize)>,
    /// Tests set this to keep the client from acking epochs (a slow member).
    pub hold_acks: bool,
}

pub enum Cmd {
    Leave,
    Raw(String),
    Close,
}

pub struct ClientHandle {
    pub user: String,
    pub status: Arc<Mutex<Status>>,
    pub cmd: mpsc::UnboundedSender<Cmd>,
}

impl ClientHandle {
    pub fn status(&self) -> Status {
        self.status.lock().unwrap().clone()
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn connect(server: &TestServer, token: &str) -> Result<(Ws, Vec<u8>), String> {
    let url = format!("ws://{}/ws?token={}", server.addr, token);
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| e.to_string())?;
    let first = ws.next().await.unwrap().unwrap();
    let env = ServerEnvelope::decode(first.to_text().unwrap()).unwrap();
    let ServerMessage::Ready {
        external_sender, ..
    } = env.msg
    else {
        panic!("expected ready, got {:?}", env.msg)
    };
    Ok((ws, external_sender.0))
}

/// Connects as `user`, joins `call`, and keeps reacting in a task.
pub async fn spawn_member(server: &TestServer, user: &str, call: &str) -> ClientHandle {
    let token = server.token(user).await;
    let user_id = server.user(user).await;
    spawn_with_token(server, &token, &user_id, call).await
}

/// Connects with `token` (whose subject is `user_id`), joins `call`, reacts in a task.
pub async fn spawn_with_token(
    server: &TestServer,
    token: &str,
    user_id: &str,
    call: &str,
) -> ClientHandle {
    let user = user_id;
    let (mut ws, external_sender) = connect(server, token).await.unwrap();
    let identity = Identity::generate(Principal::member(user, "dev1").unwrap()).unwrap();
    let agent = MlsAgent::new(identity, AgentConfig::default());
    let kp = agent.key_package().unwrap();
    ws.send(Message::Text(
        ClientEnvelope::encode(
            Some(1),
            ClientMessage::JoinCall {
                call_id: call.into(),
                device_id: "dev1".into(),
                key_package: Bytes(kp),
            },
        )
        .into(),
    ))
    .await
    .unwrap();
    launch(ws, agent, external_sender, call, user)
}

/// A retention recorder: connects with `token`, uploads `count` key
/// packages for `device`, and then behaves as a member of whatever call the
/// server adds it to (`call` names the call the test expects).
pub async fn spawn_recorder(
    server: &TestServer,
    token: &str,
    user_id: &str,
    device: &str,
    count: usize,
    call: &str,
) -> ClientHandle {
    let (mut ws, external_sender) = connect(server, token).await.unwrap();
    let identity = Identity::generate(Principal::member(user_id, device).unwrap()).unwrap();
    let agent = MlsAgent::new(identity, AgentConfig::default());
    let key_packages = (0..count)
        .map(|_| Bytes(agent.key_package().unwrap()))
        .collect();
    ws.send(Message::Text(
        ClientEnvelope::encode(
            Some(1),
            ClientMessage::UploadKeyPackages {
                device_id: device.into(),
                key_packages,
            },
        )
        .into(),
    ))
    .await
    .unwrap();
    launch(ws, agent, external_sender, call, user_id)
}

/// Runs a connected client's reaction loop in a task; returns its handle.
fn launch(
    ws: Ws,
    agent: MlsAgent,
    external_sender: Vec<u8>,
    call: &str,
    user: &str,
) -> ClientHandle {
    let status = Arc::new(Mutex::new(Status::default()));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(
        ws,
        agent,
        external_sender,
        call.to_owned(),
        status.clone(),
        rx,
    ));
    ClientHandle {
        user: user.into(),
        status,
        cmd: tx,
    }
}

fn text(msg: ClientMessage) -> Message {
    Message::Text(ClientEnvelope::encode(None, msg).into())
}

async fn run(
    mut ws: Ws,
    mut agent: MlsAgent,
    external_sender: Vec<u8>,
    call: String,
    status: Arc<Mutex<Status>>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let server_id = decode_signing_identity(&external_sender).unwrap();
    loop {
        let frame = tokio::select! {
            c = cmds.recv() => {
                match c {
                    Some(Cmd::Leave) => { let _ = ws.send(text(ClientMessage::LeaveCall { call_id: call.clone() })).await; }
                    Some(Cmd::Raw(t)) => { let _ = ws.send(Message::Text(t.into())).await; }
                    Some(Cmd::Close) | None => { let _ = ws.close(None).await; status.lock().unwrap().closed = true; return; }
                }
                continue;
            }
            f = ws.next() => f,
        };
        let Some(Ok(frame)) = frame else {
            status.lock().unwrap().closed = true;
            return;
        };
        let env = match frame {
            Message::Text(t) => ServerEnvelope::decode(t.as_str()).unwrap(),
            Message::Binary(b) => ServerEnvelope::decode_binary(&b).unwrap(),
            _ => continue,
        };
        let now = Instant::now();
        let mut reply = Vec::new();
        match env.msg {
            ServerMessage::Joined { .. } => status.lock().unwrap().joined = true,
            ServerMessage::CreateGroup { group_id, .. } => {
                agent.create_group(&group_id.0, &server_id, now).unwrap();
                reply.push(ClientMessage::GroupCreated {
                    call_id: call.clone(),
                    group_info: Bytes(agent.group_info().unwrap()),
                });
                let mut s = status.lock().unwrap();
                s.epoch = agent.epoch();
                s.ready_epoch = agent.epoch();
            }
            ServerMessage::Proposal { message, .. } => {
                if let Err(e) = agent.handle(&message.0, now) {
                    client_error(&status, format!("proposal: {e}"));
                }
            }
            ServerMessage::CommitRequest { epoch, heal, .. } => {
                if agent.epoch() == Some(epoch) {
                    agent.discard_pending_commit();
                    let built = if heal {
                        agent.commit_heal()
                    } else {
                        agent.commit_pending()
                    };
                    match built {
                        Ok(Some(b)) => {
                            reply.push(ClientMessage::Commit {
                                call_id: call.clone(),
                                epoch: b.epoch,
                                commit: Bytes(b.commit),
                                welcome: b.welcome.map(Bytes),
                            });
                            status.lock().unwrap().commits_sent += 1;
                        }
                        Ok(None) => {}
                        Err(e) => client_error(&status, format!("commit: {e}")),
                    }
                }
            }
            ServerMessage::Commit { message, .. } => match agent.handle(&message.0, now) {
                Ok(ev) if ev.contains(&AgentEvent::Removed) => {
                    let mut s = status.lock().unwrap();
                    s.commits_seen += 1;
                    s.removed = true;
                    s.epoch = None;
                }
                Ok(_) => {
                    status.lock().unwrap().commits_seen += 1;
                    reply.push(entered_epoch(&agent, &status, &call));
                }
                Err(e) => client_error(&status, format!("commit: {e}")),
            },
            ServerMessage::Welcome { message, .. } => match agent.join(&message.0, now) {
                Ok(_) => reply.push(entered_epoch(&agent, &status, &call)),
                Err(e) => client_error(&status, format!("welcome: {e}")),
            },
            ServerMessage::EpochReady { epoch, .. } => {
                let _ = agent.switch_sending(epoch);
                status.lock().unwrap().ready_epoch = Some(epoch);
            }
            ServerMessage::Roster { members, .. } => {
                let mut s = status.lock().unwrap();
                s.roster = Arc::new(members);
                s.roster_len = s.roster.len();
                s.roster_recorders = s.roster.iter().filter(|m| m.recorder).count();
            }
            ServerMessage::RosterUpdate { changed, gone, .. } => {
                let mut s = status.lock().unwrap();
                s.roster_updates.push((changed.len(), gone.len()));
                apply_roster_update(Arc::make_mut(&mut s.roster), changed, &gone);
                s.roster_len = s.roster.len();
                s.roster_recorders = s.roster.iter().filter(|m| m.recorder).count();
            }
            ServerMessage::KeyPackagesStored { stored, .. } => {
                status.lock().unwrap().key_packages_stored = Some(stored);
            }
            ServerMessage::Removed { .. } => status.lock().unwrap().removed = true,
            ServerMessage::Error { code, message } => {
                if code == ErrorCode::StaleEpoch || code == ErrorCode::NotCommitter {
                    agent.discard_pending_commit();
                }
                status.lock().unwrap().errors.push((code, message));
            }
            ServerMessage::MediaAnswer {
                sdp,
                audio_slots,
                video_slots,
                ..
            } => status
                .lock()
                .unwrap()
                .media_answers
                .push((env.id, sdp, audio_slots, video_slots)),
            ServerMessage::MediaClosed { reason, .. } => {
                status.lock().unwrap().media_closed.push(reason)
            }
            ServerMessage::Ready { .. }
            | ServerMessage::Pong
            | ServerMessage::ActiveSpeaker { .. } => {}
        }
        let hold_acks = status.lock().unwrap().hold_acks;
        for r in reply {
            if hold_acks && matches!(r, ClientMessage::EpochAck { .. }) {
                continue;
            }
            if ws.send(text(r)).await.is_err() {
                return;
            }
        }
    }
}

/// Reads a Rust SDK session's events until `pred` holds (30 s at most);
/// an error event fails the test.
pub async fn until(
    call: &mut conclave_client::session::CallSession,
    mut pred: impl FnMut(&conclave_client::session::CallEvent) -> bool,
) -> conclave_client::session::CallEvent {
    use conclave_client::session::CallEvent;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let e = call.next_event().await.expect("session ended");
            assert!(!matches!(e, CallEvent::Error { .. }), "{e:?}");
            if pred(&e) {
                return e;
            }
        }
    })
    .await
    .expect("timed out")
}

/// Polls until `pred` holds or `limit` passes.
pub async fn wait_for(limit: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if pred() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pred()
}

/// A local MLS failure, recorded so tests see it (never a panic).
fn client_error(status: &Mutex<Status>, what: String) {
    status
        .lock()
        .unwrap()
        .errors
        .push((ErrorCode::InvalidMls, format!("client: {what}")));
}

/// Records the agent's new epoch and returns the ack for it.
fn entered_epoch(agent: &MlsAgent, status: &Mutex<Status>, call: &str) -> ClientMessage {
    let mut s = status.lock().unwrap();
    s.epoch = agent.epoch();
    s.epoch_changed_at = Some(Instant::now());
    s.epoch_code = agent.epoch_code().ok();
    ClientMessage::EpochAck {
        call_id: call.to_owned(),
        epoch: agent.epoch().unwrap_or_default(),
    }
}
