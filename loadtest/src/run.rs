//! One run of a scenario: server, accounts, the join ramp, churn, the
//! steady phase, sampling, and the numbers that come out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::conclave::{self, JoinRecord, Plan, Recorder, Shared};
use crate::janus::{self, JanusServer, SUBSCRIBER_BIT};
use crate::media::{MediaEvent, MediaHandle, MediaTotals, PeerSpec, VideoSpec};
use crate::scenario::Scenario;
use crate::server::{
    ProcSample, Server, SfuCounters, TransitSummary, proc_sample, udp_rcvbuf_errors,
    udp_socket_drops,
};
use crate::stats::{Reservoir, Summary};

/// How to run.
#[derive(Debug)]
pub struct RunOptions {
    /// The scenario, already scaled.
    pub scenario: Scenario,
    /// Bitrate scale applied (recorded in the result).
    pub bitrate_scale: f64,
    /// Decrypt one received frame in this many (1: all).
    pub decrypt_every: u32,
    /// Show a progress bar.
    pub progress: bool,
    /// Address the participants' UDP sockets bind to.
    pub media_ip: IpAddr,
    /// Niceness the load generator lowers its threads to before the run
    /// (see [`lower_own_priority`]); 0 leaves them alone.
    pub generator_nice: i32,
    /// Put the load generator's threads under SCHED_IDLE before the run
    /// (see [`idle_scheduling`]).
    pub generator_idle: bool,
    /// SO_RCVBUF of the participants' UDP sockets, bytes (0: the kernel's
    /// default).
    pub socket_recv_buffer: usize,
    /// Each participant paces its video at this multiple of its video
    /// bitrate, as a browser does (0: a frame's packets leave at once).
    pub pace_factor: f64,
}

/// The server a run measures.
#[derive(Debug)]
pub enum Target<'a> {
    /// Conclave: signaling, MLS delivery and the SFU in one process.
    Conclave(&'a mut Server),
    /// Janus VideoRoom, started by the load test.
    Janus(&'a JanusServer),
}

impl Target<'_> {
    fn name(&self) -> &'static str {
        match self {
            Target::Conclave(_) => "conclave",
            Target::Janus(_) => "janus",
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Target::Conclave(s) => s.pid,
            Target::Janus(j) => j.pid,
        }
    }
}

enum Participants {
    Conclave(Arc<Shared>),
    Janus(Arc<janus::Shared>),
}

/// One second of server-side samples.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServerSecond {
    /// Seconds since the run began.
    pub t_s: f64,
    /// SFU process CPU, percent of one core.
    pub cpu_percent: f64,
    /// SFU process resident memory, MiB.
    pub rss_mib: f64,
    /// Load generator CPU, percent of one core.
    pub loadgen_cpu_percent: f64,
    /// Datagrams into the SFU per second.
    pub packets_in_per_s: f64,
    /// Datagrams out of the SFU per second.
    pub packets_out_per_s: f64,
    /// Bits into the SFU per second.
    pub bits_in_per_s: f64,
    /// Bits out of the SFU per second.
    pub bits_out_per_s: f64,
    /// RTP packets forwarded per second.
    pub forwarded_per_s: f64,
    /// Participants in the MLS group.
    pub members: u32,
}

/// Join measurements.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JoinResult {
    /// Joins started.
    pub attempted: u64,
    /// Joins that got both the group key and a connected media session.
    pub completed: u64,
    /// Joins that failed (errors below).
    pub failed: u64,
    /// Joins still under way when the run stopped: neither completed nor
    /// failed, and the participant had not left (e.g. a churn rejoin in
    /// the last seconds).
    pub unfinished: u64,
    /// Up to 20 distinct failure messages.
    pub errors: Vec<String>,
    /// WebSocket connect → in the MLS group and media connected, ms.
    pub join_ms: Summary,
    /// WebSocket connect → in the MLS group (Welcome processed), ms.
    pub mls_ms: Summary,
    /// WebSocket connect → media connected (ICE + DTLS), ms.
    pub media_ms: Summary,
    /// WebSocket connect → first frame decrypted, ms.
    pub first_frame_ms: Summary,
}

/// Leave → rekey measurements.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RekeyResult {
    /// Leaves watched.
    pub leaves: u64,
    /// Leave → the last remaining member processed the commit removing the
    /// leaver, ms (one value per leave).
    pub leave_to_all_rekeyed_ms: Summary,
    /// Leave → the last remaining member received `epoch_ready` for that
    /// epoch (sending keys switched everywhere), ms.
    pub leave_to_all_epoch_ready_ms: Summary,
    /// Leaves for which some member that stayed never reported the new
    /// epoch within the run.
    pub incomplete: u64,
}

