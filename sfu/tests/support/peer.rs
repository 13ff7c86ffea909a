//! A small WebRTC test client for the SFU's integration tests, built on the async
//! `webrtc` crate (0.21).
//!
//! A [`TestPeer`] owns one `PeerConnection` bound to `127.0.0.1` only (no STUN, no mDNS),
//! with Opus (pt 111, 48 kHz/2) and VP8 (pt 96, 90 kHz) registered, plus the
//! `ssrc-audio-level` (audio) and `sdes:mid` (audio and video) RTP header extensions.
//!
//! Transceivers are created in a fixed order, so the offer's m-lines (and MIDs) are
//! predictable: publish audio (sendonly), publish video (sendonly), `recv_audio_slots`
//! audio recvonly, then `recv_video_slots` video recvonly.
//!
//! With [`PeerSpec::simulcast`] the video publish transceiver carries three VP8 encodings
//! with rids `q`, `h`, `f` (lowest to highest), one SSRC each, offered the way Chrome does
//! (`a=rid:<id> send` per layer and `a=simulcast:send q;h;f`, no `a=ssrc` lines), and the
//! `sdes:rtp-stream-id` / `sdes:repaired-rtp-stream-id` extensions are registered for
//! video. Each layer is written with [`TestPeer::send_video_layer`] and gets its own
//! sequence number and timestamp; every packet carries the `sdes:mid` and
//! `sdes:rtp-stream-id` extensions (the stack does not add them itself). A peer that
//! should *receive* rid-based simulcast must also set `simulcast`, so that it negotiates
//! the rid extension and can tell the layers apart.
//!
//! Signalling is non-trickle: [`TestPeer::create_offer`] returns the SDP only after ICE
//! gathering has completed, so it already carries the `127.0.0.1` host candidate.
//!
//! Media is written as raw RTP packets so a test controls the exact payload bytes (for
//! example SFrame ciphertext); the helper only fills in SSRC, payload type, sequence
//! number, timestamp and the negotiated header extensions. Every RTP packet received on
//! any remote track lands in one channel read with [`TestPeer::recv`].
//!
//! Include it from a test with `#[path = "support/peer.rs"] mod peer;`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex, OnceLock, Weak};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_rtcp_reports, configure_twcc_receiver_only,
};
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_OPUS, MIME_TYPE_VP8, MediaEngine,
};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::{
    TransportLayerNack, nack_pairs_from_sequence_numbers,
};
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::{Mutex as AsyncMutex, mpsc, watch};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription, Registry,
};
use webrtc::rtp_transceiver::RtpTransceiver;

/// RTP payload type used for Opus.
pub const OPUS_PT: u8 = 111;
/// RTP payload type used for VP8.
pub const VP8_PT: u8 = 96;
/// `urn:ietf:params:rtp-hdrext:ssrc-audio-level` (RFC 6464).
pub const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";
/// `urn:ietf:params:rtp-hdrext:sdes:mid` (RFC 8843).
pub const MID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
/// `urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id` (RFC 8852), the rid of a packet.
pub const RID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
/// `urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id` (RFC 8852).
pub const REPAIRED_RID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id";
/// Simulcast rids, lowest to highest layer (index = layer for
/// [`TestPeer::send_video_layer`]).
pub const SIMULCAST_RIDS: [&str; 3] = ["q", "h", "f"];

/// RTP timestamp advance per audio packet: 20 ms at 48 kHz.
const AUDIO_TIMESTAMP_STEP: u32 = 960;
/// How long `create_offer` / `accept_offer` wait for ICE gathering to complete.
const GATHER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a [`TestPeer`] publishes and how many remote streams it can receive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerSpec {
    /// Add a sendonly Opus transceiver.
    pub publish_audio: bool,
    /// Add a sendonly VP8 transceiver.
    pub publish_video: bool,
    /// Number of recvonly audio transceivers.
    pub recv_audio_slots: usize,
    /// Number of recvonly video transceivers.
    pub recv_video_slots: usize,
    /// Register the rid / repaired-rid extensions for video and, with `publish_video`,
    /// publish VP8 simulcast: three encodings with rids [`SIMULCAST_RIDS`].
    pub simulcast: bool,
    /// Send transport-wide congestion-control feedback for what this peer
    /// receives (so the SFU can estimate the bandwidth towards it).
    pub twcc: bool,
}

