//! `conclave-client`: join a Conclave call from the command line and publish
//! a WAV file (encoded to Opus) and/or an IVF VP8 file; record every
//! received track, decrypted, into per-participant files with a manifest of
//! who spoke when; or print the call's verification codes.
//!
//! Everything goes through the Rust SDK: MLS runs on this device, frames
//! are SFrame-protected before they leave it, and the servers relay only
//! ciphertext.

pub mod formats;

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use conclave_client::media::{MediaConnection, MediaOptions, ReceivedFrame};
use conclave_client::session::{CallEvent, CallSession, JoinOptions};
use conclave_protocol::signal::MediaSource;
use serde::Serialize;

use crate::formats::{IvfWriter, OggOpusWriter};

/// How to reach and authenticate to the server.
#[derive(Clone, Debug)]
pub struct Connect {
    /// Server base URL, e.g. `http://127.0.0.1:8080`.
    pub server: String,
    /// How to authenticate.
    pub auth: Auth,
    /// The call to join.
    pub call: String,
    /// This device's id.
    pub device: String,
    /// Bind media to 127.0.0.1 only (local testing).
    pub loopback: bool,
}

/// Credentials.
#[derive(Clone, Debug)]
pub enum Auth {
    /// A session token from `/api/login`, `/api/token` or `/api/guest`.
    Token(String),
    /// A user's name and password.
    Password {
        /// Login name.
        username: String,
        /// Password.
        password: String,
    },
    /// A machine API key (id and base64 secret).
    ApiKey {
        /// Key id.
        key_id: String,
        /// Base64 secret.
        secret: String,
    },
}

fn ws_url(server: &str) -> anyhow::Result<String> {
    let base = server.trim_end_matches('/');
    if let Some(rest) = base.strip_prefix("http://") {
        Ok(format!("ws://{rest}/ws"))
    } else if let Some(rest) = base.strip_prefix("https://") {
        Ok(format!("wss://{rest}/ws"))
    } else {
        bail!("the server URL must start with http:// or https:// (got {server})")
    }
}

/// Obtains a session token.
pub async fn token(server: &str, auth: &Auth) -> anyhow::Result<String> {
    let base = server.trim_end_matches('/');
    let http = reqwest::Client::new();
    let (path, body) = match auth {
        Auth::Token(t) => return Ok(t.clone()),
        Auth::Password { username, password } => (
            "/api/login",
            serde_json::json!({"username": username, "password": password}),
        ),
        Auth::ApiKey { key_id, secret } => {
            use base64::Engine;
            use hmac::{Hmac, Mac};
            let secret = base64::engine::general_purpose::STANDARD
                .decode(secret.trim())
                .context("the API secret is not base64")?;
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&secret)
                .map_err(|_| anyhow!("unusable API secret"))?;
            mac.update(format!("{key_id}:{ts}").as_bytes());
            let sig: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (
                "/api/token",
                serde_json::json!({"key_id": key_id, "timestamp": ts, "signature": sig}),
            )
        }
    };
    let resp = http
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        let why = v["message"].as_str().unwrap_or("no reason given");
        bail!("sign-in refused ({status}): {why}");
    }
    v["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the server's answer has no token"))
}

/// Joins the call and waits until this device holds the group's keys.
pub async fn join_call(c: &Connect) -> anyhow::Result<CallSession> {
    let token = token(&c.server, &c.auth).await?;
    let mut call = CallSession::join(JoinOptions::new(
        &ws_url(&c.server)?,
        &token,
        &c.call,
        &c.device,
    ))
    .await
    .with_context(|| format!("joining call {}", c.call))?;
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            e = call.next_event() => match e {
                Some(CallEvent::Joined { .. }) => return Ok(call),
                Some(CallEvent::Error { message, .. }) => bail!("the server refused: {message}"),
                Some(CallEvent::Removed(r)) => bail!("removed from the call ({r:?})"),
                Some(_) => {}
                None => bail!("the server closed the session"),
            },
            () = &mut deadline => bail!("timed out waiting to enter the call's MLS group"),
        }
    }
}

