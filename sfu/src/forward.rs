//! The pure parts of the forwarding path: what the SFU can learn from a
//! packet it cannot decrypt (VP8 frame boundaries and key frames from the
//! payload descriptor and the clear prefix, the speaker's audio level from the
//! RFC 6464 extension), how an outgoing slot keeps its sequence numbers and
//! timestamps continuous when its source or layer changes, and who the
//! loudest speakers are.
//!
//! Nothing here does I/O or allocates per packet; the worker drives it.

use std::time::{Duration, Instant};

/// Where a VP8 packet sits in its frame, from the RFC 7741 payload
/// descriptor and, on the first packet, the clear VP8 payload header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vp8Info {
    /// First packet of a frame (S bit set on partition 0).
    pub frame_start: bool,
    /// The frame is a key frame (only known on the first packet).
    pub key_frame: bool,
    /// Offset of the VP8 payload (the encoded frame bytes) in the RTP payload.
    pub payload_offset: usize,
}

/// Parses the VP8 payload descriptor. `None` if it is malformed or truncated.
pub fn vp8_info(payload: &[u8]) -> Option<Vp8Info> {
    let first = *payload.first()?;
    let extended = first & 0x80 != 0;
    let start = first & 0x10 != 0;
    let partition = first & 0x07;
    let mut offset = 1;
    if extended {
        let x = *payload.get(offset)?;
        offset += 1;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits.
            let pid = *payload.get(offset)?;
            offset += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            offset += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            offset += 1; // TID/Y/KEYIDX
        }
    }
    if offset > payload.len() {
        return None;
    }
    let frame_start = start && partition == 0;
    let key_frame = frame_start && payload.get(offset).is_some_and(|b| b & 0x01 == 0);
    Some(Vp8Info {
        frame_start,
        key_frame,
        payload_offset: offset,
    })
}

/// Keeps one outgoing stream's sequence numbers and timestamps continuous
/// while what feeds it changes (a different speaker, a different simulcast
/// layer). The receiver sees one unbroken stream.
#[derive(Clone, Debug, Default)]
pub struct Rewriter {
    /// Identifies the input currently feeding the stream.
    source: Option<u64>,
    seq_delta: u16,
    ts_delta: u32,
    last_seq: u16,
    last_ts: u32,
    last_sent: Option<Instant>,
    started: bool,
}

/// What a [`Rewriter`] produced for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewritten {
    /// Outgoing sequence number.
    pub seq: u16,
    /// Outgoing timestamp.
    pub timestamp: u32,
}

fn seq_newer(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000
}

impl Rewriter {
    /// The input currently feeding this stream, if any.
    pub fn source(&self) -> Option<u64> {
        self.source
    }

    /// Rewrites a packet from input `source` (an opaque id: publisher,
    /// track and layer). A packet from a new input re-bases the offsets so
    /// that it follows the last packet sent, its timestamp advanced by the
    /// wall-clock time since then (at least one tick).
    pub fn rewrite(
        &mut self,
        source: u64,
        seq: u16,
        timestamp: u32,
        clock_rate: u32,
        now: Instant,
    ) -> Rewritten {
        if self.source != Some(source) {
            if self.started {
                let elapsed = self
                    .last_sent
                    .map(|t| now.saturating_duration_since(t))
                    .unwrap_or(Duration::ZERO);
                let ticks = (elapsed.as_micros() as u64 * u64::from(clock_rate) / 1_000_000)
                    .clamp(1, u64::from(u32::MAX / 2)) as u32;
                let next_seq = self.last_seq.wrapping_add(1);
                let next_ts = self.last_ts.wrapping_add(ticks);
                self.seq_delta = next_seq.wrapping_sub(seq);
                self.ts_delta = next_ts.wrapping_sub(timestamp);
            } else {
                // The first input keeps its own numbering.
                self.seq_delta = 0;
                self.ts_delta = 0;
            }
            self.source = Some(source);
        }
        let out = Rewritten {
            seq: seq.wrapping_add(self.seq_delta),
            timestamp: timestamp.wrapping_add(self.ts_delta),
        };
        if !self.started || seq_newer(out.seq, self.last_seq) {
            self.last_seq = out.seq;
            self.last_ts = out.timestamp;
            self.last_sent = Some(now);
        }
        self.started = true;
        out
    }

