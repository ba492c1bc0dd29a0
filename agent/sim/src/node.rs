//! A simulated node: GPUs stepped in fixed steps of simulated time.
//!
//! The physics of one GPU is in `gpu.rs`, the event log in `events.rs`; the model is described
//! in `docs/0002-gpu-simulator.md`.

use std::time::Duration;

use hearth_proto::gpu::{
    ComputeProcess, DriverInfo, GpuEvent, GpuInventory, GpuSample, NvlinkErrorCounters,
};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::events::EventLog;
use crate::fault::{Fault, Workload};
use crate::gpu::{Gpu, LIMIT_DELAY_MS, STEP_NS};
use crate::scenario::{Action, Scenario};

/// The physics step. `advance_to` always steps on multiples of it from time zero, so the state
/// at a time does not depend on how the advances were chunked.
pub const STEP: Duration = Duration::from_millis(10);

/// How many events the log keeps (older ones are dropped; sequence numbers go on).
pub const EVENT_LOG_CAPACITY: usize = 4096;

/// Why a simulated call fails; each maps onto an NVML return code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// No GPU with this index (NVML_ERROR_INVALID_ARGUMENT).
    #[error("no GPU {gpu} (the node has {count})")]
    NoSuchGpu {
        /// The index asked for.
        gpu: u32,
        /// How many GPUs the node has.
        count: u32,
    },
    /// The GPU fell off the bus (NVML_ERROR_GPU_IS_LOST).
    #[error("GPU {gpu} has fallen off the bus")]
    GpuLost {
        /// The GPU.
        gpu: u32,
    },
    /// An argument is out of range (NVML_ERROR_INVALID_ARGUMENT).
    #[error("GPU {gpu}: {message}")]
    InvalidArgument {
        /// The GPU.
        gpu: u32,
        /// What is wrong.
        message: String,
    },
    /// The board has no such feature (NVML_ERROR_NOT_SUPPORTED).
    #[error("GPU {gpu}: {what} is not supported on this board")]
    NotSupported {
        /// The GPU.
        gpu: u32,
        /// The feature.
        what: &'static str,
    },
}

/// A node of simulated GPUs.
///
/// One ChaCha8 generator seeded from the scenario drives every random draw (reading noise,
/// power-limit delays); each step draws the same amount for every GPU, so two nodes built from
/// the same scenario and given the same calls at the same simulated times agree exactly.
#[derive(Debug)]
pub struct SimNode {
    gpus: Vec<Gpu>,
    rng: ChaCha8Rng,
    log: EventLog,
    /// Scenario events sorted by time (stable), with the step after which each fires.
    timed: Vec<(u64, u32, Action)>,
    next_timed: usize,
    /// The latest time asked for by `advance_to`.
    now: Duration,
    /// Steps taken: the physics state is at `steps × STEP`.
    steps: u64,
}

/// The first step boundary at or after `at_s` seconds, as a step count.
fn due_step(at_s: f64) -> u64 {
    if at_s.is_nan() || at_s == f64::INFINITY {
        return u64::MAX;
    }
    if at_s <= 0.0 {
        return 0;
    }
    let ns = (at_s * 1e9).round() as u64;
    ns.div_ceil(STEP_NS)
}

