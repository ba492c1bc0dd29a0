//! The per-GPU quarantine/reset state machine: a pure struct, changed in memory and persisted as
//! one generation-numbered document (`state.dir/health.json`, [`crate::persist::Store`]).
//!
//! ```text
//!   Serving ──reset-when-idle finding──▶ ResetPending ──idle──▶ (reset) ──▶ Rechecking
//!      │                                                                      │   │
//!      └──quarantine finding──▶ Quarantined ──idle──▶ (reset) ──▶ Rechecking ──┘   │
//!                                   ▲     │                          clean: Serving◀┘
//!                                   │     └─ reset fails / GPU lost: node asks for a reboot
//!      fault again after reset ─────┘  (more than K faults in the window, or an RMA finding: Rma)
//! ```
//!
//! A GPU is reset only when idle (no compute process) and only by the engine's command; the
//! other GPUs keep serving. Design note: `docs/0003-health.md`.

use std::collections::BTreeMap;

use hearth_proto::api::{GpuService, HealthAction};
use serde::{Deserialize, Serialize};

use super::checks::{Finding, worst_action};
use super::policy::Policy;

/// The persisted health state of the node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HealthState {
    /// GPU UUIDs seen in the first round after the first boot: the node's expected inventory.
    pub first_inventory: Vec<String>,
    /// Per-GPU records by UUID.
    pub gpus: BTreeMap<String, GpuRecord>,
    /// The node was asked to drain.
    pub drained: bool,
    /// Why the node asks the fleet for a reboot, if it does.
    pub reboot_requested: Option<String>,
}

/// One GPU's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuRecord {
    /// NVML index when last seen.
    pub index: u32,
    /// Where it stands.
    pub service: GpuService,
    /// Findings of events (XIDs, DBE events) that hold until a reset.
    pub latched: Vec<Finding>,
    /// Faults that needed a reset within the recurrence window.
    pub faults: u32,
    /// When the last such fault happened, ms since the Unix epoch.
    pub last_fault_ms: u64,
    /// Why it is an RMA candidate.
    pub rma_hint: Option<String>,
    /// XID 64 was seen before the last reset (a second one is an RMA hint).
    pub remap_failure_seen: bool,
    /// A reset failed: no more resets until the node reboots.
    pub reset_blocked: bool,
}

impl GpuRecord {
    fn new(index: u32) -> Self {
        Self {
            index,
            service: GpuService::Serving,
            latched: Vec::new(),
            faults: 0,
            last_fault_ms: 0,
            rma_hint: None,
            remap_failure_seen: false,
            reset_blocked: false,
        }
    }

    /// Recurrences: faults after the first.
    pub fn recurrences(&self) -> u32 {
        self.faults.saturating_sub(1)
    }
}

/// What the engine must do for the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Reset this idle GPU, then report with [`HealthState::reset_succeeded`] or
    /// [`HealthState::reset_failed`].
    Reset {
        /// NVML index.
        gpu: u32,
        /// UUID.
        uuid: String,
    },
}

impl HealthState {
    /// The record of `uuid`, created serving.
    pub fn record(&mut self, uuid: &str, index: u32) -> &mut GpuRecord {
        let rec = self.gpus.entry(uuid.to_string()).or_insert_with(|| GpuRecord::new(index));
        rec.index = index;
        rec
    }

    /// Latch an event finding until the next reset; XID 64 a second time becomes an RMA hint.
    pub fn latch(&mut self, uuid: &str, index: u32, mut finding: Finding, xid: Option<u64>) {
        let rec = self.record(uuid, index);
        if xid == Some(super::xid::REMAP_FAILURE_XID) && finding.action >= HealthAction::Quarantine
        {
            if rec.remap_failure_seen {
                finding.action = HealthAction::QuarantineRma;
                finding.reason.push_str(" (recurred after a reset: RMA candidate)");
            }
            rec.remap_failure_seen = true;
        }
        if !rec.latched.contains(&finding) {
            rec.latched.push(finding);
        }
    }

    fn fault(rec: &mut GpuRecord, policy: &Policy, now_ms: u64) {
        rec.faults += 1;
        rec.last_fault_ms = now_ms;
        if rec.faults > policy.reset.max_recurrences {
            rec.service = GpuService::Rma;
            rec.rma_hint.get_or_insert_with(|| {
                format!(
                    "{} faults needing a reset within {} h",
                    rec.faults, policy.reset.recurrence_window_h
                )
            });
        }
    }

