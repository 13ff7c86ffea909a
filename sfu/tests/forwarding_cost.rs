//! Whole-process measurement of the forwarding cost: CPU time of the SFU's
//! worker threads (from /proc schedstat, nanosecond resolution) per
//! forwarded packet, including SRTP and the send system calls, with real
//! webrtc-rs subscribers on loopback.
//!
//! Ignored by default (a measurement, not a check):
//! `CONCLAVE_FWD_N=100 cargo test --release -p conclave-sfu --test forwarding_cost -- --ignored --nocapture`
//!
//! `CONCLAVE_FWD_FRAME_PACKETS=k` makes each video frame k packets sent
//! back to back (default 1); `CONCLAVE_FWD_GSO=0` turns UDP GSO off.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "support/peer.rs"]
mod peer;

use std::time::{Duration, Instant};

use conclave_protocol::sframe::{CipherSuite, Codec, FrameEncryptor, FrameKey, KidLayout};
use conclave_sfu::{PublishRights, SessionRequest, Sfu, SfuConfig, SfuControl, SfuMetrics};
use peer::{PeerSpec, TestPeer};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU nanoseconds used so far by the threads whose name starts with `prefix`.
fn thread_cpu_ns(prefix: &str) -> u64 {
    let mut total = 0;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.trim().starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly"]
async fn cpu_per_forwarded_packet() {
    let n = env_usize("CONCLAVE_FWD_N", 50);
    let packets = env_usize("CONCLAVE_FWD_PACKETS", 2000);
    let workers = env_usize("CONCLAVE_FWD_WORKERS", 1);
    let congestion_control = env_usize("CONCLAVE_FWD_CC", 0) == 1;
    let frame_packets = env_usize("CONCLAVE_FWD_FRAME_PACKETS", 1).max(1);
    let udp_gso = env_usize("CONCLAVE_FWD_GSO", 1) == 1;
    let metrics = SfuMetrics::unregistered();
    let (sfu, _events) = Sfu::start(
        SfuConfig {
            workers,
            congestion_control,
            udp_gso,
            ..SfuConfig::loopback()
        },
        metrics.clone(),
    )
    .expect("start");
    sfu.epoch_changed("bench", 1);
    let mut peers = Vec::new();
    for i in 0..=n {
        let spec = if i == 0 {
            PeerSpec {
                publish_audio: true,
                publish_video: true,
                ..Default::default()
            }
        } else {
            PeerSpec {
                recv_audio_slots: 1,
                recv_video_slots: 1,
                ..Default::default()
            }
        };
        let p = TestPeer::new(spec).await.expect("peer");
        let answer = sfu
            .create_session(SessionRequest {
                call_id: "bench".into(),
                participant: format!("u:p{i}/d"),
                offer_sdp: p.create_offer().await.expect("offer"),
                rights: PublishRights::ALL,
                sources: vec![],
            })
            .await
            .expect("session");
        p.set_answer(answer.answer_sdp).await.expect("answer");
        peers.push(p);
    }
    for p in &peers {
        p.wait_connected(Duration::from_secs(30))
            .await
            .expect("connected");
    }
    let layout = KidLayout::default();
    let key = |stream| {
        FrameKey::derive(
            CipherSuite::default(),
            layout.kid(1, 8, 1, stream).expect("kid"),
            &[1u8; 32],
        )
        .expect("key")
    };
    let mut audio = FrameEncryptor::new(key(0));
    let mut video = FrameEncryptor::new(key(1));
    let mut buf = vec![0u8; 1000 * frame_packets + 400];
    let publisher = &peers[0];
    // Prime the video slots with a key frame, then measure.
    let mut key_frame = vec![0x50u8, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xf0, 0x00];
    key_frame.extend([0u8; 1000]);
    let len = video
        .encrypt(Codec::Vp8, &key_frame, &mut buf)
        .expect("encrypt");
    let mut payload = vec![0x10];
    payload.extend(&buf[..len]);
    publisher
        .send_video(&payload, true, 3000)
        .await
        .expect("video");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for p in &peers[1..] {
        p.drain().await;
    }

    let fwd = |m: &SfuMetrics| {
        m.forwarded.with_label_values(&["audio"]).get()
            + m.forwarded.with_label_values(&["video"]).get()
    };
    let cpu0 = thread_cpu_ns("sfu-worker");
    let fwd0 = fwd(&metrics);
    let in0 = metrics.packets_in.get();
    let out0 = metrics.packets_out.get();
    let started = Instant::now();
    let mut delta = vec![0x31u8, 0x02, 0x00];
    delta.extend(std::iter::repeat_n(7u8, 1000 * frame_packets));
    for i in 0..packets {
        if i % 2 == 0 {
            let len = audio
                .encrypt(Codec::Opus, &[0xfc; 80], &mut buf)
                .expect("encrypt");
            publisher
                .send_audio(&buf[..len], Some(30))
                .await
                .expect("audio");
        } else {
            let len = video
                .encrypt(Codec::Vp8, &delta, &mut buf)
                .expect("encrypt");
            let parts: Vec<&[u8]> = buf[..len].chunks(len.div_ceil(frame_packets)).collect();
            for (j, part) in parts.iter().enumerate() {
                let mut payload = vec![if j == 0 { 0x10 } else { 0x00 }];
                payload.extend(*part);
                let last = j + 1 == parts.len();
                publisher
                    .send_video(&payload, last, if last { 3000 } else { 0 })
                    .await
                    .expect("video");
            }
        }
        if i % 4 == 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Let the SFU finish.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let cpu = thread_cpu_ns("sfu-worker") - cpu0;
    let forwarded = fwd(&metrics) - fwd0;
    let inbound = metrics.packets_in.get() - in0;
    let outbound = metrics.packets_out.get() - out0;
    let elapsed = started.elapsed();
    let mut received = 0;
    for p in &peers[1..] {
        received += p.drain().await;
    }
    let expected = packets / 2 * (1 + frame_packets);
    let per_fwd = cpu as f64 / 1000.0 / forwarded.max(1) as f64;
    println!(
        "N={n} workers={workers} cc={congestion_control} gso={udp_gso} frame={frame_packets}: {packets} sends, \
         {forwarded} forwarded ({:.1}% of {}), {received} received by subscribers, \
         datagrams in {inbound} out {outbound}; SFU worker CPU {:.1} ms \
         over {:.2} s => {per_fwd:.2} µs per forwarded packet, {:.0} forwarded packets/s per core",
        100.0 * forwarded as f64 / (expected * n) as f64,
        expected * n,
        cpu as f64 / 1e6,
        elapsed.as_secs_f64(),
        1e6 / per_fwd,
    );
    assert!(forwarded > 0);
    sfu.shutdown();
}
