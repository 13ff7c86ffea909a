//! VP8 over RTP (RFC 7741): splitting a protected frame into packets and
//! putting received packets back together.
//!
//! The payloads carried here are SFrame-protected frames whose first bytes
//! are the clear VP8 prefix, so the first packet of a frame still starts with
//! the VP8 frame tag that RTP middleboxes (and the SFU) read.

/// Largest RTP payload produced (descriptor included), leaving room for the
/// RTP header, header extensions and SRTP under a 1,200-byte datagram.
pub const MAX_RTP_PAYLOAD: usize = 1100;

/// Largest frame reassembled; anything larger is dropped as malformed.
pub const MAX_REASSEMBLED_FRAME: usize = 4 << 20;

/// The shortest payload descriptor: `X=0 R N S R PID(3)`, with S set on the
/// first packet of a frame and partition id 0.
const START_OF_FRAME: u8 = 0x10;
const CONTINUATION: u8 = 0x00;

/// Splits `frame` into RTP payloads of at most `max_payload` bytes, each
/// starting with a one-byte VP8 payload descriptor (S set on the first).
/// An empty frame gives no packets.
pub fn packetize(frame: &[u8], max_payload: usize) -> Vec<Vec<u8>> {
    let chunk = max_payload.saturating_sub(1).max(1);
    frame
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let mut payload = Vec::with_capacity(part.len() + 1);
            payload.push(if i == 0 { START_OF_FRAME } else { CONTINUATION });
            payload.extend_from_slice(part);
            payload
        })
        .collect()
}

/// The parts of a VP8 payload descriptor a depacketizer needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// S set and partition id 0: the first packet of a frame.
    pub frame_start: bool,
    /// Where the VP8 payload begins.
    pub payload_offset: usize,
}

/// Parses a payload descriptor (RFC 7741 §4.2), extensions included.
/// `None` if it is truncated.
pub fn parse_descriptor(payload: &[u8]) -> Option<Descriptor> {
    let first = *payload.first()?;
    let mut offset = 1;
    if first & 0x80 != 0 {
        let ext = *payload.get(offset)?;
        offset += 1;
        if ext & 0x80 != 0 {
            let picture_id = *payload.get(offset)?;
            offset += if picture_id & 0x80 != 0 { 2 } else { 1 };
        }
        if ext & 0x40 != 0 {
            offset += 1;
        }
        if ext & 0x30 != 0 {
            offset += 1;
        }
    }
    if offset > payload.len() {
        return None;
    }
    Some(Descriptor {
        frame_start: first & 0x10 != 0 && first & 0x07 == 0,
        payload_offset: offset,
    })
}

/// What one packet did to the frame being reassembled.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// A complete frame (the marker packet arrived and nothing was missing).
    pub frame: Option<Vec<u8>>,
    /// A frame was given up (a packet was missing, malformed or out of
    /// order, or the frame grew too large). Reported once per frame.
    pub lost: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Between frames.
    Idle,
    /// Collecting the frame with this timestamp; the next packet expected.
    Collecting { timestamp: u32, next_seq: u16 },
    /// The current frame is lost; wait for the next frame start.
    Broken,
}

/// Reassembles VP8 frames of one RTP stream by timestamp, sequence number
/// and marker bit. No reordering: a frame with a gap is dropped.
#[derive(Debug)]
pub struct Reassembler {
    buf: Vec<u8>,
    state: State,
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new()
    }
}

