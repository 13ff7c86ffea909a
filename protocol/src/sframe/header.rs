//! SFrame header encoding (RFC 9605 §4.3).
//!
//! ```text
//!  0 1 2 3 4 5 6 7
//! +-+-+-+-+-+-+-+-+---------------------------+---------------------------+
//! |X|  K  |Y|  C  |   KID...  (length=K+1)    |   CTR... (length=C+1)     |
//! +-+-+-+-+-+-+-+-+---------------------------+---------------------------+
//! ```
//!
//! A value below 8 is carried in the config byte itself (X or Y clear);
//! otherwise the config byte holds its length minus one and the value follows
//! in big-endian order, with the minimal number of bytes.

use super::SframeError;

/// The longest header: one config byte, an 8-byte KID and an 8-byte CTR.
pub const MAX_HEADER_LEN: usize = 17;

/// A decoded SFrame header: the key id and the frame counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// Key identifier (KID).
    pub kid: u64,
    /// Frame counter (CTR); with the key's salt it forms the nonce.
    pub ctr: u64,
}

/// Number of bytes needed to write `v` big-endian without leading zeros (at least 1).
fn min_len(v: u64) -> usize {
    let bits = 64 - v.leading_zeros() as usize;
    bits.div_ceil(8).max(1)
}

/// Writes the low `len` bytes of `v` big-endian into `out[..len]`.
fn put_be(v: u64, len: usize, out: &mut [u8]) {
    let bytes = v.to_be_bytes();
    out[..len].copy_from_slice(&bytes[8 - len..]);
}

fn get_be(buf: &[u8]) -> u64 {
    buf.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// Config-byte bits and the number of extra bytes for one field.
fn field(v: u64) -> (u8, usize) {
    if v < 8 {
        // `v < 8` so the cast cannot truncate.
        (v as u8, 0)
    } else {
        let len = min_len(v);
        // Extended form: flag bit set, length minus one in the low three bits.
        (0x08 | (len as u8 - 1), len)
    }
}

impl Header {
    /// Creates a header.
    pub const fn new(kid: u64, ctr: u64) -> Self {
        Self { kid, ctr }
    }

    /// Length of this header once encoded.
    pub fn encoded_len(&self) -> usize {
        1 + field(self.kid).1 + field(self.ctr).1
    }

    /// Encodes the header into the front of `out` and returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, SframeError> {
        let (k_bits, k_len) = field(self.kid);
        let (c_bits, c_len) = field(self.ctr);
        let len = 1 + k_len + c_len;
        if out.len() < len {
            return Err(SframeError::BufferTooSmall {
                needed: len,
                available: out.len(),
            });
        }
        out[0] = (k_bits << 4) | c_bits;
        put_be(self.kid, k_len, &mut out[1..]);
        put_be(self.ctr, c_len, &mut out[1 + k_len..]);
        Ok(len)
    }

    /// Decodes a header from the front of `buf`, returning it and its length.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), SframeError> {
        let (&config, rest) = buf.split_first().ok_or(SframeError::TruncatedHeader)?;
        let kid_field = config >> 4;
        let ctr_field = config & 0x0f;
        let kid_len = if kid_field & 0x08 != 0 {
            usize::from(kid_field & 0x07) + 1
        } else {
            0
        };
        let ctr_len = if ctr_field & 0x08 != 0 {
            usize::from(ctr_field & 0x07) + 1
        } else {
            0
        };
        if rest.len() < kid_len + ctr_len {
            return Err(SframeError::TruncatedHeader);
        }
        let kid = if kid_len == 0 {
            u64::from(kid_field)
        } else {
            get_be(&rest[..kid_len])
        };
        let ctr = if ctr_len == 0 {
            u64::from(ctr_field)
        } else {
            get_be(&rest[kid_len..kid_len + ctr_len])
        };
        Ok((Self { kid, ctr }, 1 + kid_len + ctr_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_extremes() {
        let mut buf = [0u8; MAX_HEADER_LEN];
        for &(kid, ctr) in &[(0, 0), (7, 7), (8, 8), (u64::MAX, u64::MAX), (255, 256)] {
            let h = Header::new(kid, ctr);
            let n = h.encode(&mut buf).unwrap();
            assert_eq!(n, h.encoded_len());
            assert_eq!(Header::decode(&buf[..n]).unwrap(), (h, n));
        }
    }

    #[test]
    fn truncated_headers_are_errors() {
        assert_eq!(Header::decode(&[]), Err(SframeError::TruncatedHeader));
        // KID of 8 bytes announced, 3 present.
        assert_eq!(
            Header::decode(&[0xf0, 1, 2, 3]),
            Err(SframeError::TruncatedHeader)
        );
        // CTR of 2 bytes announced, 1 present.
        assert_eq!(
            Header::decode(&[0x09, 1]),
            Err(SframeError::TruncatedHeader)
        );
    }

    #[test]
    fn small_output_is_an_error() {
        let mut buf = [0u8; 2];
        assert!(matches!(
            Header::new(u64::MAX, 0).encode(&mut buf),
            Err(SframeError::BufferTooSmall { needed: 9, .. })
        ));
    }
}