impl SimNode {
    /// Build a node from a (validated) scenario, at simulated time zero.
    ///
    /// Every GPU starts in thermal equilibrium at idle power at the scenario's ambient, running
    /// its start workload. Scenario events at time zero fire at once.
    pub fn new(scenario: &Scenario) -> Self {
        let ambient = if scenario.ambient_c.is_finite() { scenario.ambient_c } else { 25.0 };
        let mut rng = ChaCha8Rng::seed_from_u64(scenario.seed);
        let log = EventLog::new();
        let mut gpus = Vec::new();
        for (i, (profile, workload)) in scenario.expanded().into_iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let mut gpu = Gpu::new(index, profile, workload, scenario.seed, ambient);
            gpu.set_background(scenario.background);
            gpus.push(gpu);
        }
        // Noise for readings at time zero.
        for g in &mut gpus {
            g.draw_noise(&mut rng);
        }
        let mut events: Vec<_> = scenario.events.iter().collect();
        events.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
        let timed =
            events.into_iter().map(|e| (due_step(e.at_s), e.gpu, e.action.clone())).collect();
        let mut node = Self { gpus, rng, log, timed, next_timed: 0, now: Duration::ZERO, steps: 0 };
        node.fire_due();
        node
    }

    /// Driver facts the simulated driver reports.
    pub fn driver(&self) -> DriverInfo {
        DriverInfo {
            driver_version: "580.95.05".into(),
            cuda_version: "13.0".into(),
            nvml_version: "13.580.95.05".into(),
        }
    }

    /// Number of GPUs (a GPU fallen off the bus still counts, as NVML still enumerates it).
    pub fn gpu_count(&self) -> u32 {
        u32::try_from(self.gpus.len()).unwrap_or(u32::MAX)
    }

    /// Simulated time since start: the latest time passed to [`Self::advance_to`]. The physics
    /// state is at the last multiple of [`STEP`] not after it.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Step the physics up to `t` (no-op when `t` is not later than now); fires scenario events.
    ///
    /// The state moves in whole steps from time zero: after this call it is at
    /// `floor(t / STEP) × STEP`, and every scenario event with `at_s` at or before that time
    /// has fired (an event fires at the first step boundary at or after its time).
    pub fn advance_to(&mut self, t: Duration) {
        if t <= self.now {
            return;
        }
        self.now = t;
        let target = u64::try_from(t.as_nanos() / u128::from(STEP_NS)).unwrap_or(u64::MAX);
        while self.steps < target {
            let k = self.steps;
            for g in &mut self.gpus {
                g.step(k, &mut self.rng, &mut self.log);
            }
            self.steps += 1;
            self.fire_due();
        }
    }

    /// Fire the scenario events due at the current step. Failures (a fault the board does not
    /// support, a lost GPU) are ignored: a scenario is a script, not a caller.
    fn fire_due(&mut self) {
        while let Some((due, gpu, action)) = self.timed.get(self.next_timed) {
            if *due > self.steps {
                break;
            }
            let (gpu, action) = (*gpu, action.clone());
            self.next_timed += 1;
            let _ = match action {
                Action::Fault(fault) => self.inject(gpu, fault),
                Action::Workload { workload } => self.set_workload(gpu, workload),
            };
        }
    }

    /// A GPU that answers calls: it exists and is not lost.
    fn gpu(&self, gpu: u32) -> Result<&Gpu, SimError> {
        let g = self
            .gpus
            .get(gpu as usize)
            .ok_or(SimError::NoSuchGpu { gpu, count: self.gpu_count() })?;
        if g.lost {
            return Err(SimError::GpuLost { gpu });
        }
        Ok(g)
    }

    fn gpu_mut(&mut self, gpu: u32) -> Result<&mut Gpu, SimError> {
        let count = self.gpu_count();
        let g = self.gpus.get_mut(gpu as usize).ok_or(SimError::NoSuchGpu { gpu, count })?;
        if g.lost {
            return Err(SimError::GpuLost { gpu });
        }
        Ok(g)
    }

    /// A GPU's fixed facts.
    pub fn inventory(&self, gpu: u32) -> Result<GpuInventory, SimError> {
        Ok(self.gpu(gpu)?.inventory.clone())
    }

    /// A GPU's reading at the current time (noise is drawn while stepping, so reads are pure).
    pub fn sample(&self, gpu: u32) -> Result<GpuSample, SimError> {
        Ok(self.gpu(gpu)?.sample())
    }

    /// Request a power limit; it takes effect 100–500 ms (seeded) of simulated time later.
    ///
    /// `InvalidArgument` outside the board's `power_limit_min_mw..=power_limit_max_mw`. A new
    /// request replaces one still waiting. [`GpuSample::power_limit_mw`] shows the request once
    /// it took effect.
    pub fn set_power_limit(&mut self, gpu: u32, mw: u32) -> Result<(), SimError> {
        self.gpu(gpu)?.check_power_limit(mw)?;
        let (lo, hi) = LIMIT_DELAY_MS;
        let delay_ms = lo + self.rng.next_u64() % (hi - lo + 1);
        let now_ns = u64::try_from(self.now.as_nanos()).unwrap_or(u64::MAX);
        let at = now_ns.saturating_add(delay_ms * 1_000_000);
        self.gpu_mut(gpu)?.pending_limit = Some((mw, at));
        Ok(())
    }

    /// Lock SM clocks to a range, MHz.
    ///
    /// `InvalidArgument` unless `min_mhz <= max_mhz` and both lie within the board's
    /// `min_sm_clock_mhz..=max_sm_clock_mhz`. The power cap and thermal slowdowns still pull the
    /// clock below the range.
    pub fn lock_clocks(&mut self, gpu: u32, min_mhz: u32, max_mhz: u32) -> Result<(), SimError> {
        self.gpu_mut(gpu)?.lock_clocks(min_mhz, max_mhz)
    }

    /// Undo [`Self::lock_clocks`].
    pub fn reset_clocks(&mut self, gpu: u32) -> Result<(), SimError> {
        self.gpu_mut(gpu)?.reset_clocks();
        Ok(())
    }

    /// Set one fan's speed in percent (manual mode); `NotSupported` on boards without fans,
    /// `InvalidArgument` for a fan the board lacks or a speed above 100.
    pub fn set_fan_speed(&mut self, gpu: u32, fan: u32, pct: u32) -> Result<(), SimError> {
        self.gpu_mut(gpu)?.set_fan_speed(fan, pct)
    }

    /// Return a fan to the board's automatic curve.
    pub fn reset_fan(&mut self, gpu: u32, fan: u32) -> Result<(), SimError> {
        self.gpu_mut(gpu)?.reset_fan(fan)
    }

    /// Change what a GPU runs.
    pub fn set_workload(&mut self, gpu: u32, workload: Workload) -> Result<(), SimError> {
        self.gpu_mut(gpu)?.workload = workload;
        Ok(())
    }

    /// What a GPU runs.
    pub fn workload(&self, gpu: u32) -> Result<Workload, SimError> {
        Ok(self.gpu(gpu)?.workload)
    }

    /// Inject a fault now.
    ///
    /// `NotSupported` for ECC and row-remap faults on boards without ECC and for NVLink faults
    /// on boards without NVLink; `InvalidArgument` for an NVLink link, PCIe generation or width
    /// the board lacks, for a storm duration outside 0..=1e7 s, an inlet rise outside
    /// 0..=150 °C and a BMC limit of 0 W; `GpuLost` on a lost GPU (even for `Clear`).
    pub fn inject(&mut self, gpu: u32, fault: Fault) -> Result<(), SimError> {
        let count = self.gpu_count();
        let g = self.gpus.get_mut(gpu as usize).ok_or(SimError::NoSuchGpu { gpu, count })?;
        if g.lost {
            return Err(SimError::GpuLost { gpu });
        }
        g.inject(&fault, &mut self.log)
    }

    /// Reset a GPU (as `nvidia-smi -r`): clears faults that a reset clears, applies a pending
    /// remap, restores default limits and clocks. A GPU that fell off the bus stays lost.
    ///
    /// In detail: the pending remap is applied (`pending` false; a failed remap stays failed),
    /// the default power limit is restored at once (a waiting request is dropped), clocks are
    /// unlocked, fans return to the automatic curve, PCIe and NVLink come back, a storm of
    /// single-bit errors ends and the volatile ECC counters restart from zero (aggregate ones
    /// stay). Conditions outside the GPU (cooling failure, BMC limit) and the workload stay.
    pub fn reset_gpu(&mut self, gpu: u32) -> Result<(), SimError> {
        self.gpu_mut(gpu)?.reset();
        Ok(())
    }

    /// The compute processes running on a GPU: one while it runs a workload, none when idle
    /// (what `nvmlDeviceGetComputeRunningProcesses` lists).
    pub fn compute_processes(&self, gpu: u32) -> Result<Vec<ComputeProcess>, SimError> {
        Ok(self.gpu(gpu)?.compute_processes())
    }

    /// Error counters of each NVLink link (empty without NVLink). A reset zeroes them.
    pub fn nvlink_errors(&self, gpu: u32) -> Result<Vec<NvlinkErrorCounters>, SimError> {
        Ok(self.gpu(gpu)?.nvlink_errors.clone())
    }

    /// Persistence mode: the simulated driver keeps every GPU initialised (enabled).
    pub fn persistence_mode(&self, gpu: u32) -> Result<bool, SimError> {
        self.gpu(gpu).map(|_| true)
    }

    /// Events with a sequence number greater than `after`, oldest first, and the newest sequence
    /// number. Each consumer keeps its own cursor; the log keeps the last 4096 events.
    ///
    /// Sequence numbers start at 1 (the newest is 0 while there are none);
    /// `events_since(u64::MAX)` returns no events and the newest number, a cursor to start from.
    pub fn events_since(&self, after: u64) -> (Vec<GpuEvent>, u64) {
        self.log.since(after)
    }

    /// Work done by a GPU since start, in full-speed-seconds (1.0 = one second at full clock and
    /// full utilisation). Benchmarks compare controllers with it.
    ///
    /// Training works at `util × f / fmax`; inference (memory-bound) at
    /// `util × min(1, f / (0.6 fmax))`, `util` being the workload's mean GPU utilisation (0.99,
    /// 0.65); idle not at all.
    pub fn work_done(&self, gpu: u32) -> Result<f64, SimError> {
        Ok(self.gpu(gpu)?.work_done)
    }

    /// True power of a GPU averaged over the last simulated second, W, without reading noise:
    /// the ground truth benchmarks judge a power controller by (a controller sees only samples).
    pub fn true_power_avg_w(&self, gpu: u32) -> Result<f64, SimError> {
        Ok(self.gpu(gpu)?.power_avg_true_w())
    }

    /// True die temperature of a GPU, °C, without reading noise or rounding (ground truth for
    /// benchmarks).
    pub fn true_temp_core_c(&self, gpu: u32) -> Result<f64, SimError> {
        Ok(self.gpu(gpu)?.t_die)
    }

    /// A GPU's current work rate in full-speed units (work done per simulated second now).
    pub fn throughput(&self, gpu: u32) -> Result<f64, SimError> {
        Ok(self.gpu(gpu)?.rate)
    }

    /// Internal state for the crate's tests.
    #[cfg(test)]
    pub(crate) fn gpu_state(&self, gpu: u32) -> &Gpu {
        &self.gpus[gpu as usize]
    }
}
