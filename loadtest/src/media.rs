//! The media engine: every simulated participant's WebRTC connection to the
//! SFU, on webrtc-rs's sans-IO core (`rtc`), driven by one thread.
//!
//! One thread owns every `RTCPeerConnection`, one UDP socket per
//! participant (the SFU tells sessions apart by address), an epoll set over
//! those sockets and a timer heap (connection timers, frame clocks, a
//! one-second statistics tick). Nothing here knows about signaling: a
//! participant's task asks for an offer ([`Command::Open`]), carries it to
//! the server, and hands back the answer ([`Command::Answer`]). Frames are
//! protected and opened through [`FrameCrypto`], so another target (a
//! different SFU with its own key scheme) only needs its own signaling
//! adapter and `FrameCrypto`.
//!
//! What each participant sends matches what the SFU expects (see
//! `docs/protocol.md`): a `sendonly` Opus m-line with the RFC 6464 audio
//! level, a `sendonly` VP8 camera (three simulcast encodings, rids q/h/f, if
//! asked), a `sendonly` VP8 screen share, then `recvonly` receive slots.
//! Every frame is SFrame-protected before packetisation (VP8 keeps its clear
//! prefix) and carries, inside the ciphertext, its sender and send time.
//!
//! Receiving: every complete frame is authenticated and decrypted unless a
//! sampling rate is set (`decrypt_every` > 1: one frame in N per receiver
//! is opened; the others count as received but give no latency). RTP loss
//! is counted per receive slot from sequence-number gaps (the SFU keeps a
//! slot's numbering continuous when its sender changes).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use conclave_client::media::vp8;
use conclave_protocol::sframe::{Codec, DecryptedFrame, MAX_OVERHEAD, SframeError};

use crate::pacer::Pacer;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use rtc::interceptor::{Registry, Slot as ChainSlot};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::configure_rtcp_reports;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_OPUS, MIME_TYPE_VP8, MediaEngine,
};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{
    RTCRtpReceiverId, RTCRtpSenderId, RTCRtpTransceiverDirection, RTCRtpTransceiverId,
    RTCRtpTransceiverInit,
};
use rtc::sansio::Protocol;
use rtc::sdp::extmap::{AUDIO_LEVEL_URI, SDES_MID_URI, SDES_RTP_STREAM_ID_URI};
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::payload::{self, FrameInfo, Source};
use crate::stats::{Reservoir, Summary};

const OPUS_PT: u8 = 111;
const VP8_PT: u8 = 96;
const REPAIRED_RID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id";
const RIDS: [&str; 3] = ["q", "h", "f"];
/// Epoll token of the wake-up eventfd.
const WAKE: u64 = u64::MAX;
/// Least time between two key-frame requests of one receiver.
const PLI_INTERVAL: Duration = Duration::from_millis(500);
/// Opus DTX: one frame per this long while silent.
const DTX_INTERVAL: Duration = Duration::from_millis(400);
/// Most distinct SSRCs a peer holds key-frame requests for between frames
/// (a peer sends on a handful: audio, three camera layers, a screen share).
const MAX_ASKED: usize = 16;
/// An RTP header without extensions, counted with the payload by the pacer.
const RTP_HEADER_BYTES: usize = 12;
/// Latency values kept for percentiles.
const SAMPLE_CAP: usize = 200_000;

/// Frame protection for one participant (the target's E2EE scheme).
pub trait FrameCrypto: Send + Sync {
    /// Protects one frame of outbound stream `context` into `out`.
    fn encrypt(
        &self,
        context: u64,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SframeError>;
    /// Authenticates and opens one received frame into `out`.
    fn decrypt(
        &self,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<DecryptedFrame, SframeError>;
    /// Whether a frame under `kid` that found no key was sent in an epoch
    /// before this member joined, or before it joined at all (expected:
    /// senders switch keys only once every member holds the new epoch).
    /// False if unknown.
    fn before_join(&self, _kid: u64) -> bool {
        false
    }
}

/// One video stream to publish.
#[derive(Clone, Debug)]
pub struct VideoSpec {
    /// Bitrate of each encoding, lowest first; three means simulcast q/h/f.
    pub layers_kbps: Vec<f64>,
    /// Frames per second.
    pub fps: f64,
    /// At least one key frame this often.
    pub keyframe_interval: Duration,
}

/// What one participant's connection publishes and receives.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    /// Participant incarnation id (unique per join).
    pub participant: u32,
    /// Publish a microphone.
    pub audio: bool,
    /// Talk (full frames, loud level) rather than send silence.
    pub speaker: bool,
    /// Opus bitrate while talking.
    pub audio_kbps: f64,
    /// Opus frame duration.
    pub audio_frame: Duration,
    /// Silence as Opus DTX (one small frame per 400 ms).
    pub dtx: bool,
    /// Camera.
    pub camera: Option<VideoSpec>,
    /// Screen share.
    pub screen: Option<VideoSpec>,
    /// Audio receive slots.
    pub audio_slots: u32,
    /// Video receive slots.
    pub video_slots: u32,
}

/// This side's SDP (an offer, or the answer to a remote offer) and which
/// of its mids carry which source.
#[derive(Clone, Debug)]
pub struct Offer {
    /// The local description, ICE candidate included (no trickle).
    pub sdp: String,
    /// `(mid, source)` of each published m-line.
    pub sources: Vec<(String, Source)>,
}

/// Requests to the media thread.
pub enum Command {
    /// Create a connection and its offer, or, given the target's offer,
    /// its answer.
    Open {
        /// What to publish and receive. With `remote_offer`, the receive
        /// slots are the offer's m-lines and the slot counts are ignored.
        spec: PeerSpec,
        /// The target's offer (a target that offers to subscribers, like
        /// Janus): the connection answers it instead of offering.
        remote_offer: Option<String>,
        /// Frame protection.
        crypto: Arc<dyn FrameCrypto>,
        /// Set by anyone who wants the next frame of every video source to
        /// be a key frame (a new epoch). The target's own requests (PLI,
        /// FIR) key only the source they name.
        key_frame: Arc<AtomicBool>,
        /// The offer, or why not.
        reply: oneshot::Sender<Result<Offer, String>>,
    },
    /// Apply the SFU's answer.
    Answer {
        /// Participant.
        participant: u32,
        /// SDP answer.
        sdp: String,
    },
    /// The steady phase begins: latency is also collected apart from now.
    Steady,
    /// Close and forget a connection.
    Close {
        /// Participant.
        participant: u32,
    },
    /// Stop the thread (it returns its totals).
    Shutdown,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Open { spec, .. } => write!(f, "Open({})", spec.participant),
            Command::Answer { participant, .. } => write!(f, "Answer({participant})"),
            Command::Close { participant } => write!(f, "Close({participant})"),
            Command::Steady => write!(f, "Steady"),
            Command::Shutdown => write!(f, "Shutdown"),
        }
    }
}

