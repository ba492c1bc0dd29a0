//! Hearth's power controller: a pure struct, stepped once per control period with the GPUs'
//! telemetry and the settings, answering per-GPU caps with the reason for each.
//!
//! The loop (design note `docs/0004-power-control.md`):
//!
//! 1. **Failsafe.** Any GPU without telemetry for more than [`TELEMETRY_TIMEOUT_S`]: every GPU
//!    gets the static safe cap (budget / GPUs, clamped), clocks and fans go back to the driver.
//! 2. **Thermal.** Per GPU, an integral loop on the worst of core and memory margin to target
//!    lowers a thermal ceiling by [`THERMAL_GAIN_W_PER_K`] per kelvin above target and period, and
//!    releases it slowly once [`THERMAL_RELEASE_BELOW_K`] below. A hot GPU's ceiling is lower, so
//!    it is capped first and its share goes to the others.
//! 3. **Node loop.** `A`, the sum of the caps handed out, follows the node draw `P` (each GPU's
//!    draw counted at most at its cap, so a stale 1 s average right after a cut is not cut
//!    twice): above [`HIGH`] × budget a multiplicative decrease `A ← A · SETPOINT·B / P`; below
//!    [`LOW`] × budget an additive release of up to [`RELEASE`] × budget per period (not
//!    past the setpoint); between them a PI
//!    loop toward [`SETPOINT`] × budget. Anti-windup: `A` stays within [Σ min, Σ demand].
//! 4. **Split.** `A` is water-filled over the GPUs within [min, ceiling]: each GPU first gets its
//!    minimum, then the rest goes by priority up to each GPU's demand (busy at its cap: the
//!    ceiling; otherwise its draw plus headroom), so idle GPUs hold little and busy ones more.
//! 5. **Clocks and fans.** With a budget, memory-bound GPUs (memory busier than the SMs) get
//!    their SM clock locked at [`PowerParams::memory_bound_clock_pct`] of the maximum, where a
//!    cap would not bind; fan-cooled boards get a fan curve toward the core target.
//! 6. **Rate limit.** At most one limit change per GPU per [`MIN_CHANGE_INTERVAL_S`], none inside
//!    [`DEADBAND`] of the limit last set.

use std::collections::BTreeMap;

use hearth_proto::api::{CapReason, PowerMode, PowerSettings};
use hearth_proto::gpu::{GpuInventory, GpuSample, ThrottleReasons};

/// Telemetry older than this puts the node in failsafe, s.
pub const TELEMETRY_TIMEOUT_S: f64 = 3.0;
/// Multiplicative decrease above this fraction of the budget.
pub const HIGH: f64 = 0.97;
/// The PI loop's setpoint, fraction of the budget.
pub const SETPOINT: f64 = 0.95;
/// Additive release below this fraction of the budget.
pub const LOW: f64 = 0.90;
/// Largest additive release per period, fraction of the budget (never past the setpoint).
pub const RELEASE: f64 = 0.10;
/// PI gains on the node power error (per period, W of allocation per W of error).
pub const KP: f64 = 0.5;
/// Integral gain.
pub const KI: f64 = 0.5;
/// Fewest seconds between two limit changes of one GPU (with a little slack for timer jitter).
pub const MIN_CHANGE_INTERVAL_S: f64 = 1.0;
/// A limit set this long ago must show in the GPU's reading, s (NVML applies within ~0.5 s).
pub const RECONCILE_AFTER_S: f64 = 2.0;
/// No change inside this fraction of the limit last set.
pub const DEADBAND: f64 = 0.01;
/// Thermal ceiling cut per kelvin above target, per period, W.
pub const THERMAL_GAIN_W_PER_K: f64 = 12.0;
/// The thermal ceiling is released once the margin to target is at least this, K.
pub const THERMAL_RELEASE_BELOW_K: f64 = 2.0;
/// Thermal release per period, W.
pub const THERMAL_RELEASE_W: f64 = 10.0;
/// Default core target: this far below T.Limit, K.
pub const DEFAULT_CORE_MARGIN_K: u32 = 8;
/// Default memory target: this far below the memory maximum, K.
pub const DEFAULT_MEMORY_MARGIN_K: u32 = 8;
/// A GPU drawing at least this fraction of its cap counts as held by the cap.
pub const AT_CAP: f64 = 0.96;
/// Headroom over the draw of a GPU not held by its cap: fraction of draw, plus watts.
pub const HEADROOM: (f64, f64) = (0.05, 15.0);
/// A GPU is memory-bound when memory utilisation exceeds SM utilisation and the SMs are at
/// least this busy, %.
pub const MEMORY_BOUND_MIN_UTIL: u32 = 10;

