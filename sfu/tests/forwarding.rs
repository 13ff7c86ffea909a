//! The SFU end to end: real webrtc-rs peers on 127.0.0.1 connect through
//! ICE-lite, DTLS and SRTP to a running SFU and exchange SFrame-protected
//! frames through it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "support/peer.rs"]
mod peer;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conclave_protocol::sframe::{CipherSuite, Codec, FrameEncryptor, FrameKey, KidLayout};
use conclave_sfu::{
    PublishRights, SessionRequest, Sfu, SfuConfig, SfuControl, SfuEvent, SfuMetrics, Source,
};
use peer::{Kind, PeerSpec, TestPeer};
use tokio::sync::mpsc::UnboundedReceiver;

const CALL: &str = "call-1";
const EPOCH: u64 = 3;
const WAIT: Duration = Duration::from_secs(10);

struct Harness {
    sfu: Arc<Sfu>,
    events: UnboundedReceiver<SfuEvent>,
    metrics: SfuMetrics,
}

fn start(config: SfuConfig) -> Harness {
    let metrics = SfuMetrics::unregistered();
    let (sfu, events) = Sfu::start(config, metrics.clone()).expect("SFU starts");
    Harness {
        sfu: Arc::new(sfu),
        events,
        metrics,
    }
}

/// One worker, with the call's epoch live.
fn start_one_worker() -> Harness {
    let h = start(SfuConfig {
        workers: 1,
        ..SfuConfig::loopback()
    });
    h.sfu.epoch_changed(CALL, EPOCH);
    h
}

async fn join(h: &Harness, name: &str, spec: PeerSpec) -> (TestPeer, u64) {
    let peer = TestPeer::new(spec).await.expect("peer");
    let offer = peer.create_offer().await.expect("offer");
    let answer = h
        .sfu
        .create_session(SessionRequest {
            call_id: CALL.into(),
            participant: name.into(),
            offer_sdp: offer,
            rights: PublishRights::ALL,
            sources: vec![],
        })
        .await
        .expect("session");
    peer.set_answer(answer.answer_sdp).await.expect("answer");
    if let Err(e) = peer.wait_connected(WAIT).await {
        panic!(
            "{name} did not connect: {e}; drops: {}",
            drop_summary(&h.metrics)
        );
    }
    (peer, answer.session)
}

/// Joins `n` receive-only participants (`u:sub{i}/d`) with these slots.
async fn join_subscribers(h: &Harness, n: usize, audio: usize, video: usize) -> Vec<TestPeer> {
    let mut subscribers = Vec::new();
    for i in 0..n {
        let spec = PeerSpec {
            recv_audio_slots: audio,
            recv_video_slots: video,
            ..Default::default()
        };
        subscribers.push(join(h, &format!("u:sub{i}/d"), spec).await.0);
    }
    subscribers
}

/// An SFrame sender for one participant (leaf) and stream.
struct Sender {
    enc: FrameEncryptor,
}

impl Sender {
    fn new(epoch: u64, leaf: u32, stream: u32) -> Self {
        let layout = KidLayout::default();
        let kid = layout.kid(epoch, 8, leaf, u64::from(stream)).expect("kid");
        let key = FrameKey::derive(CipherSuite::default(), kid, &[7u8; 32]).expect("key");
        Self {
            enc: FrameEncryptor::new(key),
        }
    }

    fn protect(&mut self, codec: Codec, frame: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; frame.len() + 64];
        let n = self.enc.encrypt(codec, frame, &mut out).expect("encrypt");
        out.truncate(n);
        out
    }

    fn opus(&mut self, i: u8) -> Vec<u8> {
        self.protect(Codec::Opus, &[0xfc, i, i, i, i, i])
    }

    /// One RTP payload carrying a whole VP8 frame: the payload descriptor
    /// (start of partition 0) and the protected frame.
    fn vp8(&mut self, key: bool, i: u8) -> Vec<u8> {
        let mut frame = if key {
            vec![0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xf0, 0x00]
        } else {
            vec![0x31, 0x02, 0x00]
        };
        frame.extend(std::iter::repeat_n(i, 40));
        let mut payload = vec![0x10];
        payload.extend(self.protect(Codec::Vp8, &frame));
        payload
    }
}

async fn collect(peer: &TestPeer, want: usize) -> Vec<peer::Received> {
    let mut got = Vec::new();
    while got.len() < want {
        match peer.recv(Duration::from_secs(3)).await {
            Some(r) => got.push(r),
            None => break,
        }
    }
    got
}

