//! Keys for SFrame from MLS (RFC 9605 §5.2): the KID layout and a key ring
//! that keeps the current epoch and, for a bounded time, earlier ones.
//!
//! ```text
//! base_key = MLS-Exporter("SFrame 1.0 Base Key", "", AEAD.Nk)      (per epoch)
//! KID      = context << (S + E) | leaf_index << E | epoch mod 2^E
//! ```
//!
//! `E` is fixed for a deployment ([`KidLayout::epoch_bits`]); `S` is the
//! smallest number of bits such that the group's leaf count is `< 2^S`, so it
//! can change from one epoch to the next and is stored with each epoch.
//! Conclave uses the context bits for the sender's stream (audio, camera,
//! screen, simulcast layer), so every outbound stream has its own key.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::SframeError;
use super::frame::{Codec, FrameKey, ReplayWindow, parse_protected};
use super::suite::CipherSuite;

/// How the bits of a KID are shared between context, sender and epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KidLayout {
    epoch_bits: u8,
}

impl Default for KidLayout {
    fn default() -> Self {
        Self { epoch_bits: 8 }
    }
}

/// A KID taken apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KidParts {
    /// The sender's stream context.
    pub context: u64,
    /// The sender's MLS leaf index.
    pub leaf: u32,
    /// The low `E` bits of the epoch.
    pub epoch_low: u64,
}

impl KidLayout {
    /// A layout carrying `epoch_bits` (1–16) low bits of the epoch.
    pub fn new(epoch_bits: u8) -> Result<Self, SframeError> {
        if !(1..=16).contains(&epoch_bits) {
            return Err(SframeError::KidOverflow);
        }
        Ok(Self { epoch_bits })
    }

    /// `E`.
    pub fn epoch_bits(self) -> u8 {
        self.epoch_bits
    }

    /// `S` for a group whose ratchet tree has `leaf_count` leaves.
    pub fn sender_bits(leaf_count: u32) -> u8 {
        // Smallest S with leaf_count < 2^S; at most 32.
        (32 - leaf_count.leading_zeros()) as u8
    }

    fn epoch_mask(self) -> u64 {
        (1u64 << self.epoch_bits) - 1
    }

    /// The low `E` bits of `epoch`, as carried in a KID.
    pub fn epoch_low(self, epoch: u64) -> u64 {
        epoch & self.epoch_mask()
    }

    /// The low epoch bits of a KID; all an SFU needs to check a frame's epoch.
    pub fn kid_epoch_low(self, kid: u64) -> u64 {
        kid & self.epoch_mask()
    }

    /// Builds the KID of (`context`, `leaf`) in `epoch`.
    pub fn kid(
        self,
        epoch: u64,
        sender_bits: u8,
        leaf: u32,
        context: u64,
    ) -> Result<u64, SframeError> {
        let e = u32::from(self.epoch_bits);
        let s = u32::from(sender_bits);
        if s > 32 || u64::from(leaf) >> s != 0 {
            return Err(SframeError::KidOverflow);
        }
        let shift = e + s;
        let context_part = if context == 0 {
            0
        } else {
            if shift >= 64 || context >> (64 - shift) != 0 {
                return Err(SframeError::KidOverflow);
            }
            context << shift
        };
        Ok(context_part | (u64::from(leaf) << e) | self.epoch_low(epoch))
    }

    /// Splits a KID given the epoch's sender bits.
    pub fn split(self, kid: u64, sender_bits: u8) -> KidParts {
        let e = u32::from(self.epoch_bits);
        let s = u32::from(sender_bits.min(32));
        let leaf_mask = (1u64 << s) - 1;
        KidParts {
            context: kid.checked_shr(e + s).unwrap_or(0),
            leaf: ((kid >> e) & leaf_mask) as u32,
            epoch_low: kid & self.epoch_mask(),
        }
    }
}

/// The set of leaf indices that are members in an epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeafSet {
    bits: Vec<u64>,
}

