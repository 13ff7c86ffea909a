//! SFrame (RFC 9605): end-to-end protection of media frames.
//!
//! - [`header`]: the KID/CTR header, every length.
//! - [`suite`]: the five registered cipher suites, key derivation, AEADs.
//! - [`frame`]: protecting frames with a codec's clear prefix bound as
//!   metadata, the per-sender counter and the replay window.
//! - [`keyring`]: keys per MLS epoch and sender (RFC 9605 §5.2).
//!
//! Every operation writes into a caller-provided buffer; none allocates per
//! frame, none panics on malformed input.

pub mod frame;
pub mod header;
pub mod keyring;
pub mod suite;

pub use frame::{
    Codec, FrameEncryptor, FrameKey, MAX_FRAME_LEN, MAX_METADATA_LEN, MAX_OVERHEAD, ParsedFrame,
    ReplayWindow, clear_prefix_len, parse_protected, vp8_is_key_frame,
};
pub use header::{Header, MAX_HEADER_LEN};
pub use keyring::{
    DecryptedFrame, EpochSecret, KeyRing, KeyRingConfig, KidLayout, KidParts, LeafSet,
};
pub use suite::{AeadKey, CipherSuite, DerivedKey, NONCE_LEN, derive_key_salt};

/// Why a frame could not be protected or unprotected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SframeError {
    /// The header announces more bytes than the frame has.
    #[error("SFrame header is truncated")]
    TruncatedHeader,
    /// The frame is shorter than its codec prefix or its tag.
    #[error("frame is truncated")]
    TruncatedFrame,
    /// The frame exceeds the largest supported size.
    #[error("frame exceeds {} bytes", MAX_FRAME_LEN)]
    FrameTooLarge,
    /// The metadata (clear prefix) is longer than supported.
    #[error("metadata of {0} bytes exceeds {max}", max = MAX_METADATA_LEN)]
    MetadataTooLong(usize),
    /// The caller's output buffer is too small.
    #[error("output buffer too small: need {needed} bytes, have {available}")]
    BufferTooSmall {
        /// Bytes required.
        needed: usize,
        /// Bytes provided.
        available: usize,
    },
    /// No key is known for this KID (unknown sender, or an epoch no longer held).
    #[error("unknown KID {0:#x}")]
    UnknownKid(u64),
    /// The tag did not verify: wrong key, or the frame, header or prefix was altered.
    #[error("frame failed authentication")]
    AuthenticationFailed,
    /// This counter was already accepted under this key.
    #[error("replayed frame (counter {ctr})")]
    Replayed {
        /// The replayed counter.
        ctr: u64,
    },
    /// The counter is behind the replay window.
    #[error("frame too old for the replay window (counter {ctr})")]
    TooOld {
        /// The stale counter.
        ctr: u64,
    },
    /// The sender's counter space is used up; a new key is required.
    #[error("frame counter exhausted")]
    CounterExhausted,
    /// The cipher suite is not one this implementation supports.
    #[error("unsupported SFrame cipher suite {0:#06x}")]
    UnsupportedSuite(u16),
    /// A key of the wrong length was supplied.
    #[error("key must be {expected} bytes, got {got}")]
    BadKeyLength {
        /// Required length.
        expected: usize,
        /// Supplied length.
        got: usize,
    },
    /// HKDF could not produce the requested output.
    #[error("key derivation failed")]
    KeyDerivation,
    /// The context, sender or epoch does not fit the KID layout.
    #[error("value does not fit the KID layout")]
    KidOverflow,
    /// No epoch has been installed yet.
    #[error("no epoch keys installed")]
    NoEpoch,
}