/// Tunables that come from the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerParams {
    /// Lock SM clocks of memory-bound GPUs while a budget is set.
    pub lock_memory_bound_clocks: bool,
    /// The locked clock, percent of the maximum SM clock.
    pub memory_bound_clock_pct: u32,
    /// Drive the fans of fan-cooled boards toward the core target.
    pub fan_control: bool,
}

impl Default for PowerParams {
    fn default() -> Self {
        Self { lock_memory_bound_clocks: true, memory_bound_clock_pct: 70, fan_control: true }
    }
}

/// What the controller needs of one GPU's latest sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Telemetry {
    /// Seconds since the sample was taken.
    pub age_s: f64,
    /// 1 s average draw, W.
    pub draw_w: f64,
    /// Requested limit in force, W.
    pub limit_w: f64,
    /// Enforced limit (ours, or a BMC's when lower), W.
    pub enforced_w: f64,
    /// SM utilisation, %.
    pub util_gpu: u32,
    /// Memory utilisation, %.
    pub util_mem: u32,
    /// Core temperature, °C.
    pub temp_core_c: u32,
    /// Memory temperature, °C.
    pub temp_mem_c: Option<u32>,
    /// The driver reports the power cap as the binding limit.
    pub power_capped: bool,
    /// Fan speeds, %.
    pub fans: usize,
}

/// One GPU as the controller sees it: constraints and telemetry.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInput {
    /// NVML index.
    pub index: u32,
    /// Lowest accepted limit, W.
    pub min_w: f64,
    /// Highest accepted limit, W.
    pub max_w: f64,
    /// Board default limit, W.
    pub default_w: f64,
    /// Highest SM clock, MHz.
    pub max_clock_mhz: u32,
    /// T.Limit, °C.
    pub t_limit_c: Option<u32>,
    /// Memory maximum, °C.
    pub mem_max_c: Option<u32>,
    /// Fans the board controls.
    pub fan_count: u32,
    /// The latest sample, `None` when there is none (lost, failing).
    pub telemetry: Option<Telemetry>,
}

impl GpuInput {
    /// From the inventory and the latest sample (`age_s` seconds old).
    pub fn new(inv: &GpuInventory, sample: Option<&GpuSample>, age_s: f64) -> Self {
        let w = |mw: u32| f64::from(mw) / 1000.0;
        Self {
            index: inv.index,
            min_w: w(inv.power_limit_min_mw),
            max_w: w(inv.power_limit_max_mw),
            default_w: w(inv.power_limit_default_mw),
            max_clock_mhz: inv.max_sm_clock_mhz,
            t_limit_c: inv.max_operating_temp_c,
            mem_max_c: inv.max_memory_temp_c,
            fan_count: inv.fan_count,
            telemetry: sample.map(|s| Telemetry {
                age_s,
                draw_w: w(s.power_avg_mw),
                limit_w: w(s.power_limit_mw),
                enforced_w: w(s.enforced_power_limit_mw),
                util_gpu: s.util_gpu_pct,
                util_mem: s.util_mem_pct,
                temp_core_c: s.temp_core_c,
                temp_mem_c: s.temp_memory_c,
                power_capped: s.throttle.0 & ThrottleReasons::SW_POWER_CAP != 0,
                fans: s.fan_speed_pct.len(),
            }),
        }
    }

    /// The limit an outside limiter (a BMC) enforces below ours, W.
    pub fn external_w(&self) -> Option<f64> {
        let t = self.telemetry?;
        (t.enforced_w + 1.0 < t.limit_w).then_some(t.enforced_w)
    }
}

/// What to do with a GPU's SM clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockCommand {
    /// Leave as they are.
    Keep,
    /// Lock at this clock, MHz.
    Lock(u32),
    /// Give the clocks back to the driver.
    Reset,
}

/// What to do with a GPU's fans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanCommand {
    /// Leave as they are.
    Keep,
    /// Every fan at this percent.
    Set(u32),
    /// Back to the board's automatic curve.
    Auto,
}

