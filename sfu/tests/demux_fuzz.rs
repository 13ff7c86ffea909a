//! Any datagram, however malformed, is classified and (for STUN) routed or
//! refused without a panic; the E2EE guard likewise.
#![allow(clippy::unwrap_used)]

use conclave_protocol::sframe::{Codec, KidLayout};
use conclave_sfu::demux::{PacketKind, binding_request_ufrag, classify};
use conclave_sfu::guard::LiveEpochs;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_datagrams_never_panic(pkt in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let kind = classify(&pkt);
        if kind == PacketKind::Stun {
            let _ = binding_request_ufrag(&pkt);
        }
        let live = LiveEpochs::new(KidLayout::default(), 7);
        let _ = live.check(Codec::Vp8, &pkt, std::time::Instant::now());
        let _ = live.check(Codec::Opus, &pkt, std::time::Instant::now());
    }

    #[test]
    fn stun_shaped_garbage_never_panics(
        len in 0u16..600,
        body in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut pkt = vec![0x00, 0x01];
        pkt.extend_from_slice(&len.to_be_bytes());
        pkt.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        pkt.extend_from_slice(&[0u8; 12]);
        pkt.extend_from_slice(&body);
        if let Ok(ufrag) = binding_request_ufrag(&pkt) {
            prop_assert!(!ufrag.is_empty());
            prop_assert!(!ufrag.contains(&b':'));
        }
    }
}
