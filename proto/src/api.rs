//! Bodies of the agent's local API (HTTP/1.1 + JSON under `/v1`, see `docs/api.md`).
//!
//! The same API is served on the node's Unix socket and, later, carried by the tunnel.

use serde::{Deserialize, Serialize};

use crate::gpu::{DriverInfo, GpuEvent, GpuInventory, GpuSample};

/// State of the node as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Subsystems are starting; no GPU reading yet.
    Starting,
    /// Every subsystem runs and every GPU is healthy.
    Ready,
    /// The node serves, but a subsystem failed or a GPU is not healthy.
    Degraded,
}

/// State of one supervised subsystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubsystemState {
    /// Started, not yet reporting ready.
    Starting,
    /// Running and ready.
    Running,
    /// Failed; the supervisor restarts it after a backoff.
    Failed,
    /// Stopped at shutdown.
    Stopped,
}

/// A supervised subsystem as the status API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubsystemStatus {
    /// Subsystem name, e.g. `gpu-sampler`.
    pub name: String,
    /// Current state.
    pub state: SubsystemState,
    /// How many times it was restarted after a failure.
    pub restarts: u32,
    /// The last failure, with its cause chain.
    pub last_error: Option<String>,
}

/// Health verdict of one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuVerdict {
    /// Serving normally.
    Healthy,
    /// Serving, with a condition an operator should see.
    Degraded,
    /// Not usable.
    Failed,
}

/// Health of one GPU with its reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuHealth {
    /// The verdict.
    pub verdict: GpuVerdict,
    /// Why, one line per finding (empty when healthy).
    pub reasons: Vec<String>,
}

/// One GPU in the status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuStatus {
    /// What the GPU is.
    pub inventory: GpuInventory,
    /// The latest sample; `None` when the last read failed.
    pub sample: Option<GpuSample>,
    /// Why the last read failed.
    pub sample_error: Option<String>,
    /// Milliseconds since the Unix epoch of the latest successful sample.
    pub sampled_at_ms: Option<u64>,
    /// Health verdict.
    pub health: GpuHealth,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// [`crate::API_VERSION`] of the agent that answered.
    pub api_version: u32,
    /// Agent version (crate version).
    pub agent_version: String,
    /// Host name of the node.
    pub hostname: String,
    /// Node state.
    pub state: NodeState,
    /// GPU backend in use: `nvml` or `sim`.
    pub backend: String,
    /// Driver facts, once read.
    pub driver: Option<DriverInfo>,
    /// Seconds since the agent started.
    pub uptime_s: u64,
    /// Supervised subsystems.
    pub subsystems: Vec<SubsystemStatus>,
    /// GPUs, by index.
    pub gpus: Vec<GpuStatus>,
    /// Membership of a fleet (the `fleet` subsystem).
    #[serde(default)]
    pub fleet: FleetStatus,
}

/// The node's fleet membership as `hearth-agent status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// `starting`, `no-seed`, `bad-seed`, `enrolling`, `connected`, `disconnected` or `revoked`.
    pub state: String,
    /// The node id, once enrolled.
    pub node_id: Option<String>,
    /// The fleet URL from the seed.
    pub fleet_url: Option<String>,
    /// Certificate expiry, ms since the Unix epoch.
    pub cert_not_after_ms: Option<u64>,
    /// The desired-state generation last received.
    pub desired_generation: Option<u64>,
    /// The last problem, with its cause chain.
    pub last_error: Option<String>,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Node state.
    pub state: NodeState,
    /// Per-GPU verdicts, by index.
    pub gpus: Vec<GpuHealthEntry>,
    /// Recent GPU events, oldest first (bounded).
    pub recent_events: Vec<TimedEvent>,
}

/// One GPU's line in the health report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuHealthEntry {
    /// NVML index.
    pub index: u32,
    /// UUID.
    pub uuid: String,
    /// Verdict and reasons.
    pub health: GpuHealth,
}

/// A GPU event with the time the agent received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimedEvent {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The event.
    pub event: GpuEvent,
}

/// `GET /v1/power`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerReport {
    /// Sum of the GPUs' 1 s average draw, mW.
    pub total_draw_mw: u64,
    /// Per GPU, by index.
    pub gpus: Vec<GpuPower>,
}

/// One GPU's power figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuPower {
    /// NVML index.
    pub index: u32,
    /// 1 s average draw, mW (`None` when the GPU cannot be read).
    pub draw_mw: Option<u32>,
    /// The limit the software set, mW.
    pub limit_mw: Option<u32>,
    /// The limit in force, mW.
    pub enforced_limit_mw: Option<u32>,
    /// Lowest accepted limit, mW.
    pub min_mw: u32,
    /// Highest accepted limit, mW.
    pub max_mw: u32,
    /// Board default limit, mW.
    pub default_mw: u32,
}

/// `POST /v1/power/limit`: set one GPU's power limit (`watts: None` restores the default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerLimitRequest {
    /// NVML index of the GPU.
    pub gpu: u32,
    /// New limit in watts; `None` restores the board default.
    pub watts: Option<u32>,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, with its cause chain.
    pub error: String,
}
