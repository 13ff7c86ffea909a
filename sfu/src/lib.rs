//! Conclave's media plane: a selective forwarding unit that relays media it
//! cannot read.
//!
//! Built on webrtc-rs's sans-IO `rtc` crate. Worker threads each own a UDP
//! socket on one shared port (SO_REUSEPORT) and the sessions of the calls
//! assigned to them; datagrams are routed to a session by the ICE ufrag of
//! its first STUN request, then by source address. Each subscriber has a
//! bounded number of receive slots (loudest speakers for audio; screen
//! shares, pins and recent speakers for video) filled by SSRC rewriting, so
//! who fills a slot can change without renegotiation. Every forwarded frame
//! must carry a well-formed SFrame header of a live epoch ([`guard`]).

pub mod api;
pub mod config;
pub mod demux;
mod engine;
pub mod forward;
pub mod guard;
pub mod metrics;
mod net;
mod session;
mod tap;
mod worker;

use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use api::{
    BoxFuture, DownReason, PublishRights, QualityPrefs, SessionAnswer, SessionId, SessionRequest,
    SfuControl, SfuError, SfuEvent, Source,
};
pub use config::SfuConfig;

/// A forwarded payload, as captured for tests (feature `payload-capture`).
#[cfg(feature = "payload-capture")]
#[derive(Clone, Debug)]
pub struct CapturedPayload {
    /// The publishing session.
    pub publisher: SessionId,
    /// The publisher's RTP sequence number and marker bit.
    pub sequence: u16,
    pub marker: bool,
    /// What the publisher sent it as.
    pub source: Source,
    /// Whether it starts a VP8 key frame.
    pub key_frame: bool,
    /// The RTP payload (VP8 payload descriptor first, for video).
    pub payload: Vec<u8>,
}
pub use metrics::SfuMetrics;
pub use session::summarize_offer;

use worker::{Command, Shared, WorkerLink};

/// A running SFU. Dropping it does not stop it; call [`Sfu::shutdown`].
#[derive(Debug)]
pub struct Sfu {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    local_addr: SocketAddr,
    next_session: AtomicU64,
}

/// Why the SFU could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Binding the UDP port failed.
    #[error("cannot bind the media port: {0}")]
    Io(#[from] io::Error),
    /// The DTLS certificate could not be made.
    #[error("cannot create the DTLS certificate: {0}")]
    Certificate(String),
}