    /// The next packet starts a new input even if it comes from the source
    /// fed before (a slot that stopped carrying a publisher, skipped its
    /// packets, and carries it again): it follows the last packet sent.
    pub fn rebase(&mut self) {
        self.source = None;
    }

    /// Input packet `seq` of `source` is not forwarded (padding, say). If it
    /// directly follows the last packet sent, later packets move down by one,
    /// so the receiver sees no gap it would take for loss. Anything else is
    /// left alone: a real gap stays visible, to be repaired by NACK.
    pub fn skip(&mut self, source: u64, seq: u16) {
        if !self.started || self.source != Some(source) {
            return;
        }
        let last_in = self.last_seq.wrapping_sub(self.seq_delta);
        if seq == last_in.wrapping_add(1) {
            self.seq_delta = self.seq_delta.wrapping_sub(1);
        }
    }
}

/// The [`Rewriter`] input id of one publisher's source and layer.
pub fn source_key(publisher: u64, layer: u8, source: u64) -> u64 {
    (publisher << 8) | (u64::from(layer) << 2) | source
}

/// RFC 6464 level (0 = 0 dBov, loudest; 127 = silence) from a one-byte
/// extension payload, with the voice-activity flag.
pub fn audio_level(ext: &[u8]) -> Option<(u8, bool)> {
    let b = *ext.first()?;
    Some((b & 0x7f, b & 0x80 != 0))
}

/// Speaking activity of one publisher, smoothed over recent packets.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Activity {
    /// Exponentially smoothed loudness, 0 (silence) to 127 (0 dBov).
    pub score: f32,
    /// When the publisher was last heard above the speaking threshold.
    pub last_spoke: Option<Instant>,
}

/// Loudness above which a publisher counts as speaking (127 − 70 dBov).
const SPEAKING_SCORE: f32 = 57.0;
/// Weight of a new sample in the smoothed score.
const SMOOTHING: f32 = 0.05;

impl Activity {
    /// Feeds one packet's level (RFC 6464, lower is louder).
    pub fn observe(&mut self, level: u8, now: Instant) {
        let loudness = 127.0 - f32::from(level.min(127));
        self.score += (loudness - self.score) * SMOOTHING;
        if self.score >= SPEAKING_SCORE {
            self.last_spoke = Some(now);
        }
    }

    /// Decays the score of a publisher that has sent nothing (DTX silence).
    pub fn decay(&mut self, factor: f32) {
        self.score *= factor;
    }
}

/// Picks the loudest speakers with hysteresis: a current member keeps its
/// place unless an outsider is louder by `margin`. Returns the new ranking,
/// loudest first, of at most `k` ids.
pub fn rank_speakers<I>(current: &[I], candidates: &[(I, f32)], k: usize, margin: f32) -> Vec<I>
where
    I: Copy + PartialEq,
{
    let score_of = |id: I| candidates.iter().find(|(c, _)| *c == id).map(|(_, s)| *s);
    // Keep current members that still exist.
    let mut kept: Vec<(I, f32)> = current
        .iter()
        .filter_map(|&id| score_of(id).map(|s| (id, s)))
        .collect();
    let mut outsiders: Vec<(I, f32)> = candidates
        .iter()
        .filter(|(c, _)| !current.contains(c))
        .copied()
        .collect();
    outsiders.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (id, score) in outsiders {
        if kept.len() < k {
            kept.push((id, score));
            continue;
        }
        // Replace the quietest kept member if clearly louder.
        let Some((weakest, weakest_score)) = kept
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.1.total_cmp(&b.1.1))
            .map(|(i, (_, s))| (i, *s))
        else {
            break;
        };
        if score > weakest_score + margin {
            kept[weakest] = (id, score);
        } else {
            break;
        }
    }
    kept.truncate(k);
    kept.sort_by(|a, b| b.1.total_cmp(&a.1));
    kept.into_iter().map(|(id, _)| id).collect()
}

