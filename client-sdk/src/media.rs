//! Media over WebRTC: one connection from a joined [`CallSession`] to the
//! call's SFU that publishes this device's SFrame-protected microphone and
//! camera and receives the frames the SFU forwards into its slots.
//!
//! ```no_run
//! # async fn demo(call: &conclave_client::session::CallSession) -> Result<(), conclave_client::media::MediaError> {
//! use std::time::Duration;
//! use conclave_client::media::{MediaConnection, MediaOptions};
//!
//! let media = MediaConnection::connect(call, MediaOptions::default()).await?;
//! media.send_audio_frame(b"opus frame", 30).await?;
//! let key = media.needs_key_frame();
//! # let vp8_frame: Vec<u8> = Vec::new();
//! media.send_video_frame(&vp8_frame, key, Duration::from_millis(0)).await?;
//! while let Some(frame) = media.next_frame().await {
//!     // frame.sender, frame.source, frame.data ...
//! #   let _ = frame;
//! }
//! # Ok(()) }
//! ```
//!
//! How it fits the protocol (`docs/protocol.md`):
//! - the offer has, in this order, a `sendonly` Opus m-line (the microphone,
//!   with the RFC 6464 audio-level extension), a `sendonly` VP8 m-line (the
//!   camera), then the `recvonly` audio and video receive slots. It is sent
//!   as `media_offer` through the session, which routes the `media_answer`
//!   back here; ICE is not trickled (the SFU is ICE-lite).
//! - every frame is SFrame-protected with the session's current sending key
//!   before packetization (Opus: one frame per packet; VP8: RFC 7741 with the
//!   clear prefix left readable), and every received frame is authenticated
//!   and decrypted after reassembly. Who sent it comes from the SFrame KID
//!   (leaf, epoch, stream), never from the SFU's rewritten SSRCs.
//! - a key frame is wanted after connecting, after each `epoch_ready` (the
//!   session switched sending keys) and whenever the SFU sends a PLI/FIR:
//!   check [`MediaConnection::needs_key_frame`] before encoding each frame.

pub mod vp8;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use conclave_protocol::mls::Principal;
use conclave_protocol::sframe::{Codec, MAX_OVERHEAD, SframeError, vp8_is_key_frame};
use conclave_protocol::signal::{MediaSource, MediaSourceMid};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::sansio::Protocol;
use rtc::sdp::extmap::{AUDIO_LEVEL_URI, SDES_MID_URI};
use tokio::sync::{Mutex as AsyncMutex, mpsc, watch};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
    Registry, SettingEngineBuilder, SrtpProtectionProfile, configure_rtcp_reports,
};
use webrtc::rtp_transceiver::RtpTransceiver;

use crate::agent::MlsAgent;
use crate::crypto::stream;
use crate::session::{CallSession, MediaLink, SessionError, lock};

/// RTP payload type of Opus.
pub const OPUS_PAYLOAD_TYPE: u8 = 111;
/// RTP payload type of VP8.
pub const VP8_PAYLOAD_TYPE: u8 = 96;
/// RTP timestamp step of one 20 ms Opus frame at 48 kHz.
pub const OPUS_FRAME_TICKS: u32 = 960;
/// RTP clock rate of video.
pub const VIDEO_CLOCK_RATE: u32 = 90_000;

/// Received frames waiting for [`MediaConnection::next_frame`]; more are dropped.
const RECEIVE_QUEUE: usize = 1024;
/// Least time between two key-frame requests for one receive slot.
const PLI_INTERVAL: Duration = Duration::from_millis(500);
/// How long [`MediaConnection::close`] waits for the connection to stop.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The interceptor position of [`KeyFrameRequests`]: near the application.
pub const KEY_FRAME_TAP_SLOT: usize = 20_000;

/// How to connect.
#[derive(Clone, Debug)]
pub struct MediaOptions {
    /// Local address to bind the UDP socket to. `0.0.0.0` binds every
    /// non-loopback interface; tests use `127.0.0.1`.
    pub bind_ip: IpAddr,
    /// Local UDP port (0: any).
    pub port: u16,
    /// Publish a microphone (Opus) stream.
    pub publish_audio: bool,
    /// Publish a camera (VP8) stream.
    pub publish_camera: bool,
    /// Audio receive slots to ask for (the SFU grants at most 3).
    pub audio_slots: usize,
    /// Video receive slots to ask for (the SFU grants at most 9).
    pub video_slots: usize,
    /// How long to wait for ICE gathering, the SFU's answer, and ICE + DTLS.
    pub connect_timeout: Duration,
}