/// The controller's answer for one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuCommand {
    /// NVML index.
    pub index: u32,
    /// The cap the controller wants in force, W.
    pub cap_w: f64,
    /// Why.
    pub reason: CapReason,
    /// A limit to write now, mW (`None`: unchanged, inside the deadband or rate-limited).
    pub set_limit_mw: Option<u32>,
    /// Clocks.
    pub clocks: ClockCommand,
    /// Fans.
    pub fans: FanCommand,
}

/// The controller's answer for the node.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What it is doing.
    pub mode: PowerMode,
    /// Node draw it saw (sum of 1 s averages of the GPUs with telemetry), W.
    pub draw_w: f64,
    /// Sum of the caps handed out, W.
    pub allocated_w: f64,
    /// Per GPU, in input order.
    pub gpus: Vec<GpuCommand>,
}

/// A power-capping policy: Hearth's controller, or a baseline the benchmark compares with.
pub trait Policy: Send {
    /// Short name for tables.
    fn name(&self) -> &'static str;
    /// One control period at time `now_s` (seconds on any monotonic clock).
    fn tick(&mut self, now_s: f64, settings: &PowerSettings, gpus: &[GpuInput]) -> Decision;
}

/// The static safe cap of a GPU: budget / GPUs, clamped into its range (and under an outside
/// limit); with no budget the board default. What GPUs are left at in failsafe and at stop.
pub fn safe_cap_w(budget_w: Option<u32>, gpu_count: usize, gpu: &GpuInput) -> f64 {
    let hi = gpu.external_w().map_or(gpu.max_w, |e| e.min(gpu.max_w)).max(gpu.min_w);
    match budget_w {
        Some(b) if gpu_count > 0 => (f64::from(b) / gpu_count as f64).clamp(gpu.min_w, hi),
        _ => gpu.default_w.clamp(gpu.min_w, hi),
    }
}

/// The per-GPU rate limiter: one change per second, none inside the deadband.
#[derive(Debug, Clone, Default)]
pub struct Limiter {
    /// Last limit set (W) and when.
    last: BTreeMap<u32, (f64, f64)>,
}

impl Limiter {
    /// The limit last set on `gpu`, W.
    pub fn last_w(&self, gpu: u32) -> Option<f64> {
        self.last.get(&gpu).map(|(w, _)| *w)
    }

    /// Learn the limit in force on a GPU never set (read at start).
    pub fn learn(&mut self, gpu: u32, limit_w: f64) {
        self.last.entry(gpu).or_insert((limit_w, f64::NEG_INFINITY));
    }

    /// Someone else (an operator, a GPU reset) changed the limit in force since it was set:
    /// forget the value set so the next [`Self::gate`] writes again. A request younger than
    /// `settle_s` may still be on its way and is not second-guessed.
    pub fn reconcile(&mut self, gpu: u32, now_s: f64, in_force_w: f64, settle_s: f64) {
        if let Some(&(last, at)) = self.last.get(&gpu)
            && now_s - at >= settle_s
            && (in_force_w - last).abs() > DEADBAND * last
        {
            self.last.insert(gpu, (in_force_w, at));
        }
    }

    /// `Some(mW)` when `want_w` should be written now.
    pub fn gate(&mut self, gpu: u32, now_s: f64, want_w: f64) -> Option<u32> {
        if let Some(&(last, at)) = self.last.get(&gpu) {
            if (want_w - last).abs() < DEADBAND * last {
                return None;
            }
            if now_s - at < MIN_CHANGE_INTERVAL_S - 1e-3 {
                return None;
            }
        }
        self.last.insert(gpu, (want_w, now_s));
        Some((want_w * 1000.0).round() as u32)
    }
}

/// Core and memory targets of a GPU, °C.
pub fn targets(settings: &PowerSettings, gpu: &GpuInput) -> (Option<f64>, Option<f64>) {
    let own = settings.gpus.iter().find(|g| g.index == gpu.index);
    let core = own
        .and_then(|g| g.core_target_c)
        .or(settings.core_target_c)
        .or(gpu.t_limit_c.map(|t| t.saturating_sub(DEFAULT_CORE_MARGIN_K)));
    let mem = own
        .and_then(|g| g.memory_target_c)
        .or(settings.memory_target_c)
        .or(gpu.mem_max_c.map(|t| t.saturating_sub(DEFAULT_MEMORY_MARGIN_K)));
    (core.map(f64::from), mem.map(f64::from))
}

