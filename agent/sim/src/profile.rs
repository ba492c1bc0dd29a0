//! GPU profiles: the fixed facts and physical constants of a board model.

use serde::{Deserialize, Serialize};

/// A board model's facts and physics constants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuProfile {
    /// Profile id used in scenario files, e.g. `h100-sxm`.
    pub id: String,
    /// Marketing name NVML reports.
    pub name: String,
    /// Framebuffer size, bytes.
    pub memory_total_bytes: u64,
    /// Lowest power limit, mW.
    pub power_limit_min_mw: u32,
    /// Highest power limit, mW.
    pub power_limit_max_mw: u32,
    /// Default power limit, mW.
    pub power_limit_default_mw: u32,
    /// Idle power, mW.
    pub idle_power_mw: u32,
    /// Power at full utilisation and max clock, mW (may exceed the max limit: the cap binds).
    pub full_power_mw: u32,
    /// Highest SM clock, MHz.
    pub max_sm_clock_mhz: u32,
    /// Lowest SM clock the driver runs at under load, MHz.
    pub min_sm_clock_mhz: u32,
    /// Idle SM clock, MHz.
    pub idle_sm_clock_mhz: u32,
    /// Memory clock, MHz.
    pub max_mem_clock_mhz: u32,
    /// Die-to-heatsink thermal resistance, K/W.
    pub r_die_k_per_w: f64,
    /// Heatsink-to-inlet thermal resistance at full airflow, K/W.
    pub r_sink_k_per_w: f64,
    /// Die stage time constant, s.
    pub tau_die_s: f64,
    /// Heatsink stage time constant, s.
    pub tau_sink_s: f64,
    /// HBM temperature above die at full memory load, K.
    pub hbm_offset_k: f64,
    /// Max operating temperature (T.Limit), °C.
    pub max_operating_temp_c: u32,
    /// Hardware slowdown threshold, °C.
    pub slowdown_temp_c: u32,
    /// Shutdown threshold, °C.
    pub shutdown_temp_c: u32,
    /// Max memory temperature, °C (`None`: the board reports no memory temperature).
    pub max_memory_temp_c: Option<u32>,
    /// PCIe generation and width the link trains to.
    pub max_pcie_gen: u32,
    /// PCIe width.
    pub max_pcie_width: u32,
    /// NVLink links.
    pub nvlink_count: u32,
    /// Fans the board controls (0: passive / SXM, chassis fans are the BMC's).
    pub fan_count: u32,
    /// Whether ECC is enabled (HBM boards: always).
    pub ecc: bool,
}

impl GpuProfile {
    /// NVIDIA H100 SXM5 80 GB: 700 W max/default, 200 W min, ~70 W idle, no fans, 18 NVLinks.
    pub fn h100_sxm() -> Self {
        Self {
            id: "h100-sxm".into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 81_559 * 1024 * 1024,
            power_limit_min_mw: 200_000,
            power_limit_max_mw: 700_000,
            power_limit_default_mw: 700_000,
            idle_power_mw: 70_000,
            full_power_mw: 760_000,
            max_sm_clock_mhz: 1980,
            min_sm_clock_mhz: 345,
            idle_sm_clock_mhz: 345,
            max_mem_clock_mhz: 2619,
            r_die_k_per_w: 0.015,
            r_sink_k_per_w: 0.050,
            tau_die_s: 4.0,
            tau_sink_s: 60.0,
            hbm_offset_k: 6.0,
            max_operating_temp_c: 87,
            slowdown_temp_c: 89,
            shutdown_temp_c: 95,
            max_memory_temp_c: Some(95),
            max_pcie_gen: 5,
            max_pcie_width: 16,
            nvlink_count: 18,
            fan_count: 0,
            ecc: true,
        }
    }

    /// A fan-cooled PCIe card like the RTX 4090: 450 W, 150 W min, fan control, no NVLink/ECC.
    pub fn rtx4090_pcie() -> Self {
        Self {
            id: "rtx4090-pcie".into(),
            name: "NVIDIA GeForce RTX 4090".into(),
            memory_total_bytes: 24_564 * 1024 * 1024,
            power_limit_min_mw: 150_000,
            power_limit_max_mw: 600_000,
            power_limit_default_mw: 450_000,
            idle_power_mw: 25_000,
            full_power_mw: 480_000,
            max_sm_clock_mhz: 2790,
            min_sm_clock_mhz: 210,
            idle_sm_clock_mhz: 210,
            max_mem_clock_mhz: 10_501,
            r_die_k_per_w: 0.030,
            r_sink_k_per_w: 0.060,
            tau_die_s: 3.0,
            tau_sink_s: 45.0,
            hbm_offset_k: 4.0,
            max_operating_temp_c: 83,
            slowdown_temp_c: 87,
            shutdown_temp_c: 92,
            max_memory_temp_c: None,
            max_pcie_gen: 4,
            max_pcie_width: 16,
            nvlink_count: 0,
            fan_count: 2,
            ecc: false,
        }
    }

    /// Every built-in profile.
    pub fn builtin() -> Vec<Self> {
        vec![Self::h100_sxm(), Self::rtx4090_pcie()]
    }

    /// A built-in profile by id.
    pub fn by_id(id: &str) -> Option<Self> {
        Self::builtin().into_iter().find(|p| p.id == id)
    }
}