/// What the media thread reports.
#[derive(Clone, Debug)]
pub enum MediaEvent {
    /// ICE and DTLS are up.
    Connected {
        /// Participant.
        participant: u32,
        /// When.
        at: Instant,
    },
    /// The first frame from anyone was received and decrypted.
    FirstFrame {
        /// Participant.
        participant: u32,
        /// When.
        at: Instant,
    },
    /// The connection failed or closed.
    Down {
        /// Participant.
        participant: u32,
        /// Why.
        reason: String,
    },
}

/// One second of the media thread's counters (deltas over that second).
#[derive(Clone, Debug, Default, Serialize)]
pub struct MediaSecond {
    /// Seconds since the run began (end of this interval).
    pub t_s: f64,
    /// Connected participants.
    pub connected: u32,
    /// UDP datagrams sent to the SFU.
    pub packets_sent: u64,
    /// Bytes of those datagrams.
    pub bytes_sent: u64,
    /// UDP datagrams received from the SFU.
    pub packets_received: u64,
    /// Bytes of those datagrams.
    pub bytes_received: u64,
    /// Frames sent (all publishers, every simulcast layer).
    pub frames_sent: u64,
    /// Frames decrypted.
    pub frames_decrypted: u64,
    /// Frames that failed to decrypt.
    pub decrypt_failures: u64,
    /// RTP packets missing at receivers.
    pub rtp_lost: u64,
    /// RTP packets expected at receivers.
    pub rtp_expected: u64,
    /// Median end-to-end frame latency in this second, ms.
    pub latency_p50_ms: Option<f64>,
    /// 95th percentile, ms.
    pub latency_p95_ms: Option<f64>,
}

/// Everything the media thread measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MediaTotals {
    /// Connections opened.
    pub connections_opened: u64,
    /// Connections that reached `connected`.
    pub connections_connected: u64,
    /// Connections that failed (not closed by us).
    pub connections_failed: u64,
    /// UDP datagrams sent.
    pub packets_sent: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// UDP datagrams received.
    pub packets_received: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Frames sent, by source.
    pub frames_sent: HashMap<Source, u64>,
    /// Frames not sent because no sending key was ready yet.
    pub frames_skipped_no_key: u64,
    /// Complete frames received (audio packets and reassembled VP8 frames).
    pub frames_received: u64,
    /// Frames decrypted and authenticated.
    pub frames_decrypted: u64,
    /// Frames left encrypted by sampling (`decrypt_every` > 1).
    pub frames_not_decrypted: u64,
    /// Decrypted frames that were not load-test frames.
    pub frames_foreign: u64,
    /// Frames that failed to decrypt, all reasons.
    pub decrypt_failures: u64,
    /// ... because no key matched the KID (unknown sender or epoch),
    /// other than the case below.
    pub decrypt_failures_unknown_key: u64,
    /// ... because the frame was protected in the epoch before the
    /// receiver joined (in flight while the group moved; expected).
    pub decrypt_failures_before_join: u64,
    /// ... because authentication failed.
    pub decrypt_failures_auth: u64,
    /// ... replayed or too old.
    pub decrypt_failures_replay: u64,
    /// ... anything else (truncated, malformed).
    pub decrypt_failures_other: u64,
    /// VP8 frames given up in reassembly (a packet missing).
    pub video_frames_incomplete: u64,
    /// RTP packets expected at receivers (sequence-number span).
    pub rtp_expected: u64,
    /// RTP packets that never arrived.
    pub rtp_lost: u64,
    /// Key-frame requests (PLI) sent to the SFU.
    pub pli_sent: u64,
    /// Key frames sent: on request from the SFU (PLI/FIR), on switching to
    /// an epoch that added members, and periodically.
    pub key_frames_sent: u64,
    /// The same by source (camera, screen).
    pub key_frames_by_source: HashMap<Source, u64>,
    /// One frame in this many was decrypted at each receiver.
    pub decrypt_every: u32,
    /// End-to-end frame latency, ms (send time inside the ciphertext to
    /// decryption at the receiver), all sources.
    pub latency_ms: Summary,
    /// The same from [`Command::Steady`] on (the steady phase).
    pub latency_steady_ms: Summary,
    /// Audio only.
    pub latency_audio_ms: Summary,
    /// Camera and screen only.
    pub latency_video_ms: Summary,
    /// How long video packets waited in their sender's pacer, ms (part of
    /// the frame latency).
    pub pacer_wait_ms: Summary,
    /// Per second.
    pub timeline: Vec<MediaSecond>,
}

/// Handle on the media thread.
#[derive(Debug)]
pub struct MediaHandle {
    tx: Sender<Command>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<MediaTotals>>,
    /// The per-second timeline so far.
    pub timeline: Arc<Mutex<Vec<MediaSecond>>>,
}

/// Why the media thread could not start or be reached.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// A system call failed.
    #[error("media thread: {0}")]
    Sys(String),
    /// The thread is gone.
    #[error("the media thread has stopped")]
    Stopped,
}

