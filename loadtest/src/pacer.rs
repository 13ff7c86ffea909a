//! A sender's pacer, modelled on a browser's (libwebrtc's paced sender): a
//! frame's video packets do not all leave at once, they drain through a
//! leaky bucket at a multiple of the media bitrate, and up to a burst
//! window's worth of them may leave together. Audio never waits for it.
//!
//! Without one, every packet of a key frame (several times a delta frame)
//! reaches the SFU in the same instant, which no browser does.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How much ahead of the pacing rate a sender may run: libwebrtc's default
/// burst interval.
pub const BURST_WINDOW: Duration = Duration::from_millis(40);

/// libwebrtc's pacing factor: the pacing rate is this multiple of the
/// target bitrate.
pub const DEFAULT_FACTOR: f64 = 2.5;

/// One peer's video queue.
#[derive(Debug)]
pub struct Pacer<T> {
    /// Bytes per second; `None` sends everything at once.
    rate: Option<f64>,
    /// Bytes sent ahead of the rate, at `updated`.
    debt: f64,
    updated: Option<Instant>,
    queue: VecDeque<(T, usize)>,
}

impl<T> Pacer<T> {
    /// A pacer for `media_bytes_per_s` of video at `factor` times that rate;
    /// `factor` 0 (or no video) sends everything at once.
    pub fn new(media_bytes_per_s: f64, factor: f64) -> Self {
        let rate = media_bytes_per_s * factor;
        Self {
            rate: (rate.is_finite() && rate > 0.0).then_some(rate),
            debt: 0.0,
            updated: None,
            queue: VecDeque::new(),
        }
    }

    /// Queues an item of `bytes` bytes.
    pub fn push(&mut self, item: T, bytes: usize) {
        self.queue.push_back((item, bytes));
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn settle(&mut self, now: Instant) {
        if let (Some(rate), Some(at)) = (self.rate, self.updated) {
            let paid = rate * now.saturating_duration_since(at).as_secs_f64();
            self.debt = (self.debt - paid).max(0.0);
        }
        self.updated = Some(now);
    }

    fn allowance(&self) -> f64 {
        self.rate
            .map_or(f64::INFINITY, |r| r * BURST_WINDOW.as_secs_f64())
    }

    /// The next item that may leave at `now`, if any.
    pub fn pop(&mut self, now: Instant) -> Option<T> {
        self.settle(now);
        if self.debt >= self.allowance() {
            return None;
        }
        let (item, bytes) = self.queue.pop_front()?;
        if self.rate.is_some() {
            self.debt += bytes as f64;
        }
        Some(item)
    }

    /// When the next queued item may leave (`None`: nothing queued).
    pub fn next_at(&self, now: Instant) -> Option<Instant> {
        if self.queue.is_empty() {
            return None;
        }
        let Some(rate) = self.rate else {
            return Some(now);
        };
        let over = self.debt - self.allowance();
        if over < 0.0 {
            return Some(now);
        }
        // Settled at `updated`; what is still over the allowance then is
        // paid off at the rate.
        let from = self.updated.unwrap_or(now);
        Some(from + Duration::from_secs_f64(over / rate) + Duration::from_micros(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(p: &mut Pacer<u32>, now: Instant) -> Vec<u32> {
        std::iter::from_fn(|| p.pop(now)).collect()
    }

    #[test]
    fn without_a_rate_everything_leaves_at_once() {
        let now = Instant::now();
        let mut p = Pacer::new(1000.0, 0.0);
        for i in 0..50 {
            p.push(i, 1200);
        }
        assert_eq!(drain(&mut p, now).len(), 50);
        assert_eq!(p.next_at(now), None);
    }

    #[test]
    fn a_burst_window_leaves_at_once_and_the_rest_at_the_pacing_rate() {
        let t0 = Instant::now();
        // 100 kB/s of media, paced at 250 kB/s: 10 kB per 40 ms window.
        let mut p = Pacer::new(100_000.0, DEFAULT_FACTOR);
        for i in 0..20 {
            p.push(i, 1000);
        }
        // The first window's worth (10 packets of 1 kB) leaves now, and the
        // bucket lets one more go as soon as it is below the window.
        assert_eq!(drain(&mut p, t0), (0..10).collect::<Vec<_>>());
        let n1 = p.next_at(t0).expect("more queued");
        assert!(n1 - t0 < Duration::from_micros(10), "{:?}", n1 - t0);
        assert_eq!(drain(&mut p, n1), vec![10]);
        // Then one packet per 4 ms (1 kB at 250 kB/s).
        let n2 = p.next_at(n1).expect("more queued");
        let wait = n2 - n1;
        assert!(
            wait > Duration::from_micros(3_900) && wait < Duration::from_micros(4_100),
            "{wait:?}"
        );
        assert_eq!(
            drain(&mut p, n1 + Duration::from_millis(2)),
            Vec::<u32>::new()
        );
        assert_eq!(drain(&mut p, n2), vec![11]);
        // 18 ms later, 4.5 kB have been paid off: four more packets.
        let later = n2 + Duration::from_millis(18);
        assert_eq!(drain(&mut p, later), vec![12, 13, 14, 15]);
        // Long after, the rest leave together and the queue is empty.
        assert_eq!(
            drain(&mut p, later + Duration::from_secs(1)),
            vec![16, 17, 18, 19]
        );
        assert!(p.is_empty());
        assert_eq!(p.next_at(later), None);
    }

    #[test]
    fn an_idle_pacer_allows_a_full_window_again() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100_000.0, DEFAULT_FACTOR);
        for i in 0..10 {
            p.push(i, 1000);
        }
        assert_eq!(drain(&mut p, t0).len(), 10);
        let t1 = t0 + Duration::from_secs(1);
        for i in 0..12 {
            p.push(i, 1000);
        }
        assert_eq!(drain(&mut p, t1).len(), 10);
    }
}
