//! Polled GPU checks: one GPU's latest readings judged against the policy, as [`Finding`]s.
//!
//! Each check names its NVML source; the table with thresholds, verdicts and actions is in
//! `docs/0003-health.md`. Event-driven findings (XID, double-bit ECC events) are made by
//! [`super::engine`]; the rates (single-bit ECC, PCIe replays, NVLink errors) come from
//! [`super::rate::RateDetector`]s that the engine keeps per GPU.

use hearth_proto::api::{GpuVerdict, HealthAction};
use hearth_proto::gpu::{GpuInventory, GpuSample, ThrottleReasons};

use super::policy::Policy;

/// One finding of one check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    /// Check id: `xid`, `ecc_dbe`, `ecc_sbe_rate`, `row_remap`, `pcie_link`, `pcie_replay`,
    /// `nvlink`, `thermal`, `power`, `memory_temp`, `presence`, `persistence`, `telemetry`.
    pub check: String,
    /// Verdict it implies.
    pub verdict: GpuVerdict,
    /// Action it asks for.
    pub action: HealthAction,
    /// Human reason.
    pub reason: String,
}

impl Finding {
    /// A finding.
    pub fn new(check: &str, verdict: GpuVerdict, action: HealthAction, reason: String) -> Self {
        Self { check: check.into(), verdict, action, reason }
    }

    fn degraded(check: &str, reason: String) -> Self {
        Self::new(check, GpuVerdict::Degraded, HealthAction::Watch, reason)
    }
}

/// Rises of the rate-checked counters within their one-minute windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// Corrected ECC errors.
    pub sbe: u64,
    /// PCIe replays.
    pub pcie_replay: u64,
    /// NVLink errors, all links and counters.
    pub nvlink_errors: u64,
}

/// Judge one readable GPU's sample.
pub fn sample_findings(
    policy: &Policy,
    inv: &GpuInventory,
    s: &GpuSample,
    rates: Rates,
    persistence: Option<bool>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    // Memory.
    if let Some(ecc) = s.ecc
        && ecc.volatile_uncorrected > 0
    {
        out.push(Finding::new(
            "ecc_dbe",
            GpuVerdict::Failed,
            HealthAction::Quarantine,
            format!("{} uncorrected ECC errors since driver load", ecc.volatile_uncorrected),
        ));
    }
    if rates.sbe > policy.memory.sbe_per_min {
        out.push(Finding::degraded(
            "ecc_sbe_rate",
            format!(
                "{} corrected ECC errors within a minute (limit {})",
                rates.sbe, policy.memory.sbe_per_min
            ),
        ));
    }
    if let Some(r) = s.remapped_rows {
        if r.failed {
            out.push(Finding::new(
                "row_remap",
                GpuVerdict::Failed,
                HealthAction::QuarantineRma,
                "row remapping failed: no spare rows (RMA candidate)".into(),
            ));
        } else if r.pending {
            out.push(Finding::new(
                "row_remap",
                GpuVerdict::Degraded,
                HealthAction::ResetWhenIdle,
                "row remap pending: reset when idle".into(),
            ));
        }
    }
    if let Some(p) = s.retired_pages
        && p.pending
    {
        out.push(Finding::new(
            "row_remap",
            GpuVerdict::Degraded,
            HealthAction::ResetWhenIdle,
            "page retirement pending: reset when idle".into(),
        ));
    }
    // Interconnect.
    if policy.interconnect.pcie_downtrain
        && (s.pcie.generation < inv.max_pcie_gen || s.pcie.width < inv.max_pcie_width)
    {
        out.push(Finding::degraded(
            "pcie_link",
            format!(
                "PCIe link Gen{} x{} below Gen{} x{} (downtrained)",
                s.pcie.generation, s.pcie.width, inv.max_pcie_gen, inv.max_pcie_width
            ),
        ));
    }
    if rates.pcie_replay > policy.interconnect.pcie_replay_per_min {
        out.push(Finding::degraded(
            "pcie_replay",
            format!(
                "{} PCIe replays within a minute (limit {})",
                rates.pcie_replay, policy.interconnect.pcie_replay_per_min
            ),
        ));
    }
    let down = s.nvlink_active.iter().filter(|a| !**a).count();
    if down > 0 {
        out.push(Finding::degraded(
            "nvlink",
            format!("{down} of {} NVLink links inactive", s.nvlink_active.len()),
        ));
    }
    if rates.nvlink_errors > policy.interconnect.nvlink_errors_per_min {
        out.push(Finding::degraded(
            "nvlink",
            format!(
                "{} NVLink errors within a minute (limit {})",
                rates.nvlink_errors, policy.interconnect.nvlink_errors_per_min
            ),
        ));
    }
    // Thermal and power. SW power cap and SW thermal slowdown are the driver doing its job
    // (and the power cap is ours); hardware slowdown and power brake are not.
    if s.throttle.contains(ThrottleReasons::HW_THERMAL_SLOWDOWN)
        || s.throttle.contains(ThrottleReasons::HW_SLOWDOWN)
    {
        out.push(Finding::degraded(
            "thermal",
            format!("hardware slowdown at {} °C", s.temp_core_c),
        ));
    } else if let Some(slowdown) = inv.slowdown_temp_c
        && s.temp_core_c + policy.thermal.slowdown_margin_c >= slowdown
    {
        out.push(Finding::degraded(
            "thermal",
            format!(
                "core {} °C within {} °C of HW slowdown at {slowdown} °C",
                s.temp_core_c, policy.thermal.slowdown_margin_c
            ),
        ));
    }
    if s.throttle.contains(ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN) {
        out.push(Finding::degraded("power", "hardware power brake (external signal)".into()));
    }
    if s.enforced_power_limit_mw < s.power_limit_mw {
        out.push(Finding::degraded(
            "power",
            format!(
                "enforced power limit {} W below the {} W set (BMC or external limit)",
                s.enforced_power_limit_mw / 1000,
                s.power_limit_mw / 1000
            ),
        ));
    }
    if let (Some(t), Some(max)) = (s.temp_memory_c, inv.max_memory_temp_c)
        && t + policy.memory.temp_margin_c >= max
    {
        out.push(Finding::degraded(
            "memory_temp",
            format!("HBM {t} °C within {} °C of its {max} °C maximum", policy.memory.temp_margin_c),
        ));
    }
    // Presence.
    if persistence == Some(false) {
        out.push(Finding::degraded(
            "persistence",
            "persistence mode is off (the driver may tear the GPU down between jobs)".into(),
        ));
    }
    out
}

