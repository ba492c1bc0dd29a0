//! The baselines the power benchmark compares Hearth's [`Controller`](super::Controller) with,
//! behind the same [`Policy`] trait: no control (vendor limits), static uniform caps (budget /
//! GPUs, the Hive OS way) and a Thunderbolt-style two-threshold capper.

use hearth_proto::api::{CapReason, PowerMode, PowerSettings};

use super::controller::{
    ClockCommand, Decision, FanCommand, GpuCommand, GpuInput, HIGH, LOW, Limiter, Policy,
    safe_cap_w,
};

/// Vendor limits: never writes a limit.
#[derive(Debug, Default, Clone)]
pub struct NoControl;

impl Policy for NoControl {
    fn name(&self) -> &'static str {
        "none"
    }

    fn tick(&mut self, _now_s: f64, _settings: &PowerSettings, gpus: &[GpuInput]) -> Decision {
        let out: Vec<GpuCommand> = gpus
            .iter()
            .map(|g| GpuCommand {
                index: g.index,
                cap_w: g.telemetry.map_or(g.default_w, |t| t.limit_w),
                reason: CapReason::Default,
                set_limit_mw: None,
                clocks: ClockCommand::Keep,
                fans: FanCommand::Keep,
            })
            .collect();
        decision(PowerMode::NoBudget, gpus, out)
    }
}

fn decision(mode: PowerMode, gpus: &[GpuInput], out: Vec<GpuCommand>) -> Decision {
    Decision {
        mode,
        draw_w: gpus.iter().filter_map(|g| g.telemetry).map(|t| t.draw_w).sum(),
        allocated_w: out.iter().map(|c| c.cap_w).sum(),
        gpus: out,
    }
}

/// Static uniform caps: budget / GPUs on every GPU, whatever it runs.
#[derive(Debug, Default, Clone)]
pub struct StaticCaps {
    limiter: Limiter,
}

impl Policy for StaticCaps {
    fn name(&self) -> &'static str {
        "static"
    }

    fn tick(&mut self, now_s: f64, settings: &PowerSettings, gpus: &[GpuInput]) -> Decision {
        let n = gpus.len();
        let out: Vec<GpuCommand> = gpus
            .iter()
            .map(|g| {
                let cap = safe_cap_w(settings.budget_w, n, g);
                GpuCommand {
                    index: g.index,
                    cap_w: cap,
                    reason: CapReason::Static,
                    set_limit_mw: self.limiter.gate(g.index, now_s, cap),
                    clocks: ClockCommand::Keep,
                    fans: FanCommand::Keep,
                }
            })
            .collect();
        decision(PowerMode::Budget, gpus, out)
    }
}

/// Thunderbolt-style capper (Google, OSDI'20): one uniform cap for every GPU; above
/// [`HIGH`] × budget it is cut multiplicatively, below [`LOW`] × budget each GPU's cap is raised
/// by a step with probability 1/2 (randomised release, so GPUs do not all surge at once).
#[derive(Debug, Clone)]
pub struct Thunderbolt {
    caps: Vec<f64>,
    rng: u64,
    limiter: Limiter,
}

/// Multiplicative decrease factor per period.
pub const TB_DECREASE: f64 = 0.9;
/// Release step per period, fraction of the board maximum.
pub const TB_RELEASE: f64 = 0.05;

impl Thunderbolt {
    /// A capper whose randomised release draws from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { caps: Vec::new(), rng: seed, limiter: Limiter::default() }
    }

    /// SplitMix64: a coin per GPU per release.
    fn coin(&mut self) -> bool {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) & 1 == 1
    }
}

impl Policy for Thunderbolt {
    fn name(&self) -> &'static str {
        "thunderbolt"
    }

    fn tick(&mut self, now_s: f64, settings: &PowerSettings, gpus: &[GpuInput]) -> Decision {
        if self.caps.len() != gpus.len() {
            self.caps =
                gpus.iter().map(|g| g.telemetry.map_or(g.default_w, |t| t.limit_w)).collect();
        }
        let draw: f64 = gpus.iter().filter_map(|g| g.telemetry).map(|t| t.draw_w).sum();
        if let Some(budget) = settings.budget_w.map(f64::from) {
            if draw > HIGH * budget {
                for c in &mut self.caps {
                    *c *= TB_DECREASE;
                }
            } else if draw < LOW * budget {
                for (g, c) in gpus.iter().zip(0..self.caps.len()) {
                    if self.coin() {
                        self.caps[c] += TB_RELEASE * g.max_w;
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(gpus.len());
        for (g, c) in gpus.iter().zip(self.caps.iter_mut()) {
            *c = c.clamp(g.min_w, g.max_w);
            out.push(GpuCommand {
                index: g.index,
                cap_w: *c,
                reason: CapReason::Share,
                set_limit_mw: self.limiter.gate(g.index, now_s, *c),
                clocks: ClockCommand::Keep,
                fans: FanCommand::Keep,
            });
        }
        decision(PowerMode::Budget, gpus, out)
    }
}