impl Default for MediaOptions {
    fn default() -> Self {
        Self {
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 0,
            publish_audio: true,
            publish_camera: true,
            audio_slots: 3,
            video_slots: 2,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl MediaOptions {
    /// The defaults, bound to 127.0.0.1 only (an SFU on the same machine).
    pub fn loopback() -> Self {
        Self {
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ..Self::default()
        }
    }
}

/// Why a media operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The WebRTC stack refused an operation.
    #[error("WebRTC: {0}")]
    WebRtc(String),
    /// The signaling session failed or the server refused the offer.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// Frame protection failed (no sending key yet, ...).
    #[error("SFrame: {0}")]
    Sframe(#[from] SframeError),
    /// A step did not finish in time.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The connection failed or was closed.
    #[error("media connection {0}")]
    Closed(String),
    /// This connection was opened without that stream.
    #[error("this connection does not publish {0}")]
    NotPublishing(&'static str),
    /// The frame cannot be sent as given.
    #[error("invalid frame: {0}")]
    InvalidFrame(&'static str),
}

fn webrtc_err(e: impl fmt::Display) -> MediaError {
    MediaError::WebRtc(e.to_string())
}

/// One frame received, authenticated and decrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedFrame {
    /// The sender's MLS leaf index (from the SFrame KID).
    pub leaf: u32,
    /// The sender's user and device, if the leaf's member is known for the
    /// frame's epoch.
    pub sender: Option<Principal>,
    /// The sender's stream (from the KID's stream context).
    pub source: MediaSource,
    /// The MLS epoch whose key protected the frame.
    pub epoch: u64,
    /// Which receive slot of its kind (audio or video) it arrived on, if known.
    pub slot: Option<usize>,
    /// A VP8 key frame (always false for audio).
    pub key_frame: bool,
    /// RTP timestamp of the frame (the slot's clock: the SFU keeps a slot's
    /// timestamps continuous when the sender behind it changes).
    pub rtp_timestamp: u32,
    /// The clear frame (Opus packet or VP8 frame).
    pub data: Vec<u8>,
}

/// Counters of one media connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MediaStats {
    /// Audio frames sent.
    pub audio_frames_sent: u64,
    /// Video frames sent.
    pub video_frames_sent: u64,
    /// RTP packets sent.
    pub packets_sent: u64,
    /// Frames received and decrypted.
    pub frames_received: u64,
    /// Complete frames that failed to authenticate or decrypt.
    pub decrypt_failures: u64,
    /// Video frames given up because a packet was missing or malformed.
    pub frames_lost: u64,
    /// Decrypted frames dropped because nobody read them in time.
    pub frames_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    audio_frames_sent: AtomicU64,
    video_frames_sent: AtomicU64,
    packets_sent: AtomicU64,
    frames_received: AtomicU64,
    decrypt_failures: AtomicU64,
    frames_lost: AtomicU64,
    frames_dropped: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Members by leaf, per epoch, for attributing frames.
type RosterCache = VecDeque<(u64, Vec<(u32, Principal)>)>;

/// What the connection's callbacks and track readers share.
struct Shared {
    agent: Arc<Mutex<MlsAgent>>,
    link: Arc<MediaLink>,
    state: watch::Sender<RTCPeerConnectionState>,
    gathering: watch::Sender<RTCIceGatheringState>,
    frames: mpsc::Sender<ReceivedFrame>,
    pc: OnceLock<Weak<dyn PeerConnection>>,
    /// Mids of the audio and the video receive slots, in slot order.
    slot_mids: OnceLock<(Vec<String>, Vec<String>)>,
    /// An SSRC of ours to name as the sender of RTCP feedback.
    feedback_ssrc: u32,
    counters: Counters,
    rosters: Mutex<RosterCache>,
}

impl Shared {
    fn rosters(&self) -> MutexGuard<'_, RosterCache> {
        self.rosters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The member at `leaf` in `epoch`, if that epoch's roster is known: it
    /// is read from the agent while the epoch is current and kept for the
    /// previous epoch, whose frames may still be in flight.
    fn principal(&self, epoch: u64, leaf: u32) -> Option<Principal> {
        let find = |members: &[(u32, Principal)]| {
            members
                .iter()
                .find(|(l, _)| *l == leaf)
                .map(|(_, p)| p.clone())
        };
        if let Some((_, members)) = self.rosters().iter().find(|(e, _)| *e == epoch) {
            return find(members);
        }
        let members: Vec<(u32, Principal)> = {
            let agent = lock(&self.agent);
            if agent.epoch() != Some(epoch) {
                return None;
            }
            agent
                .roster()
                .ok()?
                .into_iter()
                .map(|m| (m.leaf, m.principal))
                .collect()
        };
        let found = find(&members);
        let mut rosters = self.rosters();
        rosters.push_back((epoch, members));
        while rosters.len() > 2 {
            rosters.pop_front();
        }
        found
    }

    /// Authenticates and decrypts one received frame and queues it.
    fn deliver(&self, codec: Codec, protected: &[u8], slot: Option<usize>, rtp_timestamp: u32) {
        let mut out = vec![0u8; protected.len()];
        let result = lock(&self.agent)
            .crypto()
            .decrypt(codec, protected, &mut out);
        let d = match result {
            Ok(d) => d,
            Err(e) => {
                bump(&self.counters.decrypt_failures);
                tracing::debug!(error = %e, ?codec, len = protected.len(), "undecryptable frame");
                return;
            }
        };
        out.truncate(d.len);
        let source = match (codec, d.context) {
            (Codec::Vp8, stream::SCREEN) => MediaSource::Screen,
            (Codec::Vp8, _) => MediaSource::Camera,
            _ => MediaSource::Audio,
        };
        let frame = ReceivedFrame {
            leaf: d.leaf,
            sender: self.principal(d.epoch, d.leaf),
            source,
            epoch: d.epoch,
            slot,
            key_frame: codec == Codec::Vp8 && vp8_is_key_frame(&out),
            rtp_timestamp,
            data: out,
        };
        bump(&self.counters.frames_received);
        if self.frames.try_send(frame).is_err() {
            bump(&self.counters.frames_dropped);
        }
    }

    /// The receive slot behind a track's receiver.
    async fn slot_of(
        &self,
        receiver: rtc::rtp_transceiver::RTCRtpReceiverId,
        audio: bool,
    ) -> Option<usize> {
        let pc = self.pc.get()?.upgrade()?;
        let (audio_mids, video_mids) = self.slot_mids.get()?;
        for t in pc.get_transceivers().await {
            let Ok(Some(r)) = t.receiver().await else {
                continue;
            };
            if r.id() != receiver {
                continue;
            }
            let mid = t.mid().await.ok().flatten()?;
            let mids = if audio { audio_mids } else { video_mids };
            return mids.iter().position(|m| *m == mid);
        }
        None
    }
}

/// Receives the connection's callbacks. `PeerConnectionEventHandler` is an
/// `#[async_trait]` trait; its methods are written in the expanded form so
/// this crate needs no `async-trait` dependency.
struct Handler {
    shared: Arc<Shared>,
}

type HandlerFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

impl PeerConnectionEventHandler for Handler {
    fn on_ice_gathering_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCIceGatheringState,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        self.shared.gathering.send_replace(state);
        Box::pin(std::future::ready(()))
    }

    fn on_connection_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCPeerConnectionState,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        tracing::debug!(%state, "media connection state");
        self.shared.state.send_replace(state);
        Box::pin(std::future::ready(()))
    }

    fn on_track<'life0, 'async_trait>(
        &'life0 self,
        track: Arc<dyn TrackRemote>,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        // This runs on the connection's driver: read on a task of its own.
        tokio::spawn(read_track(self.shared.clone(), track));
        Box::pin(std::future::ready(()))
    }
}

/// Reads one receive slot until it ends: reassembles, decrypts, queues.
async fn read_track(shared: Arc<Shared>, track: Arc<dyn TrackRemote>) {
    let audio = match track.kind().await {
        RtpCodecKind::Audio => true,
        RtpCodecKind::Video => false,
        _ => return,
    };
    let mut slot = None;
    let mut frames = vp8::Reassembler::new();
    let mut last_pli: Option<Instant> = None;
    while let Some(event) = track.poll().await {
        match event {
            TrackRemoteEvent::OnOpen(init) => {
                slot = shared.slot_of(init.receiver_id, audio).await;
            }
            TrackRemoteEvent::OnRtpPacket(packet) => {
                let h = &packet.header;
                if audio {
                    shared.deliver(Codec::Opus, &packet.payload, slot, h.timestamp);
                    continue;
                }
                let pushed = frames.push(h.sequence_number, h.timestamp, h.marker, &packet.payload);
                if pushed.lost {
                    bump(&shared.counters.frames_lost);
                    if last_pli.is_none_or(|t| t.elapsed() >= PLI_INTERVAL) {
                        last_pli = Some(Instant::now());
                        let pli = PictureLossIndication {
                            sender_ssrc: shared.feedback_ssrc,
                            media_ssrc: h.ssrc,
                        };
                        if let Err(e) = track.write_rtcp(vec![Box::new(pli)]).await {
                            tracing::debug!(error = %e, "could not request a key frame");
                        }
                    }
                }
                if let Some(frame) = pushed.frame {
                    shared.deliver(Codec::Vp8, &frame, slot, h.timestamp);
                }
            }
            TrackRemoteEvent::OnEnded => return,
            _ => {}
        }
    }
}

/// An `rtc` interceptor that turns the SFU's key-frame requests (PLI, FIR)
/// into calls of `on_request(ssrc)` ("send a key frame next on `ssrc`"),
/// one per SSRC a request names. The chain's end drops inbound RTCP
/// otherwise. Used by [`MediaConnection`] and by the load generator's
/// sans-IO peers, which publish several video streams and key only the one
/// asked for.
pub struct KeyFrameRequests<F> {
    on_request: F,
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
}

impl<F> std::fmt::Debug for KeyFrameRequests<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFrameRequests")
            .field("reads", &self.reads.len())
            .field("writes", &self.writes.len())
            .finish_non_exhaustive()
    }
}

