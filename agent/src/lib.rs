//! `hearth-agent`: the node supervisor.
//!
//! Entry point: [`run`] (what `hearth-agent run --config PATH` calls), built on [`start`], which
//! returns a [`RunningAgent`] handle. It starts a [`supervisor::Supervisor`] with these tasks:
//!
//! - `gpu-sampler` ([`sampler`]): opens the GPU backend ([`gpu`]: NVML or the simulator), reads
//!   the inventory and samples every GPU at `gpu.sample_interval_ms`; its snapshot flows out on a
//!   `tokio::sync::watch` channel held by the shared [`agent::Agent`].
//! - `gpu-events` ([`events`]): a blocking thread on the backend's event set (XID, ECC).
//! - `api` ([`api::server`]): the local HTTP/1.1 + JSON API under `/v1` on a Unix socket.
//! - `health` ([`health`]): GPU and host checks, per-GPU quarantine and reset, node drain; its
//!   state flows out on [`agent::Agent::health_watch`] (`docs/0003-health.md`).
//! - `power` ([`power`]): holds the node power budget and temperature targets (settings on a
//!   `watch` channel of the agent: configuration, `POST /v1/power`, SIGHUP via [`reload`]);
//!   design note `docs/0004-power-control.md`.
//! - `fleet` ([`fleet`]): enrollment with the seed's token and the `hearth/1` control session to
//!   the fleet; desired state flows out on [`agent::Agent::desired`] (`docs/0005-fleet.md`).
//!
//! - `metrics` ([`telemetry`]): `/metrics` with dcgm-exporter's names on `[metrics] listen`
//!   (also served by the local API), and offline summaries (`docs/0007-telemetry.md`).
//!
//! Beside them, a notifier task speaks to systemd ([`systemd`]: READY, WATCHDOG at half of
//! `WATCHDOG_USEC`, STATUS), and [`run`] turns SIGTERM/SIGINT into a shutdown within 5 s.
//! Every subcommand other than `run` and `render-network` is a client of the API
//! ([`api::client`], [`cli`]); `render-network` ([`netconfig`]) renders the seed's network
//! settings into systemd-networkd units at boot (`docs/0008-image.md`).
//! Signed A/B updates ([`update`], `docs/0009-updates.md`) are not a supervised task: the
//! `hearth-agent update apply|check|status` subcommands drive an [`update::Updater`]; the agent
//! serves their state on `GET /v1/update` and reports it to the fleet.
//! Architecture: `docs/architecture.md`; the GPU layer: `docs/0001-gpu-layer.md`.

pub mod agent;
pub mod api;
pub mod cli;
pub mod command;
pub mod config;
pub mod events;
pub mod fakes;
pub mod fleet;
pub mod gpu;
pub mod health;
pub mod host;
pub mod logging;
pub mod netconfig;
pub mod persist;
pub mod power;
pub mod render;
pub mod sampler;
pub mod supervisor;
pub mod systemd;
pub mod telemetry;
pub mod update;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hearth_proto::api::{NodeState, SubsystemState};
use hearth_sim::{SimClock, SimHost};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::config::{BackendKind, Config};
use crate::supervisor::{Subsystem, Supervisor};
use crate::systemd::{Notice, Notifier};

