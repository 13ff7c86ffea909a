//! Frame protection: the RFC 9605 §4.4 encrypt/decrypt operations, codec-aware
//! clear prefixes, the per-sender counter and the replay window.
//!
//! Wire layout of a protected media frame:
//!
//! ```text
//! | clear codec prefix | SFrame header | ciphertext | tag |
//! ```
//!
//! The clear prefix is what packetizers and the SFU must read (VP8: the frame
//! tag and, on key frames, the start code and dimensions). It is bound as the
//! SFrame `metadata`, so the AEAD's AAD is `header || prefix` and any change to
//! the prefix makes the frame fail to authenticate.

use zeroize::Zeroizing;

use super::SframeError;
use super::header::{Header, MAX_HEADER_LEN};
use super::suite::{AeadKey, CipherSuite, NONCE_LEN, derive_key_salt};

/// The longest metadata (clear prefix) a frame may bind.
pub const MAX_METADATA_LEN: usize = 64;
/// The largest frame accepted, clear or protected (16 MiB).
pub const MAX_FRAME_LEN: usize = 16 << 20;
/// Bytes SFrame adds to a frame at most: the longest header and tag.
pub const MAX_OVERHEAD: usize = MAX_HEADER_LEN + super::suite::MAX_TAG_LEN;

/// The media codec of a frame, which decides its clear prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Opus audio: no clear prefix.
    Opus,
    /// VP8 video: 10 clear bytes on a key frame, 3 on a delta frame (RFC 6386 §9.1).
    Vp8,
    /// Opaque data with no clear prefix.
    Opaque,
}

/// Length of the clear prefix of `frame` for `codec`.
///
/// For VP8 this reads the inverse key-frame bit of the frame tag, which is
/// the same in the clear frame and in the protected one.
pub fn clear_prefix_len(codec: Codec, frame: &[u8]) -> Result<usize, SframeError> {
    match codec {
        Codec::Opus | Codec::Opaque => Ok(0),
        Codec::Vp8 => {
            let first = *frame.first().ok_or(SframeError::TruncatedFrame)?;
            let len = if first & 0x01 == 0 { 10 } else { 3 };
            if frame.len() < len {
                return Err(SframeError::TruncatedFrame);
            }
            Ok(len)
        }
    }
}

/// Whether a VP8 frame (clear or protected) is a key frame.
pub fn vp8_is_key_frame(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 0x01 == 0)
}

/// The key and salt of one KID, ready to protect frames.
#[derive(Clone)]
pub struct FrameKey {
    kid: u64,
    salt: Zeroizing<[u8; NONCE_LEN]>,
    aead: AeadKey,
}

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameKey")
            .field("kid", &self.kid)
            .field("suite", &self.aead.suite())
            .finish_non_exhaustive()
    }
}

/// Builds `header || metadata` in a stack buffer and calls `f` with it.
fn with_aad<R>(
    header: &[u8],
    metadata: &[u8],
    f: impl FnOnce(&[u8]) -> Result<R, SframeError>,
) -> Result<R, SframeError> {
    if metadata.len() > MAX_METADATA_LEN {
        return Err(SframeError::MetadataTooLong(metadata.len()));
    }
    let mut aad = [0u8; MAX_HEADER_LEN + MAX_METADATA_LEN];
    let n = header.len() + metadata.len();
    aad[..header.len()].copy_from_slice(header);
    aad[header.len()..n].copy_from_slice(metadata);
    f(&aad[..n])
}

impl FrameKey {
    /// Derives the key and salt of `kid` from `base_key` (RFC 9605 §4.4.2).
    pub fn derive(suite: CipherSuite, kid: u64, base_key: &[u8]) -> Result<Self, SframeError> {
        let d = derive_key_salt(suite, kid, base_key)?;
        Ok(Self {
            kid,
            salt: d.salt,
            aead: AeadKey::new(suite, &d.key)?,
        })
    }

    /// The key id.
    pub fn kid(&self) -> u64 {
        self.kid
    }

    /// The cipher suite.
    pub fn suite(&self) -> CipherSuite {
        self.aead.suite()
    }

    /// `nonce = salt XOR encode_big_endian(ctr, Nn)`.
    pub fn nonce(&self, ctr: u64) -> [u8; NONCE_LEN] {
        let mut nonce = *self.salt;
        for (n, c) in nonce[NONCE_LEN - 8..].iter_mut().zip(ctr.to_be_bytes()) {
            *n ^= c;
        }
        nonce
    }

    /// Protected length of a `plaintext_len`-byte payload under counter `ctr`.
    pub fn protected_len(&self, ctr: u64, plaintext_len: usize) -> usize {
        Header::new(self.kid, ctr).encoded_len() + plaintext_len + self.suite().tag_len()
    }

