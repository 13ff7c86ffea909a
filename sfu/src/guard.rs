//! E2EE-aware forwarding check.
//!
//! The SFU never holds a key. For each media frame it reads the codec's clear
//! prefix and the SFrame header that follows, and forwards the frame only if
//! the header is well formed and its KID names an epoch senders may be using:
//! the epoch senders were last told to switch to (`epoch_ready`), the one
//! before it (frames still in flight), or one committed since (new members
//! send in the epoch they joined before it is ready). Anything else — plaintext from a misconfigured client, a truncated
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
    /// The KID's epoch is not one senders may be using.
    #[error("KID from an epoch that is not live")]
    StaleEpoch,
}

/// The epochs a call's frames may be protected under.
///
/// Senders switch keys at `epoch_ready`, which comes only once every member
/// holds the epoch; while members join in a stream of commits, the group can
/// be several epochs past the one senders use. So the live set follows the
/// ready epochs, not the commits: every epoch from the ready epoch before the
/// current one (frames in flight) to the newest commit (new members send in
/// the epoch they joined, before it is ready).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveEpochs {
    layout: KidLayout,
    ready: u64,
    previous_ready: Option<u64>,
    committed: u64,
    /// The latest commit that removed members.
    removal: Option<u64>,
}

/// The shortest SFrame tag of any suite Conclave accepts on the wire.
const MIN_TAG_LEN: usize = 4;

impl LiveEpochs {
    /// Starts at `epoch`, committed and ready (a new group's epoch 0).
    pub fn new(layout: KidLayout, epoch: u64) -> Self {
        Self {
            layout,
            ready: epoch,
            previous_ready: None,
            committed: epoch,
            removal: None,
        }
    }

    /// The commit to `epoch` removed members. Whatever senders use, the
    /// epochs the removed members hold stop once the group is past `epoch`
    /// (the epoch just before it stays live until then, for frames in flight
    /// and senders that have not switched yet). The signaling service orders
    /// commits so that senders have switched by then (no commit on top of an
    /// epoch awaiting acks when either removes members); this is the bound
    /// if a client does not.
    pub fn removed(&mut self, epoch: u64) {
        self.committed(epoch);
        if epoch >= self.ready {
            self.removal = Some(self.removal.map_or(epoch, |r| r.max(epoch)));
        }
    }

    /// A commit moved the group to `epoch`. An epoch below the ready one
    /// means the group was made anew (a restarted server): start over there.
    pub fn committed(&mut self, epoch: u64) {
        if epoch < self.ready {
            *self = Self::new(self.layout, epoch);
        } else {
            self.committed = self.committed.max(epoch);
        }
    }

    /// Senders were told to switch to `epoch`; the ready epoch before it
    /// stays live for frames in flight, older ones stop.
    pub fn ready(&mut self, epoch: u64) {
        if epoch < self.ready {
            *self = Self::new(self.layout, epoch);
        } else if epoch > self.ready {
            self.previous_ready = Some(self.ready);
            self.ready = epoch;
            self.committed = self.committed.max(epoch);
        }
    }

    fn allows(&self, kid: u64) -> bool {
        // Live: from the ready epoch before the current one (or the current
        // one) up to the newest commit, compared on the KID's epoch bits.
        let layout = self.layout;
        let mut oldest = self.previous_ready.unwrap_or(self.ready);
        if let Some(r) = self.removal {
            let floor = if self.committed > r {
                r
            } else {
                r.saturating_sub(1)
            };
            oldest = oldest.max(floor);
        }
        let span = self.committed - oldest;
        let modulus = 1u64 << layout.epoch_bits();
        let past_oldest = layout
            .kid_epoch_low(kid)
            .wrapping_sub(layout.epoch_low(oldest))
            & (modulus - 1);
        span >= modulus - 1 || past_oldest <= span
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

    fn opus_ok(live: &LiveEpochs, epoch: u64) -> bool {
        live.check(Codec::Opus, &protected(epoch, b"opus", Codec::Opus))
            .is_ok()
    }

    #[test]
    fn forwards_the_ready_epoch_and_the_one_before_it() {
        let mut live = LiveEpochs::new(KidLayout::default(), 4);
        let vp8 = [0x31u8, 0x02, 0x00, 9, 9, 9, 9];
        assert_eq!(
            live.check(Codec::Vp8, &protected(4, &vp8, Codec::Vp8)),
            Ok(())
        );
        live.committed(5);
        live.ready(5);
        assert_eq!(
            live.check(Codec::Vp8, &protected(4, &vp8, Codec::Vp8)),
            Ok(())
        );
        assert!(opus_ok(&live, 5));
        live.committed(6);
        live.ready(6);
        assert_eq!(
            live.check(Codec::Vp8, &protected(4, &vp8, Codec::Vp8)),
            Err(DropReason::StaleEpoch)
        );
        assert!(opus_ok(&live, 5) && opus_ok(&live, 6));
        assert!(!opus_ok(&live, 7), "not committed yet");
    }

    #[test]
    fn commits_faster_than_acks_keep_the_senders_epoch_live() {
        // Joins commit 5, 6 and 7 before anyone is told to leave epoch 4:
        // senders still use 4, joiners send in the epoch they joined.
        let mut live = LiveEpochs::new(KidLayout::default(), 4);
        for e in 5..=7 {
            live.committed(e);
        }
        assert!((4..=7).all(|e| opus_ok(&live, e)));
        assert!(!opus_ok(&live, 3) && !opus_ok(&live, 8));
        // 5 and 6 were superseded before they were ready; 7 is.
        live.ready(7);
        assert!(opus_ok(&live, 4) && opus_ok(&live, 7));
        assert!(opus_ok(&live, 5), "between the two ready epochs");
        live.committed(8);
        live.ready(8);
        assert!(!opus_ok(&live, 4) && !opus_ok(&live, 6));
        assert!(opus_ok(&live, 7) && opus_ok(&live, 8));
    }

    #[test]
    fn a_removal_ends_the_removed_members_epochs_once_the_group_moves_on() {
        // Senders use 4; a commit to 5 removes someone who holds 4.
        let mut live = LiveEpochs::new(KidLayout::default(), 4);
        live.removed(5);
        assert!(opus_ok(&live, 4) && opus_ok(&live, 5));
        // A join commits 6 before 5 is ready: 4 stops although senders
        // have not switched yet (their media waits for epoch_ready).
        live.committed(6);
        assert!(!opus_ok(&live, 4));
        assert!(opus_ok(&live, 5) && opus_ok(&live, 6));
        live.ready(6);
        assert!(!opus_ok(&live, 4) && opus_ok(&live, 6));
        // Join-only commits alone never end an epoch senders use.
        let mut joins = LiveEpochs::new(KidLayout::default(), 4);
        joins.committed(5);
        joins.committed(6);
        assert!(opus_ok(&joins, 4));
    }

    #[test]
    fn epoch_bits_wrap() {
        let mut live = LiveEpochs::new(KidLayout::default(), 254);
        live.committed(256);
        assert!(opus_ok(&live, 254) && opus_ok(&live, 255) && opus_ok(&live, 256));
        assert!(!opus_ok(&live, 257) && !opus_ok(&live, 253));
    }

    #[test]
    fn a_group_made_anew_starts_over() {
        let mut live = LiveEpochs::new(KidLayout::default(), 9);
        live.committed(0);
        assert!(opus_ok(&live, 0));
        assert!(!opus_ok(&live, 9));
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