/// The worst verdict of `findings` (healthy when empty).
pub fn worst_verdict<'a>(findings: impl IntoIterator<Item = &'a Finding>) -> GpuVerdict {
    findings.into_iter().map(|f| f.verdict).max().unwrap_or(GpuVerdict::Healthy)
}

/// The strongest action of `findings` (none when empty).
pub fn worst_action<'a>(findings: impl IntoIterator<Item = &'a Finding>) -> HealthAction {
    findings.into_iter().map(|f| f.action).max().unwrap_or(HealthAction::None)
}

#[cfg(test)]
mod tests {
    use hearth_proto::gpu::{EccCounters, PcieLink, RemappedRows};

    use super::*;

    fn inventory() -> GpuInventory {
        GpuInventory {
            index: 0,
            uuid: "GPU-0".into(),
            name: "test".into(),
            serial: None,
            pci_bus_id: "00000000:01:00.0".into(),
            memory_total_bytes: 1,
            power_limit_min_mw: 200_000,
            power_limit_max_mw: 700_000,
            power_limit_default_mw: 700_000,
            max_pcie_gen: 5,
            max_pcie_width: 16,
            nvlink_count: 2,
            fan_count: 0,
            slowdown_temp_c: Some(90),
            shutdown_temp_c: Some(92),
            max_operating_temp_c: Some(87),
            max_memory_temp_c: Some(95),
            max_sm_clock_mhz: 1980,
            max_mem_clock_mhz: 2619,
        }
    }

    fn sample() -> GpuSample {
        GpuSample {
            temp_core_c: 60,
            temp_memory_c: Some(65),
            thermal_margin_c: Some(27),
            power_avg_mw: 500_000,
            power_instant_mw: Some(510_000),
            energy_mj: 1,
            power_limit_mw: 700_000,
            enforced_power_limit_mw: 700_000,
            util_gpu_pct: 99,
            util_mem_pct: 40,
            sm_clock_mhz: 1980,
            mem_clock_mhz: 2619,
            throttle: ThrottleReasons(ThrottleReasons::SW_POWER_CAP),
            ecc: Some(EccCounters::default()),
            retired_pages: None,
            remapped_rows: Some(RemappedRows::default()),
            pcie: PcieLink { generation: 5, width: 16, replay_counter: 0 },
            nvlink_active: vec![true, true],
            fan_speed_pct: vec![],
            memory_used_bytes: 0,
            compute_processes: 1,
        }
    }

