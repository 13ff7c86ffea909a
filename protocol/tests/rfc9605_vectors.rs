//! RFC 9605 Appendix C test vectors, read from `../shared/vectors/sframe-rfc9605.json`.
//!
//! Under CI (`CI=true`) a missing vector file is a failure, never a skip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use conclave_protocol::sframe::{
    AeadKey, CipherSuite, FrameKey, Header, NONCE_LEN, SframeError, derive_key_salt,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    header: Vec<HeaderVector>,
    aes_ctr_hmac: Vec<AeadVector>,
    sframe: Vec<SframeVector>,
}

#[derive(Deserialize)]
struct HeaderVector {
    kid: u64,
    ctr: u64,
    encoded: String,
}

#[derive(Deserialize)]
struct AeadVector {
    cipher_suite: u16,
    key: String,
    enc_key: String,
    auth_key: String,
    nonce: String,
    aad: String,
    pt: String,
    ct: String,
}

#[derive(Deserialize)]
struct SframeVector {
    cipher_suite: u16,
    kid: u64,
    ctr: u64,
    base_key: String,
    sframe_key_label: String,
    sframe_salt_label: String,
    sframe_secret: String,
    sframe_key: String,
    sframe_salt: String,
    metadata: String,
    nonce: String,
    aad: String,
    pt: String,
    ct: String,
}

fn vector_path() -> PathBuf {
    if let Ok(dir) = std::env::var("CONCLAVE_SHARED") {
        return PathBuf::from(dir).join("vectors/sframe-rfc9605.json");
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors/sframe-rfc9605.json")
}

fn load() -> Option<Vectors> {
    let path = vector_path();
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_json::from_str(&text).expect("vector file parses")),
        Err(e) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "RFC 9605 vectors missing at {}: {e}", path.display());
            eprintln!("SKIP: RFC 9605 vectors not found at {}", path.display());
            None
        }
    }
}

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

#[test]
fn all_289_header_vectors() {
    let Some(v) = load() else { return };
    assert_eq!(v.header.len(), 289);
    let mut buf = [0u8; 17];
    for t in &v.header {
        let hdr = Header::new(t.kid, t.ctr);
        let n = hdr.encode(&mut buf).unwrap();
        assert_eq!(
            hex::encode(&buf[..n]),
            t.encoded,
            "encode kid={} ctr={}",
            t.kid,
            t.ctr
        );
        assert_eq!(n, hdr.encoded_len());
        let enc = h(&t.encoded);
        assert_eq!(Header::decode(&enc).unwrap(), (hdr, enc.len()));
        // Every strict prefix of an encoded header is truncated.
        for cut in 0..enc.len() {
            assert_eq!(
                Header::decode(&enc[..cut]),
                Err(SframeError::TruncatedHeader)
            );
        }
    }
}

#[test]
fn aes_ctr_hmac_aead_vectors() {
    let Some(v) = load() else { return };
    assert_eq!(v.aes_ctr_hmac.len(), 3);
    for t in &v.aes_ctr_hmac {
        let suite = CipherSuite::from_id(t.cipher_suite).unwrap();
        let key = h(&t.key);
        assert_eq!(key, [h(&t.enc_key), h(&t.auth_key)].concat());
        let aead = AeadKey::new(suite, &key).unwrap();
        let nonce: [u8; NONCE_LEN] = h(&t.nonce).try_into().unwrap();
        let aad = h(&t.aad);
        let pt = h(&t.pt);
        let mut buf = pt.clone();
        let mut tag = vec![0u8; suite.tag_len()];
        aead.seal_in_place(&nonce, &aad, &mut buf, &mut tag)
            .unwrap();
        assert_eq!(
            hex::encode([buf.clone(), tag.clone()].concat()),
            t.ct,
            "suite {suite:?}"
        );
        aead.open_in_place(&nonce, &aad, &mut buf, &tag).unwrap();
        assert_eq!(buf, pt);
        tag[0] ^= 1;
        assert_eq!(
            aead.open_in_place(&nonce, &aad, &mut buf, &tag),
            Err(SframeError::AuthenticationFailed)
        );
    }
}

#[test]
fn sframe_vectors_every_suite() {
    let Some(v) = load() else { return };
    let suites: Vec<u16> = v.sframe.iter().map(|t| t.cipher_suite).collect();
    assert_eq!(suites, [1, 2, 3, 4, 5]);
    for t in &v.sframe {
        let suite = CipherSuite::from_id(t.cipher_suite).unwrap();
        let base_key = h(&t.base_key);

        // The labels are "SFrame 1.0 Secret key/salt " || KID || suite.
        let mut key_label = b"SFrame 1.0 Secret key ".to_vec();
        key_label.extend_from_slice(&t.kid.to_be_bytes());
        key_label.extend_from_slice(&suite.id().to_be_bytes());
        assert_eq!(hex::encode(&key_label), t.sframe_key_label);
        let mut salt_label = b"SFrame 1.0 Secret salt ".to_vec();
        salt_label.extend_from_slice(&t.kid.to_be_bytes());
        salt_label.extend_from_slice(&suite.id().to_be_bytes());
        assert_eq!(hex::encode(&salt_label), t.sframe_salt_label);
        assert!(!t.sframe_secret.is_empty());

        let d = derive_key_salt(suite, t.kid, &base_key).unwrap();
        assert_eq!(hex::encode(&*d.key), t.sframe_key, "key, suite {suite:?}");
        assert_eq!(hex::encode(*d.salt), t.sframe_salt, "salt, suite {suite:?}");

        let key = FrameKey::derive(suite, t.kid, &base_key).unwrap();
        assert_eq!(hex::encode(key.nonce(t.ctr)), t.nonce);

        let metadata = h(&t.metadata);
        let pt = h(&t.pt);
        let mut out = vec![0u8; pt.len() + 64];
        let n = key.seal(t.ctr, &metadata, &pt, &mut out).unwrap();
        assert_eq!(hex::encode(&out[..n]), t.ct, "ciphertext, suite {suite:?}");

        // aad = header || metadata
        let (hdr, hlen) = Header::decode(&out[..n]).unwrap();
        assert_eq!(hdr, Header::new(t.kid, t.ctr));
        assert_eq!(hex::encode([&out[..hlen], &metadata[..]].concat()), t.aad);

        let ct = h(&t.ct);
        let mut back = vec![0u8; ct.len()];
        let m = key
            .open(t.ctr, &ct[..hlen], &metadata, &ct[hlen..], &mut back)
            .unwrap();
        assert_eq!(&back[..m], &pt[..]);

        // Changing the metadata breaks authentication.
        let mut bad_meta = metadata.clone();
        bad_meta[0] ^= 0x80;
        assert_eq!(
            key.open(t.ctr, &ct[..hlen], &bad_meta, &ct[hlen..], &mut back),
            Err(SframeError::AuthenticationFailed)
        );
        assert!(
            back.iter().all(|b| *b == 0),
            "no unauthenticated plaintext left behind"
        );
    }
}
