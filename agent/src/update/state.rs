//! The update state machine: a pure struct changed in memory and persisted by the caller with one
//! atomic write (`persist::Store`, `state.dir/update.json`) after every transition.
//!
//! ```text
//!  idle ──begin──▶ downloading ──▶ writing ──▶ installed ──reboot──▶ rebooting
//!    ▲                 │              │            │                    │ boot (new slot)
//!    │             refuse/fail     fail          (power cut: old        ▼
//!    │                 ▼              ▼           slot still boots)   trial ──check ok──▶ blessed
//!    └──────────── failed ◀──────────┘                                 │ check failed
//!                                                                      ▼
//!                     rolled_back ◀── boot (old slot) ◀── check_failed (marked bad, reboot)
//! ```
//!
//! The anti-rollback floor rises only when a blessed boot of the new version is seen
//! ([`UpdateState::on_boot`] with `blessed`), so falling back to the old slot stays possible until
//! then. Design: `docs/0009-updates.md`.

use hearth_fleet_client::release::{ReleaseInfo, ReleaseVersion};
use serde::{Deserialize, Serialize};

/// Where an update is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Nothing in progress.
    #[default]
    Idle,
    /// Downloading the release's files into the state directory (resumable).
    Downloading,
    /// Writing the inactive slot and the ESP.
    Writing,
    /// The new slot and its counted boot entry are in place; the next boot tries it.
    Installed,
    /// A reboot into the new slot was started.
    Rebooting,
    /// Booted the new version; waiting for `update check`.
    Trial,
    /// `update check` failed; the entry was marked bad and the node reboots into the old slot.
    CheckFailed,
    /// The new version passed its check and was blessed.
    Blessed,
    /// The node came back on the old version.
    RolledBack,
    /// The update was refused or failed before the boot switch; the running system is unchanged.
    Failed,
}

impl Phase {
    /// Lower-case name (`downloading`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Downloading => "downloading",
            Phase::Writing => "writing",
            Phase::Installed => "installed",
            Phase::Rebooting => "rebooting",
            Phase::Trial => "trial",
            Phase::CheckFailed => "check_failed",
            Phase::Blessed => "blessed",
            Phase::RolledBack => "rolled_back",
            Phase::Failed => "failed",
        }
    }

    /// True while an update owns the inactive slot (another may not start).
    pub fn busy(self) -> bool {
        matches!(
            self,
            Phase::Downloading
                | Phase::Writing
                | Phase::Rebooting
                | Phase::Trial
                | Phase::CheckFailed
        )
    }
}

/// GPU health before the update: what `update check` compares against.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSnapshot {
    /// GPUs seen.
    pub gpus: u32,
    /// GPUs with a healthy verdict.
    pub healthy_gpus: u32,
    /// Whether the node was enrolled in a fleet (then the check needs the fleet session).
    pub enrolled: bool,
}

/// The persisted update state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateState {
    /// Where the current (or last) update is.
    pub phase: Phase,
    /// The release being installed (or last installed).
    pub target: Option<ReleaseInfo>,
    /// The version running before this update.
    pub from_version: Option<ReleaseVersion>,
    /// The slot being written (its partition name).
    pub slot: Option<String>,
    /// Bytes downloaded or written in the current phase.
    pub bytes_done: u64,
    /// Bytes the current phase handles in all.
    pub bytes_total: u64,
    /// The lowest version this node accepts: the last blessed version. Rises only after a bless.
    pub anti_rollback: Option<ReleaseVersion>,
    /// Health before the update.
    pub health_before: Option<HealthSnapshot>,
    /// Why the update failed, was refused or rolled back.
    pub reason: Option<String>,
    /// Whether the fleet was told about the last rollback.
    pub rollback_reported: bool,
}

/// A transition that is not allowed from the current phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("update is {phase}; cannot {action}")]
pub struct BadTransition {
    /// The phase it is in.
    pub phase: &'static str,
    /// What was asked.
    pub action: &'static str,
}

impl UpdateState {
    fn bad(&self, action: &'static str) -> BadTransition {
        BadTransition { phase: self.phase.as_str(), action }
    }

