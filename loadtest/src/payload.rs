//! Synthetic media frames: the right codec prefix, a small header the
//! receiver reads back after decryption (who sent it, which frame, when),
//! and filler up to a realistic size.
//!
//! Layout of the clear frame: `prefix || MAGIC || participant u32 ||
//! source u8 || layer u8 || frame u32 || sent_us u64 || filler`. The prefix
//! is empty for Opus, the 10-byte VP8 key-frame header or the 3-byte delta
//! header. Everything after the prefix is encrypted by SFrame, so the send
//! time the receiver reads cannot have been touched by the SFU.

/// Marks a load-test frame.
pub const MAGIC: [u8; 4] = *b"CLT1";
/// Bytes of header after the prefix.
pub const HEADER_LEN: usize = 4 + 4 + 1 + 1 + 4 + 8;
/// A VP8 key-frame prefix (640x480, frame tag with the key-frame bit clear).
pub const VP8_KEY_PREFIX: [u8; 10] = [0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];
/// A VP8 delta-frame prefix (frame tag with the inverse key-frame bit set).
pub const VP8_DELTA_PREFIX: [u8; 3] = [0x31, 0x02, 0x00];

/// Which stream a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Microphone.
    Audio,
    /// Camera.
    Camera,
    /// Screen share.
    Screen,
}

impl Source {
    fn code(self) -> u8 {
        match self {
            Source::Audio => 0,
            Source::Camera => 1,
            Source::Screen => 2,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Source::Audio),
            1 => Some(Source::Camera),
            2 => Some(Source::Screen),
            _ => None,
        }
    }
}

/// What the header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// Sending participant (incarnation id).
    pub participant: u32,
    /// Stream.
    pub source: Source,
    /// Simulcast layer.
    pub layer: u8,
    /// Frame number within the stream.
    pub frame: u32,
    /// Send time, µs since the run's clock origin.
    pub sent_us: u64,
}

/// Writes a clear frame of `size` bytes (at least prefix + header) into `out`.
pub fn build(out: &mut Vec<u8>, key_frame: Option<bool>, info: &FrameInfo, size: usize) {
    out.clear();
    match key_frame {
        Some(true) => out.extend_from_slice(&VP8_KEY_PREFIX),
        Some(false) => out.extend_from_slice(&VP8_DELTA_PREFIX),
        None => {}
    }
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&info.participant.to_be_bytes());
    out.push(info.source.code());
    out.push(info.layer);
    out.extend_from_slice(&info.frame.to_be_bytes());
    out.extend_from_slice(&info.sent_us.to_be_bytes());
    // Filler that does not compress to nothing, cheaply.
    let mut x = info.frame.wrapping_mul(2_654_435_761) | 1;
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.push(x as u8);
    }
}

/// Reads the header of a decrypted clear frame. `None` if it is not ours.
pub fn parse(frame: &[u8], vp8: bool) -> Option<FrameInfo> {
    let skip = if vp8 {
        if frame.first()? & 0x01 == 0 { 10 } else { 3 }
    } else {
        0
    };
    let h = frame.get(skip..skip + HEADER_LEN)?;
    if h.get(..4)? != MAGIC {
        return None;
    }
    let u32_at =
        |i: usize| -> Option<u32> { Some(u32::from_be_bytes(h.get(i..i + 4)?.try_into().ok()?)) };
    Some(FrameInfo {
        participant: u32_at(4)?,
        source: Source::from_code(*h.get(8)?)?,
        layer: *h.get(9)?,
        frame: u32_at(10)?,
        sent_us: u64::from_be_bytes(h.get(14..22)?.try_into().ok()?),
    })
}

/// Smallest frame `build` can produce for a codec.
pub fn min_size(vp8_key: Option<bool>) -> usize {
    HEADER_LEN
        + match vp8_key {
            Some(true) => VP8_KEY_PREFIX.len(),
            Some(false) => VP8_DELTA_PREFIX.len(),
            None => 0,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_for_each_codec() {
        let info = FrameInfo {
            participant: 7,
            source: Source::Camera,
            layer: 2,
            frame: 99,
            sent_us: 123_456_789,
        };
        for key in [Some(true), Some(false), None] {
            let mut buf = Vec::new();
            build(&mut buf, key, &info, 300);
            assert_eq!(buf.len(), 300);
            assert_eq!(parse(&buf, key.is_some()), Some(info));
        }
        let mut buf = Vec::new();
        build(&mut buf, Some(true), &info, 1);
        assert_eq!(buf.len(), min_size(Some(true)));
        assert!(parse(b"garbage", false).is_none());
    }
}
