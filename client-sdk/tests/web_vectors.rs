//! Byte compatibility between this SDK and the browser SDK (`client-sdk/web`),
//! proven both ways with committed JSON vectors:
//!
//! - Rust → JS: [`rust_vectors_match_committed_file`] generates deterministic
//!   vectors (headers, key derivation, KIDs, clear prefixes, protected Opus
//!   and VP8 frames, tampered frames, safety numbers, epoch codes) and
//!   compares them with `client-sdk/web/test/vectors/rust.json`, which the
//!   JS tests check. `CONCLAVE_WRITE_VECTORS=1` rewrites the file.
//! - JS → Rust: [`js_vectors_verify_with_rust`] checks every entry of
//!   `client-sdk/web/test/vectors/js.json` (written by
//!   `client-sdk/web/scripts/gen-js-vectors.mjs`) with this implementation.
//!
//! 64-bit values (KIDs, counters, epochs, contexts) are decimal strings in
//! the JSON so JavaScript reads them without losing precision; bytes are hex.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use conclave_client::verify;
use conclave_protocol::sframe::{
    CipherSuite, Codec, EpochSecret, FrameEncryptor, FrameKey, Header, KeyRing, KeyRingConfig,
    KidLayout, LeafSet, SframeError, clear_prefix_len, derive_key_salt, parse_protected,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web/test/vectors")
}

/// A u64 as a decimal string (JSON numbers lose precision in JavaScript).
mod dec {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// An optional u64 as a decimal string or null.
mod dec_opt {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&v.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| s.parse().map_err(D::Error::custom))
            .transpose()
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Vectors {
    description: String,
    generator: String,
    headers: Vec<HeaderVector>,
    key_derivation: Vec<KeyVector>,
    kids: Vec<KidVector>,
    clear_prefix: Vec<PrefixVector>,
    frames: Vec<FrameVector>,
    tampered: Vec<TamperVector>,
    safety_numbers: Vec<SafetyVector>,
    epoch_codes: Vec<EpochCodeVector>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct HeaderVector {
    #[serde(with = "dec")]
    kid: u64,
    #[serde(with = "dec")]
    ctr: u64,
    encoded: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct KeyVector {
    suite: u16,
    #[serde(with = "dec")]
    kid: u64,
    base_key: String,
    key: String,
    salt: String,
}

/// `kid` is null when the inputs do not fit the layout (`KidOverflow`).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct KidVector {
    epoch_bits: u8,
    #[serde(with = "dec")]
    epoch: u64,
    /// Highest member leaf index + 1, as the agent computes it.
    width: u32,
    sender_bits: u8,
    leaf: u32,
    #[serde(with = "dec")]
    context: u64,
    #[serde(with = "dec_opt")]
    kid: Option<u64>,
}

/// `len` is null when the frame is too short for its prefix (`TruncatedFrame`).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct PrefixVector {
    codec: String,
    frame: String,
    len: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct FrameVector {
    name: String,
    suite: u16,
    codec: String,
    epoch_bits: u8,
    #[serde(with = "dec")]
    epoch: u64,
    width: u32,
    members: Vec<u32>,
    leaf: u32,
    #[serde(with = "dec")]
    context: u64,
    /// The epoch's `MLS-Exporter("SFrame 1.0 Base Key", "", AEAD.Nk)`.
    base_key: String,
    #[serde(with = "dec")]
    kid: u64,
    #[serde(with = "dec")]
    ctr: u64,
    /// Length of the clear codec prefix.
    prefix_len: usize,
    /// The clear frame, prefix included.
    plaintext: String,
    /// `prefix || header || ciphertext || tag`.
    protected: String,
}

/// A frame from `frames` with one byte changed; it must not authenticate.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct TamperVector {
    name: String,
    /// Index into `frames` of the original.
    frame: usize,
    /// Offset of the flipped byte in the protected frame.
    offset: usize,
    protected: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct SafetyVector {
    user_a: String,
    key_a: String,
    user_b: String,
    key_b: String,
    fingerprint_a: String,
    fingerprint_b: String,
    safety_number: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct EpochCodeVector {
    epoch_authenticator: String,
    code: String,
}

fn codec_name(c: Codec) -> &'static str {
    match c {
        Codec::Opus => "opus",
        Codec::Vp8 => "vp8",
        Codec::Opaque => "opaque",
    }
}

fn codec_of(name: &str) -> Codec {
    match name {
        "opus" => Codec::Opus,
        "vp8" => Codec::Vp8,
        "opaque" => Codec::Opaque,
        other => panic!("unknown codec {other}"),
    }
}

/// Deterministic filler bytes.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed.wrapping_mul(17))
                ^ 0x5a
        })
        .collect()
}

