//! GPU and host health: DCGM-grade checks, per-GPU quarantine and reset, node drain.
//!
//! Entry point: the `health` subsystem ([`subsystem::Health`]), which drives the engine
//! ([`engine::Monitor`]) from the sampler's snapshots (polled checks, every sampling round),
//! the GPU event stream (XID and ECC events, judged at once) and a host-check timer, carries out
//! its commands (reset of an idle GPU through [`reset::GpuReset`]) and publishes a
//! [`engine::NodeHealth`] on the agent's `watch`.
//!
//! - [`policy`]: the policy file (thresholds, XID overrides), `deny_unknown_fields`, fuzzed.
//! - [`xid`]: the XID action table; [`checks`]: the polled checks; [`rate`]: rate detectors.
//! - [`machine`]: the per-GPU state machine, persisted atomically with a generation number.
//! - [`diag`]: `dcgmi diag` / burn-in on a quarantined idle GPU.
//! - Host checks live in [`crate::host`].
//!
//! Design note with the checks table: `docs/0003-health.md`.

pub mod checks;
pub mod diag;
pub mod engine;
pub mod machine;
pub mod policy;
pub mod rate;
pub mod reset;
pub mod subsystem;
pub mod xid;

use crate::gpu::{GpuBackend, GpuError};
pub use engine::{GpuObservation, Monitor, NodeHealth};
pub use machine::Command;
use reset::{GpuReset, ResetError};

/// Read NVLink counters and persistence mode of one GPU (absent on error: the sampler reports
/// read errors).
pub fn extras(
    backend: &dyn GpuBackend,
    gpu: u32,
) -> (Option<Vec<hearth_proto::gpu::NvlinkErrorCounters>>, Option<bool>) {
    (backend.nvlink_errors(gpu).ok(), backend.persistence_mode(gpu).ok().flatten())
}

/// One sampling round read straight from a backend (tests and benchmarks; the agent builds it
/// from the sampler's snapshot instead). A GPU already lost cannot report its inventory and is
/// left out: keep the inventory from the start and use [`observe_inventory`] to see it as lost.
pub fn observe_backend(backend: &dyn GpuBackend) -> Result<Vec<GpuObservation>, GpuError> {
    let count = backend.gpu_count()?;
    let mut out = Vec::new();
    for gpu in 0..count {
        // A lost GPU answers GpuLost to inventory too: keep what the first call returned.
        let inventory = match backend.inventory(gpu) {
            Ok(i) => i,
            Err(GpuError::GpuLost { .. }) => continue,
            Err(e) => return Err(e),
        };
        out.push(observation(backend, inventory));
    }
    Ok(out)
}

/// Read one GPU into an observation.
pub fn observation(
    backend: &dyn GpuBackend,
    inventory: hearth_proto::gpu::GpuInventory,
) -> GpuObservation {
    let gpu = inventory.index;
    let (sample, lost, error) = match backend.sample(gpu) {
        Ok(s) => (Some(s), false, None),
        Err(GpuError::GpuLost { .. }) => (None, true, None),
        Err(e) => (None, false, Some(format!("{:#}", anyhow::Error::from(e)))),
    };
    let (nvlink_errors, persistence) = if lost { (None, None) } else { extras(backend, gpu) };
    GpuObservation { inventory, sample, lost, error, nvlink_errors, persistence }
}

/// One round over a known inventory (read once with [`crate::gpu::inventory_all`]: a lost GPU's
/// inventory cannot be read again).
pub fn observe_inventory(
    backend: &dyn GpuBackend,
    inventory: &[hearth_proto::gpu::GpuInventory],
) -> Vec<GpuObservation> {
    inventory.iter().map(|i| observation(backend, i.clone())).collect()
}

/// Carry out one reset command: re-check that NVML lists no compute process, then reset.
pub fn reset_if_idle(
    backend: &dyn GpuBackend,
    reset: &dyn GpuReset,
    gpu: u32,
) -> Result<(), ResetError> {
    let procs = backend.compute_processes(gpu).map_err(|e| ResetError::Backend {
        gpu,
        message: format!("{:#}", anyhow::Error::from(e)),
    })?;
    if !procs.is_empty() {
        return Err(ResetError::Busy { gpu, processes: procs.len() });
    }
    tracing::warn!(gpu, "resetting idle GPU");
    reset.reset(gpu)
}

/// Carry out commands synchronously and report each result to `monitor`. A GPU that turned
/// busy is not reset and not counted as a failure (the next idle round retries).
pub fn execute(
    monitor: &mut Monitor,
    backend: &dyn GpuBackend,
    reset: &dyn GpuReset,
    commands: Vec<Command>,
    now_ms: u64,
) {
    for c in commands {
        let Command::Reset { gpu, uuid } = c;
        match reset_if_idle(backend, reset, gpu) {
            Err(ResetError::Busy { .. }) => {}
            r => monitor.reset_result(&uuid, r.map_err(|e| e.to_string()), now_ms),
        }
    }
}