fn priority(settings: &PowerSettings, gpu: u32) -> f64 {
    let p = settings.gpus.iter().find(|g| g.index == gpu).map_or(1, |g| g.priority);
    f64::from(p.max(1))
}

/// Water-fill `total` over GPUs: each gets `lo`, then the rest by weight up to `demand`.
/// Returns each GPU's allocation (sums to `min(total, Σ demand)`, at least Σ lo).
pub fn water_fill(total: f64, lo: &[f64], demand: &[f64], weight: &[f64]) -> Vec<f64> {
    let mut alloc: Vec<f64> = lo.to_vec();
    let mut rest = total - lo.iter().sum::<f64>();
    let mut open: Vec<usize> = (0..lo.len()).filter(|&i| demand[i] > lo[i] + 1e-9).collect();
    while rest > 1e-6 && !open.is_empty() {
        let wsum: f64 = open.iter().map(|&i| weight[i]).sum();
        // The smallest fill level at which an open GPU reaches its demand.
        let level = open
            .iter()
            .map(|&i| (demand[i] - alloc[i]) / weight[i])
            .fold(f64::INFINITY, f64::min)
            .min(rest / wsum);
        for &i in &open {
            alloc[i] += level * weight[i];
        }
        rest -= level * wsum;
        open.retain(|&i| demand[i] - alloc[i] > 1e-6);
    }
    alloc
}

/// Per-GPU thermal state.
#[derive(Debug, Clone, Copy)]
struct Thermal {
    ceiling_w: f64,
}

/// Hearth's controller. Pure: no I/O, time comes in with each tick.
#[derive(Debug, Clone)]
pub struct Controller {
    params: PowerParams,
    /// Sum of caps handed out, W (`None` until the first budgeted tick).
    alloc_w: Option<f64>,
    prev_err: f64,
    thermal: BTreeMap<u32, Thermal>,
    locked: BTreeMap<u32, u32>,
    fans: BTreeMap<u32, u32>,
    limiter: Limiter,
    budget_seen: Option<u32>,
}

impl Controller {
    /// A controller with these tunables.
    pub fn new(params: PowerParams) -> Self {
        Self {
            params,
            alloc_w: None,
            prev_err: 0.0,
            thermal: BTreeMap::new(),
            locked: BTreeMap::new(),
            fans: BTreeMap::new(),
            limiter: Limiter::default(),
            budget_seen: None,
        }
    }

    /// The rate limiter (for the agent to seed with limits read at start).
    pub fn limiter_mut(&mut self) -> &mut Limiter {
        &mut self.limiter
    }

    /// Clocks the controller has locked, by GPU, MHz.
    pub fn locked_clocks(&self) -> &BTreeMap<u32, u32> {
        &self.locked
    }

    /// Whether the controller has taken any fan off its automatic curve.
    pub fn fans_driven(&self) -> bool {
        !self.fans.is_empty()
    }

    fn failsafe(&mut self, now_s: f64, settings: &PowerSettings, gpus: &[GpuInput]) -> Decision {
        self.alloc_w = None;
        self.prev_err = 0.0;
        let n = gpus.len();
        let mut out = Vec::with_capacity(n);
        for g in gpus {
            let cap = safe_cap_w(settings.budget_w, n, g);
            let clocks = if self.locked.remove(&g.index).is_some() {
                ClockCommand::Reset
            } else {
                ClockCommand::Keep
            };
            let fans = if self.fans.remove(&g.index).is_some() {
                FanCommand::Auto
            } else {
                FanCommand::Keep
            };
            out.push(GpuCommand {
                index: g.index,
                cap_w: cap,
                reason: CapReason::Failsafe,
                set_limit_mw: self.limiter.gate(g.index, now_s, cap),
                clocks,
                fans,
            });
        }
        Decision {
            mode: PowerMode::Failsafe,
            draw_w: gpus.iter().filter_map(|g| g.telemetry).map(|t| t.draw_w).sum(),
            allocated_w: out.iter().map(|c| c.cap_w).sum(),
            gpus: out,
        }
    }