/// A VP8 key frame: frame tag with the key-frame bit clear, start code, 640x480.
fn vp8_key_frame(seed: u8, payload: usize) -> Vec<u8> {
    let mut f = vec![0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];
    f.extend(pattern(seed, payload));
    f
}

/// A VP8 delta frame: frame tag with the key-frame bit set.
fn vp8_delta_frame(seed: u8, payload: usize) -> Vec<u8> {
    let mut f = vec![0x31, 0x02, 0x00];
    f.extend(pattern(seed, payload));
    f
}

/// One frame to generate.
struct FrameSpec {
    name: &'static str,
    suite: CipherSuite,
    codec: Codec,
    epoch: u64,
    members: Vec<u32>,
    leaf: u32,
    context: u64,
    base_key_seed: u8,
    ctr: u64,
    frame: Vec<u8>,
}

fn width_of(members: &[u32]) -> u32 {
    members.iter().max().map_or(1, |m| m + 1)
}

fn gen_frames() -> Vec<FrameVector> {
    let layout = KidLayout::default();
    let mut specs = Vec::new();
    for suite in CipherSuite::ALL {
        let s = suite.id() as u8;
        specs.extend([
            FrameSpec {
                name: "opus audio, first frame",
                suite,
                codec: Codec::Opus,
                epoch: 7,
                members: vec![0, 1, 2, 3, 4],
                leaf: 3,
                context: 0,
                base_key_seed: s,
                ctr: 0,
                frame: pattern(s, 60),
            },
            FrameSpec {
                name: "vp8 key frame, camera",
                suite,
                codec: Codec::Vp8,
                epoch: 7,
                members: vec![0, 1, 2, 3, 4],
                leaf: 3,
                context: 1,
                base_key_seed: s,
                ctr: 1,
                frame: vp8_key_frame(s, 200),
            },
            FrameSpec {
                name: "vp8 delta frame, camera",
                suite,
                codec: Codec::Vp8,
                epoch: 7,
                members: vec![0, 1, 2, 3, 4],
                leaf: 3,
                context: 1,
                base_key_seed: s,
                ctr: 2,
                frame: vp8_delta_frame(s, 120),
            },
        ]);
    }
    let suite = CipherSuite::AesGcm256Sha512;
    specs.extend([
        FrameSpec {
            name: "opus, 2-byte counter, leaf 0",
            suite,
            codec: Codec::Opus,
            epoch: 1,
            members: vec![0, 1],
            leaf: 0,
            context: 0,
            base_key_seed: 0x21,
            ctr: 300,
            frame: pattern(9, 3),
        },
        FrameSpec {
            name: "opus, empty payload",
            suite,
            codec: Codec::Opus,
            epoch: 1,
            members: vec![0, 1],
            leaf: 1,
            context: 0,
            base_key_seed: 0x21,
            ctr: 5,
            frame: Vec::new(),
        },
        FrameSpec {
            name: "vp8 key frame, screen, large group, epoch beyond 8 bits, 5-byte counter",
            suite,
            codec: Codec::Vp8,
            epoch: 300,
            members: (0..200).collect(),
            leaf: 130,
            context: 2,
            base_key_seed: 0x33,
            ctr: 0x1_0000_0000,
            frame: vp8_key_frame(4, 1000),
        },
        FrameSpec {
            name: "vp8 key frame with no payload after the prefix",
            suite,
            codec: Codec::Vp8,
            epoch: 300,
            members: (0..200).collect(),
            leaf: 199,
            context: 1,
            base_key_seed: 0x33,
            ctr: 7,
            frame: vp8_key_frame(5, 0),
        },
        FrameSpec {
            name: "vp8 delta frame, simulcast layer 2, 8-byte counter, 500-member call",
            suite,
            codec: Codec::Vp8,
            epoch: 0x1_2345_6789,
            members: (0..500).collect(),
            leaf: 499,
            context: 4,
            base_key_seed: 0x44,
            ctr: u64::MAX - 1,
            frame: vp8_delta_frame(6, 40),
        },
        FrameSpec {
            name: "opaque data",
            suite,
            codec: Codec::Opaque,
            epoch: 2,
            members: vec![0, 2],
            leaf: 2,
            context: 9,
            base_key_seed: 0x55,
            ctr: 8,
            frame: pattern(7, 17),
        },
    ]);

    let mut out = Vec::new();
    for spec in specs {
        let base_key = pattern(spec.base_key_seed, spec.suite.key_len());
        let width = width_of(&spec.members);
        let sender_bits = KidLayout::sender_bits(width);
        let kid = layout
            .kid(spec.epoch, sender_bits, spec.leaf, spec.context)
            .unwrap();
        let key = FrameKey::derive(spec.suite, kid, &base_key).unwrap();
        let mut buf = vec![0u8; spec.frame.len() + 64];
        let n = if spec.ctr == 0 {
            // The sender's path: a fresh encryptor's first frame.
            let mut enc = FrameEncryptor::new(key.clone());
            enc.encrypt(spec.codec, &spec.frame, &mut buf).unwrap()
        } else {
            let plen = clear_prefix_len(spec.codec, &spec.frame).unwrap();
            let (prefix, payload) = spec.frame.split_at(plen);
            buf[..plen].copy_from_slice(prefix);
            plen + key
                .seal(spec.ctr, prefix, payload, &mut buf[plen..])
                .unwrap()
        };
        let protected = &buf[..n];

        // The receiver's path decrypts it back.
        let mut ring = KeyRing::new(KeyRingConfig {
            suite: spec.suite,
            layout,
            retention: Duration::from_secs(10),
        });
        ring.install_epoch(
            EpochSecret {
                epoch: spec.epoch,
                base_key: Zeroizing::new(base_key.clone()),
                sender_bits,
                members: spec.members.iter().copied().collect::<LeafSet>(),
            },
            Instant::now(),
        );
        let mut clear = vec![0u8; n];
        let d = ring
            .decrypt(Instant::now(), spec.codec, protected, &mut clear)
            .unwrap();
        assert_eq!(&clear[..d.len], &spec.frame[..], "{}", spec.name);
        assert_eq!(
            (d.kid, d.ctr, d.leaf, d.context),
            (kid, spec.ctr, spec.leaf, spec.context)
        );

        out.push(FrameVector {
            name: format!("{} ({:?})", spec.name, spec.suite),
            suite: spec.suite.id(),
            codec: codec_name(spec.codec).to_owned(),
            epoch_bits: layout.epoch_bits(),
            epoch: spec.epoch,
            width,
            members: spec.members,
            leaf: spec.leaf,
            context: spec.context,
            base_key: hex::encode(&base_key),
            kid,
            ctr: spec.ctr,
            prefix_len: clear_prefix_len(spec.codec, &spec.frame).unwrap(),
            plaintext: hex::encode(&spec.frame),
            protected: hex::encode(protected),
        });
    }
    out
}