impl<F: Fn(u32)> KeyFrameRequests<F> {
    /// Calls `on_request` with the media SSRC of every inbound PLI and of
    /// every entry of an inbound FIR.
    pub fn new(on_request: F) -> Self {
        Self {
            on_request,
            reads: VecDeque::new(),
            writes: VecDeque::new(),
        }
    }
}

impl<F: Fn(u32)> Protocol<TaggedPacket, TaggedPacket, ()> for KeyFrameRequests<F> {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            for p in packets {
                let any = p.as_any();
                if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
                    (self.on_request)(pli.media_ssrc);
                } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
                    for entry in &fir.fir {
                        (self.on_request)(entry.ssrc);
                    }
                }
            }
        }
        self.reads.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.reads.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.writes.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.writes.pop_front()
    }
}

impl<F: Fn(u32) + Send + Sync> Interceptor for KeyFrameRequests<F> {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// What a sender negotiated: packets must match it or the stack drops them
/// (while `write_rtp` still returns Ok).
#[derive(Clone, Debug)]
struct SendParams {
    payload_type: u8,
    mid: Option<(u8, Bytes)>,
    audio_level: Option<u8>,
}

#[derive(Debug)]
struct SendState {
    seq: u16,
    /// Next audio timestamp; for video, the random base added to media time.
    timestamp: u32,
    params: Option<SendParams>,
    scratch: Vec<u8>,
}

/// One published stream.
struct Outbound {
    what: &'static str,
    mime: &'static str,
    ssrc: u32,
    track: Arc<TrackLocalStaticRTP>,
    transceiver: Arc<dyn RtpTransceiver>,
    state: AsyncMutex<SendState>,
}

impl Outbound {
    async fn params(&self, state: &mut SendState) -> Result<SendParams, MediaError> {
        if let Some(p) = &state.params {
            return Ok(p.clone());
        }
        let sender = self
            .transceiver
            .sender()
            .await
            .map_err(webrtc_err)?
            .ok_or(MediaError::NotPublishing(self.what))?;
        let params = sender.get_parameters().await.map_err(webrtc_err)?;
        let payload_type = params
            .rtp_parameters
            .codecs
            .iter()
            .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(self.mime))
            .map(|c| c.payload_type)
            .ok_or(MediaError::NotPublishing(self.what))?;
        let ext = |uri: &str| {
            params
                .rtp_parameters
                .header_extensions
                .iter()
                .find(|e| e.uri == uri)
                .and_then(|e| u8::try_from(e.id).ok())
        };
        let mid = match (ext(SDES_MID_URI), self.transceiver.mid().await) {
            (Some(id), Ok(Some(mid))) => Some((id, Bytes::from(mid.into_bytes()))),
            _ => None,
        };
        let p = SendParams {
            payload_type,
            mid,
            audio_level: ext(AUDIO_LEVEL_URI),
        };
        state.params = Some(p.clone());
        Ok(p)
    }