    /// RFC 9605 §4.4.3: writes `header || ciphertext || tag` into `out` and
    /// returns its length. `metadata` is authenticated but not written.
    pub fn seal(
        &self,
        ctr: u64,
        metadata: &[u8],
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SframeError> {
        if plaintext.len() > MAX_FRAME_LEN {
            return Err(SframeError::FrameTooLarge);
        }
        let needed = self.protected_len(ctr, plaintext.len());
        if out.len() < needed {
            return Err(SframeError::BufferTooSmall {
                needed,
                available: out.len(),
            });
        }
        let out = &mut out[..needed];
        let hlen = Header::new(self.kid, ctr).encode(out)?;
        let (header, body) = out.split_at_mut(hlen);
        let (ct, tag) = body.split_at_mut(plaintext.len());
        ct.copy_from_slice(plaintext);
        let nonce = self.nonce(ctr);
        with_aad(header, metadata, |aad| {
            self.aead.seal_in_place(&nonce, aad, ct, tag)
        })?;
        Ok(needed)
    }

    /// RFC 9605 §4.4.4 after the header was parsed: `header_bytes` is the
    /// encoded header, `body` is `ciphertext || tag`. Writes the plaintext
    /// into `out` and returns its length.
    pub fn open(
        &self,
        ctr: u64,
        header_bytes: &[u8],
        metadata: &[u8],
        body: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SframeError> {
        let tag_len = self.suite().tag_len();
        let ct_len = body
            .len()
            .checked_sub(tag_len)
            .ok_or(SframeError::TruncatedFrame)?;
        if out.len() < ct_len {
            return Err(SframeError::BufferTooSmall {
                needed: ct_len,
                available: out.len(),
            });
        }
        let (ct, tag) = body.split_at(ct_len);
        let pt = &mut out[..ct_len];
        pt.copy_from_slice(ct);
        let nonce = self.nonce(ctr);
        let opened = with_aad(header_bytes, metadata, |aad| {
            self.aead.open_in_place(&nonce, aad, pt, tag)
        });
        if opened.is_err() {
            // Never leave unauthenticated plaintext in the caller's buffer.
            pt.fill(0);
        }
        opened.map(|()| ct_len)
    }
}

/// A protected frame split into its parts, without any key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedFrame<'a> {
    /// The clear codec prefix (the SFrame metadata).
    pub prefix: &'a [u8],
    /// The decoded header.
    pub header: Header,
    /// The header as it was on the wire.
    pub header_bytes: &'a [u8],
    /// `ciphertext || tag`.
    pub body: &'a [u8],
}

/// Splits a protected frame into prefix, header and body. This is all an SFU
/// may learn about a frame.
pub fn parse_protected(codec: Codec, frame: &[u8]) -> Result<ParsedFrame<'_>, SframeError> {
    if frame.len() > MAX_FRAME_LEN + MAX_OVERHEAD + MAX_METADATA_LEN {
        return Err(SframeError::FrameTooLarge);
    }
    let plen = clear_prefix_len(codec, frame)?;
    let (prefix, rest) = frame.split_at(plen);
    let (header, hlen) = Header::decode(rest)?;
    let (header_bytes, body) = rest.split_at(hlen);
    Ok(ParsedFrame {
        prefix,
        header,
        header_bytes,
        body,
    })
}

/// A sender's frame protector: one outbound stream, one key at a time.
///
/// The counter is monotonic for the lifetime of the encryptor, across key
/// changes, so no (key, nonce) pair is ever used twice even if a KID is
/// reinstalled.
#[derive(Debug)]
pub struct FrameEncryptor {
    key: FrameKey,
    next_ctr: u64,
}

impl FrameEncryptor {
    /// Starts protecting with `key`.
    pub fn new(key: FrameKey) -> Self {
        Self { key, next_ctr: 0 }
    }

    /// Switches to a new key; the counter keeps counting.
    pub fn set_key(&mut self, key: FrameKey) {
        self.key = key;
    }

    /// The KID frames are currently protected under.
    pub fn kid(&self) -> u64 {
        self.key.kid
    }

    /// The counter the next frame will carry.
    pub fn next_counter(&self) -> u64 {
        self.next_ctr
    }