/// Media kind of a received packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Audio (Opus).
    Audio,
    /// Video (VP8).
    Video,
}

/// One RTP packet received on a remote track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Kind of the track the packet arrived on.
    pub kind: Kind,
    /// MID of the local transceiver (m-line) that received the packet; empty if unknown.
    pub mid: String,
    /// RTP SSRC.
    pub ssrc: u32,
    /// RTP sequence number.
    pub sequence_number: u16,
    /// RTP timestamp.
    pub timestamp: u32,
    /// RTP payload type.
    pub payload_type: u8,
    /// RTP marker bit.
    pub marker: bool,
    /// RTP payload, exactly as received (after SRTP decryption).
    pub payload: Vec<u8>,
    /// RFC 6464 level (0..=127, lower is louder) from the `ssrc-audio-level` extension, if
    /// the packet carried it under the id this peer negotiated.
    pub audio_level: Option<u8>,
    /// Value of the `sdes:rtp-stream-id` (rid) extension, if the packet carried it under
    /// the id this peer negotiated (only when the peer registered it: `simulcast`).
    pub rid: Option<String>,
}

/// State shared between the [`TestPeer`], its event handler and its track readers.
struct Shared {
    connection_state: watch::Sender<RTCPeerConnectionState>,
    gathering_state: watch::Sender<RTCIceGatheringState>,
    received_tx: mpsc::UnboundedSender<Received>,
    /// Set right after the connection is built; readers use it to resolve MIDs.
    pc: OnceLock<Weak<dyn PeerConnection>>,
    /// Every remote track seen so far (used to send RTCP feedback such as PLI).
    remote_tracks: StdMutex<Vec<Arc<dyn TrackRemote>>>,
    /// Header extension URI -> id, taken from the local description.
    ext_ids: StdMutex<HashMap<String, u8>>,
}

impl Shared {
    fn audio_level_id(&self) -> Option<u8> {
        self.ext_ids
            .lock()
            .ok()
            .and_then(|ids| ids.get(AUDIO_LEVEL_URI).copied())
    }

    fn rid_id(&self) -> Option<u8> {
        self.ext_ids
            .lock()
            .ok()
            .and_then(|ids| ids.get(RID_URI).copied())
    }
}

/// Receives the connection's callbacks.
struct Handler {
    shared: Arc<Shared>,
}

type HandlerFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

// `PeerConnectionEventHandler` is declared with `#[async_trait]`; this crate does not depend
// on `async-trait`, so the methods are written in the form that macro expands to.
impl PeerConnectionEventHandler for Handler {
    fn on_ice_gathering_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCIceGatheringState,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        self.shared.gathering_state.send_replace(state);
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
        self.shared.connection_state.send_replace(state);
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
        if let Ok(mut tracks) = self.shared.remote_tracks.lock() {
            tracks.push(Arc::clone(&track));
        }
        // Reading happens on its own task: this callback runs on the connection's driver.
        tokio::spawn(read_track(Arc::clone(&self.shared), track));
        Box::pin(std::future::ready(()))
    }
}