/// Server-side aggregate over the steady phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServerResult {
    /// Process measured.
    pub pid: u32,
    /// Window measured (steady phase), seconds since start.
    pub window_s: (f64, f64),
    /// Mean CPU, percent of one core.
    pub cpu_percent_mean: f64,
    /// Highest one-second CPU.
    pub cpu_percent_max: f64,
    /// Largest RSS, MiB.
    pub rss_mib_max: f64,
    /// RSS before the first join, MiB.
    pub rss_mib_baseline: f64,
    /// (largest RSS − RSS before the first join) / participants, KiB.
    pub kib_per_participant: Option<f64>,
    /// Datagrams in per second.
    pub packets_in_per_s: f64,
    /// Datagrams out per second.
    pub packets_out_per_s: f64,
    /// Share of the datagrams out that left in UDP GSO sends (a run of
    /// packets to one subscriber per system-call message), percent;
    /// `None` for a server without the counter (Janus).
    pub gso_percent: Option<f64>,
    /// Bits in per second.
    pub bits_in_per_s: f64,
    /// Bits out per second.
    pub bits_out_per_s: f64,
    /// RTP packets forwarded per second.
    pub forwarded_per_s: f64,
    /// Process CPU µs per forwarded RTP packet (signaling and MLS delivery
    /// included: the server is one process).
    pub cpu_us_per_forwarded_packet: Option<f64>,
    /// Process CPU µs per datagram sent.
    pub cpu_us_per_datagram_out: Option<f64>,
    /// Process CPU µs per datagram the load generator received from the
    /// server: measured the same way for every target, so the ratio
    /// between targets compares like with like.
    pub cpu_us_per_delivered_datagram: Option<f64>,
    /// Packets the SFU dropped during the window (all reasons).
    pub drops: f64,
    /// Time forwarded packets spent in the SFU during the window, from its
    /// `conclave_sfu_transit_seconds` histogram: the latency the SFU itself
    /// adds (Janus has no such measure).
    pub sfu_transit: Option<TransitSummary>,
    /// The same for audio packets only.
    pub sfu_transit_audio: Option<TransitSummary>,
    /// The same for video packets only (camera and screen share).
    pub sfu_transit_video: Option<TransitSummary>,
    /// Load generator CPU, percent of one core (2 cores on the reference machine).
    pub loadgen_cpu_percent_mean: f64,
    /// Datagrams the load generator sent to the SFU per second (all the
    /// SFU's input: every client is ours). The SFU's own `packets_in`
    /// counter is above, for comparison.
    pub loadgen_packets_to_sfu_per_s: f64,
    /// Bits the load generator sent to the SFU per second.
    pub loadgen_bits_to_sfu_per_s: f64,
    /// Datagrams the load generator received from the SFU per second.
    pub loadgen_packets_from_sfu_per_s: f64,
    /// Bits the load generator received from the SFU per second.
    pub loadgen_bits_from_sfu_per_s: f64,
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// `conclave` or `janus`.
    pub target: String,
    /// Scenario as run (after scaling).
    pub scenario: Scenario,
    /// Video/screen bitrate factor applied.
    pub bitrate_scale: f64,
    /// When it started (Unix seconds).
    pub started_unix: u64,
    /// Ramp end (all initial joins started), seconds.
    pub ramp_s: f64,
    /// Total run time, seconds.
    pub elapsed_s: f64,
    /// Joins.
    pub join: JoinResult,
    /// Leaves.
    pub rekey: RekeyResult,
    /// Packet loss at receivers, percent of RTP packets expected, whole run.
    pub loss_percent: Option<f64>,
    /// The same over the steady phase only.
    pub loss_percent_steady: Option<f64>,
    /// Datagrams the kernel dropped at full socket receive buffers on this
    /// machine (SFU and load generator alike), whole run.
    pub kernel_udp_drops: Option<u64>,
    /// The same over the steady phase.
    pub kernel_udp_drops_steady: Option<u64>,
    /// Of those, the drops at the server's own sockets (the rest were at
    /// the load generator's), whole run.
    pub sfu_socket_drops: Option<u64>,
    /// The same over the steady phase.
    pub sfu_socket_drops_steady: Option<u64>,
    /// Media counters and latency.
    pub media: MediaTotals,
    /// The server.
    pub server: ServerResult,
    /// Per-second server samples.
    pub server_timeline: Vec<ServerSecond>,
    /// MLS commits sent by members.
    pub commits_sent: u64,
    /// Server errors seen by members, by code (counts).
    pub server_errors: HashMap<String, u64>,
    /// Packets the SFU dropped over the whole run, by reason (its /metrics).
    pub sfu_drops_by_reason: HashMap<String, f64>,
    /// Niceness of the load generator's threads during the run (0: the
    /// same CPU priority as the server).
    pub generator_nice: i32,
    /// The load generator's threads ran under SCHED_IDLE (only on cores the
    /// server left free); `generator_nice` then does not matter.
    pub generator_idle: bool,
    /// SO_RCVBUF asked for on the participants' UDP sockets, bytes (0: the
    /// kernel's default).
    pub socket_recv_buffer: usize,
    /// The participants' pacing rate as a multiple of their video bitrate
    /// (0: no pacing).
    pub pace_factor: f64,
}

struct Active {
    participant: u32,
    leave: oneshot::Sender<()>,
    task: JoinHandle<Result<(), conclave::ParticipantError>>,
}