    async fn write(
        &self,
        params: &SendParams,
        seq: u16,
        timestamp: u32,
        marker: bool,
        audio_level: Option<u8>,
        payload: Bytes,
    ) -> Result<(), MediaError> {
        let mut header = rtc::rtp::header::Header {
            version: 2,
            marker,
            payload_type: params.payload_type,
            sequence_number: seq,
            timestamp,
            ssrc: self.ssrc,
            ..Default::default()
        };
        if let Some((id, mid)) = &params.mid {
            header.set_extension(*id, mid.clone()).map_err(webrtc_err)?;
        }
        if let (Some(id), Some(level)) = (params.audio_level, audio_level) {
            // RFC 6464: V (voice activity) flag and the level in -dBov.
            let level = level.min(127);
            let voice = if level < 127 { 0x80 } else { 0 };
            header
                .set_extension(id, Bytes::copy_from_slice(&[voice | level]))
                .map_err(webrtc_err)?;
        }
        self.track
            .write_rtp(rtc::rtp::Packet { header, payload })
            .await
            .map_err(webrtc_err)
    }
}

/// This device's WebRTC connection to the call's SFU. See the module
/// documentation. All methods take `&self`: share it in an `Arc` to send
/// and receive from different tasks.
pub struct MediaConnection {
    pc: Arc<dyn PeerConnection>,
    shared: Arc<Shared>,
    audio: Option<Outbound>,
    camera: Option<Outbound>,
    frames: AsyncMutex<mpsc::Receiver<ReceivedFrame>>,
    audio_slots: u32,
    video_slots: u32,
}

