//! The `nvml` backend: nvml-wrapper over `libnvidia-ml.so.1`.
//!
//! SKELETON: being written.

use std::path::Path;

use hearth_proto::gpu::{DriverInfo, GpuInventory, GpuSample};

use super::{EventSource, GpuBackend, GpuError};

/// Real GPUs through NVML.
#[derive(Debug)]
pub struct NvmlBackend {
    _private: (),
}

impl NvmlBackend {
    /// Load the NVML library at `library` (a path or a soname such as `libnvidia-ml.so.1`) and
    /// initialise it.
    pub fn open(_library: &Path) -> Result<Self, GpuError> {
        unimplemented!()
    }
}

impl GpuBackend for NvmlBackend {
    fn kind(&self) -> &'static str {
        "nvml"
    }
    fn driver(&self) -> Result<DriverInfo, GpuError> {
        unimplemented!()
    }
    fn gpu_count(&self) -> Result<u32, GpuError> {
        unimplemented!()
    }
    fn inventory(&self, _gpu: u32) -> Result<GpuInventory, GpuError> {
        unimplemented!()
    }
    fn sample(&self, _gpu: u32) -> Result<GpuSample, GpuError> {
        unimplemented!()
    }
    fn set_power_limit(&self, _gpu: u32, _mw: u32) -> Result<(), GpuError> {
        unimplemented!()
    }
    fn lock_clocks(&self, _gpu: u32, _min_mhz: u32, _max_mhz: u32) -> Result<(), GpuError> {
        unimplemented!()
    }
    fn reset_clocks(&self, _gpu: u32) -> Result<(), GpuError> {
        unimplemented!()
    }
    fn events(&self) -> Result<Box<dyn EventSource>, GpuError> {
        unimplemented!()
    }
}
