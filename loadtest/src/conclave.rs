//! The Conclave target adapter: a simulated participant's signaling
//! session (WebSocket, `join_call`, the MLS agent from the client SDK,
//! `media_offer`/`media_answer`) and its frame crypto (SFrame keys from the
//! MLS epoch).
//!
//! The client SDK's `CallSession` keeps its media offer crate-private (its
//! media side is the async `webrtc` stack), so this module drives the wire
//! protocol itself, reacting to the server exactly as the SDK's session
//! does (`client-sdk/src/session.rs`), and keeps the timestamps the load
//! test measures: joined, epoch changes, who saw a leaver disappear.
//!
//! The other target, Janus, has its own version of this module
//! (`janus.rs`): a task that joins, exchanges SDP with the media thread
//! ([`crate::media::Command`]) and provides a [`FrameCrypto`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use conclave_client::{AgentConfig, AgentEvent, Identity, MlsAgent, Principal};
use conclave_protocol::mls::decode_signing_identity;
use conclave_protocol::sframe::{Codec, DecryptedFrame, KidLayout, SframeError};
use conclave_protocol::signal::{
    Bytes, ClientEnvelope, ClientMessage, ErrorCode, MediaSource, MediaSourceMid, ServerEnvelope,
    ServerMessage,
};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