fn media_options(c: &Connect, audio: bool, video: bool) -> MediaOptions {
    let base = if c.loopback {
        MediaOptions::loopback()
    } else {
        MediaOptions::default()
    };
    MediaOptions {
        publish_audio: audio,
        publish_camera: video,
        ..base
    }
}

/// What to publish.
#[derive(Clone, Debug, Default)]
pub struct Publish {
    /// A 16-bit PCM WAV file, encoded to Opus (20 ms frames).
    pub audio: Option<PathBuf>,
    /// A VP8 IVF file.
    pub video: Option<PathBuf>,
    /// Stop after this long (default: when the files end).
    pub duration: Option<Duration>,
    /// Start the files over when they end.
    pub repeat: bool,
}

/// RFC 6464 level (−dBov, 0–127) of a PCM frame.
pub fn audio_level(frame: &[i16]) -> u8 {
    if frame.is_empty() {
        return 127;
    }
    let mean_sq = frame
        .iter()
        .map(|&s| f64::from(s) * f64::from(s))
        .sum::<f64>()
        / frame.len() as f64;
    let rms = mean_sq.sqrt() / 32768.0;
    if rms <= 0.0 {
        return 127;
    }
    (-20.0 * rms.log10()).clamp(0.0, 127.0) as u8
}

/// Encodes mono 48 kHz PCM into 20 ms Opus frames, each with its level.
pub fn encode_opus(pcm: &[i16]) -> anyhow::Result<Vec<(Vec<u8>, u8)>> {
    let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio)
        .map_err(|e| anyhow!("Opus encoder: {e}"))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4000];
    for chunk in pcm.chunks(960) {
        let mut frame = chunk.to_vec();
        frame.resize(960, 0);
        let n = enc
            .encode(&frame, &mut buf)
            .map_err(|e| anyhow!("Opus encoding: {e}"))?;
        out.push((buf[..n].to_vec(), audio_level(&frame)));
    }
    Ok(out)
}

