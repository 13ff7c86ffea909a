//! Media file formats the CLI reads and writes: WAV (PCM input), IVF (VP8
//! frames in and out) and Ogg Opus (recorded audio, RFC 7845). Small,
//! strict and allocation-light; malformed input is a typed error.

use std::io::{self, Read, Write};

/// Why a media file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading or writing failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// Not the format it claims to be, or a variant we do not support.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> FormatError {
    FormatError::Invalid(msg.into())
}

fn u16_le(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_le(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// 16-bit PCM audio.
#[derive(Clone, Debug, PartialEq)]
pub struct Pcm {
    /// Samples per second.
    pub rate: u32,
    /// Interleaved channels (1 or 2).
    pub channels: u16,
    /// Interleaved samples.
    pub samples: Vec<i16>,
}

impl Pcm {
    /// Mono at 48 kHz (what the CLI encodes), by averaging channels and
    /// linear resampling.
    pub fn to_mono_48k(&self) -> Vec<i16> {
        let ch = usize::from(self.channels.max(1));
        let mono: Vec<f32> = self
            .samples
            .chunks(ch)
            .map(|c| c.iter().map(|&s| f32::from(s)).sum::<f32>() / c.len() as f32)
            .collect();
        if self.rate == 48_000 || mono.is_empty() {
            return mono.iter().map(|&s| s as i16).collect();
        }
        let ratio = f64::from(self.rate) / 48_000.0;
        let out_len = (mono.len() as f64 / ratio) as usize;
        (0..out_len)
            .map(|i| {
                let pos = i as f64 * ratio;
                let j = pos as usize;
                let frac = (pos - j as f64) as f32;
                let a = mono.get(j).copied().unwrap_or(0.0);
                let b = mono.get(j + 1).copied().unwrap_or(a);
                (a + (b - a) * frac) as i16
            })
            .collect()
    }
}

/// Reads a RIFF/WAVE file of 16-bit PCM, mono or stereo.
pub fn read_wav(mut r: impl Read) -> Result<Pcm, FormatError> {
    let mut b = Vec::new();
    r.read_to_end(&mut b)?;
    if b.get(0..4) != Some(b"RIFF") || b.get(8..12) != Some(b"WAVE") {
        return Err(invalid("not a RIFF/WAVE file"));
    }
    let mut at = 12;
    let mut format: Option<(u16, u16, u32, u16)> = None;
    while at + 8 <= b.len() {
        let id = &b[at..at + 4];
        let len = u32_le(&b, at + 4).ok_or_else(|| invalid("truncated chunk"))? as usize;
        let body = b
            .get(at + 8..at + 8 + len)
            .ok_or_else(|| invalid("chunk runs past the end of the file"))?;
        if id == b"fmt " {
            let tag = u16_le(body, 0).ok_or_else(|| invalid("short fmt chunk"))?;
            let channels = u16_le(body, 2).ok_or_else(|| invalid("short fmt chunk"))?;
            let rate = u32_le(body, 4).ok_or_else(|| invalid("short fmt chunk"))?;
            let bits = u16_le(body, 14).ok_or_else(|| invalid("short fmt chunk"))?;
            format = Some((tag, channels, rate, bits));
        } else if id == b"data" {
            let (tag, channels, rate, bits) =
                format.ok_or_else(|| invalid("data before fmt chunk"))?;
            // 1 = PCM; 0xFFFE = WAVE_FORMAT_EXTENSIBLE (PCM sub-format assumed).
            if !(tag == 1 || tag == 0xfffe) || bits != 16 {
                return Err(invalid("only 16-bit PCM WAV is supported"));
            }
            if !(1..=2).contains(&channels) || !(8_000..=192_000).contains(&rate) {
                return Err(invalid("unsupported channel count or sample rate"));
            }
            let samples = body
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]))
                .collect();
            return Ok(Pcm {
                rate,
                channels,
                samples,
            });
        }
        at += 8 + len + (len & 1);
    }
    Err(invalid("no data chunk"))
}