impl fmt::Debug for MediaConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MediaConnection")
            .field("state", &*self.shared.state.borrow())
            .field("audio_slots", &self.audio_slots)
            .field("video_slots", &self.video_slots)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: rtc::peer_connection::configuration::media_engine::MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

fn vp8_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: rtc::peer_connection::configuration::media_engine::MIME_TYPE_VP8.to_owned(),
        clock_rate: VIDEO_CLOCK_RATE,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![RTCPFeedback {
            typ: "nack".to_owned(),
            parameter: "pli".to_owned(),
        }],
    }
}

fn media_engine() -> Result<MediaEngine, MediaError> {
    let mut engine = MediaEngine::default();
    engine
        .register_codec(
            RTCRtpCodecParameters {
                rtp_codec: opus_codec(),
                payload_type: OPUS_PAYLOAD_TYPE,
            },
            RtpCodecKind::Audio,
        )
        .map_err(webrtc_err)?;
    engine
        .register_codec(
            RTCRtpCodecParameters {
                rtp_codec: vp8_codec(),
                payload_type: VP8_PAYLOAD_TYPE,
            },
            RtpCodecKind::Video,
        )
        .map_err(webrtc_err)?;
    for (uri, kind) in [
        (AUDIO_LEVEL_URI, RtpCodecKind::Audio),
        (SDES_MID_URI, RtpCodecKind::Audio),
        (SDES_MID_URI, RtpCodecKind::Video),
    ] {
        engine
            .register_header_extension(
                RTCRtpHeaderExtensionCapability {
                    uri: uri.to_owned(),
                },
                kind,
                None,
            )
            .map_err(webrtc_err)?;
    }
    Ok(engine)
}

/// Distinct, non-zero random SSRCs.
fn ssrcs() -> (u32, u32) {
    let audio = rand::random::<u32>().max(1);
    let mut video = rand::random::<u32>().max(1);
    if video == audio {
        video = audio.wrapping_add(1).max(1);
    }
    (audio, video)
}

async fn publish(
    pc: &Arc<dyn PeerConnection>,
    kind: RtpCodecKind,
    ssrc: u32,
) -> Result<Outbound, MediaError> {
    let (codec, what, mime) = match kind {
        RtpCodecKind::Audio => (
            opus_codec(),
            "audio",
            rtc::peer_connection::configuration::media_engine::MIME_TYPE_OPUS,
        ),
        _ => (
            vp8_codec(),
            "camera",
            rtc::peer_connection::configuration::media_engine::MIME_TYPE_VP8,
        ),
    };
    let track = MediaStreamTrack::new(
        format!("conclave-{ssrc:08x}"),
        format!("conclave-{what}-{ssrc:08x}"),
        format!("conclave-{what}"),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec,
            ..Default::default()
        }],
    );
    let track = Arc::new(TrackLocalStaticRTP::new(track));
    let transceiver = pc
        .add_transceiver_from_track(
            track.clone() as Arc<dyn TrackLocal>,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Sendonly,
                ..Default::default()
            }),
        )
        .await
        .map_err(webrtc_err)?;
    Ok(Outbound {
        what,
        mime,
        ssrc,
        track,
        transceiver,
        state: AsyncMutex::new(SendState {
            seq: rand::random::<u16>() & 0x7fff,
            timestamp: rand::random(),
            params: None,
            scratch: Vec::new(),
        }),
    })
}

async fn mid_of(t: &Arc<dyn RtpTransceiver>) -> Result<String, MediaError> {
    t.mid()
        .await
        .map_err(webrtc_err)?
        .ok_or_else(|| MediaError::WebRtc("transceiver has no mid after the offer".into()))
}