/// Pumps one remote track's RTP packets into the shared channel until the track ends.
async fn read_track(shared: Arc<Shared>, track: Arc<dyn TrackRemote>) {
    let kind = match track.kind().await {
        RtpCodecKind::Audio => Kind::Audio,
        RtpCodecKind::Video => Kind::Video,
        _ => return,
    };
    let mut mid = String::new();
    while let Some(event) = track.poll().await {
        match event {
            // The first event on a track; it names the receiver, hence the transceiver.
            TrackRemoteEvent::OnOpen(init) => {
                mid = transceiver_mid(&shared, init.receiver_id.into())
                    .await
                    .unwrap_or_default();
            }
            TrackRemoteEvent::OnRtpPacket(packet) => {
                let header = &packet.header;
                let audio_level = shared
                    .audio_level_id()
                    .and_then(|id| header.get_extension(id))
                    .and_then(|bytes| bytes.first().map(|b| b & 0x7f));
                let rid = shared
                    .rid_id()
                    .and_then(|id| header.get_extension(id))
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
                let received = Received {
                    kind,
                    mid: mid.clone(),
                    ssrc: header.ssrc,
                    sequence_number: header.sequence_number,
                    timestamp: header.timestamp,
                    payload_type: header.payload_type,
                    marker: header.marker,
                    payload: packet.payload.to_vec(),
                    audio_level,
                    rid,
                };
                if shared.received_tx.send(received).is_err() {
                    return;
                }
            }
            TrackRemoteEvent::OnEnded => return,
            _ => {}
        }
    }
}

/// MID of the transceiver with the given id, if the connection is still alive.
async fn transceiver_mid(shared: &Shared, transceiver_id: usize) -> Option<String> {
    let pc = shared.pc.get()?.upgrade()?;
    for transceiver in pc.get_transceivers().await {
        if transceiver.id() == transceiver_id {
            return transceiver.mid().await.ok().flatten();
        }
    }
    None
}

/// Negotiated parameters a sender needs to build packets the stack will accept.
#[derive(Debug, Clone)]
struct SendParams {
    payload_type: u8,
    /// (extension id, MID value) when `sdes:mid` is negotiated.
    mid: Option<(u8, Bytes)>,
    /// (extension id, rid value) when the encoding has a rid and `sdes:rtp-stream-id` is
    /// negotiated.
    rid: Option<(u8, Bytes)>,
    audio_level_id: Option<u8>,
}

#[derive(Debug)]
struct SendState {
    sequence_number: u16,
    timestamp: u32,
    params: Option<SendParams>,
}

/// One encoding (RTP stream) of a published track: the only one, or a simulcast layer.
struct Encoding {
    ssrc: u32,
    /// Simulcast rid; empty for a track without simulcast.
    rid: String,
    state: AsyncMutex<SendState>,
}

impl Encoding {
    fn new(ssrc: u32, rid: &str) -> Encoding {
        let seed = random_u32(u64::from(ssrc));
        Encoding {
            ssrc,
            rid: rid.to_owned(),
            state: AsyncMutex::new(SendState {
                sequence_number: (seed & 0x7fff) as u16,
                timestamp: seed.rotate_left(16),
                params: None,
            }),
        }
    }
}

/// One published (sendonly) track.
struct LocalTrack {
    mime_type: &'static str,
    track: Arc<TrackLocalStaticRTP>,
    transceiver: Arc<dyn RtpTransceiver>,
    /// One entry, or one per simulcast layer in [`SIMULCAST_RIDS`] order.
    encodings: Vec<Encoding>,
}

impl LocalTrack {
    /// SSRC of encoding `index`, 0 if there is no such encoding.
    fn ssrc(&self, index: usize) -> u32 {
        self.encodings.get(index).map_or(0, |e| e.ssrc)
    }

