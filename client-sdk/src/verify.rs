//! Codes people compare out of band to detect a man in the middle.
//!
//! - **Safety number** (pairwise): each side's fingerprint is
//!   `SHA-512` iterated [`FINGERPRINT_ITERATIONS`] times over the version,
//!   the user id and the Ed25519 identity key; the first 30 bytes become six
//!   5-digit groups (each group is 5 bytes, big-endian, mod 100000). The two
//!   fingerprints are ordered (smaller string first) and joined, so both
//!   sides compute the same 60 digits, shown as 12 groups of 5.
//! - **Epoch code** (whole call): the MLS `epoch_authenticator` of the
//!   current epoch, first 8 bytes big-endian mod 10^16, shown as 4 groups of
//!   4 digits. Everyone in the same epoch with the same view of the group
//!   sees the same code.

use sha2::{Digest, Sha512};

/// Hash iterations per fingerprint (slows down brute-forcing a collision).
pub const FINGERPRINT_ITERATIONS: u32 = 5200;
const FINGERPRINT_VERSION: u16 = 1;

/// One side's 30-digit fingerprint, as a string of digits.
pub fn fingerprint(user_id: &str, identity_key: &[u8]) -> String {
    let mut h = Sha512::new();
    h.update(FINGERPRINT_VERSION.to_be_bytes());
    h.update((identity_key.len() as u32).to_be_bytes());
    h.update(identity_key);
    h.update((user_id.len() as u32).to_be_bytes());
    h.update(user_id.as_bytes());
    let mut digest = h.finalize();
    for _ in 0..FINGERPRINT_ITERATIONS {
        let mut h = Sha512::new();
        h.update(digest);
        h.update(identity_key);
        digest = h.finalize();
    }
    digest[..30]
        .chunks_exact(5)
        .map(|c| {
            let v = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", v % 100_000)
        })
        .collect()
}

/// Splits a digit string into space-separated groups of `n`.
fn group(digits: &str, n: usize) -> String {
    digits
        .as_bytes()
        .chunks(n)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The pairwise safety number of two identities: 12 groups of 5 digits,
/// the same whichever side computes it.
pub fn safety_number(user_a: &str, key_a: &[u8], user_b: &str, key_b: &[u8]) -> String {
    let a = fingerprint(user_a, key_a);
    let b = fingerprint(user_b, key_b);
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    group(&format!("{first}{second}"), 5)
}

/// The short display code of an epoch authenticator: 4 groups of 4 digits.
pub fn epoch_code(epoch_authenticator: &[u8]) -> String {
    let mut eight = [0u8; 8];
    let n = epoch_authenticator.len().min(8);
    eight[..n].copy_from_slice(&epoch_authenticator[..n]);
    let v = u64::from_be_bytes(eight) % 10_000_000_000_000_000;
    group(&format!("{v:016}"), 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: [u8; 32] = [0x11; 32];
    const KEY_B: [u8; 32] = [0x22; 32];

    #[test]
    fn safety_number_is_symmetric_and_formatted() {
        let ab = safety_number("alice", &KEY_A, "bob", &KEY_B);
        let ba = safety_number("bob", &KEY_B, "alice", &KEY_A);
        assert_eq!(ab, ba);
        let groups: Vec<&str> = ab.split(' ').collect();
        assert_eq!(groups.len(), 12);
        assert!(
            groups
                .iter()
                .all(|g| g.len() == 5 && g.bytes().all(|b| b.is_ascii_digit()))
        );
    }

    #[test]
    fn safety_number_changes_with_any_key_or_user() {
        let base = safety_number("alice", &KEY_A, "bob", &KEY_B);
        let mut other = KEY_B;
        other[31] ^= 1;
        assert_ne!(base, safety_number("alice", &KEY_A, "bob", &other));
        assert_ne!(base, safety_number("alice", &KEY_A, "mallory", &KEY_B));
    }

    /// Known answers: pinned so the browser SDK and any later change must
    /// produce exactly these digits.
    #[test]
    fn known_answers() {
        assert_eq!(fingerprint("alice", &KEY_A), KAT_FP_ALICE);
        assert_eq!(
            safety_number("alice", &KEY_A, "bob", &KEY_B),
            KAT_SAFETY_NUMBER
        );
        let auth: Vec<u8> = (0u8..32).collect();
        assert_eq!(epoch_code(&auth), KAT_EPOCH_CODE);
        assert_eq!(epoch_code(&[0xff; 32]), "6744 0737 0955 1615");
    }

    /// Computed independently (Python hashlib) from the definition above.
    const KAT_FP_ALICE: &str = "462837201632338536311083777939";
    const KAT_SAFETY_NUMBER: &str =
        "46099 36086 29652 41429 25169 04004 46283 72016 32338 53631 10837 77939";
    const KAT_EPOCH_CODE: &str = "0283 6869 5230 6183";
}
