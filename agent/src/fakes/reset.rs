//! The fake GPU reset: the simulator's `reset_gpu` (what `nvidia-smi -r` does to a real GPU).

use std::sync::Arc;

use hearth_sim::SimHost;

use crate::health::reset::{GpuReset, ResetError};

/// Resets simulated GPUs. A lost GPU cannot be reset (as on real hardware).
#[derive(Debug, Clone)]
pub struct SimReset {
    host: Arc<SimHost>,
}

impl SimReset {
    /// Reset GPUs of `host`.
    pub fn new(host: Arc<SimHost>) -> Self {
        Self { host }
    }
}

impl GpuReset for SimReset {
    fn reset(&self, gpu: u32) -> Result<(), ResetError> {
        self.host
            .lock()
            .reset_gpu(gpu)
            .map_err(|e| ResetError::Backend { gpu, message: e.to_string() })
    }
}
