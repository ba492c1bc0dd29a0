//! The `power` subsystem: the control loop of [`Controller`] over the agent's GPUs.
//!
//! At start it waits for the sampler's first round, loads the persisted settings (or takes the
//! configuration's), logs limits enforced from outside (a BMC) and steps the controller at once,
//! so a budget set before a reboot is back within a second of the first sample (NVML limits do
//! not survive a reboot). Then it steps every `power.control_period_ms`, and at once when the
//! settings change. Every settings change is persisted (generation + 1). When cancelled it leaves
//! safe static caps, and clocks and fans back to the driver. Design: `docs/0004-power-control.md`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hearth_proto::api::{PowerControl, PowerMode};

use super::{
    Controller, GpuInput, GpuOutcome, Policy, PowerOutcome, STATE_FILE, SettingsInput, actuate,
    leave_safe,
};
use crate::agent::{Agent, GpuSnapshot, now_ms};
use crate::persist::{Store, ensure_dir};
use crate::supervisor::{BoxRun, RunCtx, Subsystem};

/// The `power` subsystem.
#[derive(Debug)]
pub struct PowerTask {
    agent: Arc<Agent>,
}

impl PowerTask {
    /// The control loop for `agent`.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

/// The controller's inputs from a sampler snapshot at `now_ms`. A GPU that fell off the bus is
/// left out: it answers no call and computes nothing (health reports it); a GPU whose samples
/// fail or stop is kept, with no or old telemetry, and puts the node in failsafe.
pub fn inputs(snap: &GpuSnapshot, now_ms: u64) -> Vec<GpuInput> {
    snap.gpus
        .iter()
        .filter(|g| !g.lost)
        .map(|g| {
            let age_s =
                g.sampled_at_ms.map_or(f64::INFINITY, |t| now_ms.saturating_sub(t) as f64 / 1000.0);
            GpuInput::new(&g.inventory, g.sample.as_ref(), age_s)
        })
        .collect()
}

/// The settings file in the agent's state directory.
pub fn store_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

/// The settings to start with: the persisted ones, unless the configuration changed since they
/// were saved (then the configuration's, as the newer). Returns them and the generation.
pub fn boot_settings(store: &Store, config: &SettingsInput) -> (SettingsInput, u64) {
    match store.load::<SettingsInput>() {
        Ok(Some(l)) if l.state.config == config.config => {
            tracing::info!(path = %store.path().display(), generation = l.generation,
                budget_w = ?l.state.settings.budget_w, "power settings restored");
            (l.state, l.generation)
        }
        Ok(Some(l)) => {
            tracing::info!(path = %store.path().display(),
                "the [power] configuration changed since the settings were saved: it applies");
            (config.clone(), l.generation)
        }
        Ok(None) => (config.clone(), 0),
        Err(e) => {
            tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)),
                "cannot read the saved power settings; using the configuration's");
            (config.clone(), 0)
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.context("GPU call thread failed")
}

fn log_failures(failed: Vec<super::ActuationError>, last: &mut BTreeMap<u32, String>) {
    for f in failed {
        let text = format!("{:#}", anyhow::Error::from(f.error));
        if last.get(&f.gpu) != Some(&text) {
            tracing::warn!(gpu = f.gpu, error = %text, "power control could not act on a GPU");
            last.insert(f.gpu, text);
        }
    }
}