fn gen_tampered(frames: &[FrameVector]) -> Vec<TamperVector> {
    let mut out = Vec::new();
    let mut push = |name: &str, idx: usize, offset: usize| {
        let mut p = hex::decode(&frames[idx].protected).unwrap();
        p[offset] ^= 0x80;
        out.push(TamperVector {
            name: name.to_owned(),
            frame: idx,
            offset,
            protected: hex::encode(p),
        });
    };
    let key_idx = frames
        .iter()
        .position(|f| f.codec == "vp8" && f.prefix_len == 10)
        .unwrap();
    let delta_idx = frames
        .iter()
        .position(|f| f.codec == "vp8" && f.prefix_len == 3)
        .unwrap();
    let opus_idx = frames.iter().position(|f| f.codec == "opus").unwrap();
    // The clear prefix is bound as AAD: changing the width/height bytes of a
    // VP8 key frame or the delta frame's size bytes breaks authentication.
    push("vp8 key frame: clear dimensions altered", key_idx, 7);
    push("vp8 delta frame: clear prefix altered", delta_idx, 1);
    // A changed header byte (the last one: KID or counter).
    let hdr_end = |idx: usize| {
        let p = hex::decode(&frames[idx].protected).unwrap();
        let plen = frames[idx].prefix_len;
        plen + Header::decode(&p[plen..]).unwrap().1
    };
    push(
        "vp8 key frame: header altered",
        key_idx,
        hdr_end(key_idx) - 1,
    );
    push("opus: ciphertext altered", opus_idx, hdr_end(opus_idx));
    let last = hex::decode(&frames[opus_idx].protected).unwrap().len() - 1;
    push("opus: tag altered", opus_idx, last);
    out
}