impl MediaHandle {
    /// Starts the thread. Times are measured from `origin`; connections
    /// bind their UDP socket to `bind_ip`, with a receive buffer of
    /// `recv_buffer` bytes (0: the kernel's default), and pace their video
    /// at `pace_factor` times its bitrate (0: no pacing; see
    /// [`crate::pacer`]).
    pub fn start(
        origin: Instant,
        decrypt_every: u32,
        bind_ip: IpAddr,
        recv_buffer: usize,
        pace_factor: f64,
        events: mpsc::UnboundedSender<MediaEvent>,
    ) -> Result<Self, MediaError> {
        let sys = |e: nix::Error| MediaError::Sys(e.to_string());
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(sys)?;
        let wake = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map_err(sys)?,
        );
        epoll
            .add(&*wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE))
            .map_err(sys)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let timeline = Arc::new(Mutex::new(Vec::new()));
        let engine = Engine {
            epoll,
            wake: wake.clone(),
            rx,
            events,
            bind_ip,
            recv_buffer,
            pace_factor,
            peers: HashMap::new(),
            timers: BinaryHeap::new(),
            origin,
            decrypt_every: decrypt_every.max(1),
            totals: MediaTotals {
                decrypt_every: decrypt_every.max(1),
                ..MediaTotals::default()
            },
            last_tick: MediaTotals::default(),
            lat_all: Reservoir::new(SAMPLE_CAP),
            lat_steady: None,
            lat_audio: Reservoir::new(SAMPLE_CAP),
            lat_video: Reservoir::new(SAMPLE_CAP),
            lat_pacer: Reservoir::new(SAMPLE_CAP),
            lat_second: Reservoir::new(20_000),
            timeline: timeline.clone(),
            recv_buf: vec![0u8; 2048],
            clear: Vec::new(),
            protected: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("media".into())
            .spawn(move || engine.run())
            .map_err(|e| MediaError::Sys(e.to_string()))?;
        Ok(Self {
            tx,
            wake,
            thread: Some(thread),
            timeline,
        })
    }

    /// Sends a command.
    pub fn send(&self, cmd: Command) -> Result<(), MediaError> {
        self.tx.send(cmd).map_err(|_| MediaError::Stopped)?;
        let _ = self.wake.write(1);
        Ok(())
    }

    /// A sender usable from many tasks.
    pub fn sender(&self) -> MediaSender {
        MediaSender {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }

    /// Stops the thread and returns its totals.
    pub fn shutdown(mut self) -> Result<MediaTotals, MediaError> {
        let _ = self.send(Command::Shutdown);
        let thread = self.thread.take().ok_or(MediaError::Stopped)?;
        thread.join().map_err(|_| MediaError::Stopped)
    }
}

/// A cloneable way to reach the media thread.
#[derive(Clone, Debug)]
pub struct MediaSender {
    tx: Sender<Command>,
    wake: Arc<EventFd>,
}

impl MediaSender {
    /// Sends a command.
    pub fn send(&self, cmd: Command) -> Result<(), MediaError> {
        self.tx.send(cmd).map_err(|_| MediaError::Stopped)?;
        let _ = self.wake.write(1);
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Tick,
    Pc(u32),
    Source(u32, usize),
    /// A peer's pacer may let its next video packet go.
    Pace(u32),
}

/// Negotiated values a sender's packets must carry.
#[derive(Clone, Debug)]
struct SendParams {
    pt: u8,
    mid: Option<(u8, Bytes)>,
    rid: Option<u8>,
    audio_level: Option<u8>,
}

#[derive(Debug)]
struct Encoding {
    ssrc: u32,
    rid: Option<&'static str>,
    layer: u8,
    seq: u16,
    ts_base: u32,
    /// Average frame size in bytes.
    frame_bytes: f64,
}

#[derive(Debug)]
struct OutSource {
    source: Source,
    transceiver: RTCRtpTransceiverId,
    sender: Option<RTCRtpSenderId>,
    params: Option<SendParams>,
    encodings: Vec<Encoding>,
    interval: Duration,
    next_at: Instant,
    started: Instant,
    frame_no: u32,
    frames_per_key: u32,
    want_key: bool,
    /// Audio: talking.
    speaker: bool,
    dtx: bool,
    level: u8,
    last_sent: Option<Instant>,
}

#[derive(Debug)]
struct RecvSlot {
    video: bool,
    receiver: RTCRtpReceiverId,
    reasm: vp8::Reassembler,
    highest: Option<u64>,
    first: u64,
    received: u64,
}

impl RecvSlot {
    fn on_seq(&mut self, seq: u16) {
        self.received += 1;
        match self.highest {
            None => {
                let ext = u64::from(seq) + (1 << 32);
                self.highest = Some(ext);
                self.first = ext;
            }
            Some(h) => {
                let delta = seq.wrapping_sub(h as u16) as i16;
                if delta > 0 {
                    self.highest = Some(h + delta as u64);
                } else if i64::from(delta) < -((h - self.first) as i64) {
                    // Older than the first packet seen: widen the span.
                    self.first = h.saturating_sub(delta.unsigned_abs().into());
                }
            }
        }
    }

    fn expected_lost(&self) -> (u64, u64) {
        match self.highest {
            None => (0, 0),
            Some(h) => {
                let expected = h - self.first + 1;
                (expected, expected.saturating_sub(self.received))
            }
        }
    }
}

struct Peer {
    socket: UdpSocket,
    local: SocketAddr,
    pc: RTCPeerConnection,
    crypto: Arc<dyn FrameCrypto>,
    key_frame: Arc<AtomicBool>,
    /// SSRCs the target asked key frames for, not yet served.
    asked: Arc<Mutex<Vec<u32>>>,
    connected: bool,
    got_frame: bool,
    armed: Option<Instant>,
    sources: Vec<OutSource>,
    audio_recv: Vec<RTCRtpTransceiverId>,
    video_recv: Vec<RTCRtpTransceiverId>,
    slots: HashMap<u32, RecvSlot>,
    feedback_ssrc: u32,
    last_pli: Option<Instant>,
    decrypt_counter: u64,
    /// Video packets waiting for the pacer.
    pacer: Pacer<(RTCRtpSenderId, rtc::rtp::Packet, Instant)>,
    /// When the pacer's timer is due, if armed.
    pace_armed: Option<Instant>,
}

struct Engine {
    epoll: Epoll,
    wake: Arc<EventFd>,
    rx: Receiver<Command>,
    events: mpsc::UnboundedSender<MediaEvent>,
    bind_ip: IpAddr,
    recv_buffer: usize,
    /// Pacing rate as a multiple of a peer's video bitrate (0: no pacing).
    pace_factor: f64,
    peers: HashMap<u32, Peer>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    origin: Instant,
    decrypt_every: u32,
    totals: MediaTotals,
    last_tick: MediaTotals,
    lat_all: Reservoir,
    lat_steady: Option<Reservoir>,
    lat_audio: Reservoir,
    lat_video: Reservoir,
    lat_pacer: Reservoir,
    lat_second: Reservoir,
    timeline: Arc<Mutex<Vec<MediaSecond>>>,
    recv_buf: Vec<u8>,
    clear: Vec<u8>,
    protected: Vec<u8>,
}

/// A participant's non-blocking UDP socket on `ip`, with a receive buffer
/// of `recv_buffer` bytes if that is not 0 (the kernel caps it at
/// net.core.rmem_max, and may grant less without an error).
fn participant_socket(ip: IpAddr, recv_buffer: usize) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0))?;
    socket.set_nonblocking(true)?;
    if recv_buffer > 0 {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBuf, &recv_buffer)?;
    }
    Ok(socket)
}

fn opus() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1;usedtx=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