    /// Resolves what the sender actually negotiated. `RTCRtpSender::write_rtp` in the core
    /// rejects (and the async driver merely logs) any packet whose SSRC, payload type or
    /// header-extension ids are not the sender's, while `TrackLocal::write_rtp` still
    /// returns `Ok`, so everything is taken from the sender's own parameters.
    async fn resolve_params(&self, encoding: &Encoding) -> anyhow::Result<SendParams> {
        let sender = self
            .transceiver
            .sender()
            .await?
            .context("publish transceiver has no sender")?;
        let params = sender.get_parameters().await?;
        let negotiated = params
            .encodings
            .iter()
            .find(|e| e.rtp_coding_parameters.ssrc == Some(encoding.ssrc));
        let Some(negotiated) = negotiated else {
            bail!("sender encodings do not carry SSRC {}", encoding.ssrc);
        };
        if negotiated.rtp_coding_parameters.rid != encoding.rid {
            bail!(
                "sender encoding with SSRC {} has rid {:?}, expected {:?}",
                encoding.ssrc,
                negotiated.rtp_coding_parameters.rid,
                encoding.rid
            );
        }
        let payload_type = params
            .rtp_parameters
            .codecs
            .iter()
            .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(self.mime_type))
            .map(|c| c.payload_type)
            .with_context(|| format!("{} is not negotiated on this sender", self.mime_type))?;
        let ext_id = |uri: &str| {
            params
                .rtp_parameters
                .header_extensions
                .iter()
                .find(|e| e.uri == uri)
                .and_then(|e| u8::try_from(e.id).ok())
        };
        let mid = match (ext_id(MID_URI), self.transceiver.mid().await?) {
            (Some(id), Some(mid)) => Some((id, Bytes::from(mid.into_bytes()))),
            _ => None,
        };
        let rid = if encoding.rid.is_empty() {
            None
        } else {
            // Without the rid extension the receiver cannot tell the layers apart (a
            // rid-based offer has no `a=ssrc` lines), so refuse rather than send blind.
            let id = ext_id(RID_URI).context(
                "simulcast sender has no negotiated sdes:rtp-stream-id extension \
                 (does the answerer register it?)",
            )?;
            Some((id, Bytes::from(encoding.rid.clone().into_bytes())))
        };
        Ok(SendParams {
            payload_type,
            mid,
            rid,
            audio_level_id: ext_id(AUDIO_LEVEL_URI),
        })
    }

    /// Sends one RTP packet on encoding `index`, stamped with that encoding's current
    /// sequence number and timestamp, then advances them (the timestamp by
    /// `timestamp_step`).
    async fn send(
        &self,
        index: usize,
        payload: &[u8],
        marker: bool,
        timestamp_step: u32,
        audio_level: Option<u8>,
    ) -> anyhow::Result<()> {
        let encoding = self
            .encodings
            .get(index)
            .with_context(|| format!("no encoding {index} on this track"))?;
        let mut state = encoding.state.lock().await;
        let params = match &state.params {
            Some(params) => params.clone(),
            None => {
                let params = self.resolve_params(encoding).await?;
                state.params = Some(params.clone());
                params
            }
        };
        let mut header = rtp::header::Header {
            version: 2,
            marker,
            payload_type: params.payload_type,
            sequence_number: state.sequence_number,
            timestamp: state.timestamp,
            ssrc: encoding.ssrc,
            ..Default::default()
        };
        if let Some((id, mid)) = &params.mid {
            header.set_extension(*id, mid.clone())?;
        }
        if let Some((id, rid)) = &params.rid {
            header.set_extension(*id, rid.clone())?;
        }
        if let (Some(level), Some(id)) = (audio_level, params.audio_level_id) {
            // RFC 6464 one-byte form: V flag (voice activity) + 7-bit level in -dBov.
            let level = level.min(127);
            let voice = if level < 127 { 0x80 } else { 0 };
            header.set_extension(id, Bytes::copy_from_slice(&[voice | level]))?;
        }
        let packet = rtp::packet::Packet {
            header,
            payload: Bytes::copy_from_slice(payload),
        };
        self.track.write_rtp(packet).await?;
        state.sequence_number = state.sequence_number.wrapping_add(1);
        state.timestamp = state.timestamp.wrapping_add(timestamp_step);
        Ok(())
    }
}

/// A WebRTC endpoint driven by a test. See the module documentation.
pub struct TestPeer {
    pc: Arc<dyn PeerConnection>,
    shared: Arc<Shared>,
    spec: PeerSpec,
    audio: Option<LocalTrack>,
    video: Option<LocalTrack>,
    received_rx: AsyncMutex<mpsc::UnboundedReceiver<Received>>,
}

impl fmt::Debug for TestPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestPeer")
            .field("spec", &self.spec)
            .field("audio_ssrc", &self.audio_ssrc())
            .field("video_ssrc", &self.video_ssrc())
            .field("connection_state", &*self.shared.connection_state.borrow())
            .finish_non_exhaustive()
    }
}

