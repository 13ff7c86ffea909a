//! Audio through the whole path: one CLI participant publishes a 440 Hz
//! tone from a WAV file (encoded to Opus, SFrame-protected, through the real
//! server and SFU on 127.0.0.1); another records the call. The recording's
//! Ogg Opus file decodes to a tone whose dominant frequency is 440 ± 5 Hz,
//! and the manifest says who spoke when.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use conclave_cli::formats::{Pcm, read_ogg_opus, write_wav};
use conclave_cli::{Auth, Connect, Publish};
use conclave_client::{Identity, Principal};
use conclave_signaling::auth::TokenKind;
use conclave_signaling::{AppState, CallConfig, router};

async fn server() -> (String, AppState, Arc<conclave_sfu::Sfu>) {
    let (sfu, events) = conclave_sfu::Sfu::start(
        conclave_sfu::SfuConfig {
            workers: 1,
            ..conclave_sfu::SfuConfig::loopback()
        },
        conclave_sfu::SfuMetrics::unregistered(),
    )
    .unwrap();
    let sfu = Arc::new(sfu);
    let dir = std::env::temp_dir().join(format!("conclave-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = AppState::open(
        &format!("sqlite://{}/db.sqlite?mode=rwc", dir.display()),
        Identity::generate(Principal::server("cli-test").unwrap()).unwrap(),
        CallConfig {
            batch_window: Duration::from_millis(50),
            ..CallConfig::default()
        },
        sfu.clone(),
        b"cli test secret cli test secret!!",
        Duration::from_secs(600),
    )
    .await
    .unwrap();
    state.hub.attach_sfu_events(events);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, state, sfu)
}

async fn token(state: &AppState, name: &str) -> String {
    let hash = conclave_signaling::auth::hash_password("irrelevant-password").unwrap();
    let u = state
        .db
        .create_user(
            &state.org_id,
            name,
            name,
            &hash,
            &state.default_group,
            false,
        )
        .await
        .unwrap();
    state
        .tokens
        .issue_versioned(&u.id, TokenKind::User, None, u.token_version)
}

/// Power of `freq` in `x` (Goertzel).
fn power(x: &[f32], freq: f32, rate: f32) -> f32 {
    let w = 2.0 * std::f32::consts::PI * freq / rate;
    let c = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f32, 0.0f32);
    for &v in x {
        let s = v + c * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    s1 * s1 + s2 * s2 - c * s1 * s2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_tone_keeps_its_pitch() {
    let (url, state, sfu) = server().await;
    let work = std::env::temp_dir().join(format!("conclave-tone-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();

    // 4 s of a 440 Hz tone at −6 dBFS, 48 kHz mono.
    let samples: Vec<i16> = (0..48_000 * 4)
        .map(|i| {
            let t = i as f32 / 48_000.0;
            (16_000.0 * (2.0 * std::f32::consts::PI * 440.0 * t).sin()) as i16
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

    let connect = |name: &str, token: String| Connect {
        server: url.clone(),
        auth: Auth::Token(token),
        call: "tone".into(),
        device: format!("{name}-dev"),
        loopback: true,
    };
    let recorder = connect("recorder", token(&state, "recorder").await);
    let speaker = connect("speaker", token(&state, "speaker").await);
    let out = work.join("recording");
    let rec = tokio::spawn({
        let out = out.clone();
        async move {
            conclave_cli::record(&recorder, &out, Duration::from_secs(9), |l| {
                println!("recorder: {l}")
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    conclave_cli::publish(
        &speaker,
        &Publish {
            audio: Some(wav),
            ..Publish::default()
        },
        |l| println!("speaker: {l}"),
    )
    .await
    .unwrap();
    let manifest = rec.await.unwrap().unwrap();

    println!("{}", serde_json::to_string_pretty(&manifest).unwrap());
    assert_eq!(manifest.decrypt_failures, 0);
    let speaker_name = format!("{}/speaker-dev", speaker_id(&state).await);
    let p = manifest
        .participants
        .iter()
        .find(|p| p.participant == speaker_name)
        .expect("the speaker was recorded");
    assert!(
        p.audio_frames >= 150,
        "most of 200 frames: {}",
        p.audio_frames
    );
    assert!(!p.spoke.is_empty());
    let span = p.spoke[0][1] - p.spoke[0][0];
    assert!(span >= 3000, "spoke for about 4 s: {:?}", p.spoke);

    // Decode the Ogg Opus recording and find its pitch.
    let file = out.join(p.audio_file.as_ref().unwrap());
    let packets = read_ogg_opus(std::fs::File::open(file).unwrap()).unwrap();
    let mut dec = opus_decoder();
    let mut pcm = Vec::new();
    let mut buf = vec![0i16; 5760];
    for pkt in &packets {
        let n = dec.decode(pkt, &mut buf, false).unwrap();
        pcm.extend(buf[..n].iter().map(|&s| f32::from(s) / 32768.0));
    }
    assert!(pcm.len() >= 48_000 * 2, "{} samples", pcm.len());
    let window = &pcm[pcm.len() / 2 - 24_000..pcm.len() / 2 + 24_000];
    let peak = (200..1000)
        .map(|f| (f, power(window, f as f32, 48_000.0)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(f, _)| f)
        .unwrap();
    println!("dominant frequency of the recording: {peak} Hz");
    assert!((435..=445).contains(&peak), "440 ± 5 Hz, got {peak} Hz");
    sfu.shutdown();
}

async fn speaker_id(state: &AppState) -> String {
    state
        .db
        .user_by_username("speaker")
        .await
        .unwrap()
        .unwrap()
        .id
}

fn opus_decoder() -> opus::Decoder {
    opus::Decoder::new(48_000, opus::Channels::Mono).unwrap()
}
