//! `clinic-2` for a few seconds against a real server process: both
//! participants join through signaling and MLS, connect over WebRTC, and
//! every frame each receives decrypts (but for the few the first member
//! protected in the epoch before the second joined, counted apart).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use conclave_loadtest::run::{RunOptions, Target, run};
use conclave_loadtest::scenario::Scenario;
use conclave_loadtest::server::{Server, find_server_binary};

/// The `conclave` binary of this target directory; built if missing
/// (`cargo test --workspace` builds it already).
fn server_binary() -> PathBuf {
    if let Some(p) = find_server_binary() {
        return p;
    }
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "-p", "conclave-signaling", "--bin", "conclave"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .expect("running cargo build for the server");
    assert!(status.success(), "building the conclave server failed");
    find_server_binary().expect("the conclave binary after building it")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clinic_visit_media_is_received_and_decrypted() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios/clinic-2.toml");
    let mut scenario = Scenario::load(&path).expect("clinic-2 loads");
    scenario.duration_s = 4.0;
    let mut server = Server::start(&server_binary(), Some(1))
        .await
        .expect("server starts");
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        run(
            Target::Conclave(&mut server),
            RunOptions {
                scenario,
                bitrate_scale: 1.0,
                decrypt_every: 1,
                progress: false,
                media_ip: [127, 0, 0, 1].into(),
                // The server is already running: only this process yields.
                generator_nice: 1,
                generator_idle: false,
                socket_recv_buffer: 1 << 20,
                pace_factor: conclave_loadtest::pacer::DEFAULT_FACTOR,
            },
        ),
    )
    .await
    .expect("the run finishes within 60 s")
    .expect("the run succeeds");
    server.stop();

    assert_eq!(result.generator_nice, 1);
    assert_eq!(
        thread_niceness(),
        [1],
        "every thread of the load generator yields"
    );
    assert_eq!(result.join.attempted, 2);
    assert_eq!(result.join.completed, 2, "errors: {:?}", result.join.errors);
    let m = &result.media;
    assert_eq!(m.connections_connected, 2);
    // Each side sends 50 audio and 30 camera frames a second; over four
    // seconds both must have received and opened a good share of them.
    assert!(
        m.frames_decrypted > 200,
        "only {} frames decrypted",
        m.frames_decrypted
    );
    // Every complete frame was opened (no sampling) ...
    assert_eq!(m.frames_not_decrypted, 0);
    assert_eq!(m.frames_received, m.frames_decrypted + m.decrypt_failures);
    // ... and none failed, except frames the first member protected in
    // epoch 0 while the second was joining into epoch 1: MLS gives a new
    // member no keys of earlier epochs, and senders switch keys only at
    // `epoch_ready`. Those are counted apart and stay a handful.
    assert_eq!(
        m.decrypt_failures, m.decrypt_failures_before_join,
        "failures other than frames sent before the receiver joined: {m:?}"
    );
    assert!(
        m.decrypt_failures_before_join * 20 < m.frames_decrypted,
        "{m:?}"
    );
    assert_eq!(m.frames_foreign, 0);
    assert!(m.latency_audio_ms.count > 0 && m.latency_video_ms.count > 0);
    assert!(result.server.forwarded_per_s > 0.0);
}

/// The distinct niceness values of this process's threads (field 19 of
/// /proc/self/task/TID/stat).
fn thread_niceness() -> Vec<i64> {
    let mut values: Vec<i64> = std::fs::read_dir("/proc/self/task")
        .expect("threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .filter_map(|stat| {
            // After ") ": state is field 3, so niceness (19) is the 17th.
            let rest = &stat[stat.rfind(") ")? + 2..];
            rest.split_whitespace().nth(16)?.parse().ok()
        })
        .collect();
    values.sort_unstable();
    values.dedup();
    values
}
