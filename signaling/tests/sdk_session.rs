//! The Rust SDK's call session against a real server: two devices join,
//! agree on keys and verification codes, exchange encrypted frames, and one
//! leaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::until;

use std::time::Duration;

use conclave_client::session::{CallEvent, CallSession, JoinOptions};
use conclave_client::stream;
use conclave_protocol::sframe::Codec;
use conclave_protocol::signal::RemovalReason;
use conclave_signaling::CallConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sdk_sessions_share_keys_and_frames() {
    let server = support::start(CallConfig {
        batch_window: Duration::from_millis(50),
        ..CallConfig::default()
    })
    .await;
    let url = format!("ws://{}/ws", server.addr);
    let mut alice = CallSession::join(JoinOptions::new(
        &url,
        &server.token("alice").await,
        "sync",
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
        "sync",
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
    assert_eq!(alice.epoch_code().unwrap(), bob.epoch_code().unwrap());
    assert_eq!(
        alice.safety_number_with(bob.leaf_index().unwrap()).unwrap(),
        bob.safety_number_with(alice.leaf_index().unwrap()).unwrap()
    );

    // A VP8 key frame from Alice, decrypted by Bob.
    let mut frame = vec![0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];
    frame.extend(std::iter::repeat_n(0x42, 1000));
    let mut ct = vec![0u8; frame.len() + 64];
    let n = alice
        .encrypt(stream::CAMERA, Codec::Vp8, &frame, &mut ct)
        .unwrap();
    let mut pt = vec![0u8; n];
    let d = bob.decrypt(Codec::Vp8, &ct[..n], &mut pt).unwrap();
    assert_eq!(&pt[..d.len], &frame[..]);
    assert_eq!(d.leaf, alice.leaf_index().unwrap());

    // Bob leaves; Alice rekeys alone and Bob can no longer read her frames.
    bob.leave().unwrap();
    until(&mut bob, |e| {
        matches!(e, CallEvent::Removed(RemovalReason::Left))
    })
    .await;
    until(&mut alice, |e| {
        matches!(e, CallEvent::EpochReady { epoch: 2 })
    })
    .await;
    let n = alice
        .encrypt(stream::AUDIO, Codec::Opus, b"after bob left", &mut ct)
        .unwrap();
    assert!(bob.decrypt(Codec::Opus, &ct[..n], &mut pt).is_err());
}
