//! SFrame cipher suites (RFC 9605 §4.5), key derivation (§4.4.2) and the
//! AEAD constructions behind them.

use aes::Aes128;
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes128Gcm, Aes256Gcm, KeyInit};
use ctr::cipher::{InnerIvInit, StreamCipher};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha512};
use zeroize::{Zeroize, Zeroizing};

use super::SframeError;

/// Nonce length in bytes, the same for every suite.
pub const NONCE_LEN: usize = 12;
/// The largest authentication tag of any suite.
pub const MAX_TAG_LEN: usize = 16;

/// An SFrame cipher suite (RFC 9605 §8.1 registry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u16)]
pub enum CipherSuite {
    /// `AES_128_CTR_HMAC_SHA256_80` (0x0001).
    AesCtr128HmacSha256_80 = 0x0001,
    /// `AES_128_CTR_HMAC_SHA256_64` (0x0002).
    AesCtr128HmacSha256_64 = 0x0002,
    /// `AES_128_CTR_HMAC_SHA256_32` (0x0003).
    AesCtr128HmacSha256_32 = 0x0003,
    /// `AES_128_GCM_SHA256_128` (0x0004).
    AesGcm128Sha256 = 0x0004,
    /// `AES_256_GCM_SHA512_128` (0x0005), Conclave's default.
    #[default]
    AesGcm256Sha512 = 0x0005,
}

impl CipherSuite {
    /// Every suite this implementation supports.
    pub const ALL: [CipherSuite; 5] = [
        CipherSuite::AesCtr128HmacSha256_80,
        CipherSuite::AesCtr128HmacSha256_64,
        CipherSuite::AesCtr128HmacSha256_32,
        CipherSuite::AesGcm128Sha256,
        CipherSuite::AesGcm256Sha512,
    ];

    /// Looks a suite up by its registry value.
    pub fn from_id(id: u16) -> Result<Self, SframeError> {
        Self::ALL
            .into_iter()
            .find(|s| s.id() == id)
            .ok_or(SframeError::UnsupportedSuite(id))
    }

    /// The registry value.
    pub const fn id(self) -> u16 {
        self as u16
    }

    /// `AEAD.Nk`: the length of `sframe_key` (and of the MLS-exported base key).
    pub const fn key_len(self) -> usize {
        match self {
            Self::AesCtr128HmacSha256_80
            | Self::AesCtr128HmacSha256_64
            | Self::AesCtr128HmacSha256_32 => 48,
            Self::AesGcm128Sha256 => 16,
            Self::AesGcm256Sha512 => 32,
        }
    }

    /// `AEAD.Nt`: the authentication tag length.
    pub const fn tag_len(self) -> usize {
        match self {
            Self::AesCtr128HmacSha256_80 => 10,
            Self::AesCtr128HmacSha256_64 => 8,
            Self::AesCtr128HmacSha256_32 => 4,
            Self::AesGcm128Sha256 | Self::AesGcm256Sha512 => 16,
        }
    }

    fn uses_sha512(self) -> bool {
        matches!(self, Self::AesGcm256Sha512)
    }
}

/// `sframe_key` and `sframe_salt` for one KID (RFC 9605 §4.4.2).
pub struct DerivedKey {
    /// `sframe_key`, `AEAD.Nk` bytes.
    pub key: Zeroizing<Vec<u8>>,
    /// `sframe_salt`, `AEAD.Nn` bytes.
    pub salt: Zeroizing<[u8; NONCE_LEN]>,
}

impl std::fmt::Debug for DerivedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DerivedKey { .. }")
    }
}

fn label(prefix: &[u8], kid: u64, suite: CipherSuite) -> Zeroizing<Vec<u8>> {
    let mut l = Zeroizing::new(Vec::with_capacity(prefix.len() + 10));
    l.extend_from_slice(prefix);
    l.extend_from_slice(&kid.to_be_bytes());
    l.extend_from_slice(&suite.id().to_be_bytes());
    l
}

