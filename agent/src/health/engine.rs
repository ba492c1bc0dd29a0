//! [`Monitor`]: the health engine. Fed sampling rounds, GPU events, host checks and reset
//! results; keeps the per-GPU rate detectors, the persisted [`HealthState`], the verdict-change
//! ring; answers with [`Command`]s (resets of idle GPUs) and a [`NodeHealth`] view.
//!
//! It is synchronous and owns no thread: the `health` subsystem ([`super::subsystem`]) drives it
//! from the agent's channels; tests and the latency benchmark drive it directly.

use std::collections::{BTreeMap, VecDeque};

use hearth_proto::api::{
    GpuHealth, GpuHealthEntry, GpuService, GpuVerdict, HealthAction, HostCheck, VerdictChange,
};
use hearth_proto::gpu::{GpuEvent, GpuEventKind, GpuInventory, GpuSample, NvlinkErrorCounters};

use super::checks::{Finding, Rates, sample_findings, worst_action, worst_verdict};
use super::machine::{Command, HealthState};
use super::policy::Policy;
use super::rate::RateDetector;
use super::xid;
use crate::persist::{PersistError, Store};

/// Verdict changes kept in memory.
pub const HISTORY: usize = 256;
/// Window of the rate checks, ms.
pub const RATE_WINDOW_MS: u64 = 60_000;

/// One GPU as one sampling round saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuObservation {
    /// Fixed facts.
    pub inventory: GpuInventory,
    /// The reading, when it succeeded.
    pub sample: Option<GpuSample>,
    /// The GPU answered "lost".
    pub lost: bool,
    /// The read failed for another reason.
    pub error: Option<String>,
    /// NVLink error counters, when read.
    pub nvlink_errors: Option<Vec<NvlinkErrorCounters>>,
    /// Persistence mode, when read.
    pub persistence: Option<bool>,
}

/// What the health layer publishes (on the agent's `watch`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeHealth {
    /// Per GPU, by index.
    pub gpus: Vec<GpuHealthEntry>,
    /// First-boot GPUs the driver no longer lists.
    pub missing_gpus: Vec<String>,
    /// Host checks.
    pub host: Vec<HostCheck>,
    /// Verdict changes, oldest first.
    pub history: Vec<VerdictChange>,
    /// Why the node asks for a reboot.
    pub reboot_requested: Option<String>,
    /// The node was asked to drain.
    pub drained: bool,
    /// Persisted state generation.
    pub generation: u64,
    /// Sampling rounds judged.
    pub rounds: u64,
}

#[derive(Debug, Clone)]
struct Live {
    index: u32,
    findings: Vec<Finding>,
    idle: Option<bool>,
    sbe: RateDetector,
    pcie: RateDetector,
    nvlink: RateDetector,
}

impl Live {
    fn new(index: u32) -> Self {
        Self {
            index,
            findings: Vec::new(),
            idle: None,
            sbe: RateDetector::new(RATE_WINDOW_MS),
            pcie: RateDetector::new(RATE_WINDOW_MS),
            nvlink: RateDetector::new(RATE_WINDOW_MS),
        }
    }
}

/// The health engine.
#[derive(Debug)]
pub struct Monitor {
    policy: Policy,
    state: HealthState,
    saved: HealthState,
    generation: u64,
    store: Option<Store>,
    live: BTreeMap<String, Live>,
    host: Vec<HostCheck>,
    missing: Vec<String>,
    xid_counts: BTreeMap<(String, u64), u64>,
    history: VecDeque<VerdictChange>,
    seq: u64,
    shown: BTreeMap<String, (GpuVerdict, GpuService, HealthAction, Vec<String>)>,
    rounds: u64,
    persist_error: Option<String>,
}

