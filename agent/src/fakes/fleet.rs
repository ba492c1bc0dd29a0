//! Fakes of the fleet subsystem's touchpoints: a seed source, a rebooter and a network change
//! watch.

use std::sync::Mutex;
use std::sync::PoisonError;

use crate::fleet::reboot::{RebootError, Rebooter};
use crate::fleet::seed::{SeedSource, SourceError};

/// A seed source with fixed content.
#[derive(Debug)]
pub struct FakeSeedSource {
    origin: String,
    text: Option<String>,
}

impl FakeSeedSource {
    /// A source named `origin` holding `text`.
    pub fn new(origin: &str, text: Option<String>) -> Self {
        Self { origin: origin.to_string(), text }
    }
}

impl SeedSource for FakeSeedSource {
    fn origin(&self) -> String {
        self.origin.clone()
    }
    fn read(&self) -> Result<Option<String>, SourceError> {
        Ok(self.text.clone())
    }
}

/// Records reboots instead of doing them.
#[derive(Debug, Default)]
pub struct Rebooted(Mutex<u32>);

impl Rebooted {
    /// Reboots asked for.
    pub fn count(&self) -> u32 {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Rebooter for Rebooted {
    fn reboot(&self) -> Result<(), RebootError> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        Ok(())
    }
}

/// A network change watch driven by the test: [`Netlink::change`] announces a change.
#[derive(Debug)]
pub struct Netlink(tokio::sync::watch::Sender<u64>);

impl Default for Netlink {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(0).0)
    }
}

impl Netlink {
    /// Announce a network change.
    pub fn change(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl crate::fleet::netwatch::NetWatch for Netlink {
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}