    /// Decide for one GPU from its latched findings and this round's `live` ones. `idle` is
    /// `Some(true)` when NVML lists no compute process on it.
    pub fn decide(
        &mut self,
        uuid: &str,
        index: u32,
        live: &[Finding],
        idle: Option<bool>,
        policy: &Policy,
        now_ms: u64,
    ) -> Option<Command> {
        let window_ms = policy.reset.recurrence_window_h.saturating_mul(3_600_000);
        let rec = self.record(uuid, index);
        if rec.service == GpuService::Serving
            && rec.faults > 0
            && now_ms.saturating_sub(rec.last_fault_ms) > window_ms
        {
            rec.faults = 0;
        }
        let action = worst_action(rec.latched.iter().chain(live));
        let rma_reason = rec
            .latched
            .iter()
            .chain(live)
            .find(|f| f.action == HealthAction::QuarantineRma)
            .map(|f| f.reason.clone());
        let mut reboot = None;
        let command = match rec.service {
            GpuService::Rma => None,
            GpuService::Rechecking => {
                if action >= HealthAction::ResetWhenIdle {
                    rec.service = GpuService::Quarantined;
                    Self::fault(rec, policy, now_ms);
                    if let Some(r) = rma_reason {
                        rec.service = GpuService::Rma;
                        rec.rma_hint.get_or_insert(r);
                    }
                    if action == HealthAction::Reboot {
                        reboot = Some(format!("GPU {index} ({uuid}) cannot be reset"));
                    }
                } else {
                    rec.service = GpuService::Serving;
                }
                None
            }
            GpuService::Serving | GpuService::ResetPending | GpuService::Quarantined => {
                if action >= HealthAction::Quarantine {
                    if rec.service != GpuService::Quarantined {
                        let was_pending = rec.service == GpuService::ResetPending;
                        rec.service = GpuService::Quarantined;
                        if !was_pending {
                            Self::fault(rec, policy, now_ms);
                        }
                    }
                    if let Some(r) = rma_reason {
                        rec.service = GpuService::Rma;
                        rec.rma_hint.get_or_insert(r);
                    }
                    if action == HealthAction::Reboot {
                        reboot = Some(format!("GPU {index} ({uuid}) is lost; a reset cannot help"));
                    }
                } else if action == HealthAction::ResetWhenIdle {
                    if rec.service == GpuService::Serving {
                        rec.service = GpuService::ResetPending;
                        Self::fault(rec, policy, now_ms);
                    }
                } else if rec.service == GpuService::ResetPending {
                    // The condition went away on its own.
                    rec.service = GpuService::Serving;
                }
                let wants_reset =
                    matches!(rec.service, GpuService::Quarantined | GpuService::ResetPending);
                (wants_reset && idle == Some(true) && !rec.reset_blocked && reboot.is_none())
                    .then(|| Command::Reset { gpu: index, uuid: uuid.to_string() })
            }
        };
        if let Some(r) = reboot {
            self.reboot_requested.get_or_insert(r);
        }
        command
    }

    /// A reset of `uuid` succeeded: latched findings are cleared, one clean check returns it.
    pub fn reset_succeeded(&mut self, uuid: &str) {
        if let Some(rec) = self.gpus.get_mut(uuid) {
            rec.latched.clear();
            if rec.service != GpuService::Rma {
                rec.service = GpuService::Rechecking;
            }
        }
    }

    /// A reset of `uuid` failed: it stays quarantined and the node asks for a reboot.
    pub fn reset_failed(&mut self, uuid: &str, error: &str) {
        if let Some(rec) = self.gpus.get_mut(uuid) {
            rec.reset_blocked = true;
            if rec.service == GpuService::ResetPending {
                rec.service = GpuService::Quarantined;
            }
            let index = rec.index;
            self.reboot_requested
                .get_or_insert_with(|| format!("GPU {index} ({uuid}) reset failed: {error}"));
        }
    }

    /// The operator returns a GPU to service: latched findings, faults and RMA hint are cleared.
    pub fn release(&mut self, uuid: &str) -> bool {
        match self.gpus.get_mut(uuid) {
            Some(rec) => {
                *rec = GpuRecord::new(rec.index);
                true
            }
            None => false,
        }
    }