impl Subsystem for PowerTask {
    fn name(&self) -> &'static str {
        "power"
    }

    fn run(self: Arc<Self>, ctx: RunCtx) -> BoxRun {
        Box::pin(async move {
            let agent = self.agent.clone();
            // Serving: there is nothing to control until the GPU layer is up, and waiting for it
            // is not a failure of this subsystem (the sampler reports why it is not up).
            ctx.ready();
            // Wait for the sampler's first round: inventory, limits in force, telemetry.
            let mut snaps = agent.gpus().subscribe();
            loop {
                if snaps.borrow_and_update().rounds > 0 && agent.backend().is_some() {
                    break;
                }
                tokio::select! {
                    () = ctx.cancel.cancelled() => return Ok(()),
                    r = snaps.changed() => r.context("the GPU snapshot channel closed")?,
                }
            }
            let Some(backend) = agent.backend() else { anyhow::bail!("no GPU backend") };

            let state_dir = agent.config.state.dir.clone();
            let store = Store::new(store_path(&state_dir));
            if let Err(e) = ensure_dir(&state_dir) {
                // Control matters more than persistence: go on, every save will say why it fails.
                tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)),
                    "power settings cannot be persisted");
            }
            let mut settings_rx = agent.power_settings().subscribe();
            let (boot, mut generation) = {
                let current = settings_rx.borrow_and_update().clone();
                let store = store.clone();
                blocking(move || boot_settings(&store, &current)).await?
            };
            agent.power_settings().send_if_modified(|s| {
                let changed = *s != boot;
                *s = boot.clone();
                changed
            });
            settings_rx.borrow_and_update();
            let mut input = boot;

            let snap = agent.gpus().borrow().clone();
            for g in &snap.gpus {
                if let Some(s) = &g.sample
                    && s.enforced_power_limit_mw < s.power_limit_mw
                {
                    tracing::warn!(
                        gpu = g.inventory.index,
                        requested_mw = s.power_limit_mw,
                        enforced_mw = s.enforced_power_limit_mw,
                        "a lower power limit is enforced from outside (BMC); respected"
                    );
                }
            }

            let params = agent.config.power.params();
            let mut controller = Controller::new(params);
            let started = Instant::now();
            let period = Duration::from_millis(agent.config.power.control_period_ms);
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failures = BTreeMap::new();
            let mut last_inputs: Vec<GpuInput>;
            let mut dirty = true; // persist the boot settings (a new generation per boot change)
            loop {
                if dirty {
                    generation += 1;
                    let (store, doc) = (store.clone(), input.clone());
                    match blocking(move || store.save(generation, &doc)).await? {
                        Ok(()) => tracing::info!(generation, budget_w = ?input.settings.budget_w,
                            "power settings saved"),
                        Err(e) => tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)),
                            "cannot save the power settings (they apply until restart)"),
                    }
                    dirty = false;
                }
                let snap = agent.gpus().borrow().clone();
                let gpus = inputs(&snap, now_ms());
                let decision =
                    controller.tick(started.elapsed().as_secs_f64(), &input.settings, &gpus);
                if decision.mode == PowerMode::Failsafe {
                    tracing::debug!("power control in failsafe: telemetry missing");
                }
                let (b, g, d) = (backend.clone(), gpus.clone(), decision.clone());
                let failed = blocking(move || actuate(b.as_ref(), &g, &d)).await?;
                log_failures(failed, &mut failures);
                let locked = controller.locked_clocks();
                agent.power_outcome().send_replace(Some(PowerOutcome {
                    control: PowerControl {
                        mode: decision.mode,
                        settings: input.settings.clone(),
                        generation,
                        allocated_w: decision.allocated_w.round() as u32,
                        updated_at_ms: now_ms(),
                    },
                    gpus: decision
                        .gpus
                        .iter()
                        .map(|c| GpuOutcome {
                            index: c.index,
                            cap_w: c.cap_w,
                            reason: c.reason,
                            clock_lock_mhz: locked.get(&c.index).copied(),
                        })
                        .collect(),
                }));
                last_inputs = gpus;
                tokio::select! {
                    () = ctx.cancel.cancelled() => break,
                    _ = tick.tick() => {}
                    r = settings_rx.changed() => {
                        r.context("the power settings channel closed")?;
                        let new = settings_rx.borrow_and_update().clone();
                        tracing::info!(budget_w = ?new.settings.budget_w,
                            core_target_c = ?new.settings.core_target_c,
                            memory_target_c = ?new.settings.memory_target_c,
                            "power settings changed");
                        dirty = new != input;
                        input = new;
                    }
                }
            }
            // Stopping: leave safe static caps, clocks and fans to the driver.
            let (b, settings) = (backend.clone(), input.settings.clone());
            let locked = controller.locked_clocks().clone();
            let fans = controller.fans_driven();
            let failed =
                blocking(move || leave_safe(b.as_ref(), &settings, &last_inputs, &locked, fans))
                    .await?;
            log_failures(failed, &mut failures);
            tracing::info!(budget_w = ?input.settings.budget_w, "power control stopped: GPUs left at safe static caps");
            Ok(())
        })
    }
}
