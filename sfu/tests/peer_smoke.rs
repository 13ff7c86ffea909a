//! Smoke test for the WebRTC test client in `support/peer.rs`: two `TestPeer`s connect to
//! each other directly over 127.0.0.1 (no SFU involved) and exchange raw RTP packets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "support/peer.rs"]
mod peer;

use std::time::Duration;

use anyhow::{Context as _, ensure};
use peer::{Kind, OPUS_PT, PeerSpec, TestPeer, VP8_PT};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

fn publisher_spec() -> PeerSpec {
    PeerSpec {
        publish_audio: true,
        publish_video: true,
        recv_audio_slots: 0,
        recv_video_slots: 0,
        simulcast: false,
        twcc: false,
    }
}

fn subscriber_spec() -> PeerSpec {
    PeerSpec {
        publish_audio: false,
        publish_video: false,
        recv_audio_slots: 1,
        recv_video_slots: 1,
        simulcast: false,
        twcc: false,
    }
}

/// Every candidate line must be a 127.0.0.1 host candidate.
fn assert_loopback_only(sdp: &str) -> anyhow::Result<()> {
    let candidates: Vec<&str> = sdp
        .lines()
        .filter(|l| l.starts_with("a=candidate"))
        .collect();
    ensure!(!candidates.is_empty(), "no candidates in SDP:\n{sdp}");
    for c in candidates {
        ensure!(
            c.contains(" 127.0.0.1 ") && c.contains("typ host"),
            "unexpected candidate {c}"
        );
    }
    Ok(())
}

async fn connect(offerer: &TestPeer, answerer: &TestPeer) -> anyhow::Result<()> {
    let offer = offerer.create_offer().await?;
    assert_loopback_only(&offer)?;
    let answer = answerer.accept_offer(offer).await?;
    assert_loopback_only(&answer)?;
    offerer.set_answer(answer).await?;
    offerer.wait_connected(CONNECT_TIMEOUT).await?;
    answerer.wait_connected(CONNECT_TIMEOUT).await?;
    Ok(())
}

/// Sends one audio and two video packets and checks they arrive byte-exact.
async fn exchange(publisher: &TestPeer, subscriber: &TestPeer) -> anyhow::Result<()> {
    let audio_payload = b"\x00sframe-audio\xff";
    publisher.send_audio(audio_payload, Some(42)).await?;
    let got = subscriber
        .recv(RECV_TIMEOUT)
        .await
        .context("no audio packet received")?;
    ensure!(got.kind == Kind::Audio, "{got:?}");
    ensure!(got.payload == audio_payload, "{got:?}");
    ensure!(got.ssrc == publisher.audio_ssrc(), "{got:?}");
    ensure!(got.payload_type == OPUS_PT, "{got:?}");
    ensure!(!got.mid.is_empty(), "mid not resolved: {got:?}");
    ensure!(got.audio_level == Some(42), "{got:?}");

    publisher.send_video(b"frame-1/part-1", false, 0).await?;
    publisher.send_video(b"frame-1/part-2", true, 3000).await?;
    let first = subscriber
        .recv(RECV_TIMEOUT)
        .await
        .context("no video packet received")?;
    let second = subscriber
        .recv(RECV_TIMEOUT)
        .await
        .context("second video packet not received")?;
    ensure!(first.kind == Kind::Video && second.kind == Kind::Video);
    ensure!(first.payload == b"frame-1/part-1", "{first:?}");
    ensure!(second.payload == b"frame-1/part-2", "{second:?}");
    ensure!(first.ssrc == publisher.video_ssrc(), "{first:?}");
    ensure!(first.payload_type == VP8_PT, "{first:?}");
    ensure!(!first.marker && second.marker);
    ensure!(first.timestamp == second.timestamp);
    ensure!(second.sequence_number == first.sequence_number.wrapping_add(1));
    ensure!(first.mid != got.mid, "audio and video share a mid");
    ensure!(first.audio_level.is_none());

    // RTCP goes out through a receiver; this only checks the call path works.
    subscriber.send_rtcp_pli(publisher.video_ssrc()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_offers_and_subscriber_receives() -> anyhow::Result<()> {
    let publisher = TestPeer::new(publisher_spec()).await?;
    let subscriber = TestPeer::new(subscriber_spec()).await?;
    connect(&publisher, &subscriber).await?;
    exchange(&publisher, &subscriber).await?;
    publisher.close().await;
    subscriber.close().await;
    Ok(())
}

/// The SFU-shaped direction: the peer with recvonly slots makes the offer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_offers_recvonly_slots_and_receives() -> anyhow::Result<()> {
    let publisher = TestPeer::new(publisher_spec()).await?;
    let subscriber = TestPeer::new(subscriber_spec()).await?;
    connect(&subscriber, &publisher).await?;
    exchange(&publisher, &subscriber).await?;
    publisher.close().await;
    subscriber.close().await;
    Ok(())
}
