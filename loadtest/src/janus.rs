//! The Janus target, for the side-by-side: Janus VideoRoom started by the
//! load test with a generated configuration, and a simulated participant
//! that talks Janus's WebSocket API.
//!
//! Janus has no MLS delivery service, so participants protect frames with
//! SFrame under one base key generated per run ([`StaticCrypto`]): the same
//! cipher suite, KID layout and per-frame work as against Conclave, without
//! the key exchange. What Janus forwards is therefore exactly as opaque to
//! it as what Conclave's SFU forwards.
//!
//! A participant that publishes joins the room as a publisher and sends an
//! offer for its microphone, camera (simulcast, rids q/h/f) and screen. A
//! participant that receives attaches a subscriber handle for the streams
//! the scenario says it watches (the speakers' audio, the screen shares,
//! then cameras, up to its slot counts) once their publishers are in the
//! room; Janus offers, the media thread answers. The two connections are
//! two peers of the media thread: `participant` and `participant |`
//! [`SUBSCRIBER_BIT`].
//!
//! Janus (libnice) never gathers loopback candidates, so the run needs a
//! non-loopback address that only this machine uses: `loadtest/side-by-side`
//! makes a network namespace with one and runs everything inside it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as ProcessCommand, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use conclave_protocol::sframe::{
    Codec, DecryptedFrame, EpochSecret, FrameEncryptor, KeyRing, KeyRingConfig, KidLayout,
    SframeError,
};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::conclave::{ParticipantError, Plan, Recorder};
use crate::media::{Command, FrameCrypto, MediaSender, PeerSpec};
use crate::payload::Source;
use crate::scenario::Scenario;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Set in the media-thread peer id of a participant's subscriber connection.
pub const SUBSCRIBER_BIT: u32 = 1 << 30;
/// The VideoRoom room every participant joins.
pub const ROOM: u64 = 1234;
/// Leaf indices available to [`StaticCrypto`] (participant incarnations).
pub const MAX_LEAVES: u32 = 1 << 14;
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a subscriber waits for the publishers it wants.
const FEED_WAIT: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A Janus process started for one run.
#[derive(Debug)]
pub struct JanusServer {
    /// `ws://127.0.0.1:PORT`.
    pub ws_url: String,
    /// Its process id.
    pub pid: u32,
    child: Option<Child>,
    dir: PathBuf,
}

/// How to start Janus.
#[derive(Debug, Clone)]
pub struct JanusOptions {
    /// The `janus` binary.
    pub binary: PathBuf,
    /// Janus's library directory (plugins/, transports/, ...).
    pub lib_dir: PathBuf,
    /// The address Janus gathers its ICE candidate on (non-loopback).
    pub media_ip: IpAddr,
    /// Janus `event_loops` (0: its default, one thread per handle).
    pub event_loops: u32,
}

impl JanusOptions {
    /// The Debian package's paths.
    pub fn debian(media_ip: IpAddr) -> Self {
        Self {
            binary: PathBuf::from("/usr/bin/janus"),
            lib_dir: PathBuf::from("/usr/lib/x86_64-linux-gnu/janus"),
            media_ip,
            event_loops: 0,
        }
    }
}

/// Every `.so` in `dir` except `keep`, comma-separated (Janus's `disable`).
fn disable_all_but(dir: &Path, keep: &str) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(".so") && n != keep)
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.join(",")
}

