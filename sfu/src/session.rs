//! One client's media session: its sans-IO peer connection (ICE-lite,
//! DTLS server, SRTP with AES-GCM preferred), what it publishes, and its
//! receive slots.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use conclave_protocol::sframe::Codec;
use rtc::interceptor::{
    Gcc, NackResponderBuilder, Registry, SenderReportBuilder, Slot as ChainSlot,
};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::RTCPeerConnectionBuilder;
use rtc::peer_connection::certificate::RTCCertificate;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::{
    CongestionFeedback, configure_congestion_control, configure_nack, configure_rtcp_reports,
    configure_twcc_receiver_only,
};
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_OPUS, MIME_TYPE_VP8, MediaEngine,
};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCDtlsRole, RTCIceCandidate,
};
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{
    RTCRtpReceiverId, RTCRtpSenderId, RTCRtpTransceiverDirection, RTCRtpTransceiverInit,
};

use crate::api::{PublishRights, QualityPrefs, SessionId, SfuError, Source};
use crate::forward::{Activity, KeyFrameThrottle, Rewriter};
use crate::tap::{Tap, TapState};

/// Opus payload type the SFU offers.
const OPUS_PT: u8 = 111;
/// VP8 payload type the SFU offers.
const VP8_PT: u8 = 96;

/// One m-line of an offer, as far as slot planning needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfferLine {
    /// `audio` or `video`.
    pub video: bool,
    /// The mid.
    pub mid: String,
    /// The client sends on it.
    pub sends: bool,
    /// The client receives on it.
    pub receives: bool,
}

/// Reads the m-lines of an SDP offer. Rejects offers without media.
pub fn summarize_offer(sdp: &str) -> Result<Vec<OfferLine>, SfuError> {
    if sdp.len() > 64 * 1024 {
        return Err(SfuError::BadOffer("offer larger than 64 KiB".into()));
    }
    let mut lines: Vec<OfferLine> = Vec::new();
    let mut session_dir: Option<&str> = None;
    for raw in sdp.lines() {
        let line = raw.trim_end();
        if let Some(rest) = line.strip_prefix("m=") {
            let kind = rest.split(' ').next().unwrap_or("");
            lines.push(OfferLine {
                video: kind == "video",
                mid: String::new(),
                sends: true,
                receives: true,
            });
            if kind != "audio" && kind != "video" {
                // application (data channel) lines are neither.
                if let Some(l) = lines.last_mut() {
                    l.sends = false;
                    l.receives = false;
                }
            }
            continue;
        }
        let dir = match line {
            "a=sendonly" => Some((true, false)),
            "a=recvonly" => Some((false, true)),
            "a=inactive" => Some((false, false)),
            "a=sendrecv" => Some((true, true)),
            _ => None,
        };
        match lines.last_mut() {
            None => {
                if dir.is_some() {
                    session_dir = Some(line);
                }
            }
            Some(l) => {
                if let Some(mid) = line.strip_prefix("a=mid:") {
                    l.mid = mid.to_string();
                } else if let Some((s, r)) = dir {
                    l.sends &= s;
                    l.receives &= r;
                }
            }
        }
    }
    let _ = session_dir;
    if lines.is_empty() {
        return Err(SfuError::BadOffer("no media sections".into()));
    }
    if lines.iter().any(|l| l.mid.is_empty()) {
        return Err(SfuError::BadOffer("media section without a mid".into()));
    }
    Ok(lines)
}

/// An inbound RTP stream (one simulcast layer of one source).
#[derive(Debug)]
pub struct InStream {
    pub source: Source,
    pub codec: Codec,
    pub layer: u8,
    pub receiver: RTCRtpReceiverId,
    /// The RTP timestamp of the frame being let through, or of the frame
    /// being dropped, for VP8 continuation packets.
    pub gate: Option<(u32, bool)>,
    /// Bytes received in the current measurement window.
    pub window_bytes: u64,
    /// Measured bitrate, bits per second.
    pub bps: u64,
}

/// Per-source state of a publisher.
#[derive(Debug, Default)]
pub struct SourceState {
    /// Inbound SSRC of each simulcast layer.
    pub layers: [Option<u32>; 3],
    pub throttle: KeyFrameThrottle,
    pub announced: bool,
}

/// One outgoing stream of a subscriber.
#[derive(Debug)]
pub struct Slot {
    pub video: bool,
    pub sender: RTCRtpSenderId,
    pub ssrc: u32,
    pub pt: u8,
    pub clock_rate: u32,
    /// Which publisher source fills it.
    pub assigned: Option<(SessionId, Source)>,
    /// Layer being forwarded (None until a key frame arrives).
    pub layer: Option<u8>,
    /// Layer wanted.
    pub target: u8,
    pub rewriter: Rewriter,
}

