//! GPU data types: inventory, telemetry samples, events and clock-event (throttle) reasons.
//!
//! Units are NVML's (see the crate docs). `Option` marks a value the device does not support
//! (NVML's `NOT_SUPPORTED`), never a failed read: a failed read is an error of the backend.

use serde::{Deserialize, Serialize};

/// Driver-wide facts, read once at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverInfo {
    /// Kernel driver version, e.g. `580.95.05`.
    pub driver_version: String,
    /// CUDA driver API version as `major.minor`, e.g. `13.0`.
    pub cuda_version: String,
    /// NVML library version, e.g. `13.580.95.05`.
    pub nvml_version: String,
}

/// What a GPU is: read once at start (and after a reset). Fixed facts, no telemetry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInventory {
    /// NVML index (enumeration order, stable for a boot).
    pub index: u32,
    /// `GPU-xxxxxxxx-...` UUID: the identity that survives reboots and re-enumeration.
    pub uuid: String,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Board serial number, where the board has one.
    pub serial: Option<String>,
    /// PCI bus id, `DDDDDDDD:BB:DD.F`.
    pub pci_bus_id: String,
    /// Total framebuffer memory in bytes.
    pub memory_total_bytes: u64,
    /// Lowest power limit the driver accepts, mW.
    pub power_limit_min_mw: u32,
    /// Highest power limit the driver accepts, mW.
    pub power_limit_max_mw: u32,
    /// Power limit the board boots with, mW.
    pub power_limit_default_mw: u32,
    /// Highest PCIe generation the link supports.
    pub max_pcie_gen: u32,
    /// Highest PCIe link width (lanes).
    pub max_pcie_width: u32,
    /// Number of NVLink links the GPU has (0 where it has none).
    pub nvlink_count: u32,
    /// Number of fans the board controls itself (0 for passive and SXM boards).
    pub fan_count: u32,
    /// Core temperature at which the GPU slows its clocks in hardware, °C.
    pub slowdown_temp_c: Option<u32>,
    /// Core temperature at which the GPU shuts down, °C.
    pub shutdown_temp_c: Option<u32>,
    /// Highest core temperature for normal operation (T.Limit), °C.
    pub max_operating_temp_c: Option<u32>,
    /// Highest memory (HBM) temperature for normal operation, °C.
    pub max_memory_temp_c: Option<u32>,
    /// Highest SM clock, MHz.
    pub max_sm_clock_mhz: u32,
    /// Highest memory clock, MHz.
    pub max_mem_clock_mhz: u32,
}

/// Clock-event ("throttle") reasons, with NVML's bit values
/// (`nvmlClocksEventReason*` / `nvmlClocksThrottleReason*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ThrottleReasons(pub u64);

impl ThrottleReasons {
    /// Nothing is running on the GPU.
    pub const GPU_IDLE: u64 = 0x1;
    /// Clocks are held by the application-clocks setting.
    pub const APPLICATIONS_CLOCKS_SETTING: u64 = 0x2;
    /// The software power cap (the power limit) is holding clocks down.
    pub const SW_POWER_CAP: u64 = 0x4;
    /// Hardware slowdown (thermal or power brake) is active.
    pub const HW_SLOWDOWN: u64 = 0x8;
    /// Sync boost with other GPUs.
    pub const SYNC_BOOST: u64 = 0x10;
    /// Software thermal slowdown (the driver keeps the GPU under its max operating temperature).
    pub const SW_THERMAL_SLOWDOWN: u64 = 0x20;
    /// Hardware thermal slowdown (temperature at or above the slowdown threshold).
    pub const HW_THERMAL_SLOWDOWN: u64 = 0x40;
    /// Hardware power brake (an external power-brake signal, often the BMC).
    pub const HW_POWER_BRAKE_SLOWDOWN: u64 = 0x80;
    /// Display clock setting.
    pub const DISPLAY_CLOCK_SETTING: u64 = 0x100;

    const NAMES: [(u64, &'static str); 9] = [
        (Self::GPU_IDLE, "gpu_idle"),
        (Self::APPLICATIONS_CLOCKS_SETTING, "applications_clocks_setting"),
        (Self::SW_POWER_CAP, "sw_power_cap"),
        (Self::HW_SLOWDOWN, "hw_slowdown"),
        (Self::SYNC_BOOST, "sync_boost"),
        (Self::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
        (Self::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
        (Self::HW_POWER_BRAKE_SLOWDOWN, "hw_power_brake_slowdown"),
        (Self::DISPLAY_CLOCK_SETTING, "display_clock_setting"),
    ];

    /// Whether every bit of `mask` is set.
    pub fn contains(self, mask: u64) -> bool {
        self.0 & mask == mask
    }

    /// Human names of the set bits (unknown bits as hex).
    pub fn names(self) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = self.0;
        for (bit, name) in Self::NAMES {
            if self.0 & bit != 0 {
                out.push(name.to_string());
                rest &= !bit;
            }
        }
        if rest != 0 {
            out.push(format!("{rest:#x}"));
        }
        out
    }
}

/// ECC error counters (NVML `nvmlDeviceGetTotalEccErrors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EccCounters {
    /// Corrected (single-bit) errors since the last driver load.
    pub volatile_corrected: u64,
    /// Uncorrected (double-bit) errors since the last driver load.
    pub volatile_uncorrected: u64,
    /// Corrected errors over the board's life.
    pub aggregate_corrected: u64,
    /// Uncorrected errors over the board's life.
    pub aggregate_uncorrected: u64,
}

/// Retired pages (pre-Ampere) — `nvmlDeviceGetRetiredPages` and its pending status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RetiredPages {
    /// Pages retired for multiple single-bit errors.
    pub single_bit: u32,
    /// Pages retired for a double-bit error.
    pub double_bit: u32,
    /// A retirement waits for the next driver reload.
    pub pending: bool,
}

