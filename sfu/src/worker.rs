//! Worker threads: each owns an [`Engine`] and a UDP socket bound to the
//! shared port, and runs the loop: commands, a batch of datagrams, due
//! timers, a batched send, then `poll` until the next deadline.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::peer_connection::certificate::RTCCertificate;
use tokio::sync::oneshot;

use crate::api::{
    PublishRights, QualityPrefs, SessionAnswer, SessionId, SessionRequest, SfuError, SfuEvent,
    Source,
};
use crate::config::SfuConfig;
use crate::engine::Engine;
use crate::metrics::{MediaKind, SfuMetrics};
use crate::net::{BATCH, RecvBatch, SendQueue, Waker, wait, wall_now};

/// What a worker can be asked to do.
#[derive(Debug)]
pub(crate) enum Command {
    Create {
        id: SessionId,
        request: SessionRequest,
        reply: oneshot::Sender<Result<SessionAnswer, SfuError>>,
    },
    Rights(SessionId, PublishRights),
    Pin {
        session: SessionId,
        participant: String,
        source: Source,
        pinned: bool,
    },
    Quality(SessionId, QualityPrefs),
    Close(SessionId),
    /// Ask the call's video publishers for key frames.
    KeyFrames(String),
    Epoch {
        call_id: String,
        epoch: u64,
    },
    EpochReady {
        call_id: String,
        epoch: u64,
    },
    MembersRemoved {
        call_id: String,
        epoch: u64,
    },
    /// Tests: make the session's next processing panic.
    #[cfg(feature = "fault-injection")]
    InjectFault(SessionId),
    #[cfg(feature = "fault-injection")]
    LoseMedia(SessionId, u32),
    /// A datagram another worker's socket received for one of ours.
    Datagram {
        from: SocketAddr,
        data: Bytes,
        /// When it reached that socket (see [`crate::net::wall_now`]).
        arrival: Duration,
    },
    Shutdown,
}

/// A worker's inbox.
#[derive(Debug)]
pub(crate) struct WorkerLink {
    pub tx: Sender<Command>,
    pub waker: Waker,
}

/// State every worker and the control handle share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: SfuConfig,
    pub advertised: SocketAddr,
    pub certificate: RTCCertificate,
    pub metrics: SfuMetrics,
    pub events: tokio::sync::mpsc::UnboundedSender<SfuEvent>,
    pub session_count: AtomicUsize,
    pub links: OnceLock<Vec<WorkerLink>>,
    pub stopping: AtomicBool,
    ufrags: RwLock<HashMap<String, usize>>,
    addrs: RwLock<HashMap<SocketAddr, usize>>,
    /// Tests only: where copies of forwarded payloads go.
    #[cfg(feature = "payload-capture")]
    pub capture: std::sync::Mutex<Option<std::sync::mpsc::SyncSender<crate::CapturedPayload>>>,
}

impl Shared {
    pub(crate) fn new(
        config: SfuConfig,
        advertised: SocketAddr,
        certificate: RTCCertificate,
        metrics: SfuMetrics,
        events: tokio::sync::mpsc::UnboundedSender<SfuEvent>,
    ) -> Self {
        Self {
            config,
            advertised,
            certificate,
            metrics,
            events,
            session_count: AtomicUsize::new(0),
            links: OnceLock::new(),
            stopping: AtomicBool::new(false),
            ufrags: RwLock::new(HashMap::new()),
            addrs: RwLock::new(HashMap::new()),
            #[cfg(feature = "payload-capture")]
            capture: std::sync::Mutex::new(None),
        }
    }

    pub(crate) fn workers_count(&self) -> usize {
        self.config.workers.max(1)
    }

    pub(crate) fn send(&self, worker: usize, cmd: Command) -> bool {
        let Some(link) = self.links.get().and_then(|l| l.get(worker)) else {
            return false;
        };
        if link.tx.send(cmd).is_err() {
            return false;
        }
        link.waker.wake();
        true
    }

    pub(crate) fn hand_off(&self, worker: usize, from: SocketAddr, data: &[u8], arrival: Duration) {
        self.send(
            worker,
            Command::Datagram {
                from,
                data: Bytes::copy_from_slice(data),
                arrival,
            },
        );
    }

    pub(crate) fn route_ufrag(&self, ufrag: String, worker: usize) {
        if let Ok(mut m) = self.ufrags.write() {
            m.insert(ufrag, worker);
        }
    }

    pub(crate) fn unroute_ufrag(&self, ufrag: &str) {
        if let Ok(mut m) = self.ufrags.write() {
            m.remove(ufrag);
        }
    }

    pub(crate) fn route_addr(&self, addr: SocketAddr, worker: usize) {
        if self.workers_count() == 1 {
            return;
        }
        if let Ok(mut m) = self.addrs.write() {
            m.insert(addr, worker);
        }
    }

    pub(crate) fn unroute_addr(&self, addr: &SocketAddr) {
        if self.workers_count() == 1 {
            return;
        }
        if let Ok(mut m) = self.addrs.write() {
            m.remove(addr);
        }
    }

