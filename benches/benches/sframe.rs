//! SFrame throughput: encrypt and decrypt at 100 B, 1,200 B and 50 KB for
//! every suite, the full receive path through the key ring, and the raw
//! AES-256-GCM backends (RustCrypto `aes-gcm` vs `ring`) at 1,200 B.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use conclave_protocol::sframe::{
    CipherSuite, Codec, EpochSecret, FrameEncryptor, FrameKey, KeyRing, KeyRingConfig, KidLayout,
    MAX_OVERHEAD, parse_protected,
};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use zeroize::Zeroizing;

const SIZES: [usize; 3] = [100, 1_200, 50_000];

fn suite_name(s: CipherSuite) -> &'static str {
    match s {
        CipherSuite::AesCtr128HmacSha256_80 => "aes128ctr_hmac_80",
        CipherSuite::AesCtr128HmacSha256_64 => "aes128ctr_hmac_64",
        CipherSuite::AesCtr128HmacSha256_32 => "aes128ctr_hmac_32",
        CipherSuite::AesGcm128Sha256 => "aes128gcm",
        CipherSuite::AesGcm256Sha512 => "aes256gcm",
    }
}

fn encrypt_decrypt(c: &mut Criterion) {
    for suite in CipherSuite::ALL {
        let key = FrameKey::derive(suite, 0x1234, &vec![7u8; suite.key_len()]).unwrap();
        let mut g = c.benchmark_group(format!("sframe/{}", suite_name(suite)));
        for size in SIZES {
            let frame = vec![0xa5u8; size];
            let mut out = vec![0u8; size + MAX_OVERHEAD];
            g.throughput(Throughput::Bytes(size as u64));
            let mut enc = FrameEncryptor::new(key.clone());
            g.bench_function(format!("encrypt/{size}"), |b| {
                b.iter(|| {
                    enc.encrypt(Codec::Opaque, black_box(&frame), &mut out)
                        .unwrap()
                })
            });
            let n = FrameEncryptor::new(key.clone())
                .encrypt(Codec::Opaque, &frame, &mut out)
                .unwrap();
            let protected = out[..n].to_vec();
            let mut clear = vec![0u8; n];
            g.bench_function(format!("decrypt/{size}"), |b| {
                b.iter(|| {
                    let p = parse_protected(Codec::Opaque, black_box(&protected)).unwrap();
                    key.open(p.header.ctr, p.header_bytes, p.prefix, p.body, &mut clear)
                        .unwrap()
                })
            });
        }
        g.finish();
    }
}

/// The whole receive path (header parse, KID lookup, replay window, AEAD)
/// for 1,200-byte VP8 frames of the default suite.
fn keyring_receive(c: &mut Criterion) {
    let layout = KidLayout::default();
    let base = vec![3u8; 32];
    let mut g = c.benchmark_group("sframe/keyring");
    g.throughput(Throughput::Bytes(1_200));
    let mut frame = vec![0x31u8, 0x02, 0x00];
    frame.resize(1_200, 0x5a);
    const BATCH: usize = 1_000;
    g.bench_function("receive_vp8/1200", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            let mut out = vec![0u8; 1_400];
            while left > 0 {
                let batch = left.min(BATCH);
                let now = Instant::now();
                let mut ring = KeyRing::new(KeyRingConfig::default());
                ring.install_epoch(
                    EpochSecret {
                        epoch: 1,
                        base_key: Zeroizing::new(base.clone()),
                        sender_bits: KidLayout::sender_bits(8),
                        members: (0..8).collect(),
                    },
                    now,
                );
                let kid = layout.kid(1, KidLayout::sender_bits(8), 5, 1).unwrap();
                let mut enc = FrameEncryptor::new(
                    FrameKey::derive(CipherSuite::default(), kid, &base).unwrap(),
                );
                let frames: Vec<Vec<u8>> = (0..batch)
                    .map(|_| {
                        let mut o = vec![0u8; 1_300];
                        let n = enc.encrypt(Codec::Vp8, &frame, &mut o).unwrap();
                        o.truncate(n);
                        o
                    })
                    .collect();
                let start = Instant::now();
                for f in &frames {
                    black_box(ring.decrypt(now, Codec::Vp8, f, &mut out).unwrap());
                }
                total += start.elapsed();
                left -= batch;
            }
            total
        })
    });
    g.finish();
}

/// Raw AES-256-GCM seal of 1,200 bytes: the two candidate backends.
fn aead_backends(c: &mut Criterion) {
    use aes_gcm::aead::AeadInPlace;
    use aes_gcm::{Aes256Gcm, KeyInit};
    let key = [9u8; 32];
    let nonce = [1u8; 12];
    let aad = [0u8; 12];
    let mut buf = vec![0u8; 1_200];
    let mut g = c.benchmark_group("aead_backend/aes256gcm_seal");
    g.throughput(Throughput::Bytes(1_200));
    let rc = Aes256Gcm::new_from_slice(&key).unwrap();
    g.bench_function("rustcrypto_aes_gcm/1200", |b| {
        b.iter(|| {
            rc.encrypt_in_place_detached((&nonce).into(), &aad, &mut buf)
                .unwrap()
        })
    });
    let rk = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).unwrap(),
    );
    g.bench_function("ring/1200", |b| {
        b.iter(|| {
            rk.seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(&aad),
                &mut buf,
            )
            .unwrap()
        })
    });
    g.finish();
}

fn setup_key_cost(c: &mut Criterion) {
    let base = vec![1u8; 32];
    c.bench_function("sframe/aes256gcm/derive_key", |b| {
        b.iter_batched(
            || base.clone(),
            |k| FrameKey::derive(CipherSuite::AesGcm256Sha512, 77, &k).unwrap(),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(
    benches,
    encrypt_decrypt,
    keyring_receive,
    aead_backends,
    setup_key_cost
);
criterion_main!(benches);
