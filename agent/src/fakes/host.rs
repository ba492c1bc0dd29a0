//! A [`HostProbe`] with settable readings: every filesystem roomy and writable, no EDAC errors,
//! a synchronised clock and a reachable fleet until a test says otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::host::{ClockState, EdacCounts, FsStat, HostProbe};

/// The fake host.
#[derive(Debug)]
pub struct SystemProbe {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    fs: BTreeMap<PathBuf, FsStat>,
    edac: Option<EdacCounts>,
    clock: ClockState,
    reachable: bool,
}

impl Default for SystemProbe {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                fs: BTreeMap::new(),
                edac: Some(EdacCounts::default()),
                clock: ClockState { synced: true, max_error_us: 2_000 },
                reachable: true,
            }),
        }
    }
}

impl SystemProbe {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Set a filesystem's state (others: 50 % free, writable).
    pub fn set_fs(&self, path: &str, st: FsStat) {
        self.with(|s| s.fs.insert(PathBuf::from(path), st));
    }

    /// Set the EDAC counts (`None`: no EDAC driver).
    pub fn set_edac(&self, counts: Option<EdacCounts>) {
        self.with(|s| s.edac = counts);
    }

    /// Set the clock state.
    pub fn set_clock(&self, clock: ClockState) {
        self.with(|s| s.clock = clock);
    }

    /// Make the fleet endpoint reachable or not.
    pub fn set_reachable(&self, reachable: bool) {
        self.with(|s| s.reachable = reachable);
    }
}

impl HostProbe for SystemProbe {
    fn filesystem(&self, path: &Path) -> std::io::Result<FsStat> {
        Ok(self.with(|s| {
            s.fs.get(path).copied().unwrap_or(FsStat {
                total_bytes: 1 << 40,
                avail_bytes: 1 << 39,
                read_only: false,
                image: false,
            })
        }))
    }

    fn edac(&self) -> std::io::Result<Option<EdacCounts>> {
        Ok(self.with(|s| s.edac))
    }

    fn clock(&self) -> std::io::Result<ClockState> {
        Ok(self.with(|s| s.clock))
    }

    fn reach(&self, endpoint: &str, _timeout: Duration) -> std::io::Result<Duration> {
        if self.with(|s| s.reachable) {
            Ok(Duration::from_millis(3))
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("{endpoint}: connection refused"),
            ))
        }
    }
}
