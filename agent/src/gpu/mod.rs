//! The GPU layer: one narrow trait, [`GpuBackend`], with two implementations.
//!
//! - [`nvml::NvmlBackend`]: the real one, nvml-wrapper over `libnvidia-ml.so.1` (a real driver, or
//!   the fake library in `hw-tests/fake-nvml`).
//! - [`sim::SimBackend`]: the simulator (`hearth-sim`) in process.
//!
//! Both pass the same conformance suite (`hw-tests`). Design note: `docs/0001-gpu-layer.md`.
//! Calls are blocking (NVML is a blocking C library): async callers use `spawn_blocking`.

pub mod nvml;
pub mod sim;

use std::time::Duration;

use hearth_proto::gpu::{
    ComputeProcess, DriverInfo, GpuEvent, GpuInventory, GpuSample, NvlinkErrorCounters,
};

/// Why a GPU call failed. Every variant names the GPU (or the library) it concerns.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The NVML library could not be loaded.
    #[error(
        "cannot load the NVML library {path}; is the NVIDIA driver installed? \
         (set gpu.nvml_library, or gpu.backend = \"sim\" to run on simulated GPUs)"
    )]
    LibraryNotFound {
        /// The path or name that was tried.
        path: String,
        /// The loader's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The library loaded but the kernel driver is not running.
    #[error(
        "NVML library {path} loaded but the NVIDIA kernel driver is not loaded \
         (load the nvidia module, or set gpu.backend = \"sim\")"
    )]
    DriverNotLoaded {
        /// The library path.
        path: String,
    },
    /// No GPU with this index.
    #[error("no GPU {gpu}")]
    NoSuchGpu {
        /// The index asked for.
        gpu: u32,
    },
    /// The GPU fell off the bus or stopped answering.
    #[error("GPU {gpu} is lost (fallen off the bus)")]
    GpuLost {
        /// The GPU.
        gpu: u32,
    },
    /// The operation needs root.
    #[error("GPU {gpu}: {op} needs root")]
    NoPermission {
        /// The GPU.
        gpu: u32,
        /// The operation.
        op: &'static str,
    },
    /// An argument is out of the device's range.
    #[error("GPU {gpu}: {op}: {message}")]
    InvalidArgument {
        /// The GPU.
        gpu: u32,
        /// The operation.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The device does not support the operation.
    #[error("GPU {gpu}: {op} is not supported")]
    NotSupported {
        /// The GPU.
        gpu: u32,
        /// The operation.
        op: &'static str,
    },
    /// Any other failure of a call.
    #[error("GPU {gpu}: {op} failed")]
    Call {
        /// The GPU (`u32::MAX` for driver-wide calls).
        gpu: u32,
        /// The operation.
        op: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A blocking source of GPU events (an NVML event set).
pub trait EventSource: Send {
    /// Wait up to `timeout` for the next event; `Ok(None)` on timeout.
    fn wait(&mut self, timeout: Duration) -> Result<Option<GpuEvent>, GpuError>;
}

/// What the agent needs from GPUs: inventory, telemetry, controls, events.
///
/// Indexes are NVML's. Implementations are `Send + Sync` and share one library handle.
pub trait GpuBackend: Send + Sync + std::fmt::Debug {
    /// `nvml` or `sim`.
    fn kind(&self) -> &'static str;
    /// Driver facts.
    fn driver(&self) -> Result<DriverInfo, GpuError>;
    /// Number of GPUs the driver enumerates.
    fn gpu_count(&self) -> Result<u32, GpuError>;
    /// One GPU's fixed facts.
    fn inventory(&self, gpu: u32) -> Result<GpuInventory, GpuError>;
    /// One GPU's telemetry now.
    fn sample(&self, gpu: u32) -> Result<GpuSample, GpuError>;
    /// Set the power limit, mW (root; checked against the device's constraints).
    fn set_power_limit(&self, gpu: u32, mw: u32) -> Result<(), GpuError>;
    /// Restore the board's default power limit.
    fn restore_power_limit(&self, gpu: u32) -> Result<(), GpuError> {
        let default = self.inventory(gpu)?.power_limit_default_mw;
        self.set_power_limit(gpu, default)
    }
    /// Lock SM clocks into `[min_mhz, max_mhz]`.
    fn lock_clocks(&self, gpu: u32, min_mhz: u32, max_mhz: u32) -> Result<(), GpuError>;
    /// Undo [`Self::lock_clocks`].
    fn reset_clocks(&self, gpu: u32) -> Result<(), GpuError>;
    /// Set one fan's speed in percent (0..=100) and take it off the board's automatic curve
    /// (root). `NotSupported` on boards without fans of their own (SXM: the chassis fans are the
    /// BMC's).
    fn set_fan_speed(&self, gpu: u32, fan: u32, pct: u32) -> Result<(), GpuError>;
    /// Give one fan back to the board's automatic curve.
    fn reset_fan_speed(&self, gpu: u32, fan: u32) -> Result<(), GpuError>;
    /// Open an event source for XID, single- and double-bit ECC events on every GPU that
    /// supports them.
    fn events(&self) -> Result<Box<dyn EventSource>, GpuError>;

    // Health (docs/0003-health.md).

    /// The compute processes running on the GPU; empty means idle (the health layer resets only
    /// idle GPUs).
    fn compute_processes(&self, gpu: u32) -> Result<Vec<ComputeProcess>, GpuError>;
    /// Error counters of each NVLink link, in link order (empty where the GPU has no NVLink).
    fn nvlink_errors(&self, gpu: u32) -> Result<Vec<NvlinkErrorCounters>, GpuError>;
    /// Whether persistence mode is on (`None` where the platform has no such mode).
    fn persistence_mode(&self, gpu: u32) -> Result<Option<bool>, GpuError>;
}

/// Read the whole inventory.
pub fn inventory_all(backend: &dyn GpuBackend) -> Result<Vec<GpuInventory>, GpuError> {
    (0..backend.gpu_count()?).map(|i| backend.inventory(i)).collect()
}