use crate::media::{Command, FrameCrypto, MediaSender, PeerSpec};
use crate::payload::Source;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a participant failed.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    /// WebSocket trouble.
    #[error("connection: {0}")]
    Connection(String),
    /// Unexpected message.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server refused.
    #[error("refused ({code:?}): {message}")]
    Refused {
        /// Code.
        code: ErrorCode,
        /// Why.
        message: String,
    },
    /// MLS failed locally.
    #[error("MLS: {0}")]
    Mls(String),
    /// The media thread refused.
    #[error("media: {0}")]
    Media(String),
    /// A step took too long.
    #[error("timed out {0}")]
    Timeout(&'static str),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How many epochs before its own a joiner may see frames from (senders
/// switch keys only at `epoch_ready`, which can trail a stream of commits).
const BEFORE_JOIN_EPOCHS: u64 = 16;

/// SFrame keys of one member, from its MLS agent.
#[derive(Debug)]
pub struct AgentCrypto {
    agent: Arc<Mutex<MlsAgent>>,
    /// The epoch this member joined in (`u64::MAX` until it has).
    joined: Arc<AtomicU64>,
}

impl FrameCrypto for AgentCrypto {
    fn encrypt(
        &self,
        context: u64,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SframeError> {
        lock(&self.agent)
            .crypto()
            .encrypt(context, codec, frame, out)
    }

    fn decrypt(
        &self,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<DecryptedFrame, SframeError> {
        lock(&self.agent).crypto().decrypt(codec, frame, out)
    }

    fn before_join(&self, kid: u64) -> bool {
        let joined = self.joined.load(Ordering::Acquire);
        if joined == u64::MAX {
            // Media can connect before the Welcome is processed: every frame
            // then comes from before this member joined.
            return true;
        }
        if joined == 0 {
            return false;
        }
        let layout = KidLayout::default();
        let low = layout.kid_epoch_low(kid);
        // Senders stay on the ready epoch while joins commit ahead of it, so
        // a joiner can see frames from several epochs back.
        (1..=BEFORE_JOIN_EPOCHS)
            .any(|back| joined >= back && layout.epoch_low(joined - back) == low)
    }
}

/// A leave being watched: when did each remaining member stop seeing the
/// leaver in its group, and when did it get the epoch without it.
#[derive(Debug, Clone)]
pub struct LeaveWatch {
    /// The leaver's principal (`u:<user>/<device>` form is not needed: the pair).
    pub user_id: String,
    /// Its device.
    pub device_id: String,
    /// When it sent `leave_call`.
    pub at: Instant,
    /// Members in the call at that moment (excluding the leaver).
    pub expected: HashSet<u32>,
    /// `(participant, epoch, when)` of each member's commit that removed it.
    pub removed_seen: Vec<(u32, u64, Instant)>,
    /// `(participant, when)` of each member's first `epoch_ready` at or
    /// after that epoch.
    pub ready_seen: Vec<(u32, Instant)>,
}

/// One participant's join, as measured.
#[derive(Debug, Clone, Default)]
pub struct JoinRecord {
    /// Participant incarnation.
    pub participant: u32,
    /// Role slot.
    pub slot: u32,
    /// Began connecting.
    pub started: Option<Instant>,
    /// `joined` received.
    pub accepted: Option<Instant>,
    /// In the MLS group (Welcome processed or group created).
    pub mls: Option<Instant>,
    /// Media connected (every connection of the participant).
    pub media: Option<Instant>,
    /// Connections this participant opens (0 is read as 1).
    pub media_needed: u8,
    /// Connections connected so far.
    pub media_up: u8,
    /// First decrypted frame.
    pub first_frame: Option<Instant>,
    /// Left.
    pub left: Option<Instant>,
    /// Failed, and why.
    pub error: Option<String>,
}

/// What all participants report, shared.
#[derive(Debug, Default)]
pub struct Recorder {
    /// By participant incarnation.
    pub joins: Mutex<Vec<JoinRecord>>,
    /// Leaves being watched.
    pub leaves: Mutex<Vec<LeaveWatch>>,
    /// Members present (in the MLS group and not left).
    pub present: Mutex<HashSet<u32>>,
    /// Server errors seen, by code.
    pub errors: Mutex<Vec<(ErrorCode, String)>>,
    /// Commits this load test's members sent.
    pub commits_sent: std::sync::atomic::AtomicU64,
    /// Commits processed, summed over members.
    pub commits_processed: std::sync::atomic::AtomicU64,
}

impl Recorder {
    /// Participant `id`'s task ended: it is no longer present, and a failure
    /// is recorded in its join record.
    pub fn finished(&self, id: u32, result: &Result<(), ParticipantError>) {
        lock(&self.present).remove(&id);
        if let Err(e) = result {
            self.join(id, |r| r.error = Some(e.to_string()));
        }
    }

    /// Updates participant `id`'s record.
    pub fn join(&self, id: u32, f: impl FnOnce(&mut JoinRecord)) {
        let mut joins = lock(&self.joins);
        if let Some(r) = joins.iter_mut().rev().find(|r| r.participant == id) {
            f(r);
        }
    }
}

/// Everything a participant needs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Incarnation id.
    pub participant: u32,
    /// Role slot (index into the scenario's roles).
    pub slot: u32,
    /// Session token.
    pub token: String,
    /// Media to publish and receive.
    pub spec: PeerSpec,
    /// Highest simulcast layer wanted.
    pub max_layer: u8,
}

/// Shared by all participants of a run.
#[derive(Debug)]
pub struct Shared {
    /// `ws://host:port/ws`.
    pub ws_url: String,
    /// Call id.
    pub call_id: String,
    /// Media thread.
    pub media: MediaSender,
    /// Measurements.
    pub recorder: Arc<Recorder>,
}

const STEP_TIMEOUT: Duration = Duration::from_secs(30);

async fn send(ws: &mut Ws, id: Option<u64>, msg: ClientMessage) -> Result<(), ParticipantError> {
    ws.send(Message::Text(ClientEnvelope::encode(id, msg).into()))
        .await
        .map_err(|e| ParticipantError::Connection(e.to_string()))
}

/// The next text or binary frame of a WebSocket; a close is an error.
async fn next_data(ws: &mut Ws) -> Result<Message, ParticipantError> {
    loop {
        let frame = ws
            .next()
            .await
            .ok_or_else(|| ParticipantError::Connection("closed".into()))?
            .map_err(|e| ParticipantError::Connection(e.to_string()))?;
        match frame {
            Message::Text(_) | Message::Binary(_) => return Ok(frame),
            Message::Close(_) => return Err(ParticipantError::Connection("closed".into())),
            _ => {}
        }
    }
}

/// The next text frame of a WebSocket (either target's signaling).
pub(crate) async fn next_text(
    ws: &mut Ws,
) -> Result<tokio_tungstenite::tungstenite::Utf8Bytes, ParticipantError> {
    loop {
        if let Message::Text(t) = next_data(ws).await? {
            return Ok(t);
        }
    }
}

/// The next Conclave server message: a text frame, or a binary one carrying
/// an MLS message.
async fn next(ws: &mut Ws) -> Result<ServerEnvelope, ParticipantError> {
    let env = match next_data(ws).await? {
        Message::Binary(b) => ServerEnvelope::decode_binary(&b),
        Message::Text(t) => ServerEnvelope::decode(t.as_str()),
        _ => Err(conclave_protocol::signal::DecodeError::Invalid(
            "not a data frame".into(),
        )),
    };
    env.map_err(|e| ParticipantError::Protocol(e.to_string()))
}

/// Runs one participant until `leave` fires (or the session ends). Errors
/// are recorded in its join record as well as returned.
pub async fn run(
    shared: Arc<Shared>,
    plan: Plan,
    leave: oneshot::Receiver<()>,
) -> Result<(), ParticipantError> {
    let id = plan.participant;
    let result = run_inner(&shared, plan, leave).await;
    let _ = shared.media.send(Command::Close { participant: id });
    shared.recorder.finished(id, &result);
    result
}

async fn run_inner(
    shared: &Shared,
    plan: Plan,
    mut leave: oneshot::Receiver<()>,
) -> Result<(), ParticipantError> {
    let id = plan.participant;
    let rec = &shared.recorder;
    let device_id = format!("d{id}");
    rec.join(id, |r| r.started = Some(Instant::now()));
    let url = format!("{}?token={}", shared.ws_url, plan.token);
    let (mut ws, _) = tokio::time::timeout(STEP_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| ParticipantError::Timeout("connecting"))?
        .map_err(|e| ParticipantError::Connection(e.to_string()))?;
    let ServerMessage::Ready {
        user_id,
        external_sender,
    } = next(&mut ws).await?.msg
    else {
        return Err(ParticipantError::Protocol("expected `ready`".into()));
    };
    let mls = |e: &dyn std::fmt::Display| ParticipantError::Mls(e.to_string());
    let server = decode_signing_identity(&external_sender.0).map_err(|e| mls(&e))?;
    let principal = Principal::member(&user_id, &device_id).map_err(|e| mls(&e))?;
    let agent = MlsAgent::new(
        Identity::generate(principal).map_err(|e| mls(&e))?,
        AgentConfig::default(),
    );
    let key_package = agent.key_package().map_err(|e| mls(&e))?;
    let agent = Arc::new(Mutex::new(agent));
    send(
        &mut ws,
        Some(1),
        ClientMessage::JoinCall {
            call_id: shared.call_id.clone(),
            device_id: device_id.clone(),
            key_package: Bytes(key_package),
        },
    )
    .await?;
    match tokio::time::timeout(STEP_TIMEOUT, next(&mut ws))
        .await
        .map_err(|_| ParticipantError::Timeout("waiting for `joined`"))??
        .msg
    {
        ServerMessage::Joined { .. } => {}
        ServerMessage::Error { code, message } => {
            return Err(ParticipantError::Refused { code, message });
        }
        other => {
            return Err(ParticipantError::Protocol(format!(
                "expected `joined`, got {other:?}"
            )));
        }
    }
    rec.join(id, |r| r.accepted = Some(Instant::now()));

    // Media: an offer from the media thread, carried to the SFU.
    let key_frame = Arc::new(AtomicBool::new(true));
    let joined_epoch = Arc::new(AtomicU64::new(u64::MAX));
    let (tx, rx) = oneshot::channel();
    shared
        .media
        .send(Command::Open {
            spec: plan.spec.clone(),
            remote_offer: None,
            crypto: Arc::new(AgentCrypto {
                agent: agent.clone(),
                joined: joined_epoch.clone(),
            }),
            key_frame: key_frame.clone(),
            reply: tx,
        })
        .map_err(|e| ParticipantError::Media(e.to_string()))?;
    let offer = rx
        .await
        .map_err(|_| ParticipantError::Media("media thread gone".into()))?
        .map_err(ParticipantError::Media)?;
    let sources = offer
        .sources
        .iter()
        .map(|(mid, s)| MediaSourceMid {
            mid: mid.clone(),
            source: match s {
                Source::Audio => MediaSource::Audio,
                Source::Camera => MediaSource::Camera,
                Source::Screen => MediaSource::Screen,
            },
        })
        .collect();
    const OFFER_ID: u64 = 2;
    send(
        &mut ws,
        Some(OFFER_ID),
        ClientMessage::MediaOffer {
            call_id: shared.call_id.clone(),
            sdp: offer.sdp,
            sources,
        },
    )
    .await?;
    if plan.max_layer < 2 && plan.spec.video_slots > 0 {
        send(
            &mut ws,
            None,
            ClientMessage::SetQuality {
                call_id: shared.call_id.clone(),
                max_layer: plan.max_layer,
            },
        )
        .await?;
    }

    let call = || shared.call_id.clone();
    let mut leaving: Option<Instant> = None;
    loop {
        let env = if leaving.is_some() {
            match tokio::time::timeout(Duration::from_secs(5), next(&mut ws)).await {
                Ok(m) => m?,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                m = next(&mut ws) => m?,
                _ = &mut leave => {
                    let at = Instant::now();
                    leaving = Some(at);
                    let (leaf_user, leaf_device) = (user_id.clone(), device_id.clone());
                    {
                        let mut present = lock(&rec.present);
                        present.remove(&id);
                        lock(&rec.leaves).push(LeaveWatch {
                            user_id: leaf_user,
                            device_id: leaf_device,
                            at,
                            expected: present.clone(),
                            removed_seen: Vec::new(),
                            ready_seen: Vec::new(),
                        });
                    }
                    rec.join(id, |r| r.left = Some(at));
                    send(&mut ws, None, ClientMessage::LeaveCall { call_id: call() }).await?;
                    continue;
                }
            }
        };
        let now = Instant::now();
        tracing::trace!(participant = id, msg = ?env.msg, "server message");
        match env.msg {
            ServerMessage::MediaAnswer { sdp, .. } => {
                shared
                    .media
                    .send(Command::Answer {
                        participant: id,
                        sdp,
                    })
                    .map_err(|e| ParticipantError::Media(e.to_string()))?;
            }
            ServerMessage::Error { code, message } if env.id == Some(OFFER_ID) => {
                return Err(ParticipantError::Refused { code, message });
            }
            ServerMessage::CreateGroup { group_id, .. } => {
                let info = {
                    let mut a = lock(&agent);
                    a.create_group(&group_id.0, &server, now)
                        .and_then(|_| a.group_info())
                        .map_err(|e| mls(&e))?
                };
                send(
                    &mut ws,
                    None,
                    ClientMessage::GroupCreated {
                        call_id: call(),
                        group_info: Bytes(info),
                    },
                )
                .await?;
                rec.join(id, |r| r.mls = Some(now));
                joined_epoch.store(0, Ordering::Release);
                lock(&rec.present).insert(id);
            }
            ServerMessage::Proposal { message, .. } => {
                if let Err(e) = lock(&agent).handle(&message.0, now) {
                    tracing::debug!(participant = id, error = %e, "proposal refused");
                }
            }
            ServerMessage::CommitRequest { epoch, heal, .. } => {
                let bundle = {
                    let mut a = lock(&agent);
                    if a.epoch() != Some(epoch) {
                        None
                    } else {
                        a.discard_pending_commit();
                        let built = if heal {
                            a.commit_heal()
                        } else {
                            a.commit_pending()
                        };
                        built.map_err(|e| mls(&e))?
                    }
                };
                if let Some(b) = bundle {
                    rec.commits_sent.fetch_add(1, Ordering::Relaxed);
                    send(
                        &mut ws,
                        None,
                        ClientMessage::Commit {
                            call_id: call(),
                            epoch: b.epoch,
                            commit: Bytes(b.commit),
                            welcome: b.welcome.map(Bytes),
                        },
                    )
                    .await?;
                }
            }
            ServerMessage::Commit { message, .. } => {
                let (events, epoch) = {
                    let mut a = lock(&agent);
                    let ev = a.handle(&message.0, now).map_err(|e| mls(&e))?;
                    (ev, a.epoch().unwrap_or_default())
                };
                rec.commits_processed.fetch_add(1, Ordering::Relaxed);
                if events.contains(&AgentEvent::Removed) {
                    continue;
                }
                send(
                    &mut ws,
                    None,
                    ClientMessage::EpochAck {
                        call_id: call(),
                        epoch,
                    },
                )
                .await?;
                watch_leaves(rec, &agent, id, epoch, now);
            }
            ServerMessage::Welcome { message, .. } => {
                let epoch = {
                    let mut a = lock(&agent);
                    a.join(&message.0, now).map_err(|e| mls(&e))?;
                    a.epoch().unwrap_or_default()
                };
                send(
                    &mut ws,
                    None,
                    ClientMessage::EpochAck {
                        call_id: call(),
                        epoch,
                    },
                )
                .await?;
                joined_epoch.store(epoch, Ordering::Release);
                rec.join(id, |r| r.mls = Some(now));
                lock(&rec.present).insert(id);
            }
            ServerMessage::EpochReady { epoch, .. } => {
                // A key frame when the epoch added members (as the client
                // SDK does); the SFU's key-frame requests come on top.
                match lock(&agent).switch_sending(epoch) {
                    Ok(ev) if ev.contains(&AgentEvent::KeyFrameRequested) => {
                        key_frame.store(true, Ordering::Release);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(participant = id, error = %e, "switching keys failed");
                    }
                }
                let mut leaves = lock(&rec.leaves);
                for w in leaves.iter_mut() {
                    let removed_at = w
                        .removed_seen
                        .iter()
                        .find(|(p, _, _)| *p == id)
                        .map(|(_, e, _)| *e);
                    if removed_at.is_some_and(|e| epoch >= e)
                        && !w.ready_seen.iter().any(|(p, _)| *p == id)
                    {
                        w.ready_seen.push((id, now));
                    }
                }
            }
            ServerMessage::Removed { .. } => break,
            ServerMessage::Error { code, message } => {
                if matches!(code, ErrorCode::StaleEpoch | ErrorCode::NotCommitter) {
                    lock(&agent).discard_pending_commit();
                }
                tracing::debug!(participant = id, ?code, %message, "server error");
                lock(&rec.errors).push((code, message));
            }
            ServerMessage::MediaClosed { reason, .. } => {
                tracing::debug!(participant = id, %reason, "media closed by the SFU");
            }
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// After a commit: note every watched leaver this member no longer has.
fn watch_leaves(rec: &Recorder, agent: &Mutex<MlsAgent>, id: u32, epoch: u64, now: Instant) {
    let mut leaves = lock(&rec.leaves);
    let open: Vec<usize> = leaves
        .iter()
        .enumerate()
        .filter(|(_, w)| {
            w.expected.contains(&id) && !w.removed_seen.iter().any(|(p, _, _)| *p == id)
        })
        .map(|(i, _)| i)
        .collect();
    if open.is_empty() {
        return;
    }
    let roster = match lock(agent).roster() {
        Ok(r) => r,
        Err(_) => return,
    };
    for i in open {
        let Some(w) = leaves.get_mut(i) else { continue };
        let still = roster.iter().any(|m| {
            matches!(&m.principal, Principal::Member { user_id, device_id }
                if *user_id == w.user_id && *device_id == w.device_id)
        });
        if !still {
            w.removed_seen.push((id, epoch, now));
        }
    }
}
