//! The reconnect schedule: full-jitter exponential backoff (a delay drawn uniformly from
//! `[0, min(cap, base · 2^attempt)]`), reset once a session has stayed up for a stable period,
//! and skipped at once on a network change. Full jitter spreads a fleet of nodes that lost their
//! gateway at the same moment over the whole window, instead of bringing them back in waves.
//! Design: `docs/0006-tunnel.md`.

use std::time::Duration;

/// First backoff step.
pub const BASE: Duration = Duration::from_secs(1);
/// Largest delay.
pub const CAP: Duration = Duration::from_secs(60);
/// A session that lasted this long resets the schedule.
pub const STABLE: Duration = Duration::from_secs(60);

/// Where a node is in its reconnect schedule (a pure value; the caller supplies randomness).
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    stable: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BASE, CAP, STABLE)
    }
}

impl Backoff {
    /// A schedule with its own bounds.
    pub fn new(base: Duration, cap: Duration, stable: Duration) -> Self {
        Self { base, cap, stable, attempt: 0 }
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(30)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt, drawn with `random` (uniform over `u64`), and one step
    /// further up the schedule.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        // Uniform in [0, ceiling]: the high bits of random · (ceiling + 1).
        let pick = (u128::from(random) * (u128::from(nanos) + 1)) >> 64;
        Duration::from_nanos(u64::try_from(pick).unwrap_or(nanos))
    }

    /// A session ended after lasting `up`: start over if it was stable.
    pub fn session_ended(&mut self, up: Duration) {
        if up >= self.stable {
            self.attempt = 0;
        }
    }

    /// The network changed (an address or a route came up): try again at once, from the start.
    pub fn network_changed(&mut self) {
        self.attempt = 0;
    }

    /// Attempts since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// A random `u64` for [`Backoff::next_delay`] from the OS.
pub fn os_random() -> u64 {
    let mut b = [0u8; 8];
    // Without OS randomness, use the upper bound's midpoint rather than failing to reconnect.
    if getrandom::fill(&mut b).is_err() {
        return u64::MAX / 2;
    }
    u64::from_ne_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_from_one_second_to_the_cap() {
        let mut b = Backoff::default();
        let mut ceilings = Vec::new();
        for _ in 0..9 {
            ceilings.push(b.ceiling().as_secs());
            b.next_delay(0);
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn delays_are_spread_over_the_whole_window() {
        let mut b = Backoff::default();
        for _ in 0..10 {
            b.next_delay(0);
        }
        // At the cap: the extremes of the random input map to 0 and 60 s.
        assert_eq!(b.clone().next_delay(0), Duration::ZERO);
        assert_eq!(b.clone().next_delay(u64::MAX), CAP);
        let mid = b.clone().next_delay(u64::MAX / 2);
        assert!((Duration::from_secs(29)..Duration::from_secs(31)).contains(&mid), "{mid:?}");
        // Drawn from the OS: within bounds, and not all the same.
        let draws: Vec<_> = (0..32).map(|_| b.clone().next_delay(os_random())).collect();
        assert!(draws.iter().all(|d| *d <= CAP));
        assert!(draws.iter().any(|d| *d != draws[0]));
    }

    #[test]
    fn a_stable_session_or_a_network_change_resets_it() {
        let mut b = Backoff::default();
        for _ in 0..5 {
            b.next_delay(0);
        }
        b.session_ended(Duration::from_secs(5));
        assert_eq!(b.attempt(), 5, "a short session keeps the schedule");
        b.session_ended(STABLE);
        assert_eq!(b.ceiling(), BASE);
        for _ in 0..5 {
            b.next_delay(0);
        }
        b.network_changed();
        assert_eq!((b.attempt(), b.ceiling()), (0, BASE));
    }
}
