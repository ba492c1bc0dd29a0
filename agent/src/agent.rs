//! [`Agent`]: the state the subsystems share, and the reports the API builds from it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hearth_proto::api::{
    GpuHealth, GpuPower, GpuService, GpuStatus, GpuVerdict, HealthReport, NodeState, NodeStatus,
    PowerReport, SubsystemState, SubsystemStatus, TimedEvent,
};
use hearth_proto::gpu::{DriverInfo, GpuEvent, GpuEventKind, GpuInventory, GpuSample};
use hearth_sim::SimHost;
use tokio::sync::{broadcast, watch};

use crate::config::Config;
use crate::gpu::GpuBackend;
use crate::health::{Monitor, NodeHealth};

/// How many recent events the agent keeps for the health report.
pub const RECENT_EVENTS: usize = 256;
/// Capacity of the GPU event stream the health subsystem follows.
pub const EVENT_STREAM: usize = 4096;

/// One GPU as the sampler last saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuEntry {
    /// Fixed facts.
    pub inventory: GpuInventory,
    /// Latest successful sample.
    pub sample: Option<GpuSample>,
    /// When it was taken, ms since the Unix epoch.
    pub sampled_at_ms: Option<u64>,
    /// The last read answered "GPU lost".
    pub lost: bool,
    /// The last read failed for another reason.
    pub error: Option<String>,
}

/// Everything the sampler knows, published on a `watch` channel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSnapshot {
    /// Driver facts, once read.
    pub driver: Option<DriverInfo>,
    /// GPUs by index; empty until the inventory is read.
    pub gpus: Vec<GpuEntry>,
    /// Number of completed sampling rounds.
    pub rounds: u64,
}

/// Events received since start.
#[derive(Debug, Default)]
pub struct EventLog {
    /// The most recent events, oldest first.
    pub recent: VecDeque<TimedEvent>,
    /// Distinct XIDs seen per GPU since start.
    pub xids: BTreeMap<u32, BTreeSet<u64>>,
    /// Total events received.
    pub total: u64,
    /// XIDs received per `(gpu, xid)` since start (`hearth_gpu_xid_errors_total`).
    pub xid_counts: BTreeMap<(u32, u64), u64>,
    /// The last XID per GPU (dcgm-exporter's `DCGM_FI_DEV_XID_ERRORS`).
    pub last_xid: BTreeMap<u32, u64>,
}