    /// Start installing `target` over the running `from` version into `slot`.
    pub fn begin(
        &mut self,
        target: ReleaseInfo,
        from: Option<ReleaseVersion>,
        slot: String,
        health: HealthSnapshot,
    ) -> Result<(), BadTransition> {
        if self.phase.busy() {
            return Err(self.bad("begin an update"));
        }
        self.bytes_total = target.total_bytes();
        self.bytes_done = 0;
        self.target = Some(target);
        self.from_version = from;
        self.slot = Some(slot);
        self.health_before = Some(health);
        self.reason = None;
        self.rollback_reported = false;
        self.phase = Phase::Downloading;
        Ok(())
    }

    /// Progress within the current phase.
    pub fn progress(&mut self, done: u64) {
        self.bytes_done = done.min(self.bytes_total.max(done));
    }

    /// Downloads verified; writing the slot (`total` bytes).
    pub fn writing(&mut self, total: u64) -> Result<(), BadTransition> {
        if self.phase != Phase::Downloading {
            return Err(self.bad("write"));
        }
        self.phase = Phase::Writing;
        self.bytes_done = 0;
        self.bytes_total = total;
        Ok(())
    }

    /// Slot written, boot entry in place.
    pub fn installed(&mut self) -> Result<(), BadTransition> {
        if self.phase != Phase::Writing {
            return Err(self.bad("finish installing"));
        }
        self.phase = Phase::Installed;
        self.bytes_done = self.bytes_total;
        Ok(())
    }

    /// A reboot into the new slot is about to start.
    pub fn rebooting(&mut self) -> Result<(), BadTransition> {
        if self.phase != Phase::Installed {
            return Err(self.bad("reboot into the new slot"));
        }
        self.phase = Phase::Rebooting;
        Ok(())
    }

    /// The update was refused or failed before the boot switch.
    pub fn fail(&mut self, reason: String) {
        self.phase = Phase::Failed;
        self.reason = Some(reason);
    }

    /// At startup: the node booted `booted` (the booted slot's version); `blessed` says whether
    /// its boot entry is blessed (no boot counter left). Returns true when the state changed.
    pub fn on_boot(&mut self, booted: Option<&ReleaseVersion>, blessed: bool) -> bool {
        let target = self.target.as_ref().map(|t| t.version.clone());
        let on_target = booted.is_some() && booted == target.as_ref();
        let before = self.clone();
        match self.phase {
            Phase::Installed | Phase::Rebooting | Phase::Trial if on_target => {
                if blessed {
                    self.bless();
                } else {
                    self.phase = Phase::Trial;
                }
            }
            Phase::Rebooting | Phase::Trial | Phase::CheckFailed if !on_target => {
                self.phase = Phase::RolledBack;
                if self.reason.is_none() {
                    self.reason =
                        Some("the new version did not finish booting within its tries".to_string());
                }
                self.rollback_reported = false;
            }
            Phase::CheckFailed => {
                // Marked bad but came back on it (no other entry left): stays in trial.
                self.phase = Phase::Trial;
            }
            _ => {}
        }
        // The running version's own bless (first boot or after an update) sets the floor.
        if blessed
            && let Some(v) = booted
            && self.anti_rollback.as_ref().is_none_or(|f| v > f)
        {
            self.anti_rollback = Some(v.clone());
        }
        *self != before
    }

    /// `update check` passed on the new version.
    pub fn bless(&mut self) {
        self.phase = Phase::Blessed;
        self.reason = None;
        if let Some(t) = &self.target
            && self.anti_rollback.as_ref().is_none_or(|f| &t.version > f)
        {
            self.anti_rollback = Some(t.version.clone());
        }
    }

    /// `update check` failed on the new version.
    pub fn check_failed(&mut self, reason: String) -> Result<(), BadTransition> {
        if self.phase != Phase::Trial {
            return Err(self.bad("fail the boot check"));
        }
        self.phase = Phase::CheckFailed;
        self.reason = Some(reason);
        Ok(())
    }