    /// Update a GPU's thermal ceiling from its margin to target; returns the ceiling.
    fn thermal_ceiling(&mut self, settings: &PowerSettings, g: &GpuInput, t: &Telemetry) -> f64 {
        let (core, mem) = targets(settings, g);
        let mut margin = f64::INFINITY;
        if let Some(c) = core {
            margin = margin.min(c - f64::from(t.temp_core_c));
        }
        if let (Some(m), Some(tm)) = (mem, t.temp_mem_c) {
            margin = margin.min(m - f64::from(tm));
        }
        let th = self.thermal.entry(g.index).or_insert(Thermal { ceiling_w: g.max_w });
        if margin < 0.0 {
            // Start from what it draws (a ceiling far above the draw would not bind), then cut.
            let from = th.ceiling_w.min(t.draw_w.max(g.min_w));
            th.ceiling_w = from - THERMAL_GAIN_W_PER_K * (-margin);
        } else if margin >= THERMAL_RELEASE_BELOW_K {
            th.ceiling_w += THERMAL_RELEASE_W;
        }
        th.ceiling_w = th.ceiling_w.clamp(g.min_w, g.max_w);
        th.ceiling_w
    }

    fn fan_command(&mut self, settings: &PowerSettings, g: &GpuInput, t: &Telemetry) -> FanCommand {
        if !self.params.fan_control || g.fan_count == 0 || t.fans == 0 {
            return FanCommand::Keep;
        }
        let Some(core) = targets(settings, g).0 else { return FanCommand::Keep };
        // 30 % at 20 K below the target, 100 % at the target.
        let x = (f64::from(t.temp_core_c) - (core - 20.0)) / 20.0;
        let pct = (30.0 + 70.0 * x).clamp(30.0, 100.0).round() as u32;
        match self.fans.get(&g.index) {
            Some(&last) if last.abs_diff(pct) < 5 => FanCommand::Keep,
            _ => {
                self.fans.insert(g.index, pct);
                FanCommand::Set(pct)
            }
        }
    }

    fn clock_command(&mut self, budget: bool, g: &GpuInput, t: &Telemetry) -> ClockCommand {
        let memory_bound = t.util_mem > t.util_gpu && t.util_gpu >= MEMORY_BOUND_MIN_UTIL;
        let want = (budget && self.params.lock_memory_bound_clocks && memory_bound).then(|| {
            (u64::from(g.max_clock_mhz) * u64::from(self.params.memory_bound_clock_pct) / 100)
                as u32
        });
        match (want, self.locked.get(&g.index).copied()) {
            (Some(w), Some(l)) if w == l => ClockCommand::Keep,
            (Some(w), _) => {
                self.locked.insert(g.index, w);
                ClockCommand::Lock(w)
            }
            (None, Some(_)) => {
                self.locked.remove(&g.index);
                ClockCommand::Reset
            }
            (None, None) => ClockCommand::Keep,
        }
    }
}

