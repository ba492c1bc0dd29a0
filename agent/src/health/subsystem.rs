//! The `health` subsystem: drives [`Monitor`] from the agent's channels.
//!
//! - Every sampler round (the snapshot `watch`): polled checks, plus NVLink counters and
//!   persistence mode read here.
//! - Every GPU event (the agent's `broadcast`): XID and ECC events judged at once (< 1 s).
//! - Every `host.interval_s`: host checks ([`crate::host`]) and the driver check.
//! - Reset commands run on their own blocking task, one per GPU at a time.
//!
//! The view is published on the agent's health `watch` after every change.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use hearth_proto::api::{GpuVerdict, HostCheck, SubsystemState};
use tokio::sync::broadcast::error::RecvError;

use super::engine::{GpuObservation, Monitor};
use super::machine::Command;
use super::policy::Policy;
use super::reset::{GpuReset, NvidiaSmiReset, ResetError};
use crate::agent::{Agent, now_ms};
use crate::command::SystemRunner;
use crate::host::{HostBaseline, HostProbe, SystemProbe, check_all};
use crate::persist::{Store, ensure_dir};
use crate::supervisor::{BoxRun, RunCtx, Subsystem};

/// File name of the persisted health state under `state.dir`.
pub const STATE_FILE: &str = "health.json";

/// The health subsystem.
#[derive(Debug)]
pub struct Health {
    agent: Arc<Agent>,
    probe: Arc<dyn HostProbe>,
}

impl Health {
    /// Health for `agent` over the real host.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent, probe: Arc::new(SystemProbe::default()) }
    }

    /// Health for `agent` over another host probe (tests).
    pub fn with_probe(agent: Arc<Agent>, probe: Arc<dyn HostProbe>) -> Self {
        Self { agent, probe }
    }
}

fn lock(m: &Mutex<Monitor>) -> std::sync::MutexGuard<'_, Monitor> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn driver_check(agent: &Agent) -> HostCheck {
    let snap = agent.gpus().borrow().clone();
    match (agent.backend(), snap.driver) {
        (Some(_), Some(d)) => HostCheck {
            name: "driver".into(),
            verdict: GpuVerdict::Healthy,
            detail: format!("driver {} loaded, {} GPUs", d.driver_version, snap.gpus.len()),
        },
        _ => {
            let sampler = agent.subsystems().into_iter().find(|s| s.name == "gpu-sampler");
            match sampler {
                // Degraded, not failed: the sampler's failure already degrades the node, and
                // the node keeps its API up to say why.
                Some(s) if s.state == SubsystemState::Failed => HostCheck {
                    name: "driver".into(),
                    verdict: GpuVerdict::Degraded,
                    detail: format!(
                        "GPU backend not open: {}",
                        s.last_error.unwrap_or_else(|| "unknown error".into())
                    ),
                },
                _ => HostCheck {
                    name: "driver".into(),
                    verdict: GpuVerdict::Healthy,
                    detail: "GPU backend opening".into(),
                },
            }
        }
    }
}

