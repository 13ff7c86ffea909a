//! One worker's state: its sessions and calls, the routing of datagrams to
//! sessions, the timer heap, and the forwarding path. The worker thread
//! (in `worker.rs`) feeds it datagrams, commands and the clock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use conclave_protocol::sframe::{Codec, KidLayout};
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::state::{RTCIceConnectionState, RTCPeerConnectionState};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use rtc::statistics::StatsSelector;

use crate::api::{
    DownReason, QualityPrefs, SessionAnswer, SessionId, SessionRequest, SfuError, SfuEvent, Source,
};
use crate::demux::{PacketKind, binding_request_ufrag, classify};
use crate::forward::{choose_layer, layer_of_rid, rank_speakers, vp8_info};
use crate::guard::{DropReason, LiveEpochs};
use crate::metrics::MediaKind;
use crate::net::SendQueue;
use crate::session::{BuildParams, InStream, Session, TokenBucket, negotiate};
use crate::worker::{Command, Shared};

/// How often each call re-ranks speakers and re-plans slots.
pub const CALL_TICK: Duration = Duration::from_millis(250);
/// A call with no sessions keeps its epoch state this long after its last
/// activity (an epoch change or a session leaving), then is forgotten.
const CALL_IDLE: Duration = Duration::from_secs(600);
/// Margin (in smoothed loudness) a speaker needs to displace another.
const SPEAKER_MARGIN: f32 = 6.0;
/// How many validated network paths (remote addresses) a session keeps routed.
const MAX_PATHS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Session(SessionId),
    Reap(SessionId),
    Call(u64),
}

/// A call as one worker sees it.
#[derive(Debug)]
struct Call {
    id: String,
    sessions: Vec<SessionId>,
    live: Option<LiveEpochs>,
    epoch: Option<u64>,
    speakers: Vec<SessionId>,
    dominant: Option<SessionId>,
    /// (publisher, source) → subscriber slots it feeds.
    routes: HashMap<(SessionId, Source), Vec<(SessionId, usize)>>,
    /// A `Timer::Call` is pending.
    tick_armed: bool,
    /// Last epoch change or departure.
    last_activity: Instant,
}

/// A packet to forward, with what the slot logic needs to know about it.
struct Inbound<'a> {
    publisher: SessionId,
    source: Source,
    layer: u8,
    key_frame: bool,
    packet: &'a rtc::rtp::Packet,
}

/// The worker's state.
pub struct Engine {
    pub(crate) index: usize,
    shared: Arc<Shared>,
    sessions: HashMap<SessionId, Session>,
    by_ufrag: HashMap<String, SessionId>,
    by_addr: HashMap<SocketAddr, SessionId>,
    calls: HashMap<u64, Call>,
    call_ids: HashMap<String, u64>,
    next_call: u64,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    touched: Vec<SessionId>,
    global: TokenBucket,
    key_requests: Vec<(SessionId, Source, Option<u8>)>,
    /// Reused per datagram for a session's decrypted messages.
    inbox: Vec<RTCMessage>,
    /// `forwarded{kind="audio"}` and `{kind="video"}`, resolved once.
    forwarded_audio: prometheus::IntCounter,
    forwarded_video: prometheus::IntCounter,
    /// The kind of media forwarded since [`Engine::take_forwarded`], if any.
    forwarded_since: Option<MediaKind>,
    /// The send helper of [`Engine::flush`] (one thread), when sending in
    /// parallel is configured.
    helper: Option<rayon_core::ThreadPool>,
    /// The helper's send queue.
    helper_queue: SendQueue,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("index", &self.index)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

fn drop_label(reason: DropReason) -> &'static str {
    match reason {
        DropReason::NotSframe => "not_sframe",
        DropReason::Truncated => "truncated_frame",
        DropReason::StaleEpoch => "stale_epoch",
    }
}

impl Engine {
    pub(crate) fn new(index: usize, shared: Arc<Shared>, now: Instant) -> Self {
        let helper = shared.config.parallel_send_from.and_then(|_| {
            rayon_core::ThreadPoolBuilder::new()
                .num_threads(1)
                // The worker's name first, so its CPU time counts as the worker's.
                .thread_name(move |_| format!("sfu-worker-{index}-send"))
                .build()
                .map_err(|e| {
                    tracing::warn!(worker = index, error = %e, "no send helper thread: sending from one thread");
                })
                .ok()
        });
        let gso = shared.config.udp_gso;
        let per_worker = (shared.config.global_pps / shared.workers_count().max(1) as u32).max(1);
        let forwarded_audio = shared.metrics.forwarded.with_label_values(&["audio"]);
        let forwarded_video = shared.metrics.forwarded.with_label_values(&["video"]);
        Self {
            index,
            global: TokenBucket::new(per_worker, per_worker, now),
            shared,
            sessions: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            calls: HashMap::new(),
            call_ids: HashMap::new(),
            next_call: 1,
            timers: BinaryHeap::new(),
            touched: Vec::new(),
            key_requests: Vec::new(),
            inbox: Vec::new(),
            forwarded_audio,
            forwarded_video,
            forwarded_since: None,
            helper_queue: SendQueue::new(gso),
            helper,
        }
    }

    /// What the datagram handled since the last call forwarded, if it
    /// forwarded media.
    pub(crate) fn take_forwarded(&mut self) -> Option<MediaKind> {
        self.forwarded_since.take()
    }

    /// Whether a datagram is RTP from one of this worker's sessions on a
    /// stream it publishes audio on: read from the clear RTP header (the
    /// SSRC), so that a batch's audio can be forwarded before its video.
    pub(crate) fn is_audio(&self, from: &SocketAddr, data: &[u8]) -> bool {
        if classify(data) != PacketKind::Rtp {
            return false;
        }
        let Some(ssrc) = data.get(8..12).and_then(|b| <[u8; 4]>::try_from(b).ok()) else {
            return false;
        };
        self.by_addr
            .get(from)
            .and_then(|sid| self.sessions.get(sid))
            .and_then(|s| s.streams.get(&u32::from_be_bytes(ssrc)))
            .is_some_and(|st| st.source == Source::Audio)
    }