impl TestPeer {
    /// Builds the connection (bound to `127.0.0.1:0` only, mDNS off, no ICE servers) and
    /// adds the transceivers described by `spec`, in the documented order.
    pub async fn new(spec: PeerSpec) -> anyhow::Result<TestPeer> {
        let mut media_engine = MediaEngine::default();
        media_engine.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: opus_codec(),
                payload_type: OPUS_PT,
            },
            RtpCodecKind::Audio,
        )?;
        media_engine.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: vp8_codec(),
                payload_type: VP8_PT,
            },
            RtpCodecKind::Video,
        )?;
        for (uri, kind) in [
            (AUDIO_LEVEL_URI, RtpCodecKind::Audio),
            (MID_URI, RtpCodecKind::Audio),
            (MID_URI, RtpCodecKind::Video),
        ] {
            media_engine.register_header_extension(
                RTCRtpHeaderExtensionCapability {
                    uri: uri.to_owned(),
                },
                kind,
                None,
            )?;
        }
        if spec.simulcast {
            for uri in [RID_URI, REPAIRED_RID_URI] {
                media_engine.register_header_extension(
                    RTCRtpHeaderExtensionCapability {
                        uri: uri.to_owned(),
                    },
                    RtpCodecKind::Video,
                    None,
                )?;
            }
        }
        // Sender/receiver reports only: no NACK or TWCC (so no RTX), and simulcast
        // extensions only with `spec.simulcast`, so the SFU sees exactly the extensions
        // listed above.
        let mut registry = configure_rtcp_reports(Registry::new());
        if spec.twcc {
            registry = configure_twcc_receiver_only(registry, &mut media_engine)?;
        }

        let setting_engine = SettingEngineBuilder::new()
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .build();

        let (received_tx, received_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            connection_state: watch::Sender::new(RTCPeerConnectionState::New),
            gathering_state: watch::Sender::new(RTCIceGatheringState::New),
            received_tx,
            pc: OnceLock::new(),
            remote_tracks: StdMutex::new(Vec::new()),
            ext_ids: StdMutex::new(HashMap::new()),
        });

        let pc = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media_engine)
            .with_setting_engine(setting_engine)
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(Handler {
                shared: Arc::clone(&shared),
            }))
            // A concrete address is bound as given (a wildcard would skip loopback).
            .with_udp_addrs(vec!["127.0.0.1:0"])
            .build()
            .await?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);
        let _ = shared.pc.set(Arc::downgrade(&pc));

        // Distinct non-zero SSRCs: audio, then one per video encoding.
        let mut ssrcs: Vec<u32> = Vec::with_capacity(1 + SIMULCAST_RIDS.len());
        for salt in 1..=(1 + SIMULCAST_RIDS.len() as u64) {
            let mut ssrc = random_u32(salt);
            while ssrcs.contains(&ssrc) {
                ssrc = ssrc.wrapping_add(1).max(1);
            }
            ssrcs.push(ssrc);
        }
        let audio_ssrc = ssrcs[0];
        let video_encodings: Vec<(u32, &str)> = if spec.simulcast {
            ssrcs[1..].iter().copied().zip(SIMULCAST_RIDS).collect()
        } else {
            vec![(ssrcs[1], "")]
        };

        // One media stream (msid) per peer, like a browser's getUserMedia stream.
        let stream_id = format!("conclave-test-{audio_ssrc:08x}");
        let audio = if spec.publish_audio {
            Some(
                add_publish_track(&pc, &stream_id, RtpCodecKind::Audio, &[(audio_ssrc, "")])
                    .await?,
            )
        } else {
            None
        };
        let video = if spec.publish_video {
            Some(add_publish_track(&pc, &stream_id, RtpCodecKind::Video, &video_encodings).await?)
        } else {
            None
        };
        for (kind, count) in [
            (RtpCodecKind::Audio, spec.recv_audio_slots),
            (RtpCodecKind::Video, spec.recv_video_slots),
        ] {
            for _ in 0..count {
                pc.add_transceiver_from_kind(
                    kind,
                    Some(RTCRtpTransceiverInit {
                        direction: RTCRtpTransceiverDirection::Recvonly,
                        ..Default::default()
                    }),
                )
                .await?;
            }
        }

        Ok(TestPeer {
            pc,
            shared,
            spec,
            audio,
            video,
            received_rx: AsyncMutex::new(received_rx),
        })
    }

    /// The spec this peer was built with.
    pub fn spec(&self) -> PeerSpec {
        self.spec
    }

    /// The underlying connection, for anything this helper does not cover.
    pub fn peer_connection(&self) -> &Arc<dyn PeerConnection> {
        &self.pc
    }

    /// Creates an offer, applies it locally, waits for ICE gathering to complete and returns
    /// the full local SDP (with its `127.0.0.1` host candidate).
    pub async fn create_offer(&self) -> anyhow::Result<String> {
        let offer = self.pc.create_offer(None).await?;
        self.pc.set_local_description(offer).await?;
        self.finish_local_description().await
    }

    /// Applies the remote answer to an offer from [`TestPeer::create_offer`].
    pub async fn set_answer(&self, sdp: String) -> anyhow::Result<()> {
        let answer = RTCSessionDescription::answer(sdp)?;
        self.pc.set_remote_description(answer).await?;
        Ok(())
    }

    /// Answerer mode: applies a remote offer, creates and applies the answer, waits for ICE
    /// gathering and returns the full answer SDP. Remote sendonly m-lines are matched to this
    /// peer's recvonly slots of the same kind (or get fresh recvonly transceivers).
    pub async fn accept_offer(&self, sdp: String) -> anyhow::Result<String> {
        let offer = RTCSessionDescription::offer(sdp)?;
        self.pc.set_remote_description(offer).await?;
        let answer = self.pc.create_answer(None).await?;
        self.pc.set_local_description(answer).await?;
        self.finish_local_description().await
    }

    async fn finish_local_description(&self) -> anyhow::Result<String> {
        let mut gathering = self.shared.gathering_state.subscribe();
        tokio::time::timeout(
            GATHER_TIMEOUT,
            gathering.wait_for(|s| *s == RTCIceGatheringState::Complete),
        )
        .await
        .context("timed out waiting for ICE gathering to complete")?
        .map_err(|_| anyhow!("peer connection dropped while gathering"))?;
        let sdp = self
            .pc
            .local_description()
            .await
            .context("no local description after set_local_description")?
            .sdp;
        if !sdp.contains("a=candidate") {
            bail!("local description has no ICE candidate:\n{sdp}");
        }
        if let Ok(mut ids) = self.shared.ext_ids.lock() {
            ids.extend(parse_extmaps(&sdp));
        }
        Ok(sdp)
    }

    /// Waits until the connection state is `Connected` (ICE + DTLS done). Fails early if it
    /// becomes `Failed` or `Closed`, or after `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut states = self.shared.connection_state.subscribe();
        let reached = tokio::time::timeout(
            timeout,
            states.wait_for(|s| {
                matches!(
                    s,
                    RTCPeerConnectionState::Connected
                        | RTCPeerConnectionState::Failed
                        | RTCPeerConnectionState::Closed
                )
            }),
        )
        .await;
        let state = match reached {
            Err(_) => bail!(
                "not connected after {timeout:?}; state {}",
                *self.shared.connection_state.borrow()
            ),
            Ok(Err(_)) => bail!("peer connection dropped"),
            Ok(Ok(state)) => *state,
        };
        if state == RTCPeerConnectionState::Connected {
            Ok(())
        } else {
            bail!("connection ended up {state}")
        }
    }

    /// Current connection state.
    pub fn connection_state(&self) -> RTCPeerConnectionState {
        *self.shared.connection_state.borrow()
    }

    /// Sends one Opus RTP packet carrying exactly `payload`. Sequence number +1 and
    /// timestamp +960 (20 ms at 48 kHz) per call. `audio_level` (RFC 6464, 0..=127, lower
    /// is louder; V flag set when < 127) is written into the `ssrc-audio-level` extension if
    /// negotiated. The `sdes:mid` extension is always added when negotiated.
    /// Call after [`TestPeer::wait_connected`].
    pub async fn send_audio(&self, payload: &[u8], audio_level: Option<u8>) -> anyhow::Result<()> {
        let track = self.audio.as_ref().context("peer does not publish audio")?;
        track
            .send(0, payload, false, AUDIO_TIMESTAMP_STEP, audio_level)
            .await
    }

    /// Sends one VP8 RTP packet carrying exactly `payload` with the given marker bit. The
    /// packet gets the current timestamp, which is then advanced by `timestamp_step`: pass 0
    /// for all but the last packet of a frame, and e.g. 3000 (30 fps) with `marker = true`
    /// on the last one. Sequence number +1 per call. With simulcast this sends on layer 0
    /// (`q`), like `send_video_layer(0, ..)`.
    pub async fn send_video(
        &self,
        payload: &[u8],
        marker: bool,
        timestamp_step: u32,
    ) -> anyhow::Result<()> {
        self.send_video_layer(0, payload, marker, timestamp_step)
            .await
    }

    /// Sends one VP8 RTP packet on simulcast layer `layer` (0 = `q`, 1 = `h`, 2 = `f`;
    /// see [`SIMULCAST_RIDS`]) with that layer's SSRC, sequence number and timestamp, which
    /// are independent of the other layers'. The packet carries the `sdes:mid` and
    /// `sdes:rtp-stream-id` extensions. Timestamp and marker work as in
    /// [`TestPeer::send_video`]. Without simulcast only layer 0 exists.
    pub async fn send_video_layer(
        &self,
        layer: usize,
        payload: &[u8],
        marker: bool,
        timestamp_step: u32,
    ) -> anyhow::Result<()> {
        let track = self.video.as_ref().context("peer does not publish video")?;
        track
            .send(layer, payload, marker, timestamp_step, None)
            .await
    }

    /// SSRC of the published audio track (0 if the peer does not publish audio).
    pub fn audio_ssrc(&self) -> u32 {
        self.audio.as_ref().map_or(0, |t| t.ssrc(0))
    }

    /// SSRC of the published video track (0 if the peer does not publish video). With
    /// simulcast, the SSRC of layer 0 (`q`).
    pub fn video_ssrc(&self) -> u32 {
        self.video_layer_ssrc(0)
    }

    /// SSRC of video simulcast layer `layer` (0 = `q`, 1 = `h`, 2 = `f`). 0 if the peer
    /// does not publish video or has no such layer (without simulcast only layer 0).
    pub fn video_layer_ssrc(&self, layer: usize) -> u32 {
        self.video.as_ref().map_or(0, |t| t.ssrc(layer))
    }

    /// Next RTP packet received on any remote track, or `None` after `timeout`.
    pub async fn recv(&self, timeout: Duration) -> Option<Received> {
        let mut rx = self.received_rx.lock().await;
        tokio::time::timeout(timeout, rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Drops every packet already queued; returns how many were dropped.
    pub async fn drain(&self) -> usize {
        let mut rx = self.received_rx.lock().await;
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    /// Sends an RTCP PLI for `media_ssrc` through a receiver. Needs at least one remote
    /// track to have started (RTCP goes out via a receiver; the track carrying
    /// `media_ssrc` is preferred).
    pub async fn send_rtcp_pli(&self, media_ssrc: u32) -> anyhow::Result<()> {
        let sender_ssrc = self.audio_ssrc().max(self.video_ssrc());
        self.send_rtcp(
            media_ssrc,
            Box::new(PictureLossIndication {
                sender_ssrc,
                media_ssrc,
            }),
        )
        .await
    }

    /// Sends an RTCP generic NACK asking for the packets `seqs` of `media_ssrc` again,
    /// the way [`TestPeer::send_rtcp_pli`] sends a PLI.
    pub async fn send_rtcp_nack(&self, media_ssrc: u32, seqs: &[u16]) -> anyhow::Result<()> {
        let sender_ssrc = self.audio_ssrc().max(self.video_ssrc());
        self.send_rtcp(
            media_ssrc,
            Box::new(TransportLayerNack {
                sender_ssrc,
                media_ssrc,
                nacks: nack_pairs_from_sequence_numbers(seqs),
            }),
        )
        .await
    }

    async fn send_rtcp(
        &self,
        media_ssrc: u32,
        packet: Box<dyn rtc::rtcp::Packet>,
    ) -> anyhow::Result<()> {
        let tracks: Vec<Arc<dyn TrackRemote>> = self
            .shared
            .remote_tracks
            .lock()
            .map_err(|_| anyhow!("remote track list poisoned"))?
            .clone();
        let mut chosen = None;
        for track in &tracks {
            if track.ssrcs().await.contains(&media_ssrc) {
                chosen = Some(track);
                break;
            }
        }
        let track = chosen
            .or_else(|| tracks.first())
            .context("no remote track yet to send RTCP through")?;
        track.write_rtcp(vec![packet]).await?;
        Ok(())
    }

    /// Closes the connection. Errors are ignored (closing twice is fine).
    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}

fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

fn vp8_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        // Generic NACK too, so that the SFU keeps a send cache to answer it from.
        rtcp_feedback: vec![
            RTCPFeedback {
                typ: "nack".to_owned(),
                parameter: String::new(),
            },
            RTCPFeedback {
                typ: "nack".to_owned(),
                parameter: "pli".to_owned(),
            },
        ],
    }
}

