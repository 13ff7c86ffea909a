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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use conclave_protocol::mls::{Identity, Principal, decode_signing_identity};
use conclave_protocol::sframe::{Codec, DecryptedFrame, SframeError};
use conclave_protocol::signal::{
    Bytes, ClientEnvelope, ClientMessage, ErrorCode, MediaSource, MediaSourceMid, RemovalReason,
    RosterMember, ServerEnvelope, ServerMessage, apply_roster_update,
};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
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
    /// Everyone holds `epoch`; sending now uses it (and the session's
    /// media sends a key frame if the epoch added members).
    EpochReady {
        /// Epoch now sent in.
        epoch: u64,
    },
    /// The roster changed.
    Roster(Vec<RosterMember>),
    /// No longer in the call.
    Removed(RemovalReason),
    /// The SFU closed this session's media connection (see
    /// [`crate::media::MediaConnection`]); connect again to resume media.
    MediaClosed {
        /// Why, in words.
        reason: String,
    },
    /// The loudest speaker in the call changed.
    ActiveSpeaker {
        /// Speaker's user id.
        user_id: String,
        /// Speaker's device id.
        device_id: String,
    },
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

/// A message for the server, with the request id to echo (if any).
type Outgoing = (Option<u64>, ClientMessage);

/// One device in one call.
#[derive(Debug)]
pub struct CallSession {
    agent: Arc<Mutex<MlsAgent>>,
    events: mpsc::UnboundedReceiver<CallEvent>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    media: Arc<MediaLink>,
    call_id: String,
    user_id: String,
}

pub(crate) fn lock(agent: &Mutex<MlsAgent>) -> MutexGuard<'_, MlsAgent> {
    agent.lock().unwrap_or_else(|p| p.into_inner())
}

async fn send(ws: &mut Ws, id: Option<u64>, msg: ClientMessage) -> Result<(), SessionError> {
    ws.send(Message::Text(ClientEnvelope::encode(id, msg).into()))
        .await
        .map_err(|e| SessionError::Connection(e.to_string()))
}

/// The SFU's answer to a `media_offer`.
#[derive(Clone, Debug)]
pub(crate) struct MediaAnswer {
    /// SDP answer.
    pub sdp: String,
    /// Audio receive slots granted.
    pub audio_slots: u32,
    /// Video receive slots granted.
    pub video_slots: u32,
}

type AnswerReply = oneshot::Sender<Result<MediaAnswer, SessionError>>;

/// What the session's event loop shares with the media connection: the
/// outstanding offer, the server's `media_closed`, and whether the next
/// video frame should be a key frame.
#[derive(Debug)]
pub(crate) struct MediaLink {
    pending: Mutex<Option<(u64, AnswerReply)>>,
    closed: watch::Sender<Option<String>>,
    key_frame_wanted: AtomicBool,
    next_request: AtomicU64,
}

impl MediaLink {
    fn new() -> Self {
        Self {
            pending: Mutex::new(None),
            closed: watch::Sender::new(None),
            key_frame_wanted: AtomicBool::new(true),
            next_request: AtomicU64::new(1),
        }
    }

    fn pending(&self) -> MutexGuard<'_, Option<(u64, AnswerReply)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the reply to request `id` to whoever waits for it. False if
    /// nobody waits for `id`.
    fn answer(&self, id: Option<u64>, reply: Result<MediaAnswer, SessionError>) -> bool {
        let mut pending = self.pending();
        match pending.take() {
            Some((want, tx)) if Some(want) == id => {
                let _ = tx.send(reply);
                true
            }
            other => {
                *pending = other;
                false
            }
        }
    }

    fn close(&self, reason: &str) {
        self.closed.send_replace(Some(reason.to_owned()));
    }

    /// Why the server closed the media connection, once it has.
    pub(crate) fn closed(&self) -> watch::Receiver<Option<String>> {
        self.closed.subscribe()
    }

    /// Asks for a key frame on the next video frame.
    pub(crate) fn want_key_frame(&self) {
        self.key_frame_wanted.store(true, Ordering::Release);
    }

