//! Prometheus metrics, served on `/metrics`.

use conclave_protocol::signal::{ClientMessage, ErrorCode, ServerMessage};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every signaling metric.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Registries of embedded components (the SFU), rendered alongside.
    extra: std::sync::RwLock<Vec<Registry>>,
    /// Connected WebSocket sessions.
    pub sessions: IntGauge,
    /// Calls with at least one member.
    pub calls: IntGauge,
    /// Members per call, observed at each epoch change.
    pub participants: Histogram,
    /// Client messages received, by type.
    pub messages_in: IntCounterVec,
    /// Server messages sent, by type.
    pub messages_out: IntCounterVec,
    /// Bytes of server messages sent (encoded JSON), by type.
    pub bytes_out: IntCounterVec,
    /// Errors returned, by code.
    pub errors: IntCounterVec,
    /// Seconds from the first queued membership change to the accepted commit.
    pub commit_latency: Histogram,
    /// Bytes of MLS handshake fanned out per rekey.
    pub rekey_fanout_bytes: Histogram,
    /// Empty commits the server asked for to heal a ratchet tree.
    pub heal_commits: IntCounter,
    /// Timer wake-ups of a call's task that left its next deadline in the
    /// past, so that it would wake again at once: a busy loop. Stays 0.
    pub idle_wakeups: IntCounter,
    /// Epochs declared ready at the ack timeout, with members still to ack
    /// (slow or stuck clients; their media may be cut by a removal).
    pub ack_timeouts: IntCounter,
}

impl Metrics {
    /// Renders `registry` (an embedded component's metrics) on `/metrics` too.
    pub fn also_render(&self, registry: Registry) {
        if let Ok(mut extra) = self.extra.write() {
            extra.push(registry);
        }
    }

    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("conclave_signaling".into()), None)?;
        let sessions = IntGauge::new("sessions", "Connected WebSocket sessions")?;
        let calls = IntGauge::new("calls", "Live calls")?;
        let participants = Histogram::with_opts(
            HistogramOpts::new(
                "participants_per_call",
                "Members per call at each epoch change",
            )
            .buckets(vec![
                2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0,
            ]),
        )?;
        let messages_in = IntCounterVec::new(
            Opts::new("messages_in_total", "Client messages received"),
            &["type"],
        )?;
        let messages_out = IntCounterVec::new(
            Opts::new("messages_out_total", "Server messages sent"),
            &["type"],
        )?;
        let bytes_out = IntCounterVec::new(
            Opts::new("bytes_out_total", "Bytes of server messages sent"),
            &["type"],
        )?;
        let errors = IntCounterVec::new(Opts::new("errors_total", "Errors returned"), &["code"])?;
        let commit_latency = Histogram::with_opts(
            HistogramOpts::new(
                "commit_latency_seconds",
                "First queued change to accepted commit",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0]),
        )?;
        let rekey_fanout_bytes = Histogram::with_opts(
            HistogramOpts::new("rekey_fanout_bytes", "MLS handshake bytes sent per rekey")
                .buckets(prometheus::exponential_buckets(1024.0, 4.0, 8)?),
        )?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(participants.clone()))?;
        registry.register(Box::new(messages_in.clone()))?;
        registry.register(Box::new(messages_out.clone()))?;
        registry.register(Box::new(bytes_out.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(commit_latency.clone()))?;
        registry.register(Box::new(rekey_fanout_bytes.clone()))?;
        let heal_commits = IntCounter::new(
            "tree_heal_commits_total",
            "Empty commits asked for to refill blank ratchet-tree paths",
        )?;
        registry.register(Box::new(heal_commits.clone()))?;
        let idle_wakeups = IntCounter::new(
            "call_idle_wakeups_total",
            "Timer wake-ups of a call's task that left its deadline in the past",
        )?;
        registry.register(Box::new(idle_wakeups.clone()))?;
        let ack_timeouts = IntCounter::new(
            "epoch_ack_timeouts_total",
            "Epochs declared ready at the ack timeout with members still to ack",
        )?;
        registry.register(Box::new(ack_timeouts.clone()))?;
        Ok(Self {
            registry,
            extra: std::sync::RwLock::new(Vec::new()),
            sessions,
            calls,
            participants,
            messages_in,
            messages_out,
            bytes_out,
            errors,
            commit_latency,
            rekey_fanout_bytes,
            heal_commits,
            idle_wakeups,
            ack_timeouts,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let mut families = self.registry.gather();
        if let Ok(extra) = self.extra.read() {
            for r in extra.iter() {
                families.extend(r.gather());
            }
        }
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Label for a client message.
pub fn client_kind(msg: &ClientMessage) -> &'static str {
    match msg {
        ClientMessage::JoinCall { .. } => "join_call",
        ClientMessage::GroupCreated { .. } => "group_created",
        ClientMessage::Commit { .. } => "commit",
        ClientMessage::EpochAck { .. } => "epoch_ack",
        ClientMessage::SetMute { .. } => "set_mute",
        ClientMessage::LeaveCall { .. } => "leave_call",
        ClientMessage::MediaOffer { .. } => "media_offer",
        ClientMessage::SetQuality { .. } => "set_quality",
        ClientMessage::Pin { .. } => "pin",
        ClientMessage::UploadKeyPackages { .. } => "upload_key_packages",
        ClientMessage::Ping {} => "ping",
    }
}

/// Label for a server message.
pub fn message_kind(msg: &ServerMessage) -> &'static str {
    match msg {
        ServerMessage::Ready { .. } => "ready",
        ServerMessage::Joined { .. } => "joined",
        ServerMessage::CreateGroup { .. } => "create_group",
        ServerMessage::Proposal { .. } => "proposal",
        ServerMessage::CommitRequest { .. } => "commit_request",
        ServerMessage::Commit { .. } => "commit",
        ServerMessage::Welcome { .. } => "welcome",
        ServerMessage::EpochReady { .. } => "epoch_ready",
        ServerMessage::Roster { .. } => "roster",
        ServerMessage::RosterUpdate { .. } => "roster_update",
        ServerMessage::Removed { .. } => "removed",
        ServerMessage::MediaAnswer { .. } => "media_answer",
        ServerMessage::MediaClosed { .. } => "media_closed",
        ServerMessage::ActiveSpeaker { .. } => "active_speaker",
        ServerMessage::KeyPackagesStored { .. } => "key_packages_stored",
        ServerMessage::Pong => "pong",
        ServerMessage::Error { .. } => "error",
    }
}

/// Label for an error code.
pub fn error_kind(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::UnsupportedVersion => "unsupported_version",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::NotFound => "not_found",
        ErrorCode::CallFull => "call_full",
        ErrorCode::StaleEpoch => "stale_epoch",
        ErrorCode::NotCommitter => "not_committer",
        ErrorCode::InvalidMls => "invalid_mls",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::Internal => "internal",
    }
}