    /// Whether `version` may be installed over the running `current` version: above the running
    /// one and not below the anti-rollback floor.
    pub fn admits(
        &self,
        version: &ReleaseVersion,
        current: Option<&ReleaseVersion>,
    ) -> Result<(), String> {
        if let Some(floor) = &self.anti_rollback
            && version < floor
        {
            return Err(format!("release {version} is below the anti-rollback version {floor}"));
        }
        if let Some(c) = current
            && version <= c
        {
            return Err(format!("release {version} is not newer than the running {c}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn v(s: &str) -> ReleaseVersion {
        s.parse().expect("test value")
    }

    fn rel(s: &str) -> ReleaseInfo {
        ReleaseInfo {
            version: v(s),
            channel: "stable".into(),
            parts: BTreeMap::new(),
            roothash: None,
        }
    }

    fn installed(to: &str, from: &str) -> UpdateState {
        let mut s = UpdateState { anti_rollback: Some(v(from)), ..Default::default() };
        s.begin(rel(to), Some(v(from)), "b".into(), HealthSnapshot::default()).expect("test value");
        s.writing(10).expect("test value");
        s.installed().expect("test value");
        s
    }

    #[test]
    fn good_update_blesses_and_raises_the_floor_only_then() {
        let mut s = installed("2.0", "1.0");
        s.rebooting().expect("test value");
        assert_eq!(s.anti_rollback, Some(v("1.0")));
        assert!(s.on_boot(Some(&v("2.0")), false));
        assert_eq!(s.phase, Phase::Trial);
        assert_eq!(s.anti_rollback, Some(v("1.0")), "floor must not rise before the bless");
        s.on_boot(Some(&v("2.0")), true);
        assert_eq!(s.phase, Phase::Blessed);
        assert_eq!(s.anti_rollback, Some(v("2.0")));
    }

    #[test]
    fn failed_check_then_old_slot_is_a_rollback_with_the_reason() {
        let mut s = installed("2.0", "1.0");
        s.rebooting().expect("test value");
        s.on_boot(Some(&v("2.0")), false);
        s.check_failed("fleet session not established within 120 s".into()).expect("test value");
        s.on_boot(Some(&v("1.0")), true);
        assert_eq!(s.phase, Phase::RolledBack);
        assert_eq!(s.reason.as_deref(), Some("fleet session not established within 120 s"));
        assert_eq!(s.anti_rollback, Some(v("1.0")));
        assert!(!s.rollback_reported);
    }

    #[test]
    fn new_slot_that_never_boots_is_a_rollback() {
        let mut s = installed("2.0", "1.0");
        s.rebooting().expect("test value");
        s.on_boot(Some(&v("1.0")), true);
        assert_eq!(s.phase, Phase::RolledBack);
        assert!(s.reason.as_deref().expect("test value").contains("did not finish booting"));
    }

    #[test]
    fn power_cut_before_reboot_keeps_installed() {
        let mut s = installed("2.0", "1.0");
        // Booted the old slot again without a reboot request (power cut after install): the
        // new entry is still there, nothing rolled back.
        assert!(!s.on_boot(Some(&v("1.0")), true));
        assert_eq!(s.phase, Phase::Installed);
    }

    #[test]
    fn admits_only_newer_and_not_below_the_floor() {
        let s = UpdateState { anti_rollback: Some(v("1.5")), ..Default::default() };
        assert!(s.admits(&v("1.4"), None).expect_err("must fail").contains("anti-rollback"));
        assert!(s.admits(&v("1.6"), Some(&v("1.6"))).expect_err("must fail").contains("not newer"));
        assert!(s.admits(&v("1.10"), Some(&v("1.6"))).is_ok());
    }

    #[test]
    fn busy_update_refuses_a_second_begin() {
        let mut s = UpdateState::default();
        s.begin(rel("2.0"), None, "b".into(), HealthSnapshot::default()).expect("test value");
        let e = s
            .begin(rel("3.0"), None, "b".into(), HealthSnapshot::default())
            .expect_err("must fail");
        assert_eq!(e.phase, "downloading");
    }
}