/// A media session.
pub struct Session {
    pub id: SessionId,
    pub call: u64,
    pub participant: String,
    pub pc: RTCPeerConnection,
    pub ufrag: String,
    pub remotes: Vec<SocketAddr>,
    pub rights: PublishRights,
    pub prefs: QualityPrefs,
    pub pins: Vec<(String, Source)>,
    pub mid_sources: HashMap<String, Source>,
    pub streams: HashMap<u32, InStream>,
    pub sources: HashMap<Source, SourceState>,
    pub audio_level_ext: Option<u8>,
    pub slots: Vec<Slot>,
    pub activity: Activity,
    pub heard_since_tick: bool,
    pub last_rx: Instant,
    pub up: bool,
    pub armed: Option<Instant>,
    /// The pending inactivity check.
    pub reap_armed: Option<Instant>,
    /// Tests: the next processing of this session panics.
    #[cfg(feature = "fault-injection")]
    pub fault_injected: bool,
    /// Tests: RTP datagrams still to discard instead of sending.
    #[cfg(feature = "fault-injection")]
    pub lose_media: u32,
    pub tap: Arc<TapState>,
    /// Send-side bandwidth estimation runs towards this subscriber.
    pub bwe: bool,
    pub bucket: TokenBucket,
    pub joined: Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("participant", &self.participant)
            .field("remotes", &self.remotes)
            .field("up", &self.up)
            .finish_non_exhaustive()
    }
}

/// A token bucket for packet-rate limits.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` packets per second with bursts of `burst`.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token; false if the rate is exceeded.
    pub fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What building a session needs from the SFU's configuration.
#[derive(Debug)]
pub struct BuildParams<'a> {
    pub certificate: &'a RTCCertificate,
    pub advertised: SocketAddr,
    pub audio_slots: usize,
    pub video_slots: usize,
    pub congestion_control: bool,
}

/// The result of negotiating a session.
pub struct Built {
    pub pc: RTCPeerConnection,
    pub ufrag: String,
    pub answer_sdp: String,
    pub slots: Vec<Slot>,
    pub mid_sources: HashMap<String, Source>,
    pub tap: Arc<TapState>,
    pub bwe: bool,
}

fn codecs() -> (RTCRtpCodecParameters, RTCRtpCodecParameters) {
    let opus = RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: MIME_TYPE_OPUS.to_owned(),
            clock_rate: 48_000,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1;usedtx=1".to_owned(),
            rtcp_feedback: vec![],
        },
        payload_type: OPUS_PT,
    };
    let vp8 = RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: MIME_TYPE_VP8.to_owned(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: String::new(),
            rtcp_feedback: vec![],
        },
        payload_type: VP8_PT,
    };
    (opus, vp8)
}

fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut out = String::with_capacity(len);
    for _ in 0..len {
        let i = (rand::random::<u32>() as usize) % ALPHABET.len();
        out.push(char::from(ALPHABET[i]));
    }
    out
}

fn rtc_err(e: impl std::fmt::Display) -> SfuError {
    SfuError::Rtc(e.to_string())
}

/// Where the [`Tap`] sits in a session's interceptor chain: at the
/// application end.
const TAP_SLOT: ChainSlot = ChainSlot::Custom(20_000);

/// A session's interceptor chain (without the [`Tap`]), and what it
/// negotiates on `media`: NACK, PLI, the RTCP reports and transport-wide
/// feedback for every session, and send-side congestion control with `bwe`.
///
/// A client that sends nothing (`sends_media` false: a listener, a
/// recorder) has no media coming in, so its chain leaves out what acts only
/// on received media, the NACK generator, the receiver reports and (without
/// `bwe`) the TWCC arrival recorder: they would only hand on every packet
/// sent to it. The negotiation is the same either way.
fn interceptors(
    media: &mut MediaEngine,
    sends_media: bool,
    bwe: bool,
) -> Result<Registry, SfuError> {
    let mut registry = configure_rtcp_reports(configure_nack(Registry::new(), media));
    if !sends_media {
        registry = Registry::new()
            .with(
                ChainSlot::NackResponder,
                NackResponderBuilder::new().build(),
            )
            .with(ChainSlot::SenderReport, SenderReportBuilder::new().build());
    }
    if bwe {
        return configure_congestion_control(
            registry,
            Gcc::default(),
            CongestionFeedback::Twcc,
            media,
        )
        .map_err(rtc_err);
    }
    if sends_media {
        configure_twcc_receiver_only(registry, media).map_err(rtc_err)
    } else {
        configure_twcc_receiver_only(Registry::new(), media).map_err(rtc_err)?;
        Ok(registry)
    }
}