/// Row remapping (Ampere and later) — `nvmlDeviceGetRemappedRows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RemappedRows {
    /// Rows remapped for correctable errors.
    pub correctable: u32,
    /// Rows remapped for uncorrectable errors.
    pub uncorrectable: u32,
    /// A remap waits for a GPU reset.
    pub pending: bool,
    /// A remap failed (no spare rows left): RMA territory.
    pub failed: bool,
}

/// PCIe link state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PcieLink {
    /// Current link generation.
    pub generation: u32,
    /// Current link width (lanes).
    pub width: u32,
    /// PCIe replay counter (link-level retransmissions since driver load).
    pub replay_counter: u64,
}

/// One telemetry reading of one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSample {
    /// Core (die) temperature, °C.
    pub temp_core_c: u32,
    /// Memory (HBM) temperature, °C, where the board reports one.
    pub temp_memory_c: Option<u32>,
    /// Margin to T.Limit (the max operating temperature), °C, as NVML's margin temperature;
    /// negative is past it (slowdown and shutdown sit a few degrees beyond).
    pub thermal_margin_c: Option<i32>,
    /// Power draw averaged over the last second, mW.
    pub power_avg_mw: u32,
    /// Instantaneous power draw, mW, where the board reports one.
    pub power_instant_mw: Option<u32>,
    /// Energy since the driver loaded, mJ.
    pub energy_mj: u64,
    /// Power limit the software set (the requested limit), mW.
    pub power_limit_mw: u32,
    /// Power limit in force: the lowest of ours, the BMC's and others, mW.
    pub enforced_power_limit_mw: u32,
    /// Percent of time a kernel ran over the last sample period.
    pub util_gpu_pct: u32,
    /// Percent of time device memory was read or written.
    pub util_mem_pct: u32,
    /// SM clock, MHz.
    pub sm_clock_mhz: u32,
    /// Memory clock, MHz.
    pub mem_clock_mhz: u32,
    /// Why clocks are below their maximum.
    pub throttle: ThrottleReasons,
    /// ECC counters; `None` where ECC is off or unsupported.
    pub ecc: Option<EccCounters>,
    /// Retired pages; `None` where the GPU uses row remapping instead.
    pub retired_pages: Option<RetiredPages>,
    /// Row remapping; `None` before Ampere.
    pub remapped_rows: Option<RemappedRows>,
    /// PCIe link.
    pub pcie: PcieLink,
    /// Active state of each NVLink link (empty where the GPU has none).
    pub nvlink_active: Vec<bool>,
    /// Fan speed in percent of maximum, per fan (empty where the board has no fans).
    pub fan_speed_pct: Vec<u32>,
    /// Framebuffer in use, bytes.
    pub memory_used_bytes: u64,
    /// Number of compute processes running on the GPU (0 = idle).
    pub compute_processes: u32,
}

/// What an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "code")]
pub enum GpuEventKind {
    /// A critical XID error, with its number.
    Xid(u64),
    /// A single-bit (corrected) ECC error.
    SingleBitEcc,
    /// A double-bit (uncorrected) ECC error.
    DoubleBitEcc,
}

/// An asynchronous GPU event (NVML event set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuEvent {
    /// NVML index of the GPU the event came from.
    pub gpu: u32,
    /// UUID of that GPU.
    pub uuid: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: GpuEventKind,
}

/// A process running compute work on a GPU (NVML `nvmlDeviceGetComputeRunningProcesses`).
/// A GPU with none is idle: the health layer resets only idle GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeProcess {
    /// Process id (in the host's PID namespace).
    pub pid: u32,
    /// Framebuffer the process uses, bytes (0 where NVML does not say).
    pub used_memory_bytes: u64,
}

/// Error counters of one NVLink link (`nvmlDeviceGetNvLinkErrorCounter`), since driver load or
/// the last GPU reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NvlinkErrorCounters {
    /// Data-link replays (`NVML_NVLINK_ERROR_DL_REPLAY`).
    pub replay: u64,
    /// Link recoveries (`NVML_NVLINK_ERROR_DL_RECOVERY`).
    pub recovery: u64,
    /// Flit CRC errors (`NVML_NVLINK_ERROR_DL_CRC_FLIT`).
    pub crc_flit: u64,
    /// Data CRC errors (`NVML_NVLINK_ERROR_DL_CRC_DATA`).
    pub crc_data: u64,
}

impl NvlinkErrorCounters {
    /// Sum of every counter.
    pub fn total(&self) -> u64 {
        self.replay
            .saturating_add(self.recovery)
            .saturating_add(self.crc_flit)
            .saturating_add(self.crc_data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_names_list_known_and_unknown_bits() {
        let r =
            ThrottleReasons(ThrottleReasons::SW_POWER_CAP | ThrottleReasons::HW_SLOWDOWN | 0x8000);
        assert_eq!(r.names(), vec!["sw_power_cap", "hw_slowdown", "0x8000"]);
        assert!(r.contains(ThrottleReasons::SW_POWER_CAP));
        assert!(!r.contains(ThrottleReasons::GPU_IDLE));
    }

    #[test]
    fn event_json_shape_is_stable() -> Result<(), serde_json::Error> {
        let e = GpuEvent { gpu: 3, uuid: "GPU-x".into(), kind: GpuEventKind::Xid(79) };
        let s = serde_json::to_string(&e)?;
        assert_eq!(s, r#"{"gpu":3,"uuid":"GPU-x","kind":"xid","code":79}"#);
        assert_eq!(serde_json::from_str::<GpuEvent>(&s)?, e);
        Ok(())
    }
}
