//! Sessions and calls at run time: one task per call owns its [`Call`]
//! state machine; sessions talk to it through a channel and receive what it
//! sends through their own bounded outbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use conclave_protocol::mls::{Identity, KeyPackageInfo};
use conclave_protocol::signal::ServerFrame;
use conclave_protocol::signal::{ErrorCode, RemovalReason, ServerEnvelope, ServerMessage};
use tokio::sync::mpsc;

use crate::call::{
    Call, CallConfig, CallEvent, JoinLimits, Outbound, RecorderSeat, Refusal, SessionId,
};
use crate::sfu::{
    MediaSessionId, PublishRights, QualityPrefs, SessionRequest, SfuControl, SfuError, SfuEvent,
    Source, parse_participant, participant,
};

/// Frames queued for a session before it counts as too slow and is closed.
pub const OUTBOX_CAPACITY: usize = 4096;

/// What a session's writer receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionFrame {
    /// A JSON text frame (shared by every session a fan-out reaches).
    Text(Utf8Bytes),
    /// A binary frame carrying an MLS message (see [`ServerFrame`]), shared
    /// the same way.
    Binary(axum::body::Bytes),
    /// Close the connection with this reason.
    Close(String),
}

impl SessionFrame {
    /// Wraps an encoded server message.
    pub fn encoded(frame: ServerFrame) -> Self {
        match frame {
            ServerFrame::Text(t) => SessionFrame::Text(t.into()),
            ServerFrame::Binary(b) => SessionFrame::Binary(b.into()),
        }
    }

    /// Payload bytes on the wire (0 for a close).
    fn len(&self) -> usize {
        match self {
            SessionFrame::Text(t) => t.len(),
            SessionFrame::Binary(b) => b.len(),
            SessionFrame::Close(_) => 0,
        }
    }
}

/// An input to a call task.
#[derive(Debug)]
pub enum CallInput {
    /// Join with a validated key package.
    Join {
        /// Session.
        session: SessionId,
        /// Request id.
        id: Option<u64>,
        /// User.
        user_id: String,
        /// Device.
        device_id: String,
        /// The name others see.
        display_name: String,
        /// What the key package says.
        info: KeyPackageInfo,
        /// The key package.
        key_package: Vec<u8>,
        /// What the joiner's policy allows.
        limits: JoinLimits,
        /// The retention recorder to add with this joiner, if its policy
        /// requires records and the call has none yet.
        recorder: Option<Box<RecorderSeat>>,
    },
    /// The creator's GroupInfo.
    GroupCreated {
        /// Session.
        session: SessionId,
        /// Request id.
        id: Option<u64>,
        /// GroupInfo.
        group_info: Vec<u8>,
    },
    /// A commit.
    Commit {
        /// Session.
        session: SessionId,
        /// Request id.
        id: Option<u64>,
        /// Epoch.
        epoch: u64,
        /// Commit.
        commit: Vec<u8>,
        /// Welcome.
        welcome: Option<Vec<u8>>,
    },
    /// Epoch acknowledgement.
    Ack {
        /// Session.
        session: SessionId,
        /// Epoch.
        epoch: u64,
    },
    /// Mute change.
    Mute {
        /// Session.
        session: SessionId,
        /// Request id.
        id: Option<u64>,
        /// Audio muted.
        audio: bool,
        /// Video muted.
        video: bool,
    },
    /// A member's source reached the SFU (`Some`), or its media closed (`None`).
    Publishing {
        /// Session.
        session: SessionId,
        /// The source, or `None` for "nothing any more".
        source: Option<conclave_protocol::signal::MediaSource>,
    },
    /// Leave.
    Leave {
        /// Session.
        session: SessionId,
        /// Request id.
        id: Option<u64>,
        /// Why.
        reason: RemovalReason,
    },
    /// The SFU's dominant speaker changed.
    ActiveSpeaker {
        /// The speaker's user.
        user_id: String,
        /// The speaker's device.
        device_id: String,
    },
}