    /// After a (re)start with every GPU readable: a reboot request is answered, resets may run.
    pub fn clear_reboot(&mut self) {
        self.reboot_requested = None;
        for rec in self.gpus.values_mut() {
            rec.reset_blocked = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use hearth_proto::api::GpuVerdict;

    use super::*;

    fn f(action: HealthAction) -> Finding {
        let verdict = if action >= HealthAction::Quarantine {
            GpuVerdict::Failed
        } else {
            GpuVerdict::Degraded
        };
        Finding::new("t", verdict, action, format!("{action:?}"))
    }

    fn reset(c: Option<Command>) -> bool {
        matches!(c, Some(Command::Reset { .. }))
    }

    #[test]
    fn quarantine_waits_for_idle_then_resets_and_returns_after_a_clean_check() {
        let p = Policy::default();
        let mut s = HealthState::default();
        s.latch("A", 0, f(HealthAction::Quarantine), Some(48));
        assert!(!reset(s.decide("A", 0, &[], Some(false), &p, 1)));
        assert_eq!(s.gpus["A"].service, GpuService::Quarantined);
        assert!(reset(s.decide("A", 0, &[], Some(true), &p, 2)));
        s.reset_succeeded("A");
        assert_eq!(s.gpus["A"].service, GpuService::Rechecking);
        assert!(s.decide("A", 0, &[], Some(true), &p, 3).is_none());
        assert_eq!(s.gpus["A"].service, GpuService::Serving);
        assert_eq!(s.gpus["A"].faults, 1);
    }

    #[test]
    fn reset_when_idle_keeps_serving_until_idle() {
        let p = Policy::default();
        let mut s = HealthState::default();
        let live = [f(HealthAction::ResetWhenIdle)];
        assert!(!reset(s.decide("A", 0, &live, Some(false), &p, 1)));
        assert_eq!(s.gpus["A"].service, GpuService::ResetPending);
        assert!(reset(s.decide("A", 0, &live, Some(true), &p, 2)));
    }

    #[test]
    fn more_than_k_faults_is_rma_and_a_fault_after_reset_counts() {
        let p = Policy::default();
        let mut s = HealthState::default();
        for round in 0..3 {
            s.latch("A", 0, f(HealthAction::Quarantine), None);
            assert!(reset(s.decide("A", 0, &[], Some(true), &p, round)), "round {round}");
            s.reset_succeeded("A");
            s.decide("A", 0, &[], Some(true), &p, round);
            assert_eq!(s.gpus["A"].service, GpuService::Serving);
        }
        s.latch("A", 0, f(HealthAction::Quarantine), None);
        assert!(s.decide("A", 0, &[], Some(true), &p, 9).is_none());
        assert_eq!(s.gpus["A"].service, GpuService::Rma);
        assert!(s.gpus["A"].rma_hint.as_deref().is_some_and(|h| h.contains("4 faults")));
        assert!(s.release("A"));
        assert_eq!(s.gpus["A"].service, GpuService::Serving);
    }

    #[test]
    fn faults_are_forgotten_after_the_window() {
        let p = Policy::default();
        let mut s = HealthState::default();
        s.latch("A", 0, f(HealthAction::Quarantine), None);
        s.decide("A", 0, &[], Some(true), &p, 0);
        s.reset_succeeded("A");
        s.decide("A", 0, &[], Some(true), &p, 1);
        s.decide("A", 0, &[], Some(true), &p, 25 * 3_600_000);
        assert_eq!(s.gpus["A"].faults, 0);
    }

    #[test]
    fn xid64_twice_is_rma_and_lost_gpu_asks_for_reboot() {
        let p = Policy::default();
        let mut s = HealthState::default();
        s.latch("A", 0, f(HealthAction::Quarantine), Some(64));
        s.decide("A", 0, &[], Some(true), &p, 0);
        s.reset_succeeded("A");
        s.decide("A", 0, &[], Some(true), &p, 1);
        s.latch("A", 0, f(HealthAction::Quarantine), Some(64));
        assert!(s.decide("A", 0, &[], Some(true), &p, 2).is_none());
        assert_eq!(s.gpus["A"].service, GpuService::Rma);

        assert!(s.decide("B", 1, &[f(HealthAction::Reboot)], Some(true), &p, 3).is_none());
        assert_eq!(s.gpus["B"].service, GpuService::Quarantined);
        assert!(s.reboot_requested.as_deref().is_some_and(|r| r.contains("GPU 1")));
    }

    #[test]
    fn failed_reset_blocks_resets_and_requests_reboot() {
        let p = Policy::default();
        let mut s = HealthState::default();
        s.latch("A", 0, f(HealthAction::Quarantine), None);
        assert!(reset(s.decide("A", 0, &[], Some(true), &p, 0)));
        s.reset_failed("A", "exit status 255");
        assert!(s.decide("A", 0, &[], Some(true), &p, 1).is_none());
        assert!(s.reboot_requested.as_deref().is_some_and(|r| r.contains("255")));
        s.clear_reboot();
        assert!(reset(s.decide("A", 0, &[], Some(true), &p, 2)));
    }
}