fn drop_summary(m: &SfuMetrics) -> String {
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

fn dropped(m: &SfuMetrics, reason: &str) -> u64 {
    m.drops.with_label_values(&[reason]).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_many_subscribers_every_packet_arrives() {
    let config = SfuConfig {
        workers: 2,
        // Six subscribers: send each packet's copies from two threads.
        parallel_send_from: Some(4),
        ..SfuConfig::loopback()
    };
    let mut h = start(config);
    h.sfu.epoch_changed(CALL, EPOCH);

    let (publisher, pub_id) = join(
        &h,
        "u:alice/laptop",
        PeerSpec {
            publish_audio: true,
            publish_video: true,
            ..Default::default()
        },
    )
    .await;
    const N: usize = 6;
    let subscribers = join_subscribers(&h, N, 3, 2).await;

    let mut audio = Sender::new(EPOCH, 1, 0);
    let mut video = Sender::new(EPOCH, 1, 1);
    // Prime: the first video frame must be a key frame for a slot to open;
    // the SFU also asks for one when the slot is assigned.
    const FRAMES: usize = 40;
    let mut sent_audio = Vec::new();
    let mut sent_video = Vec::new();
    for i in 0..FRAMES {
        let a = audio.opus(i as u8);
        publisher.send_audio(&a, Some(30)).await.expect("audio");
        sent_audio.push(a);
        let v = video.vp8(i == 0, i as u8);
        publisher.send_video(&v, true, 3000).await.expect("video");
        sent_video.push(v);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    for (i, sub) in subscribers.iter().enumerate() {
        let got = collect(sub, 2 * FRAMES).await;
        let audio_in: Vec<_> = got.iter().filter(|r| r.kind == Kind::Audio).collect();
        let video_in: Vec<_> = got.iter().filter(|r| r.kind == Kind::Video).collect();
        assert_eq!(audio_in.len(), FRAMES, "subscriber {i}: every audio packet");
        assert_eq!(video_in.len(), FRAMES, "subscriber {i}: every video packet");
        // Bytes are forwarded untouched, in order, with continuous numbering.
        for (r, s) in audio_in.iter().zip(&sent_audio) {
            assert_eq!(&r.payload, s);
        }
        for (r, s) in video_in.iter().zip(&sent_video) {
            assert_eq!(&r.payload, s);
        }
        for w in video_in.windows(2) {
            assert_eq!(w[1].sequence_number, w[0].sequence_number.wrapping_add(1));
            assert_eq!(w[1].timestamp.wrapping_sub(w[0].timestamp), 3000);
        }
        // SSRCs are the SFU's slot SSRCs, not the publisher's.
        assert_ne!(audio_in[0].ssrc, publisher.audio_ssrc());
        assert_ne!(video_in[0].ssrc, publisher.video_ssrc());
    }
    assert_eq!(
        h.metrics.forwarded.with_label_values(&["audio"]).get(),
        (N * FRAMES) as u64
    );
    // Each of the publisher's packets had its time in the SFU measured once
    // (two workers: some reached the other worker's socket and were handed
    // over, with their arrival time).
    let transit = |kind: &str| {
        h.metrics
            .transit_seconds
            .with_label_values(&[kind])
            .get_sample_count()
    };
    assert_eq!(transit("audio"), FRAMES as u64);
    assert_eq!(transit("video"), FRAMES as u64);
    // Every session negotiated SRTP with AES-GCM.
    assert_eq!(
        h.metrics
            .srtp_profiles
            .with_label_values(&["SRTP_AEAD_AES_128_GCM"])
            .get(),
        (N + 1) as u64,
        "{}",
        drop_summary(&h.metrics)
    );

    // Events: everyone came up, and the publisher's tracks were announced.
    let mut up = HashSet::new();
    let mut published = HashSet::new();
    while let Ok(e) = h.events.try_recv() {
        match e {
            SfuEvent::SessionUp { session, .. } => {
                up.insert(session);
            }
            SfuEvent::TrackPublished {
                session, source, ..
            } => {
                assert_eq!(session, pub_id);
                published.insert(source);
            }
            _ => {}
        }
    }
    assert_eq!(up.len(), N + 1);
    assert_eq!(published, HashSet::from([Source::Audio, Source::Camera]));

    // Closing a session is reported.
    h.sfu.close_session(pub_id);
    let down = tokio::time::timeout(WAIT, async {
        while let Some(e) = h.events.recv().await {
            if let SfuEvent::SessionDown { session, .. } = e {
                return session;
            }
        }
        0
    })
    .await
    .expect("down event");
    assert_eq!(down, pub_id);
    h.sfu.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_multi_packet_frames_arrive_whole_and_in_order() {
    // A video frame's packets reach each subscriber as one run; with UDP GSO
    // the SFU hands such a run to the kernel as one message, which must
    // come out as the same datagrams, in the same order.
    let config = SfuConfig {
        workers: 1,
        parallel_send_from: Some(2),
        ..SfuConfig::loopback()
    };
    let h = start(config);
    h.sfu.epoch_changed(CALL, EPOCH);
    let (publisher, _) = join(
        &h,
        "u:alice/laptop",
        PeerSpec {
            publish_video: true,
            ..Default::default()
        },
    )
    .await;
    const N: usize = 4;
    let subscribers = join_subscribers(&h, N, 0, 1).await;
    let mut video = Sender::new(EPOCH, 1, 1);
    const FRAMES: usize = 8;
    const PER_FRAME: usize = 4;
    let mut sent = Vec::new();
    for f in 0..FRAMES {
        let mut frame = if f == 0 {
            vec![0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xf0, 0x00]
        } else {
            vec![0x31, 0x02, 0x00]
        };
        frame.extend(std::iter::repeat_n(f as u8, 3000));
        let protected = video.protect(Codec::Vp8, &frame);
        // Three full packets and a shorter last one, sent back to back.
        let chunk = protected.len().div_ceil(PER_FRAME);
        let parts: Vec<&[u8]> = protected.chunks(chunk).collect();
        for (i, part) in parts.iter().enumerate() {
            let mut payload = vec![if i == 0 { 0x10 } else { 0x00 }];
            payload.extend_from_slice(part);
            let last = i + 1 == parts.len();
            // The timestamp advances after the packet: at the frame's end.
            let step = if last { 3000 } else { 0 };
            publisher
                .send_video(&payload, last, step)
                .await
                .expect("video");
            sent.push(payload);
        }
        // The first frame opens the slots; wait for them before the burst.
        if f == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    for (i, sub) in subscribers.iter().enumerate() {
        let got = collect(sub, sent.len()).await;
        let payloads: Vec<&Vec<u8>> = got.iter().map(|r| &r.payload).collect();
        assert_eq!(
            payloads,
            sent.iter().collect::<Vec<_>>(),
            "subscriber {i}: every packet, whole and in order ({})",
            drop_summary(&h.metrics)
        );
        for w in got.windows(2) {
            assert_eq!(w[1].sequence_number, w[0].sequence_number.wrapping_add(1));
        }
    }
    let forwarded = h.metrics.forwarded.with_label_values(&["video"]).get();
    assert_eq!(forwarded, (N * sent.len()) as u64);
    println!(
        "{} of {forwarded} forwarded packets went out in UDP GSO sends",
        h.metrics.gso_datagrams.get()
    );
    h.sfu.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_packet_is_sent_again_when_the_subscriber_nacks_it() {
    // Three shapes of interceptor chain: a subscriber that sends nothing
    // (no NACK generator or receiver reports), the same with congestion
    // control (a pacer between the send cache and the wire), and one that
    // also publishes (the full chain). Each loses one video packet on the
    // way out and must get it back, byte for byte, by NACKing it.
    let h = start_one_worker();
    let (publisher, _) = join(
        &h,
        "u:alice/laptop",
        PeerSpec {
            publish_video: true,
            ..Default::default()
        },
    )
    .await;
    let video_slot = PeerSpec {
        recv_video_slots: 1,
        ..Default::default()
    };
    let specs = [
        video_slot,
        PeerSpec {
            twcc: true,
            ..video_slot
        },
        PeerSpec {
            publish_audio: true,
            ..video_slot
        },
    ];
    let mut subscribers = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        subscribers.push(join(&h, &format!("u:sub{i}/d"), spec).await);
    }
    let mut video = Sender::new(EPOCH, 1, 1);
    let mut frames = 0usize;
    let mut send = async |n: usize| {
        let mut sent = Vec::new();
        for _ in 0..n {
            let v = video.vp8(frames == 0, frames as u8);
            frames += 1;
            publisher.send_video(&v, true, 3000).await.expect("video");
            sent.push(v);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    };
    // A key frame opens the slots, then a few frames arrive as usual.
    send(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(3).await;
    let mut last_seq = Vec::new();
    for (i, (sub, _)) in subscribers.iter().enumerate() {
        let got = collect(sub, 4).await;
        assert_eq!(got.len(), 4, "subscriber {i}: the first frames");
        last_seq.push(got[3].sequence_number);
    }
    for (_, id) in &subscribers {
        h.sfu.lose_media(*id, 1);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = send(3).await;
    for (i, (sub, _)) in subscribers.iter().enumerate() {
        let got = collect(sub, 2).await;
        let lost = last_seq[i].wrapping_add(1);
        let seqs: Vec<u16> = got.iter().map(|r| r.sequence_number).collect();
        assert_eq!(
            seqs,
            [lost.wrapping_add(1), lost.wrapping_add(2)],
            "subscriber {i}: all but the lost packet"
        );
        sub.send_rtcp_nack(got[0].ssrc, &[lost])
            .await
            .expect("nack");
        let again = sub
            .recv(Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("subscriber {i}: the lost packet never came back"));
        assert_eq!(
            (again.ssrc, again.sequence_number, &again.payload),
            (got[0].ssrc, lost, &sent[0]),
            "subscriber {i}: the packet it lost, resent"
        );
    }
    // The SFU counts the NACKs it received at its next call tick.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.metrics.nack.get() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.metrics.nack.get(), 3);
    h.sfu.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_stale_epochs_and_unauthorised_sources_are_dropped() {
    let h = start_one_worker();
    let (publisher, pub_id) = join(
        &h,
        "u:mallory/d",
        PeerSpec {
            publish_audio: true,
            publish_video: true,
            ..Default::default()
        },
    )
    .await;
    let (sub, _) = join(
        &h,
        "u:bob/d",
        PeerSpec {
            recv_audio_slots: 1,
            recv_video_slots: 1,
            ..Default::default()
        },
    )
    .await;

    // Plaintext audio and video (a clear VP8 key frame) never reach Bob.
    for i in 0..10u8 {
        publisher
            .send_audio(&[0xfc, i, 1, 2, 3, 4, 5, 6, 7, 8], Some(20))
            .await
            .expect("audio");
        let mut clear = vec![0x10, 0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a];
        clear.extend([i; 30]);
        publisher
            .send_video(&clear, true, 3000)
            .await
            .expect("video");
    }
    // A frame from an epoch that is not live.
    let mut stale = Sender::new(EPOCH + 5, 1, 0);
    publisher
        .send_audio(&stale.opus(1), Some(20))
        .await
        .expect("audio");
    assert!(sub.recv(Duration::from_millis(800)).await.is_none());
    // Clear bytes after the VP8 prefix may happen to parse as an SFrame
    // header; its KID then names no live epoch.
    let rejected = dropped(&h.metrics, "not_sframe")
        + dropped(&h.metrics, "truncated_frame")
        + dropped(&h.metrics, "stale_epoch");
    assert!(
        rejected >= 21,
        "plaintext counted as dropped: {}",
        drop_summary(&h.metrics)
    );

    // A properly protected frame does arrive.
    let mut good = Sender::new(EPOCH, 1, 0);
    let frame = good.opus(9);
    publisher.send_audio(&frame, Some(20)).await.expect("audio");
    let r = sub.recv(WAIT).await.expect("protected audio arrives");
    assert_eq!(r.payload, frame);

    // Without the audio right, even protected audio is dropped.
    h.sfu.set_publish_rights(
        pub_id,
        PublishRights {
            audio: false,
            ..PublishRights::ALL
        },
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher
        .send_audio(&good.opus(10), Some(20))
        .await
        .expect("audio");
    assert!(sub.recv(Duration::from_millis(500)).await.is_none());
    assert!(dropped(&h.metrics, "no_publish_right") >= 1);

    // Commits alone keep the epoch senders use live (they switch only at
    // epoch_ready) ...
    h.sfu.epoch_changed(CALL, EPOCH + 1);
    h.sfu.epoch_changed(CALL, EPOCH + 2);
    h.sfu.set_publish_rights(pub_id, PublishRights::ALL);
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher
        .send_audio(&good.opus(11), Some(20))
        .await
        .expect("audio");
    assert!(sub.recv(WAIT).await.is_some(), "not ready yet: still live");
    // ... once an epoch is ready, the ready epoch before it stays live ...
    h.sfu.epoch_ready(CALL, EPOCH + 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher
        .send_audio(&good.opus(12), Some(20))
        .await
        .expect("audio");
    assert!(
        sub.recv(WAIT).await.is_some(),
        "previous ready epoch still live"
    );
    // ... two ready epochs later it lingers for frames still in flight ...
    h.sfu.epoch_ready(CALL, EPOCH + 2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher
        .send_audio(&good.opus(13), Some(20))
        .await
        .expect("audio");
    assert!(sub.recv(WAIT).await.is_some(), "in flight: still live");
    // ... and after that it is not.
    tokio::time::sleep(conclave_sfu::guard::IN_FLIGHT).await;
    publisher
        .send_audio(&good.opus(14), Some(20))
        .await
        .expect("audio");
    assert!(sub.recv(Duration::from_millis(500)).await.is_none());
    h.sfu.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_slots_follow_the_loudest_speakers() {
    let mut h = start_one_worker();
    let (mut speakers, listener) = four_speakers_and_a_listener(&h).await;
    // RFC 6464 levels: lower is louder. Speakers 2 and 3 are loud.
    let levels = [90u8, 80, 10, 20];
    for round in 0..100u8 {
        for ((p, s), level) in speakers.iter_mut().zip(levels) {
            let mut frame = s.opus(round);
            // Mark whose frame it is in a byte we can see: the tag is last,
            // so compare against what each speaker sent instead.
            frame.truncate(frame.len());
            p.send_audio(&frame, Some(level)).await.expect("audio");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // After the ranking settles, the listener hears only the two loudest.
    listener.drain().await;
    let mut last = Vec::new();
    for round in 100..130u8 {
        for ((p, s), level) in speakers.iter_mut().zip(levels) {
            let frame = s.opus(round);
            last.push((frame.clone(), level));
            p.send_audio(&frame, Some(level)).await.expect("audio");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = collect(&listener, 60).await;
    assert!(got.len() >= 50, "listener hears two streams: {}", got.len());
    for r in &got {
        let level = last
            .iter()
            .find(|(f, _)| *f == r.payload)
            .map(|(_, l)| *l)
            .expect("a frame somebody sent");
        assert!(level <= 20, "only the loudest speakers are forwarded");
    }
    let mut dominant = None;
    while let Ok(e) = h.events.try_recv() {
        if let SfuEvent::DominantSpeaker { participant, .. } = e {
            dominant = Some(participant);
        }
    }
    assert_eq!(dominant.as_deref(), Some("u:speaker2/d"));
    h.sfu.shutdown();
}

/// Four audio publishers (leaves 1–4) and a listener with two audio slots.
async fn four_speakers_and_a_listener(h: &Harness) -> (Vec<(TestPeer, Sender)>, TestPeer) {
    let mut speakers = Vec::new();
    for i in 0..4 {
        let (p, _) = join(
            h,
            &format!("u:speaker{i}/d"),
            PeerSpec {
                publish_audio: true,
                ..Default::default()
            },
        )
        .await;
        speakers.push((p, Sender::new(EPOCH, i + 1, 0)));
    }
    let (listener, _) = join(
        h,
        "u:listener/d",
        PeerSpec {
            recv_audio_slots: 2,
            ..Default::default()
        },
    )
    .await;
    (speakers, listener)
}

/// Sends one round of frames at `levels`; returns `(frame, speaker)` of each.
async fn speak(
    speakers: &mut [(TestPeer, Sender)],
    levels: [u8; 4],
    round: u8,
) -> Vec<(Vec<u8>, usize)> {
    let mut sent = Vec::new();
    for (i, ((p, s), level)) in speakers.iter_mut().zip(levels).enumerate() {
        let frame = s.opus(round);
        p.send_audio(&frame, Some(level)).await.expect("audio");
        sent.push((frame, i));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_keep_their_speaker_when_speakers_trade_places() {
    let h = start_one_worker();
    let (mut speakers, listener) = four_speakers_and_a_listener(&h).await;
    // Speakers 2 and 3 are the loud ones; which of them is louder flips
    // every 60 rounds. Both stay chosen, so neither slot should change hands.
    let mut sent = Vec::new();
    for round in 0..240u8 {
        let levels = if (round / 60) % 2 == 0 {
            [90u8, 80, 10, 20]
        } else {
            [90u8, 80, 20, 10]
        };
        sent.extend(speak(&mut speakers, levels, round).await);
    }
    let got = collect(&listener, 1_000).await;
    // Once both loud speakers are in slots (the first rounds rank them), each
    // slot carries one speaker for good and its numbering has no holes.
    let mut by_slot: std::collections::HashMap<u32, Vec<(usize, u16)>> =
        std::collections::HashMap::new();
    for r in &got {
        let who = sent
            .iter()
            .find(|(f, _)| *f == r.payload)
            .map(|(_, i)| *i)
            .expect("a frame somebody sent");
        by_slot
            .entry(r.ssrc)
            .or_default()
            .push((who, r.sequence_number));
    }
    assert_eq!(by_slot.len(), 2, "two audio slots");
    let mut carried = HashSet::new();
    for (ssrc, packets) in &by_slot {
        let settled = &packets[packets.len() / 4..];
        let who: HashSet<usize> = settled.iter().map(|(w, _)| *w).collect();
        assert_eq!(who.len(), 1, "slot {ssrc} changed hands: {who:?}");
        carried.extend(who);
        for pair in settled.windows(2) {
            assert_eq!(
                pair[1].1,
                pair[0].1.wrapping_add(1),
                "slot {ssrc} skips a sequence number"
            );
        }
    }
    assert_eq!(carried, HashSet::from([2, 3]), "the two loudest are heard");
    h.sfu.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_layer_switches_on_key_frames_with_continuous_numbering() {
    let mut config = SfuConfig::loopback();
    config.workers = 1;
    // No bandwidth estimate: the subscriber's maximum layer decides.
    config.congestion_control = false;
    let h = start(config);
    h.sfu.epoch_changed(CALL, EPOCH);
    let (publisher, _) = join(
        &h,
        "u:presenter/d",
        PeerSpec {
            publish_video: true,
            simulcast: true,
            ..Default::default()
        },
    )
    .await;
    let (viewer, viewer_id) = join(
        &h,
        "u:viewer/d",
        PeerSpec {
            recv_video_slots: 1,
            ..Default::default()
        },
    )
    .await;
    let mut senders: Vec<Sender> = (0..3).map(|_| Sender::new(EPOCH, 1, 1)).collect();
    // Frames are identified by their (protected) bytes, which differ per layer.
    let mut sent: Vec<(u8, bool, Vec<u8>)> = Vec::new();
    let mut send = async |key: [bool; 3], sent: &mut Vec<(u8, bool, Vec<u8>)>| {
        for (layer, s) in senders.iter_mut().enumerate() {
            let payload = s.vp8(key[layer], layer as u8);
            publisher
                .send_video_layer(layer, &payload, true, 3000)
                .await
                .expect("layer");
            sent.push((layer as u8, key[layer], payload));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Key frames on every layer, then deltas. Once the SFU has measured the
    // layers it targets the top one (no budget, max layer 2) and moves there
    // on that layer's next key frame.
    send([true; 3], &mut sent).await;
    for _ in 0..5 {
        send([false; 3], &mut sent).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    send([true; 3], &mut sent).await;
    for _ in 0..5 {
        send([false; 3], &mut sent).await;
    }
    // Cap the viewer at the lowest layer; the SFU keeps sending the top
    // layer until the lowest one produces a key frame.
    h.sfu
        .set_quality(viewer_id, conclave_sfu::QualityPrefs { max_layer: 0 });
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..3 {
        send([false; 3], &mut sent).await;
    }
    send([true, false, false], &mut sent).await;
    for _ in 0..5 {
        send([false; 3], &mut sent).await;
    }
    let got = collect(&viewer, 100).await;
    let layers: Vec<(u8, bool)> = got
        .iter()
        .map(|r| {
            let (layer, key, _) = sent
                .iter()
                .find(|(_, _, p)| *p == r.payload)
                .expect("a frame the publisher sent");
            (*layer, *key)
        })
        .collect();
    // Only one layer at a time, entered only on its key frames.
    assert!(layers[0].1, "starts on a key frame: {layers:?}");
    for w in layers.windows(2) {
        if w[1].0 != w[0].0 {
            assert!(w[1].1, "layer switch on a key frame: {layers:?}");
        }
    }
    let top = layers.iter().position(|(l, _)| *l == 2).expect("went up");
    let back = top
        + layers[top..]
            .iter()
            .position(|(l, _)| *l == 0)
            .expect("came down");
    // Up for the 6 top-layer frames plus the 3 sent before the low key frame.
    assert_eq!(back - top, 9, "{layers:?}");
    assert_eq!(layers.len() - back, 6, "{layers:?}");
    // One continuous stream for the viewer.
    for w in got.windows(2) {
        assert_eq!(w[1].ssrc, w[0].ssrc);
        assert_eq!(w[1].sequence_number, w[0].sequence_number.wrapping_add(1));
        assert!(w[1].timestamp.wrapping_sub(w[0].timestamp) < 90_000);
    }
    h.sfu.shutdown();
}

/// With transport-wide feedback from the viewer, the SFU's send-side
/// estimate (GCC) starts at its initial rate and grows; the viewer starts on
/// a layer that fits and moves up as the estimate does, on key frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_layer_follows_the_bandwidth_estimate() {
    let h = start_one_worker();
    let (publisher, _) = join(
        &h,
        "u:presenter/d",
        PeerSpec {
            publish_video: true,
            simulcast: true,
            ..Default::default()
        },
    )
    .await;
    let (viewer, _) = join(
        &h,
        "u:viewer/d",
        PeerSpec {
            recv_video_slots: 1,
            twcc: true,
            ..Default::default()
        },
    )
    .await;
    let mut senders: Vec<Sender> = (0..3).map(|_| Sender::new(EPOCH, 1, 1)).collect();
    // Layer sizes per 20 ms frame: ~80, ~200 and ~440 kbit/s. GCC starts at
    // 300 kbit/s, so the top layer needs the estimate to grow.
    let sizes = [200usize, 500, 1100];
    let mut sent: Vec<(u8, bool, Vec<u8>)> = Vec::new();
    let mut got = Vec::new();
    let started = std::time::Instant::now();
    let mut frame = 0u32;
    while started.elapsed() < Duration::from_secs(25) {
        let key = frame.is_multiple_of(25); // a key frame every 0.5 s on every layer
        for (layer, s) in senders.iter_mut().enumerate() {
            let body_len = sizes[layer];
            let mut raw = if key {
                vec![0x50u8, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xf0, 0x00]
            } else {
                vec![0x31u8, 0x02, 0x00]
            };
            raw.extend(std::iter::repeat_n(frame as u8, body_len));
            let mut payload = vec![0x10];
            payload.extend(s.protect(Codec::Vp8, &raw));
            // Two packets per frame keeps every packet under the MTU.
            publisher
                .send_video_layer(layer, &payload, true, 1800)
                .await
                .expect("layer");
            sent.push((layer as u8, key, payload));
        }
        frame += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Some(r) = viewer.recv(Duration::from_millis(1)).await {
            got.push(r);
        }
        if got
            .iter()
            .rev()
            .take(5)
            .all(|r| sent.iter().any(|(l, _, p)| *l == 2 && *p == r.payload))
            && got.len() > 5
        {
            break;
        }
    }
    let layers: Vec<(u8, bool)> = got
        .iter()
        .filter_map(|r| {
            sent.iter()
                .find(|(_, _, p)| *p == r.payload)
                .map(|(l, k, _)| (*l, *k))
        })
        .collect();
    assert_eq!(
        layers.len(),
        got.len(),
        "every frame is one the publisher sent"
    );
    assert!(!layers.is_empty());
    assert!(
        layers[0].0 < 2,
        "starts below the top layer: {:?}",
        &layers[..5.min(layers.len())]
    );
    assert_eq!(
        layers.last().map(|l| l.0),
        Some(2),
        "reaches the top layer as the estimate grows"
    );
    for w in layers.windows(2) {
        if w[1].0 != w[0].0 {
            assert!(w[1].1, "switches only on key frames");
        }
    }
    for w in got.windows(2) {
        assert_eq!(w[1].sequence_number, w[0].sequence_number.wrapping_add(1));
    }
    println!(
        "top layer reached after {:?}; layers seen in order: {:?}",
        started.elapsed(),
        layers
            .iter()
            .map(|l| l.0)
            .fold(Vec::new(), |mut v: Vec<u8>, l| {
                if v.last() != Some(&l) {
                    v.push(l);
                }
                v
            })
    );
    h.sfu.shutdown();
}
