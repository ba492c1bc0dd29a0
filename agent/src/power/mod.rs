//! Power and thermal control: hold a node power budget and GPU temperature targets.
//!
//! - [`controller`]: Hearth's controller, a pure struct stepped once per period
//!   ([`Controller`]), behind the [`Policy`] trait it shares with the benchmark's baselines in
//!   [`policies`] (no control, static uniform caps, a Thunderbolt-style capper).
//! - [`task`]: the `power` subsystem: reads the sampler's snapshot, steps the controller,
//!   actuates through [`GpuBackend`] (power limits, locked clocks, fans), persists the settings
//!   and leaves safe static caps when it stops.
//! - Settings ([`PowerSettings`]: budget, targets, priorities) flow in on a `watch` channel held by
//!   the [`Agent`](crate::agent::Agent), fed by the configuration, `POST /v1/power` and SIGHUP (and
//!   the fleet later); they are persisted under the state directory by one atomic write carrying
//!   a generation number ([`crate::persist::Store`]).
//!
//! Design note: `docs/0004-power-control.md` (the loop, its constants, and what GPUs are left at
//! on stop, crash, telemetry loss and boot).

pub mod controller;
pub mod policies;
pub mod task;

use hearth_proto::api::{CapReason, PowerSettings};
use serde::{Deserialize, Serialize};

pub use controller::{
    ClockCommand, Controller, Decision, FanCommand, GpuCommand, GpuInput, Policy, PowerParams,
    Telemetry, safe_cap_w,
};

use crate::gpu::{GpuBackend, GpuError};

/// Name of the settings file in the state directory.
pub const STATE_FILE: &str = "power.json";

/// Settings that cannot be used; `key` names the field (`budget_w`, `gpu[1].priority`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SettingsError {
    /// The field.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Check every value's range. `list` is the name of the per-GPU list in the caller's format
/// (`gpu` in the configuration file, `gpus` in the API).
pub fn validate_settings(s: &PowerSettings, list: &str) -> Result<(), SettingsError> {
    let err = |key: String, message: String| Err(SettingsError { key, message });
    if let Some(b) = s.budget_w
        && !(1..=1_000_000).contains(&b)
    {
        return err("budget_w".into(), format!("{b} W is outside 1..=1000000"));
    }
    let target = |key: String, t: Option<u32>| match t {
        Some(t) if !(30..=120).contains(&t) => err(key, format!("{t} °C is outside 30..=120")),
        _ => Ok(()),
    };
    target("core_target_c".into(), s.core_target_c)?;
    target("memory_target_c".into(), s.memory_target_c)?;
    for (i, g) in s.gpus.iter().enumerate() {
        if s.gpus[..i].iter().any(|o| o.index == g.index) {
            return err(format!("{list}[{i}].index"), format!("GPU {} is listed twice", g.index));
        }
        if !(1..=100).contains(&g.priority) {
            return err(
                format!("{list}[{i}].priority"),
                format!("{} is outside 1..=100", g.priority),
            );
        }
        target(format!("{list}[{i}].core_target_c"), g.core_target_c)?;
        target(format!("{list}[{i}].memory_target_c"), g.memory_target_c)?;
    }
    Ok(())
}

/// The settings in force and where they came from; what flows on the agent's settings channel.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SettingsInput {
    /// The settings in force (the last set, by the configuration or at runtime).
    pub settings: PowerSettings,
    /// The configuration's settings when these were set: at boot, a configuration that differs
    /// from the persisted one was edited since and wins; otherwise the persisted runtime
    /// settings do.
    pub config: PowerSettings,
}

/// One GPU's part of the controller's last answer (for the power report).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuOutcome {
    /// NVML index.
    pub index: u32,
    /// The cap chosen, W.
    pub cap_w: f64,
    /// Why.
    pub reason: CapReason,
    /// A clock locked by the controller, MHz.
    pub clock_lock_mhz: Option<u32>,
}

/// What the `power` subsystem publishes after each step.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerOutcome {
    /// The controller's mode, settings and totals.
    pub control: hearth_proto::api::PowerControl,
    /// Per GPU.
    pub gpus: Vec<GpuOutcome>,
}

/// A failed actuation: which GPU, what, and why.
#[derive(Debug)]
pub struct ActuationError {
    /// The GPU.
    pub gpu: u32,
    /// The backend's error (it names the operation).
    pub error: GpuError,
}

/// Carry out a decision through the GPU backend: power limits, clock locks, fans. Continues past
/// a failing GPU and returns every failure. Fans the board lacks (`NotSupported`) are not errors.
pub fn actuate(
    backend: &dyn GpuBackend,
    gpus: &[GpuInput],
    decision: &Decision,
) -> Vec<ActuationError> {
    let mut failed = Vec::new();
    for (cmd, g) in decision.gpus.iter().zip(gpus) {
        let gpu = cmd.index;
        if let Some(mw) = cmd.set_limit_mw {
            let mw = mw.clamp((g.min_w * 1000.0) as u32, (g.max_w * 1000.0) as u32);
            if let Err(error) = backend.set_power_limit(gpu, mw) {
                failed.push(ActuationError { gpu, error });
            }
        }
        let clocks = match cmd.clocks {
            ClockCommand::Keep => Ok(()),
            ClockCommand::Lock(mhz) => backend.lock_clocks(gpu, mhz, mhz),
            ClockCommand::Reset => backend.reset_clocks(gpu),
        };
        if let Err(error) = clocks {
            failed.push(ActuationError { gpu, error });
        }
        for fan in 0..g.fan_count {
            let r = match cmd.fans {
                FanCommand::Keep => Ok(()),
                FanCommand::Set(pct) => backend.set_fan_speed(gpu, fan, pct),
                FanCommand::Auto => backend.reset_fan_speed(gpu, fan),
            };
            match r {
                Ok(()) | Err(GpuError::NotSupported { .. }) => {}
                Err(error) => failed.push(ActuationError { gpu, error }),
            }
        }
    }
    failed
}

/// Leave every GPU at its static safe cap (budget / GPUs, clamped; the board default without a
/// budget), the clocks the controller locked (`locked`) and the fans it drove (`fans`) back to
/// the driver: what the agent does when it stops.
pub fn leave_safe(
    backend: &dyn GpuBackend,
    settings: &PowerSettings,
    gpus: &[GpuInput],
    locked: &std::collections::BTreeMap<u32, u32>,
    fans: bool,
) -> Vec<ActuationError> {
    let n = gpus.len();
    let decision = Decision {
        mode: hearth_proto::api::PowerMode::Failsafe,
        draw_w: 0.0,
        allocated_w: 0.0,
        gpus: gpus
            .iter()
            .map(|g| {
                let cap = safe_cap_w(settings.budget_w, n, g);
                GpuCommand {
                    index: g.index,
                    cap_w: cap,
                    reason: CapReason::Failsafe,
                    set_limit_mw: Some((cap * 1000.0).round() as u32),
                    clocks: if locked.contains_key(&g.index) {
                        ClockCommand::Reset
                    } else {
                        ClockCommand::Keep
                    },
                    fans: if fans { FanCommand::Auto } else { FanCommand::Keep },
                }
            })
            .collect(),
    };
    actuate(backend, gpus, &decision)
}

#[cfg(test)]
mod tests;
