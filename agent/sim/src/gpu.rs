//! One simulated GPU: its state and the physics of one step (see `docs/0002-gpu-simulator.md`).
//!
//! Everything here works in SI-ish units (W, °C, MHz, s) on `f64`; values are converted to
//! NVML's units (mW, whole °C) only in [`Gpu::sample`].

use hearth_proto::gpu::{
    ComputeProcess, EccCounters, GpuEventKind, GpuInventory, GpuSample, NvlinkErrorCounters,
    PcieLink, RemappedRows, ThrottleReasons,
};
use rand::RngCore;
use rand_chacha::ChaCha8Rng;

use crate::events::EventLog;
use crate::fault::{Fault, Workload};
use crate::node::SimError;
use crate::profile::GpuProfile;
use crate::scenario::Background;

/// The step in seconds (equals [`crate::node::STEP`]).
pub(crate) const DT: f64 = 0.01;
/// The step in nanoseconds.
pub(crate) const STEP_NS: u64 = 10_000_000;
const _: () = assert!(crate::node::STEP.as_nanos() == STEP_NS as u128);
/// Steps per simulated second (the length of the 1 s power window).
pub(crate) const STEPS_PER_S: u64 = 100;
const WINDOW: usize = STEPS_PER_S as usize;

/// Relative amplitude of reading noise (uniform in ±2 %).
pub(crate) const NOISE: f64 = 0.02;
/// Fraction of the remaining distance the SM clock moves toward its target each step
/// (1 − 0.5¹⁰ ≈ 99.9 % settled after 100 ms).
const CLOCK_SLEW: f64 = 0.5;
/// Time constant of a fan following its target speed, s.
const FAN_TAU_S: f64 = 2.0;
/// Time constant of the inlet-temperature ramp of a cooling failure, s.
pub(crate) const COOLING_TAU_S: f64 = 30.0;
/// HW slowdown releases this far below the slowdown threshold, K.
pub(crate) const HW_SLOWDOWN_HYSTERESIS_K: f64 = 2.0;
/// Most `SingleBitEcc` events one GPU logs per simulated second (counters stay exact).
pub(crate) const SBE_EVENTS_PER_S: u32 = 10;
/// Automatic fan curve: the floor, and the die temperatures where it leaves the floor and
/// reaches 100 %.
pub(crate) const FAN_MIN_PCT: f64 = 30.0;
pub(crate) const FAN_CURVE_LOW_C: f64 = 50.0;
pub(crate) const FAN_CURVE_HIGH_C: f64 = 80.0;
/// Heatsink-to-inlet resistance at 0 % airflow, as a multiple of the full-airflow one.
pub(crate) const SINK_R_AT_NO_AIRFLOW: f64 = 3.0;
/// Power-limit requests take effect after a delay drawn uniformly from this range, ms.
pub(crate) const LIMIT_DELAY_MS: (u64, u64) = (100, 500);

/// What a workload does to the GPU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkloadModel {
    /// Switching activity: the `util` of the power formula (0..=1).
    pub(crate) activity: f64,
    /// Reported GPU utilisation range, %.
    pub(crate) util_gpu: (u32, u32),
    /// Reported memory utilisation range, %.
    pub(crate) util_mem: (u32, u32),
    /// Memory load driving the HBM offset (0..=1).
    pub(crate) mem_load: f64,
    /// Framebuffer in use, fraction of total.
    pub(crate) mem_used: f64,
}

pub(crate) fn workload_model(w: Workload) -> WorkloadModel {
    match w {
        Workload::Idle => WorkloadModel {
            activity: 0.0,
            util_gpu: (0, 0),
            util_mem: (0, 0),
            mem_load: 0.0,
            mem_used: 0.005,
        },
        Workload::Training => WorkloadModel {
            activity: 1.0,
            util_gpu: (98, 100),
            util_mem: (38, 42),
            mem_load: 0.40,
            mem_used: 0.92,
        },
        Workload::Inference => WorkloadModel {
            activity: 0.55,
            util_gpu: (60, 70),
            util_mem: (80, 90),
            mem_load: 0.85,
            mem_used: 0.70,
        },
    }
}

/// Clock fraction at and above which memory-bound work runs at full speed (memory saturates).
pub(crate) const MEMORY_BOUND_KNEE: f64 = 0.6;

/// Work rate in full-speed units at clock fraction `x = f / fmax`: `util × x` for compute-bound
/// work, `util × min(1, x / 0.6)` for memory-bound work, where `util` is the workload's mean
/// GPU utilisation (training 0.99, inference 0.65).
pub(crate) fn work_rate(w: Workload, x: f64) -> f64 {
    let m = workload_model(w);
    let util = f64::from(m.util_gpu.0 + m.util_gpu.1) / 200.0;
    match w {
        Workload::Idle => 0.0,
        Workload::Training => util * x,
        Workload::Inference => util * (x / MEMORY_BOUND_KNEE).min(1.0),
    }
}

