//! Prometheus metrics of the media plane.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every SFU metric. Cheap to clone (the handles are reference-counted).
#[derive(Clone, Debug)]
pub struct SfuMetrics {
    /// Datagrams received.
    pub packets_in: IntCounter,
    /// Bytes received.
    pub bytes_in: IntCounter,
    /// Datagrams sent.
    pub packets_out: IntCounter,
    /// Bytes sent.
    pub bytes_out: IntCounter,
    /// Datagrams sent inside UDP GSO sends (a run of packets to one
    /// subscriber in one system-call message); part of `packets_out`.
    pub gso_datagrams: IntCounter,
    /// RTP packets forwarded to a subscriber, by kind (audio, video).
    pub forwarded: IntCounterVec,
    /// Packets dropped, by reason.
    pub drops: IntCounterVec,
    /// Open sessions.
    pub sessions: IntGauge,
    /// Time per event-loop iteration, by worker.
    pub loop_seconds: HistogramVec,
    /// Key-frame requests sent to publishers.
    pub pli: IntCounter,
    /// NACKs received from subscribers.
    pub nack: IntCounter,
    /// Video slots currently on each simulcast layer.
    pub layers: IntGaugeVec,
    /// Time to create a session (SDP offer to answer).
    pub session_setup_seconds: Histogram,
    /// Connected sessions by negotiated SRTP protection profile.
    pub srtp_profiles: IntCounterVec,
    /// Per forwarded media packet: from its arrival at the SFU's socket
    /// (kernel timestamp) until the SFU has handed every copy of it back
    /// to the kernel. The latency the SFU adds, queueing included. Label
    /// `kind`: `audio` or `video` (camera and screen share).
    pub transit_seconds: HistogramVec,
}

/// What a forwarded packet carried: the `kind` label of the forwarding
/// metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaKind {
    /// Opus.
    Audio,
    /// A camera or a screen share.
    Video,
}

impl MediaKind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Audio => "audio",
            Self::Video => "video",
        }
    }
}

impl SfuMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            packets_in: IntCounter::new("conclave_sfu_packets_in_total", "Datagrams received")?,
            bytes_in: IntCounter::new("conclave_sfu_bytes_in_total", "Bytes received")?,
            packets_out: IntCounter::new("conclave_sfu_packets_out_total", "Datagrams sent")?,
            bytes_out: IntCounter::new("conclave_sfu_bytes_out_total", "Bytes sent")?,
            gso_datagrams: IntCounter::new(
                "conclave_sfu_gso_datagrams_total",
                "Datagrams sent inside UDP GSO sends",
            )?,
            forwarded: IntCounterVec::new(
                Opts::new(
                    "conclave_sfu_forwarded_total",
                    "RTP packets forwarded to subscribers",
                ),
                &["kind"],
            )?,
            drops: IntCounterVec::new(
                Opts::new("conclave_sfu_drops_total", "Packets dropped, by reason"),
                &["reason"],
            )?,
            sessions: IntGauge::new("conclave_sfu_sessions", "Open media sessions")?,
            loop_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "conclave_sfu_loop_seconds",
                    "Busy time of one event-loop iteration",
                )
                .buckets(vec![1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2]),
                &["worker"],
            )?,
            pli: IntCounter::new(
                "conclave_sfu_pli_total",
                "Key-frame requests sent to publishers",
            )?,
            nack: IntCounter::new("conclave_sfu_nack_total", "NACKs received from subscribers")?,
            layers: IntGaugeVec::new(
                Opts::new(
                    "conclave_sfu_video_slot_layers",
                    "Video slots per simulcast layer",
                ),
                &["layer"],
            )?,
            session_setup_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "conclave_sfu_session_setup_seconds",
                    "Time from SDP offer to answer",
                )
                .buckets(vec![1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5]),
            )?,
            srtp_profiles: IntCounterVec::new(
                Opts::new(
                    "conclave_sfu_srtp_profiles_total",
                    "Connected sessions by negotiated SRTP protection profile",
                ),
                &["profile"],
            )?,
            transit_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "conclave_sfu_transit_seconds",
                    "Forwarded media packets: socket arrival to every copy sent",
                )
                .buckets(vec![
                    1e-4, 2.5e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 8e-3, 1e-2,
                    1.25e-2, 1.5e-2, 1.75e-2, 2e-2, 2.5e-2, 3e-2, 4e-2, 5e-2, 7.5e-2, 0.1, 0.25,
                    1.0,
                ]),
                &["kind"],
            )?,
        };
        registry.register(Box::new(m.packets_in.clone()))?;
        registry.register(Box::new(m.bytes_in.clone()))?;
        registry.register(Box::new(m.packets_out.clone()))?;
        registry.register(Box::new(m.bytes_out.clone()))?;
        registry.register(Box::new(m.gso_datagrams.clone()))?;
        registry.register(Box::new(m.forwarded.clone()))?;
        registry.register(Box::new(m.drops.clone()))?;
        registry.register(Box::new(m.sessions.clone()))?;
        registry.register(Box::new(m.loop_seconds.clone()))?;
        registry.register(Box::new(m.pli.clone()))?;
        registry.register(Box::new(m.nack.clone()))?;
        registry.register(Box::new(m.layers.clone()))?;
        registry.register(Box::new(m.session_setup_seconds.clone()))?;
        registry.register(Box::new(m.srtp_profiles.clone()))?;
        registry.register(Box::new(m.transit_seconds.clone()))?;
        Ok(m)
    }

    /// Metrics registered in a private registry (tests, benchmarks).
    pub fn unregistered() -> Self {
        match Self::new(&Registry::new()) {
            Ok(m) => m,
            // A fresh registry cannot hold a duplicate; the names are constant.
            Err(e) => unreachable!("fresh registry rejected metrics: {e}"),
        }
    }
}