/// Joins and publishes files in real time. `progress` gets one line per
/// notable step, in words.
pub async fn publish(
    c: &Connect,
    p: &Publish,
    mut progress: impl FnMut(String),
) -> anyhow::Result<()> {
    if p.audio.is_none() && p.video.is_none() {
        bail!("nothing to publish: give --audio and/or --video");
    }
    let audio = match &p.audio {
        Some(path) => {
            let pcm = formats::read_wav(
                File::open(path).with_context(|| format!("opening {}", path.display()))?,
            )
            .with_context(|| format!("reading {}", path.display()))?;
            let frames = encode_opus(&pcm.to_mono_48k())?;
            progress(format!(
                "audio: {} ({} Hz, {} ch) → {} Opus frames",
                path.display(),
                pcm.rate,
                pcm.channels,
                frames.len()
            ));
            frames
        }
        None => Vec::new(),
    };
    let video = match &p.video {
        Some(path) => {
            let (h, frames) = formats::read_ivf(
                File::open(path).with_context(|| format!("opening {}", path.display()))?,
            )
            .with_context(|| format!("reading {}", path.display()))?;
            progress(format!(
                "video: {} ({}x{}, {} frames)",
                path.display(),
                h.width,
                h.height,
                frames.len()
            ));
            let (num, den) = (
                u64::from(h.timebase.0.max(1)),
                u64::from(h.timebase.1.max(1)),
            );
            frames
                .into_iter()
                .map(|f| (Duration::from_micros(f.pts * num * 1_000_000 / den), f.data))
                .collect::<Vec<_>>()
        }
        None => Vec::new(),
    };
    let mut call = join_call(c).await?;
    progress(format!(
        "joined {} as {}; epoch code {}",
        c.call,
        call.user_id(),
        call.epoch_code()?
    ));
    let media = MediaConnection::connect(
        &call,
        media_options(c, !audio.is_empty(), !video.is_empty()),
    )
    .await
    .context("connecting media to the SFU")?;
    progress("media connected; publishing".to_owned());

    let start = Instant::now();
    let audio_len = Duration::from_millis(20 * audio.len() as u64);
    let video_len = video
        .last()
        .map(|(t, _)| *t + Duration::from_millis(33))
        .unwrap_or_default();
    let file_len = audio_len.max(video_len);
    let end = p
        .duration
        .unwrap_or(if p.repeat { Duration::MAX } else { file_len });
    let (mut ai, mut vi) = (0usize, 0usize);
    let mut round = Duration::ZERO;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        let now = start.elapsed();
        if now >= end {
            break;
        }
        while let Some((frame, level)) = audio.get(ai) {
            if round + Duration::from_millis(20 * ai as u64) > now {
                break;
            }
            media.send_audio_frame(frame, *level).await?;
            ai += 1;
        }
        while let Some((t, frame)) = video.get(vi) {
            if round + *t > now {
                break;
            }
            let key = frame.first().is_some_and(|b| b & 1 == 0);
            media.send_video_frame(frame, key, round + *t).await?;
            vi += 1;
        }
        if ai >= audio.len() && vi >= video.len() {
            if !p.repeat || file_len.is_zero() {
                break;
            }
            round += file_len;
            ai = 0;
            vi = 0;
        }
        tokio::select! {
            _ = tick.tick() => {}
            e = call.next_event() => match e {
                Some(CallEvent::Removed(r)) => { progress(format!("removed from the call ({r:?})")); break }
                Some(CallEvent::EpochReady { epoch }) => progress(format!("keys rotated: epoch {epoch}, code {}", call.epoch_code()?)),
                Some(CallEvent::ActiveSpeaker { user_id, device_id }) => progress(format!("speaking: {user_id}/{device_id}")),
                Some(_) => {}
                None => { progress("the server ended the session".to_owned()); break }
            },
        }
    }
    let stats = media.stats();
    progress(format!(
        "done: {} audio and {} video frames sent",
        stats.audio_frames_sent, stats.video_frames_sent
    ));
    call.leave()?;
    media.close().await;
    Ok(())
}

/// One participant's recording.
#[derive(Debug, Serialize)]
pub struct ParticipantRecord {
    /// `user/device`.
    pub participant: String,
    /// Ogg Opus file, if audio arrived.
    pub audio_file: Option<String>,
    /// IVF files by source.
    pub video_files: Vec<String>,
    /// Audio frames written.
    pub audio_frames: u64,
    /// Video frames written.
    pub video_frames: u64,
    /// When they were heard: [start, end] in ms from the start of the recording.
    pub spoke: Vec<[u64; 2]>,
}

/// What `record` wrote.
#[derive(Debug, Serialize)]
pub struct Manifest {
    /// The call.
    pub call: String,
    /// Recording length, ms.
    pub duration_ms: u64,
    /// Per participant.
    pub participants: Vec<ParticipantRecord>,
    /// The SFU's dominant-speaker changes: (ms, user/device).
    pub active_speaker: Vec<(u64, String)>,
    /// Frames that failed to decrypt.
    pub decrypt_failures: u64,
}

struct Track {
    record: ParticipantRecord,
    audio: Option<OggOpusWriter<BufWriter<File>>>,
    video: HashMap<MediaSource, (IvfWriter<BufWriter<File>>, u32)>,
    last_audio_ms: Option<u64>,
}