/// Automatic fan curve: fan percent for a die temperature.
pub(crate) fn fan_curve_pct(t_die: f64) -> f64 {
    let span = FAN_CURVE_HIGH_C - FAN_CURVE_LOW_C;
    (FAN_MIN_PCT + (t_die - FAN_CURVE_LOW_C) * (100.0 - FAN_MIN_PCT) / span)
        .clamp(FAN_MIN_PCT, 100.0)
}

/// A single-bit ECC storm in progress.
#[derive(Debug, Clone, Copy)]
struct Storm {
    per_second: u64,
    total_steps: u64,
    elapsed_steps: u64,
    /// Errors counted so far (`per_second * elapsed_steps / 100`, exact).
    counted: u64,
}

impl Storm {
    /// A burst of `per_second` errors for `duration_s` (validated by the caller); `None` when
    /// it would count nothing.
    fn new(per_second: u32, duration_s: f64) -> Option<Self> {
        let total_steps = ((duration_s * 1e9).round() as u64).div_ceil(STEP_NS);
        (total_steps > 0 && per_second > 0).then_some(Self {
            per_second: u64::from(per_second),
            total_steps,
            elapsed_steps: 0,
            counted: 0,
        })
    }
}

/// Advance a burst by one step: the errors due this step (the burst ends after its last step).
fn burst_step(burst: &mut Option<Storm>) -> u64 {
    let Some(mut b) = *burst else { return 0 };
    b.elapsed_steps += 1;
    let due = b.per_second.saturating_mul(b.elapsed_steps) / STEPS_PER_S;
    let new = due - b.counted;
    b.counted = due;
    *burst = if b.elapsed_steps >= b.total_steps { None } else { Some(b) };
    new
}

/// Advance a background accumulator by one step at `per_hour`: whole errors due now.
fn background_step(acc: &mut f64, per_hour: f64) -> u64 {
    if per_hour <= 0.0 {
        return 0;
    }
    *acc += per_hour / 3600.0 * DT;
    let whole = acc.floor();
    *acc -= whole;
    whole as u64
}

#[derive(Debug, Clone, Copy)]
struct Fan {
    /// Manual speed, %, or `None` for the automatic curve.
    manual: Option<f64>,
    /// Current speed, %.
    speed: f64,
}

/// One GPU.
#[derive(Debug)]
pub(crate) struct Gpu {
    pub(crate) index: u32,
    pub(crate) profile: GpuProfile,
    pub(crate) inventory: GpuInventory,
    /// Scenario ambient (the floor of temperature readings is `ambient - 2`).
    ambient_c: f64,
    /// Thermal capacities, J/K, from the time constants and resistances.
    c_die: f64,
    c_sink: f64,

    // Settings.
    pub(crate) workload: Workload,
    /// The requested power limit in effect, mW.
    pub(crate) limit_mw: u32,
    /// A requested limit and the simulated time (ns) it takes effect.
    pub(crate) pending_limit: Option<(u32, u64)>,
    pub(crate) bmc_limit_mw: Option<u32>,
    pub(crate) clock_lock: Option<(u32, u32)>,
    fans: Vec<Fan>,

    // Physics state.
    pub(crate) t_die: f64,
    pub(crate) t_sink: f64,
    /// HBM temperature above die, K.
    hbm_rise: f64,
    /// Current and target inlet rise of a cooling failure, K.
    pub(crate) inlet_rise: f64,
    inlet_rise_target: f64,
    pub(crate) sm_clock: f64,
    /// True power of the last step, W.
    pub(crate) power_w: f64,
    /// True power of the last 100 steps, mW, and their sum.
    power_ring: [u32; WINDOW],
    ring_pos: usize,
    ring_sum: u64,
    /// Energy in units of 0.01 mJ (one step at 1 mW).
    energy_cmj: u64,
    pub(crate) hw_slowdown: bool,
    pub(crate) sw_thermal: bool,
    reasons: u64,
    pub(crate) rate: f64,
    pub(crate) work_done: f64,

    // Noise drawn at the last step: power avg, power instant, die, HBM; utilisation bits.
    noise: [f64; 4],
    util_bits: u64,

    // Faults and their counters.
    pub(crate) lost: bool,
    pub(crate) ecc: EccCounters,
    pub(crate) remap: RemappedRows,
    pub(crate) pcie_gen: u32,
    pub(crate) pcie_width: u32,
    pub(crate) nvlink: Vec<bool>,
    storm: Option<Storm>,
    sbe_window: u64,
    sbe_window_events: u32,
    pub(crate) pcie_replay: u64,
    pcie_burst: Option<Storm>,
    pub(crate) nvlink_errors: Vec<NvlinkErrorCounters>,
    nvlink_bursts: Vec<Option<Storm>>,
    /// Background error rates and their fractional accumulators (SBE, PCIe, per NVLink link).
    background: Background,
    bg_sbe: f64,
    bg_pcie: f64,
    bg_nvlink: Vec<f64>,
}

