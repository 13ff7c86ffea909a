//! A call over the network: one WebSocket to the signaling server, the MLS
//! agent run for you, and frame crypto ready for your media.
//!
//! ```no_run
//! # async fn demo() -> Result<(), conclave_client::session::SessionError> {
//! use conclave_client::session::{CallEvent, CallSession, JoinOptions};
//! use conclave_protocol::sframe::Codec;
//!
//! let token = "<JWT from /api/login or /api/token>";
//! let mut call = CallSession::join(JoinOptions::new("ws://127.0.0.1:8080/ws", token, "standup", "bot-1")).await?;
//! while let Some(event) = call.next_event().await {
//!     if let CallEvent::EpochReady { epoch } = event {
//!         println!("keys ready in epoch {epoch}; code {}", call.epoch_code()?);
//!         let mut out = vec![0u8; 256];
//!         let n = call.encrypt(conclave_client::stream::AUDIO, Codec::Opus, b"opus frame", &mut out)?;
//!         // ... hand out[..n] to the media transport ...
//! #       let _ = n;
//!     }
//! }
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use conclave_protocol::mls::{Identity, Principal, decode_signing_identity};
use conclave_protocol::sframe::{Codec, DecryptedFrame, SframeError};
use conclave_protocol::signal::{
    Bytes, ClientEnvelope, ClientMessage, ErrorCode, RemovalReason, RosterMember, ServerEnvelope,
    ServerMessage,
};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::agent::{AgentConfig, AgentEvent, MlsAgent};
use crate::error::AgentError;

/// Why a call session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The WebSocket could not be opened or broke.
    #[error("connection: {0}")]
    Connection(String),
    /// The server sent something that is not protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server refused a request.
    #[error("server refused ({code:?}): {message}")]
    Refused {
        /// Error code.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
    /// The MLS agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Frame protection failed.
    #[error(transparent)]
    Sframe(#[from] SframeError),
    /// The session has ended.
    #[error("the session has ended")]
    Closed,
}

/// What happened in the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallEvent {
    /// In the group at `epoch`; frames can be sent.
    Joined {
        /// Epoch joined.
        epoch: u64,
    },
    /// A commit moved the group; receive keys for `epoch` are installed.
    EpochChanged {
        /// New epoch.
        epoch: u64,
    },
    /// Everyone holds `epoch`; sending now uses it. Send a key frame.
    EpochReady {
        /// Epoch now sent in.
        epoch: u64,
    },
    /// The roster changed.
    Roster(Vec<RosterMember>),
    /// No longer in the call.
    Removed(RemovalReason),
    /// The server refused something, or a local MLS step failed.
    Error {
        /// Code (`invalid_mls` for local MLS failures).
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
}

/// How to join.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    /// `ws://host:port/ws`.
    pub url: String,
    /// Session token.
    pub token: String,
    /// Call to join.
    pub call_id: String,
    /// This device's id.
    pub device_id: String,
    /// Agent settings.
    pub agent: AgentConfig,
}

