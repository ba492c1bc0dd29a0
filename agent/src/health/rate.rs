//! Rate detectors over monotonic counters (ECC corrections, PCIe replays, NVLink errors).
//!
//! A detector is fed the counter's value with a timestamp and answers how much it rose within
//! the last window. A counter that falls (a GPU reset or driver reload zeroes it) is rebased: the
//! new value counts as rise since the fall. The threshold is a count per window, never a rate
//! extrapolated from a short span, so one error just after start is one error, not 60 a minute.

use std::collections::VecDeque;

/// Rise of one counter within a sliding window.
#[derive(Debug, Clone)]
pub struct RateDetector {
    window_ms: u64,
    /// (time, cumulative rise) points within the window, oldest first.
    points: VecDeque<(u64, u64)>,
    last_raw: Option<u64>,
    cumulative: u64,
}

impl RateDetector {
    /// A detector over a window of `window_ms`.
    pub fn new(window_ms: u64) -> Self {
        Self { window_ms, points: VecDeque::new(), last_raw: None, cumulative: 0 }
    }

    /// Feed the counter's value at `now_ms`; returns the rise within the window.
    pub fn observe(&mut self, now_ms: u64, raw: u64) -> u64 {
        if let Some(last) = self.last_raw {
            let rise = if raw >= last { raw - last } else { raw };
            self.cumulative = self.cumulative.saturating_add(rise);
        }
        self.last_raw = Some(raw);
        self.points.push_back((now_ms, self.cumulative));
        // Keep one point at or before the window start as the baseline.
        while self.points.len() > 1
            && self.points.get(1).is_some_and(|(t, _)| now_ms.saturating_sub(*t) >= self.window_ms)
        {
            self.points.pop_front();
        }
        self.rise()
    }

    /// Rise within the window as of the last observation.
    pub fn rise(&self) -> u64 {
        match (self.points.front(), self.points.back()) {
            (Some((_, first)), Some((_, last))) => last - first,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_rise_within_the_window_only() {
        let mut d = RateDetector::new(60_000);
        assert_eq!(d.observe(0, 100), 0);
        assert_eq!(d.observe(1_000, 101), 1);
        assert_eq!(d.observe(30_000, 105), 5);
        // At 61 s the baseline is the 1 s point (101): rise 4 + 2.
        assert_eq!(d.observe(61_000, 107), 6);
        // Much later, nothing new.
        assert_eq!(d.observe(200_000, 107), 0);
    }

    #[test]
    fn a_counter_reset_is_rebased() {
        let mut d = RateDetector::new(60_000);
        d.observe(0, 500);
        assert_eq!(d.observe(1_000, 3), 3);
        assert_eq!(d.observe(2_000, 4), 4);
    }
}