/// SplitMix64: a tiny hash for identities (UUID, serial) that must not use the physics RNG.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The inventory of GPU `index` of a node seeded with `seed`.
pub(crate) fn make_inventory(p: &GpuProfile, index: u32, seed: u64) -> GpuInventory {
    let mut s = seed ^ 0x4845_4152_5448_0000 ^ u64::from(index).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let hi = splitmix64(&mut s);
    let lo = splitmix64(&mut s);
    let uuid = format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    );
    // GeForce boards report no serial (NVML: NOT_SUPPORTED); data-center boards a 13-digit one.
    let serial = if p.name.contains("GeForce") {
        None
    } else {
        Some(format!("{}", 1_650_000_000_000u64 + splitmix64(&mut s) % 10_000_000_000))
    };
    // Distinct buses 0x10, 0x13, ... (64 GPUs end at 0xCD).
    let bus = 0x10 + 3 * index;
    GpuInventory {
        index,
        uuid,
        name: p.name.clone(),
        serial,
        pci_bus_id: format!("00000000:{bus:02X}:00.0"),
        memory_total_bytes: p.memory_total_bytes,
        power_limit_min_mw: p.power_limit_min_mw,
        power_limit_max_mw: p.power_limit_max_mw,
        power_limit_default_mw: p.power_limit_default_mw,
        max_pcie_gen: p.max_pcie_gen,
        max_pcie_width: p.max_pcie_width,
        nvlink_count: p.nvlink_count,
        fan_count: p.fan_count,
        slowdown_temp_c: Some(p.slowdown_temp_c),
        shutdown_temp_c: Some(p.shutdown_temp_c),
        max_operating_temp_c: Some(p.max_operating_temp_c),
        max_memory_temp_c: p.max_memory_temp_c,
        max_sm_clock_mhz: p.max_sm_clock_mhz,
        max_mem_clock_mhz: p.max_mem_clock_mhz,
    }
}

/// Map 16 random bits onto [-1, 1].
fn unit(bits: u64) -> f64 {
    (bits & 0xffff) as f64 / 65535.0 * 2.0 - 1.0
}

/// Pick a value in `lo..=hi` from 16 random bits.
fn pick(range: (u32, u32), bits: u64) -> u32 {
    let (lo, hi) = range;
    let span = u64::from(hi.saturating_sub(lo)) + 1;
    lo + u32::try_from((bits & 0xffff) % span).unwrap_or(0)
}

fn mw(w: f64) -> u32 {
    if w.is_nan() || w <= 0.0 {
        0
    } else {
        // Saturates at u32::MAX for absurd values.
        (w * 1000.0).round() as u32
    }
}

impl Gpu {
    /// A GPU in thermal equilibrium at idle power at `ambient_c`, running `workload`.
    pub(crate) fn new(
        index: u32,
        profile: GpuProfile,
        workload: Workload,
        seed: u64,
        ambient_c: f64,
    ) -> Self {
        let inventory = make_inventory(&profile, index, seed);
        let idle_w = f64::from(profile.idle_power_mw) / 1000.0;
        let fans = vec![Fan { manual: None, speed: FAN_MIN_PCT }; profile.fan_count as usize];
        let mut gpu = Self {
            index,
            c_die: profile.tau_die_s / profile.r_die_k_per_w,
            c_sink: profile.tau_sink_s / profile.r_sink_k_per_w,
            inventory,
            ambient_c,
            workload,
            limit_mw: profile.power_limit_default_mw,
            pending_limit: None,
            bmc_limit_mw: None,
            clock_lock: None,
            fans,
            t_die: ambient_c,
            t_sink: ambient_c,
            hbm_rise: 0.0,
            inlet_rise: 0.0,
            inlet_rise_target: 0.0,
            sm_clock: f64::from(profile.idle_sm_clock_mhz),
            power_w: idle_w,
            power_ring: [profile.idle_power_mw; WINDOW],
            ring_pos: 0,
            ring_sum: u64::from(profile.idle_power_mw) * STEPS_PER_S,
            energy_cmj: 0,
            hw_slowdown: false,
            sw_thermal: false,
            reasons: 0,
            rate: 0.0,
            work_done: 0.0,
            noise: [0.0; 4],
            util_bits: 0,
            lost: false,
            ecc: EccCounters::default(),
            remap: RemappedRows::default(),
            pcie_gen: profile.max_pcie_gen,
            pcie_width: profile.max_pcie_width,
            nvlink: vec![true; profile.nvlink_count as usize],
            storm: None,
            sbe_window: 0,
            sbe_window_events: 0,
            pcie_replay: 0,
            pcie_burst: None,
            nvlink_errors: vec![NvlinkErrorCounters::default(); profile.nvlink_count as usize],
            nvlink_bursts: vec![None; profile.nvlink_count as usize],
            background: Background::default(),
            bg_sbe: 0.0,
            bg_pcie: 0.0,
            bg_nvlink: vec![0.0; profile.nvlink_count as usize],
            profile,
        };
        // Equilibrium at idle power; on fan boards the fan speed and temperature depend on each
        // other, so iterate to the fixed point (the curve is flat at idle temperatures).
        for _ in 0..50 {
            let r_sink = gpu.r_sink_eff();
            gpu.t_sink = ambient_c + idle_w * r_sink;
            gpu.t_die = gpu.t_sink + idle_w * gpu.profile.r_die_k_per_w;
            let pct = fan_curve_pct(gpu.t_die);
            for f in &mut gpu.fans {
                f.speed = pct;
            }
        }
        gpu.hbm_rise = gpu.profile.hbm_offset_k * workload_model(workload).mem_load;
        gpu.reasons = gpu.idle_reason();
        gpu
    }