fn vp8_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![RTCPFeedback {
            typ: "nack".to_owned(),
            parameter: "pli".to_owned(),
        }],
    }
}

fn rtc_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn media_engine() -> Result<MediaEngine, String> {
    let mut m = MediaEngine::default();
    m.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: opus(),
            payload_type: OPUS_PT,
        },
        RtpCodecKind::Audio,
    )
    .map_err(rtc_err)?;
    m.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: vp8_codec(),
            payload_type: VP8_PT,
        },
        RtpCodecKind::Video,
    )
    .map_err(rtc_err)?;
    for (uri, kind) in [
        (AUDIO_LEVEL_URI, RtpCodecKind::Audio),
        (SDES_MID_URI, RtpCodecKind::Audio),
        (SDES_MID_URI, RtpCodecKind::Video),
        (SDES_RTP_STREAM_ID_URI, RtpCodecKind::Video),
        (REPAIRED_RID_URI, RtpCodecKind::Video),
    ] {
        m.register_header_extension(
            RTCRtpHeaderExtensionCapability {
                uri: uri.to_owned(),
            },
            kind,
            None,
        )
        .map_err(rtc_err)?;
    }
    Ok(m)
}

fn random_ssrc(taken: &mut Vec<u32>) -> u32 {
    loop {
        let s = rand::random::<u32>().max(1);
        if !taken.contains(&s) {
            taken.push(s);
            return s;
        }
    }
}

/// The kind of each m-line of an SDP, by mid.
fn mid_kinds(sdp: &str) -> HashMap<String, RtpCodecKind> {
    let mut out = HashMap::new();
    let mut kind = None;
    for line in sdp.lines() {
        if let Some(m) = line.strip_prefix("m=") {
            kind = match m.split(' ').next() {
                Some("audio") => Some(RtpCodecKind::Audio),
                Some("video") => Some(RtpCodecKind::Video),
                _ => None,
            };
        } else if let Some(mid) = line.strip_prefix("a=mid:")
            && let Some(k) = kind
        {
            out.insert(mid.trim().to_owned(), k);
        }
    }
    out
}

fn ms_until(now: Instant, t: Instant) -> u16 {
    let d = t.saturating_duration_since(now);
    // Round up so a timer is never polled before it is due.
    let ms = d.as_micros().div_ceil(1000);
    ms.min(50) as u16
}

