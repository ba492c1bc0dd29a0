//! systemd integration: the service manager's notification socket (`sd_notify`).
//!
//! [`Notifier`] is the narrow trait; [`SystemdNotifier`] the real one (the `sd-notify` crate, a
//! datagram to `$NOTIFY_SOCKET`); `crate::fakes::systemd::SystemdNotifier` records messages for
//! tests. Outside systemd (`NOTIFY_SOCKET` unset) the real one does nothing.

use std::time::Duration;

/// A message to the service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// `READY=1`: start-up finished.
    Ready,
    /// `STOPPING=1`: shutting down.
    Stopping,
    /// `WATCHDOG=1`: alive.
    Watchdog,
    /// `STATUS=...`: one line for `systemctl status`.
    Status(String),
}

/// The service manager's notification channel.
pub trait Notifier: Send + Sync + std::fmt::Debug {
    /// Send one notice. Failures are logged, never fatal.
    fn notify(&self, notice: Notice);
    /// The watchdog timeout the manager set (`WATCHDOG_USEC` for this PID), if any.
    fn watchdog_timeout(&self) -> Option<Duration>;
}

/// The real notifier.
#[derive(Debug, Default)]
pub struct SystemdNotifier {
    watchdog: Option<Duration>,
}

impl SystemdNotifier {
    /// Read `WATCHDOG_USEC`/`WATCHDOG_PID` once at start.
    pub fn from_env() -> Self {
        let mut usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec))
            .filter(|d| !d.is_zero());
        Self { watchdog }
    }
}

impl Notifier for SystemdNotifier {
    fn notify(&self, notice: Notice) {
        use sd_notify::NotifyState;
        let state = match &notice {
            Notice::Ready => NotifyState::Ready,
            Notice::Stopping => NotifyState::Stopping,
            Notice::Watchdog => NotifyState::Watchdog,
            Notice::Status(s) => NotifyState::Status(s),
        };
        if let Err(e) = sd_notify::notify(false, &[state]) {
            tracing::warn!(error = %e, ?notice, "sd_notify failed");
        }
    }

    fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }
}
