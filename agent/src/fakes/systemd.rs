//! A [`Notifier`] that records what it was told.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::systemd::{Notice, Notifier};

/// Records notices in memory; `watchdog` is the timeout it pretends the manager set.
#[derive(Debug, Default)]
pub struct SystemdNotifier {
    notices: Mutex<Vec<Notice>>,
    watchdog: Option<Duration>,
}

impl SystemdNotifier {
    /// A fake whose manager set this watchdog timeout.
    pub fn with_watchdog(watchdog: Option<Duration>) -> Self {
        Self { notices: Mutex::new(Vec::new()), watchdog }
    }

    /// Everything notified so far.
    pub fn notices(&self) -> Vec<Notice> {
        self.notices.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Notifier for SystemdNotifier {
    fn notify(&self, notice: Notice) {
        self.notices.lock().unwrap_or_else(PoisonError::into_inner).push(notice);
    }

    fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }
}