    fn judge(s: &GpuSample, rates: Rates) -> Vec<Finding> {
        sample_findings(&Policy::default(), &inventory(), s, rates, Some(true))
    }

    #[test]
    fn clean_gpu_under_its_own_power_cap_is_healthy() {
        assert!(judge(&sample(), Rates::default()).is_empty());
    }

    /// One row per check: a mutation of a clean sample, the check, verdict and action expected.
    #[test]
    fn each_check_fires_on_its_condition() {
        type Mutate = fn(&mut GpuSample, &mut Rates);
        let table: &[(&str, Mutate, GpuVerdict, HealthAction)] = &[
            (
                "ecc_dbe",
                |s, _| {
                    s.ecc = Some(EccCounters { volatile_uncorrected: 1, ..EccCounters::default() })
                },
                GpuVerdict::Failed,
                HealthAction::Quarantine,
            ),
            ("ecc_sbe_rate", |_, r| r.sbe = 11, GpuVerdict::Degraded, HealthAction::Watch),
            (
                "row_remap",
                |s, _| {
                    s.remapped_rows =
                        Some(RemappedRows { pending: true, ..RemappedRows::default() })
                },
                GpuVerdict::Degraded,
                HealthAction::ResetWhenIdle,
            ),
            (
                "row_remap",
                |s, _| {
                    s.remapped_rows = Some(RemappedRows { failed: true, ..RemappedRows::default() })
                },
                GpuVerdict::Failed,
                HealthAction::QuarantineRma,
            ),
            ("pcie_link", |s, _| s.pcie.width = 8, GpuVerdict::Degraded, HealthAction::Watch),
            ("pcie_replay", |_, r| r.pcie_replay = 11, GpuVerdict::Degraded, HealthAction::Watch),
            (
                "nvlink",
                |s, _| s.nvlink_active[1] = false,
                GpuVerdict::Degraded,
                HealthAction::Watch,
            ),
            ("nvlink", |_, r| r.nvlink_errors = 11, GpuVerdict::Degraded, HealthAction::Watch),
            (
                "thermal",
                |s, _| s.throttle = ThrottleReasons(ThrottleReasons::HW_SLOWDOWN),
                GpuVerdict::Degraded,
                HealthAction::Watch,
            ),
            ("thermal", |s, _| s.temp_core_c = 85, GpuVerdict::Degraded, HealthAction::Watch),
            (
                "power",
                |s, _| s.throttle = ThrottleReasons(ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN),
                GpuVerdict::Degraded,
                HealthAction::Watch,
            ),
            (
                "power",
                |s, _| s.enforced_power_limit_mw = 400_000,
                GpuVerdict::Degraded,
                HealthAction::Watch,
            ),
            (
                "memory_temp",
                |s, _| s.temp_memory_c = Some(91),
                GpuVerdict::Degraded,
                HealthAction::Watch,
            ),
        ];
        for (check, mutate, verdict, action) in table {
            let (mut s, mut r) = (sample(), Rates::default());
            mutate(&mut s, &mut r);
            let f = judge(&s, r);
            assert_eq!(f.len(), 1, "{check}: {f:?}");
            assert_eq!(
                (f[0].check.as_str(), f[0].verdict, f[0].action),
                (*check, *verdict, *action)
            );
        }
    }

    #[test]
    fn thresholds_are_exclusive_and_legal_heat_is_fine() {
        let (mut s, r) = (sample(), Rates { sbe: 10, pcie_replay: 10, nvlink_errors: 10 });
        // 84 °C is 6 °C below slowdown; SW thermal slowdown is the driver holding T.Limit.
        s.temp_core_c = 84;
        s.throttle = ThrottleReasons(ThrottleReasons::SW_THERMAL_SLOWDOWN);
        assert!(judge(&s, r).is_empty());
    }

    #[test]
    fn persistence_off_degrades() {
        let f = sample_findings(
            &Policy::default(),
            &inventory(),
            &sample(),
            Rates::default(),
            Some(false),
        );
        assert_eq!(f[0].check, "persistence");
    }
}
