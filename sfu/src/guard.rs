//! E2EE-aware forwarding check.
//!
//! The SFU never holds a key. For each media frame it reads the codec's clear
//! prefix and the SFrame header that follows, and forwards the frame only if
//! the header is well formed and its KID names the call's current or previous
//! epoch. Anything else — plaintext from a misconfigured client, a truncated
//! frame, a stale epoch — is dropped and counted by reason, so no client can
//! leak clear media to the others through the SFU.

use conclave_protocol::sframe::{Codec, KidLayout, SframeError, parse_protected};

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DropReason {
    /// No well-formed SFrame header after the clear prefix.
    #[error("not an SFrame frame")]
    NotSframe,
    /// Too short to hold the codec prefix, a header and a tag.
    #[error("truncated frame")]
    Truncated,
    /// The KID's epoch is neither the current nor the previous one.
    #[error("KID from an epoch that is not live")]
    StaleEpoch,
}

/// The epochs a call's frames may be protected under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveEpochs {
    layout: KidLayout,
    current: u64,
    previous: Option<u64>,
}

/// The shortest SFrame tag of any suite Conclave accepts on the wire.
const MIN_TAG_LEN: usize = 4;

impl LiveEpochs {
    /// Starts at `epoch` with no previous epoch.
    pub fn new(layout: KidLayout, epoch: u64) -> Self {
        Self {
            layout,
            current: epoch,
            previous: None,
        }
    }

    /// The group moved to `epoch`; the old current epoch becomes the previous one.
    pub fn advance(&mut self, epoch: u64) {
        if epoch != self.current {
            self.previous = Some(self.current);
            self.current = epoch;
        }
    }

    fn allows(&self, kid: u64) -> bool {
        let low = self.layout.kid_epoch_low(kid);
        low == self.layout.epoch_low(self.current)
            || self
                .previous
                .is_some_and(|p| low == self.layout.epoch_low(p))
    }

    /// Checks one whole frame as the SFU sees it (after depacketization).
    pub fn check(&self, codec: Codec, frame: &[u8]) -> Result<(), DropReason> {
        let parsed = parse_protected(codec, frame).map_err(|e| match e {
            SframeError::TruncatedFrame | SframeError::TruncatedHeader => DropReason::Truncated,
            _ => DropReason::NotSframe,
        })?;
        if parsed.body.len() < MIN_TAG_LEN {
            return Err(DropReason::Truncated);
        }
        if !self.allows(parsed.header.kid) {
            return Err(DropReason::StaleEpoch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_protocol::sframe::{CipherSuite, FrameEncryptor, FrameKey};

    fn protected(epoch: u64, frame: &[u8], codec: Codec) -> Vec<u8> {
        let layout = KidLayout::default();
        let kid = layout.kid(epoch, 4, 3, 1).unwrap();
        let key = FrameKey::derive(CipherSuite::default(), kid, &[1u8; 32]).unwrap();
        let mut enc = FrameEncryptor::new(key);
        let mut out = vec![0u8; frame.len() + 64];
        let n = enc.encrypt(codec, frame, &mut out).unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn forwards_current_and_previous_epoch_only() {
        let mut live = LiveEpochs::new(KidLayout::default(), 4);
        let vp8 = [0x31u8, 0x02, 0x00, 9, 9, 9, 9];
        assert_eq!(
            live.check(Codec::Vp8, &protected(4, &vp8, Codec::Vp8)),
            Ok(())
        );
        live.advance(5);
        assert_eq!(
            live.check(Codec::Vp8, &protected(4, &vp8, Codec::Vp8)),
            Ok(())
        );
        assert_eq!(
            live.check(Codec::Opus, &protected(5, b"opus", Codec::Opus)),
            Ok(())
        );
        live.advance(6);
        assert_eq!(
            live.check(Codec::Vp8, &protected(4, &vp8, Codec::Vp8)),
            Err(DropReason::StaleEpoch)
        );
    }

    #[test]
    fn drops_plaintext_and_truncated_frames() {
        let live = LiveEpochs::new(KidLayout::default(), 0);
        // A clear VP8 delta frame: the byte after the prefix is payload, not a
        // header; as a header it announces more bytes than the frame has.
        assert_eq!(
            live.check(Codec::Vp8, &[0x31, 0x02, 0x00, 0xff, 0x10]),
            Err(DropReason::Truncated)
        );
        assert_eq!(live.check(Codec::Opus, &[]), Err(DropReason::Truncated));
        assert_eq!(
            live.check(Codec::Vp8, &[0x50, 0x2a]),
            Err(DropReason::Truncated)
        );
        // Header present but no room for a tag.
        assert_eq!(
            live.check(Codec::Opus, &[0x00, 1, 2]),
            Err(DropReason::Truncated)
        );
    }
}