impl Monitor {
    /// An engine with `policy`, persisting to `store` (none: memory only). A stored state is
    /// loaded; a corrupt one is an error (the caller decides; the file is left alone).
    pub fn new(policy: Policy, store: Option<Store>) -> Result<Self, PersistError> {
        let loaded = match &store {
            Some(s) => s.load::<HealthState>()?,
            None => None,
        };
        let (generation, state) =
            loaded.map_or((0, HealthState::default()), |l| (l.generation, l.state));
        Ok(Self {
            policy,
            saved: state.clone(),
            state,
            generation,
            store,
            live: BTreeMap::new(),
            host: Vec::new(),
            missing: Vec::new(),
            xid_counts: BTreeMap::new(),
            history: VecDeque::new(),
            seq: 0,
            shown: BTreeMap::new(),
            rounds: 0,
            persist_error: None,
        })
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The state machine's state.
    pub fn state(&self) -> &HealthState {
        &self.state
    }

    /// Judge one sampling round. Returns resets to carry out.
    pub fn observe_round(&mut self, gpus: &[GpuObservation], now_ms: u64) -> Vec<Command> {
        if self.rounds == 0 {
            if self.state.first_inventory.is_empty() {
                self.state.first_inventory =
                    gpus.iter().map(|g| g.inventory.uuid.clone()).collect();
            }
            if gpus.iter().all(|g| !g.lost) {
                self.state.clear_reboot();
            }
        }
        self.rounds += 1;
        let mut commands = Vec::new();
        for g in gpus {
            let uuid = g.inventory.uuid.clone();
            let index = g.inventory.index;
            let live = self.live.entry(uuid.clone()).or_insert_with(|| Live::new(index));
            live.index = index;
            let mut findings = Vec::new();
            if g.lost {
                findings.push(Finding::new(
                    "presence",
                    GpuVerdict::Failed,
                    HealthAction::Reboot,
                    "fallen off the bus (NVML: GPU is lost)".into(),
                ));
                live.idle = None;
            } else if let Some(s) = &g.sample {
                let rates = Rates {
                    sbe: s.ecc.map_or(0, |e| live.sbe.observe(now_ms, e.volatile_corrected)),
                    pcie_replay: live.pcie.observe(now_ms, s.pcie.replay_counter),
                    nvlink_errors: g.nvlink_errors.as_ref().map_or(0, |l| {
                        live.nvlink.observe(now_ms, l.iter().map(NvlinkErrorCounters::total).sum())
                    }),
                };
                findings = sample_findings(&self.policy, &g.inventory, s, rates, g.persistence);
                live.idle = Some(s.compute_processes == 0);
            }
            if let Some(e) = &g.error {
                findings.push(Finding::new(
                    "telemetry",
                    GpuVerdict::Degraded,
                    HealthAction::Watch,
                    format!("telemetry read failed: {e}"),
                ));
            }
            live.findings = findings;
            let (idle, live_findings) = (live.idle, live.findings.clone());
            if let Some(c) =
                self.state.decide(&uuid, index, &live_findings, idle, &self.policy, now_ms)
            {
                commands.push(c);
            }
        }
        let present: Vec<&str> = gpus.iter().map(|g| g.inventory.uuid.as_str()).collect();
        self.missing = self
            .state
            .first_inventory
            .iter()
            .filter(|u| !present.contains(&u.as_str()))
            .cloned()
            .collect();
        self.commit(now_ms);
        commands
    }

    /// Judge one GPU event at once (XID, ECC). Returns resets to carry out.
    pub fn observe_event(&mut self, event: &GpuEvent, now_ms: u64) -> Vec<Command> {
        let finding = match event.kind {
            GpuEventKind::Xid(x) => {
                let n = {
                    let c = self.xid_counts.entry((event.uuid.clone(), x)).or_insert(0);
                    *c += 1;
                    *c
                };
                let action = self.policy.xid_action(x);
                if action == HealthAction::None {
                    tracing::info!(gpu = event.gpu, uuid = %event.uuid, xid = x, count = n,
                        "application XID: the GPU stays healthy");
                    return Vec::new();
                }
                let verdict = if action >= HealthAction::Quarantine {
                    GpuVerdict::Failed
                } else {
                    GpuVerdict::Degraded
                };
                let what = if action == HealthAction::Watch && xid::meaning(x) == "unknown XID" {
                    format!("unknown XID {x} ({n} seen)")
                } else {
                    format!("XID {x}: {}", xid::meaning(x))
                };
                (Finding::new("xid", verdict, action, what), Some(x))
            }
            GpuEventKind::DoubleBitEcc => (
                Finding::new(
                    "ecc_dbe",
                    GpuVerdict::Failed,
                    HealthAction::Quarantine,
                    "double-bit ECC error (event)".into(),
                ),
                None,
            ),
            // Counted through the volatile counter's rate.
            GpuEventKind::SingleBitEcc => return Vec::new(),
        };
        let (finding, x) = finding;
        self.state.latch(&event.uuid, event.gpu, finding, x);
        let (live, idle) = match self.live.get(&event.uuid) {
            Some(l) => (l.findings.clone(), l.idle),
            None => (Vec::new(), None),
        };
        let cmd = self.state.decide(&event.uuid, event.gpu, &live, idle, &self.policy, now_ms);
        self.commit(now_ms);
        cmd.into_iter().collect()
    }

    /// Record the result of a reset command.
    pub fn reset_result(&mut self, uuid: &str, result: Result<(), String>, now_ms: u64) {
        match result {
            Ok(()) => {
                tracing::info!(uuid, "GPU reset done; re-checking before it serves again");
                self.state.reset_succeeded(uuid);
            }
            Err(e) => {
                tracing::error!(uuid, error = %e, "GPU reset failed; the node asks for a reboot");
                self.state.reset_failed(uuid, &e);
            }
        }
        self.commit(now_ms);
    }

    /// Replace the host checks' results.
    pub fn set_host(&mut self, checks: Vec<HostCheck>, now_ms: u64) {
        self.host = checks;
        self.commit(now_ms);
    }

    /// Drain (true) or undrain the node.
    pub fn set_drained(&mut self, drained: bool, now_ms: u64) {
        self.state.drained = drained;
        self.commit(now_ms);
    }

    /// Return GPU `gpu` (NVML index) to service. `false` when no such GPU is known.
    pub fn release(&mut self, gpu: u32, now_ms: u64) -> bool {
        let uuid = self.state.gpus.iter().find(|(_, r)| r.index == gpu).map(|(u, _)| u.clone());
        let done = uuid.is_some_and(|u| {
            self.xid_counts.retain(|(x, _), _| *x != u);
            self.state.release(&u)
        });
        self.commit(now_ms);
        done
    }

    /// Whether GPU `gpu` is out of service (quarantined or RMA) and, as last seen, idle: the
    /// only state in which active diagnostics may run.
    pub fn may_diagnose(&self, gpu: u32) -> Result<String, String> {
        let (uuid, rec) = self
            .state
            .gpus
            .iter()
            .find(|(_, r)| r.index == gpu)
            .ok_or_else(|| format!("no GPU {gpu} has been checked yet"))?;
        if !matches!(rec.service, GpuService::Quarantined | GpuService::Rma) {
            return Err(format!(
                "GPU {gpu} is {:?}, not quarantined: diagnostics never run on a serving GPU",
                rec.service
            ));
        }
        if self.live.get(uuid).and_then(|l| l.idle) != Some(true) {
            return Err(format!("GPU {gpu} has compute processes; diagnostics wait until idle"));
        }
        Ok(uuid.clone())
    }

    fn entry(&self, uuid: &str) -> Option<GpuHealthEntry> {
        let live = self.live.get(uuid)?;
        let rec = self.state.gpus.get(uuid)?;
        let all: Vec<&Finding> = rec.latched.iter().chain(&live.findings).collect();
        let mut verdict = worst_verdict(all.iter().copied());
        let mut action = worst_action(all.iter().copied());
        match rec.service {
            GpuService::Quarantined => {
                verdict = GpuVerdict::Failed;
                action = action.max(HealthAction::Quarantine);
            }
            GpuService::Rma => {
                verdict = GpuVerdict::Failed;
                action = HealthAction::QuarantineRma;
            }
            GpuService::ResetPending => {
                verdict = verdict.max(GpuVerdict::Degraded);
                action = action.max(HealthAction::ResetWhenIdle);
            }
            GpuService::Rechecking => verdict = verdict.max(GpuVerdict::Degraded),
            GpuService::Serving => {}
        }
        let mut reasons: Vec<String> = all.iter().map(|f| f.reason.clone()).collect();
        if let Some(h) = &rec.rma_hint {
            reasons.push(format!("RMA hint: {h}"));
        }
        reasons.dedup();
        Some(GpuHealthEntry {
            index: live.index,
            uuid: uuid.to_string(),
            health: GpuHealth { verdict, reasons },
            service: rec.service,
            action,
            recurrences: rec.recurrences(),
            rma_hint: rec.rma_hint.clone(),
            idle: live.idle,
        })
    }

    /// The view to publish.
    pub fn view(&self) -> NodeHealth {
        let mut gpus: Vec<GpuHealthEntry> =
            self.live.keys().filter_map(|u| self.entry(u)).collect();
        gpus.sort_by_key(|g| g.index);
        let mut host = self.host.clone();
        if let Some(e) = &self.persist_error {
            host.push(HostCheck {
                name: "state".into(),
                verdict: GpuVerdict::Degraded,
                detail: format!("cannot persist the health state: {e}"),
            });
        }
        NodeHealth {
            gpus,
            missing_gpus: self.missing.clone(),
            host,
            history: self.history.iter().cloned().collect(),
            reboot_requested: self.state.reboot_requested.clone(),
            drained: self.state.drained,
            generation: self.generation,
            rounds: self.rounds,
        }
    }

    fn push_change(&mut self, change: VerdictChange) {
        tracing::warn!(subject = %change.subject, uuid = ?change.uuid, from = ?change.from,
            to = ?change.to, service = ?change.service, action = ?change.action,
            reasons = %change.reasons.join("; "), "health verdict changed");
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(change);
    }

    /// Log verdict changes into the ring and persist a changed state.
    fn commit(&mut self, now_ms: u64) {
        let uuids: Vec<String> = self.live.keys().cloned().collect();
        for uuid in uuids {
            let Some(e) = self.entry(&uuid) else { continue };
            let now = (e.health.verdict, e.service, e.action, e.health.reasons.clone());
            let before = self.shown.get(&uuid).cloned();
            let from = before.as_ref().map_or(GpuVerdict::Healthy, |b| b.0);
            let changed = match &before {
                Some(b) => b.0 != now.0 || b.1 != now.1 || b.2 != now.2,
                None => now.0 != GpuVerdict::Healthy || now.1 != GpuService::Serving,
            };
            if changed {
                self.seq += 1;
                self.push_change(VerdictChange {
                    seq: self.seq,
                    at_ms: now_ms,
                    subject: format!("gpu {}", e.index),
                    uuid: Some(uuid.clone()),
                    from,
                    to: e.health.verdict,
                    service: Some(e.service),
                    action: e.action,
                    reasons: e.health.reasons.clone(),
                });
            }
            self.shown.insert(uuid, now);
        }
        let host: Vec<HostCheck> = self.host.clone();
        for h in host {
            let key = format!("host {}", h.name);
            let before = self.shown.get(&key).map(|b| b.0).unwrap_or(GpuVerdict::Healthy);
            if before != h.verdict {
                self.seq += 1;
                self.push_change(VerdictChange {
                    seq: self.seq,
                    at_ms: now_ms,
                    subject: key.clone(),
                    uuid: None,
                    from: before,
                    to: h.verdict,
                    service: None,
                    action: if h.verdict == GpuVerdict::Healthy {
                        HealthAction::None
                    } else {
                        HealthAction::Watch
                    },
                    reasons: vec![h.detail.clone()],
                });
            }
            self.shown
                .insert(key, (h.verdict, GpuService::Serving, HealthAction::None, Vec::new()));
        }
        if self.state != self.saved {
            self.persist();
        }
    }

    fn persist(&mut self) {
        let Some(store) = &self.store else {
            self.saved = self.state.clone();
            return;
        };
        let generation = self.generation + 1;
        match store.save(generation, &self.state) {
            Ok(()) => {
                self.generation = generation;
                self.saved = self.state.clone();
                self.persist_error = None;
            }
            Err(e) => {
                let text = format!("{:#}", anyhow::Error::from(e));
                if self.persist_error.as_deref() != Some(text.as_str()) {
                    tracing::error!(error = %text, "cannot persist the health state");
                }
                self.persist_error = Some(text);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hearth_sim::{Fault, Scenario, SimClock, SimHost, Workload};

    use super::*;
    use crate::gpu::sim::SimBackend;

    fn node() -> (Arc<SimHost>, SimBackend) {
        let host = Arc::new(SimHost::new(
            &Scenario::uniform("h100-sxm", 2, Workload::Training),
            SimClock::Manual,
        ));
        (host.clone(), SimBackend::new(host))
    }

    fn round(m: &mut Monitor, b: &SimBackend, now: u64) -> Vec<Command> {
        let obs = crate::health::observe_backend(b).unwrap_or_default();
        m.observe_round(&obs, now)
    }

    #[test]
    fn diagnostics_only_on_a_quarantined_idle_gpu() -> anyhow::Result<()> {
        let (host, b) = node();
        let mut m = Monitor::new(Policy::default(), None)?;
        round(&mut m, &b, 1);
        assert!(m.may_diagnose(0).is_err_and(|e| e.contains("not quarantined")));
        host.lock().inject(0, Fault::DoubleBitEcc)?;
        host.advance(std::time::Duration::from_secs(1));
        assert!(round(&mut m, &b, 2).is_empty(), "busy GPU must not be reset");
        assert!(m.may_diagnose(0).is_err_and(|e| e.contains("compute processes")));
        host.lock().set_workload(0, Workload::Idle)?;
        let cmds = round(&mut m, &b, 3);
        assert_eq!(cmds.len(), 1);
        assert!(m.may_diagnose(0).is_ok());
        assert!(m.may_diagnose(9).is_err());
        Ok(())
    }

    #[test]
    fn state_persists_with_rising_generations_and_a_corrupt_file_is_refused() -> anyhow::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let store = Store::new(dir.path().join("health.json"));
        let (host, b) = node();
        let mut m = Monitor::new(Policy::default(), Some(store.clone()))?;
        let inv = crate::gpu::inventory_all(&b)?;
        m.observe_round(&crate::health::observe_inventory(&b, &inv), 1);
        assert_eq!(m.view().generation, 1, "first-boot inventory saved");
        host.lock().inject(1, Fault::Xid { xid: 79 })?;
        m.observe_round(&crate::health::observe_inventory(&b, &inv), 2);
        let g = m.view().generation;
        assert!(g >= 2);
        drop(m);
        // A restart keeps the quarantine and the reboot request until every GPU reads again.
        let m = Monitor::new(Policy::default(), Some(store.clone()))?;
        assert_eq!(m.view().generation, g);
        assert_eq!(
            m.state().gpus.values().filter(|r| r.service == GpuService::Quarantined).count(),
            1
        );
        assert!(m.state().reboot_requested.is_some());
        std::fs::write(store.path(), b"{ not json")?;
        assert!(matches!(
            Monitor::new(Policy::default(), Some(store)),
            Err(PersistError::Corrupt { .. })
        ));
        Ok(())
    }

    #[test]
    fn a_missing_gpu_is_reported_against_the_first_boot_inventory() -> anyhow::Result<()> {
        let (_host, b) = node();
        let mut m = Monitor::new(Policy::default(), None)?;
        let obs = crate::health::observe_backend(&b)?;
        m.observe_round(&obs, 1);
        m.observe_round(&obs[..1], 2);
        assert_eq!(m.view().missing_gpus, vec![obs[1].inventory.uuid.clone()]);
        Ok(())
    }
}