fn file_name(participant: &str) -> String {
    participant
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Gap after which a new "spoke" interval starts.
const SPEECH_GAP_MS: u64 = 400;

fn write_frame(
    dir: &Path,
    tracks: &mut HashMap<String, Track>,
    f: &ReceivedFrame,
    at_ms: u64,
) -> anyhow::Result<()> {
    let who = sender_name(f);
    let track = tracks.entry(who.clone()).or_insert_with(|| Track {
        record: ParticipantRecord {
            participant: who.clone(),
            audio_file: None,
            video_files: Vec::new(),
            audio_frames: 0,
            video_frames: 0,
            spoke: Vec::new(),
        },
        audio: None,
        video: HashMap::new(),
        last_audio_ms: None,
    });
    match f.source {
        MediaSource::Audio => {
            if track.audio.is_none() {
                let name = format!("{}.opus", file_name(&who));
                let file = BufWriter::new(File::create(dir.join(&name))?);
                let serial = (tracks_hash(&who) & 0xffff_ffff) as u32;
                track.audio = Some(OggOpusWriter::new(file, serial, 1, "conclave-client")?);
                track.record.audio_file = Some(name);
            }
            let samples = opus::packet::get_nb_samples(&f.data, 48_000).unwrap_or(960) as u64;
            if let Some(w) = track.audio.as_mut() {
                w.write(&f.data, samples)?;
            }
            track.record.audio_frames += 1;
            match (track.record.spoke.last_mut(), track.last_audio_ms) {
                (Some(last), Some(prev)) if at_ms.saturating_sub(prev) <= SPEECH_GAP_MS => {
                    last[1] = at_ms + 20;
                }
                _ => track.record.spoke.push([at_ms, at_ms + 20]),
            }
            track.last_audio_ms = Some(at_ms);
        }
        source => {
            let (w, first) = match track.video.entry(source) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let kind = if source == MediaSource::Screen {
                        "screen"
                    } else {
                        "camera"
                    };
                    let name = format!("{}-{kind}.ivf", file_name(&who));
                    let file = BufWriter::new(File::create(dir.join(&name))?);
                    let (width, height) = vp8_size(&f.data).unwrap_or((0, 0));
                    track.record.video_files.push(name);
                    e.insert((IvfWriter::new(file, width, height)?, f.rtp_timestamp))
                }
            };
            w.write(u64::from(f.rtp_timestamp.wrapping_sub(*first)), &f.data)?;
            track.record.video_frames += 1;
        }
    }
    Ok(())
}

/// `user/device` for a member (how files and the manifest name people).
fn who(p: &conclave_client::Principal) -> String {
    match p {
        conclave_client::Principal::Member { user_id, device_id } => {
            format!("{user_id}/{device_id}")
        }
        conclave_client::Principal::Server { name } => format!("server {name}"),
    }
}

fn sender_name(f: &ReceivedFrame) -> String {
    f.sender
        .as_ref()
        .map(who)
        .unwrap_or_else(|| format!("leaf-{}", f.leaf))
}

fn tracks_hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// Width and height from a VP8 key frame header.
fn vp8_size(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.first()? & 1 != 0 || frame.get(3..6)? != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([*frame.get(6)?, *frame.get(7)?]) & 0x3fff;
    let h = u16::from_le_bytes([*frame.get(8)?, *frame.get(9)?]) & 0x3fff;
    Some((w, h))
}