impl MediaConnection {
    /// Opens the media connection of a joined session: offers to the SFU
    /// through the session, applies its answer and waits until ICE and DTLS
    /// are up. Frames can be sent once the session has sending keys
    /// ([`crate::session::CallEvent::Joined`]).
    pub async fn connect(session: &CallSession, options: MediaOptions) -> Result<Self, MediaError> {
        let link = session.media_link();
        let (audio_ssrc, video_ssrc) = ssrcs();
        let (frames_tx, frames_rx) = mpsc::channel(RECEIVE_QUEUE);
        let shared = Arc::new(Shared {
            agent: session.agent(),
            link: link.clone(),
            state: watch::Sender::new(RTCPeerConnectionState::New),
            gathering: watch::Sender::new(RTCIceGatheringState::New),
            frames: frames_tx,
            pc: OnceLock::new(),
            slot_mids: OnceLock::new(),
            feedback_ssrc: if options.publish_audio {
                audio_ssrc
            } else {
                video_ssrc
            },
            counters: Counters::default(),
            rosters: Mutex::new(VecDeque::new()),
        });
        let registry = configure_rtcp_reports(Registry::new()).with(
            rtc::interceptor::Slot::from(KEY_FRAME_TAP_SLOT),
            KeyFrameRequests::new({
                let link = link.clone();
                // One camera: any request is for it.
                move |_ssrc| link.want_key_frame()
            }),
        );
        // The SFU is ICE-lite and learns our address from our checks, so
        // mDNS names would only hide the host candidate. AES-GCM SRTP first.
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .with_srtp_protection_profiles(vec![
                SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
                SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
            ])
            .build();
        let pc = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media_engine()?)
            .with_setting_engine(settings)
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(Handler {
                shared: shared.clone(),
            }))
            .with_udp_addrs(vec![SocketAddr::new(options.bind_ip, options.port)])
            .build()
            .await
            .map_err(webrtc_err)?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);
        let _ = shared.pc.set(Arc::downgrade(&pc));
        match Self::negotiate(
            session,
            &options,
            pc.clone(),
            shared.clone(),
            audio_ssrc,
            video_ssrc,
        )
        .await
        {
            Ok((audio, camera, slots)) => Ok(Self {
                pc,
                shared,
                audio,
                camera,
                frames: AsyncMutex::new(frames_rx),
                audio_slots: slots.0,
                video_slots: slots.1,
            }),
            Err(e) => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, pc.close()).await;
                Err(e)
            }
        }
    }

    async fn negotiate(
        session: &CallSession,
        options: &MediaOptions,
        pc: Arc<dyn PeerConnection>,
        shared: Arc<Shared>,
        audio_ssrc: u32,
        video_ssrc: u32,
    ) -> Result<(Option<Outbound>, Option<Outbound>, (u32, u32)), MediaError> {
        let audio = if options.publish_audio {
            Some(publish(&pc, RtpCodecKind::Audio, audio_ssrc).await?)
        } else {
            None
        };
        let camera = if options.publish_camera {
            Some(publish(&pc, RtpCodecKind::Video, video_ssrc).await?)
        } else {
            None
        };
        let mut slots: [Vec<Arc<dyn RtpTransceiver>>; 2] = [Vec::new(), Vec::new()];
        for (i, (kind, count)) in [
            (RtpCodecKind::Audio, options.audio_slots),
            (RtpCodecKind::Video, options.video_slots),
        ]
        .into_iter()
        .enumerate()
        {
            for _ in 0..count {
                let t = pc
                    .add_transceiver_from_kind(
                        kind,
                        Some(RTCRtpTransceiverInit {
                            direction: RTCRtpTransceiverDirection::Recvonly,
                            ..Default::default()
                        }),
                    )
                    .await
                    .map_err(webrtc_err)?;
                slots[i].push(t);
            }
        }

        // Non-trickle: offer once gathering is complete.
        let offer = pc.create_offer(None).await.map_err(webrtc_err)?;
        let mut gathering = shared.gathering.subscribe();
        pc.set_local_description(offer).await.map_err(webrtc_err)?;
        tokio::time::timeout(
            options.connect_timeout,
            gathering.wait_for(|s| *s == RTCIceGatheringState::Complete),
        )
        .await
        .map_err(|_| MediaError::Timeout("gathering ICE candidates"))?
        .map_err(|_| MediaError::Closed("dropped while gathering".into()))?;
        let sdp = pc
            .local_description()
            .await
            .ok_or_else(|| MediaError::WebRtc("no local description".into()))?
            .sdp;

        let mut mids: [Vec<String>; 2] = [Vec::new(), Vec::new()];
        for (i, list) in slots.iter().enumerate() {
            for t in list {
                mids[i].push(mid_of(t).await?);
            }
        }
        let [audio_mids, video_mids] = mids;
        let _ = shared.slot_mids.set((audio_mids, video_mids));
        let mut sources = Vec::new();
        for (out, source) in [(&audio, MediaSource::Audio), (&camera, MediaSource::Camera)] {
            if let Some(out) = out {
                sources.push(MediaSourceMid {
                    mid: mid_of(&out.transceiver).await?,
                    source,
                });
            }
        }

        let reply = session.offer_media(sdp, sources)?;
        let answer = tokio::time::timeout(options.connect_timeout, reply)
            .await
            .map_err(|_| MediaError::Timeout("waiting for the media answer"))?
            .map_err(|_| MediaError::Session(SessionError::Closed))??;
        let desc = RTCSessionDescription::answer(answer.sdp).map_err(webrtc_err)?;
        let mut state = shared.state.subscribe();
        pc.set_remote_description(desc).await.map_err(webrtc_err)?;
        let reached = tokio::time::timeout(
            options.connect_timeout,
            state.wait_for(|s| {
                matches!(
                    s,
                    RTCPeerConnectionState::Connected
                        | RTCPeerConnectionState::Failed
                        | RTCPeerConnectionState::Closed
                )
            }),
        )
        .await
        .map_err(|_| MediaError::Timeout("connecting to the SFU"))?
        .map(|s| *s)
        .map_err(|_| MediaError::Closed("dropped while connecting".into()))?;
        if reached != RTCPeerConnectionState::Connected {
            return Err(MediaError::Closed(reached.to_string()));
        }
        Ok((audio, camera, (answer.audio_slots, answer.video_slots)))
    }

    /// Audio receive slots the SFU granted.
    pub fn audio_slots(&self) -> u32 {
        self.audio_slots
    }

    /// Video receive slots the SFU granted.
    pub fn video_slots(&self) -> u32 {
        self.video_slots
    }

    /// Whether ICE and DTLS are up.
    pub fn is_connected(&self) -> bool {
        *self.shared.state.borrow() == RTCPeerConnectionState::Connected
    }

    fn ensure_open(&self) -> Result<(), MediaError> {
        if let Some(reason) = self.shared.link.closed().borrow().clone() {
            return Err(MediaError::Closed(reason));
        }
        match *self.shared.state.borrow() {
            s @ (RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed) => {
                Err(MediaError::Closed(s.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Whether the next video frame should be a key frame: after connecting,
    /// after each new sending epoch, and when the SFU asks (PLI/FIR).
    /// Sending a key frame clears it.
    pub fn needs_key_frame(&self) -> bool {
        self.shared.link.key_frame_wanted()
    }

    /// Sends one Opus frame (20 ms) as one RTP packet: SFrame-protected with
    /// the session's audio key, timestamp +960, and `level` in the RFC 6464
    /// audio-level extension (0–127 −dBov, 0 loudest, 127 silence).
    pub async fn send_audio_frame(&self, opus_frame: &[u8], level: u8) -> Result<(), MediaError> {
        self.ensure_open()?;
        let out = self
            .audio
            .as_ref()
            .ok_or(MediaError::NotPublishing("audio"))?;
        if opus_frame.is_empty() {
            return Err(MediaError::InvalidFrame("empty Opus frame"));
        }
        let mut state = out.state.lock().await;
        let params = out.params(&mut state).await?;
        let st = &mut *state;
        st.scratch.resize(opus_frame.len() + MAX_OVERHEAD, 0);
        let n = lock(&self.shared.agent).crypto().encrypt(
            stream::AUDIO,
            Codec::Opus,
            opus_frame,
            &mut st.scratch,
        )?;
        let payload = Bytes::copy_from_slice(st.scratch.get(..n).unwrap_or_default());
        out.write(&params, st.seq, st.timestamp, false, Some(level), payload)
            .await?;
        st.seq = st.seq.wrapping_add(1);
        st.timestamp = st.timestamp.wrapping_add(OPUS_FRAME_TICKS);
        bump(&self.shared.counters.audio_frames_sent);
        bump(&self.shared.counters.packets_sent);
        Ok(())
    }

    /// Sends one VP8 frame: SFrame-protected with the session's camera key
    /// (the VP8 clear prefix stays readable), packetized per RFC 7741 in
    /// packets of at most [`vp8::MAX_RTP_PAYLOAD`] bytes, the marker on the
    /// last. `timestamp` is the frame's media time since the stream began
    /// (90 kHz RTP clock). `key_frame` must agree with the frame's header.
    pub async fn send_video_frame(
        &self,
        vp8_frame: &[u8],
        key_frame: bool,
        timestamp: Duration,
    ) -> Result<(), MediaError> {
        self.ensure_open()?;
        let out = self
            .camera
            .as_ref()
            .ok_or(MediaError::NotPublishing("camera"))?;
        if vp8_frame.is_empty() {
            return Err(MediaError::InvalidFrame("empty VP8 frame"));
        }
        if vp8_is_key_frame(vp8_frame) != key_frame {
            return Err(MediaError::InvalidFrame(
                "key_frame disagrees with the VP8 frame tag",
            ));
        }
        let mut state = out.state.lock().await;
        let params = out.params(&mut state).await?;
        if key_frame {
            // Cleared before encrypting: a request arriving meanwhile (a new
            // epoch) stays pending for the next frame.
            self.shared.link.take_key_frame_request();
        }
        let st = &mut *state;
        st.scratch.resize(vp8_frame.len() + MAX_OVERHEAD, 0);
        let n = lock(&self.shared.agent).crypto().encrypt(
            stream::CAMERA,
            Codec::Vp8,
            vp8_frame,
            &mut st.scratch,
        );
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                if key_frame {
                    self.shared.link.want_key_frame();
                }
                return Err(e.into());
            }
        };
        let ticks = timestamp.as_micros() * u128::from(VIDEO_CLOCK_RATE) / 1_000_000;
        let rtp_timestamp = st.timestamp.wrapping_add(ticks as u32);
        let packets = vp8::packetize(
            st.scratch.get(..n).unwrap_or_default(),
            vp8::MAX_RTP_PAYLOAD,
        );
        let last = packets.len().saturating_sub(1);
        for (i, p) in packets.into_iter().enumerate() {
            let written = out
                .write(&params, st.seq, rtp_timestamp, i == last, None, p.into())
                .await;
            if let Err(e) = written {
                if key_frame {
                    self.shared.link.want_key_frame();
                }
                return Err(e);
            }
            st.seq = st.seq.wrapping_add(1);
            bump(&self.shared.counters.packets_sent);
        }
        bump(&self.shared.counters.video_frames_sent);
        Ok(())
    }

    /// The next received frame, authenticated and decrypted. `None` once
    /// the connection has failed or been closed (by either side) and every
    /// queued frame was read.
    pub async fn next_frame(&self) -> Option<ReceivedFrame> {
        let mut frames = self.frames.lock().await;
        let mut state = self.shared.state.subscribe();
        let mut closed = self.shared.link.closed();
        tokio::select! {
            biased;
            frame = frames.recv() => frame,
            _ = state.wait_for(|s| matches!(s, RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed)) => frames.try_recv().ok(),
            _ = closed.wait_for(Option::is_some) => frames.try_recv().ok(),
        }
    }

    /// As [`MediaConnection::next_frame`], giving up after `timeout`.
    pub async fn next_frame_timeout(&self, timeout: Duration) -> Option<ReceivedFrame> {
        tokio::time::timeout(timeout, self.next_frame())
            .await
            .ok()
            .flatten()
    }

    /// Complete frames that failed to authenticate or decrypt.
    pub fn decrypt_failures(&self) -> u64 {
        self.shared
            .counters
            .decrypt_failures
            .load(Ordering::Relaxed)
    }

    /// All counters.
    pub fn stats(&self) -> MediaStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MediaStats {
            audio_frames_sent: get(&c.audio_frames_sent),
            video_frames_sent: get(&c.video_frames_sent),
            packets_sent: get(&c.packets_sent),
            frames_received: get(&c.frames_received),
            decrypt_failures: get(&c.decrypt_failures),
            frames_lost: get(&c.frames_lost),
            frames_dropped: get(&c.frames_dropped),
        }
    }

    /// Closes the connection (the SFU notices and frees the session).
    /// Sending fails and [`MediaConnection::next_frame`] ends afterwards.
    pub async fn close(&self) {
        if tokio::time::timeout(CLOSE_TIMEOUT, self.pc.close())
            .await
            .is_err()
        {
            tracing::debug!("media connection did not close in time");
        }
        self.shared
            .state
            .send_replace(RTCPeerConnectionState::Closed);
    }
}

impl Drop for MediaConnection {
    fn drop(&mut self) {
        let pc = self.pc.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, pc.close()).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::payload_feedbacks::full_intra_request::FirEntry;
    use rtc::rtcp::receiver_report::ReceiverReport;
    use rtc::shared::TransportContext;

    #[test]
    fn key_frame_requests_name_each_ssrc_asked_for_and_pass_the_rtcp_on() {
        let asked = Mutex::new(Vec::new());
        let mut tap = KeyFrameRequests::new(|ssrc| asked.lock().unwrap().push(ssrc));
        let compound: Vec<Box<dyn rtc::rtcp::Packet>> = vec![
            Box::new(ReceiverReport::default()),
            Box::new(PictureLossIndication {
                sender_ssrc: 1,
                media_ssrc: 7,
            }),
            Box::new(FullIntraRequest {
                sender_ssrc: 1,
                media_ssrc: 0,
                fir: vec![
                    FirEntry {
                        ssrc: 8,
                        sequence_number: 1,
                    },
                    FirEntry {
                        ssrc: 9,
                        sequence_number: 1,
                    },
                ],
            }),
        ];
        let msg = TaggedPacket {
            now: Instant::now(),
            transport: TransportContext::default(),
            message: rtc::interceptor::AttributedPacket::new(Packet::Rtcp(compound)),
        };
        tap.handle_read(msg).unwrap();
        assert_eq!(*asked.lock().unwrap(), vec![7, 8, 9]);
        let through = tap.poll_read().expect("the compound goes on up the chain");
        assert!(matches!(&through.message.packet, Packet::Rtcp(p) if p.len() == 3));

        // RTCP without a request asks for nothing.
        tap.handle_read(TaggedPacket {
            now: Instant::now(),
            transport: TransportContext::default(),
            message: rtc::interceptor::AttributedPacket::new(Packet::Rtcp(vec![Box::new(
                ReceiverReport::default(),
            )])),
        })
        .unwrap();
        assert_eq!(asked.lock().unwrap().len(), 3);
    }
}