struct Tokens {
    tokens: Vec<(String, Instant)>,
}

fn peer_spec(s: &Scenario, participant: u32, slot: u32) -> PeerSpec {
    let roles = s.roles(slot);
    let key = |k: f64| Duration::from_secs_f64(k.max(0.5));
    PeerSpec {
        participant,
        audio: roles.audio,
        speaker: roles.speaker,
        audio_kbps: s.audio.bitrate_kbps,
        audio_frame: Duration::from_millis(u64::from(s.audio.frame_ms)),
        dtx: s.audio.dtx,
        camera: roles.camera.then(|| VideoSpec {
            layers_kbps: s.camera.layers_kbps.clone(),
            fps: s.camera.fps,
            keyframe_interval: key(s.camera.keyframe_interval_s),
        }),
        screen: roles.screen.then(|| VideoSpec {
            layers_kbps: vec![s.screen.bitrate_kbps],
            fps: s.screen.fps,
            keyframe_interval: key(s.screen.keyframe_interval_s),
        }),
        audio_slots: s.receive.audio_slots,
        video_slots: s.receive.video_slots,
    }
}

/// Counts and timings over every join record of the run.
fn summarize_joins(joins: &[JoinRecord]) -> JoinResult {
    let mut join = JoinResult::default();
    let (mut r_join, mut r_mls, mut r_media, mut r_first) = (
        Reservoir::new(100_000),
        Reservoir::new(100_000),
        Reservoir::new(100_000),
        Reservoir::new(100_000),
    );
    for j in joins {
        join.attempted += 1;
        if let (Some(a), Some(b)) = (j.mls, j.media) {
            join.completed += 1;
            if let Some(v) = ms(j.started, Some(a.max(b))) {
                r_join.add(v);
            }
        } else if j.error.is_some() {
            join.failed += 1;
        } else if j.left.is_none() {
            join.unfinished += 1;
        }
        if let Some(e) = &j.error
            && join.errors.len() < 20
            && !join.errors.contains(e)
        {
            join.errors.push(e.clone());
        }
        if let Some(v) = ms(j.started, j.mls) {
            r_mls.add(v);
        }
        if let Some(v) = ms(j.started, j.media) {
            r_media.add(v);
        }
        if let Some(v) = ms(j.started, j.first_frame) {
            r_first.add(v);
        }
    }
    join.join_ms = r_join.summary();
    join.mls_ms = r_mls.summary();
    join.media_ms = r_media.summary();
    join.first_frame_ms = r_first.summary();
    join
}

/// The tokio runtime (one thread) of the participants that publish
/// continuous media: a camera, a screen or a talking microphone.
///
/// Every member processes every commit, and at hundreds of participants
/// that MLS work queues on the generator's shared runtime threads. A
/// publisher's task waiting behind it sees `epoch_ready` late, keeps
/// protecting frames under an epoch the SFU has retired, and every receiver
/// loses them: a lag of the generator, not of the SFU, and one a real
/// client on its own device does not have. Listeners (and silent
/// microphones) stay on the shared threads, where their lag shows as
/// slower acks and rekeys.
struct PublisherRuntime(Option<tokio::runtime::Runtime>);