/// Per-source limiter for key-frame requests: at most one per interval,
/// however many subscribers ask. The interval grows with the source's
/// audience (see [`KeyFrameThrottle::interval_for`]).
#[derive(Clone, Copy, Debug)]
pub struct KeyFrameThrottle {
    last: Option<Instant>,
    /// A request arrived while throttled and must be sent when allowed.
    pending: bool,
    /// The spacing set by the last request.
    interval: Duration,
}

impl Default for KeyFrameThrottle {
    fn default() -> Self {
        Self {
            last: None,
            pending: false,
            interval: Self::INTERVAL,
        }
    }
}

impl KeyFrameThrottle {
    /// Minimum spacing between requests to a source of up to
    /// [`Self::AUDIENCE_STEP`] subscribers.
    pub const INTERVAL: Duration = Duration::from_millis(200);
    /// Each started run of this many subscribers adds [`Self::INTERVAL`].
    pub const AUDIENCE_STEP: usize = 100;
    /// The longest spacing, however large the audience.
    pub const MAX_INTERVAL: Duration = Duration::from_secs(1);

    /// The spacing for a source `audience` subscribers receive. A key frame
    /// is several times the size of other frames and goes to every one of
    /// them: one of a 500-subscriber screen share is 500 copies of tens of
    /// kilobytes, and a large audience always holds someone who lost a
    /// packet and asks. Small calls keep fast recovery; at 500 a lost
    /// frame waits up to a second for its key frame.
    pub fn interval_for(audience: usize) -> Duration {
        let steps =
            u32::try_from(audience.div_ceil(Self::AUDIENCE_STEP).max(1)).unwrap_or(u32::MAX);
        Self::INTERVAL.saturating_mul(steps).min(Self::MAX_INTERVAL)
    }

    /// Asks for a key frame for a source `audience` subscribers receive.
    /// Returns true if a request should go out now; otherwise the request
    /// is coalesced and [`Self::due`] reports it later.
    pub fn request(&mut self, now: Instant, audience: usize) -> bool {
        self.interval = Self::interval_for(audience);
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                self.pending = true;
                false
            }
            _ => {
                self.last = Some(now);
                self.pending = false;
                true
            }
        }
    }

    /// When a coalesced request becomes sendable, if one is waiting.
    pub fn due(&self) -> Option<Instant> {
        if self.pending {
            self.last.map(|t| t + self.interval)
        } else {
            None
        }
    }

    /// Sends a coalesced request if its time has come.
    pub fn flush(&mut self, now: Instant) -> bool {
        if self.pending && self.due().is_some_and(|d| d <= now) {
            self.last = Some(now);
            self.pending = false;
            true
        } else {
            false
        }
    }
}

/// A simulcast layer, lowest first (rids `q`, `h`, `f`).
pub fn layer_of_rid(rid: &str) -> Option<u8> {
    match rid {
        "q" | "l" | "0" => Some(0),
        "h" | "m" | "1" => Some(1),
        "f" | "2" => Some(2),
        _ => None,
    }
}