    fn drop(&self, reason: &str) {
        self.shared.metrics.drops.with_label_values(&[reason]).inc();
    }

    fn event(&self, e: SfuEvent) {
        let _ = self.shared.events.send(e);
    }

    /// The earliest timer, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    fn arm(&mut self, sid: SessionId) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if let Some(t) = s.pc.poll_timeout()
            && s.armed.is_none_or(|a| t < a)
        {
            s.armed = Some(t);
            self.timers.push(Reverse((t, Timer::Session(sid))));
        }
    }

    /// (Re)schedules the inactivity check of a session; one per session.
    fn arm_reap(&mut self, sid: SessionId, at: Instant) {
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.reap_armed = Some(at);
            self.timers.push(Reverse((at, Timer::Reap(sid))));
        }
    }

    // ---- commands ------------------------------------------------------

    pub(crate) fn command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::Create { id, request, reply } => {
                let result = self.create(id, request, now);
                let _ = reply.send(result);
            }
            Command::Rights(sid, rights) => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.rights = rights;
                    let call = s.call;
                    self.plan_call(call, now);
                }
            }
            Command::Pin {
                session,
                participant,
                source,
                pinned,
            } => {
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.pins
                        .retain(|(p, src)| !(p == &participant && *src == source));
                    if pinned {
                        s.pins.push((participant, source));
                    }
                    let call = s.call;
                    self.plan_call(call, now);
                }
            }
            Command::Quality(sid, prefs) => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.prefs = prefs;
                    let call = s.call;
                    self.plan_call(call, now);
                }
            }
            Command::Close(sid) => self.close(sid, DownReason::Closed),
            Command::Epoch { call_id, epoch } => {
                self.epoch(call_id, epoch, EpochStep::Committed, now)
            }
            Command::EpochReady { call_id, epoch } => {
                self.epoch(call_id, epoch, EpochStep::Ready, now)
            }
            Command::MembersRemoved { call_id, epoch } => {
                self.epoch(call_id, epoch, EpochStep::Removed, now)
            }
            Command::KeyFrames(call_id) => self.key_frames(call_id, now),
            // Counted by the worker whose socket received it.
            Command::Datagram {
                from,
                data,
                arrival,
            } => self.route_datagram(now, from, &data, arrival),
            #[cfg(feature = "fault-injection")]
            Command::InjectFault(sid) => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.fault_injected = true;
                }
            }
            #[cfg(feature = "fault-injection")]
            Command::LoseMedia(sid, count) => {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.lose_media = count;
                }
            }
            Command::Shutdown => {
                let ids: Vec<_> = self.sessions.keys().copied().collect();
                for id in ids {
                    self.close(id, DownReason::Shutdown);
                }
            }
        }
    }

    fn call_for(&mut self, call_id: &str) -> u64 {
        if let Some(&c) = self.call_ids.get(call_id) {
            return c;
        }
        let c = self.next_call;
        self.next_call += 1;
        self.call_ids.insert(call_id.to_owned(), c);
        self.calls.insert(
            c,
            Call {
                id: call_id.to_owned(),
                sessions: Vec::new(),
                live: None,
                epoch: None,
                speakers: Vec::new(),
                dominant: None,
                routes: HashMap::new(),
                tick_armed: false,
                last_activity: Instant::now(),
            },
        );
        c
    }

    fn ensure_tick(&mut self, call_key: u64, at: Instant) {
        if let Some(call) = self.calls.get_mut(&call_key)
            && !call.tick_armed
        {
            call.tick_armed = true;
            self.timers.push(Reverse((at, Timer::Call(call_key))));
        }
    }

    fn create(
        &mut self,
        id: SessionId,
        request: SessionRequest,
        now: Instant,
    ) -> Result<SessionAnswer, SfuError> {
        if self.shared.session_count.load(Ordering::Relaxed) >= self.shared.config.max_sessions {
            return Err(SfuError::Full);
        }
        let started = Instant::now();
        let params = BuildParams {
            certificate: &self.shared.certificate,
            advertised: self.shared.advertised,
            audio_slots: self.shared.config.audio_slots,
            video_slots: self.shared.config.video_slots,
            congestion_control: self.shared.config.congestion_control,
        };
        let built = catch_unwind(AssertUnwindSafe(|| {
            negotiate(&params, &request.offer_sdp, &request.sources, now)
        }))
        .map_err(|_| SfuError::Rtc("negotiation panicked".into()))??;
        let call = self.call_for(&request.call_id);
        let slots = (
            built.slots.iter().filter(|s| !s.video).count(),
            built.slots.iter().filter(|s| s.video).count(),
        );
        let session = Session {
            id,
            call,
            participant: request.participant,
            pc: built.pc,
            ufrag: built.ufrag.clone(),
            remotes: Vec::new(),
            rights: request.rights,
            prefs: QualityPrefs::default(),
            pins: Vec::new(),
            mid_sources: built.mid_sources,
            streams: HashMap::new(),
            sources: HashMap::new(),
            audio_level_ext: None,
            slots: built.slots,
            activity: Default::default(),
            heard_since_tick: false,
            last_rx: now,
            up: false,
            armed: None,
            reap_armed: None,
            #[cfg(feature = "fault-injection")]
            fault_injected: false,
            #[cfg(feature = "fault-injection")]
            lose_media: 0,
            bwe: built.bwe,
            tap: built.tap,
            bucket: TokenBucket::new(
                self.shared.config.session_pps,
                self.shared.config.session_pps * 2,
                now,
            ),
            joined: now,
        };
        self.sessions.insert(id, session);
        self.by_ufrag.insert(built.ufrag.clone(), id);
        self.shared.route_ufrag(built.ufrag, self.index);
        self.shared.session_count.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.sessions.inc();
        if let Some(c) = self.calls.get_mut(&call) {
            c.sessions.push(id);
        }
        self.ensure_tick(call, now + CALL_TICK);
        self.arm_reap(id, now + self.shared.config.setup_timeout);
        self.arm(id);
        self.plan_call(call, now);
        self.shared
            .metrics
            .session_setup_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(SessionAnswer {
            session: id,
            answer_sdp: built.answer_sdp,
            slots,
        })
    }

    /// The call's group committed `epoch` (a commit that removed members),
    /// or senders were told to switch to it.
    fn epoch(&mut self, call_id: String, epoch: u64, step: EpochStep, now: Instant) {
        let c = self.call_for(&call_id);
        tracing::debug!(call = %call_id, epoch, ?step, "call epoch");
        if let Some(call) = self.calls.get_mut(&c) {
            match (call.live.as_mut(), step) {
                (Some(live), EpochStep::Committed) => live.committed(epoch),
                (Some(live), EpochStep::Removed) => live.removed(epoch),
                (Some(live), EpochStep::Ready) => live.ready(epoch, now),
                (None, _) => call.live = Some(LiveEpochs::new(KidLayout::default(), epoch)),
            }
            if step != EpochStep::Ready || call.epoch.is_none_or(|e| epoch > e) {
                call.epoch = Some(epoch);
            }
            call.last_activity = now;
        }
        self.ensure_tick(c, now + CALL_TICK);
    }

    /// Every video publisher of the call sends a key frame.
    fn key_frames(&mut self, call_id: String, now: Instant) {
        let c = self.call_for(&call_id);
        let Some(call) = self.calls.get(&c) else {
            return;
        };
        let epoch = call.epoch.unwrap_or_default();
        for p in call.sessions.clone() {
            for source in [Source::Camera, Source::Screen] {
                self.key_requests.push((p, source, None));
            }
        }
        self.flush_key_requests(now);
        self.event(SfuEvent::KeyFrameRequested { call_id, epoch });
    }

    // ---- datagrams -----------------------------------------------------

    /// Handles one datagram received on the shared port.
    /// `arrival` is when it reached the socket ([`crate::net::wall_now`]).
    pub(crate) fn datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        arrival: Duration,
    ) {
        let m = &self.shared.metrics;
        m.packets_in.inc();
        m.bytes_in.inc_by(data.len() as u64);
        self.route_datagram(now, from, data, arrival);
    }

    /// Routes a datagram to its session (or to the worker that owns it) and
    /// processes it.
    fn route_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8], arrival: Duration) {
        let kind = classify(data);
        if kind == PacketKind::Unknown {
            self.drop("unknown_protocol");
            return;
        }
        let sid = match self.by_addr.get(&from) {
            Some(&sid) => sid,
            None => {
                // Maybe a session of another worker (SO_REUSEPORT hashed
                // this peer's packets to our socket).
                if let Some(w) = self.shared.worker_for_addr(&from)
                    && w != self.index
                {
                    self.shared.hand_off(w, from, data, arrival);
                    return;
                }
                if kind != PacketKind::Stun {
                    self.drop("unroutable");
                    return;
                }
                let ufrag = match binding_request_ufrag(data) {
                    Ok(u) => u,
                    Err(_) => {
                        self.drop("bad_stun");
                        return;
                    }
                };
                let local = ufrag.split(|b| *b == b':').next().unwrap_or(&[]);
                let Ok(local) = std::str::from_utf8(local) else {
                    self.drop("bad_stun");
                    return;
                };
                match self.by_ufrag.get(local) {
                    Some(&sid) => sid,
                    None => {
                        if let Some(w) = self.shared.worker_for_ufrag(local)
                            && w != self.index
                        {
                            self.shared.hand_off(w, from, data, arrival);
                            return;
                        }
                        self.drop("unknown_ufrag");
                        return;
                    }
                }
            }
        };
        if !self.global.take(now) {
            self.drop("global_rate_limit");
            return;
        }
        let index = self.index;
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if !s.bucket.take(now) {
            self.shared
                .metrics
                .drops
                .with_label_values(&["session_rate_limit"])
                .inc();
            return;
        }
        if kind == PacketKind::Stun && !s.remotes.contains(&from) {
            // A (new) path for this session: a browser checks every pair of
            // its candidates (loopback and LAN, say) and may use any that
            // works. ICE validates it: only a STUN request with the right
            // credentials gets a response. The newest few paths stay routed.
            if s.remotes.len() >= MAX_PATHS {
                let old = s.remotes.remove(0);
                self.by_addr.remove(&old);
                self.shared.unroute_addr(&old);
            }
            s.remotes.push(from);
            self.by_addr.insert(from, sid);
            self.shared.route_addr(from, index);
        }
        s.last_rx = now;
        let advertised = self.shared.advertised;
        let result = catch_unwind(AssertUnwindSafe(|| {
            s.pc.handle_read(TaggedBytesMut {
                now,
                transport: TransportContext {
                    local_addr: advertised,
                    peer_addr: from,
                    transport_protocol: TransportProtocol::UDP,
                    ecn: None,
                },
                message: BytesMut::from(data),
            })
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                self.drop(match kind {
                    PacketKind::Stun => "stun_rejected",
                    PacketKind::Dtls => "dtls_rejected",
                    PacketKind::Rtp => "srtp_rejected",
                    _ => "srtcp_rejected",
                });
            }
            Err(_) => {
                self.close(sid, DownReason::Fault);
                return;
            }
        }
        self.process(sid, now);
    }

    /// Drains a session's events and messages and acts on them.
    fn process(&mut self, sid: SessionId, now: Instant) {
        let result = catch_unwind(AssertUnwindSafe(|| self.process_inner(sid, now)));
        if result.is_err() {
            self.close(sid, DownReason::Fault);
        }
    }

    fn process_inner(&mut self, sid: SessionId, now: Instant) {
        let mut messages = std::mem::take(&mut self.inbox);
        let mut down: Option<DownReason> = None;
        let mut announce = Vec::new();
        {
            let Some(s) = self.sessions.get_mut(&sid) else {
                return;
            };
            #[cfg(feature = "fault-injection")]
            if s.fault_injected {
                panic!("injected fault in session {sid}");
            }
            while let Some(ev) = s.pc.poll_event() {
                match ev {
                    RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => match state {
                        RTCPeerConnectionState::Connected if !s.up => {
                            s.up = true;
                            announce.push(None);
                            let stats = s.pc.get_stats(now, StatsSelector::None);
                            let profile = stats
                                .transport()
                                .map(|t| t.srtp_cipher.clone())
                                .unwrap_or_default();
                            self.shared
                                .metrics
                                .srtp_profiles
                                .with_label_values(&[profile.as_str()])
                                .inc();
                        }
                        RTCPeerConnectionState::Failed => down = Some(DownReason::Failed),
                        RTCPeerConnectionState::Closed => down = Some(DownReason::Closed),
                        _ => {}
                    },
                    RTCPeerConnectionEvent::OnIceConnectionStateChangeEvent(
                        RTCIceConnectionState::Failed,
                    ) => down = Some(DownReason::Failed),
                    RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                        let mid =
                            s.pc.get_transceivers()
                                .collect::<Vec<_>>()
                                .into_iter()
                                .find_map(|t| {
                                    let tr = s.pc.rtp_transceiver(t)?;
                                    if tr.receiver() == Some(init.receiver_id) {
                                        tr.mid().clone()
                                    } else {
                                        None
                                    }
                                });
                        let Some(source) = mid.and_then(|m| s.mid_sources.get(&m).copied()) else {
                            continue;
                        };
                        let layer = init.rid.as_deref().and_then(layer_of_rid).unwrap_or(0);
                        if source == Source::Audio
                            && s.audio_level_ext.is_none()
                            && let Some(mut r) = s.pc.rtp_receiver(init.receiver_id)
                        {
                            s.audio_level_ext = r
                                .get_parameters()
                                .rtp_parameters
                                .header_extensions
                                .iter()
                                .find(|e| e.uri == rtc::sdp::extmap::AUDIO_LEVEL_URI)
                                .and_then(|e| u8::try_from(e.id).ok());
                        }
                        s.streams.insert(
                            init.ssrc,
                            InStream {
                                source,
                                codec: if source.is_video() {
                                    Codec::Vp8
                                } else {
                                    Codec::Opus
                                },
                                layer,
                                receiver: init.receiver_id,
                                gate: None,
                                window_bytes: 0,
                                bps: 0,
                            },
                        );
                        let st = s.sources.entry(source).or_default();
                        if let Some(slot) = st.layers.get_mut(usize::from(layer)) {
                            *slot = Some(init.ssrc);
                        }
                        if !st.announced {
                            st.announced = true;
                            announce.push(Some((source, init.rid.clone())));
                        }
                    }
                    _ => {}
                }
            }
            while let Some(msg) = s.pc.poll_read() {
                messages.push(msg.message);
            }
        }
        self.touched.push(sid);
        if announce.contains(&None) {
            // Connected: from now on, silence for the ICE timeout reaps it.
            self.arm_reap(sid, now + self.shared.config.ice_timeout);
        }
        if !announce.is_empty() {
            let (call_id, participant, call) = match self.sessions.get(&sid) {
                Some(s) => (
                    self.calls
                        .get(&s.call)
                        .map(|c| c.id.clone())
                        .unwrap_or_default(),
                    s.participant.clone(),
                    s.call,
                ),
                None => return,
            };
            for a in announce {
                match a {
                    None => self.event(SfuEvent::SessionUp {
                        session: sid,
                        call_id: call_id.clone(),
                        participant: participant.clone(),
                    }),
                    Some((source, rid)) => self.event(SfuEvent::TrackPublished {
                        session: sid,
                        call_id: call_id.clone(),
                        participant: participant.clone(),
                        source,
                        rid,
                    }),
                }
            }
            self.plan_call(call, now);
        }
        for msg in messages.drain(..) {
            match msg {
                RTCMessage::RtpPacket(_, packet) => self.on_rtp(sid, packet, now),
                RTCMessage::RtcpPacket(_, packets) => self.on_rtcp(sid, &packets, now),
                _ => {}
            }
        }
        self.inbox = messages;
        self.flush_key_requests(now);
        if let Some(reason) = down {
            self.close(sid, reason);
        }
    }

    // ---- forwarding ----------------------------------------------------

    fn on_rtp(&mut self, sid: SessionId, packet: rtc::rtp::Packet, now: Instant) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let Some(call) = self.calls.get(&s.call) else {
            return;
        };
        let Some(stream) = s.streams.get_mut(&packet.header.ssrc) else {
            self.shared
                .metrics
                .drops
                .with_label_values(&["unknown_ssrc"])
                .inc();
            return;
        };
        let source = stream.source;
        if !s.rights.allows(source) {
            self.shared
                .metrics
                .drops
                .with_label_values(&["no_publish_right"])
                .inc();
            return;
        }
        let Some(live) = call.live.as_ref() else {
            self.shared
                .metrics
                .drops
                .with_label_values(&["no_epoch"])
                .inc();
            return;
        };
        // The E2EE check: only well-formed SFrame frames of a live epoch.
        let payload = &packet.payload[..];
        if payload.is_empty() {
            // Padding only (a browser probing bandwidth): nothing to forward,
            // but the subscribers' numbering closes over it.
            self.shared
                .metrics
                .drops
                .with_label_values(&["padding"])
                .inc();
            let layer = stream.layer;
            let key = crate::forward::source_key(sid, layer, source as u64);
            let Some(routes) = call.routes.get(&(sid, source)) else {
                return;
            };
            for &(sub, slot) in routes {
                if let Some(sl) = self
                    .sessions
                    .get_mut(&sub)
                    .and_then(|subscriber| subscriber.slots.get_mut(slot))
                    && sl.assigned == Some((sid, source))
                    && (!sl.video || sl.layer == Some(layer))
                {
                    sl.rewriter.skip(key, packet.header.sequence_number);
                }
            }
            return;
        }
        let mut key_frame = false;
        let verdict = match stream.codec {
            Codec::Vp8 => match vp8_info(payload) {
                None => Err("bad_vp8_descriptor"),
                Some(info) if info.frame_start => {
                    key_frame = info.key_frame;
                    let frame = payload.get(info.payload_offset..).unwrap_or(&[]);
                    let ok = live.check(Codec::Vp8, frame, now);
                    stream.gate = Some((packet.header.timestamp, ok.is_ok()));
                    ok.map_err(drop_label)
                }
                Some(_) => match stream.gate {
                    Some((ts, true)) if ts == packet.header.timestamp => Ok(()),
                    Some((ts, false)) if ts == packet.header.timestamp => {
                        Err("rest_of_rejected_frame")
                    }
                    _ => Err("no_frame_start"),
                },
            },
            codec => live.check(codec, payload, now).map_err(drop_label),
        };
        if let Err(reason) = verdict {
            self.shared.metrics.drops.with_label_values(&[reason]).inc();
            return;
        }
        stream.window_bytes += payload.len() as u64;
        let layer = stream.layer;
        if source == Source::Audio
            && let Some(level) = s
                .audio_level_ext
                .and_then(|id| packet.header.get_extension(id))
                .and_then(|b| crate::forward::audio_level(&b))
        {
            s.activity.observe(level.0, now);
            s.heard_since_tick = true;
        }
        let Some(routes) = call.routes.get(&(sid, source)) else {
            return;
        };
        let inbound = Inbound {
            publisher: sid,
            source,
            layer,
            key_frame,
            packet: &packet,
        };
        let mut forwarded = 0u64;
        for &(sub, slot) in routes {
            if let Some(subscriber) = self.sessions.get_mut(&sub) {
                match forward_one(subscriber, slot, &inbound, now) {
                    Forward::Sent => {
                        forwarded += 1;
                        self.touched.push(sub);
                    }
                    Forward::NeedKeyFrame(l) => self.key_requests.push((sid, source, Some(l))),
                    Forward::Skipped => {}
                    Forward::Failed => {
                        self.shared
                            .metrics
                            .drops
                            .with_label_values(&["write_rejected"])
                            .inc();
                    }
                }
            }
        }
        #[cfg(feature = "payload-capture")]
        if forwarded > 0
            && let Ok(c) = self.shared.capture.lock()
            && let Some(tx) = c.as_ref()
        {
            let _ = tx.try_send(crate::CapturedPayload {
                publisher: sid,
                sequence: packet.header.sequence_number,
                marker: packet.header.marker,
                source,
                key_frame,
                payload: packet.payload.to_vec(),
            });
        }
        if forwarded > 0 {
            self.forwarded_since = Some(if source.is_video() {
                MediaKind::Video
            } else {
                MediaKind::Audio
            });
        }
        if source.is_video() {
            self.forwarded_video.inc_by(forwarded);
        } else {
            self.forwarded_audio.inc_by(forwarded);
        }
    }

    fn on_rtcp(&mut self, sid: SessionId, packets: &[Box<dyn rtc::rtcp::Packet>], _now: Instant) {
        let Some(s) = self.sessions.get(&sid) else {
            return;
        };
        for p in packets {
            let any = p.as_any();
            let media_ssrcs: Vec<u32> =
                if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
                    vec![pli.media_ssrc]
                } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
                    fir.fir.iter().map(|e| e.ssrc).collect()
                } else {
                    continue;
                };
            for ssrc in media_ssrcs {
                if let Some(slot) = s.slots.iter().find(|sl| sl.ssrc == ssrc)
                    && let Some((publisher, source)) = slot.assigned
                {
                    self.key_requests
                        .push((publisher, source, Some(slot.target)));
                }
            }
        }
    }

    /// Sends the key-frame requests collected so far, throttled per source.
    fn flush_key_requests(&mut self, now: Instant) {
        let requests = std::mem::take(&mut self.key_requests);
        for (publisher, source, _layer) in requests {
            let Some(p) = self.sessions.get_mut(&publisher) else {
                continue;
            };
            let audience = self
                .calls
                .get(&p.call)
                .and_then(|c| c.routes.get(&(publisher, source)))
                .map_or(0, Vec::len);
            let Some(st) = p.sources.get_mut(&source) else {
                continue;
            };
            if st.throttle.request(now, audience) {
                send_pli(p, source);
                self.shared.metrics.pli.inc();
                self.touched.push(publisher);
            }
        }
    }

    // ---- slot planning ---------------------------------------------------

    /// Re-ranks speakers and re-assigns every subscriber's slots in a call.
    fn plan_call(&mut self, call_key: u64, now: Instant) {
        let Some(call) = self.calls.get_mut(&call_key) else {
            return;
        };
        // Rank audio publishers by smoothed loudness.
        let audio_slots = self.shared.config.audio_slots;
        let candidates: Vec<(SessionId, f32)> = call
            .sessions
            .iter()
            .filter_map(|id| self.sessions.get(id))
            .filter(|s| s.sources.contains_key(&Source::Audio) && s.rights.audio)
            .map(|s| (s.id, s.activity.score))
            .collect();
        call.speakers = rank_speakers(&call.speakers, &candidates, audio_slots + 1, SPEAKER_MARGIN);
        let dominant = call.speakers.first().copied().filter(|id| {
            candidates
                .iter()
                .any(|(c, score)| c == id && *score >= 20.0)
        });
        if dominant.is_some() && dominant != call.dominant {
            call.dominant = dominant;
            if let Some(p) = dominant.and_then(|d| self.sessions.get(&d)) {
                let _ = self.shared.events.send(SfuEvent::DominantSpeaker {
                    call_id: call.id.clone(),
                    participant: p.participant.clone(),
                });
            }
        }
        // Everyone who publishes audio, loudest-ranked first, then by join.
        let mut audio_order: Vec<SessionId> = call.speakers.clone();
        for (id, _) in &candidates {
            if !audio_order.contains(id) {
                audio_order.push(*id);
            }
        }
        // Video candidates: screens, then cameras by recent speaking.
        let mut screens = Vec::new();
        let mut cameras: Vec<(SessionId, Option<Instant>, Instant)> = Vec::new();
        for s in call.sessions.iter().filter_map(|id| self.sessions.get(id)) {
            if s.sources.contains_key(&Source::Screen) && s.rights.screen {
                screens.push(s.id);
            }
            if s.sources.contains_key(&Source::Camera) && s.rights.camera {
                cameras.push((s.id, s.activity.last_spoke, s.joined));
            }
        }
        cameras.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
        let participants: HashMap<SessionId, String> = call
            .sessions
            .iter()
            .filter_map(|id| self.sessions.get(id).map(|s| (s.id, s.participant.clone())))
            .collect();

        let mut routes: HashMap<(SessionId, Source), Vec<(SessionId, usize)>> = HashMap::new();
        let mut new_assignments = Vec::new();
        let mut layer_counts = [0i64; 3];
        let members = call.sessions.clone();
        for sub_id in &members {
            // Everything about the publishers we need, gathered first.
            let Some(sub) = self.sessions.get(sub_id) else {
                continue;
            };
            let pins: Vec<(SessionId, Source)> = sub
                .pins
                .iter()
                .filter_map(|(p, src)| {
                    participants
                        .iter()
                        .find(|(_, name)| *name == p)
                        .map(|(id, _)| (*id, *src))
                })
                .collect();
            let mut audio_pick = audio_order
                .iter()
                .filter(|id| *id != sub_id)
                .map(|id| (*id, Source::Audio));
            let mut video_pick: Vec<(SessionId, Source)> = Vec::new();
            for id in &screens {
                if id != sub_id {
                    video_pick.push((*id, Source::Screen));
                }
            }
            for p in pins {
                if p.0 != *sub_id && !video_pick.contains(&p) {
                    video_pick.push(p);
                }
            }
            for (id, _, _) in &cameras {
                if id != sub_id && !video_pick.contains(&(*id, Source::Camera)) {
                    video_pick.push((*id, Source::Camera));
                }
            }
            let mut video_pick = video_pick.into_iter();
            let video_slots = sub.slots.iter().filter(|s| s.video).count().max(1) as u64;
            let estimate = sub.tap.estimate_bps.load(Ordering::Relaxed);
            // With an estimator but no estimate yet, start on the lowest layer.
            let budget = if estimate > 0 {
                Some(estimate / video_slots)
            } else if sub.bwe {
                Some(0)
            } else {
                None
            };
            let max_layer = sub.prefs.max_layer;
            // Who should be seen and heard, in order; then slots keep whom
            // they carry if still chosen (a tile does not jump between
            // slots when speakers trade places), and free slots take the
            // rest in order.
            let audio_slots = sub.slots.iter().filter(|s| !s.video).count();
            let mut chosen_audio: Vec<(SessionId, Source)> =
                audio_pick.by_ref().take(audio_slots).collect();
            let mut chosen_video: Vec<(SessionId, Source)> =
                video_pick.by_ref().take(video_slots as usize).collect();
            let mut kept: Vec<Option<(SessionId, Source)>> = sub
                .slots
                .iter()
                .map(|slot| {
                    let chosen = if slot.video {
                        &mut chosen_video
                    } else {
                        &mut chosen_audio
                    };
                    let current = slot.assigned?;
                    let at = chosen.iter().position(|c| *c == current)?;
                    Some(chosen.remove(at))
                })
                .collect();
            let mut chosen_audio = chosen_audio.into_iter();
            let mut chosen_video = chosen_video.into_iter();
            let mut plan = Vec::with_capacity(sub.slots.len());
            for (slot, keep) in sub.slots.iter().zip(kept.iter_mut()) {
                let assigned = match keep.take() {
                    Some(a) => Some(a),
                    None if slot.video => chosen_video.next(),
                    None => chosen_audio.next(),
                };
                let target = match assigned {
                    Some((p, src)) if slot.video => {
                        let available: Vec<(u8, u64)> = self
                            .sessions
                            .get(&p)
                            .map(|ps| {
                                ps.streams
                                    .values()
                                    .filter(|st| st.source == src)
                                    .map(|st| (st.layer, st.bps))
                                    .collect()
                            })
                            .unwrap_or_default();
                        choose_layer(&available, budget, max_layer).unwrap_or(0)
                    }
                    _ => 0,
                };
                plan.push((assigned, target));
            }
            new_assignments.push((*sub_id, plan));
        }
        for (sub_id, plan) in new_assignments {
            let Some(sub) = self.sessions.get_mut(&sub_id) else {
                continue;
            };
            for (i, (assigned, target)) in plan.into_iter().enumerate() {
                let Some(slot) = sub.slots.get_mut(i) else {
                    continue;
                };
                if slot.assigned != assigned {
                    slot.assigned = assigned;
                    slot.layer = None;
                    // Whatever comes next follows the last packet sent, even
                    // if it is the publisher this slot carried before.
                    slot.rewriter.rebase();
                    if let (Some((p, src)), true) = (assigned, slot.video) {
                        self.key_requests.push((p, src, Some(target)));
                    }
                }
                if slot.video && slot.target != target {
                    slot.target = target;
                    if let Some((p, src)) = assigned {
                        self.key_requests.push((p, src, Some(target)));
                    }
                }
                if let Some(key) = assigned {
                    routes.entry(key).or_default().push((sub_id, i));
                    if slot.video
                        && let Some(c) =
                            layer_counts.get_mut(usize::from(slot.layer.unwrap_or(target)))
                    {
                        *c += 1;
                    }
                }
            }
        }
        if let Some(call) = self.calls.get_mut(&call_key) {
            call.routes = routes;
        }
        for (i, c) in layer_counts.iter().enumerate() {
            self.shared
                .metrics
                .layers
                .with_label_values(&[["0", "1", "2"][i]])
                .set(*c);
        }
        self.flush_key_requests(now);
    }

    fn call_tick(&mut self, call_key: u64, now: Instant) {
        let Some(call) = self.calls.get_mut(&call_key) else {
            return;
        };
        call.tick_armed = false;
        if call.sessions.is_empty() {
            let forget_at = call.last_activity + CALL_IDLE;
            if forget_at <= now {
                if let Some(call) = self.calls.remove(&call_key) {
                    self.call_ids.remove(&call.id);
                }
            } else {
                self.ensure_tick(call_key, forget_at);
            }
            return;
        }
        let tick = CALL_TICK.as_secs_f64();
        for id in call.sessions.clone() {
            if let Some(s) = self.sessions.get_mut(&id) {
                if !s.heard_since_tick {
                    s.activity.decay(0.7);
                }
                s.heard_since_tick = false;
                for st in s.streams.values_mut() {
                    st.bps = ((st.window_bytes * 8) as f64 / tick) as u64;
                    st.window_bytes = 0;
                }
                let mut due = Vec::new();
                for (src, st) in s.sources.iter_mut() {
                    if st.throttle.flush(now) {
                        due.push(*src);
                    }
                }
                for src in due {
                    send_pli(s, src);
                    self.shared.metrics.pli.inc();
                    self.touched.push(id);
                }
                let nacks = s.tap.nacks.swap(0, Ordering::Relaxed);
                self.shared.metrics.nack.inc_by(nacks);
            }
        }
        self.plan_call(call_key, now);
        self.ensure_tick(call_key, now + CALL_TICK);
    }

    // ---- timers and output ---------------------------------------------

    /// Runs every timer that is due.
    pub(crate) fn timers(&mut self, now: Instant) {
        while let Some(Reverse((t, timer))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Session(sid) => {
                    let Some(s) = self.sessions.get_mut(&sid) else {
                        continue;
                    };
                    if s.armed != Some(t) {
                        continue; // superseded
                    }
                    s.armed = None;
                    let r = catch_unwind(AssertUnwindSafe(|| s.pc.handle_timeout(now)));
                    if r.is_err() {
                        self.close(sid, DownReason::Fault);
                        continue;
                    }
                    self.process(sid, now);
                }
                Timer::Reap(sid) => {
                    let Some(s) = self.sessions.get_mut(&sid) else {
                        continue;
                    };
                    if s.reap_armed != Some(t) {
                        continue; // superseded
                    }
                    s.reap_armed = None;
                    let timeout = if s.up {
                        self.shared.config.ice_timeout
                    } else {
                        self.shared.config.setup_timeout
                    };
                    let deadline = s.last_rx + timeout;
                    if deadline <= now {
                        self.close(sid, DownReason::Timeout);
                    } else {
                        self.arm_reap(sid, deadline);
                    }
                }
                Timer::Call(c) => self.call_tick(c, now),
            }
        }
    }

    /// Sends every touched session's outgoing datagrams and re-arms its
    /// timer. Returns (datagrams, bytes) the kernel took.
    ///
    /// A large call's fan-out touches many sessions at once; from
    /// [`crate::SfuConfig::parallel_send_from`] on, the worker's send helper
    /// (a thread that lives as long as the worker) takes half of them, so
    /// the per-copy work (the `rtc` write path with SRTP, and `sendmmsg`)
    /// runs on two cores.
    pub(crate) fn flush(&mut self, out: &mut SendQueue, socket: &UdpSocket) -> (u64, u64) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        let helper = self.helper.as_ref().filter(|_| {
            self.shared
                .config
                .parallel_send_from
                .is_some_and(|from| touched.len() >= from.max(2))
        });
        let (faulted, sent) = if let Some(pool) = helper {
            let mut parts: Vec<(SessionId, &mut Session)> = self
                .sessions
                .iter_mut()
                .filter(|(sid, _)| touched.binary_search(sid).is_ok())
                .map(|(sid, s)| (*sid, s))
                .collect();
            let half = parts.len() / 2;
            let (a, b) = parts.split_at_mut(half);
            let mut helped: Option<(Vec<SessionId>, (u64, u64))> = None;
            // The send queue's system-call buffers stay on their thread, so
            // the helper has its own.
            let queue = &mut self.helper_queue;
            let mut faulted = Vec::new();
            let mut sent = (0, 0);
            pool.in_place_scope(|scope| {
                scope.spawn(|_| {
                    helped = catch_unwind(AssertUnwindSafe(|| {
                        let faulted = poll_writes(&mut *b, queue);
                        (faulted, queue.flush(socket))
                    }))
                    .ok();
                });
                faulted = poll_writes(a, out);
                sent = out.flush(socket);
            });
            match helped {
                Some((f, (n, bytes))) => {
                    faulted.extend(f);
                    sent = (sent.0 + n, sent.1 + bytes);
                }
                // poll_writes catches panics; this is only a backstop.
                None => {
                    self.helper_queue.clear();
                    faulted.extend(b.iter().map(|(sid, _)| *sid));
                }
            }
            (faulted, sent)
        } else {
            let mut faulted = Vec::new();
            for sid in &touched {
                if let Some(s) = self.sessions.get_mut(sid) {
                    faulted.extend(poll_writes(&mut [(*sid, s)], out));
                }
            }
            (faulted, out.flush(socket))
        };
        self.shared
            .metrics
            .gso_datagrams
            .inc_by(out.take_segmented() + self.helper_queue.take_segmented());
        for sid in faulted {
            self.close(sid, DownReason::Fault);
        }
        for sid in &touched {
            self.arm(*sid);
        }
        touched.clear();
        self.touched = touched;
        sent
    }

    /// Closes a session and tells signaling.
    pub(crate) fn close(&mut self, sid: SessionId, reason: DownReason) {
        let Some(mut s) = self.sessions.remove(&sid) else {
            return;
        };
        let _ = catch_unwind(AssertUnwindSafe(|| s.pc.close()));
        self.by_ufrag.remove(&s.ufrag);
        self.shared.unroute_ufrag(&s.ufrag);
        for addr in &s.remotes {
            self.by_addr.remove(addr);
            self.shared.unroute_addr(addr);
        }
        self.shared.session_count.fetch_sub(1, Ordering::Relaxed);
        self.shared.metrics.sessions.dec();
        let mut call_id = String::new();
        if let Some(call) = self.calls.get_mut(&s.call) {
            call.sessions.retain(|x| *x != sid);
            call.speakers.retain(|x| *x != sid);
            if call.dominant == Some(sid) {
                call.dominant = None;
            }
            call.last_activity = Instant::now();
            call_id = call.id.clone();
        }
        self.event(SfuEvent::SessionDown {
            session: sid,
            call_id,
            participant: s.participant,
            reason,
        });
        self.plan_call(s.call, Instant::now());
    }

    /// Number of open sessions on this worker.
    pub(crate) fn session_count(&self) -> usize {
        self.sessions.len()
    }
}