    fn idle_reason(&self) -> u64 {
        if self.workload == Workload::Idle { ThrottleReasons::GPU_IDLE } else { 0 }
    }

    /// Heatsink-to-inlet resistance at the current airflow, K/W.
    pub(crate) fn r_sink_eff(&self) -> f64 {
        let r = self.profile.r_sink_k_per_w;
        if self.fans.is_empty() {
            return r;
        }
        let airflow =
            self.fans.iter().map(|f| f.speed).sum::<f64>() / self.fans.len() as f64 / 100.0;
        r * (SINK_R_AT_NO_AIRFLOW - (SINK_R_AT_NO_AIRFLOW - 1.0) * airflow.clamp(0.0, 1.0))
    }

    /// Inlet temperature, °C.
    pub(crate) fn inlet_c(&self) -> f64 {
        self.ambient_c + self.inlet_rise
    }

    /// True power averaged over the last second, W.
    pub(crate) fn power_avg_true_w(&self) -> f64 {
        self.ring_sum as f64 / STEPS_PER_S as f64 / 1000.0
    }

    /// HBM temperature, °C.
    pub(crate) fn t_hbm(&self) -> f64 {
        self.t_die + self.hbm_rise
    }

    /// The limit in force: the requested one, or the BMC's when lower, mW.
    pub(crate) fn enforced_limit_mw(&self) -> u32 {
        match self.bmc_limit_mw {
            Some(b) => b.min(self.limit_mw),
            None => self.limit_mw,
        }
    }

    /// True power at clock `f` with switching activity `a`, W.
    fn power_at(&self, f: f64, a: f64) -> f64 {
        let p = &self.profile;
        let idle = f64::from(p.idle_power_mw) / 1000.0;
        let full = f64::from(p.full_power_mw) / 1000.0;
        let x = (f / f64::from(p.max_sm_clock_mhz)).clamp(0.0, 1.0);
        idle + (full - idle) * a * x * x * x.sqrt()
    }

    /// The clock at which power with activity `a` equals `budget_w` (may be below the minimum
    /// clock, or 0 when the budget is at or below idle power), MHz.
    fn clock_for_power(&self, budget_w: f64, a: f64) -> f64 {
        let p = &self.profile;
        let idle = f64::from(p.idle_power_mw) / 1000.0;
        let full = f64::from(p.full_power_mw) / 1000.0;
        let fmax = f64::from(p.max_sm_clock_mhz);
        let denom = (full - idle) * a;
        if denom <= 0.0 {
            return fmax;
        }
        let x = (budget_w - idle) / denom;
        if x <= 0.0 {
            0.0
        } else if x >= 1.0 {
            fmax
        } else {
            fmax * x.powf(0.4)
        }
    }

