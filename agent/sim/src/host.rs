//! [`SimHost`]: a [`SimNode`] behind a mutex, with the clock that drives it.
//!
//! Both the agent's `sim` backend and the fake `libnvidia-ml` hold one. With a [`SimClock::Real`]
//! clock every access first advances the node to `elapsed × scale`; with [`SimClock::Manual`]
//! only [`SimHost::advance`] moves time (deterministic tests).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::node::SimNode;
use crate::scenario::Scenario;

/// How simulated time moves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SimClock {
    /// Wall-clock time multiplied by a scale (1.0 = real time, 10.0 = ten times faster).
    Real {
        /// Simulated seconds per wall-clock second.
        scale: f64,
    },
    /// Only explicit advances move time.
    Manual,
}

/// A simulated node and its clock, shareable between threads.
#[derive(Debug)]
pub struct SimHost {
    node: Mutex<SimNode>,
    clock: SimClock,
    started: Instant,
    /// Simulated nanoseconds added by explicit advances on a real clock.
    offset_ns: AtomicU64,
}

impl SimHost {
    /// A host running `scenario` on `clock`, starting now at simulated time zero.
    pub fn new(scenario: &Scenario, clock: SimClock) -> Self {
        Self {
            node: Mutex::new(SimNode::new(scenario)),
            clock,
            started: Instant::now(),
            offset_ns: AtomicU64::new(0),
        }
    }

    /// The clock.
    pub fn clock(&self) -> SimClock {
        self.clock
    }

    /// Lock the node after advancing it to the clock's time. A panic in another holder does not
    /// poison the simulation: the node's state is always consistent between steps.
    pub fn lock(&self) -> MutexGuard<'_, SimNode> {
        let mut node = self.node.lock().unwrap_or_else(PoisonError::into_inner);
        if let SimClock::Real { scale } = self.clock {
            let offset = Duration::from_nanos(self.offset_ns.load(Ordering::Relaxed));
            let t = self.started.elapsed().mul_f64(scale) + offset;
            node.advance_to(t);
        }
        node
    }

    /// Move simulated time forward by `dt` (both clocks; on a real clock it adds to wall time).
    pub fn advance(&self, dt: Duration) {
        let mut node = self.lock();
        let nanos = u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX);
        self.offset_ns.fetch_add(nanos, Ordering::Relaxed);
        let t = node.now() + dt;
        node.advance_to(t);
    }
}