/// One line of a call's audit log (no content, no keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// The call.
    pub call_id: String,
    /// `created`, `joined`, `left`, `removed`, `rekeyed`, `ended`.
    pub kind: &'static str,
    /// User concerned.
    pub user_id: Option<String>,
    /// Device concerned.
    pub device_id: Option<String>,
    /// Epoch, for rekeys.
    pub epoch: Option<u64>,
}

struct SessionEntry {
    user_id: String,
    outbox: mpsc::Sender<SessionFrame>,
    calls: Vec<String>,
    /// The device this session joined each call with.
    devices: HashMap<String, String>,
    /// The device this session uploaded key packages for (a recorder).
    key_package_device: Option<String>,
}

struct HubState {
    calls: HashMap<String, mpsc::UnboundedSender<CallInput>>,
    sessions: HashMap<SessionId, SessionEntry>,
    next_session: SessionId,
    /// Media sessions on the SFU, by (signaling session, call).
    media: HashMap<(SessionId, String), MediaSessionId>,
    /// The reverse of `media`.
    media_owner: HashMap<MediaSessionId, (SessionId, String)>,
}

/// Shared run-time state of the signaling server.
#[derive(Clone)]
pub struct Hub {
    state: Arc<Mutex<HubState>>,
    server: Identity,
    config: CallConfig,
    sfu: Arc<dyn SfuControl>,
    stats: Arc<crate::metrics::Metrics>,
    audit: Option<mpsc::UnboundedSender<AuditRecord>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub whose calls name `server` as their external sender.
    pub fn new(
        server: Identity,
        config: CallConfig,
        sfu: Arc<dyn SfuControl>,
        stats: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            state: Arc::new(Mutex::new(HubState {
                calls: HashMap::new(),
                sessions: HashMap::new(),
                next_session: 1,
                media: HashMap::new(),
                media_owner: HashMap::new(),
            })),
            server,
            config,
            sfu,
            stats,
            audit: None,
        }
    }

    /// Sends every call's audit records to `tx`.
    pub fn with_audit(mut self, tx: mpsc::UnboundedSender<AuditRecord>) -> Self {
        self.audit = Some(tx);
        self
    }

    fn audit(
        &self,
        call_id: &str,
        kind: &'static str,
        user: Option<&str>,
        device: Option<&str>,
        epoch: Option<u64>,
    ) {
        if let Some(tx) = &self.audit {
            let _ = tx.send(AuditRecord {
                call_id: call_id.to_owned(),
                kind,
                user_id: user.map(str::to_owned),
                device_id: device.map(str::to_owned),
                epoch,
            });
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock leaves plain maps behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server's external-sender identity.
    pub fn server_identity(&self) -> &Identity {
        &self.server
    }

    /// Registers a session; returns its id and the receiver of its outbox.
    pub fn open_session(&self, user_id: &str) -> (SessionId, mpsc::Receiver<SessionFrame>) {
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
        let mut st = self.lock();
        let id = st.next_session;
        st.next_session += 1;
        st.sessions.insert(
            id,
            SessionEntry {
                user_id: user_id.to_owned(),
                outbox: tx,
                calls: Vec::new(),
                devices: HashMap::new(),
                key_package_device: None,
            },
        );
        self.stats.sessions.inc();
        (id, rx)
    }

    /// Forgets a session and leaves its calls.
    pub fn close_session(&self, session: SessionId) {
        let entry = self.lock().sessions.remove(&session);
        if let Some(e) = entry {
            self.stats.sessions.dec();
            for call in e.calls {
                self.close_media(session, &call);
                self.to_call(
                    &call,
                    CallInput::Leave {
                        session,
                        id: None,
                        reason: RemovalReason::Disconnected,
                    },
                );
            }
        }
    }

    /// Sends one message to a session; a full outbox closes it.
    pub fn send(&self, session: SessionId, reply_to: Option<u64>, msg: ServerMessage) {
        let kind = crate::metrics::message_kind(&msg);
        let frame = SessionFrame::encoded(ServerEnvelope::frame(reply_to, msg));
        self.push(&self.lock(), session, kind, frame);
    }

    /// Queues an encoded frame on a session's outbox; a full outbox closes it.
    fn push(&self, st: &HubState, session: SessionId, kind: &'static str, frame: SessionFrame) {
        if let Some(e) = st.sessions.get(&session) {
            self.stats.messages_out.with_label_values(&[kind]).inc();
            self.stats
                .bytes_out
                .with_label_values(&[kind])
                .inc_by(frame.len() as u64);
            if e.outbox.try_send(frame).is_err() {
                let _ = e
                    .outbox
                    .try_send(SessionFrame::Close("too slow to receive".into()));
                tracing::warn!(session, "outbox full: closing slow session");
            }
        }
    }

    /// Sends an error reply.
    pub fn refuse(&self, session: SessionId, reply_to: Option<u64>, r: Refusal) {
        self.stats
            .errors
            .with_label_values(&[crate::metrics::error_kind(r.code)])
            .inc();
        self.send(
            session,
            reply_to,
            ServerMessage::Error {
                code: r.code,
                message: r.message,
            },
        );
    }

    /// Closes one session's socket.
    pub fn close_user_session(&self, session: SessionId, reason: &str) {
        if let Some(e) = self.lock().sessions.get(&session) {
            let _ = e.outbox.try_send(SessionFrame::Close(reason.to_owned()));
        }
    }

    /// Closes every session of a user with a reason; returns how many.
    pub fn close_user_sessions(&self, user_id: &str, reason: &str) -> usize {
        let st = self.lock();
        let mut n = 0;
        for e in st.sessions.values().filter(|e| e.user_id == user_id) {
            let _ = e.outbox.try_send(SessionFrame::Close(reason.to_owned()));
            n += 1;
        }
        n
    }

    /// Removes a user from every call now (forces a rekey in each).
    pub fn remove_user_everywhere(&self, user_id: &str) -> usize {
        let targets: Vec<(SessionId, String)> = {
            let st = self.lock();
            st.sessions
                .iter()
                .filter(|(_, e)| e.user_id == user_id)
                .flat_map(|(s, e)| e.calls.iter().map(move |c| (*s, c.clone())))
                .collect()
        };
        for (session, call) in &targets {
            self.to_call(
                call,
                CallInput::Leave {
                    session: *session,
                    id: None,
                    reason: RemovalReason::RemovedByAdmin,
                },
            );
        }
        self.close_user_sessions(user_id, "removed by an administrator");
        targets.len()
    }

    /// Routes an input to an existing call.
    pub fn to_call(&self, call_id: &str, input: CallInput) -> bool {
        let st = self.lock();
        match st.calls.get(call_id) {
            Some(tx) => tx.send(input).is_ok(),
            None => false,
        }
    }

    /// Joins a call, starting its task if it has none.
    pub fn join(&self, call_id: &str, input: CallInput) {
        let mut st = self.lock();
        if let CallInput::Join {
            session,
            device_id,
            recorder,
            ..
        } = &input
        {
            let mut entries = vec![(*session, device_id.clone())];
            if let Some(seat) = recorder {
                entries.push((seat.session, seat.device_id.clone()));
            }
            for (sid, device) in entries {
                if let Some(e) = st.sessions.get_mut(&sid) {
                    if !e.calls.iter().any(|c| c == call_id) {
                        e.calls.push(call_id.to_owned());
                    }
                    e.devices.insert(call_id.to_owned(), device);
                }
            }
        }
        let tx = st
            .calls
            .entry(call_id.to_owned())
            .or_insert_with(|| self.spawn_call(call_id));
        if let Err(mpsc::error::SendError(input)) = tx.send(input) {
            // The task just ended (call emptied): start a fresh one.
            let tx = self.spawn_call(call_id);
            let _ = tx.send(input);
            st.calls.insert(call_id.to_owned(), tx);
        }
    }

    /// Number of live calls.
    pub fn call_count(&self) -> usize {
        self.lock().calls.len()
    }

    fn spawn_call(&self, call_id: &str) -> mpsc::UnboundedSender<CallInput> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut group_id = vec![0u8; 16];
        rand::Rng::fill(&mut rand::thread_rng(), group_id.as_mut_slice());
        let call = Call::new(
            call_id.to_owned(),
            group_id,
            self.server.clone(),
            self.config,
        );
        self.stats.calls.inc();
        tokio::spawn(self.clone().run_call(call, rx));
        tx
    }

    async fn run_call(self, mut call: Call, mut rx: mpsc::UnboundedReceiver<CallInput>) {
        loop {
            let deadline = call.next_deadline();
            let input = match deadline {
                Some(d) => {
                    tokio::select! {
                        i = rx.recv() => i,
                        () = tokio::time::sleep_until(d.into()) => {
                            let now = Instant::now();
                            let (msgs, events) = call.tick(now);
                            self.deliver(&call, msgs, events);
                            if call.next_deadline().is_some_and(|next| next <= now) {
                                // Nothing moved the deadline: the next sleep
                                // returns at once. Counted, so a spin shows.
                                self.stats.idle_wakeups.inc();
                            }
                            continue;
                        }
                    }
                }
                None => rx.recv().await,
            };
            let Some(input) = input else { break };
            self.handle(&mut call, input);
            if call.is_empty() {
                // Close the call unless a join raced in.
                let mut st = self.lock();
                if rx.is_empty() {
                    st.calls.remove(call.id());
                    drop(st);
                    self.stats.calls.dec();
                    tracing::info!(call = call.id(), commits = call.commits(), "call ended");
                    self.audit(call.id(), "ended", None, None, None);
                    break;
                }
            }
        }
    }

    fn handle(&self, call: &mut Call, input: CallInput) {
        let now = Instant::now();
        let (session, id, result) = match input {
            CallInput::Join {
                session,
                id,
                user_id,
                device_id,
                display_name,
                info,
                key_package,
                limits,
                recorder,
            } => {
                let recorder_session = recorder.as_ref().map(|r| r.session);
                let had_recorder = call.has_recorder();
                let r = call.join(
                    session,
                    &user_id,
                    &device_id,
                    &display_name,
                    info,
                    key_package,
                    limits,
                    recorder.map(|b| *b),
                    now,
                );
                if r.is_err() {
                    self.forget_call(session, call.id());
                }
                // A refused join seats nobody; a recorder already in the
                // call keeps its place.
                if let Some(rs) = recorder_session
                    && r.is_err()
                    && !had_recorder
                {
                    self.forget_call(rs, call.id());
                }
                (session, id, r)
            }
            CallInput::GroupCreated {
                session,
                id,
                group_info,
            } => (session, id, call.group_created(session, &group_info, now)),
            CallInput::Commit {
                session,
                id,
                epoch,
                commit,
                welcome,
            } => (
                session,
                id,
                call.commit(session, epoch, &commit, welcome.as_deref(), now),
            ),
            CallInput::Ack { session, epoch } => {
                (session, None, call.epoch_ack(session, epoch, now))
            }
            CallInput::Mute {
                session,
                id,
                audio,
                video,
            } => (session, id, call.set_mute(session, audio, video)),
            CallInput::Leave {
                session,
                id,
                reason,
            } => (session, id, call.leave(session, reason, now)),
            CallInput::ActiveSpeaker { user_id, device_id } => {
                let msgs = call.active_speaker(&user_id, &device_id);
                self.deliver(call, msgs, Vec::new());
                return;
            }
            CallInput::Publishing { session, source } => {
                // Not a client request: nothing to refuse if the member is gone.
                if let Ok((msgs, events)) = call.set_publishing(session, source) {
                    self.deliver(call, msgs, events);
                }
                return;
            }
        };
        match result {
            Ok((mut msgs, events)) => {
                if let Some(first) = msgs
                    .iter_mut()
                    .find(|o| o.to == session && matches!(*o.msg, ServerMessage::Joined { .. }))
                {
                    first.reply_to = id;
                }
                self.deliver(call, msgs, events);
            }
            Err(r) => self.refuse(session, id, r),
        }
    }

    fn forget_call(&self, session: SessionId, call_id: &str) {
        if let Some(e) = self.lock().sessions.get_mut(&session) {
            e.calls.retain(|c| c != call_id);
        }
    }

    fn deliver(&self, call: &Call, msgs: Vec<Outbound>, events: Vec<CallEvent>) {
        // A fan-out is a run of the same message to many sessions: encode it
        // once per run and take the lock once.
        {
            let st = self.lock();
            let mut last: Option<(&Arc<ServerMessage>, Option<u64>, SessionFrame)> = None;
            for o in &msgs {
                let text = match &last {
                    Some((m, r, t))
                        if *r == o.reply_to && (Arc::ptr_eq(m, &o.msg) || **m == o.msg) =>
                    {
                        t.clone()
                    }
                    _ => {
                        let t = SessionFrame::encoded(ServerEnvelope::frame(
                            o.reply_to,
                            ServerMessage::clone(&o.msg),
                        ));
                        last = Some((&o.msg, o.reply_to, t.clone()));
                        t
                    }
                };
                self.push(&st, o.to, crate::metrics::message_kind(&o.msg), text);
            }
        }
        for e in events {
            match e {
                CallEvent::EpochChanged {
                    epoch,
                    commit_latency,
                    fanout_bytes,
                    members,
                    removed,
                    healed,
                } => {
                    if healed {
                        self.stats.heal_commits.inc();
                    }
                    self.stats
                        .commit_latency
                        .observe(commit_latency.as_secs_f64());
                    self.stats.rekey_fanout_bytes.observe(fanout_bytes as f64);
                    self.stats.participants.observe(members as f64);
                    tracing::info!(
                        call = call.id(),
                        epoch,
                        members,
                        fanout_bytes,
                        "epoch changed"
                    );
                    self.sfu.epoch_changed(call.id(), epoch);
                    if removed {
                        self.sfu.members_removed(call.id(), epoch);
                    }
                    self.audit(call.id(), "rekeyed", None, None, Some(epoch));
                }
                CallEvent::EpochReady { epoch, added, late } => {
                    if late > 0 {
                        self.stats.ack_timeouts.inc();
                        tracing::debug!(call = %call.id(), epoch, late, "epoch ready at the ack timeout");
                    }
                    self.sfu.epoch_ready(call.id(), epoch);
                    if added {
                        // Senders switch keys on epoch_ready; a publisher may
                        // still be reading that message when the SFU's
                        // request arrives, so ask again a moment later: the
                        // new members need a key frame under the new keys.
                        self.sfu.request_key_frames(call.id());
                        if let Ok(rt) = tokio::runtime::Handle::try_current() {
                            let sfu = self.sfu.clone();
                            let id = call.id().to_owned();
                            rt.spawn(async move {
                                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                                sfu.request_key_frames(&id);
                            });
                        }
                    }
                }
                CallEvent::SessionLeft(s) => {
                    self.forget_call(s, call.id());
                    self.close_media(s, call.id());
                }
                CallEvent::Created { user_id, device_id } => {
                    // The group exists at epoch 0: its frames may flow.
                    self.sfu.epoch_changed(call.id(), 0);
                    self.audit(
                        call.id(),
                        "created",
                        Some(&user_id),
                        Some(&device_id),
                        Some(0),
                    );
                    self.audit(
                        call.id(),
                        "joined",
                        Some(&user_id),
                        Some(&device_id),
                        Some(0),
                    );
                }
                CallEvent::MemberJoined { user_id, device_id } => {
                    self.audit(call.id(), "joined", Some(&user_id), Some(&device_id), None);
                }
                CallEvent::MemberLeft {
                    user_id,
                    device_id,
                    reason,
                } => {
                    let kind = match reason {
                        RemovalReason::RemovedByAdmin => "removed",
                        RemovalReason::Left | RemovalReason::Disconnected => "left",
                    };
                    self.audit(call.id(), kind, Some(&user_id), Some(&device_id), None);
                }
            }
        }
    }
}