impl JoinOptions {
    /// Options with default agent settings.
    pub fn new(url: &str, token: &str, call_id: &str, device_id: &str) -> Self {
        Self {
            url: url.to_owned(),
            token: token.to_owned(),
            call_id: call_id.to_owned(),
            device_id: device_id.to_owned(),
            agent: AgentConfig::default(),
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One device in one call.
#[derive(Debug)]
pub struct CallSession {
    agent: Arc<Mutex<MlsAgent>>,
    events: mpsc::UnboundedReceiver<CallEvent>,
    outgoing: mpsc::UnboundedSender<ClientMessage>,
    call_id: String,
    user_id: String,
}

fn lock(agent: &Mutex<MlsAgent>) -> MutexGuard<'_, MlsAgent> {
    agent.lock().unwrap_or_else(|p| p.into_inner())
}

async fn send(ws: &mut Ws, msg: ClientMessage) -> Result<(), SessionError> {
    ws.send(Message::Text(ClientEnvelope::encode(None, msg).into()))
        .await
        .map_err(|e| SessionError::Connection(e.to_string()))
}

impl CallSession {
    /// Connects, authenticates and joins. Returns once the server accepted
    /// the join; MLS then runs in the background and reports through
    /// [`CallSession::next_event`].
    pub async fn join(opts: JoinOptions) -> Result<Self, SessionError> {
        let url = format!("{}?token={}", opts.url, opts.token);
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| SessionError::Connection(e.to_string()))?;
        let ready = next_server_message(&mut ws).await?;
        let ServerMessage::Ready {
            user_id,
            external_sender,
        } = ready
        else {
            return Err(SessionError::Protocol("expected `ready`".into()));
        };
        let server = decode_signing_identity(&external_sender.0).map_err(AgentError::from)?;
        let principal = Principal::member(&user_id, &opts.device_id).map_err(AgentError::from)?;
        let agent = MlsAgent::new(
            Identity::generate(principal).map_err(AgentError::from)?,
            opts.agent,
        );
        send(
            &mut ws,
            ClientMessage::JoinCall {
                call_id: opts.call_id.clone(),
                device_id: opts.device_id.clone(),
                key_package: Bytes(agent.key_package()?),
            },
        )
        .await?;
        match next_server_message(&mut ws).await? {
            ServerMessage::Joined { .. } => {}
            ServerMessage::Error { code, message } => {
                return Err(SessionError::Refused { code, message });
            }
            other => {
                return Err(SessionError::Protocol(format!(
                    "expected `joined`, got {other:?}"
                )));
            }
        }
        let agent = Arc::new(Mutex::new(agent));
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        tokio::spawn(run(
            ws,
            agent.clone(),
            server,
            opts.call_id.clone(),
            ev_tx,
            out_rx,
        ));
        Ok(Self {
            agent,
            events: ev_rx,
            outgoing: out_tx,
            call_id: opts.call_id,
            user_id,
        })
    }

    /// The next event; `None` once the session has ended.
    pub async fn next_event(&mut self) -> Option<CallEvent> {
        self.events.recv().await
    }

    /// The authenticated user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The current MLS epoch.
    pub fn epoch(&self) -> Option<u64> {
        lock(&self.agent).epoch()
    }

    /// The call's epoch code, for out-of-band comparison.
    pub fn epoch_code(&self) -> Result<String, SessionError> {
        Ok(lock(&self.agent).epoch_code()?)
    }

    /// The safety number with the member at `leaf`.
    pub fn safety_number_with(&self, leaf: u32) -> Result<String, SessionError> {
        Ok(lock(&self.agent).safety_number_with(leaf)?)
    }

    /// This member's MLS leaf index.
    pub fn leaf_index(&self) -> Option<u32> {
        lock(&self.agent).leaf_index()
    }

    /// Protects one outbound frame of stream `context` (see [`crate::stream`]).
    pub fn encrypt(
        &self,
        context: u64,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        Ok(lock(&self.agent)
            .crypto()
            .encrypt(context, codec, frame, out)?)
    }

    /// Authenticates and decrypts a received frame.
    pub fn decrypt(
        &self,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<DecryptedFrame, SessionError> {
        Ok(lock(&self.agent).crypto().decrypt(codec, frame, out)?)
    }

    /// Announces mute state.
    pub fn set_mute(&self, audio: bool, video: bool) -> Result<(), SessionError> {
        self.outgoing
            .send(ClientMessage::SetMute {
                call_id: self.call_id.clone(),
                audio,
                video,
            })
            .map_err(|_| SessionError::Closed)
    }

    /// Leaves the call (a `Removed(Left)` event follows).
    pub fn leave(&self) -> Result<(), SessionError> {
        self.outgoing
            .send(ClientMessage::LeaveCall {
                call_id: self.call_id.clone(),
            })
            .map_err(|_| SessionError::Closed)
    }
}

async fn next_server_message(ws: &mut Ws) -> Result<ServerMessage, SessionError> {
    loop {
        let frame = ws
            .next()
            .await
            .ok_or(SessionError::Closed)?
            .map_err(|e| SessionError::Connection(e.to_string()))?;
        match frame {
            Message::Text(t) => {
                return ServerEnvelope::decode(t.as_str())
                    .map(|e| e.msg)
                    .map_err(|e| SessionError::Protocol(e.to_string()));
            }
            Message::Close(_) => return Err(SessionError::Closed),
            _ => {}
        }
    }
}

/// Reacts to the server for the lifetime of the session.
async fn run(
    mut ws: Ws,
    agent: Arc<Mutex<MlsAgent>>,
    server: mls_rs::identity::SigningIdentity,
    call_id: String,
    events: mpsc::UnboundedSender<CallEvent>,
    mut outgoing: mpsc::UnboundedReceiver<ClientMessage>,
) {
    let emit = |e: CallEvent| {
        let _ = events.send(e);
    };
    loop {
        let msg = tokio::select! {
            out = outgoing.recv() => {
                match out {
                    Some(m) => { if send(&mut ws, m).await.is_err() { return; } }
                    None => { let _ = ws.close(None).await; return; }
                }
                continue;
            }
            m = next_server_message(&mut ws) => m,
        };
        let Ok(msg) = msg else { return };
        let now = Instant::now();
        let (replies, evs) = react(&mut lock(&agent), &server, &call_id, msg, now);
        for e in evs {
            emit(e);
        }
        for r in replies {
            if send(&mut ws, r).await.is_err() {
                return;
            }
        }
    }
}

fn mls_failure(what: &str, e: &AgentError) -> CallEvent {
    CallEvent::Error {
        code: ErrorCode::InvalidMls,
        message: format!("{what}: {e}"),
    }
}

/// One server message in, replies and events out.
fn react(
    agent: &mut MlsAgent,
    server: &mls_rs::identity::SigningIdentity,
    call_id: &str,
    msg: ServerMessage,
    now: Instant,
) -> (Vec<ClientMessage>, Vec<CallEvent>) {
    let call = || call_id.to_owned();
    let ack = |agent: &MlsAgent| ClientMessage::EpochAck {
        call_id: call(),
        epoch: agent.epoch().unwrap_or_default(),
    };
    match msg {
        ServerMessage::CreateGroup { group_id, .. } => match agent
            .create_group(&group_id.0, server, now)
            .and_then(|_| agent.group_info())
        {
            Ok(info) => (
                vec![ClientMessage::GroupCreated {
                    call_id: call(),
                    group_info: Bytes(info),
                }],
                vec![
                    CallEvent::Joined { epoch: 0 },
                    CallEvent::EpochReady { epoch: 0 },
                ],
            ),
            Err(e) => (Vec::new(), vec![mls_failure("creating the group", &e)]),
        },
        ServerMessage::Proposal { message, .. } => match agent.handle(&message.0, now) {
            Ok(_) => (Vec::new(), Vec::new()),
            Err(e) => (Vec::new(), vec![mls_failure("proposal", &e)]),
        },
        ServerMessage::CommitRequest { epoch, .. } if agent.epoch() == Some(epoch) => {
            agent.discard_pending_commit();
            match agent.commit_pending() {
                Ok(Some(b)) => (
                    vec![ClientMessage::Commit {
                        call_id: call(),
                        epoch: b.epoch,
                        commit: Bytes(b.commit),
                        welcome: b.welcome.map(Bytes),
                    }],
                    Vec::new(),
                ),
                Ok(None) => (Vec::new(), Vec::new()),
                Err(e) => (Vec::new(), vec![mls_failure("commit", &e)]),
            }
        }
        ServerMessage::Commit { message, .. } => match agent.handle(&message.0, now) {
            Ok(ev) if ev.contains(&AgentEvent::Removed) => (Vec::new(), Vec::new()),
            Ok(ev) => {
                let epoch = ev.iter().find_map(|e| match e {
                    AgentEvent::EpochChanged { epoch, .. } => Some(*epoch),
                    _ => None,
                });
                (
                    vec![ack(agent)],
                    epoch
                        .map(|epoch| CallEvent::EpochChanged { epoch })
                        .into_iter()
                        .collect(),
                )
            }
            Err(e) => (Vec::new(), vec![mls_failure("commit", &e)]),
        },
        ServerMessage::Welcome { message, .. } => match agent.join(&message.0, now) {
            Ok(_) => {
                let epoch = agent.epoch().unwrap_or_default();
                (vec![ack(agent)], vec![CallEvent::Joined { epoch }])
            }
            Err(e) => (Vec::new(), vec![mls_failure("welcome", &e)]),
        },
        ServerMessage::EpochReady { epoch, .. } => match agent.switch_sending(epoch) {
            Ok(_) => (Vec::new(), vec![CallEvent::EpochReady { epoch }]),
            Err(e) => (Vec::new(), vec![mls_failure("switching keys", &e)]),
        },
        ServerMessage::Roster { members, .. } => (Vec::new(), vec![CallEvent::Roster(members)]),
        ServerMessage::Removed { reason, .. } => (Vec::new(), vec![CallEvent::Removed(reason)]),
        ServerMessage::Error { code, message } => {
            if matches!(code, ErrorCode::StaleEpoch | ErrorCode::NotCommitter) {
                agent.discard_pending_commit();
            }
            (Vec::new(), vec![CallEvent::Error { code, message }])
        }
        _ => (Vec::new(), Vec::new()),
    }
}