impl LeafSet {
    /// Whether `leaf` is in the set.
    pub fn contains(&self, leaf: u32) -> bool {
        let i = leaf as usize;
        self.bits
            .get(i / 64)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    /// Adds `leaf`.
    pub fn insert(&mut self, leaf: u32) {
        let i = leaf as usize;
        if self.bits.len() <= i / 64 {
            self.bits.resize(i / 64 + 1, 0);
        }
        self.bits[i / 64] |= 1u64 << (i % 64);
    }

    /// Number of leaves in the set.
    pub fn len(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }
}

impl FromIterator<u32> for LeafSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut s = Self::default();
        for leaf in iter {
            s.insert(leaf);
        }
        s
    }
}

/// What a key ring needs to know about one epoch.
pub struct EpochSecret {
    /// The MLS epoch number.
    pub epoch: u64,
    /// `MLS-Exporter("SFrame 1.0 Base Key", "", AEAD.Nk)` of that epoch.
    pub base_key: Zeroizing<Vec<u8>>,
    /// `S` for that epoch.
    pub sender_bits: u8,
    /// Leaf indices of the members of that epoch.
    pub members: LeafSet,
}

impl std::fmt::Debug for EpochSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochSecret")
            .field("epoch", &self.epoch)
            .field("sender_bits", &self.sender_bits)
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

/// Settings of a [`KeyRing`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRingConfig {
    /// The SFrame suite of the call.
    pub suite: CipherSuite,
    /// The KID layout of the call.
    pub layout: KidLayout,
    /// How long an earlier epoch's receive keys stay usable after a newer
    /// epoch was installed, for frames still in flight.
    pub retention: Duration,
}

impl Default for KeyRingConfig {
    fn default() -> Self {
        Self {
            suite: CipherSuite::default(),
            layout: KidLayout::default(),
            retention: Duration::from_secs(10),
        }
    }
}

struct EpochEntry {
    secret: EpochSecret,
    retire_at: Option<Instant>,
}

struct ReceiverKey {
    key: FrameKey,
    window: ReplayWindow,
    epoch: u64,
}

/// Facts about a frame that decrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecryptedFrame {
    /// Length of the clear frame written to the output (prefix included).
    pub len: usize,
    /// The KID it was protected under.
    pub kid: u64,
    /// Its counter.
    pub ctr: u64,
    /// The full MLS epoch of its key.
    pub epoch: u64,
    /// The sender's leaf index.
    pub leaf: u32,
    /// The sender's stream context.
    pub context: u64,
}

/// Receive keys for every sender of a call, per epoch, with replay windows.
///
/// Keys are derived on first use and cached only after a frame authenticated
/// under them, so forged KIDs cost a derivation but never grow the ring.
pub struct KeyRing {
    config: KeyRingConfig,
    epochs: Vec<EpochEntry>,
    keys: HashMap<u64, ReceiverKey>,
    current: Option<u64>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("config", &self.config)
            .field(
                "epochs",
                &self
                    .epochs
                    .iter()
                    .map(|e| e.secret.epoch)
                    .collect::<Vec<_>>(),
            )
            .field("cached_keys", &self.keys.len())
            .finish()
    }
}

impl KeyRing {
    /// An empty ring.
    pub fn new(config: KeyRingConfig) -> Self {
        Self {
            config,
            epochs: Vec::new(),
            keys: HashMap::new(),
            current: None,
        }
    }

    /// The ring's settings.
    pub fn config(&self) -> &KeyRingConfig {
        &self.config
    }

    /// The newest installed epoch.
    pub fn current_epoch(&self) -> Option<u64> {
        self.current
    }