    /// Protects `frame` into `out` (which needs `frame.len() + MAX_OVERHEAD`
    /// bytes) and returns the protected length. The codec's clear prefix is
    /// copied ahead of the header and bound as metadata.
    pub fn encrypt(
        &mut self,
        codec: Codec,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SframeError> {
        let ctr = self.next_ctr;
        let next = ctr.checked_add(1).ok_or(SframeError::CounterExhausted)?;
        let plen = clear_prefix_len(codec, frame)?;
        let (prefix, payload) = frame.split_at(plen);
        if out.len() < plen {
            return Err(SframeError::BufferTooSmall {
                needed: plen + self.key.protected_len(ctr, payload.len()),
                available: out.len(),
            });
        }
        let (out_prefix, out_rest) = out.split_at_mut(plen);
        let n = self
            .key
            .seal(ctr, prefix, payload, out_rest)
            .map_err(|e| match e {
                SframeError::BufferTooSmall { needed, available } => SframeError::BufferTooSmall {
                    needed: needed + plen,
                    available: available + plen,
                },
                other => other,
            })?;
        out_prefix.copy_from_slice(prefix);
        self.next_ctr = next;
        Ok(plen + n)
    }
}

/// Sliding replay window over one key's counters (128 counters wide).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    highest: Option<u64>,
    /// Bit i set: counter `highest - i` was seen.
    seen: u128,
}

impl ReplayWindow {
    /// How far behind the highest counter a frame may arrive.
    pub const WIDTH: u64 = 128;

    /// Checks `ctr` without recording it.
    pub fn check(&self, ctr: u64) -> Result<(), SframeError> {
        let Some(high) = self.highest else {
            return Ok(());
        };
        if ctr > high {
            return Ok(());
        }
        let age = high - ctr;
        if age >= Self::WIDTH {
            return Err(SframeError::TooOld { ctr });
        }
        if self.seen & (1u128 << age) != 0 {
            return Err(SframeError::Replayed { ctr });
        }
        Ok(())
    }

    /// Records `ctr` as seen (call only after the frame authenticated).
    pub fn accept(&mut self, ctr: u64) {
        match self.highest {
            None => {
                self.highest = Some(ctr);
                self.seen = 1;
            }
            Some(high) if ctr > high => {
                let shift = ctr - high;
                self.seen = if shift >= Self::WIDTH {
                    0
                } else {
                    self.seen << shift
                };
                self.seen |= 1;
                self.highest = Some(ctr);
            }
            Some(high) => {
                let age = high - ctr;
                if age < Self::WIDTH {
                    self.seen |= 1u128 << age;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> FrameKey {
        FrameKey::derive(CipherSuite::AesGcm256Sha512, 0x1234, &[7u8; 32]).unwrap()
    }

    #[test]
    fn vp8_prefix_follows_the_key_frame_bit() {
        let key_frame = [
            0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01, 0xff,
        ];
        assert_eq!(clear_prefix_len(Codec::Vp8, &key_frame).unwrap(), 10);
        let delta = [0x31, 0x02, 0x00, 0xaa];
        assert_eq!(clear_prefix_len(Codec::Vp8, &delta).unwrap(), 3);
        assert_eq!(clear_prefix_len(Codec::Opus, &delta).unwrap(), 0);
        assert_eq!(
            clear_prefix_len(Codec::Vp8, &key_frame[..9]),
            Err(SframeError::TruncatedFrame)
        );
        assert_eq!(
            clear_prefix_len(Codec::Vp8, &[]),
            Err(SframeError::TruncatedFrame)
        );
    }

    #[test]
    fn encrypt_keeps_prefix_clear_and_counts_up() {
        let mut enc = FrameEncryptor::new(key());
        let frame = [0x31, 0x02, 0x00, 1, 2, 3, 4, 5];
        let mut out = [0u8; 64];
        let n = enc.encrypt(Codec::Vp8, &frame, &mut out).unwrap();
        assert_eq!(&out[..3], &frame[..3]);
        assert_eq!(n, frame.len() + 1 + 2 + 16);
        let p = parse_protected(Codec::Vp8, &out[..n]).unwrap();
        assert_eq!(p.header, Header::new(0x1234, 0));
        enc.encrypt(Codec::Vp8, &frame, &mut out).unwrap();
        assert_eq!(enc.next_counter(), 2);
    }

    #[test]
    fn too_small_output_is_reported_with_the_needed_size() {
        let mut enc = FrameEncryptor::new(key());
        let frame = [0u8; 100];
        let mut out = [0u8; 50];
        assert!(matches!(
            enc.encrypt(Codec::Opus, &frame, &mut out),
            Err(SframeError::BufferTooSmall { needed: 119, .. })
        ));
        // A failed encryption does not consume a counter.
        assert_eq!(enc.next_counter(), 0);
    }

    #[test]
    fn replay_window_rejects_repeats_and_stale_counters() {
        let mut w = ReplayWindow::default();
        for ctr in [5, 3, 4, 200] {
            w.check(ctr).unwrap();
            w.accept(ctr);
        }
        assert_eq!(w.check(200), Err(SframeError::Replayed { ctr: 200 }));
        assert_eq!(w.check(5), Err(SframeError::TooOld { ctr: 5 }));
        assert!(w.check(199).is_ok());
        assert!(w.check(73).is_ok());
        assert_eq!(w.check(72), Err(SframeError::TooOld { ctr: 72 }));
    }
}
