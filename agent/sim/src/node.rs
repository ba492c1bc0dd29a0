//! A simulated node: GPUs stepped in fixed steps of simulated time.
//!
//! SKELETON: the bodies are being written (physics per docs/0002-gpu-simulator.md).

use std::time::Duration;

use hearth_proto::gpu::{DriverInfo, GpuEvent, GpuInventory, GpuSample};

use crate::fault::{Fault, Workload};
use crate::scenario::Scenario;

/// The physics step. `advance_to` always steps on multiples of it from time zero, so the state
/// at a time does not depend on how the advances were chunked.
pub const STEP: Duration = Duration::from_millis(10);

/// Why a simulated call fails; each maps onto an NVML return code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// No GPU with this index (NVML_ERROR_INVALID_ARGUMENT).
    #[error("no GPU {gpu} (the node has {count})")]
    NoSuchGpu {
        /// The index asked for.
        gpu: u32,
        /// How many GPUs the node has.
        count: u32,
    },
    /// The GPU fell off the bus (NVML_ERROR_GPU_IS_LOST).
    #[error("GPU {gpu} has fallen off the bus")]
    GpuLost {
        /// The GPU.
        gpu: u32,
    },
    /// An argument is out of range (NVML_ERROR_INVALID_ARGUMENT).
    #[error("GPU {gpu}: {message}")]
    InvalidArgument {
        /// The GPU.
        gpu: u32,
        /// What is wrong.
        message: String,
    },
    /// The board has no such feature (NVML_ERROR_NOT_SUPPORTED).
    #[error("GPU {gpu}: {what} is not supported on this board")]
    NotSupported {
        /// The GPU.
        gpu: u32,
        /// The feature.
        what: &'static str,
    },
}

/// A node of simulated GPUs.
#[derive(Debug)]
pub struct SimNode {
    _private: (),
}

impl SimNode {
    /// Build a node from a (validated) scenario, at simulated time zero.
    pub fn new(_scenario: &Scenario) -> Self {
        unimplemented!("SimNode::new")
    }

    /// Driver facts the simulated driver reports.
    pub fn driver(&self) -> DriverInfo {
        unimplemented!()
    }

    /// Number of GPUs (a GPU fallen off the bus still counts, as NVML still enumerates it).
    pub fn gpu_count(&self) -> u32 {
        unimplemented!()
    }

    /// Simulated time since start.
    pub fn now(&self) -> Duration {
        unimplemented!()
    }

    /// Step the physics up to `t` (no-op when `t` is not later than now); fires scenario events.
    pub fn advance_to(&mut self, _t: Duration) {
        unimplemented!()
    }

    /// A GPU's fixed facts.
    pub fn inventory(&self, _gpu: u32) -> Result<GpuInventory, SimError> {
        unimplemented!()
    }

    /// A GPU's reading at the current time (noise is drawn while stepping, so reads are pure).
    pub fn sample(&self, _gpu: u32) -> Result<GpuSample, SimError> {
        unimplemented!()
    }

    /// Request a power limit; it takes effect 100–500 ms (seeded) of simulated time later.
    pub fn set_power_limit(&mut self, _gpu: u32, _mw: u32) -> Result<(), SimError> {
        unimplemented!()
    }

    /// Lock SM clocks to a range, MHz.
    pub fn lock_clocks(&mut self, _gpu: u32, _min_mhz: u32, _max_mhz: u32) -> Result<(), SimError> {
        unimplemented!()
    }

    /// Undo [`Self::lock_clocks`].
    pub fn reset_clocks(&mut self, _gpu: u32) -> Result<(), SimError> {
        unimplemented!()
    }

    /// Set one fan's speed in percent (manual mode); `NotSupported` on boards without fans.
    pub fn set_fan_speed(&mut self, _gpu: u32, _fan: u32, _pct: u32) -> Result<(), SimError> {
        unimplemented!()
    }

    /// Return a fan to the board's automatic curve.
    pub fn reset_fan(&mut self, _gpu: u32, _fan: u32) -> Result<(), SimError> {
        unimplemented!()
    }

    /// Change what a GPU runs.
    pub fn set_workload(&mut self, _gpu: u32, _workload: Workload) -> Result<(), SimError> {
        unimplemented!()
    }

    /// Inject a fault now.
    pub fn inject(&mut self, _gpu: u32, _fault: Fault) -> Result<(), SimError> {
        unimplemented!()
    }

    /// Reset a GPU (as `nvidia-smi -r`): clears faults that a reset clears, applies a pending
    /// remap, restores default limits and clocks. A GPU that fell off the bus stays lost.
    pub fn reset_gpu(&mut self, _gpu: u32) -> Result<(), SimError> {
        unimplemented!()
    }

    /// Events with a sequence number greater than `after`, oldest first, and the newest sequence
    /// number. Each consumer keeps its own cursor; the log keeps the last 4096 events.
    pub fn events_since(&self, _after: u64) -> (Vec<GpuEvent>, u64) {
        unimplemented!()
    }

    /// Work done by a GPU since start, in full-speed-seconds (1.0 = one second at full clock and
    /// full utilisation). Benchmarks compare controllers with it.
    pub fn work_done(&self, _gpu: u32) -> Result<f64, SimError> {
        unimplemented!()
    }
}