impl Engine {
    fn run(mut self) -> MediaTotals {
        let now = Instant::now();
        self.timers
            .push(Reverse((now + Duration::from_secs(1), Timer::Tick)));
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            let now = Instant::now();
            if !self.run_timers(now) {
                break;
            }
            loop {
                match self.rx.try_recv() {
                    Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                        return self.finish();
                    }
                    Ok(cmd) => self.command(cmd),
                    Err(TryRecvError::Empty) => break,
                }
            }
            let now = Instant::now();
            let timeout = self
                .timers
                .peek()
                .map_or(50, |Reverse((t, _))| ms_until(now, *t));
            let n = match self.epoll.wait(&mut events, EpollTimeout::from(timeout)) {
                Ok(n) => n,
                Err(nix::Error::EINTR) => 0,
                Err(e) => {
                    tracing::error!(error = %e, "epoll failed; media thread stops");
                    return self.finish();
                }
            };
            for ev in events.iter().take(n) {
                let token = ev.data();
                if token == WAKE {
                    let _ = self.wake.read();
                    continue;
                }
                self.readable(token as u32);
                // Frames and paced packets leave on time even when
                // receiving for hundreds of listeners runs behind: a real
                // sender's timing does not depend on other people's
                // receivers.
                let now = Instant::now();
                if self.timers.peek().is_some_and(|Reverse((t, _))| *t <= now)
                    && !self.run_timers(now)
                {
                    return self.finish();
                }
            }
        }
        self.finish()
    }

    fn finish(mut self) -> MediaTotals {
        let ids: Vec<u32> = self.peers.keys().copied().collect();
        for id in ids {
            self.close_peer(id, false);
        }
        self.tick(Instant::now());
        self.totals.latency_ms = self.lat_all.summary();
        self.totals.latency_steady_ms = self
            .lat_steady
            .as_ref()
            .map(Reservoir::summary)
            .unwrap_or_default();
        self.totals.latency_audio_ms = self.lat_audio.summary();
        self.totals.latency_video_ms = self.lat_video.summary();
        self.totals.pacer_wait_ms = self.lat_pacer.summary();
        self.totals.timeline = self.timeline.lock().map(|t| t.clone()).unwrap_or_default();
        self.totals
    }

    /// Runs due timers; false if the thread should stop.
    fn run_timers(&mut self, now: Instant) -> bool {
        while let Some(Reverse((t, timer))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Tick => {
                    self.tick(now);
                    self.timers
                        .push(Reverse((t + Duration::from_secs(1), Timer::Tick)));
                }
                Timer::Pc(id) => {
                    let Some(p) = self.peers.get_mut(&id) else {
                        continue;
                    };
                    if p.armed != Some(t) {
                        continue;
                    }
                    p.armed = None;
                    if let Err(e) = p.pc.handle_timeout(now) {
                        tracing::debug!(peer = id, error = %e, "timeout handling failed");
                    }
                    self.service(id, now);
                }
                Timer::Source(id, idx) => self.send_frame(id, idx, now),
                Timer::Pace(id) => {
                    let Some(p) = self.peers.get_mut(&id) else {
                        continue;
                    };
                    if p.pace_armed != Some(t) {
                        continue;
                    }
                    p.pace_armed = None;
                    self.pace(id, now);
                    self.service(id, now);
                }
            }
        }
        true
    }

    fn tick(&mut self, now: Instant) {
        let t = &self.totals;
        let l = &self.last_tick;
        let (mut expected, mut lost) = (t.rtp_expected, t.rtp_lost);
        for p in self.peers.values() {
            for s in p.slots.values() {
                let (e, x) = s.expected_lost();
                expected += e;
                lost += x;
            }
        }
        let sent: u64 = t.frames_sent.values().sum();
        let sent_before: u64 = l.frames_sent.values().sum();
        let lat = self.lat_second.summary();
        let second = MediaSecond {
            t_s: now.saturating_duration_since(self.origin).as_secs_f64(),
            connected: self.peers.values().filter(|p| p.connected).count() as u32,
            packets_sent: t.packets_sent - l.packets_sent,
            bytes_sent: t.bytes_sent - l.bytes_sent,
            packets_received: t.packets_received - l.packets_received,
            bytes_received: t.bytes_received - l.bytes_received,
            frames_sent: sent - sent_before,
            frames_decrypted: t.frames_decrypted - l.frames_decrypted,
            decrypt_failures: t.decrypt_failures - l.decrypt_failures,
            rtp_lost: lost.saturating_sub(l.rtp_lost),
            rtp_expected: expected.saturating_sub(l.rtp_expected),
            latency_p50_ms: lat.p50,
            latency_p95_ms: lat.p95,
        };
        self.lat_second.clear();
        self.last_tick = MediaTotals {
            rtp_expected: expected,
            rtp_lost: lost,
            ..self.totals.clone()
        };
        if let Ok(mut tl) = self.timeline.lock() {
            tl.push(second);
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Open {
                spec,
                remote_offer,
                crypto,
                key_frame,
                reply,
            } => {
                let id = spec.participant;
                let result = self.open(spec, remote_offer, crypto, key_frame);
                let _ = reply.send(result);
                self.service(id, Instant::now());
            }
            Command::Answer { participant, sdp } => {
                let now = Instant::now();
                if let Some(p) = self.peers.get_mut(&participant) {
                    let applied = RTCSessionDescription::answer(sdp)
                        .map_err(rtc_err)
                        .and_then(|d| p.pc.set_remote_description(now, d).map_err(rtc_err));
                    if let Err(e) = applied {
                        let _ = self.events.send(MediaEvent::Down {
                            participant,
                            reason: format!("answer refused: {e}"),
                        });
                    }
                }
                self.service(participant, now);
            }
            Command::Close { participant } => self.close_peer(participant, true),
            Command::Steady => self.lat_steady = Some(Reservoir::new(SAMPLE_CAP)),
            Command::Shutdown => {}
        }
    }

    fn open(
        &mut self,
        spec: PeerSpec,
        remote_offer: Option<String>,
        crypto: Arc<dyn FrameCrypto>,
        key_frame: Arc<AtomicBool>,
    ) -> Result<Offer, String> {
        let now = Instant::now();
        if self.peers.contains_key(&spec.participant) {
            return Err(format!("connection {} exists already", spec.participant));
        }
        let socket = participant_socket(self.bind_ip, self.recv_buffer).map_err(rtc_err)?;
        let local = socket.local_addr().map_err(rtc_err)?;

        let media = media_engine()?;
        // A browser keys only the encoder a PLI or FIR names: a request for
        // the camera does not make the screen share send a key frame.
        let asked: Arc<Mutex<Vec<u32>>> = Arc::default();
        let registry = configure_rtcp_reports(Registry::new()).with(
            ChainSlot::from(conclave_client::media::KEY_FRAME_TAP_SLOT),
            conclave_client::media::KeyFrameRequests::new({
                let asked = asked.clone();
                move |ssrc| {
                    if let Ok(mut a) = asked.lock()
                        && !a.contains(&ssrc)
                        && a.len() < MAX_ASKED
                    {
                        a.push(ssrc);
                    }
                }
            }),
        );
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
            .with_srtp_protection_profiles(vec![
                rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
                rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
            ])
            .build();
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(settings)
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .build(now)
            .map_err(rtc_err)?;

        let mut taken = Vec::new();
        let stream_id = format!("lt-{}", spec.participant);
        let mut sources = Vec::new();
        let mut add = |pc: &mut RTCPeerConnection,
                       source: Source,
                       kind: RtpCodecKind,
                       layers: Vec<(Option<&'static str>, f64)>,
                       interval: Duration,
                       frames_per_key: u32|
         -> Result<OutSource, String> {
            let codec = if kind == RtpCodecKind::Audio {
                opus()
            } else {
                vp8_codec()
            };
            let mut encodings = Vec::new();
            let mut params = Vec::new();
            for (layer, (rid, bytes)) in layers.into_iter().enumerate() {
                let ssrc = random_ssrc(&mut taken);
                params.push(RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        rid: rid.unwrap_or_default().to_owned(),
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec: codec.clone(),
                    ..Default::default()
                });
                encodings.push(Encoding {
                    ssrc,
                    rid,
                    layer: layer as u8,
                    seq: rand::random::<u16>() & 0x7fff,
                    ts_base: rand::random(),
                    frame_bytes: bytes,
                });
            }
            let what = format!("{source:?}").to_lowercase();
            let track = MediaStreamTrack::new(
                stream_id.clone(),
                format!("{stream_id}-{what}"),
                what,
                kind,
                params,
            );
            let tid = pc
                .add_transceiver_from_track(
                    track,
                    Some(RTCRtpTransceiverInit {
                        direction: RTCRtpTransceiverDirection::Sendonly,
                        streams: vec![],
                        send_encodings: vec![],
                    }),
                )
                .map_err(rtc_err)?;
            Ok(OutSource {
                source,
                transceiver: tid,
                sender: None,
                params: None,
                encodings,
                interval,
                next_at: now,
                started: now,
                frame_no: 0,
                frames_per_key: frames_per_key.max(1),
                want_key: true,
                speaker: false,
                dtx: false,
                level: 127,
                last_sent: None,
            })
        };
        if spec.audio {
            let bytes = spec.audio_kbps * 1000.0 / 8.0 * spec.audio_frame.as_secs_f64();
            let mut s = add(
                &mut pc,
                Source::Audio,
                RtpCodecKind::Audio,
                vec![(None, bytes)],
                spec.audio_frame,
                1,
            )?;
            s.speaker = spec.speaker;
            s.dtx = spec.dtx;
            // Speakers differ a little so the SFU's ranking is stable.
            s.level = if spec.speaker {
                20 + (spec.participant % 10) as u8
            } else {
                127
            };
            sources.push(s);
        }
        for (source, video) in [
            (Source::Camera, &spec.camera),
            (Source::Screen, &spec.screen),
        ] {
            let Some(v) = video else { continue };
            let simulcast = v.layers_kbps.len() == 3;
            let layers = v
                .layers_kbps
                .iter()
                .enumerate()
                .map(|(i, kbps)| {
                    let rid = if simulcast {
                        RIDS.get(i).copied()
                    } else {
                        None
                    };
                    (rid, kbps * 1000.0 / 8.0 / v.fps)
                })
                .collect();
            let interval = Duration::from_secs_f64(1.0 / v.fps);
            let per_key = (v.keyframe_interval.as_secs_f64() * v.fps).round() as u32;
            sources.push(add(
                &mut pc,
                source,
                RtpCodecKind::Video,
                layers,
                interval,
                per_key,
            )?);
        }
        let feedback_ssrc = sources
            .first()
            .and_then(|s| s.encodings.first())
            .map_or_else(|| random_ssrc(&mut taken), |e| e.ssrc);

        let mut audio_recv = Vec::new();
        let mut video_recv = Vec::new();
        let (audio_slots, video_slots) = if remote_offer.is_some() {
            (0, 0)
        } else {
            (spec.audio_slots, spec.video_slots)
        };
        for (kind, count, list) in [
            (RtpCodecKind::Audio, audio_slots, &mut audio_recv),
            (RtpCodecKind::Video, video_slots, &mut video_recv),
        ] {
            for _ in 0..count {
                let tid = pc
                    .add_transceiver_from_kind(
                        kind,
                        Some(RTCRtpTransceiverInit {
                            direction: RTCRtpTransceiverDirection::Recvonly,
                            streams: vec![],
                            send_encodings: vec![],
                        }),
                    )
                    .map_err(rtc_err)?;
                list.push(tid);
            }
        }

        let candidate = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: local.ip().to_string(),
                port: local.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()
        .map_err(rtc_err)?;
        pc.add_local_candidate(
            RTCIceCandidate::from(&candidate)
                .to_json()
                .map_err(rtc_err)?,
        )
        .map_err(rtc_err)?;
        let description = match &remote_offer {
            None => pc.create_offer(None).map_err(rtc_err)?,
            Some(offer) => {
                let remote = RTCSessionDescription::offer(offer.clone()).map_err(rtc_err)?;
                pc.set_remote_description(now, remote).map_err(rtc_err)?;
                let kinds = mid_kinds(offer);
                let ids: Vec<RTCRtpTransceiverId> = pc.get_transceivers().collect();
                for tid in ids {
                    let mid = pc.rtp_transceiver(tid).and_then(|t| t.mid().clone());
                    match mid.and_then(|m| kinds.get(&m).copied()) {
                        Some(RtpCodecKind::Audio) => audio_recv.push(tid),
                        Some(RtpCodecKind::Video) => video_recv.push(tid),
                        _ => {}
                    }
                }
                pc.create_answer(None).map_err(rtc_err)?
            }
        };
        pc.set_local_description(now, description)
            .map_err(rtc_err)?;
        let sdp = pc
            .local_description()
            .map(|d| d.sdp)
            .ok_or("no local description")?;
        if !sdp.contains("a=candidate") {
            return Err("the local description has no ICE candidate".into());
        }
        let mut mids = Vec::new();
        for s in &mut sources {
            let t = pc
                .rtp_transceiver(s.transceiver)
                .ok_or("a publishing transceiver vanished")?;
            let mid = t.mid().clone().ok_or("a publishing m-line has no mid")?;
            s.sender = t.sender();
            mids.push((mid, s.source));
        }

        self.epoll
            .add(
                &socket,
                EpollEvent::new(EpollFlags::EPOLLIN, u64::from(spec.participant)),
            )
            .map_err(rtc_err)?;
        for (i, s) in sources.iter().enumerate() {
            self.timers
                .push(Reverse((s.next_at, Timer::Source(spec.participant, i))));
        }
        self.totals.connections_opened += 1;
        // The video bitrate the pacer's rate is a multiple of.
        let video_bytes_per_s: f64 = sources
            .iter()
            .filter(|s| s.source != Source::Audio)
            .flat_map(|s| {
                let per_s = 1.0 / s.interval.as_secs_f64();
                s.encodings.iter().map(move |e| e.frame_bytes * per_s)
            })
            .sum();
        self.peers.insert(
            spec.participant,
            Peer {
                socket,
                local,
                pc,
                crypto,
                key_frame,
                asked,
                connected: false,
                got_frame: false,
                armed: None,
                sources,
                audio_recv,
                video_recv,
                slots: HashMap::new(),
                feedback_ssrc,
                last_pli: None,
                decrypt_counter: 0,
                pacer: Pacer::new(video_bytes_per_s, self.pace_factor),
                pace_armed: None,
            },
        );
        Ok(Offer { sdp, sources: mids })
    }

    fn close_peer(&mut self, id: u32, notify: bool) {
        let Some(mut p) = self.peers.remove(&id) else {
            return;
        };
        let _ = p.pc.close();
        while let Some(msg) = p.pc.poll_write() {
            let _ = p.socket.send_to(&msg.message, msg.transport.peer_addr);
        }
        let _ = self.epoll.delete(&p.socket);
        for s in p.slots.values() {
            let (e, l) = s.expected_lost();
            self.totals.rtp_expected += e;
            self.totals.rtp_lost += l;
        }
        if notify {
            tracing::debug!(peer = id, "media connection closed");
        }
    }

    fn readable(&mut self, id: u32) {
        loop {
            let Some(p) = self.peers.get_mut(&id) else {
                return;
            };
            let (n, from) = match p.socket.recv_from(&mut self.recv_buf) {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!(peer = id, error = %e, "receive failed");
                    return;
                }
            };
            let now = Instant::now();
            self.totals.packets_received += 1;
            self.totals.bytes_received += n as u64;
            let data = BytesMut::from(self.recv_buf.get(..n).unwrap_or_default());
            let r = p.pc.handle_read(TaggedBytesMut {
                now,
                transport: TransportContext {
                    local_addr: p.local,
                    peer_addr: from,
                    transport_protocol: TransportProtocol::UDP,
                    ecn: None,
                },
                message: data,
            });
            if let Err(e) = r {
                tracing::debug!(peer = id, error = %e, "datagram refused");
            }
            self.service(id, now);
        }
    }

    /// Drains a connection's events, messages and datagrams; re-arms its timer.
    fn service(&mut self, id: u32, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let mut down = None;
        while let Some(ev) = p.pc.poll_event() {
            match ev {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => match state {
                    RTCPeerConnectionState::Connected if !p.connected => {
                        p.connected = true;
                        self.totals.connections_connected += 1;
                        let _ = self.events.send(MediaEvent::Connected {
                            participant: id,
                            at: now,
                        });
                    }
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        down = Some(state.to_string());
                    }
                    _ => {}
                },
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                    let tid = RTCRtpTransceiverId::from(init.receiver_id);
                    let video = if p.video_recv.contains(&tid) {
                        true
                    } else if p.audio_recv.contains(&tid) {
                        false
                    } else {
                        continue;
                    };
                    p.slots.insert(
                        init.ssrc,
                        RecvSlot {
                            video,
                            receiver: init.receiver_id,
                            reasm: vp8::Reassembler::new(),
                            highest: None,
                            first: 0,
                            received: 0,
                        },
                    );
                }
                _ => {}
            }
        }
        while let Some(msg) = p.pc.poll_read() {
            if let RTCMessage::RtpPacket(_, packet) = msg.message {
                let ssrc = packet.header.ssrc;
                let Some(slot) = p.slots.get_mut(&ssrc) else {
                    continue;
                };
                let before = slot.highest;
                slot.on_seq(packet.header.sequence_number);
                if let (Some(b), Some(h)) = (before, slot.highest)
                    && h > b + 1
                {
                    tracing::debug!(
                        peer = id,
                        ssrc,
                        video = slot.video,
                        gap = h - b - 1,
                        "sequence gap"
                    );
                }
                let h = &packet.header;
                let frame = if slot.video {
                    let pushed =
                        slot.reasm
                            .push(h.sequence_number, h.timestamp, h.marker, &packet.payload);
                    if pushed.lost {
                        self.totals.video_frames_incomplete += 1;
                        if p.last_pli
                            .is_none_or(|t| now.duration_since(t) >= PLI_INTERVAL)
                        {
                            p.last_pli = Some(now);
                            let pli = PictureLossIndication {
                                sender_ssrc: p.feedback_ssrc,
                                media_ssrc: ssrc,
                            };
                            let receiver = slot.receiver;
                            if let Some(mut r) = p.pc.rtp_receiver(receiver) {
                                let _ = r.write_rtcp(now, vec![Box::new(pli)]);
                                self.totals.pli_sent += 1;
                            }
                        }
                    }
                    pushed.frame.map(|f| (Codec::Vp8, f))
                } else {
                    Some((Codec::Opus, packet.payload.to_vec()))
                };
                let Some((codec, frame)) = frame else {
                    continue;
                };
                self.totals.frames_received += 1;
                p.decrypt_counter += 1;
                if p.decrypt_counter % u64::from(self.decrypt_every) != 0 {
                    self.totals.frames_not_decrypted += 1;
                    continue;
                }
                self.clear.resize(frame.len(), 0);
                match p.crypto.decrypt(codec, &frame, &mut self.clear) {
                    Ok(d) => {
                        self.totals.frames_decrypted += 1;
                        let clear = self.clear.get(..d.len).unwrap_or_default();
                        let Some(info) = payload::parse(clear, codec == Codec::Vp8) else {
                            self.totals.frames_foreign += 1;
                            continue;
                        };
                        let now_us = now.saturating_duration_since(self.origin).as_micros() as u64;
                        let ms = now_us.saturating_sub(info.sent_us) as f64 / 1000.0;
                        self.lat_all.add(ms);
                        if let Some(r) = self.lat_steady.as_mut() {
                            r.add(ms);
                        }
                        self.lat_second.add(ms);
                        if info.source == Source::Audio {
                            self.lat_audio.add(ms);
                        } else {
                            self.lat_video.add(ms);
                        }
                        if !p.got_frame {
                            p.got_frame = true;
                            let _ = self.events.send(MediaEvent::FirstFrame {
                                participant: id,
                                at: now,
                            });
                        }
                    }
                    Err(e) => {
                        self.totals.decrypt_failures += 1;
                        match e {
                            SframeError::UnknownKid(kid) if p.crypto.before_join(kid) => {
                                self.totals.decrypt_failures_before_join += 1
                            }
                            SframeError::UnknownKid(_) => {
                                self.totals.decrypt_failures_unknown_key += 1
                            }
                            SframeError::AuthenticationFailed => {
                                self.totals.decrypt_failures_auth += 1
                            }
                            SframeError::Replayed { .. } | SframeError::TooOld { .. } => {
                                self.totals.decrypt_failures_replay += 1
                            }
                            _ => self.totals.decrypt_failures_other += 1,
                        }
                        tracing::debug!(peer = id, error = %e, ?codec, "undecryptable frame");
                    }
                }
            }
        }
        while let Some(msg) = p.pc.poll_write() {
            self.totals.packets_sent += 1;
            self.totals.bytes_sent += msg.message.len() as u64;
            if let Err(e) = p.socket.send_to(&msg.message, msg.transport.peer_addr) {
                tracing::trace!(peer = id, error = %e, "send failed");
            }
        }
        if let Some(t) = p.pc.poll_timeout()
            && p.armed != Some(t)
        {
            p.armed = Some(t);
            self.timers.push(Reverse((t, Timer::Pc(id))));
        }
        if let Some(reason) = down {
            self.totals.connections_failed += 1;
            let _ = self.events.send(MediaEvent::Down {
                participant: id,
                reason,
            });
            self.close_peer(id, false);
        }
    }

    fn send_frame(&mut self, id: u32, idx: usize, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(src) = p.sources.get_mut(idx) else {
            return;
        };
        // Next frame time; a thread that fell behind skips rather than bursts.
        src.next_at += src.interval;
        if src.next_at + Duration::from_secs(1) < now {
            src.next_at = now + src.interval;
        }
        self.timers
            .push(Reverse((src.next_at, Timer::Source(id, idx))));
        if !p.connected {
            return;
        }
        if src.params.is_none() {
            let Some(sender) = src.sender else { return };
            let mid =
                p.pc.rtp_transceiver(src.transceiver)
                    .and_then(|t| t.mid().clone());
            let Some(mut s) = p.pc.rtp_sender(sender) else {
                return;
            };
            let params = s.get_parameters();
            let mime = if src.source == Source::Audio {
                MIME_TYPE_OPUS
            } else {
                MIME_TYPE_VP8
            };
            let Some(pt) = params
                .rtp_parameters
                .codecs
                .iter()
                .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
                .map(|c| c.payload_type)
            else {
                return;
            };
            let ext = |uri: &str| {
                params
                    .rtp_parameters
                    .header_extensions
                    .iter()
                    .find(|e| e.uri == uri)
                    .and_then(|e| u8::try_from(e.id).ok())
            };
            src.params = Some(SendParams {
                pt,
                mid: ext(SDES_MID_URI).zip(mid.map(|m| Bytes::from(m.into_bytes()))),
                rid: ext(SDES_RTP_STREAM_ID_URI),
                audio_level: ext(AUDIO_LEVEL_URI),
            });
        }
        let Some(params) = src.params.clone() else {
            return;
        };
        let Some(sender) = src.sender else { return };
        let audio = src.source == Source::Audio;
        if audio
            && !src.speaker
            && src.dtx
            && src
                .last_sent
                .is_some_and(|t| now.duration_since(t) < DTX_INTERVAL)
        {
            return;
        }
        if !audio {
            if p.key_frame.swap(false, Ordering::AcqRel) {
                for s in p.sources.iter_mut().filter(|s| s.source != Source::Audio) {
                    s.want_key = true;
                }
            }
            let asked = p.asked.lock().map(|mut a| std::mem::take(&mut *a));
            for ssrc in asked.unwrap_or_default() {
                // A request for an SSRC this peer does not send on is
                // ignored, as a browser does.
                if let Some(s) = p.sources.iter_mut().find(|s| {
                    s.source != Source::Audio && s.encodings.iter().any(|e| e.ssrc == ssrc)
                }) {
                    s.want_key = true;
                }
            }
        }
        let Some(src) = p.sources.get_mut(idx) else {
            return;
        };
        let key = if audio {
            None
        } else {
            Some(src.want_key || src.frame_no % src.frames_per_key == 0)
        };
        let media_time = now.saturating_duration_since(src.started);
        let sent_us = now.saturating_duration_since(self.origin).as_micros() as u64;
        let mut any_sent = false;
        for enc in &mut src.encodings {
            let size = match key {
                None if src.speaker || !src.dtx => enc.frame_bytes,
                None => 3.0,
                Some(true) => enc.frame_bytes * 4.0,
                Some(false) => {
                    let k = f64::from(src.frames_per_key);
                    enc.frame_bytes * ((k - 4.0) / (k - 1.0).max(1.0)).max(0.25)
                }
            };
            let size = (size.round() as usize).max(payload::min_size(key));
            let info = FrameInfo {
                participant: id,
                source: src.source,
                layer: enc.layer,
                frame: src.frame_no,
                sent_us,
            };
            payload::build(&mut self.clear, key, &info, size);
            let context = match (src.source, enc.layer) {
                (Source::Audio, _) => conclave_client::stream::AUDIO,
                (Source::Screen, _) => conclave_client::stream::SCREEN,
                (Source::Camera, 0) => conclave_client::stream::CAMERA,
                (Source::Camera, l) => 2 + u64::from(l),
            };
            let codec = if audio { Codec::Opus } else { Codec::Vp8 };
            self.protected.resize(self.clear.len() + MAX_OVERHEAD, 0);
            let n = match p
                .crypto
                .encrypt(context, codec, &self.clear, &mut self.protected)
            {
                Ok(n) => n,
                Err(_) => {
                    self.totals.frames_skipped_no_key += 1;
                    continue;
                }
            };
            let protected = self.protected.get(..n).unwrap_or_default();
            let clock = if audio { 48_000u128 } else { 90_000u128 };
            let ts = enc
                .ts_base
                .wrapping_add((media_time.as_micros() * clock / 1_000_000) as u32);
            let payloads: Vec<Vec<u8>> = if audio {
                vec![protected.to_vec()]
            } else {
                vp8::packetize(protected, vp8::MAX_RTP_PAYLOAD)
            };
            let last = payloads.len().saturating_sub(1);
            let Some(mut s) = p.pc.rtp_sender(sender) else {
                return;
            };
            for (i, payload) in payloads.into_iter().enumerate() {
                let mut header = rtc::rtp::header::Header {
                    version: 2,
                    marker: !audio && i == last,
                    payload_type: params.pt,
                    sequence_number: enc.seq,
                    timestamp: ts,
                    ssrc: enc.ssrc,
                    ..Default::default()
                };
                if let Some((ext, mid)) = &params.mid {
                    let _ = header.set_extension(*ext, mid.clone());
                }
                if let (Some(ext), Some(rid)) = (params.rid, enc.rid) {
                    let _ = header.set_extension(ext, Bytes::from_static(rid.as_bytes()));
                }
                if audio && let Some(ext) = params.audio_level {
                    let level = src.level.min(127);
                    let voice = if level < 127 { 0x80 } else { 0 };
                    let _ = header.set_extension(ext, Bytes::copy_from_slice(&[voice | level]));
                }
                let pkt = rtc::rtp::Packet {
                    header,
                    payload: Bytes::from(payload),
                };
                if audio {
                    if let Err(e) = s.write_rtp(now, pkt) {
                        tracing::debug!(peer = id, error = %e, "RTP refused");
                    }
                } else {
                    let bytes = pkt.payload.len() + RTP_HEADER_BYTES;
                    p.pacer.push((sender, pkt, now), bytes);
                }
                enc.seq = enc.seq.wrapping_add(1);
            }
            any_sent = true;
            *self.totals.frames_sent.entry(src.source).or_default() += 1;
        }
        if any_sent {
            if key == Some(true) {
                self.totals.key_frames_sent += 1;
                *self
                    .totals
                    .key_frames_by_source
                    .entry(src.source)
                    .or_default() += 1;
                src.want_key = false;
            }
            src.frame_no = src.frame_no.wrapping_add(1);
            src.last_sent = Some(now);
        }
        self.pace(id, now);
        self.service(id, now);
    }

    /// Writes the video packets the peer's pacer lets go now, and arms its
    /// timer for the next.
    fn pace(&mut self, id: u32, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        while let Some((sender, pkt, queued)) = p.pacer.pop(now) {
            self.lat_pacer
                .add(now.saturating_duration_since(queued).as_secs_f64() * 1e3);
            let Some(mut s) = p.pc.rtp_sender(sender) else {
                continue;
            };
            if let Err(e) = s.write_rtp(now, pkt) {
                tracing::debug!(peer = id, error = %e, "RTP refused");
            }
        }
        if let Some(at) = p.pacer.next_at(now)
            && p.pace_armed.is_none_or(|armed| at < armed)
        {
            p.pace_armed = Some(at);
            self.timers.push(Reverse((at, Timer::Pace(id))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{getsockopt, sockopt::RcvBuf};

    fn sysctl(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .expect("readable sysctl")
            .trim()
            .parse()
            .expect("a number")
    }

    #[test]
    fn a_participant_socket_gets_the_receive_buffer_asked_for() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let default =
            getsockopt(&participant_socket(ip, 0).expect("socket"), RcvBuf).expect("SO_RCVBUF");
        assert_eq!(default, sysctl("rmem_default"));
        // As much as the kernel allows, up to 1 MiB; Linux reports twice
        // what was set (the other half is its bookkeeping).
        let asked = sysctl("rmem_max").min(1 << 20);
        let granted =
            getsockopt(&participant_socket(ip, asked).expect("socket"), RcvBuf).expect("SO_RCVBUF");
        assert!(
            granted >= asked,
            "asked for {asked} bytes, the socket has {granted}"
        );
    }
}