/// Writes 16-bit PCM as a WAV file.
pub fn write_wav(mut w: impl Write, pcm: &Pcm) -> Result<(), FormatError> {
    let data_len = (pcm.samples.len() * 2) as u32;
    let block = pcm.channels * 2;
    w.write_all(b"RIFF")?;
    w.write_all(&(36 + data_len).to_le_bytes())?;
    w.write_all(b"WAVEfmt ")?;
    w.write_all(&16u32.to_le_bytes())?;
    w.write_all(&1u16.to_le_bytes())?;
    w.write_all(&pcm.channels.to_le_bytes())?;
    w.write_all(&pcm.rate.to_le_bytes())?;
    w.write_all(&(pcm.rate * u32::from(block)).to_le_bytes())?;
    w.write_all(&block.to_le_bytes())?;
    w.write_all(&16u16.to_le_bytes())?;
    w.write_all(b"data")?;
    w.write_all(&data_len.to_le_bytes())?;
    for s in &pcm.samples {
        w.write_all(&s.to_le_bytes())?;
    }
    Ok(())
}

/// One frame of an IVF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IvfFrame {
    /// Presentation timestamp in the file's time base.
    pub pts: u64,
    /// The encoded frame.
    pub data: Vec<u8>,
}

/// An IVF file's header fields the CLI uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IvfHeader {
    /// Width in pixels.
    pub width: u16,
    /// Height in pixels.
    pub height: u16,
    /// Time base numerator / denominator (seconds per pts unit).
    pub timebase: (u32, u32),
}

/// Reads a VP8 IVF file.
pub fn read_ivf(mut r: impl Read) -> Result<(IvfHeader, Vec<IvfFrame>), FormatError> {
    let mut b = Vec::new();
    r.read_to_end(&mut b)?;
    if b.get(0..4) != Some(b"DKIF") {
        return Err(invalid("not an IVF file"));
    }
    if b.get(8..12) != Some(b"VP80") {
        return Err(invalid("only VP8 IVF files are supported"));
    }
    let header_len = usize::from(u16_le(&b, 6).ok_or_else(|| invalid("short header"))?);
    let header = IvfHeader {
        width: u16_le(&b, 12).ok_or_else(|| invalid("short header"))?,
        height: u16_le(&b, 14).ok_or_else(|| invalid("short header"))?,
        timebase: (
            u32_le(&b, 20).ok_or_else(|| invalid("short header"))?,
            u32_le(&b, 16).ok_or_else(|| invalid("short header"))?,
        ),
    };
    let mut frames = Vec::new();
    let mut at = header_len.max(32);
    while at + 12 <= b.len() {
        let len = u32_le(&b, at).ok_or_else(|| invalid("truncated frame header"))? as usize;
        let pts_lo = u32_le(&b, at + 4).unwrap_or(0);
        let pts_hi = u32_le(&b, at + 8).unwrap_or(0);
        let data = b
            .get(at + 12..at + 12 + len)
            .ok_or_else(|| invalid("frame runs past the end of the file"))?;
        frames.push(IvfFrame {
            pts: u64::from(pts_hi) << 32 | u64::from(pts_lo),
            data: data.to_vec(),
        });
        at += 12 + len;
    }
    if at < b.len() {
        return Err(invalid("truncated frame header at the end of the file"));
    }
    Ok((header, frames))
}

/// Writes IVF frames as they arrive.
#[derive(Debug)]
pub struct IvfWriter<W: Write> {
    out: W,
}

