//! E2EE-aware forwarding check.
//!
//! The SFU never holds a key. For each media frame it reads the codec's clear
//! prefix and the SFrame header that follows, and forwards the frame only if
//! the header is well formed and its KID names an epoch senders may be using:
//! the epoch senders were last told to switch to (`epoch_ready`), the one
//! before it and, for [`IN_FLIGHT`], older ones (frames still in flight or in
//! a sender's pacer), or one committed since (new members send in the epoch
//! they joined before it is ready). Anything else — plaintext from a misconfigured client, a truncated
//! frame, a stale epoch — is dropped and counted by reason, so no client can
//! leak clear media to the others through the SFU.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use conclave_protocol::sframe::{Codec, KidLayout, SframeError, parse_protected};

/// How long an epoch senders were told to leave stays live, for frames
/// already on their way: a browser's paced sender may hold video that long
/// (libwebrtc's longest expected pacer queue), and a sender switches only
/// when its own `epoch_ready` arrives, while two ready epochs can reach the
/// SFU back to back. Members keep old receive keys longer than this (10 s).
/// A removal is not softened by it: see [`LiveEpochs::removed`].
pub const IN_FLIGHT: Duration = Duration::from_secs(2);

/// Most epochs kept live by [`IN_FLIGHT`] at once (more ready epochs in
/// that time retire the oldest early).
const MAX_LINGERING: usize = 16;

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
/// the epoch they joined, before it is ready); older ready epochs linger for
/// [`IN_FLIGHT`] after they stop being that one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveEpochs {
    layout: KidLayout,
    ready: u64,
    previous_ready: Option<u64>,
    committed: u64,
    /// The latest commit that removed members.
    removal: Option<u64>,
    /// Ready epochs older than `previous_ready`, oldest first, each with the
    /// time it stops being live.
    lingering: VecDeque<(u64, Instant)>,
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
            lingering: VecDeque::new(),
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

    /// Senders were told to switch to `epoch` at `now`; the ready epoch
    /// before it stays live for frames in flight, older ones for
    /// [`IN_FLIGHT`] more.
    pub fn ready(&mut self, epoch: u64, now: Instant) {
        if epoch < self.ready {
            *self = Self::new(self.layout, epoch);
        } else if epoch > self.ready {
            self.lingering.retain(|(_, until)| *until > now);
            if let Some(p) = self.previous_ready {
                if self.lingering.len() == MAX_LINGERING {
                    self.lingering.pop_front();
                }
                self.lingering.push_back((p, now + IN_FLIGHT));
            }
            self.previous_ready = Some(self.ready);
            self.ready = epoch;
            self.committed = self.committed.max(epoch);
        }
    }

    fn allows(&self, kid: u64, now: Instant) -> bool {
        // Live: from the oldest lingering ready epoch (or else the one
        // before the current one, or the current one) up to the newest
        // commit, compared on the KID's epoch bits.
        let layout = self.layout;
        let mut oldest = self.previous_ready.unwrap_or(self.ready);
        if let Some((e, _)) = self.lingering.iter().find(|(_, until)| *until > now) {
            oldest = oldest.min(*e);
        }
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

    /// Checks one whole frame as the SFU sees it (after depacketization) at
    /// `now`.
    pub fn check(&self, codec: Codec, frame: &[u8], now: Instant) -> Result<(), DropReason> {
        let parsed = parse_protected(codec, frame).map_err(|e| match e {
            SframeError::TruncatedFrame | SframeError::TruncatedHeader => DropReason::Truncated,
            _ => DropReason::NotSframe,
        })?;
        if parsed.body.len() < MIN_TAG_LEN {
            return Err(DropReason::Truncated);
        }
        if !self.allows(parsed.header.kid, now) {
            tracing::debug!(
                kid_epoch = self.layout.kid_epoch_low(parsed.header.kid),
                ready = self.ready,
                previous_ready = ?self.previous_ready,
                committed = self.committed,
                removal = ?self.removal,
                lingering = self.lingering.len(),
                "frame of an epoch that is not live"
            );
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

    fn opus_ok(live: &LiveEpochs, epoch: u64, at: Instant) -> bool {
        live.check(Codec::Opus, &protected(epoch, b"opus", Codec::Opus), at)
            .is_ok()
    }

    /// Just after [`IN_FLIGHT`] from `t0`.
    fn after_in_flight(t0: Instant) -> Instant {
        t0 + IN_FLIGHT + Duration::from_millis(1)
    }

    #[test]
    fn forwards_the_ready_epoch_and_the_one_before_it() {
        let t0 = Instant::now();
        let late = after_in_flight(t0);
        let mut live = LiveEpochs::new(KidLayout::default(), 4);
        let vp8 = [0x31u8, 0x02, 0x00, 9, 9, 9, 9];
        assert_eq!(
            live.check(Codec::Vp8, &protected(4, &vp8, Codec::Vp8), t0),
            Ok(())
        );
        live.committed(5);
        live.ready(5, t0);
        assert_eq!(
            live.check(Codec::Vp8, &protected(4, &vp8, Codec::Vp8), late),
            Ok(()),
            "the ready epoch before the current one has no time limit"
        );
        assert!(opus_ok(&live, 5, t0));
        live.committed(6);
        live.ready(6, t0);
        // 4 lingers for frames in flight, then stops.
        assert_eq!(
            live.check(Codec::Vp8, &protected(4, &vp8, Codec::Vp8), t0),
            Ok(())
        );
        assert_eq!(
            live.check(Codec::Vp8, &protected(4, &vp8, Codec::Vp8), late),
            Err(DropReason::StaleEpoch)
        );
        assert!(opus_ok(&live, 5, late) && opus_ok(&live, 6, late));
        assert!(!opus_ok(&live, 7, t0), "not committed yet");
    }

    #[test]
    fn ready_epochs_back_to_back_keep_the_senders_last_epoch_live_in_flight() {
        // Two ready epochs reach the SFU 5 ms apart; a sender that switched
        // from 4 on the first still has epoch-4 video in its pacer.
        let t0 = Instant::now();
        let mut live = LiveEpochs::new(KidLayout::default(), 4);
        live.committed(6);
        live.ready(5, t0);
        live.ready(6, t0 + Duration::from_millis(5));
        assert!(opus_ok(&live, 4, t0 + Duration::from_millis(60)));
        assert!(!opus_ok(
            &live,
            4,
            after_in_flight(t0 + Duration::from_millis(5))
        ));
        assert!(!opus_ok(&live, 3, t0), "older than any epoch senders used");
        // Each lingering epoch keeps its own deadline.
        let t1 = t0 + Duration::from_secs(1);
        live.committed(7);
        live.ready(7, t1);
        assert!(opus_ok(&live, 4, t1) && opus_ok(&live, 5, t1));
        let t2 = after_in_flight(t0 + Duration::from_millis(5));
        assert!(!opus_ok(&live, 4, t2) && opus_ok(&live, 5, t2));
        assert!(!opus_ok(&live, 5, after_in_flight(t1)));
        assert!(opus_ok(&live, 6, after_in_flight(t1)));
    }

    #[test]
    fn commits_faster_than_acks_keep_the_senders_epoch_live() {
        // Joins commit 5, 6 and 7 before anyone is told to leave epoch 4:
        // senders still use 4, joiners send in the epoch they joined.
        let t0 = Instant::now();
        let late = after_in_flight(t0);
        let mut live = LiveEpochs::new(KidLayout::default(), 4);
        for e in 5..=7 {
            live.committed(e);
        }
        assert!((4..=7).all(|e| opus_ok(&live, e, t0)));
        assert!(!opus_ok(&live, 3, t0) && !opus_ok(&live, 8, t0));
        // 5 and 6 were superseded before they were ready; 7 is.
        live.ready(7, t0);
        assert!(opus_ok(&live, 4, late) && opus_ok(&live, 7, late));
        assert!(opus_ok(&live, 5, late), "between the two ready epochs");
        live.committed(8);
        live.ready(8, t0);
        assert!(opus_ok(&live, 4, t0) && opus_ok(&live, 6, t0), "in flight");
        assert!(!opus_ok(&live, 4, late) && !opus_ok(&live, 6, late));
        assert!(opus_ok(&live, 7, late) && opus_ok(&live, 8, late));
    }

    #[test]
    fn a_removal_ends_the_removed_members_epochs_once_the_group_moves_on() {
        let t0 = Instant::now();
        // Senders use 4; a commit to 5 removes someone who holds 4.
        let mut live = LiveEpochs::new(KidLayout::default(), 4);
        live.removed(5);
        assert!(opus_ok(&live, 4, t0) && opus_ok(&live, 5, t0));
        // A join commits 6 before 5 is ready: 4 stops although senders
        // have not switched yet (their media waits for epoch_ready).
        live.committed(6);
        assert!(!opus_ok(&live, 4, t0));
        assert!(opus_ok(&live, 5, t0) && opus_ok(&live, 6, t0));
        live.ready(6, t0);
        assert!(!opus_ok(&live, 4, t0) && opus_ok(&live, 6, t0));
        // Join-only commits alone never end an epoch senders use.
        let mut joins = LiveEpochs::new(KidLayout::default(), 4);
        joins.committed(5);
        joins.committed(6);
        assert!(opus_ok(&joins, 4, t0));
    }

    #[test]
    fn a_removal_ends_lingering_epochs_at_once() {
        let t0 = Instant::now();
        let mut live = LiveEpochs::new(KidLayout::default(), 4);
        live.ready(5, t0);
        live.ready(6, t0);
        assert!(opus_ok(&live, 4, t0), "lingering");
        live.removed(7);
        live.committed(8);
        assert!((4..=6).all(|e| !opus_ok(&live, e, t0)));
        assert!(opus_ok(&live, 7, t0) && opus_ok(&live, 8, t0));
    }

    #[test]
    fn epoch_bits_wrap() {
        let mut live = LiveEpochs::new(KidLayout::default(), 254);
        live.committed(256);
        let t0 = Instant::now();
        assert!(opus_ok(&live, 254, t0) && opus_ok(&live, 255, t0) && opus_ok(&live, 256, t0));
        assert!(!opus_ok(&live, 257, t0) && !opus_ok(&live, 253, t0));
    }

    #[test]
    fn a_group_made_anew_starts_over() {
        let mut live = LiveEpochs::new(KidLayout::default(), 9);
        live.committed(0);
        let t0 = Instant::now();
        assert!(opus_ok(&live, 0, t0));
        assert!(!opus_ok(&live, 9, t0));
    }

    #[test]
    fn drops_plaintext_and_truncated_frames() {
        let live = LiveEpochs::new(KidLayout::default(), 0);
        let t0 = Instant::now();
        // A clear VP8 delta frame: the byte after the prefix is payload, not a
        // header; as a header it announces more bytes than the frame has.
        assert_eq!(
            live.check(Codec::Vp8, &[0x31, 0x02, 0x00, 0xff, 0x10], t0),
            Err(DropReason::Truncated)
        );
        assert_eq!(live.check(Codec::Opus, &[], t0), Err(DropReason::Truncated));
        assert_eq!(
            live.check(Codec::Vp8, &[0x50, 0x2a], t0),
            Err(DropReason::Truncated)
        );
        // Header present but no room for a tag.
        assert_eq!(
            live.check(Codec::Opus, &[0x00, 1, 2], t0),
            Err(DropReason::Truncated)
        );
    }
}