impl Hub {
    /// Opens (or replaces) a session's media connection for a call it has
    /// joined, and replies with the SFU's answer.
    pub async fn media_offer(
        &self,
        session: SessionId,
        id: Option<u64>,
        call_id: String,
        sdp: String,
        sources: Vec<(String, Source)>,
        rights: PublishRights,
    ) {
        let who = {
            let st = self.lock();
            st.sessions.get(&session).and_then(|e| {
                e.calls
                    .contains(&call_id)
                    .then(|| {
                        e.devices
                            .get(&call_id)
                            .map(|d| (e.user_id.clone(), d.clone()))
                    })
                    .flatten()
            })
        };
        let Some((user, device)) = who else {
            self.refuse(
                session,
                id,
                refusal(ErrorCode::NotFound, "join the call before offering media"),
            );
            return;
        };
        self.close_media(session, &call_id);
        let request = SessionRequest {
            call_id: call_id.clone(),
            participant: participant(&user, &device),
            offer_sdp: sdp,
            rights,
            sources,
        };
        match self.sfu.create_session(request).await {
            Ok(answer) => {
                let kept = {
                    let mut st = self.lock();
                    let member = st
                        .sessions
                        .get(&session)
                        .is_some_and(|e| e.calls.contains(&call_id));
                    if member {
                        st.media.insert((session, call_id.clone()), answer.session);
                        st.media_owner
                            .insert(answer.session, (session, call_id.clone()));
                    }
                    member
                };
                if !kept {
                    // Left the call while the SFU was answering.
                    self.sfu.close_session(answer.session);
                    return;
                }
                self.send(
                    session,
                    id,
                    ServerMessage::MediaAnswer {
                        call_id,
                        sdp: answer.answer_sdp,
                        audio_slots: u32::try_from(answer.slots.0).unwrap_or(u32::MAX),
                        video_slots: u32::try_from(answer.slots.1).unwrap_or(u32::MAX),
                    },
                );
            }
            Err(e) => {
                let code = match e {
                    SfuError::BadOffer(_) => ErrorCode::BadRequest,
                    _ => ErrorCode::Internal,
                };
                self.refuse(session, id, refusal(code, e.to_string()));
            }
        }
    }