    /// Epochs whose keys are still usable (the current one first).
    pub fn live_epochs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.epochs.iter().map(|e| e.secret.epoch).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    }

    /// Installs a new epoch. Earlier epochs stay usable for the configured
    /// retention from `now`; an epoch whose low bits collide is dropped.
    pub fn install_epoch(&mut self, secret: EpochSecret, now: Instant) {
        let layout = self.config.layout;
        let low = layout.epoch_low(secret.epoch);
        let dropped: Vec<u64> = self
            .epochs
            .iter()
            .filter(|e| layout.epoch_low(e.secret.epoch) == low)
            .map(|e| e.secret.epoch)
            .collect();
        self.epochs
            .retain(|e| layout.epoch_low(e.secret.epoch) != low);
        self.keys.retain(|_, k| !dropped.contains(&k.epoch));
        let retire_at = now + self.config.retention;
        for e in &mut self.epochs {
            if e.retire_at.is_none() {
                e.retire_at = Some(retire_at);
            }
        }
        self.current = Some(secret.epoch);
        self.epochs.push(EpochEntry {
            secret,
            retire_at: None,
        });
    }

    /// Drops every key: the member left or was removed.
    pub fn clear(&mut self) {
        self.epochs.clear();
        self.keys.clear();
        self.current = None;
    }

    /// Drops epochs whose retention ran out.
    pub fn purge(&mut self, now: Instant) {
        if !self
            .epochs
            .iter()
            .any(|e| e.retire_at.is_some_and(|t| now >= t))
        {
            return;
        }
        let mut expired = Vec::new();
        self.epochs.retain(|e| {
            let keep = e.retire_at.is_none_or(|t| now < t);
            if !keep {
                expired.push(e.secret.epoch);
            }
            keep
        });
        self.keys.retain(|_, k| !expired.contains(&k.epoch));
    }

    /// The send key of `leaf`'s stream `context` in `epoch` (still held).
    pub fn sender_key(&self, epoch: u64, leaf: u32, context: u64) -> Result<FrameKey, SframeError> {
        let entry = self
            .epochs
            .iter()
            .find(|e| e.secret.epoch == epoch)
            .ok_or(SframeError::NoEpoch)?;
        let kid =
            self.config
                .layout
                .kid(entry.secret.epoch, entry.secret.sender_bits, leaf, context)?;
        FrameKey::derive(self.config.suite, kid, &entry.secret.base_key)
    }

    /// Authenticates and decrypts a protected frame into `out` (which needs
    /// `frame.len()` bytes), restoring `prefix || payload`.
    pub fn decrypt(
        &mut self,
        now: Instant,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<DecryptedFrame, SframeError> {
        self.purge(now);
        let p = parse_protected(codec, frame)?;
        let kid = p.header.kid;
        let ctr = p.header.ctr;
        let plen = p.prefix.len();
        if out.len() < plen {
            return Err(SframeError::BufferTooSmall {
                needed: frame.len(),
                available: out.len(),
            });
        }
        let (out_prefix, out_payload) = out.split_at_mut(plen);

        let (n, epoch) = if let Some(rk) = self.keys.get_mut(&kid) {
            rk.window.check(ctr)?;
            let n = rk
                .key
                .open(ctr, p.header_bytes, p.prefix, p.body, out_payload)?;
            rk.window.accept(ctr);
            (n, rk.epoch)
        } else {
            let layout = self.config.layout;
            let entry = self
                .epochs
                .iter()
                .find(|e| layout.epoch_low(e.secret.epoch) == layout.kid_epoch_low(kid))
                .ok_or(SframeError::UnknownKid(kid))?;
            let parts = layout.split(kid, entry.secret.sender_bits);
            if !entry.secret.members.contains(parts.leaf) {
                return Err(SframeError::UnknownKid(kid));
            }
            let key = FrameKey::derive(self.config.suite, kid, &entry.secret.base_key)?;
            let n = key.open(ctr, p.header_bytes, p.prefix, p.body, out_payload)?;
            let mut window = ReplayWindow::default();
            window.accept(ctr);
            let epoch = entry.secret.epoch;
            self.keys.insert(kid, ReceiverKey { key, window, epoch });
            (n, epoch)
        };
        out_prefix.copy_from_slice(p.prefix);
        let sender_bits = self
            .epochs
            .iter()
            .find(|e| e.secret.epoch == epoch)
            .map_or(0, |e| e.secret.sender_bits);
        let parts = self.config.layout.split(kid, sender_bits);
        Ok(DecryptedFrame {
            len: plen + n,
            kid,
            ctr,
            epoch,
            leaf: parts.leaf,
            context: parts.context,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sframe::frame::FrameEncryptor;

    fn secret(epoch: u64, key: u8, members: &[u32]) -> EpochSecret {
        EpochSecret {
            epoch,
            base_key: Zeroizing::new(vec![key; 32]),
            sender_bits: KidLayout::sender_bits(8),
            members: members.iter().copied().collect(),
        }
    }

    #[test]
    fn kid_layout_matches_rfc_example_shape() {
        let l = KidLayout::new(4).unwrap();
        // E = 4, S = 6: KID = leaf << 4 | epoch % 16.
        assert_eq!(l.kid(17, 6, 33, 0).unwrap(), 0x211);
        assert_eq!(l.kid(14, 6, 20, 0).unwrap(), 0x14e);
        let kid = l.kid(300, 6, 20, 2).unwrap();
        assert_eq!(
            l.split(kid, 6),
            KidParts {
                context: 2,
                leaf: 20,
                epoch_low: 300 % 16
            }
        );
        assert_eq!(l.kid(1, 6, 64, 0), Err(SframeError::KidOverflow));
        assert_eq!(l.kid(1, 6, 1, u64::MAX), Err(SframeError::KidOverflow));
        assert_eq!(KidLayout::sender_bits(1), 1);
        assert_eq!(KidLayout::sender_bits(2), 2);
        assert_eq!(KidLayout::sender_bits(500), 9);
    }

    #[test]
    fn previous_epoch_is_kept_only_for_the_retention() {
        let t0 = Instant::now();
        let mut ring = KeyRing::new(KeyRingConfig::default());
        ring.install_epoch(secret(1, 1, &[0, 1]), t0);
        let mut enc = FrameEncryptor::new(ring.sender_key(1, 1, 0).unwrap());
        let mut ct = [0u8; 64];
        let mut pt = [0u8; 64];
        let n = enc.encrypt(Codec::Opus, b"hello", &mut ct).unwrap();

        ring.install_epoch(secret(2, 2, &[0, 1]), t0);
        let d = ring
            .decrypt(t0 + Duration::from_secs(9), Codec::Opus, &ct[..n], &mut pt)
            .unwrap();
        assert_eq!((d.epoch, d.leaf, &pt[..d.len]), (1, 1, &b"hello"[..]));

        let n = enc.encrypt(Codec::Opus, b"later", &mut ct).unwrap();
        let late = ring.decrypt(t0 + Duration::from_secs(10), Codec::Opus, &ct[..n], &mut pt);
        assert!(matches!(late, Err(SframeError::UnknownKid(_))));
        assert_eq!(ring.live_epochs(), vec![2]);
    }

    #[test]
    fn non_member_leaf_is_unknown() {
        let t0 = Instant::now();
        let mut ring = KeyRing::new(KeyRingConfig::default());
        ring.install_epoch(secret(1, 1, &[0]), t0);
        let key = FrameKey::derive(
            CipherSuite::default(),
            KidLayout::default()
                .kid(1, KidLayout::sender_bits(8), 5, 0)
                .unwrap(),
            &[1u8; 32],
        )
        .unwrap();
        let mut enc = FrameEncryptor::new(key);
        let mut ct = [0u8; 64];
        let mut pt = [0u8; 64];
        let n = enc.encrypt(Codec::Opus, b"x", &mut ct).unwrap();
        assert!(matches!(
            ring.decrypt(t0, Codec::Opus, &ct[..n], &mut pt),
            Err(SframeError::UnknownKid(_))
        ));
    }
}
