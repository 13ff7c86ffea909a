//! The SFU's per-packet forwarding work, without the network: check the
//! VP8 descriptor and SFrame header once per inbound packet, then for each
//! subscriber rewrite SSRC/sequence/timestamp, marshal the RTP header and
//! SRTP-encrypt (AEAD_AES_128_GCM via rtc-srtp, ring backend).
//!
//! Reported per inbound packet for 1–500 subscribers; criterion's
//! throughput line gives forwarded packets per second on one core.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Instant;

use conclave_protocol::sframe::{CipherSuite, Codec, FrameEncryptor, FrameKey, KidLayout};
use conclave_sfu::forward::{Rewriter, vp8_info};
use conclave_sfu::guard::LiveEpochs;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;

fn inbound_payload() -> Vec<u8> {
    let layout = KidLayout::default();
    let key = FrameKey::derive(
        CipherSuite::default(),
        layout.kid(1, 8, 1, 1).unwrap(),
        &[1u8; 32],
    )
    .unwrap();
    let mut enc = FrameEncryptor::new(key);
    let mut frame = vec![0x31u8, 0x02, 0x00];
    frame.extend([7u8; 1100]);
    let mut out = vec![0u8; 1300];
    let n = enc.encrypt(Codec::Vp8, &frame, &mut out).unwrap();
    let mut payload = vec![0x10];
    payload.extend(&out[..n]);
    payload
}

struct Subscriber {
    rewriter: Rewriter,
    srtp: Context,
    ssrc: u32,
}

fn bench(c: &mut Criterion) {
    let provider = rtc::crypto::default_provider().unwrap();
    let payload = inbound_payload();
    let live = LiveEpochs::new(KidLayout::default(), 1);
    let mut group = c.benchmark_group("forward_video_1200B");
    for n in [1usize, 10, 100, 500] {
        let mut subs: Vec<Subscriber> = (0..n)
            .map(|i| Subscriber {
                rewriter: Rewriter::default(),
                srtp: Context::new(
                    &[i as u8; 16],
                    &[3u8; 12],
                    ProtectionProfile::AeadAes128Gcm,
                    None,
                    None,
                    provider.crypto(),
                )
                .unwrap(),
                ssrc: 1000 + i as u32,
            })
            .collect();
        let mut seq = 0u16;
        let mut ts = 0u32;
        let mut buf = Vec::with_capacity(1500);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                seq = seq.wrapping_add(1);
                ts = ts.wrapping_add(3000);
                let now = Instant::now();
                let info = vp8_info(&payload).unwrap();
                live.check(Codec::Vp8, &payload[info.payload_offset..], now)
                    .unwrap();
                for s in subs.iter_mut() {
                    let rw = s.rewriter.rewrite(7, seq, ts, 90_000, now);
                    buf.clear();
                    buf.extend_from_slice(&[0x80, 96 | 0x80]);
                    buf.extend_from_slice(&rw.seq.to_be_bytes());
                    buf.extend_from_slice(&rw.timestamp.to_be_bytes());
                    buf.extend_from_slice(&s.ssrc.to_be_bytes());
                    buf.extend_from_slice(&payload);
                    black_box(s.srtp.encrypt_rtp(&buf).unwrap());
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
