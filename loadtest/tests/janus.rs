//! `clinic-2` for a few seconds against Janus VideoRoom, started by the load
//! test inside the side-by-side's network namespace: both participants
//! publish, subscribe to each other through Janus, and every frame each
//! receives authenticates and decrypts. This is the path the Janus column of
//! the side-by-side report takes.
//!
//! It needs root (for the namespace) and the Debian package `janus`. Where
//! either is missing it says so and passes, unless `CONCLAVE_REQUIRE_JANUS`
//! is set (CI sets it, after installing Janus), in which case it fails.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn janus_available() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("not root: no network namespace".into());
    }
    if !std::path::Path::new("/usr/bin/janus").is_file() {
        return Err("/usr/bin/janus is missing (apt-get install -y janus)".into());
    }
    Ok(())
}

#[test]
fn clinic_visit_through_janus_is_received_and_decrypted() {
    if let Err(why) = janus_available() {
        assert!(
            std::env::var_os("CONCLAVE_REQUIRE_JANUS").is_none(),
            "CONCLAVE_REQUIRE_JANUS is set but {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let results = std::env::temp_dir().join(format!("conclave-janus-test-{}", std::process::id()));
    let out = Command::new(root.join("side-by-side"))
        .arg(root.join("scenarios/clinic-2.toml"))
        .args(["--duration", "4", "--quiet", "--results"])
        .arg(&results)
        .env(
            "CONCLAVE_LOADTEST_BIN",
            env!("CARGO_BIN_EXE_conclave-loadtest"),
        )
        .env("LOADTEST_TARGET", "janus")
        .output()
        .expect("running loadtest/side-by-side");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "side-by-side failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = std::fs::read_dir(&results)
        .expect("results directory")
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("clinic-2-"))
        .expect("a clinic-2 result")
        .path();
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("result.json")).expect("result.json"))
            .expect("result.json parses");
    let _ = std::fs::remove_dir_all(&results);

    assert_eq!(r["target"], "janus");
    assert_eq!(r["join"]["attempted"], 2, "{stdout}");
    assert_eq!(r["join"]["completed"], 2, "errors: {}", r["join"]["errors"]);
    let m = &r["media"];
    // Each participant has a publishing and a subscribing connection.
    assert_eq!(m["connections_connected"], 4, "{m}");
    // 50 audio and 30 camera frames a second each way, for four seconds.
    let decrypted = m["frames_decrypted"].as_u64().unwrap();
    assert!(decrypted > 200, "only {decrypted} frames decrypted: {m}");
    assert_eq!(m["decrypt_failures"], 0, "{m}");
    assert_eq!(m["frames_foreign"], 0, "{m}");
    assert!(m["latency_audio_ms"]["count"].as_u64().unwrap() > 0, "{m}");
    assert!(m["latency_video_ms"]["count"].as_u64().unwrap() > 0, "{m}");
    // Janus's CPU was sampled from /proc.
    assert!(r["server"]["rss_mib_max"].as_f64().unwrap() > 0.0);
}