    /// The SM clock the driver aims for this step, and the cap reasons (before HW slowdown).
    fn clock_target(&mut self) -> (f64, u64) {
        let p = &self.profile;
        let fmax = f64::from(p.max_sm_clock_mhz);
        let fmin = f64::from(p.min_sm_clock_mhz);
        let (lo, hi) = match self.clock_lock {
            Some((lo, hi)) => (f64::from(lo), f64::from(hi)),
            None => (fmin, fmax),
        };
        if self.workload == Workload::Idle {
            self.sw_thermal = false;
            return (f64::from(p.idle_sm_clock_mhz).clamp(lo, hi), ThrottleReasons::GPU_IDLE);
        }
        let a = workload_model(self.workload).activity;
        let mut f = hi;
        let mut reasons = 0;

        // Power cap: solve P(f) = enforced limit.
        let enforced = self.enforced_limit_mw();
        let limit_w = f64::from(enforced) / 1000.0;
        let mut power_cap = None;
        if self.power_at(f, a) > limit_w {
            let fp = self.clock_for_power(limit_w, a).max(fmin);
            f = f.min(fp);
            power_cap = Some(fp);
        }

        // SW thermal slowdown: once the die passed T.Limit, hold the power at which the die's
        // equilibrium over the current heatsink temperature is T.Limit; release when that
        // budget no longer binds.
        if self.sw_thermal {
            let t_limit = f64::from(p.max_operating_temp_c);
            let budget_w = (t_limit - self.t_sink) / p.r_die_k_per_w;
            if self.power_at(f, a) > budget_w {
                f = f.min(self.clock_for_power(budget_w, a).max(fmin));
                reasons |= ThrottleReasons::SW_THERMAL_SLOWDOWN;
            } else {
                self.sw_thermal = false;
            }
        }

        // The power cap is a reason only while it is the binding limit.
        if let Some(fp) = power_cap
            && fp <= f + 0.5
        {
            reasons |= ThrottleReasons::SW_POWER_CAP;
            if enforced < self.limit_mw {
                reasons |= ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN;
            }
        }

        // HW slowdown: clocks forced to half.
        if self.hw_slowdown {
            f = f.min(0.5 * fmax);
        }
        (f, reasons)
    }

    /// Draw the reading noise and utilisation jitter of this step: two `u64`s, always.
    pub(crate) fn draw_noise(&mut self, rng: &mut ChaCha8Rng) {
        let a = rng.next_u64();
        for (i, n) in self.noise.iter_mut().enumerate() {
            *n = unit(a >> (16 * i)) * NOISE;
        }
        self.util_bits = rng.next_u64();
    }

    /// Advance this GPU from step `k` to step `k + 1` (time `(k + 1) × STEP`).
    pub(crate) fn step(&mut self, k: u64, rng: &mut ChaCha8Rng, log: &mut EventLog) {
        // Draw first and always, so the random stream does not depend on the GPU's state.
        self.draw_noise(rng);
        if self.lost {
            return;
        }

        // Inlet (cooling failure ramp).
        self.inlet_rise += (self.inlet_rise_target - self.inlet_rise) * (DT / COOLING_TAU_S);
        let inlet = self.inlet_c();

        // Fans follow their targets.
        let curve = fan_curve_pct(self.t_die);
        for fan in &mut self.fans {
            let target = fan.manual.unwrap_or(curve);
            fan.speed += (target - fan.speed) * (DT / FAN_TAU_S);
        }
        let r_sink = self.r_sink_eff();

        // Clocks and power.
        let (target, cap_reasons) = self.clock_target();
        self.sm_clock += (target - self.sm_clock) * CLOCK_SLEW;
        if (target - self.sm_clock).abs() < 0.5 {
            self.sm_clock = target;
        }
        let model = workload_model(self.workload);
        let power = self.power_at(self.sm_clock, model.activity);
        self.power_w = power;
        let p = &self.profile;

        // Thermal: two first-order stages, explicit Euler (dt / tau ≤ 0.004).
        let q_die_sink = (self.t_die - self.t_sink) / p.r_die_k_per_w;
        let q_sink_inlet = (self.t_sink - inlet) / r_sink;
        self.t_die += (power - q_die_sink) * DT / self.c_die;
        self.t_sink += (q_die_sink - q_sink_inlet) * DT / self.c_sink;
        let hbm_target = p.hbm_offset_k * model.mem_load;
        self.hbm_rise += (hbm_target - self.hbm_rise) * (DT / p.tau_die_s);

        // Protections on the true die temperature.
        let slowdown = f64::from(p.slowdown_temp_c);
        if self.t_die >= slowdown {
            self.hw_slowdown = true;
        } else if self.t_die < slowdown - HW_SLOWDOWN_HYSTERESIS_K {
            self.hw_slowdown = false;
        }
        if self.workload != Workload::Idle && self.t_die > f64::from(p.max_operating_temp_c) {
            self.sw_thermal = true;
        }
        self.reasons = cap_reasons;
        if self.hw_slowdown {
            self.reasons |= ThrottleReasons::HW_SLOWDOWN | ThrottleReasons::HW_THERMAL_SLOWDOWN;
        }

        // Power window and energy.
        let p_mw = mw(power);
        self.ring_sum = self.ring_sum - u64::from(self.power_ring[self.ring_pos]) + u64::from(p_mw);
        self.power_ring[self.ring_pos] = p_mw;
        self.ring_pos = (self.ring_pos + 1) % WINDOW;
        self.energy_cmj += u64::from(p_mw);

        // Work.
        self.rate = work_rate(self.workload, self.sm_clock / f64::from(p.max_sm_clock_mhz));
        self.work_done += self.rate * DT;

        // Pending power limit.
        let now_ns = (k + 1).saturating_mul(STEP_NS);
        if let Some((mw, at)) = self.pending_limit
            && at <= now_ns
        {
            self.limit_mw = mw;
            self.pending_limit = None;
        }

        // Single-bit ECC: storm and background.
        let mut sbe = burst_step(&mut self.storm);
        if self.profile.ecc {
            sbe += background_step(&mut self.bg_sbe, self.background.sbe_per_hour);
        }
        if sbe > 0 {
            self.count_sbe(k, sbe, log);
        }

        // PCIe replays and NVLink errors: bursts and background.
        self.pcie_replay += burst_step(&mut self.pcie_burst)
            + background_step(&mut self.bg_pcie, self.background.pcie_replay_per_hour);
        for (l, c) in self.nvlink_errors.iter_mut().enumerate() {
            let mut new = self.nvlink_bursts.get_mut(l).map_or(0, burst_step);
            if let Some(acc) = self.bg_nvlink.get_mut(l) {
                new += background_step(acc, self.background.nvlink_replay_per_hour);
            }
            c.replay += new;
        }

        // Shutdown: the GPU drops off the bus.
        if self.t_die >= f64::from(self.profile.shutdown_temp_c) {
            self.fall_off_bus(log);
        }
    }

