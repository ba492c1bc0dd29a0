//! Fakes of the agent's OS touchpoints, each with the name of the real one (see
//! `docs/architecture.md`). The GPU layer's fake is the simulator backend, `crate::gpu::sim`.

pub mod command;
pub mod fleet;
pub mod host;
pub mod process;
pub mod reset;
pub mod systemd;
pub mod update;