/// Adds a sendonly transceiver around a raw-RTP track with fixed SSRCs and one codec.
/// `encodings` lists `(ssrc, rid)`: one entry with an empty rid for a plain track, or one
/// per simulcast layer (all with rids, lowest layer first), which the stack offers as
/// `a=rid:<rid> send` lines plus `a=simulcast:send <rids in this order>`.
async fn add_publish_track(
    pc: &Arc<dyn PeerConnection>,
    stream_id: &str,
    kind: RtpCodecKind,
    encodings: &[(u32, &str)],
) -> anyhow::Result<LocalTrack> {
    let (codec, mime_type, name) = match kind {
        RtpCodecKind::Audio => (opus_codec(), MIME_TYPE_OPUS, "audio"),
        _ => (vp8_codec(), MIME_TYPE_VP8, "video"),
    };
    let &(first_ssrc, _) = encodings.first().context("a track needs an encoding")?;
    let codings = encodings
        .iter()
        .map(|&(ssrc, rid)| RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                rid: rid.to_owned(),
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec: codec.clone(),
            ..Default::default()
        })
        .collect();
    let media = MediaStreamTrack::new(
        stream_id.to_owned(),
        format!("conclave-test-{name}-{first_ssrc:08x}"),
        format!("conclave-test-{name}"),
        kind,
        codings,
    );
    let track = Arc::new(TrackLocalStaticRTP::new(media));
    let transceiver = pc
        .add_transceiver_from_track(
            Arc::clone(&track) as Arc<dyn TrackLocal>,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Sendonly,
                ..Default::default()
            }),
        )
        .await?;
    Ok(LocalTrack {
        mime_type,
        track,
        transceiver,
        encodings: encodings
            .iter()
            .map(|&(ssrc, rid)| Encoding::new(ssrc, rid))
            .collect(),
    })
}

/// `uri -> id` for every `a=extmap:<id>[/<direction>] <uri>` line of an SDP.
fn parse_extmaps(sdp: &str) -> HashMap<String, u8> {
    sdp.lines()
        .filter_map(|line| line.trim().strip_prefix("a=extmap:"))
        .filter_map(|rest| {
            let mut parts = rest.split_whitespace();
            let id = parts.next()?.split('/').next()?.parse::<u8>().ok()?;
            let uri = parts.next()?;
            Some((uri.to_owned(), id))
        })
        .collect()
}

/// A non-zero pseudo-random `u32` (std's randomly keyed hasher; no `rand` dependency).
fn random_u32(salt: u64) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(salt);
    if let Ok(elapsed) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(elapsed.as_nanos());
    }
    let bits = hasher.finish();
    let value = (bits ^ (bits >> 32)) as u32;
    value.max(1)
}