    /// Count `new` corrected errors at step `k` and log at most [`SBE_EVENTS_PER_S`] events per
    /// simulated second.
    fn count_sbe(&mut self, k: u64, new: u64, log: &mut EventLog) {
        self.ecc.volatile_corrected += new;
        self.ecc.aggregate_corrected += new;
        let window = k / STEPS_PER_S;
        if window != self.sbe_window {
            self.sbe_window = window;
            self.sbe_window_events = 0;
        }
        let room = u64::from(SBE_EVENTS_PER_S - self.sbe_window_events);
        let emit = new.min(room);
        for _ in 0..emit {
            log.push(self.index, &self.inventory.uuid, GpuEventKind::SingleBitEcc);
        }
        self.sbe_window_events += u32::try_from(emit).unwrap_or(SBE_EVENTS_PER_S);
    }

    /// Set the background error rates.
    ///
    /// Each counter starts at its own phase (by GPU index and link) so that GPUs and links do
    /// not all count their background errors in the same step, as independent faults would not.
    pub(crate) fn set_background(&mut self, background: Background) {
        let frac = |x: f64| x - x.floor();
        let i = f64::from(self.index);
        self.background = background;
        self.bg_sbe = frac(i * 0.381_966);
        self.bg_pcie = frac(0.5 + i * 0.618_034);
        let n = self.bg_nvlink.len() as f64;
        for (l, acc) in self.bg_nvlink.iter_mut().enumerate() {
            *acc = frac(l as f64 / n + i * 0.137);
        }
    }

    /// The compute processes: one while a workload runs (pid `40000 + 100 × index`), using the
    /// workload's framebuffer.
    pub(crate) fn compute_processes(&self) -> Vec<ComputeProcess> {
        if self.workload == Workload::Idle {
            return Vec::new();
        }
        let used = (self.profile.memory_total_bytes as f64 * workload_model(self.workload).mem_used)
            as u64;
        vec![ComputeProcess { pid: 40_000 + 100 * self.index, used_memory_bytes: used }]
    }

    fn fall_off_bus(&mut self, log: &mut EventLog) {
        log.push(self.index, &self.inventory.uuid, GpuEventKind::Xid(79));
        self.lost = true;
        self.power_w = 0.0;
        self.rate = 0.0;
    }

    /// A reading of the current state (pure: noise was drawn at the last step).
    pub(crate) fn sample(&self) -> GpuSample {
        let p = &self.profile;
        let full_mw = f64::from(p.full_power_mw);
        let floor_c = (self.ambient_c - 2.0).max(0.0);
        let temp = |t: f64, n: f64| -> u32 { (t * (1.0 + n)).round().max(floor_c.ceil()) as u32 };
        let power =
            |w_mw: f64, n: f64| -> u32 { (w_mw * (1.0 + n)).clamp(0.0, full_mw).round() as u32 };

        let model = workload_model(self.workload);
        let temp_core_c = temp(self.t_die, self.noise[2]);
        let avg_mw = self.ring_sum as f64 / STEPS_PER_S as f64;
        let ecc = p.ecc;
        GpuSample {
            temp_core_c,
            temp_memory_c: p.max_memory_temp_c.map(|_| temp(self.t_hbm(), self.noise[3])),
            thermal_margin_c: Some(
                i32::try_from(p.max_operating_temp_c).unwrap_or(i32::MAX)
                    - i32::try_from(temp_core_c).unwrap_or(i32::MAX),
            ),
            power_avg_mw: power(avg_mw, self.noise[0]),
            power_instant_mw: Some(power(self.power_w * 1000.0, self.noise[1])),
            energy_mj: self.energy_cmj / 100,
            power_limit_mw: self.limit_mw,
            enforced_power_limit_mw: self.enforced_limit_mw(),
            util_gpu_pct: pick(model.util_gpu, self.util_bits),
            util_mem_pct: pick(model.util_mem, self.util_bits >> 16),
            sm_clock_mhz: self.sm_clock.round() as u32,
            mem_clock_mhz: p.max_mem_clock_mhz,
            throttle: ThrottleReasons(self.reasons),
            ecc: ecc.then_some(self.ecc),
            retired_pages: None,
            remapped_rows: ecc.then_some(self.remap),
            pcie: PcieLink {
                generation: self.pcie_gen,
                width: self.pcie_width,
                replay_counter: self.pcie_replay,
            },
            nvlink_active: self.nvlink.clone(),
            fan_speed_pct: self.fans.iter().map(|f| f.speed.round() as u32).collect(),
            memory_used_bytes: (p.memory_total_bytes as f64 * model.mem_used) as u64,
            compute_processes: u32::try_from(self.compute_processes().len()).unwrap_or(u32::MAX),
        }
    }