/// The agent's shared state.
#[derive(Debug)]
pub struct Agent {
    /// The configuration it runs with.
    pub config: Config,
    /// When it started.
    pub started: Instant,
    /// Host name, read once.
    pub hostname: String,
    /// The simulated node when `gpu.backend = "sim"`.
    pub sim: Option<Arc<SimHost>>,
    backend: RwLock<Option<Arc<dyn GpuBackend>>>,
    gpus: watch::Sender<GpuSnapshot>,
    events: Mutex<EventLog>,
    subsystems: OnceLock<watch::Receiver<Vec<SubsystemStatus>>>,
    // Health (docs/0003-health.md).
    event_stream: broadcast::Sender<TimedEvent>,
    health: watch::Sender<NodeHealth>,
    monitor: RwLock<Option<Arc<Mutex<Monitor>>>>,
    // Power control: settings in (config, API, SIGHUP; the fleet later), outcome out.
    power_settings: watch::Sender<crate::power::SettingsInput>,
    power_outcome: watch::Sender<Option<crate::power::PowerOutcome>>,
    // Fleet (crate::fleet): desired state for the health and power subsystems, and membership.
    desired: watch::Sender<Option<hearth_proto::control::DesiredState>>,
    fleet_status: watch::Sender<hearth_proto::api::FleetStatus>,
    /// Control session and tunnel counters (`crate::telemetry`).
    pub link_stats: Arc<crate::telemetry::LinkStats>,
    offline: OnceLock<Arc<Mutex<crate::telemetry::offline::Spool>>>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Agent {
    /// Shared state for `config`; `sim` is the simulated node when the backend is `sim`.
    pub fn new(config: Config, sim: Option<Arc<SimHost>>, hostname: String) -> Arc<Self> {
        let power_settings = config.power.settings();
        Arc::new(Self {
            config,
            started: Instant::now(),
            hostname,
            sim,
            backend: RwLock::new(None),
            gpus: watch::Sender::new(GpuSnapshot::default()),
            events: Mutex::new(EventLog::default()),
            subsystems: OnceLock::new(),
            event_stream: broadcast::Sender::new(EVENT_STREAM),
            health: watch::Sender::new(NodeHealth::default()),
            monitor: RwLock::new(None),
            power_settings: watch::Sender::new(crate::power::SettingsInput {
                settings: power_settings.clone(),
                config: power_settings,
            }),
            power_outcome: watch::Sender::new(None),
            desired: watch::Sender::new(None),
            fleet_status: watch::Sender::new(hearth_proto::api::FleetStatus {
                state: "starting".into(),
                ..Default::default()
            }),
            link_stats: Arc::default(),
            offline: OnceLock::new(),
        })
    }

    /// The open GPU backend, once the sampler opened it.
    pub fn backend(&self) -> Option<Arc<dyn GpuBackend>> {
        self.backend.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Record the open backend.
    pub fn set_backend(&self, backend: Arc<dyn GpuBackend>) {
        *self.backend.write().unwrap_or_else(PoisonError::into_inner) = Some(backend);
    }

    /// The GPU snapshot channel (the sampler writes it).
    pub fn gpus(&self) -> &watch::Sender<GpuSnapshot> {
        &self.gpus
    }

    /// Attach the supervisor's status channel (once).
    pub fn attach_subsystems(&self, rx: watch::Receiver<Vec<SubsystemStatus>>) {
        let _ = self.subsystems.set(rx);
    }

    /// The supervisor's status channel, once attached.
    pub fn subsystems_rx(&self) -> Option<watch::Receiver<Vec<SubsystemStatus>>> {
        self.subsystems.get().cloned()
    }

    /// Subsystem states.
    pub fn subsystems(&self) -> Vec<SubsystemStatus> {
        self.subsystems.get().map(|rx| rx.borrow().clone()).unwrap_or_default()
    }

    /// Power-control settings in force: the configuration's, changed at runtime by the API,
    /// SIGHUP and (later) the fleet. The `power` subsystem reacts to every change.
    pub fn power_settings(&self) -> &watch::Sender<crate::power::SettingsInput> {
        &self.power_settings
    }

    /// Set new runtime settings (API, fleet): the configuration they derive from stays.
    pub fn set_power_settings(&self, settings: hearth_proto::api::PowerSettings) {
        self.power_settings.send_modify(|s| s.settings = settings);
    }

    /// Change only the budget (API, fleet); targets and priorities stay.
    pub fn set_power_budget(&self, budget_w: Option<u32>) {
        self.power_settings.send_modify(|s| s.settings.budget_w = budget_w);
    }

    /// The power controller's last step (the `power` subsystem writes it).
    pub fn power_outcome(&self) -> &watch::Sender<Option<crate::power::PowerOutcome>> {
        &self.power_outcome
    }

    /// The fleet's desired state (drain, power budget, labels, update channel, generation), once
    /// received; subscribe to follow it.
    pub fn desired(&self) -> &watch::Sender<Option<hearth_proto::control::DesiredState>> {
        &self.desired
    }

    /// Fleet membership (written by the `fleet` subsystem).
    pub fn fleet_status(&self) -> &watch::Sender<hearth_proto::api::FleetStatus> {
        &self.fleet_status
    }

    /// Record a GPU event.
    pub fn record_event(&self, event: GpuEvent) {
        let mut log = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if let GpuEventKind::Xid(xid) = event.kind {
            log.xids.entry(event.gpu).or_default().insert(xid);
            *log.xid_counts.entry((event.gpu, xid)).or_default() += 1;
            log.last_xid.insert(event.gpu, xid);
        }
        log.total += 1;
        if log.recent.len() == RECENT_EVENTS {
            log.recent.pop_front();
        }
        let timed = TimedEvent { at_ms: now_ms(), event };
        log.recent.push_back(timed.clone());
        // No receiver (health not running yet) is fine.
        let _ = self.event_stream.send(timed);
    }

    /// The offline summary spool, once the `summaries` subsystem opened it.
    pub fn offline_spool(&self) -> Option<Arc<Mutex<crate::telemetry::offline::Spool>>> {
        self.offline.get().cloned()
    }

    /// Attach the opened spool (first call wins); returns the attached one.
    pub fn set_offline_spool(
        &self,
        spool: crate::telemetry::offline::Spool,
    ) -> Arc<Mutex<crate::telemetry::offline::Spool>> {
        self.offline.get_or_init(|| Arc::new(Mutex::new(spool))).clone()
    }

    /// XID history: the last XID per GPU and the count per `(gpu, xid)` since start.
    pub fn xid_history(&self) -> (BTreeMap<u32, u64>, BTreeMap<(u32, u64), u64>) {
        let log = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        (log.last_xid.clone(), log.xid_counts.clone())
    }

    /// Full node status (`GET /v1/status`).
    pub fn status(&self) -> NodeStatus {
        let snap = self.gpus.borrow().clone();
        let subsystems = self.subsystems();
        let view = self.health.borrow().clone();
        let gpus: Vec<GpuStatus> = snap
            .gpus
            .iter()
            .map(|g| {
                let health = view
                    .gpus
                    .iter()
                    .find(|h| h.uuid == g.inventory.uuid)
                    .map(|h| h.health.clone())
                    .unwrap_or_else(|| GpuHealth {
                        verdict: GpuVerdict::Healthy,
                        reasons: vec!["not checked yet".into()],
                    });
                GpuStatus {
                    inventory: g.inventory.clone(),
                    sample: if g.lost { None } else { g.sample.clone() },
                    sample_error: g.error.clone(),
                    sampled_at_ms: g.sampled_at_ms,
                    health,
                }
            })
            .collect();
        let state = node_state(&snap, &subsystems, &gpus, &view);
        NodeStatus {
            api_version: hearth_proto::API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: self.hostname.clone(),
            state,
            backend: match self.config.gpu.backend {
                crate::config::BackendKind::Nvml => "nvml".into(),
                crate::config::BackendKind::Sim => "sim".into(),
            },
            driver: snap.driver.clone(),
            uptime_s: self.started.elapsed().as_secs(),
            subsystems,
            gpus,
            fleet: self.fleet_status.borrow().clone(),
        }
    }

    /// Health report (`GET /v1/health`).
    pub fn health(&self) -> HealthReport {
        let state = self.status().state;
        let view = self.health.borrow().clone();
        let recent = {
            let log = self.events.lock().unwrap_or_else(PoisonError::into_inner);
            log.recent.iter().cloned().collect()
        };
        HealthReport {
            state,
            gpus: view.gpus,
            recent_events: recent,
            missing_gpus: view.missing_gpus,
            host: view.host,
            history: view.history,
            reboot_requested: view.reboot_requested,
            drained: view.drained,
            generation: view.generation,
        }
    }

    /// Power report (`GET /v1/power`).
    pub fn power(&self) -> PowerReport {
        let snap = self.gpus.borrow().clone();
        let outcome = self.power_outcome.borrow().clone();
        let gpus: Vec<GpuPower> = snap
            .gpus
            .iter()
            .map(|g| {
                let s = if g.lost { None } else { g.sample.as_ref() };
                let chosen = outcome
                    .as_ref()
                    .and_then(|o| o.gpus.iter().find(|c| c.index == g.inventory.index));
                GpuPower {
                    index: g.inventory.index,
                    draw_mw: s.map(|s| s.power_avg_mw),
                    limit_mw: s.map(|s| s.power_limit_mw),
                    enforced_limit_mw: s.map(|s| s.enforced_power_limit_mw),
                    min_mw: g.inventory.power_limit_min_mw,
                    max_mw: g.inventory.power_limit_max_mw,
                    default_mw: g.inventory.power_limit_default_mw,
                    cap_w: chosen.map(|c| c.cap_w.round() as u32),
                    reason: chosen.map(|c| c.reason),
                    clock_lock_mhz: chosen.and_then(|c| c.clock_lock_mhz),
                }
            })
            .collect();
        PowerReport {
            total_draw_mw: gpus.iter().filter_map(|g| g.draw_mw).map(u64::from).sum(),
            gpus,
            control: outcome.map(|o| o.control),
        }
    }
}

fn node_state(
    snap: &GpuSnapshot,
    subsystems: &[SubsystemStatus],
    gpus: &[GpuStatus],
    health: &NodeHealth,
) -> NodeState {
    if snap.rounds == 0 && subsystems.iter().all(|s| s.state != SubsystemState::Failed) {
        return NodeState::Starting;
    }
    let out_of_service = |g: &&hearth_proto::api::GpuHealthEntry| {
        matches!(g.service, GpuService::Quarantined | GpuService::Rma)
    };
    let all_out = !health.gpus.is_empty()
        && health.gpus.iter().filter(out_of_service).count() == health.gpus.len();
    let host_failed = health.host.iter().any(|h| h.verdict == GpuVerdict::Failed);
    let all_idle = health.gpus.iter().all(|g| g.idle == Some(true));
    if all_out || host_failed || (health.drained && all_idle) {
        return NodeState::Quarantined;
    }
    if health.drained {
        return NodeState::Draining;
    }
    let subsystems_ok = subsystems.iter().all(|s| s.state == SubsystemState::Running);
    let gpus_ok = gpus.iter().all(|g| g.health.verdict == GpuVerdict::Healthy);
    // Degraded host checks (low disk, unsynchronised clock, corrected EDAC errors) are
    // advisory: shown in the health report and history, they do not degrade the node; a failed
    // one (read-only filesystem, uncorrected memory errors) quarantines it.
    let health_ok = health.missing_gpus.is_empty() && health.reboot_requested.is_none();
    if subsystems_ok && gpus_ok && health_ok && snap.rounds > 0 {
        NodeState::Ready
    } else {
        NodeState::Degraded
    }
}

// Health (docs/0003-health.md): what the `health` subsystem publishes and what the fleet side
// will carry (verdict events, reboot requests).
impl Agent {
    /// The GPU event stream (every event the `gpu-events` subsystem records).
    pub fn subscribe_events(&self) -> broadcast::Receiver<TimedEvent> {
        self.event_stream.subscribe()
    }

    /// The node health state: per-GPU verdicts and service states, host checks, the bounded
    /// verdict-change ring and the reboot request, updated on every change.
    pub fn health_watch(&self) -> watch::Receiver<NodeHealth> {
        self.health.subscribe()
    }

    /// Publish a new health view (the `health` subsystem).
    pub fn publish_health(&self, view: NodeHealth) {
        self.health.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }

    /// Why the node asks the fleet for a reboot (a GPU reset is impossible or failed), if it does.
    pub fn reboot_requested(&self) -> Option<String> {
        self.health.borrow().reboot_requested.clone()
    }

    /// Attach the running health engine (the `health` subsystem, at each start).
    pub fn set_monitor(&self, monitor: Arc<Mutex<Monitor>>) {
        *self.monitor.write().unwrap_or_else(PoisonError::into_inner) = Some(monitor);
    }

    /// The running health engine, once the `health` subsystem started.
    pub fn monitor(&self) -> Option<Arc<Mutex<Monitor>>> {
        self.monitor.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}
