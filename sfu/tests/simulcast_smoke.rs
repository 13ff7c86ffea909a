//! Smoke test for VP8 simulcast publishing in the WebRTC test client (`support/peer.rs`):
//! a simulcast `TestPeer` offers one video m-line with three rid layers (`q`, `h`, `f`) to
//! a receiving `TestPeer` over 127.0.0.1 (no SFU involved) and every layer's packets
//! arrive with their own SSRC, sequence numbers, timestamps and rid extension.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "support/peer.rs"]
mod peer;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use peer::{Kind, MID_URI, PeerSpec, RID_URI, Received, SIMULCAST_RIDS, TestPeer, VP8_PT};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// 30 fps at 90 kHz.
const FRAME_STEP: u32 = 3000;

fn simulcast_publisher() -> PeerSpec {
    PeerSpec {
        publish_audio: true,
        publish_video: true,
        simulcast: true,
        ..Default::default()
    }
}

/// The receiver also sets `simulcast`: that is what registers the rid extension, without
/// which the answer drops it and the layers cannot be told apart.
fn simulcast_receiver() -> PeerSpec {
    PeerSpec {
        recv_audio_slots: 1,
        recv_video_slots: 1,
        simulcast: true,
        ..Default::default()
    }
}

/// The lines of the first `m=video` section.
fn video_section(sdp: &str) -> Vec<&str> {
    media_section(sdp, "m=video")
}

/// The lines of the first media section whose `m=` line starts with `prefix`.
fn media_section<'a>(sdp: &'a str, prefix: &str) -> Vec<&'a str> {
    sdp.lines()
        .skip_while(|l| !l.starts_with(prefix))
        .enumerate()
        .take_while(|(i, l)| *i == 0 || !l.starts_with("m="))
        .map(|(_, l)| l.trim_end())
        .collect()
}

fn has_extmap(section: &[&str], uri: &str) -> bool {
    section
        .iter()
        .any(|l| l.starts_with("a=extmap:") && l.ends_with(&format!(" {uri}")))
}

async fn connect(offerer: &TestPeer, answerer: &TestPeer) -> anyhow::Result<(String, String)> {
    let offer = offerer.create_offer().await?;
    let answer = answerer.accept_offer(offer.clone()).await?;
    offerer.set_answer(answer.clone()).await?;
    offerer.wait_connected(CONNECT_TIMEOUT).await?;
    answerer.wait_connected(CONNECT_TIMEOUT).await?;
    Ok((offer, answer))
}

