//! A GPU's health verdict from its latest sample and the events seen since start.
//!
//! This is the node's first line of health: each finding is a reason string; the verdict is the
//! worst finding. The policy-driven checks (XID action table, rates, quarantine, drain) build on
//! it (`docs/architecture.md`).

use hearth_proto::api::{GpuHealth, GpuVerdict};
use hearth_proto::gpu::{GpuInventory, GpuSample, ThrottleReasons};

/// XIDs after which a GPU is not trusted to serve (NVIDIA's XID catalogue; `shared` facts).
pub const FAILING_XIDS: [u64; 9] = [48, 64, 74, 79, 92, 95, 119, 120, 94];
/// XIDs that ask for a reset when idle.
pub const RESET_XIDS: [u64; 1] = [63];

/// What is known of one GPU when judging it.
#[derive(Debug, Clone, Copy)]
pub struct Evidence<'a> {
    /// Fixed facts.
    pub inventory: &'a GpuInventory,
    /// Latest sample, if the last read succeeded.
    pub sample: Option<&'a GpuSample>,
    /// The GPU answered "lost" (fallen off the bus).
    pub lost: bool,
    /// The last read failed for another reason.
    pub read_error: Option<&'a str>,
    /// XIDs seen on this GPU since start (distinct, ascending).
    pub xids: &'a [u64],
}

/// Judge one GPU.
pub fn assess(ev: Evidence<'_>) -> GpuHealth {
    let mut failed = Vec::new();
    let mut degraded = Vec::new();
    if ev.lost {
        failed.push("fallen off the bus (GPU is lost)".to_string());
    }
    if let Some(e) = ev.read_error {
        degraded.push(format!("telemetry read failed: {e}"));
    }
    for xid in ev.xids {
        if FAILING_XIDS.contains(xid) {
            failed.push(format!("XID {xid}"));
        } else if RESET_XIDS.contains(xid) {
            degraded.push(format!("XID {xid}: reset when idle"));
        }
    }
    if let Some(s) = ev.sample {
        if let Some(ecc) = s.ecc
            && ecc.volatile_uncorrected > 0
        {
            failed.push(format!("{} uncorrected ECC errors", ecc.volatile_uncorrected));
        }
        if let Some(r) = s.remapped_rows {
            if r.failed {
                failed.push("row remapping failed (RMA candidate)".into());
            } else if r.pending {
                degraded.push("row remap pending: reset when idle".into());
            }
        }
        if let Some(p) = s.retired_pages
            && p.pending
        {
            degraded.push("page retirement pending: reset when idle".into());
        }
        let inv = ev.inventory;
        if s.pcie.generation < inv.max_pcie_gen || s.pcie.width < inv.max_pcie_width {
            degraded.push(format!(
                "PCIe link Gen{} x{} below Gen{} x{}",
                s.pcie.generation, s.pcie.width, inv.max_pcie_gen, inv.max_pcie_width
            ));
        }
        let down = s.nvlink_active.iter().filter(|a| !**a).count();
        if down > 0 {
            degraded.push(format!("{down} of {} NVLink links inactive", s.nvlink_active.len()));
        }
        if s.throttle.contains(ThrottleReasons::HW_THERMAL_SLOWDOWN)
            || s.throttle.contains(ThrottleReasons::HW_SLOWDOWN)
        {
            degraded.push(format!("hardware slowdown at {} °C", s.temp_core_c));
        }
        if s.throttle.contains(ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN) {
            degraded.push("hardware power brake".into());
        }
        if s.enforced_power_limit_mw < s.power_limit_mw {
            degraded.push(format!(
                "enforced power limit {} W below the set {} W (BMC or external limit)",
                s.enforced_power_limit_mw / 1000,
                s.power_limit_mw / 1000
            ));
        }
        if let Some(margin) = s.thermal_margin_c
            && margin < 5
        {
            degraded.push(format!("thermal margin {margin} °C"));
        }
    }
    let verdict = if !failed.is_empty() {
        GpuVerdict::Failed
    } else if !degraded.is_empty() {
        GpuVerdict::Degraded
    } else {
        GpuVerdict::Healthy
    };
    failed.extend(degraded);
    GpuHealth { verdict, reasons: failed }
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
            thermal_margin_c: Some(30),
            power_avg_mw: 500_000,
            power_instant_mw: Some(510_000),
            energy_mj: 1,
            power_limit_mw: 700_000,
            enforced_power_limit_mw: 700_000,
            util_gpu_pct: 99,
            util_mem_pct: 40,
            sm_clock_mhz: 1980,
            mem_clock_mhz: 2619,
            throttle: ThrottleReasons(0),
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

    fn judge(s: &GpuSample, lost: bool, xids: &[u64]) -> GpuHealth {
        let inv = inventory();
        assess(Evidence { inventory: &inv, sample: Some(s), lost, read_error: None, xids })
    }

    #[test]
    fn clean_gpu_is_healthy() {
        let h = judge(&sample(), false, &[]);
        assert_eq!(h.verdict, GpuVerdict::Healthy);
        assert!(h.reasons.is_empty());
    }

    #[test]
    fn application_xids_leave_the_gpu_healthy() {
        assert_eq!(judge(&sample(), false, &[13, 31, 43, 45, 68]).verdict, GpuVerdict::Healthy);
    }

    #[test]
    fn failing_findings_fail() {
        assert_eq!(judge(&sample(), true, &[]).verdict, GpuVerdict::Failed);
        assert_eq!(judge(&sample(), false, &[79]).verdict, GpuVerdict::Failed);
        let mut s = sample();
        s.ecc = Some(EccCounters { volatile_uncorrected: 1, ..EccCounters::default() });
        assert_eq!(judge(&s, false, &[]).verdict, GpuVerdict::Failed);
        let mut s = sample();
        s.remapped_rows = Some(RemappedRows { failed: true, ..RemappedRows::default() });
        assert_eq!(judge(&s, false, &[]).verdict, GpuVerdict::Failed);
    }

    #[test]
    fn degrading_findings_degrade_with_reasons() {
        let mut s = sample();
        s.pcie.width = 8;
        s.nvlink_active[1] = false;
        s.enforced_power_limit_mw = 400_000;
        let h = judge(&s, false, &[63]);
        assert_eq!(h.verdict, GpuVerdict::Degraded);
        let text = h.reasons.join("; ");
        for needle in ["XID 63", "PCIe link Gen5 x8", "1 of 2 NVLink", "400 W below the set 700 W"]
        {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
    }

    #[test]
    fn failed_outranks_degraded_and_lists_both() {
        let mut s = sample();
        s.pcie.width = 8;
        let h = judge(&s, true, &[]);
        assert_eq!(h.verdict, GpuVerdict::Failed);
        assert_eq!(h.reasons.len(), 2);
    }
}
