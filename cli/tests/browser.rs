//! Real E2EE calls in headless Chromium: three browsers running the web app
//! (served by the real server, from `client-sdk/web/dist/app`) and one Rust
//! bot (the CLI's `publish`, audio + VP8 video) in one call, through the real
//! SFU on 127.0.0.1. The browser side is driven by
//! `client-sdk/web/test/browser/call.mjs` (playwright-core), which checks
//! what a user sees: every browser decodes every other publisher's video,
//! no decryption failures once the epoch settles, a screen share reaches the
//! others, and an evicted member can no longer decrypt.
//!
//! This side provides what only the server can: the SFU's copy of every
//! forwarded payload, checked to be ciphertext (feature `payload-capture`),
//! and a *compromised* media plane for the eviction check: the SFU wrapper
//! below keeps forwarding to the removed member (it ignores the order to
//! close that member's media session), and the browser driver hides the
//! removal from that member's page, so the page keeps every key it had. The
//! only thing that stops it from following the call is MLS.
//!
//! Needs `chromium`, `vpxenc` (Debian `vpx-tools`), `npm ci` and the built web
//! app (`npm run build`) in client-sdk/web. Without them the test is skipped,
//! except under `CI=true`, where a missing piece fails it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conclave_cli::formats::{IvfWriter, Pcm, read_ivf, write_wav};
use conclave_cli::{Auth, Connect, Publish};
use conclave_client::{Identity, Principal};
use conclave_sfu::{
    BoxFuture, CapturedPayload, PublishRights, QualityPrefs, SessionAnswer, SessionId,
    SessionRequest, SfuControl, SfuError, Source,
};
use conclave_signaling::auth::TokenKind;
use conclave_signaling::{AppState, CallConfig, router_with_web};

const CHROMIUM: &str = "/usr/bin/chromium";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What the test needs from the machine; `Err` says what is missing.
fn prerequisites() -> Result<(), String> {
    let web = repo().join("client-sdk/web");
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        missing.push("chromium (apt-get install chromium)");
    }
    if Command::new("vpxenc").arg("--help").output().is_err() {
        missing.push("vpxenc (apt-get install vpx-tools)");
    }
    if !web.join("node_modules/playwright-core").exists() {
        missing.push("playwright-core (cd client-sdk/web && npm ci)");
    }
    if !web.join("dist/app/index.html").exists() {
        missing.push("the built web app (cd client-sdk/web && npm run build)");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join(", "))
    }
}

/// A media plane that obeys signaling except that it never closes the
/// sessions of `victim`: what a compromised server could do.
struct KeepsEvicted {
    inner: Arc<conclave_sfu::Sfu>,
    /// Participant prefix (`u:<user id>/`) of the member to keep.
    victim: Mutex<String>,
    kept: Mutex<HashSet<SessionId>>,
    refused_closes: Mutex<u32>,
}

impl SfuControl for KeepsEvicted {
    fn create_session(
        &self,
        request: SessionRequest,
    ) -> BoxFuture<'_, Result<SessionAnswer, SfuError>> {
        let victim = {
            let v = self.victim.lock().unwrap();
            !v.is_empty() && request.participant.starts_with(v.as_str())
        };
        Box::pin(async move {
            let answer = self.inner.create_session(request).await?;
            if victim {
                self.kept.lock().unwrap().insert(answer.session);
            }
            Ok(answer)
        })
    }
    fn set_publish_rights(&self, session: SessionId, rights: PublishRights) {
        self.inner.set_publish_rights(session, rights);
    }
    fn pin(&self, session: SessionId, participant: &str, source: Source, pinned: bool) {
        self.inner.pin(session, participant, source, pinned);
    }
    fn set_quality(&self, session: SessionId, prefs: QualityPrefs) {
        self.inner.set_quality(session, prefs);
    }
    fn close_session(&self, session: SessionId) {
        if self.kept.lock().unwrap().contains(&session) {
            *self.refused_closes.lock().unwrap() += 1;
            return;
        }
        self.inner.close_session(session);
    }
    fn epoch_changed(&self, call_id: &str, epoch: u64) {
        self.inner.epoch_changed(call_id, epoch);
    }
    fn epoch_ready(&self, call_id: &str, epoch: u64) {
        self.inner.epoch_ready(call_id, epoch);
    }
    fn members_removed(&self, call_id: &str, epoch: u64) {
        self.inner.members_removed(call_id, epoch);
    }
    fn request_key_frames(&self, call_id: &str) {
        self.inner.request_key_frames(call_id);
    }
}