    /// Notes that a session uploaded key packages for `device` (how a
    /// live recorder is found).
    pub fn set_key_package_device(&self, session: SessionId, device: &str) {
        if let Some(e) = self.lock().sessions.get_mut(&session) {
            e.key_package_device = Some(device.to_owned());
        }
    }

    /// A live session of `user_id` that uploaded key packages, with its device.
    pub fn live_recorder(&self, user_id: &str) -> Option<(SessionId, String)> {
        let st = self.lock();
        st.sessions
            .iter()
            .filter(|(_, e)| e.user_id == user_id)
            .find_map(|(sid, e)| e.key_package_device.clone().map(|d| (*sid, d)))
    }

    /// Whether a session of `user_id` is in the call.
    pub fn call_has_user(&self, call_id: &str, user_id: &str) -> bool {
        self.lock()
            .sessions
            .values()
            .any(|e| e.user_id == user_id && e.calls.iter().any(|c| c == call_id))
    }

    /// Closes a session's media connection for a call, if it has one.
    pub fn close_media(&self, session: SessionId, call_id: &str) {
        let media = {
            let mut st = self.lock();
            let m = st.media.remove(&(session, call_id.to_owned()));
            if let Some(m) = m {
                st.media_owner.remove(&m);
            }
            m
        };
        if let Some(m) = media {
            self.sfu.close_session(m);
            self.to_call(
                call_id,
                CallInput::Publishing {
                    session,
                    source: None,
                },
            );
        }
    }