impl<W: Write> IvfWriter<W> {
    /// Writes the header (time base 1/90000, frame count left 0).
    pub fn new(mut out: W, width: u16, height: u16) -> Result<Self, FormatError> {
        out.write_all(b"DKIF")?;
        out.write_all(&0u16.to_le_bytes())?;
        out.write_all(&32u16.to_le_bytes())?;
        out.write_all(b"VP80")?;
        out.write_all(&width.to_le_bytes())?;
        out.write_all(&height.to_le_bytes())?;
        out.write_all(&90_000u32.to_le_bytes())?;
        out.write_all(&1u32.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        Ok(Self { out })
    }

    /// Appends a frame with a 90 kHz timestamp.
    pub fn write(&mut self, pts: u64, frame: &[u8]) -> Result<(), FormatError> {
        self.out.write_all(&(frame.len() as u32).to_le_bytes())?;
        self.out.write_all(&pts.to_le_bytes())?;
        self.out.write_all(frame)?;
        Ok(())
    }

    /// Flushes the output.
    pub fn finish(mut self) -> Result<W, FormatError> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// CRC-32 as Ogg uses it (polynomial 0x04c11db7, no reflection, init 0).
fn ogg_crc(data: &[u8]) -> u32 {
    let mut crc = 0u32;
    for &b in data {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04c1_1db7
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Writes an Ogg Opus stream (RFC 7845), one Opus packet per page.
#[derive(Debug)]
pub struct OggOpusWriter<W: Write> {
    out: W,
    serial: u32,
    sequence: u32,
    granule: u64,
}

/// Samples of pre-skip written in the Opus header (the encoder's lookahead
/// is unknown for forwarded frames; 312 is libopus' usual value).
const PRE_SKIP: u16 = 312;

impl<W: Write> OggOpusWriter<W> {
    /// Writes the identification and comment headers.
    pub fn new(out: W, serial: u32, channels: u8, vendor: &str) -> Result<Self, FormatError> {
        let mut w = Self {
            out,
            serial,
            sequence: 0,
            granule: 0,
        };
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1);
        head.push(channels.max(1));
        head.extend_from_slice(&PRE_SKIP.to_le_bytes());
        head.extend_from_slice(&48_000u32.to_le_bytes());
        head.extend_from_slice(&0u16.to_le_bytes());
        head.push(0);
        w.page(&head, 0x02, 0)?;
        let mut tags = Vec::new();
        tags.extend_from_slice(b"OpusTags");
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor.as_bytes());
        tags.extend_from_slice(&0u32.to_le_bytes());
        w.page(&tags, 0x00, 0)?;
        Ok(w)
    }

    fn page(&mut self, packet: &[u8], flags: u8, granule: u64) -> Result<(), FormatError> {
        if packet.len() > 255 * 255 {
            return Err(invalid("packet too large for one Ogg page"));
        }
        let mut lacing = vec![255u8; packet.len() / 255];
        lacing.push((packet.len() % 255) as u8);
        let mut page = Vec::with_capacity(27 + lacing.len() + packet.len());
        page.extend_from_slice(b"OggS");
        page.push(0);
        page.push(flags);
        page.extend_from_slice(&granule.to_le_bytes());
        page.extend_from_slice(&self.serial.to_le_bytes());
        page.extend_from_slice(&self.sequence.to_le_bytes());
        page.extend_from_slice(&0u32.to_le_bytes());
        page.push(lacing.len() as u8);
        page.extend_from_slice(&lacing);
        page.extend_from_slice(packet);
        let crc = ogg_crc(&page);
        page[22..26].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all(&page)?;
        self.sequence += 1;
        Ok(())
    }

    /// Appends one Opus packet covering `samples` 48 kHz samples.
    pub fn write(&mut self, packet: &[u8], samples: u64) -> Result<(), FormatError> {
        self.granule += samples;
        let g = self.granule;
        self.page(packet, 0, g)
    }

    /// Writes an end-of-stream page and flushes.
    pub fn finish(mut self) -> Result<W, FormatError> {
        let g = self.granule;
        self.page(&[], 0x04, g)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads the Opus packets of an Ogg Opus stream (single logical stream;
/// checks page CRCs; skips the two header packets).
pub fn read_ogg_opus(mut r: impl Read) -> Result<Vec<Vec<u8>>, FormatError> {
    let mut b = Vec::new();
    r.read_to_end(&mut b)?;
    let mut packets = Vec::new();
    let mut partial = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let head = b
            .get(at..at + 27)
            .ok_or_else(|| invalid("truncated Ogg page header"))?;
        if &head[0..4] != b"OggS" {
            return Err(invalid("lost Ogg page sync"));
        }
        let segments = usize::from(head[26]);
        let lacing = b
            .get(at + 27..at + 27 + segments)
            .ok_or_else(|| invalid("truncated lacing table"))?;
        let body_len: usize = lacing.iter().map(|&l| usize::from(l)).sum();
        let end = at + 27 + segments + body_len;
        let mut page = b
            .get(at..end)
            .ok_or_else(|| invalid("truncated Ogg page"))?
            .to_vec();
        let stored = u32_le(&page, 22).unwrap_or(0);
        page[22..26].copy_from_slice(&[0; 4]);
        if ogg_crc(&page) != stored {
            return Err(invalid("Ogg page CRC mismatch"));
        }
        let mut body = &b[at + 27 + segments..end];
        for &l in lacing {
            let (seg, rest) = body.split_at(usize::from(l));
            partial.extend_from_slice(seg);
            body = rest;
            if l < 255 {
                packets.push(std::mem::take(&mut partial));
            }
        }
        at = end;
    }
    // Drop OpusHead, OpusTags and empty (end-of-stream) packets.
    Ok(packets
        .into_iter()
        .filter(|p| !p.is_empty() && !p.starts_with(b"OpusHead") && !p.starts_with(b"OpusTags"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wav_round_trips_and_resamples() {
        let pcm = Pcm {
            rate: 24_000,
            channels: 2,
            samples: vec![100, 300, -100, -300, 50, 50],
        };
        let mut buf = Vec::new();
        write_wav(&mut buf, &pcm).unwrap();
        let back = read_wav(&buf[..]).unwrap();
        assert_eq!(back, pcm);
        assert_eq!(back.to_mono_48k().len(), 6);
        assert_eq!(back.to_mono_48k()[0], 200);
        assert!(read_wav(&b"RIFF0000WAVE"[..]).is_err());
        assert!(read_wav(&buf[..30]).is_err());
    }

    #[test]
    fn ivf_round_trips() {
        let mut w = IvfWriter::new(Vec::new(), 640, 480).unwrap();
        w.write(0, &[1, 2, 3]).unwrap();
        w.write(3000, &[4; 10]).unwrap();
        let bytes = w.finish().unwrap();
        let (h, frames) = read_ivf(&bytes[..]).unwrap();
        assert_eq!((h.width, h.height), (640, 480));
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].pts, 3000);
        assert_eq!(frames[1].data, vec![4; 10]);
        assert!(read_ivf(&bytes[..40]).is_err());
    }

    #[test]
    fn ogg_opus_round_trips_with_valid_crcs() {
        let mut w = OggOpusWriter::new(Vec::new(), 7, 1, "conclave").unwrap();
        w.write(&[0xfc, 1, 2, 3], 960).unwrap();
        w.write(&vec![9; 600], 960).unwrap();
        let bytes = w.finish().unwrap();
        let packets = read_ogg_opus(&bytes[..]).unwrap();
        assert_eq!(packets, vec![vec![0xfc, 1, 2, 3], vec![9; 600]]);
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 30] ^= 1;
        assert!(read_ogg_opus(&bad[..]).is_err());
        // The well-known CRC of "OggS" pages: check the table-free CRC on a
        // reference value (CRC-32/MPEG-2 variant without final xor, init 0).
        assert_eq!(ogg_crc(b"123456789"), 0x89a1_897f);
    }
}