/// Grace given to subsystems at shutdown (SIGTERM must end the process within 5 s).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// A started agent.
#[derive(Debug)]
pub struct RunningAgent {
    agent: Arc<Agent>,
    supervisor: Supervisor,
    notifier: Arc<dyn Notifier>,
    notify_cancel: CancellationToken,
    notify_task: JoinHandle<()>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Start the agent's subsystems (inside a tokio runtime).
pub fn start(config: Config, notifier: Arc<dyn Notifier>) -> anyhow::Result<RunningAgent> {
    let sim = match config.gpu.backend {
        BackendKind::Sim => {
            let scenario = config.sim_scenario().context("cannot load the sim scenario")?;
            let clock = SimClock::Real { scale: config.sim.time_scale };
            Some(Arc::new(SimHost::new(&scenario, clock)))
        }
        BackendKind::Nvml => None,
    };
    let agent = Agent::new(config, sim, hostname());
    let subsystems: Vec<Arc<dyn Subsystem>> = vec![
        Arc::new(sampler::Sampler::new(agent.clone())),
        Arc::new(events::Events::new(agent.clone())),
        Arc::new(api::server::ApiServer::new(agent.clone())),
        Arc::new(health::subsystem::Health::new(agent.clone())),
        Arc::new(power::task::PowerTask::new(agent.clone())),
    ];
    let mut subsystems = subsystems;
    if agent.config.fleet.enabled {
        subsystems.push(Arc::new(fleet::Fleet::new(agent.clone())));
    }
    subsystems.push(Arc::new(telemetry::offline::Summaries::new(agent.clone())));
    if agent.config.metrics.enabled {
        subsystems.push(Arc::new(telemetry::server::MetricsServer::new(agent.clone())));
    }
    let supervisor = Supervisor::start(subsystems, supervisor::BACKOFF_START);
    agent.attach_subsystems(supervisor.status());
    let notify_cancel = CancellationToken::new();
    let notify_task =
        tokio::spawn(notify_loop(agent.clone(), notifier.clone(), notify_cancel.clone()));
    Ok(RunningAgent { agent, supervisor, notifier, notify_cancel, notify_task })
}

impl RunningAgent {
    /// The shared state.
    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// Stop every subsystem (at most [`SHUTDOWN_GRACE`]).
    pub async fn stop(self) {
        self.notifier.notify(Notice::Stopping);
        self.notify_cancel.cancel();
        let _ = self.notify_task.await;
        let aborted = self.supervisor.shutdown(SHUTDOWN_GRACE).await;
        if !aborted.is_empty() {
            tracing::warn!(?aborted, "subsystems did not stop in time and were aborted");
        }
    }
}

/// One line for `systemctl status`.
pub fn status_line(agent: &Agent) -> String {
    let status = agent.status();
    let state = match status.state {
        NodeState::Starting => "starting",
        NodeState::Ready => "ready",
        NodeState::Degraded => "degraded",
        NodeState::Draining => "draining",
        NodeState::Quarantined => "quarantined",
    };
    let healthy = status
        .gpus
        .iter()
        .filter(|g| g.health.verdict == hearth_proto::api::GpuVerdict::Healthy)
        .count();
    let failed: Vec<&str> = status
        .subsystems
        .iter()
        .filter(|s| s.state == SubsystemState::Failed)
        .map(|s| s.name.as_str())
        .collect();
    let mut line =
        format!("{state}; {} GPUs ({healthy} healthy) on {}", status.gpus.len(), status.backend);
    if !failed.is_empty() {
        line.push_str(&format!("; failing: {}", failed.join(", ")));
    }
    let health = agent.health_watch().borrow().clone();
    let out: Vec<String> = health
        .gpus
        .iter()
        .filter(|g| g.service != hearth_proto::api::GpuService::Serving)
        .map(|g| format!("GPU {} {:?}", g.index, g.service).to_lowercase())
        .collect();
    if !out.is_empty() {
        line.push_str(&format!("; {}", out.join(", ")));
    }
    if health.reboot_requested.is_some() {
        line.push_str("; reboot requested");
    }
    line
}

async fn notify_loop(agent: Arc<Agent>, notifier: Arc<dyn Notifier>, cancel: CancellationToken) {
    let mut subsystems = match agent.subsystems_rx() {
        Some(rx) => rx,
        None => return,
    };
    let mut gpus = agent.gpus().subscribe();
    let watchdog = notifier.watchdog_timeout().map(|t| t / 2);
    let mut ping = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut ready_sent = false;
    let mut last_status = String::new();
    loop {
        if !ready_sent && subsystems.borrow().iter().all(|s| s.state != SubsystemState::Starting) {
            notifier.notify(Notice::Ready);
            ready_sent = true;
            tracing::info!("agent ready");
        }
        let line = status_line(&agent);
        if line != last_status {
            notifier.notify(Notice::Status(line.clone()));
            last_status = line;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = subsystems.changed() => {}
            _ = gpus.changed() => {}
            _ = ping.tick() => {
                if watchdog.is_some() {
                    notifier.notify(Notice::Watchdog);
                }
            }
        }
    }
}

/// Run until SIGTERM or SIGINT, then stop within 5 s. SIGHUP re-reads `config_path` (when
/// given): see [`reload`].
pub async fn run(
    config: Config,
    config_path: Option<std::path::PathBuf>,
    notifier: Arc<dyn Notifier>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let running = start(config, notifier)?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => match &config_path {
                Some(path) => reload(running.agent(), path),
                None => tracing::info!("SIGHUP: no configuration file to reload"),
            },
        }
    }
    running.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: re-read the configuration. An invalid file is refused (the error names the key) and
/// the running configuration stays. A changed `[power]` budget, targets or priorities apply at
/// once (the `power` subsystem steps on the change); other keys need a restart, which is logged.
pub fn reload(agent: &Agent, path: &std::path::Path) {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: configuration refused; the running one stays");
            return;
        }
    };
    let settings = new.power.settings();
    let changed = agent.power_settings().send_if_modified(|s| {
        if s.config == settings {
            return false;
        }
        s.settings = settings.clone();
        s.config = settings.clone();
        true
    });
    if changed {
        tracing::info!(budget_w = ?settings.budget_w, "SIGHUP: [power] settings reloaded");
    } else {
        tracing::info!("SIGHUP: [power] settings unchanged");
    }
    // Everything but the runtime settings, compared with the running configuration.
    let mut rest = new;
    let old = &agent.config.power;
    rest.power.budget_w = old.budget_w;
    rest.power.core_target_c = old.core_target_c;
    rest.power.memory_target_c = old.memory_target_c;
    rest.power.gpu = old.gpu.clone();
    if rest != agent.config {
        tracing::warn!(
            "SIGHUP: keys outside [power] budget/targets changed; they apply at the next restart"
        );
    }
}