/// Moves the sessions' outgoing datagrams to `out`; returns the sessions
/// whose state machine panicked.
fn poll_writes(sessions: &mut [(SessionId, &mut Session)], out: &mut SendQueue) -> Vec<SessionId> {
    let mut faulted = Vec::new();
    for (sid, s) in sessions.iter_mut() {
        let r = catch_unwind(AssertUnwindSafe(|| {
            while let Some(msg) = s.pc.poll_write() {
                #[cfg(feature = "fault-injection")]
                if s.lose_media > 0 && classify(&msg.message) == PacketKind::Rtp {
                    s.lose_media -= 1;
                    continue;
                }
                out.push(msg.transport.peer_addr, msg.message);
            }
        }));
        if r.is_err() {
            faulted.push(*sid);
        }
    }
    faulted
}

enum Forward {
    Sent,
    Skipped,
    NeedKeyFrame(u8),
    Failed,
}

/// Forwards one packet into one subscriber slot, switching layers only on
/// key frames and keeping the outgoing numbering continuous.
/// What happened to a call's epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EpochStep {
    Committed,
    Removed,
    Ready,
}

fn forward_one(sub: &mut Session, slot_index: usize, inb: &Inbound<'_>, now: Instant) -> Forward {
    if !sub.up {
        return Forward::Skipped;
    }
    let Some(slot) = sub.slots.get_mut(slot_index) else {
        return Forward::Skipped;
    };
    if slot.assigned != Some((inb.publisher, inb.source)) {
        return Forward::Skipped;
    }
    if slot.video {
        let on_current = slot.layer == Some(inb.layer);
        let is_target = inb.layer == slot.target;
        if is_target && !on_current {
            if inb.key_frame {
                slot.layer = Some(inb.layer);
            } else {
                return if slot.layer.is_none() {
                    Forward::NeedKeyFrame(inb.layer)
                } else {
                    Forward::Skipped
                };
            }
        } else if !on_current {
            return Forward::Skipped;
        }
    }
    let source_key = crate::forward::source_key(inb.publisher, inb.layer, inb.source as u64);
    let rw = slot.rewriter.rewrite(
        source_key,
        inb.packet.header.sequence_number,
        inb.packet.header.timestamp,
        slot.clock_rate,
        now,
    );
    let mut out = rtc::rtp::Packet {
        header: rtc::rtp::header::Header {
            version: 2,
            padding: false,
            extension: false,
            marker: inb.packet.header.marker,
            payload_type: slot.pt,
            sequence_number: rw.seq,
            timestamp: rw.timestamp,
            ssrc: slot.ssrc,
            csrc: Vec::new(),
            extension_profile: 0,
            extensions: Vec::new(),
            extensions_padding: 0,
        },
        payload: inb.packet.payload.clone(),
    };
    out.header.padding = false;
    let sender = slot.sender;
    let Some(mut s) = sub.pc.rtp_sender(sender) else {
        return Forward::Failed;
    };
    match s.write_rtp(now, out) {
        Ok(()) => Forward::Sent,
        Err(_) => Forward::Failed,
    }
}

fn send_pli(p: &mut Session, source: Source) {
    let Some(st) = p.sources.get(&source) else {
        return;
    };
    for ssrc in st.layers.iter().flatten() {
        let Some(receiver) = p.streams.get(ssrc).map(|s| s.receiver) else {
            continue;
        };
        if let Some(mut r) = p.pc.rtp_receiver(receiver) {
            let _ = r.write_rtcp(
                Instant::now(),
                vec![Box::new(PictureLossIndication {
                    sender_ssrc: 0,
                    media_ssrc: *ssrc,
                })],
            );
        }
    }
}