fn gen_headers() -> Vec<HeaderVector> {
    let mut values = vec![0u64, 1, 7, 8, 255, 256];
    for bytes in 2..=8u32 {
        let top = if bytes == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * bytes)) - 1
        };
        values.push(1u64 << (8 * (bytes - 1)));
        values.push(top);
    }
    values.push(0x0123_4567_89ab_cdef);
    let mut out = Vec::new();
    for (i, &kid) in values.iter().enumerate() {
        // Every KID with a few counters: all K/C length combinations appear.
        for &ctr in values.iter().skip(i % 3).step_by(3) {
            let h = Header::new(kid, ctr);
            let mut buf = [0u8; 17];
            let n = h.encode(&mut buf).unwrap();
            out.push(HeaderVector {
                kid,
                ctr,
                encoded: hex::encode(&buf[..n]),
            });
        }
    }
    out
}

fn gen_keys() -> Vec<KeyVector> {
    let mut out = Vec::new();
    for suite in CipherSuite::ALL {
        for (seed, kid) in [(1u8, 0u64), (2, 0x0703), (3, u64::MAX)] {
            let base_key = pattern(seed.wrapping_add(suite.id() as u8), suite.key_len());
            let d = derive_key_salt(suite, kid, &base_key).unwrap();
            out.push(KeyVector {
                suite: suite.id(),
                kid,
                base_key: hex::encode(&base_key),
                key: hex::encode(&*d.key),
                salt: hex::encode(*d.salt),
            });
        }
    }
    out
}

fn gen_kids() -> Vec<KidVector> {
    let cases: [(u8, u64, u32, u32, u64); 14] = [
        // (epoch_bits, epoch, width, leaf, context)
        (8, 0, 1, 0, 0),
        (8, 1, 2, 1, 0),
        (8, 255, 5, 4, 1),
        (8, 256, 5, 4, 2),
        (8, 0x1_2345_6789, 500, 499, 4),
        (8, 77, 1 << 20, (1 << 20) - 1, 3),
        (4, 17, 33, 33, 0),
        (16, 0xfffe_ffff, 64, 63, 0xabcd),
        (1, 3, 2, 1, (1 << 61) - 1),
        (8, 9, 3, 2, (1 << 53) - 1),
        // Overflows: leaf beyond S bits; context beyond the free bits.
        (8, 9, 3, 4, 0),
        (8, 9, 3, 2, 1 << 53),
        (16, 1, 1 << 31, 7, 1 << 20),
        (8, 1, u32::MAX, 7, 1 << 24),
    ];
    cases
        .into_iter()
        .map(|(e, epoch, width, leaf, context)| {
            let layout = KidLayout::new(e).unwrap();
            let sender_bits = KidLayout::sender_bits(width);
            let kid = match layout.kid(epoch, sender_bits, leaf, context) {
                Ok(k) => Some(k),
                Err(SframeError::KidOverflow) => None,
                Err(other) => panic!("unexpected {other}"),
            };
            KidVector {
                epoch_bits: e,
                epoch,
                width,
                sender_bits,
                leaf,
                context,
                kid,
            }
        })
        .collect()
}

