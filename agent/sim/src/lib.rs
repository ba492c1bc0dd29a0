//! `hearth-sim`: a physics model of NVIDIA data-center GPUs, without tokio.
//!
//! Entry points: [`SimNode`] (a node of GPUs stepped in simulated time) and [`SimHost`] (a node
//! behind a mutex with a clock, real-time scaled or manual, as the agent's `sim` backend and the
//! fake `libnvidia-ml` use it). A node is built from a [`Scenario`] (TOML): profiles, workloads,
//! a deterministic seed, timed faults. See `docs/0002-gpu-simulator.md` for the model.
//!
//! Values come out in `hearth-proto`'s GPU types with NVML's units (whole °C, mW, mJ, MHz), so a
//! reading through the sim backend and the same reading through the fake NVML are equal.

mod events;
pub mod fault;
mod gpu;
pub mod host;
pub mod node;
pub mod profile;
pub mod scenario;

pub use fault::{Fault, Workload};
pub use host::{SimClock, SimHost};
pub use node::{EVENT_LOG_CAPACITY, STEP, SimError, SimNode};
pub use profile::GpuProfile;
pub use scenario::{Background, Scenario, ScenarioError};

#[cfg(test)]
mod tests;