/// Negotiates a session: builds the peer connection, adds one sending
/// transceiver per receive slot the offer asks for (up to the limits),
/// applies the offer and produces the answer.
pub fn negotiate(
    params: &BuildParams<'_>,
    offer_sdp: &str,
    explicit_sources: &[(String, Source)],
    now: Instant,
) -> Result<Built, SfuError> {
    let lines = summarize_offer(offer_sdp)?;
    let offer = RTCSessionDescription::offer(offer_sdp.to_owned())
        .map_err(|e| SfuError::BadOffer(e.to_string()))?;

    let (opus, vp8) = codecs();
    let mut media = MediaEngine::default();
    media
        .register_codec(opus.clone(), RtpCodecKind::Audio)
        .map_err(rtc_err)?;
    media
        .register_codec(vp8.clone(), RtpCodecKind::Video)
        .map_err(rtc_err)?;
    for (uri, kind) in [
        (rtc::sdp::extmap::SDES_MID_URI, RtpCodecKind::Audio),
        (rtc::sdp::extmap::AUDIO_LEVEL_URI, RtpCodecKind::Audio),
        (rtc::sdp::extmap::SDES_MID_URI, RtpCodecKind::Video),
        (
            rtc::sdp::extmap::SDES_RTP_STREAM_ID_URI,
            RtpCodecKind::Video,
        ),
        (
            rtc::sdp::extmap::SDES_REPAIR_RTP_STREAM_ID_URI,
            RtpCodecKind::Video,
        ),
    ] {
        media
            .register_header_extension(
                RTCRtpHeaderExtensionCapability {
                    uri: uri.to_owned(),
                },
                kind,
                None,
            )
            .map_err(rtc_err)?;
    }
    let tap = Arc::new(TapState::default());
    // Send-side estimation needs the subscriber's transport-wide feedback;
    // without it GCC would hold the initial 300 kbit/s and the pacer would
    // throttle everything to that.
    let twcc = offer_sdp.contains("transport-wide-cc-extensions");
    let bwe = params.congestion_control && twcc;
    let sends_media = lines.iter().any(|l| l.sends);
    let registry =
        interceptors(&mut media, sends_media, bwe)?.with(TAP_SLOT, Tap::new(tap.clone()));

    let ufrag = random_token(16);
    let pwd = random_token(32);
    let setting = SettingEngineBuilder::new()
        .with_lite(true)
        .with_answering_dtls_role(RTCDtlsRole::Server)
        .with_srtp_protection_profiles(vec![
            rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
            rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
        ])
        .with_ice_credentials(ufrag.clone(), pwd)
        .build();
    let config = RTCConfigurationBuilder::new()
        .with_certificates(vec![params.certificate.clone()])
        .build();
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(config)
        .with_setting_engine(setting)
        .with_media_engine(media)
        .with_interceptor_registry(registry)
        .build(now)
        .map_err(rtc_err)?;

    // Receive slots: one sending transceiver per recvonly m-line.
    let want_audio = lines
        .iter()
        .filter(|l| !l.video && l.receives && !l.sends)
        .count()
        .min(params.audio_slots);
    let want_video = lines
        .iter()
        .filter(|l| l.video && l.receives && !l.sends)
        .count()
        .min(params.video_slots);
    let mut planned = Vec::new();
    for (i, video) in (0..want_audio)
        .map(|i| (i, false))
        .chain((0..want_video).map(|i| (i, true)))
    {
        let ssrc = rand::random::<u32>();
        let (kind, codec, label) = if video {
            (RtpCodecKind::Video, vp8.rtp_codec.clone(), format!("v{i}"))
        } else {
            (RtpCodecKind::Audio, opus.rtp_codec.clone(), format!("a{i}"))
        };
        let track = MediaStreamTrack::new(
            "conclave".to_owned(),
            format!("slot-{label}"),
            format!("slot-{label}"),
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
        planned.push((tid, video, ssrc));
    }

    pc.set_remote_description(now, offer)
        .map_err(|e| SfuError::BadOffer(e.to_string()))?;
    let candidate = CandidateHostConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: params.advertised.ip().to_string(),
            port: params.advertised.port(),
            component: 1,
            ..Default::default()
        },
        ..Default::default()
    }
    .new_candidate_host()
    .map_err(rtc_err)?;
    let init = RTCIceCandidate::from(&candidate)
        .to_json()
        .map_err(rtc_err)?;
    pc.add_local_candidate(init).map_err(rtc_err)?;
    let answer = pc.create_answer(None).map_err(rtc_err)?;
    pc.set_local_description(now, answer).map_err(rtc_err)?;
    let answer_sdp = pc
        .local_description()
        .map(|d| d.sdp)
        .ok_or_else(|| SfuError::Rtc("no local description".into()))?;

    let mut slots = Vec::new();
    for (tid, video, ssrc) in planned {
        let Some(t) = pc.rtp_transceiver(tid) else {
            continue;
        };
        if t.mid().is_none() {
            continue; // not matched to an m-line of the offer
        }
        let Some(sender) = t.sender() else { continue };
        let Some(mut s) = pc.rtp_sender(sender) else {
            continue;
        };
        let mime = if video { MIME_TYPE_VP8 } else { MIME_TYPE_OPUS };
        let Some((pt, clock_rate)) = s
            .get_parameters()
            .rtp_parameters
            .codecs
            .iter()
            .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
            .map(|c| (c.payload_type, c.rtp_codec.clock_rate))
        else {
            continue;
        };
        slots.push(Slot {
            video,
            sender,
            ssrc,
            pt,
            clock_rate,
            assigned: None,
            layer: None,
            target: 0,
            rewriter: Rewriter::default(),
        });
    }

    // Which offered sending m-line is which source.
    let mut mid_sources = HashMap::new();
    let mut videos = 0;
    let mut audio_seen = false;
    for l in lines.iter().filter(|l| l.sends) {
        let source = if l.video {
            videos += 1;
            match videos {
                1 => Some(Source::Camera),
                2 => Some(Source::Screen),
                _ => None,
            }
        } else if !audio_seen {
            audio_seen = true;
            Some(Source::Audio)
        } else {
            None
        };
        if let Some(s) = source {
            mid_sources.insert(l.mid.clone(), s);
        }
    }
    for (mid, source) in explicit_sources {
        if let Some(l) = lines.iter().find(|l| &l.mid == mid)
            && l.video == source.is_video()
        {
            mid_sources.insert(mid.clone(), *source);
        }
    }

    Ok(Built {
        pc,
        ufrag,
        answer_sdp,
        slots,
        mid_sources,
        tap,
        bwe,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_summary_reads_directions_and_mids() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendrecv\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:2\r\na=recvonly\r\n\
            m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:3\r\n";
        let lines = summarize_offer(sdp).unwrap();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].sends && !lines[0].receives && !lines[0].video);
        assert!(lines[1].sends && lines[1].receives && lines[1].video);
        assert!(!lines[2].sends && lines[2].receives);
        assert!(!lines[3].sends && !lines[3].receives);
        assert_eq!(lines[2].mid, "2");
    }

    #[test]
    fn clients_that_send_nothing_get_no_interceptors_for_received_media() {
        let chain = |sends_media: bool, bwe: bool| -> Vec<ChainSlot> {
            let (opus, vp8) = codecs();
            let mut media = MediaEngine::default();
            media.register_codec(opus, RtpCodecKind::Audio).unwrap();
            media.register_codec(vp8, RtpCodecKind::Video).unwrap();
            let registry = interceptors(&mut media, sends_media, bwe).unwrap();
            registry.slots().into_iter().map(|(slot, _)| slot).collect()
        };
        use ChainSlot::*;
        assert_eq!(
            chain(true, false),
            [
                NackResponder,
                NackGenerator,
                TwccReceiver,
                ReceiverReport,
                SenderReport
            ]
        );
        assert_eq!(chain(false, false), [NackResponder, SenderReport]);
        let congestion = [CongestionControl, TwccSender, Pacer, NackResponder];
        let mut full = congestion.to_vec();
        full.extend([NackGenerator, TwccReceiver, ReceiverReport, SenderReport]);
        assert_eq!(chain(true, true), full);
        let mut listener = congestion.to_vec();
        // Congestion control brings its own arrival recorder.
        listener.extend([TwccReceiver, SenderReport]);
        assert_eq!(chain(false, true), listener);
    }

    #[test]
    fn offers_without_media_or_mids_are_rejected() {
        assert!(matches!(
            summarize_offer("v=0\r\n"),
            Err(SfuError::BadOffer(_))
        ));
        assert!(matches!(
            summarize_offer("v=0\r\nm=audio 9 RTP/AVP 0\r\n"),
            Err(SfuError::BadOffer(_))
        ));
        assert!(summarize_offer(&"a".repeat(70_000)).is_err());
    }
}