    fn media_of(&self, session: SessionId, call_id: &str) -> Option<MediaSessionId> {
        self.lock()
            .media
            .get(&(session, call_id.to_owned()))
            .copied()
    }

    /// Sets the highest simulcast layer a session receives.
    pub fn set_quality(&self, session: SessionId, id: Option<u64>, call_id: &str, max_layer: u8) {
        match self.media_of(session, call_id) {
            Some(m) => self.sfu.set_quality(
                m,
                QualityPrefs {
                    max_layer: max_layer.min(2),
                },
            ),
            None => self.refuse(
                session,
                id,
                refusal(ErrorCode::NotFound, "no media connection for this call"),
            ),
        }
    }

    /// Pins or unpins a member's source in a session's video slots.
    pub fn pin(
        &self,
        session: SessionId,
        id: Option<u64>,
        call_id: &str,
        member: (&str, &str),
        source: Source,
        pinned: bool,
    ) {
        match self.media_of(session, call_id) {
            Some(m) => self
                .sfu
                .pin(m, &participant(member.0, member.1), source, pinned),
            None => self.refuse(
                session,
                id,
                refusal(ErrorCode::NotFound, "no media connection for this call"),
            ),
        }
    }

    /// Relays the SFU's events to the clients concerned.
    pub fn attach_sfu_events(&self, mut events: mpsc::UnboundedReceiver<SfuEvent>) {
        let hub = self.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                hub.on_sfu_event(e);
            }
        });
    }

    fn on_sfu_event(&self, event: SfuEvent) {
        match event {
            SfuEvent::DominantSpeaker {
                call_id,
                participant,
            } => {
                let Some((user_id, device_id)) = parse_participant(&participant) else {
                    return;
                };
                // The call's task knows who has joined; it sends the news.
                self.to_call(
                    &call_id,
                    CallInput::ActiveSpeaker {
                        user_id: user_id.to_owned(),
                        device_id: device_id.to_owned(),
                    },
                );
            }
            SfuEvent::TrackPublished {
                session, source, ..
            } => {
                let owner = self.lock().media_owner.get(&session).cloned();
                if let Some((sid, call_id)) = owner {
                    let source = match source {
                        Source::Audio => conclave_protocol::signal::MediaSource::Audio,
                        Source::Camera => conclave_protocol::signal::MediaSource::Camera,
                        Source::Screen => conclave_protocol::signal::MediaSource::Screen,
                    };
                    self.to_call(
                        &call_id,
                        CallInput::Publishing {
                            session: sid,
                            source: Some(source),
                        },
                    );
                }
            }
            SfuEvent::SessionDown {
                session, reason, ..
            } if reason != crate::sfu::DownReason::Closed => {
                let owner = {
                    let mut st = self.lock();
                    let o = st.media_owner.remove(&session);
                    if let Some(o) = &o {
                        st.media.remove(o);
                    }
                    o
                };
                if let Some((sid, call_id)) = owner {
                    self.to_call(
                        &call_id,
                        CallInput::Publishing {
                            session: sid,
                            source: None,
                        },
                    );
                    let reason = match reason {
                        crate::sfu::DownReason::Timeout => "no media packets within the timeout",
                        crate::sfu::DownReason::Failed => "ICE or DTLS failed",
                        crate::sfu::DownReason::Fault => "media session fault",
                        _ => "media server shutting down",
                    };
                    self.send(
                        sid,
                        None,
                        ServerMessage::MediaClosed {
                            call_id,
                            reason: reason.to_owned(),
                        },
                    );
                }
            }
            _ => {}
        }
    }
}

/// Refusal for a request that never reached a call.
pub fn refusal(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}