/// Chooses the layer a subscriber slot should receive: the highest whose
/// measured bitrate fits `budget_bps`, never above `max_layer`, and the lowest
/// available layer if none fits.
pub fn choose_layer(available: &[(u8, u64)], budget_bps: Option<u64>, max_layer: u8) -> Option<u8> {
    let mut best: Option<u8> = None;
    let mut lowest: Option<u8> = None;
    for &(layer, bps) in available {
        if lowest.is_none_or(|l| layer < l) {
            lowest = Some(layer);
        }
        if layer > max_layer {
            continue;
        }
        if budget_bps.is_some_and(|b| bps > b) {
            continue;
        }
        if best.is_none_or(|b| layer > b) {
            best = Some(layer);
        }
    }
    best.or(lowest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_descriptor_finds_frame_start_and_key_frames() {
        // S=1, PID=0, no extension, key frame (P bit 0).
        let key = [0x10, 0x9c, 0x01, 0x2a];
        assert_eq!(
            vp8_info(&key),
            Some(Vp8Info {
                frame_start: true,
                key_frame: true,
                payload_offset: 1
            })
        );
        // Extended: I with 15-bit picture id, L, T.
        let delta = [0x90, 0xe0, 0x80, 0x01, 0x05, 0x20, 0x31];
        let info = vp8_info(&delta).unwrap();
        assert!(info.frame_start && !info.key_frame);
        assert_eq!(info.payload_offset, 6);
        // Continuation packet.
        assert!(!vp8_info(&[0x00, 0x00]).unwrap().frame_start);
        // Truncated descriptors.
        assert_eq!(vp8_info(&[]), None);
        assert_eq!(vp8_info(&[0x90]), None);
        assert_eq!(vp8_info(&[0x90, 0x80, 0x80]), None);
    }

    #[test]
    fn rewriter_is_continuous_across_source_switches() {
        let t0 = Instant::now();
        let mut rw = Rewriter::default();
        let a = rw.rewrite(1, 1000, 50_000, 90_000, t0);
        assert_eq!((a.seq, a.timestamp), (1000, 50_000));
        let b = rw.rewrite(1, 1001, 53_000, 90_000, t0 + Duration::from_millis(33));
        assert_eq!(b.seq, 1001);
        // Switch to a source with unrelated numbering 100 ms later.
        let c = rw.rewrite(2, 7, 9, 90_000, t0 + Duration::from_millis(133));
        assert_eq!(c.seq, 1002);
        assert_eq!(c.timestamp, 53_000 + 9_000);
        let d = rw.rewrite(2, 8, 3009, 90_000, t0 + Duration::from_millis(166));
        assert_eq!((d.seq, d.timestamp), (1003, 65_000));
        // A late packet of the new source keeps its relative place.
        let e = rw.rewrite(2, 6, 0, 90_000, t0 + Duration::from_millis(170));
        assert_eq!(e.seq, 1001u16.wrapping_add(0));
        assert_eq!(rw.rewrite(2, 9, 6009, 90_000, t0).seq, 1004);
    }

    #[test]
    fn rewriter_closes_over_skipped_padding_but_not_loss() {
        let t0 = Instant::now();
        let mut rw = Rewriter::default();
        assert_eq!(rw.rewrite(1, 100, 0, 90_000, t0).seq, 100);
        // 101 and 102 are padding: skipped, so 103 goes out as 101.
        rw.skip(1, 101);
        rw.skip(1, 102);
        assert_eq!(rw.rewrite(1, 103, 0, 90_000, t0).seq, 101);
        // 104 is lost upstream: the gap stays for NACK; its retransmission fills it.
        assert_eq!(rw.rewrite(1, 105, 0, 90_000, t0).seq, 103);
        assert_eq!(rw.rewrite(1, 104, 0, 90_000, t0).seq, 102);
        // Padding of another input, or out of order, changes nothing.
        rw.skip(2, 106);
        rw.skip(1, 110);
        assert_eq!(rw.rewrite(1, 106, 0, 90_000, t0).seq, 104);
    }

    #[test]
    fn a_rebased_rewriter_hides_what_it_skipped_of_the_same_source() {
        let t0 = Instant::now();
        let mut rw = Rewriter::default();
        assert_eq!(rw.rewrite(1, 500, 0, 90_000, t0).seq, 500);
        // The slot stops carrying source 1 (packets 501..=540 not sent), then
        // carries it again from a key frame: no gap for the receiver.
        rw.rebase();
        assert_eq!(rw.rewrite(1, 541, 0, 90_000, t0).seq, 501);
        assert_eq!(rw.rewrite(1, 542, 0, 90_000, t0).seq, 502);
    }

    #[test]
    fn rewriter_wraps() {
        let t0 = Instant::now();
        let mut rw = Rewriter::default();
        rw.rewrite(1, 65_535, u32::MAX, 48_000, t0);
        let next = rw.rewrite(2, 10, 10, 48_000, t0 + Duration::from_millis(20));
        assert_eq!(next.seq, 0);
        assert_eq!(next.timestamp, 959);
    }

    #[test]
    fn speaker_ranking_has_hysteresis() {
        let ranked =
            rank_speakers::<u32>(&[], &[(1, 10.0), (2, 50.0), (3, 30.0), (4, 5.0)], 3, 5.0);
        assert_eq!(ranked, vec![2, 3, 1]);
        // 4 becomes a little louder than 1: not enough to displace it.
        let ranked = rank_speakers(
            &ranked,
            &[(1, 10.0), (2, 50.0), (3, 30.0), (4, 13.0)],
            3,
            5.0,
        );
        assert_eq!(ranked, vec![2, 3, 1]);
        // Clearly louder: it takes the quietest place.
        let ranked = rank_speakers(
            &ranked,
            &[(1, 10.0), (2, 50.0), (3, 30.0), (4, 60.0)],
            3,
            5.0,
        );
        assert_eq!(ranked, vec![4, 2, 3]);
        // A member that left is dropped.
        let ranked = rank_speakers(&ranked, &[(2, 50.0), (3, 30.0)], 3, 5.0);
        assert_eq!(ranked, vec![2, 3]);
    }

    #[test]
    fn activity_tracks_speaking() {
        let now = Instant::now();
        let mut a = Activity::default();
        for _ in 0..100 {
            a.observe(20, now);
        }
        assert!(a.score > 100.0 && a.last_spoke == Some(now));
        let mut quiet = Activity::default();
        for _ in 0..100 {
            quiet.observe(127, now);
        }
        assert!(quiet.score < 1.0 && quiet.last_spoke.is_none());
    }

    #[test]
    fn key_frame_requests_are_throttled_and_coalesced() {
        let t0 = Instant::now();
        let mut k = KeyFrameThrottle::default();
        assert!(k.request(t0, 3));
        assert!(!k.request(t0 + Duration::from_millis(10), 3));
        assert!(!k.request(t0 + Duration::from_millis(50), 3));
        assert_eq!(k.due(), Some(t0 + KeyFrameThrottle::INTERVAL));
        assert!(!k.flush(t0 + Duration::from_millis(100)));
        assert!(k.flush(t0 + Duration::from_millis(200)));
        assert_eq!(k.due(), None);
        assert!(k.request(t0 + Duration::from_millis(400), 3));
    }

    #[test]
    fn a_larger_audience_spaces_key_frames_further_up_to_a_second() {
        let ms = |n| KeyFrameThrottle::interval_for(n).as_millis();
        assert_eq!([ms(0), ms(1), ms(100)], [200, 200, 200]);
        assert_eq!([ms(101), ms(250), ms(499)], [400, 600, 1000]);
        assert_eq!(ms(100_000), 1000);

        // A 500-subscriber source: one key frame a second, however many ask.
        let t0 = Instant::now();
        let mut k = KeyFrameThrottle::default();
        assert!(k.request(t0, 500));
        for i in 1..10 {
            assert!(!k.request(t0 + Duration::from_millis(i * 90), 500));
        }
        assert!(!k.flush(t0 + Duration::from_millis(999)));
        assert!(k.flush(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn layer_choice_respects_budget_and_cap() {
        let layers = [(0, 150_000), (1, 500_000), (2, 1_500_000)];
        assert_eq!(choose_layer(&layers, None, 2), Some(2));
        assert_eq!(choose_layer(&layers, Some(600_000), 2), Some(1));
        assert_eq!(choose_layer(&layers, Some(10_000), 2), Some(0));
        assert_eq!(choose_layer(&layers, None, 0), Some(0));
        assert_eq!(choose_layer(&[], None, 2), None);
    }
}