    fn invalid(&self, message: String) -> SimError {
        SimError::InvalidArgument { gpu: self.index, message }
    }

    fn not_supported(&self, what: &'static str) -> SimError {
        SimError::NotSupported { gpu: self.index, what }
    }

    /// Validate a requested power limit.
    pub(crate) fn check_power_limit(&self, mw: u32) -> Result<(), SimError> {
        let p = &self.profile;
        if !(p.power_limit_min_mw..=p.power_limit_max_mw).contains(&mw) {
            return Err(self.invalid(format!(
                "power limit {mw} mW is outside {}..={} mW",
                p.power_limit_min_mw, p.power_limit_max_mw
            )));
        }
        Ok(())
    }

    pub(crate) fn lock_clocks(&mut self, min_mhz: u32, max_mhz: u32) -> Result<(), SimError> {
        let p = &self.profile;
        let range = p.min_sm_clock_mhz..=p.max_sm_clock_mhz;
        if min_mhz > max_mhz || !range.contains(&min_mhz) || !range.contains(&max_mhz) {
            return Err(self.invalid(format!(
                "clock range {min_mhz}..={max_mhz} MHz is not an ordered range inside {}..={} MHz",
                p.min_sm_clock_mhz, p.max_sm_clock_mhz
            )));
        }
        self.clock_lock = Some((min_mhz, max_mhz));
        Ok(())
    }

    pub(crate) fn reset_clocks(&mut self) {
        self.clock_lock = None;
    }

    fn check_fan(&self, fan: u32) -> Result<usize, SimError> {
        if self.fans.is_empty() {
            return Err(self.not_supported("fan control"));
        }
        let i = fan as usize;
        if i >= self.fans.len() {
            return Err(self.invalid(format!("no fan {fan} (the board has {})", self.fans.len())));
        }
        Ok(i)
    }

    pub(crate) fn set_fan_speed(&mut self, fan: u32, pct: u32) -> Result<(), SimError> {
        let i = self.check_fan(fan)?;
        if pct > 100 {
            return Err(self.invalid(format!("fan speed {pct} % is above 100 %")));
        }
        self.fans[i].manual = Some(f64::from(pct));
        Ok(())
    }

    pub(crate) fn reset_fan(&mut self, fan: u32) -> Result<(), SimError> {
        let i = self.check_fan(fan)?;
        self.fans[i].manual = None;
        Ok(())
    }

