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
    /// The node was asked to drain (`POST /v1/health/drain`): it takes no new work and waits
    /// for running work to end.
    Draining,
    /// The node must not serve: drained and idle, every GPU quarantined, or a failed host check.
    Quarantined,
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
    /// GPUs of the inventory recorded at first boot that the driver no longer lists (UUIDs):
    /// each is a failed GPU, not a smaller node.
    #[serde(default)]
    pub missing_gpus: Vec<String>,
    /// Host checks (filesystems, memory EDAC, clock sync, fleet reachability, driver).
    #[serde(default)]
    pub host: Vec<HostCheck>,
    /// Verdict changes, oldest first (bounded ring).
    #[serde(default)]
    pub history: Vec<VerdictChange>,
    /// Why the node asks the fleet for a reboot (a GPU reset is impossible), if it does.
    #[serde(default)]
    pub reboot_requested: Option<String>,
    /// The node was asked to drain.
    #[serde(default)]
    pub drained: bool,
    /// Generation of the persisted health state.
    #[serde(default)]
    pub generation: u64,
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
    /// Whether the GPU serves, waits for a reset or is quarantined.
    #[serde(default)]
    pub service: GpuService,
    /// What the health layer does about the GPU now.
    #[serde(default)]
    pub action: HealthAction,
    /// Faults that needed a reset since the GPU last served clean for a while.
    #[serde(default)]
    pub recurrences: u32,
    /// Why the board should be returned to the vendor, when the evidence says so.
    #[serde(default)]
    pub rma_hint: Option<String>,
    /// No compute process runs on it (NVML's process list is empty); `None` when unread.
    #[serde(default)]
    pub idle: Option<bool>,
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
    /// The power controller: budget, targets, mode (`None` until it has run once).
    #[serde(default)]
    pub control: Option<PowerControl>,
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
    /// The cap the power controller chose, W (`None` before it ran).
    #[serde(default)]
    pub cap_w: Option<u32>,
    /// Why the controller chose that cap.
    #[serde(default)]
    pub reason: Option<CapReason>,
    /// SM clock locked by the controller (memory-bound work), MHz.
    #[serde(default)]
    pub clock_lock_mhz: Option<u32>,
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

// ---------------------------------------------------------------------------------------------
// Health: quarantine, actions, history, host checks, diagnostics (`docs/0003-health.md`).

/// Where a GPU stands in the health layer's per-GPU state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuService {
    /// Serving work.
    #[default]
    Serving,
    /// Serving, with a reset due as soon as no compute process runs on it.
    ResetPending,
    /// Taken out of service (drained): no new work; reset once idle.
    Quarantined,
    /// Reset done; waiting for one clean check before it serves again.
    Rechecking,
    /// Kept out of service for good: the fault recurred or cannot be repaired by a reset.
    Rma,
}

/// What the health layer does about a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthAction {
    /// Nothing (healthy, or an application fault: restart the job).
    #[default]
    None,
    /// Keep serving and show the condition (degraded).
    Watch,
    /// Keep serving; reset the GPU when no compute process runs on it.
    ResetWhenIdle,
    /// Drain and quarantine the GPU alone, reset it when idle, return it after a clean check.
    Quarantine,
    /// Quarantine; the board is an RMA candidate (a reset does not repair it).
    QuarantineRma,
    /// Quarantine; a reset is impossible, so the node asks the fleet for a reboot.
    Reboot,
}

/// One host check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCheck {
    /// Check name: `fs:/`, `edac`, `clock`, `fleet`, `driver`.
    pub name: String,
    /// Verdict (the GPU verdict scale).
    pub verdict: GpuVerdict,
    /// What was found (a healthy check says what it measured).
    pub detail: String,
}

/// A verdict change: one entry of the bounded history ring (also logged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictChange {
    /// Sequence number, rising from 1 since the agent started.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What changed: `gpu 3`, `host fs:/`.
    pub subject: String,
    /// The GPU's UUID when the subject is a GPU.
    pub uuid: Option<String>,
    /// Verdict before.
    pub from: GpuVerdict,
    /// Verdict after.
    pub to: GpuVerdict,
    /// Service state after (GPUs).
    pub service: Option<GpuService>,
    /// Action after.
    pub action: HealthAction,
    /// Reasons after.
    pub reasons: Vec<String>,
}