    pub(crate) fn worker_for_ufrag(&self, ufrag: &str) -> Option<usize> {
        if self.workers_count() == 1 {
            return None;
        }
        self.ufrags.read().ok()?.get(ufrag).copied()
    }

    pub(crate) fn worker_for_addr(&self, addr: &SocketAddr) -> Option<usize> {
        if self.workers_count() == 1 {
            return None;
        }
        self.addrs.read().ok()?.get(addr).copied()
    }
}

/// Runs one worker until shutdown.
pub(crate) fn run(index: usize, shared: Arc<Shared>, socket: UdpSocket, inbox: Receiver<Command>) {
    let mut engine = Engine::new(index, shared.clone(), Instant::now());
    let mut batch = RecvBatch::default();
    let mut out = SendQueue::new(shared.config.udp_gso);
    // Arrival times (and kinds) of the forwarded datagrams not yet sent.
    let mut arrivals: Vec<(Duration, MediaKind)> = Vec::with_capacity(BATCH);
    // Indices of a batch's datagrams that are not audio.
    let mut later: Vec<usize> = Vec::with_capacity(BATCH);
    let transit = Transit::new(&shared.metrics);
    let label = index.to_string();
    let loop_hist = shared
        .metrics
        .loop_seconds
        .with_label_values(&[label.as_str()]);
    let Some(waker) = shared
        .links
        .get()
        .and_then(|l| l.get(index))
        .map(|l| &l.waker)
    else {
        return;
    };
    loop {
        let busy_start = Instant::now();
        let mut now = busy_start;
        let mut stop = false;
        while let Ok(cmd) = inbox.try_recv() {
            let arrival = match &cmd {
                Command::Shutdown => {
                    stop = true;
                    None
                }
                Command::Datagram { arrival, .. } => Some(*arrival),
                _ => None,
            };
            engine.command(cmd, now);
            if let (Some(a), Some(kind)) = (arrival, engine.take_forwarded()) {
                arrivals.push((a, kind));
            }
        }
        // A bounded number of batches, so timers and commands stay fresh
        // under load.
        for _ in 0..8 {
            now = Instant::now();
            let n = batch.recv(&socket).unwrap_or(0);
            // Audio first: a voice packet does not wait for the fan-out of
            // the video (a key frame, say) that reached the socket with it.
            later.clear();
            for i in 0..n {
                let Some((from, data, arrival)) = batch.get(i) else {
                    continue;
                };
                if engine.is_audio(&from, data) {
                    handle(&mut engine, &mut arrivals, now, from, data, arrival);
                } else {
                    later.push(i);
                }
            }
            if !arrivals.is_empty() {
                send(&shared, &mut engine, &mut out, &socket);
                transit.observe(&mut arrivals);
            }
            for &i in &later {
                let Some((from, data, arrival)) = batch.get(i) else {
                    continue;
                };
                handle(&mut engine, &mut arrivals, now, from, data, arrival);
            }
            send(&shared, &mut engine, &mut out, &socket);
            transit.observe(&mut arrivals);
            if n < BATCH {
                break;
            }
        }
        now = Instant::now();
        engine.timers(now);
        send(&shared, &mut engine, &mut out, &socket);
        loop_hist.observe(busy_start.elapsed().as_secs_f64());
        if stop || shared.stopping.load(Ordering::Relaxed) {
            break;
        }
        let timeout = engine
            .next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1));
        if !timeout.is_zero() {
            let _ = wait(&socket, waker, Some(timeout));
        }
    }
    tracing::debug!(
        worker = index,
        sessions = engine.session_count(),
        "SFU worker stopped"
    );
}

/// Hands one received datagram to the engine and notes its arrival if it
/// forwarded media.
fn handle(
    engine: &mut Engine,
    arrivals: &mut Vec<(Duration, MediaKind)>,
    now: Instant,
    from: SocketAddr,
    data: &[u8],
    arrival: Duration,
) {
    engine.datagram(now, from, data, arrival);
    if let Some(kind) = engine.take_forwarded() {
        arrivals.push((arrival, kind));
    }
}

/// The transit histogram's two series.
struct Transit {
    audio: prometheus::Histogram,
    video: prometheus::Histogram,
}

impl Transit {
    fn new(metrics: &SfuMetrics) -> Self {
        let series = |k: MediaKind| metrics.transit_seconds.with_label_values(&[k.label()]);
        Self {
            audio: series(MediaKind::Audio),
            video: series(MediaKind::Video),
        }
    }

    /// Records how long each forwarded datagram just sent spent in the SFU.
    fn observe(&self, arrivals: &mut Vec<(Duration, MediaKind)>) {
        if arrivals.is_empty() {
            return;
        }
        let sent = wall_now();
        for (a, kind) in arrivals.drain(..) {
            let h = match kind {
                MediaKind::Audio => &self.audio,
                MediaKind::Video => &self.video,
            };
            h.observe(sent.saturating_sub(a).as_secs_f64());
        }
    }
}

fn send(shared: &Shared, engine: &mut Engine, out: &mut SendQueue, socket: &UdpSocket) {
    let (n, bytes) = engine.flush(out, socket);
    shared.metrics.packets_out.inc_by(n);
    shared.metrics.bytes_out.inc_by(bytes);
}
