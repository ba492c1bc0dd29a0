//! Hearth's wire contract, shared by the node agent and the fleet.
//!
//! - [`gpu`]: what a GPU is and what it reports (inventory, telemetry samples, events, throttle
//!   reasons). The agent's GPU backends (NVML and the simulator) produce these values; the local
//!   API, and later the control session, carry them.
//! - [`api`]: the JSON bodies of the agent's local HTTP API under `/v1` (see `docs/api.md`).
//! - [`frame`] and [`control`]: the node ↔ fleet control session (binary frames, one versioned
//!   postcard-encoded message enum on stream 0; see `docs/protocol.md`, `docs/0005-fleet.md`).
//! - [`mux`]: the tunnel's data streams on the same session (credit-based flow control, fair
//!   scheduling; see `docs/0006-tunnel.md`); [`lane`]: the extra connections that carry a
//!   tunnel's bulk streams; [`shell`]: keystrokes and window sizes on a shell stream.
//! - [`fleet`]: the JSON bodies of the fleet's HTTPS API (enrollment, `hearthctl`).
//! - [`rollout`]: staged rollouts of OS releases (`docs/0009-updates.md`).
//! - [`exposition`]: metric expositions (OpenMetrics and the Prometheus text format) shared by
//!   the node's and the fleet's `/metrics` (`docs/0007-telemetry.md`).
//!
//! Units follow NVML's so that no value is rescaled on the way: temperatures in whole °C,
//! power in milliwatts, energy in millijoules, clocks in MHz, memory in bytes.

pub mod api;
pub mod control;
pub mod exposition;
pub mod fleet;
pub mod frame;
pub mod gpu;
pub mod lane;
pub mod mux;
pub mod rollout;
pub mod shell;

/// Version of the local API and of the data types in this crate. Bumped on any incompatible change.
pub const API_VERSION: u32 = 1;