/// `POST /v1/health/diag`: run active diagnostics on one quarantined, idle GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiagRequest {
    /// NVML index of the GPU.
    pub gpu: u32,
    /// `dcgmi diag -r LEVEL` (1..=4); ignored by a configured burn-in command.
    pub level: u8,
}

/// One diagnostic test's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagTest {
    /// Test name as the tool reports it.
    pub name: String,
    /// `pass`, `fail`, `warn` or `skip`.
    pub result: String,
    /// The tool's message, if any.
    pub info: Option<String>,
}

/// The result of `POST /v1/health/diag`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagReport {
    /// NVML index of the GPU.
    pub gpu: u32,
    /// The command that ran.
    pub command: String,
    /// No test failed (and the command succeeded).
    pub passed: bool,
    /// Per-test outcomes.
    pub tests: Vec<DiagTest>,
}

/// `POST /v1/health/release`: return a quarantined or RMA GPU to service (operator's call).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// NVML index of the GPU.
    pub gpu: u32,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, with its cause chain.
    pub error: String,
}

// ---------------------------------------------------------------- power control

/// Power-control settings: the node power budget and temperature targets. Read from `[power]` in
/// the configuration, changed at runtime by `POST /v1/power` (and later by the fleet); the last
/// settings set are persisted and re-applied at boot. Design: `docs/0004-power-control.md`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerSettings {
    /// Node power budget over all GPUs, W; `None`: no budget, GPUs keep their vendor limits.
    #[serde(default)]
    pub budget_w: Option<u32>,
    /// Core (die) temperature target for every GPU, °C; `None`: T.Limit − 8 °C of each board.
    #[serde(default)]
    pub core_target_c: Option<u32>,
    /// Memory (HBM) temperature target, °C; `None`: the board's memory maximum − 8 °C.
    #[serde(default)]
    pub memory_target_c: Option<u32>,
    /// Per-GPU overrides (priority, targets).
    #[serde(default)]
    pub gpus: Vec<GpuPowerSettings>,
}

/// One GPU's power-control overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuPowerSettings {
    /// NVML index.
    pub index: u32,
    /// Weight of this GPU when the budget is split (1..=100; default 1): a GPU of priority 2
    /// gets twice the share of a busy GPU of priority 1.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Core temperature target of this GPU, °C (overrides the node-wide one).
    #[serde(default)]
    pub core_target_c: Option<u32>,
    /// Memory temperature target of this GPU, °C (overrides the node-wide one).
    #[serde(default)]
    pub memory_target_c: Option<u32>,
}

fn default_priority() -> u32 {
    1
}

/// What the power controller is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerMode {
    /// No budget: vendor limits, lowered only for temperature.
    NoBudget,
    /// Holding the budget.
    Budget,
    /// Telemetry missing for more than 3 s: static safe caps (budget / GPUs, clamped).
    Failsafe,
}

/// Why a GPU's cap is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapReason {
    /// No budget: the board's default limit.
    Default,
    /// Busy at its cap: its share of the budget (split by demand and priority).
    Share,
    /// Drawing below its share: the cap follows its draw plus headroom.
    Demand,
    /// Busy and the budget allows the board's maximum.
    Max,
    /// The budget is too small: the board's minimum limit.
    Min,
    /// Above its temperature target: lowered first.
    Thermal,
    /// An outside limit (a BMC) is lower: respected.
    External,
    /// Telemetry lost, or the agent stopped: static safe cap.
    Failsafe,
    /// A static cap (budget / GPUs).
    Static,
}

/// The controller's state in the power report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerControl {
    /// What it is doing.
    pub mode: PowerMode,
    /// The settings in force.
    pub settings: PowerSettings,
    /// Generation of the persisted settings (rises on every change).
    pub generation: u64,
    /// Sum of the caps the controller hands out, W (above the budget when some GPUs draw less
    /// than their cap; the loop on measured draw keeps the draw under the budget).
    pub allocated_w: u32,
    /// When it last ran, ms since the Unix epoch.
    pub updated_at_ms: u64,
}

/// `POST /v1/power/budget`: change only the node budget (`None` removes it: vendor limits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerBudgetRequest {
    /// Node power budget, W.
    pub budget_w: Option<u32>,
}