fn gen_prefixes() -> Vec<PrefixVector> {
    let frames: Vec<(Codec, Vec<u8>)> = vec![
        (Codec::Opus, vec![]),
        (Codec::Opus, pattern(1, 5)),
        (Codec::Opaque, pattern(2, 2)),
        (Codec::Vp8, vp8_key_frame(3, 4)),
        (Codec::Vp8, vp8_key_frame(3, 0)),
        (Codec::Vp8, vp8_key_frame(3, 0)[..9].to_vec()),
        (Codec::Vp8, vp8_delta_frame(4, 2)),
        (Codec::Vp8, vp8_delta_frame(4, 0)),
        (Codec::Vp8, vec![0x31, 0x02]),
        (Codec::Vp8, vec![0x30; 12]),
        (Codec::Vp8, vec![0xff; 3]),
        (Codec::Vp8, vec![]),
    ];
    frames
        .into_iter()
        .map(|(codec, frame)| PrefixVector {
            codec: codec_name(codec).to_owned(),
            len: clear_prefix_len(codec, &frame).ok(),
            frame: hex::encode(frame),
        })
        .collect()
}

fn gen_safety() -> Vec<SafetyVector> {
    let cases: [(&str, Vec<u8>, &str, Vec<u8>); 4] = [
        ("alice", vec![0x11; 32], "bob", vec![0x22; 32]),
        ("bob", vec![0x22; 32], "alice", vec![0x11; 32]),
        ("dr-müller", pattern(8, 32), "patient-42", pattern(9, 32)),
        ("", vec![], "u", vec![0]),
    ];
    cases
        .into_iter()
        .map(|(ua, ka, ub, kb)| SafetyVector {
            fingerprint_a: verify::fingerprint(ua, &ka),
            fingerprint_b: verify::fingerprint(ub, &kb),
            safety_number: verify::safety_number(ua, &ka, ub, &kb),
            user_a: ua.to_owned(),
            key_a: hex::encode(ka),
            user_b: ub.to_owned(),
            key_b: hex::encode(kb),
        })
        .collect()
}

fn gen_epoch_codes() -> Vec<EpochCodeVector> {
    let auths: Vec<Vec<u8>> = vec![
        (0u8..32).collect(),
        vec![0xff; 32],
        vec![0; 32],
        pattern(10, 32),
        vec![0x8a, 0xc7, 0x23, 0x04, 0x89, 0xe8, 0x00, 0x00],
        vec![0x01, 0x02, 0x03],
        vec![],
    ];
    auths
        .into_iter()
        .map(|a| EpochCodeVector {
            code: verify::epoch_code(&a),
            epoch_authenticator: hex::encode(a),
        })
        .collect()
}

fn rust_vectors() -> Vectors {
    let frames = gen_frames();
    Vectors {
        description: "Conclave Rust SDK vectors for the browser SDK: bytes are hex, 64-bit values are decimal strings.".to_owned(),
        generator: "client-sdk/tests/web_vectors.rs (CONCLAVE_WRITE_VECTORS=1 to rewrite)".to_owned(),
        headers: gen_headers(),
        key_derivation: gen_keys(),
        kids: gen_kids(),
        clear_prefix: gen_prefixes(),
        tampered: gen_tampered(&frames),
        frames,
        safety_numbers: gen_safety(),
        epoch_codes: gen_epoch_codes(),
    }
}

