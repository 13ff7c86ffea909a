//! Signaling drives the embedded SFU: a member's SDP offer gets the SFU's
//! answer over the WebSocket, non-members and bad offers get typed errors,
//! and leaving tears the media session down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use conclave_protocol::signal::{ClientEnvelope, ClientMessage, ErrorCode};
use conclave_signaling::CallConfig;
use support::{Cmd, spawn_member, start_with_sfu, wait_for};

/// A browser-shaped offer with `audio` and `video` receive slots.
fn offer(audio: usize, video: usize) -> String {
    let fingerprint = (0..32)
        .map(|i| format!("{:02X}", i * 7 % 256))
        .collect::<Vec<_>>()
        .join(":");
    let mids: Vec<String> = (0..audio + video).map(|i| i.to_string()).collect();
    let mut sdp = format!(
        "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
         a=group:BUNDLE {}\r\na=msid-semantic: WMS\r\n",
        mids.join(" ")
    );
    for (i, mid) in mids.iter().enumerate() {
        let is_audio = i < audio;
        let (kind, pt, rtpmap, ext) = if is_audio {
            (
                "audio",
                111,
                "opus/48000/2",
                "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
            )
        } else {
            (
                "video",
                96,
                "VP8/90000",
                "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
            )
        };
        sdp.push_str(&format!(
            "m={kind} 9 UDP/TLS/RTP/SAVPF {pt}\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n\
             a=ice-ufrag:Zx4k\r\na=ice-pwd:b7Qm2uVfWc9Lr3Hd8Ks1Np6T\r\na=ice-options:trickle\r\n\
             a=fingerprint:sha-256 {fingerprint}\r\na=setup:actpass\r\na=mid:{mid}\r\n\
             a=extmap:1 {ext}\r\na=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
             a=recvonly\r\na=rtcp-mux\r\na=rtpmap:{pt} {rtpmap}\r\n"
        ));
        if !is_audio {
            sdp.push_str("a=rtcp-fb:96 nack\r\na=rtcp-fb:96 nack pli\r\n");
        }
    }
    sdp
}

fn media_offer(id: u64, call: &str, sdp: String) -> Cmd {
    Cmd::Raw(ClientEnvelope::encode(
        Some(id),
        ClientMessage::MediaOffer {
            call_id: call.into(),
            sdp,
            sources: vec![],
        },
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_get_an_sfu_answer_and_leaving_closes_it() {
    let (server, sfu) = start_with_sfu(CallConfig::default()).await;
    let alice = spawn_member(&server, "alice", "clinic").await;
    assert!(wait_for(Duration::from_secs(10), || alice.status().epoch.is_some()).await);

    // An offer for a call Alice has not joined is refused and opens nothing.
    alice
        .cmd
        .send(media_offer(1, "elsewhere", offer(1, 1)))
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || {
            alice
                .status()
                .errors
                .iter()
                .any(|(c, _)| *c == ErrorCode::NotFound)
        })
        .await
    );
    // So is an offer that is not SDP.
    alice
        .cmd
        .send(media_offer(2, "clinic", "hello".into()))
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || {
            alice
                .status()
                .errors
                .iter()
                .any(|(c, _)| *c == ErrorCode::BadRequest)
        })
        .await
    );
    assert_eq!(sfu.session_count(), 0);

    // A real offer gets the SFU's answer, in reply to its request id.
    alice
        .cmd
        .send(media_offer(3, "clinic", offer(3, 2)))
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || !alice
            .status()
            .media_answers
            .is_empty())
        .await,
        "{:?}",
        alice.status().errors
    );
    let (id, sdp, audio_slots, video_slots) = alice.status().media_answers[0].clone();
    assert_eq!(id, Some(3));
    assert_eq!((audio_slots, video_slots), (3, 2));
    assert!(sdp.contains("a=ice-lite"), "{sdp}");
    assert!(
        sdp.contains(&format!("{}", sfu.local_addr().port())),
        "{sdp}"
    );
    assert!(sdp.contains("a=fingerprint:"), "{sdp}");
    assert_eq!(sfu.session_count(), 1);

    // A second offer replaces the first.
    alice
        .cmd
        .send(media_offer(4, "clinic", offer(1, 0)))
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || alice
            .status()
            .media_answers
            .len()
            == 2)
        .await
    );
    assert!(wait_for(Duration::from_secs(5), || sfu.session_count() == 1).await);

    // Leaving the call closes the media session.
    alice.cmd.send(Cmd::Leave).unwrap();
    assert!(wait_for(Duration::from_secs(5), || sfu.session_count() == 0).await);
    sfu.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_media_session_that_never_connects_is_reported_closed() {
    // The SFU reaps sessions that never connect; the client is told.
    let (sfu, events) = conclave_sfu::Sfu::start(
        conclave_sfu::SfuConfig {
            workers: 1,
            setup_timeout: Duration::from_millis(300),
            ..conclave_sfu::SfuConfig::loopback()
        },
        conclave_sfu::SfuMetrics::unregistered(),
    )
    .unwrap();
    let sfu = std::sync::Arc::new(sfu);
    let server =
        support::start_full(CallConfig::default(), &support::temp_db_url(), sfu.clone()).await;
    server.state.hub.attach_sfu_events(events);
    let bob = spawn_member(&server, "bob", "visit").await;
    assert!(wait_for(Duration::from_secs(10), || bob.status().epoch.is_some()).await);
    bob.cmd.send(media_offer(1, "visit", offer(1, 1))).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || !bob
            .status()
            .media_answers
            .is_empty())
        .await
    );
    assert!(
        wait_for(Duration::from_secs(5), || !bob
            .status()
            .media_closed
            .is_empty())
        .await
    );
    assert_eq!(sfu.session_count(), 0);
    sfu.shutdown();
}