impl Policy for Controller {
    fn name(&self) -> &'static str {
        "hearth"
    }

    fn tick(&mut self, now_s: f64, settings: &PowerSettings, gpus: &[GpuInput]) -> Decision {
        let stale = gpus
            .iter()
            .any(|g| g.telemetry.is_none_or(|t| t.age_s.is_nan() || t.age_s > TELEMETRY_TIMEOUT_S));
        if stale || gpus.is_empty() {
            return self.failsafe(now_s, settings, gpus);
        }
        if settings.budget_w != self.budget_seen {
            self.budget_seen = settings.budget_w;
            self.prev_err = 0.0;
        }
        let tel: Vec<Telemetry> = gpus.iter().filter_map(|g| g.telemetry).collect();
        for (g, t) in gpus.iter().zip(&tel) {
            self.limiter.learn(g.index, t.limit_w);
        }
        let ceilings: Vec<f64> = gpus
            .iter()
            .zip(&tel)
            .map(|(g, t)| {
                let th = self.thermal_ceiling(settings, g, t);
                g.external_w().map_or(th, |e| th.min(e)).max(g.min_w)
            })
            .collect();
        let draw: f64 = tel.iter().map(|t| t.draw_w).sum();
        let fans: Vec<FanCommand> =
            gpus.iter().zip(&tel).map(|(g, t)| self.fan_command(settings, g, t)).collect();
        let clocks: Vec<ClockCommand> = gpus
            .iter()
            .zip(&tel)
            .map(|(g, t)| self.clock_command(settings.budget_w.is_some(), g, t))
            .collect();

        let Some(budget) = settings.budget_w.map(f64::from) else {
            self.alloc_w = None;
            let mut out = Vec::new();
            for (i, g) in gpus.iter().enumerate() {
                let default = g.default_w.clamp(g.min_w, g.max_w);
                let (cap, reason) = if ceilings[i] < default - 0.5 {
                    let ext = g.external_w().is_some_and(|e| e <= ceilings[i] + 0.5);
                    (ceilings[i], if ext { CapReason::External } else { CapReason::Thermal })
                } else {
                    (default, CapReason::Default)
                };
                out.push(GpuCommand {
                    index: g.index,
                    cap_w: cap,
                    reason,
                    set_limit_mw: self.limiter.gate(g.index, now_s, cap),
                    clocks: clocks[i],
                    fans: fans[i],
                });
            }
            return Decision {
                mode: PowerMode::NoBudget,
                draw_w: draw,
                allocated_w: out.iter().map(|c| c.cap_w).sum(),
                gpus: out,
            };
        };

        // With a budget the controller owns the limits: one changed behind its back is set again.
        for (g, t) in gpus.iter().zip(&tel) {
            self.limiter.reconcile(g.index, now_s, t.limit_w, RECONCILE_AFTER_S);
        }
        let lo: Vec<f64> = gpus.iter().map(|g| g.min_w).collect();
        let current: Vec<f64> = gpus
            .iter()
            .zip(&tel)
            .map(|(g, t)| self.limiter.last_w(g.index).unwrap_or(t.limit_w))
            .collect();
        let demand: Vec<f64> = gpus
            .iter()
            .zip(&tel)
            .enumerate()
            .map(|(i, (g, t))| {
                let held = t.power_capped || t.draw_w >= AT_CAP * current[i].min(t.limit_w);
                let busy = t.util_gpu > 0;
                if held && busy {
                    ceilings[i]
                } else {
                    (t.draw_w * (1.0 + HEADROOM.0) + HEADROOM.1).clamp(g.min_w, ceilings[i])
                }
            })
            .collect();
        let weight: Vec<f64> = gpus.iter().map(|g| priority(settings, g.index)).collect();

        // Node loop on the draw each GPU can still have under its current cap.
        let effective: f64 = tel.iter().zip(&current).map(|(t, c)| t.draw_w.min(*c)).sum();
        let sum_lo: f64 = lo.iter().sum();
        let sum_demand: f64 = demand.iter().sum();
        let mut a = self.alloc_w.unwrap_or_else(|| current.iter().sum::<f64>());
        let setpoint = SETPOINT * budget;
        if effective > HIGH * budget {
            a *= setpoint / effective.max(1.0);
            self.prev_err = 0.0;
        } else if effective < LOW * budget {
            a += (RELEASE * budget).min(setpoint - effective);
            self.prev_err = 0.0;
        } else {
            let err = setpoint - effective;
            a += KP * (err - self.prev_err) + KI * err;
            self.prev_err = err;
        }
        a = a.min(sum_demand).max(sum_lo);
        self.alloc_w = Some(a);

        let alloc = water_fill(a, &lo, &demand, &weight);
        let mut out = Vec::with_capacity(gpus.len());
        for (i, g) in gpus.iter().enumerate() {
            let cap = alloc[i].clamp(g.min_w, g.max_w);
            let reason = if cap <= g.min_w + 0.5 && demand[i] > g.min_w + 0.5 {
                CapReason::Min
            } else if demand[i] < ceilings[i] - 0.5 && cap >= demand[i] - 0.5 {
                CapReason::Demand
            } else if cap >= ceilings[i] - 0.5 && ceilings[i] < g.max_w - 0.5 {
                if g.external_w().is_some_and(|e| e <= ceilings[i] + 0.5) {
                    CapReason::External
                } else {
                    CapReason::Thermal
                }
            } else if cap >= g.max_w - 0.5 {
                CapReason::Max
            } else {
                CapReason::Share
            };
            out.push(GpuCommand {
                index: g.index,
                cap_w: cap,
                reason,
                set_limit_mw: self.limiter.gate(g.index, now_s, cap),
                clocks: clocks[i],
                fans: fans[i],
            });
        }
        Decision { mode: PowerMode::Budget, draw_w: draw, allocated_w: a, gpus: out }
    }
}