impl PublisherRuntime {
    fn start() -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("publishers")
            .enable_all()
            .build()
            .context("starting the publishers' runtime")?;
        Ok(Self(Some(rt)))
    }

    /// Where a participant with `spec` runs.
    fn handle_for(&self, spec: &PeerSpec) -> tokio::runtime::Handle {
        let publishes = spec.camera.is_some() || spec.screen.is_some() || spec.speaker;
        match &self.0 {
            Some(rt) if publishes => rt.handle().clone(),
            _ => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for PublisherRuntime {
    /// Without waiting: a runtime dropped inside another's task would block it.
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// How much a counter read at two times grew, if both reads worked.
fn growth(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(after?.saturating_sub(before?))
}

fn ms(a: Option<Instant>, b: Option<Instant>) -> Option<f64> {
    Some(b?.checked_duration_since(a?)?.as_secs_f64() * 1000.0)
}

/// Runs the scenario against `target`.
pub async fn run(mut target: Target<'_>, opts: RunOptions) -> anyhow::Result<RunResult> {
    if opts.generator_nice > 0 {
        lower_own_priority(opts.generator_nice)?;
    }
    if opts.generator_idle {
        idle_scheduling(std::process::id())?;
    }
    let s = opts.scenario.clone();
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();

    // Accounts first: one per role slot (argon2 makes this slow-ish; not measured).
    let bar = if opts.progress {
        ProgressBar::new(u64::from(s.participants))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix("accounts");
    let mut tokens = Tokens { tokens: Vec::new() };
    if let Target::Conclave(server) = &mut target {
        for slot in 0..s.participants {
            let t = server
                .user_token(&format!("lt{slot}"))
                .await
                .with_context(|| format!("account lt{slot}"))?;
            tokens.tokens.push((t, Instant::now()));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    let target_pid = target.pid();
    let baseline = proc_sample(target_pid).unwrap_or_default();
    let udp_drops_at_start = udp_rcvbuf_errors();
    let sfu_drops_at_start = udp_socket_drops(target_pid);
    let origin = Instant::now();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let media = MediaHandle::start(
        origin,
        opts.decrypt_every,
        opts.media_ip,
        opts.socket_recv_buffer,
        opts.pace_factor,
        ev_tx,
    )?;
    let recorder = Arc::new(Recorder::default());
    let publishers = PublisherRuntime::start()?;
    let participants = match &target {
        Target::Conclave(server) => Participants::Conclave(Arc::new(Shared {
            ws_url: server.ws_url(),
            call_id: format!("lt-{}-{}", s.name, started_unix),
            media: media.sender(),
            recorder: recorder.clone(),
        })),
        Target::Janus(j) => Participants::Janus(Arc::new(janus::Shared {
            ws_url: j.ws_url.clone(),
            scenario: s.clone(),
            base_key: janus::run_key(),
            media: media.sender(),
            recorder: recorder.clone(),
            feeds: Default::default(),
        })),
    };

    // Media events into the join records (a Janus participant's subscriber
    // connection is its id with SUBSCRIBER_BIT set).
    let rec = recorder.clone();
    let events = tokio::spawn(async move {
        while let Some(ev) = ev_rx.recv().await {
            match ev {
                MediaEvent::Connected { participant, at } => {
                    rec.join(participant & !SUBSCRIBER_BIT, |r| {
                        r.media_up = r.media_up.saturating_add(1);
                        if r.media_up >= r.media_needed.max(1) {
                            r.media = Some(at);
                        }
                    })
                }
                MediaEvent::FirstFrame { participant, at } => {
                    rec.join(participant & !SUBSCRIBER_BIT, |r| r.first_frame = Some(at))
                }
                MediaEvent::Down {
                    participant,
                    reason,
                } => {
                    let participant = participant & !SUBSCRIBER_BIT;
                    tracing::debug!(participant, %reason, "media down");
                    rec.join(participant, |r| {
                        if r.left.is_none() && r.error.is_none() {
                            r.error = Some(format!("media: {reason}"));
                        }
                    });
                }
            }
        }
    });

    // Server sampling, once a second.
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let sampler_server = match &target {
        Target::Conclave(server) => Some(Server::existing(&server.http, server.pid, String::new())),
        Target::Janus(_) => None,
    };
    let rec = recorder.clone();
    let sampler = tokio::spawn(async move {
        let mut rows: Vec<ServerSecond> = Vec::new();
        let me = std::process::id();
        let mut last: Option<(Instant, ProcSample, ProcSample, SfuCounters)> = None;
        let mut totals: Vec<(f64, ProcSample, SfuCounters)> = Vec::new();
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        // After the sampler waited for a core, no catch-up burst of ticks:
        // rows milliseconds apart turn a little CPU into thousands of percent.
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = &mut stop_rx => break,
            }
            let now = Instant::now();
            if last
                .as_ref()
                .is_some_and(|(t0, ..)| now.duration_since(*t0) < Duration::from_millis(500))
            {
                continue;
            }
            // Janus has no /metrics: its traffic is read at the load generator.
            let counters = match &sampler_server {
                Some(server) => server.metrics().await,
                None => Ok(SfuCounters::default()),
            };
            // A second whose samples cannot all be read is skipped: the next
            // row then spans two. (A zero in place of an unreadable sample of
            // this process would make the next row all the CPU it has used.)
            let (Ok(p), Ok(c), Ok(mine)) = (proc_sample(target_pid), counters, proc_sample(me))
            else {
                continue;
            };
            let t_s = now.duration_since(origin).as_secs_f64();
            if let Some((t0, p0, m0, c0)) = &last {
                let (t0, p0, m0) = (*t0, *p0, *m0);
                let dt = now.duration_since(t0).as_secs_f64().max(1e-3);
                rows.push(ServerSecond {
                    t_s,
                    cpu_percent: (p.cpu_s - p0.cpu_s) / dt * 100.0,
                    rss_mib: p.rss_bytes as f64 / 1048576.0,
                    loadgen_cpu_percent: (mine.cpu_s - m0.cpu_s) / dt * 100.0,
                    packets_in_per_s: (c.packets_in - c0.packets_in) / dt,
                    packets_out_per_s: (c.packets_out - c0.packets_out) / dt,
                    bits_in_per_s: (c.bytes_in - c0.bytes_in) * 8.0 / dt,
                    bits_out_per_s: (c.bytes_out - c0.bytes_out) * 8.0 / dt,
                    forwarded_per_s: (c.forwarded - c0.forwarded) / dt,
                    members: rec
                        .present
                        .lock()
                        .map(|p| p.len() as u32)
                        .unwrap_or_default(),
                });
            }
            totals.push((t_s, p, c.clone()));
            last = Some((now, p, mine, c));
        }
        (rows, totals)
    });

    let ramp = Duration::from_secs_f64(f64::from(s.participants) / s.join.rate_per_s);
    let steady = Duration::from_secs_f64(s.duration_s);
    let total = ramp + steady;
    let bar = if opts.progress {
        ProgressBar::new(total.as_secs().max(1))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(s.name.clone());

    let mut next_participant: u32 = 1;
    let mut active: HashMap<u32, Active> = HashMap::new();
    let mut finished: Vec<JoinHandle<Result<(), conclave::ParticipantError>>> = Vec::new();
    let mut pending_rejoins: Vec<(Instant, u32)> = Vec::new();
    let mut spawn =
        |slot: u32, active: &mut HashMap<u32, Active>, tokens: &Tokens| -> anyhow::Result<()> {
            let participant = next_participant;
            next_participant += 1;
            let token = tokens
                .tokens
                .get(slot as usize)
                .map(|(t, _)| t.clone())
                .unwrap_or_default();
            recorder
                .joins
                .lock()
                .map_err(|_| anyhow::anyhow!("recorder poisoned"))?
                .push(JoinRecord {
                    participant,
                    slot,
                    ..JoinRecord::default()
                });
            let (leave_tx, leave_rx) = oneshot::channel();
            let plan = Plan {
                participant,
                slot,
                token,
                spec: peer_spec(&s, participant, slot),
                max_layer: s.receive.max_layer,
            };
            let rt = publishers.handle_for(&plan.spec);
            let task = match &participants {
                Participants::Conclave(shared) => {
                    rt.spawn(conclave::run(shared.clone(), plan, leave_rx))
                }
                Participants::Janus(shared) => rt.spawn(janus::run(shared.clone(), plan, leave_rx)),
            };
            active.insert(
                slot,
                Active {
                    participant,
                    leave: leave_tx,
                    task,
                },
            );
            Ok(())
        };

    // Ramp.
    let mut last_draw = Instant::now();
    let draw = |bar: &ProgressBar, media: &MediaHandle, recorder: &Recorder| {
        bar.set_position(origin.elapsed().as_secs().min(total.as_secs()));
        let members = recorder.present.lock().map(|p| p.len()).unwrap_or_default();
        let last = media
            .timeline
            .lock()
            .ok()
            .and_then(|t| t.last().cloned())
            .unwrap_or_default();
        bar.set_message(format!(
            "members {members} | connected {} | rx {} frames/s | p95 {} ms | decrypt failures {}",
            last.connected,
            last.frames_decrypted,
            last.latency_p95_ms
                .map_or("-".into(), |v| format!("{v:.1}")),
            last.decrypt_failures,
        ));
    };
    for slot in 0..s.participants {
        let at = origin + Duration::from_secs_f64(f64::from(slot) / s.join.rate_per_s);
        tokio::time::sleep_until(at.into()).await;
        spawn(slot, &mut active, &tokens)?;
        if last_draw.elapsed() > Duration::from_millis(250) {
            draw(&bar, &media, &recorder);
            last_draw = Instant::now();
        }
    }
    let ramp_end = Instant::now();
    media.send(crate::media::Command::Steady)?;
    let udp_drops_at_ramp_end = udp_rcvbuf_errors();
    let sfu_drops_at_ramp_end = udp_socket_drops(target_pid);

    // Steady phase with churn.
    let leaves_per_min = s.leaves_per_min();
    let churn_every =
        (leaves_per_min > 0.0).then(|| Duration::from_secs_f64(60.0 / leaves_per_min));
    let mut next_leave = churn_every.map(|d| ramp_end + d);
    let end = ramp_end + steady;
    let mut rng = rand::rngs::StdRng::from_entropy();
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if let Some(at) = next_leave
            && now >= at
        {
            next_leave = churn_every.map(|d| at + d);
            let mut candidates: Vec<u32> = active
                .keys()
                .copied()
                .filter(|slot| s.roles(*slot).churnable())
                .collect();
            candidates.sort_unstable();
            if let Some(slot) = candidates.choose(&mut rng).copied()
                && let Some(a) = active.remove(&slot)
            {
                tracing::debug!(slot, participant = a.participant, "churn: leaving");
                let _ = a.leave.send(());
                finished.push(a.task);
                pending_rejoins.push((now + Duration::from_secs_f64(s.churn.rejoin_after_s), slot));
            }
        }
        let due: Vec<u32> = pending_rejoins
            .iter()
            .filter(|(t, _)| *t <= now)
            .map(|(_, slot)| *slot)
            .collect();
        pending_rejoins.retain(|(t, _)| *t > now);
        for slot in due {
            if let Target::Conclave(server) = &mut target
                && tokens
                    .tokens
                    .get(slot as usize)
                    .is_some_and(|(_, at)| at.elapsed() > Duration::from_secs(600))
            {
                let t = server.user_token(&format!("lt{slot}")).await?;
                if let Some(entry) = tokens.tokens.get_mut(slot as usize) {
                    *entry = (t, Instant::now());
                }
            }
            spawn(slot, &mut active, &tokens)?;
        }
        draw(&bar, &media, &recorder);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    let stop_at = Instant::now();
    let udp_drops_at_stop = udp_rcvbuf_errors();
    let sfu_drops_at_stop = udp_socket_drops(target_pid);

    // Stop measuring, then tear down.
    let _ = stop_tx.send(());
    let (server_timeline, proc_totals) = sampler.await.unwrap_or_default();
    let totals = tokio::task::spawn_blocking(move || media.shutdown())
        .await
        .context("media thread")??;
    for (_, a) in active.drain() {
        a.task.abort();
        finished.push(a.task);
    }
    for t in finished {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    drop(participants);
    drop(publishers);
    events.abort();

    // Joins.
    let joins = recorder.joins.lock().map(|j| j.clone()).unwrap_or_default();
    let join = summarize_joins(&joins);

    // Leaves.
    let leaves = recorder
        .leaves
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    let left_at: HashMap<u32, Instant> = joins
        .iter()
        .filter_map(|j| Some((j.participant, j.left?)))
        .collect();
    let mut rekey = RekeyResult::default();
    let (mut r_removed, mut r_ready) = (Reservoir::new(10_000), Reservoir::new(10_000));
    for w in &leaves {
        if w.at > stop_at {
            continue;
        }
        rekey.leaves += 1;
        // Members that stayed until the end of the run must all report.
        let stayed: Vec<u32> = w
            .expected
            .iter()
            .copied()
            .filter(|p| left_at.get(p).is_none_or(|t| *t > stop_at))
            .collect();
        let all_removed = stayed
            .iter()
            .all(|p| w.removed_seen.iter().any(|(q, _, _)| q == p));
        let all_ready = stayed
            .iter()
            .all(|p| w.ready_seen.iter().any(|(q, _)| q == p));
        if !all_removed || !all_ready {
            rekey.incomplete += 1;
        }
        if all_removed && let Some(last) = w.removed_seen.iter().map(|(_, _, t)| *t).max() {
            r_removed.add(last.duration_since(w.at).as_secs_f64() * 1000.0);
        }
        if all_ready && let Some(last) = w.ready_seen.iter().map(|(_, t)| *t).max() {
            r_ready.add(last.duration_since(w.at).as_secs_f64() * 1000.0);
        }
    }
    rekey.leave_to_all_rekeyed_ms = r_removed.summary();
    rekey.leave_to_all_epoch_ready_ms = r_ready.summary();

    // Server over the steady phase.
    let w0 = ramp_end.duration_since(origin).as_secs_f64();
    let w1 = stop_at.duration_since(origin).as_secs_f64();
    let mut srv = ServerResult {
        pid: target_pid,
        window_s: (w0, w1),
        rss_mib_baseline: baseline.rss_bytes as f64 / 1048576.0,
        ..ServerResult::default()
    };
    let first = proc_totals.iter().find(|(t, _, _)| *t >= w0);
    let last = proc_totals.iter().rev().find(|(t, _, _)| *t <= w1 + 0.5);
    if let (Some((t0, p0, c0)), Some((t1, p1, c1))) = (first, last)
        && t1 > t0
    {
        let dt = t1 - t0;
        let cpu = p1.cpu_s - p0.cpu_s;
        srv.cpu_percent_mean = cpu / dt * 100.0;
        srv.packets_in_per_s = (c1.packets_in - c0.packets_in) / dt;
        srv.packets_out_per_s = (c1.packets_out - c0.packets_out) / dt;
        srv.bits_in_per_s = (c1.bytes_in - c0.bytes_in) * 8.0 / dt;
        srv.bits_out_per_s = (c1.bytes_out - c0.bytes_out) * 8.0 / dt;
        srv.forwarded_per_s = (c1.forwarded - c0.forwarded) / dt;
        srv.drops = c1.drops - c0.drops;
        srv.sfu_transit = TransitSummary::between(c0, c1);
        srv.sfu_transit_audio = TransitSummary::between_kind(c0, c1, "audio");
        srv.sfu_transit_video = TransitSummary::between_kind(c0, c1, "video");
        let fwd = c1.forwarded - c0.forwarded;
        if fwd > 0.0 {
            srv.cpu_us_per_forwarded_packet = Some(cpu * 1e6 / fwd);
        }
        let out = c1.packets_out - c0.packets_out;
        if out > 0.0 {
            srv.cpu_us_per_datagram_out = Some(cpu * 1e6 / out);
            if c1.gso_datagrams > 0.0 {
                srv.gso_percent = Some((c1.gso_datagrams - c0.gso_datagrams) * 100.0 / out);
            }
        }
    }
    let in_window = server_timeline
        .iter()
        .filter(|r| r.t_s >= w0 && r.t_s <= w1 + 0.5);
    for r in in_window.clone() {
        srv.cpu_percent_max = srv.cpu_percent_max.max(r.cpu_percent);
    }
    srv.rss_mib_max = server_timeline
        .iter()
        .map(|r| r.rss_mib)
        .fold(0.0, f64::max);
    let lg: Vec<f64> = in_window.map(|r| r.loadgen_cpu_percent).collect();
    if !lg.is_empty() {
        srv.loadgen_cpu_percent_mean = lg.iter().sum::<f64>() / lg.len() as f64;
    }

    let seconds: Vec<_> = totals
        .timeline
        .iter()
        .filter(|x| x.t_s > w0 + 0.5 && x.t_s <= w1 + 0.5)
        .collect();
    if !seconds.is_empty() {
        let n = seconds.len() as f64;
        let sum = |f: &dyn Fn(&crate::media::MediaSecond) -> u64| -> f64 {
            seconds.iter().map(|x| f(x) as f64).sum::<f64>() / n
        };
        srv.loadgen_packets_to_sfu_per_s = sum(&|x| x.packets_sent);
        srv.loadgen_bits_to_sfu_per_s = sum(&|x| x.bytes_sent) * 8.0;
        srv.loadgen_packets_from_sfu_per_s = sum(&|x| x.packets_received);
        srv.loadgen_bits_from_sfu_per_s = sum(&|x| x.bytes_received) * 8.0;
        if srv.loadgen_packets_from_sfu_per_s > 0.0 {
            srv.cpu_us_per_delivered_datagram =
                Some(srv.cpu_percent_mean / 100.0 * 1e6 / srv.loadgen_packets_from_sfu_per_s);
        }
    }
    if s.participants > 0 && srv.rss_mib_max > 0.0 {
        srv.kib_per_participant = Some(
            (srv.rss_mib_max - srv.rss_mib_baseline).max(0.0) * 1024.0 / f64::from(s.participants),
        );
    }
    let (exp, lost) = seconds.iter().fold((0u64, 0u64), |(e, l), x| {
        (e + x.rtp_expected, l + x.rtp_lost)
    });
    let loss_percent_steady = (exp > 0).then(|| lost as f64 * 100.0 / exp as f64);
    let loss_percent = (totals.rtp_expected > 0)
        .then(|| totals.rtp_lost as f64 * 100.0 / totals.rtp_expected as f64);
    let mut server_errors: HashMap<String, u64> = HashMap::new();
    if let Ok(errs) = recorder.errors.lock() {
        for (code, _) in errs.iter() {
            *server_errors.entry(format!("{code:?}")).or_default() += 1;
        }
    }
    Ok(RunResult {
        target: target.name().to_owned(),
        scenario: s,
        bitrate_scale: opts.bitrate_scale,
        started_unix,
        ramp_s: w0,
        elapsed_s: w1,
        join,
        rekey,
        loss_percent,
        loss_percent_steady,
        kernel_udp_drops: growth(udp_drops_at_start, udp_drops_at_stop),
        kernel_udp_drops_steady: growth(udp_drops_at_ramp_end, udp_drops_at_stop),
        sfu_socket_drops: growth(sfu_drops_at_start, sfu_drops_at_stop),
        sfu_socket_drops_steady: growth(sfu_drops_at_ramp_end, sfu_drops_at_stop),
        media: totals,
        server: srv,
        server_timeline,
        commits_sent: recorder
            .commits_sent
            .load(std::sync::atomic::Ordering::Relaxed),
        server_errors,
        sfu_drops_by_reason: proc_totals
            .last()
            .map(|(_, _, c)| c.drops_by_reason.clone())
            .unwrap_or_default(),
        generator_nice: opts.generator_nice,
        generator_idle: opts.generator_idle,
        socket_recv_buffer: opts.socket_recv_buffer,
        pace_factor: opts.pace_factor,
    })
}

/// Lowers the CPU priority of every thread of this process to `niceness`
/// (threads started later inherit it from the thread that starts them).
/// On a machine the load generator shares with the server under test, the
/// scheduler then runs the server first, and the time a packet spends in
/// the server is the server's own rather than time spent waiting for the
/// generator to yield a core. Servers started afterwards would inherit the
/// niceness too, so start them first.
///
/// An unprivileged process can only raise its niceness: asking for less
/// than the current value fails.
pub fn lower_own_priority(niceness: i32) -> anyhow::Result<()> {
    let tasks = std::fs::read_dir("/proc/self/task").context("listing this process's threads")?;
    for task in tasks {
        let task = task.context("listing this process's threads")?;
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse().ok())
            .and_then(rustix::process::Pid::from_raw)
        else {
            continue;
        };
        match rustix::process::setpriority_process(Some(tid), niceness) {
            // ESRCH: the thread ended meanwhile.
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("setting the load generator's thread {tid:?} to niceness {niceness}")
                });
            }
        }
    }
    Ok(())
}

/// Puts every thread of process `pid` under SCHED_IDLE (threads it starts
/// later inherit it): the scheduler gives them a core only when no other
/// thread wants it, and a waking thread of any other process preempts
/// them at once. For the load generator on a machine it shares with the
/// server under test, this is the nearest thing to the server having the
/// machine to itself. Any process may do this to its own threads; it uses
/// util-linux's `chrt`, as the workspace forbids the `unsafe` a direct
/// `sched_setscheduler` call would need.
pub fn idle_scheduling(pid: u32) -> anyhow::Result<()> {
    let out = std::process::Command::new("chrt")
        .args(["--idle", "--all-tasks", "--pid", "0"])
        .arg(pid.to_string())
        .output()
        .context("running chrt (util-linux) to put the load generator under SCHED_IDLE")?;
    if !out.status.success() {
        anyhow::bail!(
            "chrt could not put process {pid} under SCHED_IDLE: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes `result.json` and `report.html` under `dir/<name>-<time>/`.
pub fn write_results(dir: &std::path::Path, r: &RunResult) -> anyhow::Result<PathBuf> {
    let out = dir.join(format!("{}-{}", r.scenario.name, r.started_unix));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("result.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(out.join("report.html"), crate::report::html(r))?;
    Ok(out)
}

/// Writes `compare.json` and `compare.html` under
/// `dir/<name>-<time>-side-by-side/`.
pub fn write_comparison(
    dir: &std::path::Path,
    conclave: &RunResult,
    janus: &RunResult,
) -> anyhow::Result<PathBuf> {
    let out = dir.join(format!(
        "{}-{}-side-by-side",
        conclave.scenario.name, conclave.started_unix
    ));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::json!({
        "rows": crate::report::comparison_rows(conclave, janus),
        "conclave": conclave,
        "janus": janus,
    });
    std::fs::write(
        out.join("compare.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(
        out.join("compare.html"),
        crate::report::comparison_html(conclave, janus),
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{PublisherRuntime, idle_scheduling, summarize_joins};
    use crate::conclave::JoinRecord;
    use crate::media::{PeerSpec, VideoSpec};
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn publishers_run_on_their_own_thread_and_listeners_do_not() {
        let publishers = PublisherRuntime::start().expect("runtime");
        let listener = PeerSpec {
            participant: 1,
            audio: false,
            speaker: false,
            audio_kbps: 32.0,
            audio_frame: Duration::from_millis(20),
            dtx: true,
            camera: None,
            screen: None,
            audio_slots: 3,
            video_slots: 2,
        };
        let video = VideoSpec {
            layers_kbps: vec![2500.0],
            fps: 15.0,
            keyframe_interval: Duration::from_secs(10),
        };
        let cases = [
            (listener.clone(), false),
            (
                PeerSpec {
                    audio: true,
                    ..listener.clone()
                },
                false,
            ),
            (
                PeerSpec {
                    audio: true,
                    speaker: true,
                    ..listener.clone()
                },
                true,
            ),
            (
                PeerSpec {
                    camera: Some(video.clone()),
                    ..listener.clone()
                },
                true,
            ),
            (
                PeerSpec {
                    screen: Some(video),
                    ..listener
                },
                true,
            ),
        ];
        for (spec, own_thread) in cases {
            let thread = publishers
                .handle_for(&spec)
                .spawn(async { std::thread::current().name().map(str::to_owned) })
                .await
                .expect("the task runs");
            assert_eq!(
                thread.as_deref() == Some("publishers"),
                own_thread,
                "{spec:?} ran on {thread:?}"
            );
        }
    }

    #[test]
    fn a_join_still_under_way_at_the_end_is_not_a_failure() {
        let t0 = Instant::now();
        let at = |ms| Some(t0 + Duration::from_millis(ms));
        let joins = [
            JoinRecord {
                started: at(0),
                mls: at(200),
                media: at(300),
                ..JoinRecord::default()
            },
            JoinRecord {
                started: at(0),
                error: Some("refused".into()),
                ..JoinRecord::default()
            },
            JoinRecord {
                started: at(0),
                mls: at(100),
                ..JoinRecord::default()
            },
            JoinRecord {
                started: at(0),
                left: at(50),
                ..JoinRecord::default()
            },
        ];
        let r = summarize_joins(&joins);
        assert_eq!(
            (r.attempted, r.completed, r.failed, r.unfinished),
            (4, 1, 1, 1)
        );
        assert_eq!(r.errors, ["refused"]);
        assert_eq!(r.join_ms.count, 1);
        assert_eq!(r.mls_ms.count, 2);
    }

    /// The scheduling policy (`/proc/<pid>/task/<tid>/stat` field 41) of
    /// each thread of `pid`.
    fn policies(pid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
            let stat =
                std::fs::read_to_string(task.expect("task").path().join("stat")).expect("stat");
            // Field 3 (state) is the first after the command's closing ')'.
            let after = &stat[stat.rfind(')').expect("comm") + 1..];
            let policy = after.split_whitespace().nth(41 - 3).expect("policy");
            out.push(policy.parse().expect("a number"));
        }
        out
    }

    #[test]
    fn idle_scheduling_puts_every_thread_of_the_process_under_sched_idle() {
        const SCHED_OTHER: u32 = 0;
        const SCHED_IDLE: u32 = 5;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep starts");
        let pid = child.id();
        assert_eq!(policies(pid), [SCHED_OTHER]);
        let set = idle_scheduling(pid);
        let after = policies(pid);
        let _ = child.kill();
        let _ = child.wait();
        set.expect("chrt puts it under SCHED_IDLE");
        assert_eq!(after, [SCHED_IDLE]);
        // A process that is gone is an error, not a silent success.
        assert!(idle_scheduling(pid).is_err());
    }
}