impl Reassembler {
    /// Empty, waiting for a frame start.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            state: State::Idle,
        }
    }

    /// Takes one RTP packet of the stream.
    pub fn push(&mut self, seq: u16, timestamp: u32, marker: bool, payload: &[u8]) -> Pushed {
        let mut out = Pushed::default();
        let Some(desc) = parse_descriptor(payload) else {
            out.lost = self.give_up();
            return out;
        };
        let data = payload.get(desc.payload_offset..).unwrap_or(&[]);
        if desc.frame_start {
            // A new frame: whatever was still open is lost.
            out.lost = matches!(self.state, State::Collecting { .. });
            self.buf.clear();
            self.state = State::Collecting {
                timestamp,
                next_seq: seq,
            };
        }
        match self.state {
            State::Collecting {
                timestamp: ts,
                next_seq,
            } if ts == timestamp && next_seq == seq => {
                if self.buf.len() + data.len() > MAX_REASSEMBLED_FRAME {
                    out.lost |= self.give_up();
                    return out;
                }
                self.buf.extend_from_slice(data);
                self.state = State::Collecting {
                    timestamp,
                    next_seq: seq.wrapping_add(1),
                };
                if marker {
                    self.state = State::Idle;
                    out.frame = Some(std::mem::take(&mut self.buf));
                }
            }
            State::Collecting { .. } => out.lost |= self.give_up(),
            State::Idle | State::Broken => {}
        }
        out
    }

    /// Abandons the current frame; true if one was being collected.
    fn give_up(&mut self) -> bool {
        let was_collecting = matches!(self.state, State::Collecting { .. });
        self.buf.clear();
        if was_collecting {
            self.state = State::Broken;
        }
        was_collecting
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn packets_respect_the_size_limit_and_mark_the_start() {
        let f = frame(2500);
        let packets = packetize(&f, MAX_RTP_PAYLOAD);
        assert_eq!(packets.len(), 3);
        assert!(packets.iter().all(|p| p.len() <= MAX_RTP_PAYLOAD));
        assert_eq!(packets[0][0], 0x10);
        assert!(packets[1..].iter().all(|p| p[0] == 0));
        let joined: Vec<u8> = packets.iter().flat_map(|p| p[1..].to_vec()).collect();
        assert_eq!(joined, f);
        assert!(packetize(&[], MAX_RTP_PAYLOAD).is_empty());
    }

    #[test]
    fn reassembles_in_order_and_across_sequence_wrap() {
        let f = frame(3000);
        let packets = packetize(&f, 1000);
        let mut r = Reassembler::new();
        let n = packets.len();
        let mut got = None;
        for (i, p) in packets.iter().enumerate() {
            let seq = 65534u16.wrapping_add(i as u16);
            let pushed = r.push(seq, 90_000, i + 1 == n, p);
            assert!(!pushed.lost);
            if let Some(frame) = pushed.frame {
                got = Some(frame);
            }
        }
        assert_eq!(got.unwrap(), f);
    }

    #[test]
    fn a_gap_loses_the_frame_once_and_the_next_frame_recovers() {
        let f = frame(3000);
        let packets = packetize(&f, 1000);
        let mut r = Reassembler::new();
        assert_eq!(r.push(10, 1, false, &packets[0]), Pushed::default());
        // Packet 11 is missing.
        let p = r.push(12, 1, false, &packets[2]);
        assert!(p.lost && p.frame.is_none());
        let p = r.push(13, 1, true, &packets[3]);
        assert!(!p.lost && p.frame.is_none());
        // The next frame arrives whole.
        let g = frame(500);
        let p = r.push(14, 2, true, &packetize(&g, 1000)[0]);
        assert_eq!(p.frame.unwrap(), g);
        // A new start while a frame is open reports the open one lost.
        let _ = r.push(15, 3, false, &packets[0]);
        let p = r.push(16, 4, true, &packetize(&g, 1000)[0]);
        assert!(p.lost);
        assert_eq!(p.frame.unwrap(), g);
    }

    #[test]
    fn malformed_descriptors_never_panic() {
        let mut r = Reassembler::new();
        for payload in [&[][..], &[0x80], &[0x90, 0x80], &[0x90, 0xff, 0x80]] {
            assert!(r.push(1, 1, true, payload).frame.is_none());
        }
        // Extended descriptor with a 15-bit picture id, TL0PICIDX and KEYIDX.
        let d = parse_descriptor(&[0x90, 0xf0, 0x81, 0x02, 0x03, 0x04, 0xaa]).unwrap();
        assert_eq!(d.payload_offset, 6);
        assert!(d.frame_start);
    }
}
