//! The Rust SDK's media over WebRTC, end to end: two SDK sessions in one
//! call through the real signaling server and the real SFU on 127.0.0.1.
//! Alice publishes SFrame-protected Opus and VP8; Bob receives, reassembles,
//! decrypts and attributes every frame, and the SFU never sees plaintext.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::until;

use std::sync::Arc;
use std::time::Duration;

use conclave_client::Principal;
use conclave_client::media::{MediaConnection, MediaOptions, ReceivedFrame};
use conclave_client::session::{CallEvent, CallSession, JoinOptions};
use conclave_protocol::signal::MediaSource;
use conclave_signaling::CallConfig;

/// An Opus-shaped frame (TOC byte, then bytes that name the frame).
fn opus_frame(i: usize) -> Vec<u8> {
    let mut f = vec![0xfc, (i >> 8) as u8, i as u8];
    f.extend((0..60).map(|j| (i * 31 + j) as u8));
    f
}

/// A VP8 frame: a valid key-frame header (tag, start code, 640x480) or a
/// delta-frame tag, then `len` bytes that name the frame.
fn vp8_frame(i: usize, key: bool, len: usize) -> Vec<u8> {
    let mut f = if key {
        vec![0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01]
    } else {
        vec![0x31, 0x02, 0x00]
    };
    f.extend((0..len).map(|j| (i * 7 + j * 13) as u8));
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_participants_exchange_encrypted_media_through_the_sfu() {
    // The SFU of `support::start_with_sfu`, with a handle on its metrics.
    let metrics = conclave_sfu::SfuMetrics::unregistered();
    let (sfu, sfu_events) = conclave_sfu::Sfu::start(
        conclave_sfu::SfuConfig {
            workers: 1,
            ..conclave_sfu::SfuConfig::loopback()
        },
        metrics.clone(),
    )
    .unwrap();
    let sfu = Arc::new(sfu);
    let server = support::start_full(
        CallConfig {
            batch_window: Duration::from_millis(50),
            ..CallConfig::default()
        },
        &support::temp_db_url(),
        sfu.clone(),
    )
    .await;
    server.state.hub.attach_sfu_events(sfu_events);
    let url = format!("ws://{}/ws", server.addr);

    let mut alice = CallSession::join(JoinOptions::new(
        &url,
        &server.token("alice").await,
        "studio",
        "laptop",
    ))
    .await
    .unwrap();
    until(&mut alice, |e| {
        matches!(e, CallEvent::EpochReady { epoch: 0 })
    })
    .await;
    let mut bob = CallSession::join(JoinOptions::new(
        &url,
        &server.token("bob").await,
        "studio",
        "phone",
    ))
    .await
    .unwrap();
    until(&mut bob, |e| {
        matches!(e, CallEvent::EpochReady { epoch: 1 })
    })
    .await;
    until(&mut alice, |e| {
        matches!(e, CallEvent::EpochReady { epoch: 1 })
    })
    .await;

    // Bob only listens; Alice publishes her microphone and camera.
    let bob_media = MediaConnection::connect(
        &bob,
        MediaOptions {
            publish_audio: false,
            publish_camera: false,
            ..MediaOptions::loopback()
        },
    )
    .await
    .unwrap();
    assert_eq!(bob_media.audio_slots(), 3);
    assert_eq!(bob_media.video_slots(), 2);
    let alice_media = MediaConnection::connect(
        &alice,
        MediaOptions {
            audio_slots: 1,
            video_slots: 1,
            ..MediaOptions::loopback()
        },
    )
    .await
    .unwrap();
    assert!(alice_media.is_connected() && bob_media.is_connected());
    // A fresh connection starts with a key frame.
    assert!(alice_media.needs_key_frame());

    // 50 audio frames (20 ms each, sent faster) and a video frame every
    // fifth: key frames of 3,000 bytes (three packets) whenever one is
    // wanted, 1,500-byte delta frames (two packets) otherwise.
    const AUDIO_FRAMES: usize = 50;
    let mut sent_video = Vec::new();
    for i in 0..AUDIO_FRAMES {
        alice_media
            .send_audio_frame(&opus_frame(i), 20)
            .await
            .unwrap();
        if i % 5 == 0 {
            let key = alice_media.needs_key_frame();
            let frame = vp8_frame(i, key, if key { 3000 } else { 1500 });
            alice_media
                .send_video_frame(&frame, key, Duration::from_millis(20 * i as u64))
                .await
                .unwrap();
            sent_video.push(frame);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let alice_principal = Principal::member(&server.user("alice").await, "laptop").unwrap();
    let alice_leaf = alice.leaf_index().unwrap();
    let mut audio: Vec<ReceivedFrame> = Vec::new();
    let mut video: Vec<ReceivedFrame> = Vec::new();
    while audio.len() < AUDIO_FRAMES {
        let Some(f) = bob_media.next_frame_timeout(Duration::from_secs(5)).await else {
            break;
        };
        if f.source == MediaSource::Audio {
            audio.push(f);
        } else {
            video.push(f);
        }
    }
    // Video still in flight after the last audio frame.
    while let Some(f) = bob_media
        .next_frame_timeout(Duration::from_millis(500))
        .await
    {
        assert_eq!(f.source, MediaSource::Camera);
        video.push(f);
    }

    // Every audio frame, in order, byte for byte, from Alice.
    assert_eq!(
        audio.len(),
        AUDIO_FRAMES,
        "stats {:?}; SFU drops {}",
        bob_media.stats(),
        drop_summary(&metrics)
    );
    for (i, f) in audio.iter().enumerate() {
        assert_eq!(f.data, opus_frame(i), "audio frame {i}");
        assert_eq!(f.leaf, alice_leaf);
        assert_eq!(f.sender.as_ref(), Some(&alice_principal));
        assert_eq!(f.epoch, 1);
        assert!(!f.key_frame);
        assert!(f.slot.is_some_and(|s| s < 3), "slot {:?}", f.slot);
    }
    for w in audio.windows(2) {
        assert_eq!(w[1].rtp_timestamp.wrapping_sub(w[0].rtp_timestamp), 960);
    }

    // Video: multi-packet frames reassemble to exactly what was sent,
    // starting with a key frame.
    assert!(!video.is_empty(), "no video; stats {:?}", bob_media.stats());
    assert!(video[0].key_frame);
    assert!(video[0].data.len() > 2 * conclave_client::media::vp8::MAX_RTP_PAYLOAD);
    for f in &video {
        assert!(sent_video.contains(&f.data), "unexpected video frame");
        assert_eq!(f.sender.as_ref(), Some(&alice_principal));
        assert!(f.slot.is_some_and(|s| s < 2), "slot {:?}", f.slot);
    }
    let first = sent_video.iter().position(|v| *v == video[0].data).unwrap();
    assert_eq!(
        video.len(),
        sent_video.len() - first,
        "every video frame after the first forwarded key frame"
    );

    let stats = bob_media.stats();
    assert_eq!(bob_media.decrypt_failures(), 0);
    assert_eq!(stats.frames_lost, 0);
    assert_eq!(stats.frames_dropped, 0);
    assert_eq!(alice_media.stats().audio_frames_sent, AUDIO_FRAMES as u64);

    // The SFU only ever saw SFrame frames of a live epoch.
    for reason in ["not_sframe", "truncated_frame", "stale_epoch"] {
        assert_eq!(
            metrics.drops.with_label_values(&[reason]).get(),
            0,
            "{reason}: {}",
            drop_summary(&metrics)
        );
    }
    assert!(metrics.forwarded.with_label_values(&["audio"]).get() >= AUDIO_FRAMES as u64);

    // The roster tells everyone what Alice publishes.
    until(&mut bob, |e| {
        matches!(e, CallEvent::Roster(members) if members.iter().any(|m| {
            m.device_id == "laptop"
                && m.publishing.contains(&MediaSource::Audio)
                && m.publishing.contains(&MediaSource::Camera)
        }))
    })
    .await;

    // Carol joins: at the new epoch Alice's session switches sending keys and
    // the media connection wants a key frame, which Bob reads under the new
    // epoch's keys through the same slot.
    let mut carol = CallSession::join(JoinOptions::new(
        &url,
        &server.token("carol").await,
        "studio",
        "tablet",
    ))
    .await
    .unwrap();
    for call in [&mut carol, &mut bob, &mut alice] {
        until(call, |e| matches!(e, CallEvent::EpochReady { epoch: 2 })).await;
    }
    assert!(alice_media.needs_key_frame());
    let key = vp8_frame(99, true, 2500);
    alice_media
        .send_video_frame(&key, true, Duration::from_secs(2))
        .await
        .unwrap();
    let frame = loop {
        let f = bob_media
            .next_frame_timeout(Duration::from_secs(5))
            .await
            .expect("the new epoch's key frame");
        if f.epoch == 2 {
            break f;
        }
    };
    assert_eq!(frame.data, key);
    assert!(frame.key_frame);
    assert_eq!(frame.sender.as_ref(), Some(&alice_principal));
    assert_eq!(bob_media.decrypt_failures(), 0);

    // Closing Alice's connection ends it; Bob's frames stop.
    alice_media.close().await;
    assert!(!alice_media.is_connected());
    assert!(
        tokio::time::timeout(Duration::from_secs(5), alice_media.next_frame())
            .await
            .expect("next_frame returns once closed")
            .is_none()
    );
    assert!(
        alice_media
            .send_audio_frame(&opus_frame(0), 20)
            .await
            .is_err()
    );
    drop(bob_media);
    sfu.shutdown();
}

fn drop_summary(m: &conclave_sfu::SfuMetrics) -> String {
    use prometheus::core::Collector;
    let mut out = String::new();
    for family in m.drops.collect() {
        for metric in family.get_metric() {
            for label in metric.get_label() {
                out.push_str(&format!(
                    "{}={} ",
                    label.value(),
                    metric.get_counter().get_value()
                ));
            }
        }
    }
    out
}