async fn collect(peer: &TestPeer, want: usize) -> anyhow::Result<Vec<Received>> {
    let mut got = Vec::with_capacity(want);
    while got.len() < want {
        let packet = peer
            .recv(RECV_TIMEOUT)
            .await
            .with_context(|| format!("only {} of {want} packets arrived: {got:?}", got.len()))?;
        got.push(packet);
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_layers_arrive_with_rid_and_own_ssrc() -> anyhow::Result<()> {
    let publisher = TestPeer::new(simulcast_publisher()).await?;
    let receiver = TestPeer::new(simulcast_receiver()).await?;

    let ssrcs: Vec<u32> = (0..3).map(|l| publisher.video_layer_ssrc(l)).collect();
    ensure!(
        ssrcs.iter().all(|s| *s != 0),
        "missing layer SSRC: {ssrcs:?}"
    );
    ensure!(ssrcs.iter().collect::<HashSet<_>>().len() == 3, "{ssrcs:?}");
    ensure!(publisher.video_ssrc() == ssrcs[0]);
    ensure!(publisher.video_layer_ssrc(3) == 0);

    let (offer, answer) = connect(&publisher, &receiver).await?;

    // Chrome-shaped offer: one video m-line, one rid per layer, simulcast send list in
    // layer order, mid + rid extensions, and no a=ssrc lines for the layers.
    ensure!(
        offer.lines().filter(|l| l.starts_with("m=video")).count() == 1,
        "{offer}"
    );
    let section = video_section(&offer);
    for rid in SIMULCAST_RIDS {
        ensure!(
            section.contains(&format!("a=rid:{rid} send").as_str()),
            "no rid {rid} in offer:\n{offer}"
        );
    }
    ensure!(
        section.contains(&"a=simulcast:send q;h;f"),
        "offer:\n{offer}"
    );
    ensure!(section.contains(&"a=sendonly"), "offer:\n{offer}");
    ensure!(has_extmap(&section, MID_URI), "offer:\n{offer}");
    ensure!(has_extmap(&section, RID_URI), "offer:\n{offer}");
    ensure!(
        !section.iter().any(|l| l.starts_with("a=ssrc")),
        "offer:\n{offer}"
    );

    let answer_section = video_section(&answer);
    for rid in SIMULCAST_RIDS {
        ensure!(
            answer_section.contains(&format!("a=rid:{rid} recv").as_str()),
            "no rid {rid} in answer:\n{answer}"
        );
    }
    ensure!(
        answer_section.contains(&"a=simulcast:recv q;h;f"),
        "answer:\n{answer}"
    );
    ensure!(has_extmap(&answer_section, RID_URI), "answer:\n{answer}");
    // The rid extension is registered for video only.
    let audio_section = media_section(&offer, "m=audio");
    ensure!(!audio_section.is_empty(), "offer:\n{offer}");
    ensure!(!has_extmap(&audio_section, RID_URI), "offer:\n{offer}");

    // Audio next to simulcast video is untouched.
    publisher.send_audio(b"audio/0", Some(30)).await?;
    let audio = receiver
        .recv(RECV_TIMEOUT)
        .await
        .context("no audio packet")?;
    ensure!(audio.kind == Kind::Audio, "{audio:?}");
    ensure!(audio.ssrc == publisher.audio_ssrc(), "{audio:?}");
    ensure!(!ssrcs.contains(&audio.ssrc), "{audio:?}");
    ensure!(
        audio.rid.is_none() && audio.audio_level == Some(30),
        "{audio:?}"
    );

    // Two frames of two packets per layer, layers interleaved; each layer's timestamp and
    // sequence number advance on their own.
    const FRAMES: usize = 2;
    for frame in 0..FRAMES {
        for (layer, rid) in SIMULCAST_RIDS.iter().enumerate() {
            for part in 0..2 {
                let payload = format!("{rid}/{frame}/{part}");
                let last = part == 1;
                publisher
                    .send_video_layer(
                        layer,
                        payload.as_bytes(),
                        last,
                        if last { FRAME_STEP } else { 0 },
                    )
                    .await?;
            }
        }
    }
    ensure!(
        publisher.send_video_layer(3, b"x", true, 0).await.is_err(),
        "layer 3 must not exist"
    );

    let got = collect(&receiver, FRAMES * 2 * SIMULCAST_RIDS.len()).await?;
    let mut per_layer: HashMap<String, Vec<Received>> = HashMap::new();
    for packet in got {
        ensure!(packet.kind == Kind::Video, "{packet:?}");
        ensure!(packet.payload_type == VP8_PT, "{packet:?}");
        let rid = packet
            .rid
            .clone()
            .with_context(|| format!("no rid extension: {packet:?}"))?;
        let layer = SIMULCAST_RIDS
            .iter()
            .position(|r| *r == rid)
            .with_context(|| format!("unknown rid: {packet:?}"))?;
        ensure!(packet.ssrc == ssrcs[layer], "rid/SSRC mismatch: {packet:?}");
        ensure!(
            packet.payload.starts_with(format!("{rid}/").as_bytes()),
            "payload on the wrong layer: {packet:?}"
        );
        per_layer.entry(rid).or_default().push(packet);
    }
    ensure!(per_layer.len() == 3, "layers seen: {:?}", per_layer.keys());

    let mids: HashSet<&str> = per_layer
        .values()
        .flatten()
        .map(|p| p.mid.as_str())
        .collect();
    ensure!(
        mids.len() == 1 && !mids.contains("") && !mids.contains(audio.mid.as_str()),
        "all layers share one resolved video mid: {mids:?} (audio {:?})",
        audio.mid
    );

    for (rid, mut packets) in per_layer {
        packets.sort_by_key(|p| p.payload.clone());
        let payloads: Vec<String> = packets
            .iter()
            .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
            .collect();
        let expected: Vec<String> = (0..FRAMES)
            .flat_map(|f| (0..2).map(move |p| (f, p)))
            .map(|(f, p)| format!("{rid}/{f}/{p}"))
            .collect();
        ensure!(payloads == expected, "{rid}: {payloads:?}");
        for pair in packets.windows(2) {
            ensure!(
                pair[1].sequence_number == pair[0].sequence_number.wrapping_add(1),
                "{rid}: sequence numbers not consecutive: {pair:?}"
            );
        }
        for frame in packets.chunks(2) {
            ensure!(frame[0].timestamp == frame[1].timestamp, "{rid}: {frame:?}");
            ensure!(!frame[0].marker && frame[1].marker, "{rid}: {frame:?}");
        }
        ensure!(
            packets[2].timestamp == packets[0].timestamp.wrapping_add(FRAME_STEP),
            "{rid}: timestamp step"
        );
    }

    // RTCP to one layer goes out through the (single) remote track.
    receiver.send_rtcp_pli(ssrcs[2]).await?;

    publisher.close().await;
    receiver.close().await;
    Ok(())
}

/// Without `simulcast` nothing changes: one SSRC, no rid lines, no rid extension, and the
/// received packets carry no rid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_simulcast_video_is_a_single_stream() -> anyhow::Result<()> {
    let publisher = TestPeer::new(PeerSpec {
        publish_video: true,
        ..Default::default()
    })
    .await?;
    let receiver = TestPeer::new(PeerSpec {
        recv_video_slots: 1,
        ..Default::default()
    })
    .await?;
    ensure!(publisher.video_ssrc() != 0);
    ensure!(publisher.video_layer_ssrc(0) == publisher.video_ssrc());
    ensure!(publisher.video_layer_ssrc(1) == 0);

    let (offer, _answer) = connect(&publisher, &receiver).await?;
    let section = video_section(&offer);
    ensure!(
        !section
            .iter()
            .any(|l| l.starts_with("a=rid") || l.starts_with("a=simulcast")),
        "{offer}"
    );
    ensure!(!has_extmap(&section, RID_URI), "{offer}");
    ensure!(
        section
            .iter()
            .any(|l| l.starts_with(&format!("a=ssrc:{} ", publisher.video_ssrc()))),
        "{offer}"
    );

    publisher.send_video(b"frame/0", true, FRAME_STEP).await?;
    ensure!(publisher.send_video_layer(1, b"x", true, 0).await.is_err());
    let got = receiver
        .recv(RECV_TIMEOUT)
        .await
        .context("no video packet")?;
    ensure!(got.ssrc == publisher.video_ssrc(), "{got:?}");
    ensure!(got.payload == b"frame/0" && got.rid.is_none(), "{got:?}");

    publisher.close().await;
    receiver.close().await;
    Ok(())
}

/// Gotcha: a receiver that does not register the rid extension answers without it; the
/// simulcast sender then refuses to send rather than emit layers nobody can tell apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_without_rid_extension_is_refused() -> anyhow::Result<()> {
    let publisher = TestPeer::new(simulcast_publisher()).await?;
    let receiver = TestPeer::new(PeerSpec {
        recv_video_slots: 1,
        ..Default::default()
    })
    .await?;
    let (_offer, answer) = connect(&publisher, &receiver).await?;
    ensure!(
        !has_extmap(&video_section(&answer), RID_URI),
        "answer:\n{answer}"
    );
    let err = publisher
        .send_video_layer(0, b"q/0/0", true, FRAME_STEP)
        .await
        .err()
        .context("sending without a negotiated rid extension must fail")?;
    ensure!(
        format!("{err:#}").contains("rtp-stream-id"),
        "unexpected error: {err:#}"
    );
    publisher.close().await;
    receiver.close().await;
    Ok(())
}
