//! The SFU under bad input: garbage on the media port, bad offers,
//! sessions that never connect, and rate limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "support/peer.rs"]
mod peer;

use std::net::UdpSocket;
use std::time::Duration;

use conclave_sfu::{
    DownReason, PublishRights, SessionRequest, Sfu, SfuConfig, SfuControl, SfuError, SfuEvent,
    SfuMetrics,
};
use peer::{PeerSpec, TestPeer};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn request(offer: String) -> SessionRequest {
    SessionRequest {
        call_id: "c".into(),
        participant: "u:p/d".into(),
        offer_sdp: offer,
        rights: PublishRights::ALL,
        sources: vec![],
    }
}

fn dropped(m: &SfuMetrics) -> u64 {
    use prometheus::core::Collector;
    m.drops
        .collect()
        .iter()
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_media_port_is_dropped_and_counted() {
    let metrics = SfuMetrics::unregistered();
    let (sfu, _events) = Sfu::start(
        SfuConfig {
            workers: 2,
            ..SfuConfig::loopback()
        },
        metrics.clone(),
    )
    .expect("start");
    // A connected session, to show it is unaffected.
    sfu.epoch_changed("c", 1);
    let peer = TestPeer::new(PeerSpec {
        publish_audio: true,
        ..Default::default()
    })
    .await
    .expect("peer");
    let answer = sfu
        .create_session(request(peer.create_offer().await.expect("offer")))
        .await
        .expect("session");
    peer.set_answer(answer.answer_sdp).await.expect("answer");
    peer.wait_connected(Duration::from_secs(10))
        .await
        .expect("connected");

    let attacker = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let target = sfu.local_addr();
    // Every first-byte class the demultiplexer knows, with random bodies,
    // plus truncations and oversized datagrams.
    let mut runner = TestRunner::new(Config {
        cases: 2000,
        ..Config::default()
    });
    let counter = std::sync::atomic::AtomicU64::new(0);
    runner
        .run(
            &(
                prop_oneof![
                    Just(0u8),
                    Just(1),
                    Just(22),
                    Just(0x80),
                    Just(0x81),
                    any::<u8>()
                ],
                prop_oneof![Just(200u8), any::<u8>()],
                proptest::collection::vec(any::<u8>(), 0..1400),
            ),
            |(first, second, body)| {
                let mut d = vec![first, second];
                d.extend(body);
                attacker.send_to(&d, target).expect("send");
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            },
        )
        .expect("fuzz");
    let mut sent = counter.load(std::sync::atomic::Ordering::Relaxed);
    // Valid-looking STUN binding requests for sessions that do not exist.
    for i in 0..50u8 {
        let mut stun = vec![0x00, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
        stun.extend([i; 12]);
        stun.extend([0x00, 0x06, 0x00, 0x08]);
        stun.extend(b"nope:abc");
        attacker.send_to(&stun, target).expect("send");
        sent += 1;
    }
    // Everything was dropped and counted (the kernel may drop a few).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dropped(&metrics) < sent * 9 / 10 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        dropped(&metrics) >= sent * 9 / 10,
        "dropped {} of {sent}",
        dropped(&metrics)
    );
    // The session is still up and the SFU still serves new sessions.
    assert_eq!(sfu.session_count(), 1);
    let second = TestPeer::new(PeerSpec {
        recv_audio_slots: 1,
        ..Default::default()
    })
    .await
    .expect("peer");
    let answer = sfu
        .create_session(request(second.create_offer().await.expect("offer")))
        .await
        .expect("second session");
    second.set_answer(answer.answer_sdp).await.expect("answer");
    second
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("still serving");
    sfu.shutdown();
}

#[tokio::test]
async fn bad_offers_get_typed_errors() {
    let (sfu, _events) =
        Sfu::start(SfuConfig::loopback(), SfuMetrics::unregistered()).expect("start");
    for offer in [
        String::new(),
        "garbage".to_string(),
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n".to_string(),
        "v=0\r\n".repeat(20_000),
    ] {
        let err = sfu
            .create_session(request(offer))
            .await
            .expect_err("rejected");
        assert!(matches!(err, SfuError::BadOffer(_)), "{err:?}");
    }
    assert_eq!(sfu.session_count(), 0);
    sfu.shutdown();
}

#[tokio::test]
async fn sessions_that_never_connect_are_reaped() {
    let config = SfuConfig {
        setup_timeout: Duration::from_millis(500),
        ..SfuConfig::loopback()
    };
    let (sfu, mut events) = Sfu::start(config, SfuMetrics::unregistered()).expect("start");
    let peer = TestPeer::new(PeerSpec {
        publish_audio: true,
        ..Default::default()
    })
    .await
    .expect("peer");
    let answer = sfu
        .create_session(request(peer.create_offer().await.expect("offer")))
        .await
        .expect("session");
    // The client never applies the answer, so it never connects.
    let down = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.recv().await {
                Some(SfuEvent::SessionDown {
                    session, reason, ..
                }) => return (session, reason),
                Some(_) => continue,
                None => panic!("events closed"),
            }
        }
    })
    .await
    .expect("reaped");
    assert_eq!(down, (answer.session, DownReason::Timeout));
    assert_eq!(sfu.session_count(), 0);
    sfu.shutdown();
}