/// Derives `sframe_key` and `sframe_salt` for `kid` from `base_key`:
/// `HKDF-Extract("", base_key)`, then `HKDF-Expand` with the labels
/// `"SFrame 1.0 Secret key " || KID || suite` and `"... salt " || KID || suite`.
pub fn derive_key_salt(
    suite: CipherSuite,
    kid: u64,
    base_key: &[u8],
) -> Result<DerivedKey, SframeError> {
    let key_label = label(b"SFrame 1.0 Secret key ", kid, suite);
    let salt_label = label(b"SFrame 1.0 Secret salt ", kid, suite);
    let mut key = Zeroizing::new(vec![0u8; suite.key_len()]);
    let mut salt = Zeroizing::new([0u8; NONCE_LEN]);
    let expanded = if suite.uses_sha512() {
        let hk = Hkdf::<Sha512>::new(Some(&[]), base_key);
        hk.expand(&key_label, &mut key)
            .and_then(|()| hk.expand(&salt_label, salt.as_mut_slice()))
    } else {
        let hk = Hkdf::<Sha256>::new(Some(&[]), base_key);
        hk.expand(&key_label, &mut key)
            .and_then(|()| hk.expand(&salt_label, salt.as_mut_slice()))
    };
    expanded.map_err(|_| SframeError::KeyDerivation)?;
    Ok(DerivedKey { key, salt })
}

/// A keyed AEAD of one suite, ready to seal and open in place.
#[derive(Clone)]
pub struct AeadKey {
    suite: CipherSuite,
    inner: AeadInner,
}

#[derive(Clone)]
enum AeadInner {
    Gcm128(Box<Aes128Gcm>),
    Gcm256(Box<Aes256Gcm>),
    CtrHmac {
        enc: Box<Aes128>,
        auth: Box<Hmac<Sha256>>,
    },
}

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AeadKey")
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

type Aes128Ctr = ctr::Ctr32BE<Aes128>;

impl AeadKey {
    /// Keys the suite's AEAD with `key` (`AEAD.Nk` bytes).
    pub fn new(suite: CipherSuite, key: &[u8]) -> Result<Self, SframeError> {
        if key.len() != suite.key_len() {
            return Err(SframeError::BadKeyLength {
                expected: suite.key_len(),
                got: key.len(),
            });
        }
        let inner = match suite {
            CipherSuite::AesGcm128Sha256 => AeadInner::Gcm128(Box::new(
                Aes128Gcm::new_from_slice(key).map_err(|_| SframeError::KeyDerivation)?,
            )),
            CipherSuite::AesGcm256Sha512 => AeadInner::Gcm256(Box::new(
                Aes256Gcm::new_from_slice(key).map_err(|_| SframeError::KeyDerivation)?,
            )),
            CipherSuite::AesCtr128HmacSha256_80
            | CipherSuite::AesCtr128HmacSha256_64
            | CipherSuite::AesCtr128HmacSha256_32 => {
                // RFC 9605 §4.5.1: the first 16 bytes key AES-CTR, the rest HMAC.
                let (enc_key, auth_key) = key.split_at(16);
                AeadInner::CtrHmac {
                    enc: Box::new(
                        Aes128::new_from_slice(enc_key).map_err(|_| SframeError::KeyDerivation)?,
                    ),
                    auth: Box::new(
                        <Hmac<Sha256> as Mac>::new_from_slice(auth_key)
                            .map_err(|_| SframeError::KeyDerivation)?,
                    ),
                }
            }
        };
        Ok(Self { suite, inner })
    }

    /// The suite this key belongs to.
    pub fn suite(&self) -> CipherSuite {
        self.suite
    }

