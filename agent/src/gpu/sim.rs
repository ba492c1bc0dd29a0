//! The `sim` backend: the GPU trait over an in-process [`hearth_sim::SimHost`].

use std::sync::Arc;
use std::time::Duration;

use hearth_proto::gpu::{
    ComputeProcess, DriverInfo, GpuEvent, GpuInventory, GpuSample, NvlinkErrorCounters,
};
use hearth_sim::{SimError, SimHost};

use super::{EventSource, GpuBackend, GpuError};

/// Simulated GPUs. Shares its [`SimHost`] with the API's `sim` endpoints (fault injection).
#[derive(Debug, Clone)]
pub struct SimBackend {
    host: Arc<SimHost>,
}

impl SimBackend {
    /// A backend over `host`.
    pub fn new(host: Arc<SimHost>) -> Self {
        Self { host }
    }

    /// The simulated node (for fault injection and clock control).
    pub fn host(&self) -> &Arc<SimHost> {
        &self.host
    }
}

fn map(op: &'static str, e: SimError) -> GpuError {
    match e {
        SimError::NoSuchGpu { gpu, .. } => GpuError::NoSuchGpu { gpu },
        SimError::GpuLost { gpu } => GpuError::GpuLost { gpu },
        SimError::InvalidArgument { gpu, message } => {
            GpuError::InvalidArgument { gpu, op, message }
        }
        SimError::NotSupported { gpu, .. } => GpuError::NotSupported { gpu, op },
    }
}

impl GpuBackend for SimBackend {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn driver(&self) -> Result<DriverInfo, GpuError> {
        Ok(self.host.lock().driver())
    }

    fn gpu_count(&self) -> Result<u32, GpuError> {
        Ok(self.host.lock().gpu_count())
    }

    fn inventory(&self, gpu: u32) -> Result<GpuInventory, GpuError> {
        self.host.lock().inventory(gpu).map_err(|e| map("inventory", e))
    }

    fn sample(&self, gpu: u32) -> Result<GpuSample, GpuError> {
        self.host.lock().sample(gpu).map_err(|e| map("sample", e))
    }

    fn set_power_limit(&self, gpu: u32, mw: u32) -> Result<(), GpuError> {
        self.host.lock().set_power_limit(gpu, mw).map_err(|e| map("set power limit", e))
    }

    fn lock_clocks(&self, gpu: u32, min_mhz: u32, max_mhz: u32) -> Result<(), GpuError> {
        self.host.lock().lock_clocks(gpu, min_mhz, max_mhz).map_err(|e| map("lock clocks", e))
    }

    fn reset_clocks(&self, gpu: u32) -> Result<(), GpuError> {
        self.host.lock().reset_clocks(gpu).map_err(|e| map("reset clocks", e))
    }

    fn set_fan_speed(&self, gpu: u32, fan: u32, pct: u32) -> Result<(), GpuError> {
        self.host.lock().set_fan_speed(gpu, fan, pct).map_err(|e| map("set fan speed", e))
    }

    fn reset_fan_speed(&self, gpu: u32, fan: u32) -> Result<(), GpuError> {
        self.host.lock().reset_fan(gpu, fan).map_err(|e| map("reset fan speed", e))
    }

    fn events(&self) -> Result<Box<dyn EventSource>, GpuError> {
        // Start at the newest event: like an NVML event set, only events after registration.
        let (_, cursor) = self.host.lock().events_since(u64::MAX);
        Ok(Box::new(SimEvents { host: self.host.clone(), cursor, pending: Vec::new() }))
    }

    fn compute_processes(&self, gpu: u32) -> Result<Vec<ComputeProcess>, GpuError> {
        self.host.lock().compute_processes(gpu).map_err(|e| map("compute processes", e))
    }

    fn nvlink_errors(&self, gpu: u32) -> Result<Vec<NvlinkErrorCounters>, GpuError> {
        self.host.lock().nvlink_errors(gpu).map_err(|e| map("NVLink error counters", e))
    }

    fn persistence_mode(&self, gpu: u32) -> Result<Option<bool>, GpuError> {
        self.host.lock().persistence_mode(gpu).map(Some).map_err(|e| map("persistence mode", e))
    }
}

/// Event source over the simulator's event log.
#[derive(Debug)]
struct SimEvents {
    host: Arc<SimHost>,
    cursor: u64,
    pending: Vec<GpuEvent>,
}

/// How often a waiting event source looks at the log.
const POLL: Duration = Duration::from_millis(20);

impl EventSource for SimEvents {
    fn wait(&mut self, timeout: Duration) -> Result<Option<GpuEvent>, GpuError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if !self.pending.is_empty() {
                return Ok(Some(self.pending.remove(0)));
            }
            let (events, newest) = self.host.lock().events_since(self.cursor);
            self.cursor = newest;
            self.pending = events;
            if !self.pending.is_empty() {
                continue;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL.min(deadline - now));
        }
    }
}