impl Subsystem for Health {
    fn name(&self) -> &'static str {
        "health"
    }

    fn run(self: Arc<Self>, ctx: RunCtx) -> BoxRun {
        Box::pin(async move {
            let agent = self.agent.clone();
            let policy = match &agent.config.health.policy {
                Some(p) => Policy::load(p)?,
                None => Policy::default(),
            };
            let dir = agent.config.state.dir.clone();
            ensure_dir(&dir)?;
            let monitor = Monitor::new(policy.clone(), Some(Store::new(dir.join(STATE_FILE))))
                .context("cannot load the persisted health state")?;
            let monitor = Arc::new(Mutex::new(monitor));
            agent.set_monitor(monitor.clone());
            let reset: Arc<dyn GpuReset> = match &agent.sim {
                Some(host) => Arc::new(crate::fakes::reset::SimReset::new(host.clone())),
                None => Arc::new(NvidiaSmiReset::new(
                    Arc::new(SystemRunner),
                    policy.reset.command.clone(),
                    Duration::from_secs(policy.reset.timeout_s),
                )),
            };
            let mut events = agent.subscribe_events();
            let mut gpus = agent.gpus().subscribe();
            let mut host_tick = tokio::time::interval(Duration::from_secs(policy.host.interval_s));
            host_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut filesystems = policy.host.filesystems.clone();
            if !filesystems.contains(&dir) {
                filesystems.push(dir.clone());
            }
            let baseline = Arc::new(Mutex::new(HostBaseline::default()));
            let in_flight = Arc::new(Mutex::new(BTreeSet::<String>::new()));
            agent.publish_health(lock(&monitor).view());
            ctx.ready();
            loop {
                let commands = tokio::select! {
                    () = ctx.cancel.cancelled() => return Ok(()),
                    ev = events.recv() => match ev {
                        Ok(ev) => lock(&monitor).observe_event(&ev.event, now_ms()),
                        Err(RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "health fell behind the GPU event stream");
                            Vec::new()
                        }
                        Err(RecvError::Closed) => anyhow::bail!("GPU event channel closed"),
                    },
                    changed = gpus.changed() => {
                        changed.context("GPU snapshot channel closed")?;
                        let snap = gpus.borrow_and_update().clone();
                        if snap.rounds == 0 {
                            continue;
                        }
                        let backend = agent.backend();
                        let obs = tokio::task::spawn_blocking(move || {
                            snap.gpus
                                .into_iter()
                                .map(|g| {
                                    let (nvlink_errors, persistence) = match (&backend, g.lost) {
                                        (Some(b), false) => super::extras(b.as_ref(), g.inventory.index),
                                        _ => (None, None),
                                    };
                                    GpuObservation {
                                        inventory: g.inventory,
                                        sample: if g.lost { None } else { g.sample },
                                        lost: g.lost,
                                        error: g.error,
                                        nvlink_errors,
                                        persistence,
                                    }
                                })
                                .collect::<Vec<_>>()
                        })
                        .await
                        .context("health read thread failed")?;
                        lock(&monitor).observe_round(&obs, now_ms())
                    }
                    _ = host_tick.tick() => {
                        let (probe, hp, fs, base) =
                            (self.probe.clone(), policy.host.clone(), filesystems.clone(), baseline.clone());
                        // The fleet endpoint exists once the node has a fleet seed (None until then).
                        let endpoint = agent
                            .fleet_status()
                            .borrow()
                            .fleet_url
                            .as_deref()
                            .and_then(crate::host::endpoint_of_url);
                        let mut checks = tokio::task::spawn_blocking(move || {
                            let mut b = base.lock().unwrap_or_else(PoisonError::into_inner);
                            check_all(probe.as_ref(), &hp, &fs, endpoint.as_deref(), &mut b)
                        })
                        .await
                        .context("host check thread failed")?;
                        checks.push(driver_check(&agent));
                        lock(&monitor).set_host(checks, now_ms());
                        Vec::new()
                    }
                };
                for c in commands {
                    let Command::Reset { gpu, uuid } = c;
                    let Some(backend) = agent.backend() else { continue };
                    if !in_flight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(uuid.clone())
                    {
                        continue;
                    }
                    let (reset, monitor, agent, in_flight) =
                        (reset.clone(), monitor.clone(), agent.clone(), in_flight.clone());
                    tokio::spawn(async move {
                        let r = tokio::task::spawn_blocking(move || {
                            super::reset_if_idle(backend.as_ref(), reset.as_ref(), gpu)
                        })
                        .await;
                        let result = match r {
                            Ok(Err(ResetError::Busy { .. })) => None,
                            Ok(r) => Some(r.map_err(|e| e.to_string())),
                            Err(e) => Some(Err(format!("reset thread failed: {e}"))),
                        };
                        if let Some(result) = result {
                            let mut m = lock(&monitor);
                            m.reset_result(&uuid, result, now_ms());
                            agent.publish_health(m.view());
                        }
                        in_flight.lock().unwrap_or_else(PoisonError::into_inner).remove(&uuid);
                    });
                }
                agent.publish_health(lock(&monitor).view());
            }
        })
    }
}