    /// Inject a fault (the GPU is not lost; the caller checked).
    pub(crate) fn inject(&mut self, fault: &Fault, log: &mut EventLog) -> Result<(), SimError> {
        let p = &self.profile;
        match *fault {
            Fault::Xid { xid } => {
                if xid == 79 {
                    self.fall_off_bus(log);
                } else {
                    log.push(self.index, &self.inventory.uuid, GpuEventKind::Xid(xid));
                    if xid == 48 && p.ecc {
                        self.ecc.volatile_uncorrected += 1;
                        self.ecc.aggregate_uncorrected += 1;
                    }
                }
            }
            Fault::DoubleBitEcc => {
                if !p.ecc {
                    return Err(self.not_supported("ECC"));
                }
                log.push(self.index, &self.inventory.uuid, GpuEventKind::DoubleBitEcc);
                log.push(self.index, &self.inventory.uuid, GpuEventKind::Xid(48));
                self.ecc.volatile_uncorrected += 1;
                self.ecc.aggregate_uncorrected += 1;
                self.remap.uncorrectable += 1;
                self.remap.pending = true;
            }
            Fault::SingleBitEccStorm { per_second, duration_s } => {
                if !p.ecc {
                    return Err(self.not_supported("ECC"));
                }
                if !duration_s.is_finite() || !(0.0..=1e7).contains(&duration_s) {
                    return Err(
                        self.invalid(format!("storm duration {duration_s} s is outside 0..=1e7 s"))
                    );
                }
                self.storm = Storm::new(per_second, duration_s);
            }
            Fault::PcieReplayStorm { per_second, duration_s } => {
                if !duration_s.is_finite() || !(0.0..=1e7).contains(&duration_s) {
                    return Err(
                        self.invalid(format!("burst duration {duration_s} s is outside 0..=1e7 s"))
                    );
                }
                self.pcie_burst = Storm::new(per_second, duration_s);
            }
            Fault::NvlinkErrors { link, per_second, duration_s } => {
                if p.nvlink_count == 0 {
                    return Err(self.not_supported("NVLink"));
                }
                if !duration_s.is_finite() || !(0.0..=1e7).contains(&duration_s) {
                    return Err(
                        self.invalid(format!("burst duration {duration_s} s is outside 0..=1e7 s"))
                    );
                }
                let burst = Storm::new(per_second, duration_s);
                let Some(slot) = self.nvlink_bursts.get_mut(link as usize) else {
                    return Err(self.invalid(format!(
                        "no NVLink link {link} (the GPU has {})",
                        p.nvlink_count
                    )));
                };
                *slot = burst;
            }
            Fault::RowRemapPending => {
                if !p.ecc {
                    return Err(self.not_supported("row remapping"));
                }
                self.remap.pending = true;
            }
            Fault::RowRemapFailure => {
                if !p.ecc {
                    return Err(self.not_supported("row remapping"));
                }
                self.remap.failed = true;
                log.push(self.index, &self.inventory.uuid, GpuEventKind::Xid(64));
            }
            Fault::PcieDowntrain { generation, width } => {
                if generation == 0 || generation > p.max_pcie_gen {
                    return Err(self.invalid(format!(
                        "PCIe generation {generation} is outside 1..={}",
                        p.max_pcie_gen
                    )));
                }
                if width == 0 || width > p.max_pcie_width || !width.is_power_of_two() {
                    return Err(self.invalid(format!(
                        "PCIe width x{width} is not a power of two in 1..={}",
                        p.max_pcie_width
                    )));
                }
                self.pcie_gen = generation;
                self.pcie_width = width;
            }
            Fault::NvlinkDown { link } => {
                if p.nvlink_count == 0 {
                    return Err(self.not_supported("NVLink"));
                }
                let Some(active) = self.nvlink.get_mut(link as usize) else {
                    return Err(self.invalid(format!(
                        "no NVLink link {link} (the GPU has {})",
                        p.nvlink_count
                    )));
                };
                *active = false;
                log.push(self.index, &self.inventory.uuid, GpuEventKind::Xid(74));
            }
            Fault::FallenOffBus => self.fall_off_bus(log),
            Fault::CoolingFailure { ambient_rise_c } => {
                if !ambient_rise_c.is_finite() || !(0.0..=150.0).contains(&ambient_rise_c) {
                    return Err(self
                        .invalid(format!("inlet rise {ambient_rise_c} °C is outside 0..=150 °C")));
                }
                self.inlet_rise_target = ambient_rise_c;
            }
            Fault::BmcPowerLimit { watts } => {
                if watts == 0 || watts > 100_000 {
                    return Err(
                        self.invalid(format!("BMC limit {watts} W is outside 1..=100000 W"))
                    );
                }
                self.bmc_limit_mw = Some(watts * 1000);
            }
            Fault::Clear => {
                self.inlet_rise_target = 0.0;
                self.bmc_limit_mw = None;
                self.storm = None;
                self.pcie_burst = None;
                self.nvlink_bursts.fill(None);
                self.pcie_gen = p.max_pcie_gen;
                self.pcie_width = p.max_pcie_width;
                self.nvlink.fill(true);
                self.remap.pending = false;
                self.remap.failed = false;
            }
        }
        Ok(())
    }

    /// `nvidia-smi -r` (the GPU is not lost; the caller checked).
    pub(crate) fn reset(&mut self) {
        let p = &self.profile;
        self.remap.pending = false;
        self.limit_mw = p.power_limit_default_mw;
        self.pending_limit = None;
        self.clock_lock = None;
        self.pcie_gen = p.max_pcie_gen;
        self.pcie_width = p.max_pcie_width;
        self.nvlink.fill(true);
        self.storm = None;
        self.pcie_burst = None;
        self.nvlink_bursts.fill(None);
        self.nvlink_errors.fill(NvlinkErrorCounters::default());
        self.ecc.volatile_corrected = 0;
        self.ecc.volatile_uncorrected = 0;
        for f in &mut self.fans {
            f.manual = None;
        }
    }
}
