//! Arbitrary bytes from the network never panic the SFrame receive path, and
//! every round trip survives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use conclave_protocol::sframe::{
    CipherSuite, Codec, EpochSecret, FrameEncryptor, FrameKey, Header, KeyRing, KeyRingConfig,
    KidLayout, SframeError, parse_protected,
};
use proptest::prelude::*;
use zeroize::Zeroizing;

fn ring() -> KeyRing {
    let mut r = KeyRing::new(KeyRingConfig::default());
    r.install_epoch(
        EpochSecret {
            epoch: 3,
            base_key: Zeroizing::new(vec![5u8; 32]),
            sender_bits: KidLayout::sender_bits(4),
            members: (0..4).collect(),
        },
        Instant::now(),
    );
    r
}

fn codec() -> impl Strategy<Value = Codec> {
    prop_oneof![Just(Codec::Opus), Just(Codec::Vp8), Just(Codec::Opaque)]
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), codec in codec()) {
        let _ = Header::decode(&bytes);
        let _ = parse_protected(codec, &bytes);
        let mut r = ring();
        let mut out = vec![0u8; bytes.len()];
        // Random input must never decrypt.
        prop_assert!(r.decrypt(Instant::now(), codec, &bytes, &mut out).is_err());
        // A too-small output buffer is an error, not a panic.
        let mut tiny = [0u8; 2];
        prop_assert!(r.decrypt(Instant::now(), codec, &bytes, &mut tiny).is_err());
    }

    #[test]
    fn round_trip_and_single_bit_flips(
        payload in proptest::collection::vec(any::<u8>(), 10..3000),
        suite_idx in 0usize..5,
        flip in any::<usize>(),
        bit in 0u8..8,
    ) {
        let suite = CipherSuite::ALL[suite_idx];
        let layout = KidLayout::default();
        let kid = layout.kid(3, KidLayout::sender_bits(4), 2, 1).unwrap();
        let base = vec![5u8; 32];
        let cfg = KeyRingConfig { suite, ..KeyRingConfig::default() };
        let mut r = KeyRing::new(cfg);
        r.install_epoch(
            EpochSecret {
                epoch: 3,
                base_key: Zeroizing::new(base.clone()),
                sender_bits: KidLayout::sender_bits(4),
                members: (0..4).collect(),
            },
            Instant::now(),
        );
        let mut enc = FrameEncryptor::new(FrameKey::derive(suite, kid, &base).unwrap());
        let mut ct = vec![0u8; payload.len() + 64];
        let n = enc.encrypt(Codec::Vp8, &payload, &mut ct).unwrap();
        let ct = &ct[..n];

        let mut tampered = ct.to_vec();
        let at = flip % tampered.len();
        tampered[at] ^= 1 << bit;
        let mut out = vec![0u8; n];
        let res = r.decrypt(Instant::now(), Codec::Vp8, &tampered, &mut out);
        prop_assert!(res.is_err(), "flip at {} accepted", at);
        if let Err(e) = res {
            let too_small = matches!(e, SframeError::BufferTooSmall { .. });
            prop_assert!(!too_small, "unexpected {:?}", e);
        }

        let d = r.decrypt(Instant::now(), Codec::Vp8, ct, &mut out).unwrap();
        prop_assert_eq!(&out[..d.len], &payload[..]);
        prop_assert_eq!((d.leaf, d.context, d.epoch), (2, 1, 3));
    }
}