/// The generated configuration files: `(file name, contents)`.
pub fn config_files(opts: &JanusOptions, dir: &Path, ws_port: u16) -> Vec<(String, String)> {
    let lib = &opts.lib_dir;
    let loops = if opts.event_loops > 0 {
        format!("\tevent_loops = {}\n", opts.event_loops)
    } else {
        String::new()
    };
    let janus = format!(
        "general: {{\n\
         \tconfigs_folder = \"{dir}\"\n\
         \tplugins_folder = \"{lib}/plugins\"\n\
         \ttransports_folder = \"{lib}/transports\"\n\
         \tevents_folder = \"{lib}/events\"\n\
         \tloggers_folder = \"{lib}/loggers\"\n\
         \tdebug_level = 3\n\
         \tserver_name = \"conclave-loadtest\"\n\
         \tsession_timeout = 0\n\
         {loops}\
         }}\n\
         media: {{\n\
         \tipv6 = false\n\
         \trtp_port_range = \"20000-40000\"\n\
         }}\n\
         nat: {{\n\
         \tice_enforce_list = \"{ip}\"\n\
         \tice_tcp = false\n\
         \tfull_trickle = false\n\
         }}\n\
         plugins: {{\n\
         \tdisable = \"{plugins}\"\n\
         }}\n\
         transports: {{\n\
         \tdisable = \"{transports}\"\n\
         }}\n\
         loggers: {{\n\
         \tdisable = \"{loggers}\"\n\
         }}\n\
         events: {{\n\
         \tbroadcast = false\n\
         \tdisable = \"{events}\"\n\
         }}\n",
        dir = dir.display(),
        lib = lib.display(),
        ip = opts.media_ip,
        plugins = disable_all_but(&lib.join("plugins"), "libjanus_videoroom.so"),
        transports = disable_all_but(&lib.join("transports"), "libjanus_websockets.so"),
        loggers = disable_all_but(&lib.join("loggers"), ""),
        events = disable_all_but(&lib.join("events"), ""),
    );
    let videoroom = format!(
        "general: {{\n}}\n\
         room-{ROOM}: {{\n\
         \tdescription = \"conclave-loadtest\"\n\
         \tpublishers = {MAX_LEAVES}\n\
         \tbitrate = 0\n\
         \tfir_freq = 0\n\
         \taudiocodec = \"opus\"\n\
         \tvideocodec = \"vp8\"\n\
         \taudiolevel_ext = true\n\
         \taudiolevel_event = false\n\
         \tnotify_joining = false\n\
         \ttransport_wide_cc_ext = false\n\
         \tplayoutdelay_ext = false\n\
         \tvideoorient_ext = false\n\
         }}\n"
    );
    let websockets = format!(
        "general: {{\n\
         \tjson = \"compact\"\n\
         \tws = true\n\
         \tws_port = {ws_port}\n\
         \tws_ip = \"127.0.0.1\"\n\
         \twss = false\n\
         }}\n\
         admin: {{\n\
         \tadmin_ws = false\n\
         \tadmin_wss = false\n\
         }}\n"
    );
    vec![
        ("janus.jcfg".into(), janus),
        ("janus.plugin.videoroom.jcfg".into(), videoroom),
        ("janus.transport.websockets.jcfg".into(), websockets),
    ]
}

impl JanusServer {
    /// Writes a configuration under a fresh directory and starts Janus.
    pub async fn start(opts: &JanusOptions) -> anyhow::Result<Self> {
        if opts.media_ip.is_loopback() {
            bail!(
                "Janus never offers loopback ICE candidates: give a non-loopback --media-ip \
                 (loadtest/side-by-side runs the comparison in a network namespace that has one)"
            );
        }
        let ws_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!(
            "conclave-loadtest-janus-{}-{ws_port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        for (name, text) in config_files(opts, &dir, ws_port) {
            std::fs::write(dir.join(&name), text).with_context(|| format!("writing {name}"))?;
        }
        let log = std::fs::File::create(dir.join("janus.log")).context("creating janus.log")?;
        let child = ProcessCommand::new(&opts.binary)
            .arg("--configs-folder")
            .arg(&dir)
            .arg("--config")
            .arg(dir.join("janus.jcfg"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", opts.binary.display()))?;
        let mut server = Self {
            ws_url: format!("ws://127.0.0.1:{ws_port}"),
            pid: child.id(),
            child: Some(child),
            dir,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], ws_port));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = server.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "Janus exited at start ({status}); log: {}",
                    server.log_path().display()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("Janus did not open its WebSocket port within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(server)
    }

    /// Janus's log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("janus.log")
    }

    /// Stops Janus.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::server::stop_child(child);
        }
    }
}

impl Drop for JanusServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SFrame with one base key for the whole run (no key exchange: Janus has
/// no delivery service). The leaf is the participant incarnation.
pub struct StaticCrypto {
    ring: Mutex<KeyRing>,
    senders: Mutex<Vec<(u64, FrameEncryptor)>>,
    leaf: u32,
}

impl std::fmt::Debug for StaticCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCrypto")
            .field("leaf", &self.leaf)
            .finish_non_exhaustive()
    }
}