    /// Whether the next video frame should be a key frame.
    pub(crate) fn key_frame_wanted(&self) -> bool {
        self.key_frame_wanted.load(Ordering::Acquire)
    }

    /// Clears the request; true if one was pending.
    pub(crate) fn take_key_frame_request(&self) -> bool {
        self.key_frame_wanted.swap(false, Ordering::AcqRel)
    }
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
        let ready = next_server_message(&mut ws).await?.msg;
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
            None,
            ClientMessage::JoinCall {
                call_id: opts.call_id.clone(),
                device_id: opts.device_id.clone(),
                key_package: Bytes(agent.key_package()?),
            },
        )
        .await?;
        match next_server_message(&mut ws).await?.msg {
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
        let media = Arc::new(MediaLink::new());
        tokio::spawn(run(
            ws,
            agent.clone(),
            server,
            opts.call_id.clone(),
            ev_tx,
            out_rx,
            media.clone(),
        ));
        Ok(Self {
            agent,
            events: ev_rx,
            outgoing: out_tx,
            media,
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

    /// The call this session is in.
    pub fn call_id(&self) -> &str {
        &self.call_id
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

    fn post(&self, id: Option<u64>, msg: ClientMessage) -> Result<(), SessionError> {
        self.outgoing
            .send((id, msg))
            .map_err(|_| SessionError::Closed)
    }

    /// Announces mute state.
    pub fn set_mute(&self, audio: bool, video: bool) -> Result<(), SessionError> {
        self.post(
            None,
            ClientMessage::SetMute {
                call_id: self.call_id.clone(),
                audio,
                video,
            },
        )
    }

    /// Asks the SFU for at most simulcast layer `max_layer` (0–2) on this
    /// session's video slots. Needs a media connection.
    pub fn set_quality(&self, max_layer: u8) -> Result<(), SessionError> {
        self.post(
            None,
            ClientMessage::SetQuality {
                call_id: self.call_id.clone(),
                max_layer,
            },
        )
    }

    /// Keeps (or stops keeping) a member's source in this session's video slots.
    pub fn pin(
        &self,
        user_id: &str,
        device_id: &str,
        source: MediaSource,
        pinned: bool,
    ) -> Result<(), SessionError> {
        self.post(
            None,
            ClientMessage::Pin {
                call_id: self.call_id.clone(),
                user_id: user_id.to_owned(),
                device_id: device_id.to_owned(),
                source,
                pinned,
            },
        )
    }

    /// Leaves the call (a `Removed(Left)` event follows).
    pub fn leave(&self) -> Result<(), SessionError> {
        self.post(
            None,
            ClientMessage::LeaveCall {
                call_id: self.call_id.clone(),
            },
        )
    }

    pub(crate) fn agent(&self) -> Arc<Mutex<MlsAgent>> {
        self.agent.clone()
    }

    pub(crate) fn media_link(&self) -> Arc<MediaLink> {
        self.media.clone()
    }

    /// Sends a `media_offer`; the receiver gets the SFU's answer or the
    /// server's refusal. A newer offer supersedes an unanswered one.
    pub(crate) fn offer_media(
        &self,
        sdp: String,
        sources: Vec<MediaSourceMid>,
    ) -> Result<oneshot::Receiver<Result<MediaAnswer, SessionError>>, SessionError> {
        let id = self.media.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        *self.media.pending() = Some((id, tx));
        self.media.closed.send_replace(None);
        self.media.want_key_frame();
        self.post(
            Some(id),
            ClientMessage::MediaOffer {
                call_id: self.call_id.clone(),
                sdp,
                sources,
            },
        )?;
        Ok(rx)
    }
}

async fn next_server_message(ws: &mut Ws) -> Result<ServerEnvelope, SessionError> {
    loop {
        let frame = ws
            .next()
            .await
            .ok_or(SessionError::Closed)?
            .map_err(|e| SessionError::Connection(e.to_string()))?;
        match frame {
            Message::Text(t) => {
                return ServerEnvelope::decode(t.as_str())
                    .map_err(|e| SessionError::Protocol(e.to_string()));
            }
            Message::Binary(b) => {
                return ServerEnvelope::decode_binary(&b)
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
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    media: Arc<MediaLink>,
) {
    serve(
        &mut ws,
        &agent,
        &server,
        &call_id,
        &events,
        &mut outgoing,
        &media,
    )
    .await;
    // Whatever waits for an answer gets `Closed`; media ends with the session.
    drop(media.pending().take());
    media.close("the signaling session ended");
}

async fn serve(
    ws: &mut Ws,
    agent: &Mutex<MlsAgent>,
    server: &mls_rs::identity::SigningIdentity,
    call_id: &str,
    events: &mpsc::UnboundedSender<CallEvent>,
    outgoing: &mut mpsc::UnboundedReceiver<Outgoing>,
    media: &MediaLink,
) {
    let emit = |e: CallEvent| {
        let _ = events.send(e);
    };
    // The whole roster, kept from `roster` and the `roster_update`s after it.
    let mut roster: Vec<RosterMember> = Vec::new();
    loop {
        let env = tokio::select! {
            out = outgoing.recv() => {
                match out {
                    Some((id, m)) => { if send(ws, id, m).await.is_err() { return; } }
                    None => { let _ = ws.close(None).await; return; }
                }
                continue;
            }
            m = next_server_message(ws) => m,
        };
        let Ok(env) = env else { return };
        let msg = match env.msg {
            ServerMessage::MediaAnswer {
                sdp,
                audio_slots,
                video_slots,
                ..
            } => {
                let answer = MediaAnswer {
                    sdp,
                    audio_slots,
                    video_slots,
                };
                if !media.answer(env.id, Ok(answer)) {
                    tracing::debug!(id = ?env.id, "media answer nobody waits for");
                }
                continue;
            }
            ServerMessage::Error { code, message }
                if media.answer(
                    env.id,
                    Err(SessionError::Refused {
                        code,
                        message: message.clone(),
                    }),
                ) =>
            {
                tracing::debug!(?code, %message, "media offer refused");
                continue;
            }
            ServerMessage::MediaClosed { reason, .. } => {
                media.close(&reason);
                emit(CallEvent::MediaClosed { reason });
                continue;
            }
            ServerMessage::ActiveSpeaker {
                user_id, device_id, ..
            } => {
                emit(CallEvent::ActiveSpeaker { user_id, device_id });
                continue;
            }
            ServerMessage::Roster { members, .. } => {
                roster = members;
                emit(CallEvent::Roster(roster.clone()));
                continue;
            }
            ServerMessage::RosterUpdate { changed, gone, .. } => {
                apply_roster_update(&mut roster, changed, &gone);
                emit(CallEvent::Roster(roster.clone()));
                continue;
            }
            msg => msg,
        };
        let now = Instant::now();
        let mut key_frame = false;
        let (replies, evs) = react(&mut lock(agent), server, call_id, msg, now, &mut key_frame);
        // Sending keys switched to an epoch that added members: the next
        // video frame must be a key frame.
        if key_frame {
            media.want_key_frame();
        }
        for e in evs {
            if let CallEvent::Removed(_) = &e {
                media.close("removed from the call");
            }
            emit(e);
        }
        for r in replies {
            if send(ws, None, r).await.is_err() {
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

/// One server message in, replies and events out; `key_frame` is set when
/// the outgoing video needs a key frame.
fn react(
    agent: &mut MlsAgent,
    server: &mls_rs::identity::SigningIdentity,
    call_id: &str,
    msg: ServerMessage,
    now: Instant,
    key_frame: &mut bool,
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
        ServerMessage::CommitRequest { epoch, heal, .. } if agent.epoch() == Some(epoch) => {
            agent.discard_pending_commit();
            let built = if heal {
                agent.commit_heal()
            } else {
                agent.commit_pending()
            };
            match built {
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
            Ok(ev) => {
                *key_frame = ev.contains(&AgentEvent::KeyFrameRequested);
                (Vec::new(), vec![CallEvent::EpochReady { epoch }])
            }
            Err(e) => (Vec::new(), vec![mls_failure("switching keys", &e)]),
        },
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
