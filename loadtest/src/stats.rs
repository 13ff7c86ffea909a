//! Small statistics helpers: a bounded uniform sample and percentiles.

use serde::Serialize;

/// A uniform random sample of at most `cap` values (reservoir sampling),
/// plus exact count, sum, min and max.
#[derive(Clone, Debug)]
pub struct Reservoir {
    cap: usize,
    seen: u64,
    sum: f64,
    min: f64,
    max: f64,
    values: Vec<f64>,
}

impl Reservoir {
    /// An empty sample keeping at most `cap` values.
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            seen: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            values: Vec::new(),
        }
    }

    /// Adds one value.
    pub fn add(&mut self, v: f64) {
        self.seen += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        if self.values.len() < self.cap {
            self.values.push(v);
        } else {
            let j = rand::random::<u64>() % self.seen;
            if let Some(slot) = self.values.get_mut(j as usize) {
                *slot = v;
            }
        }
    }

    /// Values seen.
    pub fn count(&self) -> u64 {
        self.seen
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        *self = Self::new(self.cap);
    }

    /// Count, mean and percentiles.
    pub fn summary(&self) -> Summary {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| -> Option<f64> {
            if v.is_empty() {
                return None;
            }
            let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
            v.get(idx.min(v.len() - 1)).copied()
        };
        Summary {
            count: self.seen,
            mean: (self.seen > 0).then(|| self.sum / self.seen as f64),
            min: (self.seen > 0).then_some(self.min),
            p50: pct(50.0),
            p95: pct(95.0),
            p99: pct(99.0),
            max: (self.seen > 0).then_some(self.max),
        }
    }
}

/// Distribution of a measure (units given where it is used).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Values measured.
    pub count: u64,
    /// Mean.
    pub mean: Option<f64>,
    /// Smallest.
    pub min: Option<f64>,
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_small_exact_sample() {
        let mut r = Reservoir::new(1000);
        for i in 1..=100 {
            r.add(f64::from(i));
        }
        let s = r.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, Some(51.0));
        assert_eq!(s.p99, Some(99.0));
        assert_eq!(s.max, Some(100.0));
        assert_eq!(Reservoir::new(5).summary().p50, None);
    }

    #[test]
    fn the_sample_stays_bounded() {
        let mut r = Reservoir::new(10);
        for i in 0..10_000 {
            r.add(f64::from(i));
        }
        assert_eq!(r.count(), 10_000);
        assert_eq!(r.summary().max, Some(9999.0));
        assert!(r.values.len() == 10);
    }
}