impl StaticCrypto {
    /// Keys of participant `leaf` under `base_key`.
    pub fn new(base_key: &[u8], leaf: u32) -> Result<Self, SframeError> {
        if leaf >= MAX_LEAVES {
            return Err(SframeError::KidOverflow);
        }
        let config = KeyRingConfig::default();
        let mut ring = KeyRing::new(config);
        ring.install_epoch(
            EpochSecret {
                epoch: 0,
                base_key: base_key.to_vec().into(),
                sender_bits: KidLayout::sender_bits(MAX_LEAVES - 1),
                members: (0..MAX_LEAVES).collect(),
            },
            Instant::now(),
        );
        Ok(Self {
            ring: Mutex::new(ring),
            senders: Mutex::new(Vec::new()),
            leaf,
        })
    }
}

impl FrameCrypto for StaticCrypto {
    fn encrypt(
        &self,
        context: u64,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SframeError> {
        let mut senders = lock(&self.senders);
        let idx = match senders.iter().position(|(c, _)| *c == context) {
            Some(i) => i,
            None => {
                let key = lock(&self.ring).sender_key(0, self.leaf, context)?;
                senders.push((context, FrameEncryptor::new(key)));
                senders.len() - 1
            }
        };
        match senders.get_mut(idx) {
            Some((_, enc)) => enc.encrypt(codec, frame, out),
            None => Err(SframeError::NoEpoch),
        }
    }

    fn decrypt(
        &self,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<DecryptedFrame, SframeError> {
        lock(&self.ring).decrypt(Instant::now(), codec, frame, out)
    }
}

/// One participant's published feed, as subscribers need it.
#[derive(Clone, Debug)]
pub struct Feed {
    /// Janus's publisher id.
    pub id: u64,
    /// `(mid, source)` of each published stream.
    pub mids: Vec<(String, Source)>,
}

/// Shared by the participants of a Janus run.
#[derive(Debug)]
pub struct Shared {
    /// `ws://127.0.0.1:PORT`.
    pub ws_url: String,
    /// The scenario (roles decide who watches whom).
    pub scenario: Scenario,
    /// SFrame base key of the run.
    pub base_key: Vec<u8>,
    /// Media thread.
    pub media: MediaSender,
    /// Measurements.
    pub recorder: Arc<Recorder>,
    /// Published feeds by role slot.
    pub feeds: Mutex<HashMap<u32, Feed>>,
}

/// The streams slot `me` watches: `(publisher slot, source)`, speakers'
/// audio first, then screens, then cameras, up to the receive slot counts.
pub fn wanted(s: &Scenario, me: u32, audio_slots: u32, video_slots: u32) -> Vec<(u32, Source)> {
    let publishers = s
        .audio
        .publishers
        .max(s.camera.publishers)
        .max(s.screen.publishers)
        .min(s.participants);
    let others = || (0..publishers).filter(move |p| *p != me);
    let mut out: Vec<(u32, Source)> = others()
        .filter(|p| s.roles(*p).speaker)
        .take(audio_slots as usize)
        .map(|p| (p, Source::Audio))
        .collect();
    let video: Vec<(u32, Source)> = others()
        .filter(|p| s.roles(*p).screen)
        .map(|p| (p, Source::Screen))
        .chain(
            others()
                .filter(|p| s.roles(*p).camera)
                .map(|p| (p, Source::Camera)),
        )
        .take(video_slots as usize)
        .collect();
    out.extend(video);
    out
}

/// A Janus WebSocket session, one request at a time.
struct Conn {
    ws: Ws,
    next_tx: u64,
    session: Option<u64>,
}

fn refused(what: &str, v: &Value) -> ParticipantError {
    ParticipantError::Protocol(format!("Janus refused {what}: {v}"))
}

impl Conn {
    async fn open(url: &str) -> Result<Self, ParticipantError> {
        let mut req = url
            .into_client_request()
            .map_err(|e| ParticipantError::Connection(e.to_string()))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            http_header("janus-protocol").map_err(ParticipantError::Connection)?,
        );
        let (ws, _) = tokio::time::timeout(STEP_TIMEOUT, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| ParticipantError::Timeout("connecting to Janus"))?
            .map_err(|e| ParticipantError::Connection(e.to_string()))?;
        Ok(Self {
            ws,
            next_tx: 1,
            session: None,
        })
    }

    async fn recv(&mut self) -> Result<Value, ParticipantError> {
        let text = crate::conclave::next_text(&mut self.ws).await?;
        serde_json::from_str(text.as_str()).map_err(|e| ParticipantError::Protocol(e.to_string()))
    }

    async fn send(&mut self, mut msg: Value) -> Result<String, ParticipantError> {
        let tx = format!("t{}", self.next_tx);
        self.next_tx += 1;
        msg["transaction"] = json!(tx);
        if let Some(s) = self.session {
            msg["session_id"] = json!(s);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .map_err(|e| ParticipantError::Connection(e.to_string()))?;
        Ok(tx)
    }

    /// Sends `msg` and returns the first reply to it that is not an `ack`
    /// (`success`, or the plugin's `event` for asynchronous requests).
    async fn call(&mut self, what: &'static str, msg: Value) -> Result<Value, ParticipantError> {
        let tx = self.send(msg).await?;
        let wait = async {
            loop {
                let v = self.recv().await?;
                if v["transaction"].as_str() != Some(tx.as_str()) {
                    continue;
                }
                match v["janus"].as_str() {
                    Some("ack") => continue,
                    Some("error") => return Err(refused(what, &v["error"])),
                    _ => {}
                }
                if let Some(err) = v["plugindata"]["data"].get("error") {
                    return Err(refused(what, err));
                }
                return Ok(v);
            }
        };
        tokio::time::timeout(STEP_TIMEOUT, wait)
            .await
            .map_err(|_| ParticipantError::Timeout(what))?
    }

    async fn attach(&mut self) -> Result<u64, ParticipantError> {
        let v = self
            .call(
                "attach",
                json!({"janus": "attach", "plugin": "janus.plugin.videoroom"}),
            )
            .await?;
        v["data"]["id"]
            .as_u64()
            .ok_or_else(|| refused("attach", &v))
    }

    async fn message(
        &mut self,
        what: &'static str,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> Result<Value, ParticipantError> {
        let mut msg = json!({"janus": "message", "handle_id": handle, "body": body});
        if let Some(j) = jsep {
            msg["jsep"] = j;
        }
        self.call(what, msg).await
    }
}

fn http_header(v: &str) -> Result<tokio_tungstenite::tungstenite::http::HeaderValue, String> {
    tokio_tungstenite::tungstenite::http::HeaderValue::from_str(v).map_err(|e| e.to_string())
}

async fn open_media(
    shared: &Shared,
    spec: PeerSpec,
    remote_offer: Option<String>,
    crypto: Arc<StaticCrypto>,
) -> Result<crate::media::Offer, ParticipantError> {
    let (tx, rx) = oneshot::channel();
    shared
        .media
        .send(Command::Open {
            spec,
            remote_offer,
            crypto,
            key_frame: Arc::new(AtomicBool::new(true)),
            reply: tx,
        })
        .map_err(|e| ParticipantError::Media(e.to_string()))?;
    rx.await
        .map_err(|_| ParticipantError::Media("media thread gone".into()))?
        .map_err(ParticipantError::Media)
}

/// Runs one participant until `leave` fires. Errors are recorded in its
/// join record as well as returned.
pub async fn run(
    shared: Arc<Shared>,
    plan: Plan,
    leave: oneshot::Receiver<()>,
) -> Result<(), ParticipantError> {
    let id = plan.participant;
    let result = run_inner(&shared, plan, leave).await;
    let _ = shared.media.send(Command::Close { participant: id });
    let _ = shared.media.send(Command::Close {
        participant: id | SUBSCRIBER_BIT,
    });
    shared.recorder.finished(id, &result);
    result
}

async fn run_inner(
    shared: &Shared,
    plan: Plan,
    mut leave: oneshot::Receiver<()>,
) -> Result<(), ParticipantError> {
    let id = plan.participant;
    let rec = &shared.recorder;
    rec.join(id, |r| r.started = Some(Instant::now()));
    let crypto = Arc::new(
        StaticCrypto::new(&shared.base_key, id)
            .map_err(|e| ParticipantError::Media(format!("keys: {e}")))?,
    );
    let mut conn = Conn::open(&shared.ws_url).await?;
    let v = conn.call("create", json!({"janus": "create"})).await?;
    conn.session = Some(
        v["data"]["id"]
            .as_u64()
            .ok_or_else(|| refused("create", &v))?,
    );

    let spec = &plan.spec;
    let publishes = spec.audio || spec.camera.is_some() || spec.screen.is_some();
    let want = wanted(
        &shared.scenario,
        plan.slot,
        spec.audio_slots,
        spec.video_slots,
    );
    let connections = u8::from(publishes) + u8::from(!want.is_empty());
    rec.join(id, |r| r.media_needed = connections);

    if publishes {
        let handle = conn.attach().await?;
        let joined = conn
            .message(
                "join as publisher",
                handle,
                json!({"request": "join", "ptype": "publisher", "room": ROOM, "display": format!("lt{id}")}),
                None,
            )
            .await?;
        let feed_id = joined["plugindata"]["data"]["id"]
            .as_u64()
            .ok_or_else(|| refused("join as publisher", &joined))?;
        let pub_spec = PeerSpec {
            audio_slots: 0,
            video_slots: 0,
            ..spec.clone()
        };
        let offer = open_media(shared, pub_spec, None, crypto.clone()).await?;
        let configured = conn
            .message(
                "publish",
                handle,
                json!({"request": "publish"}),
                Some(json!({"type": "offer", "sdp": offer.sdp})),
            )
            .await?;
        let answer = configured["jsep"]["sdp"]
            .as_str()
            .ok_or_else(|| refused("publish (no answer)", &configured))?;
        shared
            .media
            .send(Command::Answer {
                participant: id,
                sdp: answer.to_owned(),
            })
            .map_err(|e| ParticipantError::Media(e.to_string()))?;
        // Janus lists the feed for subscribers once its media is up.
        let up = async {
            loop {
                let v = conn.recv().await?;
                if v["janus"].as_str() == Some("webrtcup") && v["sender"].as_u64() == Some(handle) {
                    return Ok::<(), ParticipantError>(());
                }
            }
        };
        tokio::time::timeout(STEP_TIMEOUT, up)
            .await
            .map_err(|_| ParticipantError::Timeout("waiting for the published media to be up"))??;
        lock(&shared.feeds).insert(
            plan.slot,
            Feed {
                id: feed_id,
                mids: offer.sources.clone(),
            },
        );
    }
    rec.join(id, |r| r.accepted = Some(Instant::now()));

    if !want.is_empty() {
        // Wait for the publishers this participant watches.
        let deadline = Instant::now() + FEED_WAIT;
        let streams = loop {
            let feeds = lock(&shared.feeds).clone();
            let streams: Vec<Value> = want
                .iter()
                .filter_map(|(slot, source)| {
                    let f = feeds.get(slot)?;
                    let (mid, _) = f.mids.iter().find(|(_, s)| s == source)?;
                    Some(json!({"feed": f.id, "mid": mid}))
                })
                .collect();
            if streams.len() == want.len() || Instant::now() > deadline {
                break streams;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if streams.is_empty() {
            return Err(ParticipantError::Timeout("waiting for publishers"));
        }
        let handle = conn.attach().await?;
        let attached = conn
            .message(
                "join as subscriber",
                handle,
                json!({"request": "join", "ptype": "subscriber", "room": ROOM, "streams": streams}),
                None,
            )
            .await?;
        let offer = attached["jsep"]["sdp"]
            .as_str()
            .ok_or_else(|| refused("join as subscriber (no offer)", &attached))?;
        let sub_spec = PeerSpec {
            participant: id | SUBSCRIBER_BIT,
            audio: false,
            speaker: false,
            camera: None,
            screen: None,
            ..spec.clone()
        };
        let answer = open_media(shared, sub_spec, Some(offer.to_owned()), crypto.clone()).await?;
        conn.message(
            "start",
            handle,
            json!({"request": "start"}),
            Some(json!({"type": "answer", "sdp": answer.sdp})),
        )
        .await?;
        // Simulcast: the same highest layer as against Conclave.
        let layers: Vec<Value> = attached["plugindata"]["data"]["streams"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|s| s["type"].as_str() == Some("video"))
                    .filter_map(|s| s["mid"].as_str())
                    .map(|mid| json!({"mid": mid, "substream": plan.max_layer.min(2)}))
                    .collect()
            })
            .unwrap_or_default();
        if !layers.is_empty() {
            conn.message(
                "configure substream",
                handle,
                json!({"request": "configure", "streams": layers}),
                None,
            )
            .await?;
        }
    }
    rec.join(id, |r| r.mls = Some(Instant::now()));
    lock(&rec.present).insert(id);

    // Present until told to leave; Janus's notifications are read and dropped.
    loop {
        tokio::select! {
            m = conn.recv() => { m?; }
            _ = &mut leave => break,
        }
    }
    let at = Instant::now();
    lock(&rec.present).remove(&id);
    rec.join(id, |r| r.left = Some(at));
    let _ = conn.send(json!({"janus": "destroy"})).await;
    let _ = conn.ws.close(None).await;
    Ok(())
}

/// A random base key for a run.
pub fn run_key() -> Vec<u8> {
    (0..16).map(|_| rand::random::<u8>()).collect()
}