/// Joins and records every received track, decrypted, into `dir` for
/// `duration` (or until removed): `<user>_<device>.opus` (Ogg Opus),
/// `<user>_<device>-camera.ivf` / `-screen.ivf`, and `manifest.json`.
pub async fn record(
    c: &Connect,
    dir: &Path,
    duration: Duration,
    mut progress: impl FnMut(String),
) -> anyhow::Result<Manifest> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut call = join_call(c).await?;
    progress(format!(
        "joined {} as {}; epoch code {}",
        c.call,
        call.user_id(),
        call.epoch_code()?
    ));
    let mut options = media_options(c, false, false);
    options.video_slots = 9;
    let media = MediaConnection::connect(&call, options)
        .await
        .context("connecting media to the SFU")?;
    progress(format!("recording into {}", dir.display()));
    let start = Instant::now();
    let mut tracks: HashMap<String, Track> = HashMap::new();
    let mut speakers = Vec::new();
    let deadline = tokio::time::sleep(duration);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            f = media.next_frame() => match f {
                Some(f) => {
                    let at = start.elapsed().as_millis() as u64;
                    let name = sender_name(&f);
                    let new = !tracks.contains_key(&name);
                    write_frame(dir, &mut tracks, &f, at)?;
                    if new {
                        progress(format!("receiving {:?} from {name}", f.source));
                    }
                }
                None => { progress("media connection closed".to_owned()); break }
            },
            e = call.next_event() => match e {
                Some(CallEvent::ActiveSpeaker { user_id, device_id }) => {
                    speakers.push((start.elapsed().as_millis() as u64, format!("{user_id}/{device_id}")));
                }
                Some(CallEvent::Removed(r)) => { progress(format!("removed from the call ({r:?})")); break }
                Some(_) => {}
                None => { progress("the server ended the session".to_owned()); break }
            },
            () = &mut deadline => break,
        }
    }
    let decrypt_failures = media.decrypt_failures();
    let _ = call.leave();
    media.close().await;
    let mut participants = Vec::new();
    for (_, t) in tracks {
        if let Some(w) = t.audio {
            w.finish()?;
        }
        for (_, (w, _)) in t.video {
            w.finish()?;
        }
        participants.push(t.record);
    }
    participants.sort_by(|a, b| a.participant.cmp(&b.participant));
    let manifest = Manifest {
        call: c.call.clone(),
        duration_ms: start.elapsed().as_millis() as u64,
        participants,
        active_speaker: speakers,
        decrypt_failures,
    };
    let json = serde_json::to_vec_pretty(&manifest)?;
    std::fs::write(dir.join("manifest.json"), json)?;
    progress(format!(
        "wrote {} participants' tracks and manifest.json",
        manifest.participants.len()
    ));
    Ok(manifest)
}

/// The call's verification codes, as this device sees them.
#[derive(Debug, Serialize)]
pub struct Verification {
    /// The epoch they are for.
    pub epoch: u64,
    /// The epoch code everyone in the call should see.
    pub epoch_code: String,
    /// Safety number with each other member: (user/device, number).
    pub safety_numbers: Vec<(String, String)>,
}

/// Joins, waits briefly for the roster, reads the codes and leaves.
pub async fn verify(c: &Connect) -> anyhow::Result<Verification> {
    let mut call = join_call(c).await?;
    let mut roster = Vec::new();
    let settle = tokio::time::sleep(Duration::from_millis(1500));
    tokio::pin!(settle);
    loop {
        tokio::select! {
            e = call.next_event() => match e {
                Some(CallEvent::Roster(m)) => roster = m,
                Some(_) => {}
                None => bail!("the server ended the session"),
            },
            () = &mut settle => break,
        }
    }
    let me = call.leaf_index();
    let mut safety_numbers = Vec::new();
    for m in &roster {
        let Some(leaf) = m.leaf else { continue };
        if Some(leaf) == me {
            continue;
        }
        safety_numbers.push((
            format!("{}/{}", m.user_id, m.device_id),
            call.safety_number_with(leaf)?,
        ));
    }
    let v = Verification {
        epoch: call.epoch().unwrap_or_default(),
        epoch_code: call.epoch_code()?,
        safety_numbers,
    };
    let _ = call.leave();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_urls() {
        assert_eq!(audio_level(&[0; 960]), 127);
        assert_eq!(audio_level(&[i16::MAX; 960]), 0);
        let half: Vec<i16> = vec![16384; 960];
        assert_eq!(audio_level(&half), 6);
        assert_eq!(
            ws_url("http://127.0.0.1:8080/").unwrap(),
            "ws://127.0.0.1:8080/ws"
        );
        assert_eq!(ws_url("https://c.example").unwrap(), "wss://c.example/ws");
        assert!(ws_url("127.0.0.1").is_err());
        assert_eq!(file_name("alice/laptop"), "alice_laptop");
        assert_eq!(
            vp8_size(&[0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01]),
            Some((640, 480))
        );
    }
}