/// A 320×240 clip at 15 fps of a box moving over a gradient, as Y4M.
fn write_y4m(path: &Path, frames: usize) {
    let (w, h) = (320usize, 240usize);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "YUV4MPEG2 W{w} H{h} F15:1 Ip A1:1 C420jpeg").unwrap();
    for n in 0..frames {
        f.write_all(b"FRAME\n").unwrap();
        let bx = (n * 8) % (w - 64);
        let mut y = vec![0u8; w * h];
        for r in 0..h {
            for c in 0..w {
                let inside = c >= bx && c < bx + 64 && (88..152).contains(&r);
                y[r * w + c] = if inside {
                    235
                } else {
                    (16 + (c + r + n * 3) % 200) as u8
                };
            }
        }
        f.write_all(&y).unwrap();
        let u: Vec<u8> = (0..w * h / 4).map(|i| (96 + (i + n) % 64) as u8).collect();
        f.write_all(&u).unwrap();
        f.write_all(&vec![160u8; w * h / 4]).unwrap();
    }
}

/// Shannon entropy of `bytes`, in bits per byte.
fn entropy(bytes: &[u8]) -> f64 {
    let mut counts = [0u64; 256];
    for &b in bytes {
        counts[usize::from(b)] += 1;
    }
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// The SFrame header length (RFC 9605 §4.3) at the start of `b`, if well formed.
fn sframe_header_len(b: &[u8]) -> Option<usize> {
    let cfg = *b.first()?;
    let (x, k) = (cfg & 0x08 != 0, usize::from(cfg & 0x07));
    let (y, c) = (cfg & 0x80 != 0, usize::from((cfg >> 4) & 0x07));
    let kid_len = if x { k + 1 } else { 0 };
    let ctr_len = if y { c + 1 } else { 0 };
    let len = 1 + kid_len + ctr_len;
    (b.len() > len).then_some(len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_and_a_bot_hold_an_encrypted_call() {
    if let Err(missing) = prerequisites() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "browser test prerequisites missing under CI: {missing}"
        );
        println!("SKIPPED: browser test needs {missing}");
        return;
    }
    let work = std::env::temp_dir().join(format!("conclave-browser-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let artifacts = repo().join("target/browser-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();

    // The bot's media: a 440 Hz tone and a real VP8 clip (libvpx).
    let samples: Vec<i16> = (0..48_000 * 4)
        .map(|i| {
            (12_000.0 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 48_000.0).sin()) as i16
        })
        .collect();
    let wav = work.join("tone.wav");
    write_wav(
        std::fs::File::create(&wav).unwrap(),
        &Pcm {
            rate: 48_000,
            channels: 1,
            samples,
        },
    )
    .unwrap();
    let y4m = work.join("clip.y4m");
    write_y4m(&y4m, 60);
    let ivf = work.join("clip.ivf");
    let enc = Command::new("vpxenc")
        .args([
            "--codec=vp8",
            "--ivf",
            "--good",
            "--cpu-used=8",
            "--target-bitrate=300",
        ])
        .args(["--kf-max-dist=30", "--lag-in-frames=0", "--quiet", "-o"])
        .arg(&ivf)
        .arg(&y4m)
        .output()
        .unwrap();
    assert!(
        enc.status.success(),
        "vpxenc: {}",
        String::from_utf8_lossy(&enc.stderr)
    );
    let (_, clip) = read_ivf(std::fs::File::open(&ivf).unwrap()).unwrap();

    // The server, with the SFU behind the compromised wrapper for "carol".
    let registry = prometheus::Registry::new();
    let (sfu, events) = conclave_sfu::Sfu::start(
        conclave_sfu::SfuConfig {
            workers: 2,
            ..conclave_sfu::SfuConfig::loopback()
        },
        conclave_sfu::SfuMetrics::new(&registry).unwrap(),
    )
    .unwrap();
    let sfu = Arc::new(sfu);
    let capture = sfu.capture_forwarded(200_000);
    let control = Arc::new(KeepsEvicted {
        inner: sfu.clone(),
        victim: Mutex::default(),
        kept: Mutex::default(),
        refused_closes: Mutex::default(),
    });
    let state = AppState::open(
        &format!("sqlite://{}/db.sqlite?mode=rwc", work.display()),
        Identity::generate(Principal::server("browser-test").unwrap()).unwrap(),
        CallConfig {
            batch_window: Duration::from_millis(100),
            ..CallConfig::default()
        },
        control.clone(),
        b"browser test secret browser test!",
        Duration::from_secs(900),
    )
    .await
    .unwrap();
    let mut ids = serde_json::Map::new();
    for (name, admin) in [
        ("alice", false),
        ("bob", false),
        ("carol", false),
        ("bot", false),
        ("rec", false),
        ("admin", true),
    ] {
        let hash = conclave_signaling::auth::hash_password(&format!("{name}-password")).unwrap();
        let u = state
            .db
            .create_user(
                &state.org_id,
                name,
                name,
                &hash,
                &state.default_group,
                admin,
            )
            .await
            .unwrap();
        ids.insert(name.into(), u.id.clone().into());
    }
    *control.victim.lock().unwrap() = format!("u:{}/", ids["carol"].as_str().unwrap());
    state.hub.attach_sfu_events(events);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = router_with_web(state.clone(), Some(&repo().join("client-sdk/web/dist/app")));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // The Rust bot publishes audio and video for the whole test.
    let bot_token = state
        .tokens
        .issue(ids["bot"].as_str().unwrap(), TokenKind::User, None);
    let bot = Connect {
        server: url.clone(),
        auth: Auth::Token(bot_token),
        call: "clinic".into(),
        device: "bot-dev".into(),
        loopback: true,
    };
    let bot_video = ivf.clone();
    let bot_task = tokio::spawn(async move {
        conclave_cli::publish(
            &bot,
            &Publish {
                audio: Some(wav),
                video: Some(bot_video),
                duration: Some(Duration::from_secs(300)),
                repeat: true,
            },
            |l| println!("bot: {l}"),
        )
        .await
    });

    // A second Rust participant records the call: the browsers must reach
    // the Rust SDK too (seen and heard).
    let rec = Connect {
        server: url.clone(),
        auth: Auth::Token(
            state
                .tokens
                .issue(ids["rec"].as_str().unwrap(), TokenKind::User, None),
        ),
        call: "clinic".into(),
        device: "rec-dev".into(),
        loopback: true,
    };
    let rec_dir = work.join("recording");
    let rec_task = tokio::spawn({
        let dir = rec_dir.clone();
        async move {
            conclave_cli::record(&rec, &dir, Duration::from_secs(40), |l| {
                println!("rec: {l}")
            })
            .await
        }
    });

    // The browsers.
    let config = serde_json::json!({
        "server": url,
        "call": "clinic",
        "browsers": ["alice", "bob", "carol"],
        "passwords": { "alice": "alice-password", "bob": "bob-password", "carol": "carol-password", "admin": "admin-password" },
        "ids": ids,
        "bot": format!("{}/bot-dev", ids["bot"].as_str().unwrap()),
        "victim": "carol",
        "fallback": "bob",
        "sameProfile": ["bob", "carol"],
        "artifacts": artifacts,
        "chromium": CHROMIUM,
    });
    let web = repo().join("client-sdk/web");
    let mut child = Command::new("node")
        .arg("test/browser/call.mjs")
        .current_dir(&web)
        .env("CONCLAVE_BROWSER_TEST", config.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node");
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            println!("browser: {line}");
            out.push(line);
        }
        out
    });
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let lines = lines.await.unwrap();
    bot_task.abort();
    let metrics = String::from_utf8(
        prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap()
            .into_bytes(),
    )
    .unwrap();
    for line in metrics.lines().filter(|l| {
        l.starts_with("conclave_sfu_drops_total")
            || l.starts_with("conclave_sfu_forwarded_total")
            || l.starts_with("conclave_sfu_pli_total")
            || l.starts_with("conclave_sfu_nack")
    }) {
        println!("sfu: {line}");
    }
    assert!(
        status.success(),
        "the browser driver failed (see its output above)"
    );
    assert!(
        lines.iter().any(|l| l.contains("\"event\":\"passed\"")),
        "the browser driver did not report success"
    );
    // The Rust recorder saw and heard every browser.
    let manifest = rec_task.await.unwrap().unwrap();
    let browsers: Vec<String> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "live")
        .filter_map(|v| v["member"].as_str().map(str::to_string))
        .collect();
    assert_eq!(browsers.len(), 3);
    for b in &browsers {
        let p = manifest
            .participants
            .iter()
            .find(|p| &p.participant == b)
            .unwrap_or_else(|| panic!("the Rust recorder got nothing from {b}"));
        println!(
            "rec: {b}: {} audio frames, {} video frames",
            p.audio_frames, p.video_frames
        );
        assert!(p.audio_frames >= 100, "heard {b}");
        assert!(p.video_frames >= 20, "saw {b}");
    }
    assert!(
        *control.refused_closes.lock().unwrap() >= 1,
        "the server ordered the evicted member's media closed"
    );

    // What the SFU forwarded: ciphertext only.
    let captured: Vec<CapturedPayload> = capture.try_iter().collect();
    let video: Vec<&CapturedPayload> = captured
        .iter()
        .filter(|c| c.source != Source::Audio)
        .collect();
    println!(
        "captured {} forwarded payloads ({} video)",
        captured.len(),
        video.len()
    );
    assert!(video.len() >= 500, "enough video was forwarded to judge");
    let mut bodies = Vec::new();
    let mut frame_starts = 0;
    for c in &video {
        // VP8 payload descriptor (RFC 7741 §4.2): the S bit marks a frame start.
        let p = &c.payload;
        let mut at = 1;
        if p[0] & 0x80 != 0 {
            let x = p[1];
            at = 2;
            if x & 0x80 != 0 {
                at += if p[at] & 0x80 != 0 { 2 } else { 1 };
            }
            if x & 0x40 != 0 {
                at += 1;
            }
            if x & 0x30 != 0 {
                at += 1;
            }
        }
        let start = p[0] & 0x10 != 0 && p[0] & 0x07 == 0;
        if start {
            frame_starts += 1;
            let vp8 = &p[at..];
            let prefix = if vp8[0] & 0x01 == 0 { 10 } else { 3 };
            let sframe = &vp8[prefix..];
            let h = sframe_header_len(sframe).expect("an SFrame header after the clear prefix");
            bodies.extend_from_slice(&sframe[h..]);
        } else {
            bodies.extend_from_slice(&p[at..]);
        }
    }
    let bits = entropy(&bodies);
    println!(
        "{frame_starts} frame starts; {} ciphertext bytes; entropy {bits:.4} bits/byte",
        bodies.len()
    );
    assert!(
        bits > 7.99,
        "forwarded video after the clear prefix is high-entropy: {bits}"
    );
    // The bot's plaintext never crosses the SFU: no 24-byte run of any frame
    // body (past the clear prefix) appears in what it forwarded.
    let mut runs = HashSet::new();
    for f in &clip {
        let body = f.data.get(16..).unwrap_or_default();
        for w in body.chunks_exact(24).take(8) {
            runs.insert(w.to_vec());
        }
    }
    let seen = video
        .iter()
        .filter(|c| c.payload.windows(24).any(|w| runs.contains(w)))
        .count();
    assert_eq!(seen, 0, "plaintext of the bot's frames appeared at the SFU");
    // Nor is it decodable: the frames of one publisher's camera, put back
    // together from what the SFU forwarded (clear prefix, SFrame header,
    // ciphertext), go through libvpx's decoder; it must refuse them or
    // produce something other than the original.
    let publisher = video
        .iter()
        .find(|c| c.source == Source::Camera && c.key_frame)
        .map(|c| c.publisher)
        .expect("a camera key frame was forwarded");
    let mut packets: Vec<&CapturedPayload> = video
        .iter()
        .copied()
        .filter(|c| c.publisher == publisher && c.source == Source::Camera)
        .collect();
    packets.sort_by_key(|c| c.sequence); // (a short capture: no wrap-around expected)
    let forwarded_ivf = work.join("forwarded.ivf");
    let mut w = IvfWriter::new(std::fs::File::create(&forwarded_ivf).unwrap(), 320, 240).unwrap();
    let (mut frame, mut frames, mut started) = (Vec::new(), 0u64, false);
    for c in packets {
        let p = &c.payload;
        let at = if p[0] & 0x80 != 0 {
            2 + usize::from(p[1] & 0x80 != 0) * if p[2] & 0x80 != 0 { 2 } else { 1 }
                + usize::from(p[1] & 0x40 != 0)
                + usize::from(p[1] & 0x30 != 0)
        } else {
            1
        };
        if p[0] & 0x10 != 0 {
            frame.clear();
            started = started || c.key_frame;
        }
        frame.extend_from_slice(&p[at..]);
        if c.marker && started {
            w.write(frames * 6000, &frame).unwrap();
            frames += 1;
        }
    }
    w.finish().unwrap();
    assert!(frames >= 10, "reassembled {frames} forwarded frames");
    let md5 = |path: &Path| {
        let o = Command::new("vpxdec")
            .args(["--md5", "--i420", "-o", "/dev/null"])
            .arg(path)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        )
    };
    let original = md5(&ivf);
    assert!(original.0, "the original clip decodes: {original:?}");
    let forwarded = md5(&forwarded_ivf);
    println!("vpxdec on {frames} forwarded frames: {forwarded:?}");
    assert!(
        !forwarded.0 || forwarded.1 != original.1,
        "the forwarded video decoded to the original picture"
    );
    sfu.shutdown();
}