#[tokio::test]
async fn session_limit_is_enforced() {
    let config = SfuConfig {
        max_sessions: 1,
        ..SfuConfig::loopback()
    };
    let (sfu, _events) = Sfu::start(config, SfuMetrics::unregistered()).expect("start");
    let peer = TestPeer::new(PeerSpec {
        publish_audio: true,
        ..Default::default()
    })
    .await
    .expect("peer");
    let offer = peer.create_offer().await.expect("offer");
    sfu.create_session(request(offer.clone()))
        .await
        .expect("first");
    let err = sfu
        .create_session(request(offer))
        .await
        .expect_err("second refused");
    assert_eq!(err, SfuError::Full);
    sfu.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_disappears_is_reaped() {
    let config = SfuConfig {
        ice_timeout: Duration::from_secs(2),
        ..SfuConfig::loopback()
    };
    let (sfu, mut events) = Sfu::start(config, SfuMetrics::unregistered()).expect("start");
    let peer = TestPeer::new(PeerSpec {
        publish_audio: true,
        ..Default::default()
    })
    .await
    .expect("peer");
    let answer = sfu
        .create_session(request(peer.create_offer().await.expect("offer")))
        .await
        .expect("session");
    peer.set_answer(answer.answer_sdp).await.expect("answer");
    peer.wait_connected(Duration::from_secs(10))
        .await
        .expect("connected");
    // The peer goes away (its consent checks stop). Whether or not its
    // goodbye arrives, the session is gone within the ICE timeout.
    let gone = std::time::Instant::now();
    peer.close().await;
    let down = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match events.recv().await {
                Some(SfuEvent::SessionDown {
                    session, reason, ..
                }) => return (session, reason),
                Some(_) => continue,
                None => panic!("events closed"),
            }
        }
    })
    .await
    .expect("reaped");
    assert_eq!(down.0, answer.session);
    println!(
        "peer gone → session down after {:?} ({:?})",
        gone.elapsed(),
        down.1
    );
    assert_eq!(sfu.session_count(), 0);
    sfu.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_session_closes_alone() {
    let (sfu, mut events) = Sfu::start(
        SfuConfig {
            workers: 1,
            ..SfuConfig::loopback()
        },
        SfuMetrics::unregistered(),
    )
    .expect("start");
    sfu.epoch_changed("c", 1);
    let mut peers = Vec::new();
    let mut ids = Vec::new();
    for spec in [
        PeerSpec {
            publish_audio: true,
            ..Default::default()
        },
        PeerSpec {
            recv_audio_slots: 1,
            ..Default::default()
        },
    ] {
        let p = TestPeer::new(spec).await.expect("peer");
        let answer = sfu
            .create_session(request(p.create_offer().await.expect("offer")))
            .await
            .expect("session");
        p.set_answer(answer.answer_sdp).await.expect("answer");
        p.wait_connected(Duration::from_secs(10))
            .await
            .expect("connected");
        peers.push(p);
        ids.push(answer.session);
    }
    // The subscriber's state machine panics the next time it runs (its next
    // STUN consent check or timer).
    sfu.inject_fault(ids[1]);
    let down = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Some(SfuEvent::SessionDown {
                    session, reason, ..
                }) => return (session, reason),
                Some(_) => continue,
                None => panic!("events closed"),
            }
        }
    })
    .await
    .expect("faulty session closed");
    assert_eq!(down, (ids[1], DownReason::Fault));
    // The worker and the other session carry on.
    assert_eq!(sfu.session_count(), 1);
    let late = TestPeer::new(PeerSpec {
        recv_audio_slots: 1,
        ..Default::default()
    })
    .await
    .expect("peer");
    let answer = sfu
        .create_session(request(late.create_offer().await.expect("offer")))
        .await
        .expect("the worker still serves");
    late.set_answer(answer.answer_sdp).await.expect("answer");
    late.wait_connected(Duration::from_secs(10))
        .await
        .expect("connected after the fault");
    sfu.shutdown();
}
