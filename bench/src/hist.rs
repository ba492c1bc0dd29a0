//! A lock-free latency histogram: log-linear buckets (128 per power of two, so under 1% error)
//! of microseconds, recorded from many tasks at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two.
const SUB: u64 = 128;
/// Buckets: values up to 2^63 µs.
const BUCKETS: usize = 64 * SUB as usize;

/// A histogram of durations in microseconds.
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn index(us: u64) -> usize {
    if us < SUB {
        return us as usize;
    }
    let e = 63 - u64::from(us.leading_zeros()); // >= 7
    let shift = e - 7;
    ((shift + 1) * SUB + ((us >> shift) - SUB)) as usize
}

/// The largest value that falls in bucket `idx`.
fn upper(idx: usize) -> u64 {
    let idx = idx as u64;
    if idx < SUB {
        return idx;
    }
    let shift = idx / SUB - 1;
    let m = idx % SUB + SUB;
    let edge = (u128::from(m + 1) << shift) - 1;
    u64::try_from(edge).unwrap_or(u64::MAX)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self { buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Record one duration.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(b) = self.buckets.get(index(us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forget everything recorded.
    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
    }

    /// The non-empty buckets as (index, count), to send to another process.
    pub fn snapshot(&self) -> Vec<(usize, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, b)| (i, b.load(Ordering::Relaxed)))
            .filter(|(_, c)| *c > 0)
            .collect()
    }

    /// Add another histogram's [`Histogram::snapshot`] (indexes out of range are ignored).
    pub fn add(&self, snapshot: &[(usize, u64)]) {
        for (i, c) in snapshot {
            if let Some(b) = self.buckets.get(*i) {
                b.fetch_add(*c, Ordering::Relaxed);
            }
        }
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The value at quantile `q` (0..=1), rounded up to its bucket's upper edge; zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let target = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Duration::from_micros(upper(i));
            }
        }
        Duration::from_micros(upper(BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_merge_into_the_same_quantiles() {
        let (a, b, all) = (Histogram::new(), Histogram::new(), Histogram::new());
        for us in 1..=1000u64 {
            let d = Duration::from_micros(us * 37);
            if us % 3 == 0 {
                a.record(d)
            } else {
                b.record(d)
            }
            all.record(d);
        }
        let merged = Histogram::new();
        merged.add(&a.snapshot());
        merged.add(&b.snapshot());
        assert_eq!(merged.count(), 1000);
        for q in [0.5, 0.99, 0.999] {
            assert_eq!(merged.quantile(q), all.quantile(q));
        }
        merged.add(&[(usize::MAX, 5)]);
        assert_eq!(merged.count(), 1000, "an index out of range is ignored");
    }

    #[test]
    fn buckets_are_monotone_and_tight() {
        let mut last = 0;
        for us in (0..5_000_000u64).step_by(37).chain([u64::MAX / 2, u64::MAX]) {
            let i = index(us);
            assert!(i >= last, "index falls at {us}");
            assert!(i < BUCKETS, "{us} out of range");
            assert!(upper(i) >= us, "{us} above its bucket's upper edge {}", upper(i));
            // Under 1% relative error.
            assert!(upper(i) - us <= us / 100 + 1, "{us} in a bucket up to {}", upper(i));
            last = i;
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let h = Histogram::new();
        assert_eq!(h.quantile(0.99), Duration::ZERO);
        // 1..=1000 ms, one each.
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile(0.5).as_micros() as f64;
        let p99 = h.quantile(0.99).as_micros() as f64;
        assert!((500_000.0..=505_000.0).contains(&p50), "p50 {p50}");
        assert!((990_000.0..=1_000_000.0).contains(&p99), "p99 {p99}");
        assert!(h.quantile(1.0) >= Duration::from_millis(1000));
        h.reset();
        assert_eq!(h.count(), 0);
    }
}