    /// Encrypts `buf` in place and writes the tag to `tag` (exactly `Nt` bytes).
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &mut [u8],
    ) -> Result<(), SframeError> {
        debug_assert_eq!(tag.len(), self.suite.tag_len());
        match &self.inner {
            AeadInner::Gcm128(c) => {
                let t = c
                    .encrypt_in_place_detached(nonce.into(), aad, buf)
                    .map_err(|_| SframeError::FrameTooLarge)?;
                tag.copy_from_slice(&t);
            }
            AeadInner::Gcm256(c) => {
                let t = c
                    .encrypt_in_place_detached(nonce.into(), aad, buf)
                    .map_err(|_| SframeError::FrameTooLarge)?;
                tag.copy_from_slice(&t);
            }
            AeadInner::CtrHmac { enc, auth } => {
                ctr_keystream(enc, nonce, buf);
                let full = ctr_hmac_tag(auth, self.suite.tag_len(), nonce, aad, buf);
                tag.copy_from_slice(&full[..tag.len()]);
            }
        }
        Ok(())
    }

    /// Authenticates and decrypts `buf` in place; `tag` must be `Nt` bytes.
    /// On failure `buf` may hold garbage and must not be used.
    pub fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8],
    ) -> Result<(), SframeError> {
        if tag.len() != self.suite.tag_len() {
            return Err(SframeError::AuthenticationFailed);
        }
        match &self.inner {
            AeadInner::Gcm128(c) => c
                .decrypt_in_place_detached(nonce.into(), aad, buf, tag.into())
                .map_err(|_| SframeError::AuthenticationFailed),
            AeadInner::Gcm256(c) => c
                .decrypt_in_place_detached(nonce.into(), aad, buf, tag.into())
                .map_err(|_| SframeError::AuthenticationFailed),
            AeadInner::CtrHmac { enc, auth } => {
                let mut mac = (**auth).clone();
                feed_ctr_hmac(&mut mac, tag.len(), nonce, aad, buf);
                mac.verify_truncated_left(tag)
                    .map_err(|_| SframeError::AuthenticationFailed)?;
                ctr_keystream(enc, nonce, buf);
                Ok(())
            }
        }
    }
}

/// AES-CTR with the initial counter block `nonce || 0x00000000`.
fn ctr_keystream(enc: &Aes128, nonce: &[u8; NONCE_LEN], buf: &mut [u8]) {
    let mut iv = [0u8; 16];
    iv[..NONCE_LEN].copy_from_slice(nonce);
    let core =
        ctr::CtrCore::<Aes128, ctr::flavors::Ctr32BE>::inner_iv_init(enc.clone(), (&iv).into());
    let mut c = Aes128Ctr::from_core(core);
    c.apply_keystream(buf);
    iv.zeroize();
}

/// `len(aad) || len(ct) || Nt` (each u64 BE) `|| nonce || aad || ct` into the MAC.
fn feed_ctr_hmac(
    mac: &mut Hmac<Sha256>,
    tag_len: usize,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ct: &[u8],
) {
    mac.update(&(aad.len() as u64).to_be_bytes());
    mac.update(&(ct.len() as u64).to_be_bytes());
    mac.update(&(tag_len as u64).to_be_bytes());
    mac.update(nonce);
    mac.update(aad);
    mac.update(ct);
}

fn ctr_hmac_tag(
    auth: &Hmac<Sha256>,
    tag_len: usize,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ct: &[u8],
) -> [u8; 32] {
    let mut mac = auth.clone();
    feed_ctr_hmac(&mut mac, tag_len, nonce, aad, ct);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_ids_round_trip() {
        for s in CipherSuite::ALL {
            assert_eq!(CipherSuite::from_id(s.id()).unwrap(), s);
        }
        assert_eq!(
            CipherSuite::from_id(0x0006),
            Err(SframeError::UnsupportedSuite(6))
        );
        assert_eq!(CipherSuite::default(), CipherSuite::AesGcm256Sha512);
    }

    #[test]
    fn wrong_key_length_is_an_error() {
        assert!(matches!(
            AeadKey::new(CipherSuite::AesGcm256Sha512, &[0u8; 16]),
            Err(SframeError::BadKeyLength {
                expected: 32,
                got: 16
            })
        ));
    }
}