#[test]
fn rust_vectors_match_committed_file() {
    let path = vectors_dir().join("rust.json");
    let generated = rust_vectors();
    if std::env::var("CONCLAVE_WRITE_VECTORS").is_ok_and(|v| v == "1") {
        let mut text = serde_json::to_string_pretty(&generated).unwrap();
        text.push('\n');
        std::fs::create_dir_all(vectors_dir()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with CONCLAVE_WRITE_VECTORS=1 to create it",
            path.display()
        )
    });
    let committed: Vectors = serde_json::from_str(&text).unwrap();
    // Compare section by section for a readable failure.
    assert_eq!(committed.headers, generated.headers, "headers differ");
    assert_eq!(committed.key_derivation, generated.key_derivation);
    assert_eq!(committed.kids, generated.kids);
    assert_eq!(committed.clear_prefix, generated.clear_prefix);
    assert_eq!(committed.frames, generated.frames);
    assert_eq!(committed.tampered, generated.tampered);
    assert_eq!(committed.safety_numbers, generated.safety_numbers);
    assert_eq!(committed.epoch_codes, generated.epoch_codes);
    assert_eq!(
        committed, generated,
        "rust.json is stale: rerun with CONCLAVE_WRITE_VECTORS=1 and rerun the JS tests"
    );
}

/// The JS file has the same sections as ours plus what only JS generates.
#[derive(Debug, Deserialize)]
struct JsVectors {
    generator: String,
    headers: Vec<HeaderVector>,
    key_derivation: Vec<KeyVector>,
    kids: Vec<KidVector>,
    clear_prefix: Vec<PrefixVector>,
    frames: Vec<FrameVector>,
    tampered: Vec<TamperVector>,
    safety_numbers: Vec<SafetyVector>,
    epoch_codes: Vec<EpochCodeVector>,
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap_or_else(|e| panic!("bad hex {s:?}: {e}"))
}