impl Sfu {
    /// Starts the workers. Events arrive on the returned receiver.
    pub fn start(
        config: SfuConfig,
        metrics: SfuMetrics,
    ) -> Result<(Self, tokio::sync::mpsc::UnboundedReceiver<SfuEvent>), StartError> {
        let workers = config.workers.max(1);
        let first = net::bind_reuseport(config.bind)?;
        let local_addr = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..workers {
            sockets.push(net::bind_reuseport(local_addr)?);
        }
        let ip = config.advertised_ip.unwrap_or_else(|| {
            if local_addr.ip().is_unspecified() {
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
            } else {
                local_addr.ip()
            }
        });
        let advertised = SocketAddr::new(ip, local_addr.port());
        let provider =
            rtc::crypto::default_provider().map_err(|e| StartError::Certificate(e.to_string()))?;
        let certificate = rtc::peer_connection::certificate::RTCCertificate::generate(
            provider.crypto(),
            rtc::crypto::SignatureScheme::EcdsaP256Sha256,
            rtc::peer_connection::certificate::CertificateParams::new(vec!["conclave-sfu".into()])
                .map_err(|e| StartError::Certificate(e.to_string()))?,
        )
        .map_err(|e| StartError::Certificate(e.to_string()))?;
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let shared = Arc::new(Shared::new(
            config,
            advertised,
            certificate,
            metrics,
            events_tx,
        ));
        let mut links = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..workers {
            let (tx, rx) = std::sync::mpsc::channel();
            links.push(WorkerLink {
                tx,
                waker: net::Waker::new()?,
            });
            inboxes.push(rx);
        }
        let _ = shared.links.set(links);
        let mut threads = Vec::new();
        for (index, (socket, inbox)) in sockets.into_iter().zip(inboxes).enumerate() {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("sfu-worker-{index}"))
                    .spawn(move || worker::run(index, shared, socket, inbox))?,
            );
        }
        tracing::info!(%local_addr, %advertised, workers, "SFU listening");
        Ok((
            Self {
                shared,
                threads: Mutex::new(threads),
                local_addr,
                next_session: AtomicU64::new(1),
            },
            events_rx,
        ))
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address put in ICE candidates.
    pub fn advertised_addr(&self) -> SocketAddr {
        self.shared.advertised
    }

    /// Open sessions.
    pub fn session_count(&self) -> usize {
        self.shared
            .session_count
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn worker_of_call(&self, call_id: &str) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        call_id.hash(&mut h);
        (h.finish() % self.shared.workers_count() as u64) as usize
    }

    fn worker_of_session(&self, session: SessionId) -> usize {
        (session & 0xff) as usize
    }

    /// Tests only (feature `fault-injection`): the session's state machine
    /// panics the next time it runs, to show the panic stays contained.
    #[cfg(feature = "fault-injection")]
    pub fn inject_fault(&self, session: SessionId) {
        self.shared.send(
            self.worker_of_session(session),
            Command::InjectFault(session),
        );
    }

    /// Tests only (feature `fault-injection`): the next `count` RTP
    /// datagrams the session's state machine emits are discarded instead of
    /// sent, as if the network lost them (they are in its send cache, so a
    /// NACK can bring them back).
    #[cfg(feature = "fault-injection")]
    pub fn lose_media(&self, session: SessionId, count: u32) {
        self.shared.send(
            self.worker_of_session(session),
            Command::LoseMedia(session, count),
        );
    }

    /// Tests only (feature `payload-capture`): from now on, a copy of every
    /// forwarded payload (the bytes after the RTP header) goes to the returned
    /// receiver, up to `capacity` waiting; more are skipped. A second call
    /// replaces the first receiver.
    #[cfg(feature = "payload-capture")]
    pub fn capture_forwarded(&self, capacity: usize) -> std::sync::mpsc::Receiver<CapturedPayload> {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        if let Ok(mut c) = self.shared.capture.lock() {
            *c = Some(tx);
        }
        rx
    }

    /// Stops every worker and closes every session.
    pub fn shutdown(&self) {
        for w in 0..self.shared.workers_count() {
            self.shared.send(w, Command::Shutdown);
        }
        let threads = match self.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => return,
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

impl SfuControl for Sfu {
    fn create_session(
        &self,
        request: SessionRequest,
    ) -> BoxFuture<'_, Result<SessionAnswer, SfuError>> {
        Box::pin(async move {
            let worker = self.worker_of_call(&request.call_id);
            let id = (self.next_session.fetch_add(1, Ordering::Relaxed) << 8) | worker as u64;
            let (reply, rx) = tokio::sync::oneshot::channel();
            if !self
                .shared
                .send(worker, Command::Create { id, request, reply })
            {
                return Err(SfuError::Stopped);
            }
            rx.await.map_err(|_| SfuError::Stopped)?
        })
    }

    fn set_publish_rights(&self, session: SessionId, rights: PublishRights) {
        self.shared.send(
            self.worker_of_session(session),
            Command::Rights(session, rights),
        );
    }

    fn pin(&self, session: SessionId, participant: &str, source: Source, pinned: bool) {
        self.shared.send(
            self.worker_of_session(session),
            Command::Pin {
                session,
                participant: participant.to_owned(),
                source,
                pinned,
            },
        );
    }

    fn set_quality(&self, session: SessionId, prefs: QualityPrefs) {
        self.shared.send(
            self.worker_of_session(session),
            Command::Quality(session, prefs),
        );
    }

    fn close_session(&self, session: SessionId) {
        self.shared
            .send(self.worker_of_session(session), Command::Close(session));
    }

    fn epoch_changed(&self, call_id: &str, epoch: u64) {
        self.shared.send(
            self.worker_of_call(call_id),
            Command::Epoch {
                call_id: call_id.to_owned(),
                epoch,
            },
        );
    }

    fn members_removed(&self, call_id: &str, epoch: u64) {
        self.shared.send(
            self.worker_of_call(call_id),
            Command::MembersRemoved {
                call_id: call_id.to_owned(),
                epoch,
            },
        );
    }

    fn epoch_ready(&self, call_id: &str, epoch: u64) {
        self.shared.send(
            self.worker_of_call(call_id),
            Command::EpochReady {
                call_id: call_id.to_owned(),
                epoch,
            },
        );
    }

    fn request_key_frames(&self, call_id: &str) {
        self.shared.send(
            self.worker_of_call(call_id),
            Command::KeyFrames(call_id.to_owned()),
        );
    }
}
