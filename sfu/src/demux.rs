//! The first look at every datagram on the SFU's one UDP port: what protocol
//! it is (RFC 7983 / RFC 9443 first-byte ranges), and for a STUN binding
//! request, which session it belongs to (the ICE ufrag in USERNAME).
//!
//! Pure functions on untrusted bytes: every length is checked, nothing
//! allocates, nothing panics.

/// What a datagram is, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketKind {
    /// STUN (first byte 0–3).
    Stun,
    /// DTLS (first byte 20–63).
    Dtls,
    /// RTP (first byte 128–191, payload type outside the RTCP range).
    Rtp,
    /// RTCP (first byte 128–191, packet type 192–223 per RFC 5761).
    Rtcp,
    /// Anything else (ZRTP, TURN channels, garbage): dropped.
    Unknown,
}

/// Classifies a datagram.
pub fn classify(pkt: &[u8]) -> PacketKind {
    match pkt {
        [0..=3, ..] if pkt.len() >= STUN_HEADER_LEN => PacketKind::Stun,
        [20..=63, ..] if pkt.len() >= 13 => PacketKind::Dtls,
        [128..=191, second, ..] if pkt.len() >= 8 => {
            if (192..=223).contains(second) {
                PacketKind::Rtcp
            } else if pkt.len() >= 12 {
                PacketKind::Rtp
            } else {
                PacketKind::Unknown
            }
        }
        _ => PacketKind::Unknown,
    }
}

const STUN_HEADER_LEN: usize = 20;
const STUN_MAGIC: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const BINDING_REQUEST: u16 = 0x0001;
const ATTR_USERNAME: u16 = 0x0006;
/// Longest USERNAME accepted (RFC 8489 allows 513 bytes).
const MAX_USERNAME: usize = 513;

/// Why a STUN message could not be routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum StunError {
    /// Shorter than its header or its declared length.
    #[error("truncated STUN message")]
    Truncated,
    /// Wrong magic cookie, length not a multiple of 4, or bad attribute framing.
    #[error("malformed STUN message")]
    Malformed,
    /// Not a binding request.
    #[error("not a STUN binding request")]
    NotBindingRequest,
    /// No USERNAME attribute, or one without `local:remote` form.
    #[error("no usable USERNAME")]
    NoUsername,
}

/// For a STUN binding request, the local (SFU-side) ICE ufrag: the part of
/// USERNAME before the colon (RFC 8445 §7.2.2). This is how a session's
/// first packet finds its session; later packets go by source address.
pub fn binding_request_ufrag(pkt: &[u8]) -> Result<&[u8], StunError> {
    if pkt.len() < STUN_HEADER_LEN {
        return Err(StunError::Truncated);
    }
    let msg_type = u16::from_be_bytes([pkt[0], pkt[1]]);
    let msg_len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if pkt[4..8] != STUN_MAGIC || msg_len % 4 != 0 || msg_type & 0xc000 != 0 {
        return Err(StunError::Malformed);
    }
    if pkt.len() < STUN_HEADER_LEN + msg_len {
        return Err(StunError::Truncated);
    }
    if msg_type != BINDING_REQUEST {
        return Err(StunError::NotBindingRequest);
    }
    let mut attrs = &pkt[STUN_HEADER_LEN..STUN_HEADER_LEN + msg_len];
    while !attrs.is_empty() {
        let (head, rest) = attrs.split_at_checked(4).ok_or(StunError::Malformed)?;
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let padded = len.div_ceil(4) * 4;
        if rest.len() < padded {
            return Err(StunError::Malformed);
        }
        if kind == ATTR_USERNAME {
            let name = &rest[..len];
            if name.len() > MAX_USERNAME {
                return Err(StunError::NoUsername);
            }
            let colon = name
                .iter()
                .position(|b| *b == b':')
                .ok_or(StunError::NoUsername)?;
            if colon == 0 {
                return Err(StunError::NoUsername);
            }
            return Ok(&name[..colon]);
        }
        attrs = &rest[padded..];
    }
    Err(StunError::NoUsername)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(username: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        // A PRIORITY attribute first, then USERNAME (padded), then ICE-CONTROLLING.
        attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 0x6e, 0x00, 0x01, 0xff]);
        attrs.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username);
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        attrs.extend_from_slice(&[0x80, 0x2a, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8]);
        let mut m = Vec::new();
        m.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&STUN_MAGIC);
        m.extend_from_slice(&[7u8; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn classifies_by_first_byte() {
        assert_eq!(classify(&binding_request(b"a:b")), PacketKind::Stun);
        assert_eq!(classify(&[22u8; 13]), PacketKind::Dtls);
        let mut rtp = [0u8; 12];
        rtp[0] = 0x80;
        rtp[1] = 96;
        assert_eq!(classify(&rtp), PacketKind::Rtp);
        rtp[1] = 200; // sender report
        assert_eq!(classify(&rtp), PacketKind::Rtcp);
        assert_eq!(classify(&[]), PacketKind::Unknown);
        assert_eq!(classify(&[0x80, 96, 0]), PacketKind::Unknown);
        assert_eq!(classify(&[17u8; 40]), PacketKind::Unknown);
        assert_eq!(classify(&[0x40u8; 40]), PacketKind::Unknown);
    }

    #[test]
    fn finds_the_local_ufrag() {
        let m = binding_request(b"sfuFrag1:browserFrag");
        assert_eq!(binding_request_ufrag(&m), Ok(&b"sfuFrag1"[..]));
        let m = binding_request(b"xyz:");
        assert_eq!(binding_request_ufrag(&m), Ok(&b"xyz"[..]));
    }

    #[test]
    fn rejects_malformed_messages() {
        let good = binding_request(b"abcd:efgh");
        for cut in 0..good.len() {
            assert!(binding_request_ufrag(&good[..cut]).is_err(), "cut {cut}");
        }
        let mut bad = good.clone();
        bad[4] ^= 1;
        assert_eq!(binding_request_ufrag(&bad), Err(StunError::Malformed));
        let mut resp = good.clone();
        resp[1] = 0x01;
        resp[0] = 0x01; // binding success response
        assert_eq!(
            binding_request_ufrag(&resp),
            Err(StunError::NotBindingRequest)
        );
        assert_eq!(
            binding_request_ufrag(&binding_request(b"no-colon")),
            Err(StunError::NoUsername)
        );
        assert_eq!(
            binding_request_ufrag(&binding_request(b":remote")),
            Err(StunError::NoUsername)
        );
        // An attribute claiming more bytes than the message has.
        let mut lying = good;
        lying[STUN_HEADER_LEN + 2] = 0xff;
        assert_eq!(binding_request_ufrag(&lying), Err(StunError::Malformed));
    }
}