#[test]
fn js_vectors_verify_with_rust() {
    let path = vectors_dir().join("js.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (generate with `npm run vectors`)", path.display()));
    let v: JsVectors = serde_json::from_str(&text).unwrap();
    assert!(v.generator.contains("gen-js-vectors"), "{}", v.generator);

    assert!(!v.headers.is_empty());
    for h in &v.headers {
        let enc = unhex(&h.encoded);
        let mut buf = [0u8; 17];
        let n = Header::new(h.kid, h.ctr).encode(&mut buf).unwrap();
        assert_eq!(&buf[..n], &enc[..], "header {h:?}");
        assert_eq!(
            Header::decode(&enc).unwrap(),
            (Header::new(h.kid, h.ctr), enc.len())
        );
    }

    assert!(!v.key_derivation.is_empty());
    for k in &v.key_derivation {
        let suite = CipherSuite::from_id(k.suite).unwrap();
        let d = derive_key_salt(suite, k.kid, &unhex(&k.base_key)).unwrap();
        assert_eq!(hex::encode(&*d.key), k.key, "key of {k:?}");
        assert_eq!(hex::encode(*d.salt), k.salt, "salt of {k:?}");
    }

    assert!(!v.kids.is_empty());
    for k in &v.kids {
        let layout = KidLayout::new(k.epoch_bits).unwrap();
        assert_eq!(KidLayout::sender_bits(k.width), k.sender_bits, "{k:?}");
        let got = layout.kid(k.epoch, k.sender_bits, k.leaf, k.context).ok();
        assert_eq!(got, k.kid, "{k:?}");
        if let Some(kid) = k.kid {
            let parts = layout.split(kid, k.sender_bits);
            assert_eq!(
                (parts.context, parts.leaf, parts.epoch_low),
                (k.context, k.leaf, layout.epoch_low(k.epoch))
            );
        }
    }

    assert!(!v.clear_prefix.is_empty());
    for p in &v.clear_prefix {
        let got = clear_prefix_len(codec_of(&p.codec), &unhex(&p.frame)).ok();
        assert_eq!(got, p.len, "{p:?}");
    }

    assert!(v.frames.iter().any(|f| f.codec == "opus"));
    assert!(v.frames.iter().any(|f| f.prefix_len == 10));
    assert!(v.frames.iter().any(|f| f.prefix_len == 3));
    let t0 = Instant::now();
    for f in &v.frames {
        let suite = CipherSuite::from_id(f.suite).unwrap();
        let codec = codec_of(&f.codec);
        let layout = KidLayout::new(f.epoch_bits).unwrap();
        let base_key = unhex(&f.base_key);
        let plaintext = unhex(&f.plaintext);
        let protected = unhex(&f.protected);
        let sender_bits = KidLayout::sender_bits(f.width);
        assert_eq!(
            f.width,
            f.members.iter().max().map_or(1, |m| m + 1),
            "{}",
            f.name
        );
        assert_eq!(
            layout.kid(f.epoch, sender_bits, f.leaf, f.context).unwrap(),
            f.kid,
            "{}",
            f.name
        );
        assert_eq!(
            clear_prefix_len(codec, &plaintext).unwrap(),
            f.prefix_len,
            "{}",
            f.name
        );

        // Decrypt as a receiving member would.
        let mut ring = KeyRing::new(KeyRingConfig {
            suite,
            layout,
            retention: Duration::from_secs(10),
        });
        ring.install_epoch(
            EpochSecret {
                epoch: f.epoch,
                base_key: Zeroizing::new(base_key.clone()),
                sender_bits,
                members: f.members.iter().copied().collect(),
            },
            t0,
        );
        let mut clear = vec![0u8; protected.len()];
        let d = ring
            .decrypt(t0, codec, &protected, &mut clear)
            .unwrap_or_else(|e| panic!("{}: {e}", f.name));
        assert_eq!(&clear[..d.len], &plaintext[..], "{}", f.name);
        assert_eq!(
            (d.kid, d.ctr, d.epoch, d.leaf, d.context),
            (f.kid, f.ctr, f.epoch, f.leaf, f.context),
            "{}",
            f.name
        );
        // A replay of the same frame is refused.
        assert_eq!(
            ring.decrypt(t0, codec, &protected, &mut clear),
            Err(SframeError::Replayed { ctr: f.ctr }),
            "{}",
            f.name
        );

        // Re-encrypt with the same counter: identical bytes.
        let key = FrameKey::derive(suite, f.kid, &base_key).unwrap();
        let (prefix, payload) = plaintext.split_at(f.prefix_len);
        let mut out = vec![0u8; protected.len() + 64];
        out[..prefix.len()].copy_from_slice(prefix);
        let n = key
            .seal(f.ctr, prefix, payload, &mut out[prefix.len()..])
            .unwrap();
        assert_eq!(&out[..prefix.len() + n], &protected[..], "{}", f.name);
        let parsed = parse_protected(codec, &protected).unwrap();
        assert_eq!(parsed.prefix, prefix, "{}", f.name);
    }

    assert!(!v.tampered.is_empty());
    for t in &v.tampered {
        let f = &v.frames[t.frame];
        let orig = unhex(&f.protected);
        let bad = unhex(&t.protected);
        assert_eq!(bad.len(), orig.len(), "{}", t.name);
        let diff: Vec<usize> = (0..bad.len()).filter(|&i| bad[i] != orig[i]).collect();
        assert_eq!(diff, vec![t.offset], "{}", t.name);
        let suite = CipherSuite::from_id(f.suite).unwrap();
        let codec = codec_of(&f.codec);
        let key = FrameKey::derive(suite, f.kid, &unhex(&f.base_key)).unwrap();
        let p = parse_protected(codec, &bad).unwrap();
        let mut out = vec![0u8; bad.len()];
        assert_eq!(
            key.open(p.header.ctr, p.header_bytes, p.prefix, p.body, &mut out),
            Err(SframeError::AuthenticationFailed),
            "{}",
            t.name
        );
    }

    assert!(!v.safety_numbers.is_empty());
    for s in &v.safety_numbers {
        let (ka, kb) = (unhex(&s.key_a), unhex(&s.key_b));
        assert_eq!(verify::fingerprint(&s.user_a, &ka), s.fingerprint_a);
        assert_eq!(verify::fingerprint(&s.user_b, &kb), s.fingerprint_b);
        assert_eq!(
            verify::safety_number(&s.user_a, &ka, &s.user_b, &kb),
            s.safety_number
        );
        assert_eq!(
            verify::safety_number(&s.user_b, &kb, &s.user_a, &ka),
            s.safety_number
        );
    }

    assert!(!v.epoch_codes.is_empty());
    for e in &v.epoch_codes {
        assert_eq!(
            verify::epoch_code(&unhex(&e.epoch_authenticator)),
            e.code,
            "{e:?}"
        );
    }
}
