//! Control properties, asserted without timing: the controller against hearth-sim in manual
//! time (the same loop as the agent's subsystem and the benchmark), and against random inputs.

use std::sync::Arc;
use std::time::Duration;

use hearth_proto::api::{CapReason, GpuPowerSettings, PowerMode, PowerSettings};
use hearth_sim::{Scenario, SimClock, SimHost, Workload};

use super::controller::{ClockCommand, Limiter, TELEMETRY_TIMEOUT_S, water_fill};
use super::task::{boot_settings, store_path};
use super::*;
use crate::gpu::sim::SimBackend;
use crate::gpu::{GpuBackend, inventory_all};
use crate::persist::Store;

/// SplitMix64, for seeded random test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn budget(w: u32) -> PowerSettings {
    PowerSettings { budget_w: Some(w), ..PowerSettings::default() }
}

/// A node of simulated GPUs in manual time, and the agent's control loop over it.
struct Loop {
    host: Arc<SimHost>,
    backend: SimBackend,
    controller: Controller,
    t: f64,
}

impl Loop {
    fn new(scenario: &Scenario) -> Self {
        let host = Arc::new(SimHost::new(scenario, SimClock::Manual));
        Self {
            backend: SimBackend::new(host.clone()),
            host,
            controller: Controller::new(PowerParams::default()),
            t: 0.0,
        }
    }

    fn inputs(&self) -> Vec<GpuInput> {
        let inv = inventory_all(&self.backend).unwrap_or_default();
        inv.iter()
            .map(|i| GpuInput::new(i, self.backend.sample(i.index).ok().as_ref(), 0.0))
            .collect()
    }

    /// One control period: sample, step, actuate, then one simulated second.
    fn period(&mut self, settings: &PowerSettings) -> Decision {
        let gpus = self.inputs();
        let d = self.controller.tick(self.t, settings, &gpus);
        let failed = actuate(&self.backend, &gpus, &d);
        assert!(failed.is_empty(), "{failed:?}");
        self.host.advance(Duration::from_secs(1));
        self.t += 1.0;
        d
    }

    /// True node power over the last second, W.
    fn true_power(&self) -> f64 {
        let node = self.host.lock();
        (0..node.gpu_count()).map(|g| node.true_power_avg_w(g).unwrap_or(0.0)).sum()
    }
}

fn check_bounds(d: &Decision, gpus: &[GpuInput]) {
    for (c, g) in d.gpus.iter().zip(gpus) {
        assert!(c.cap_w <= g.max_w + 1e-6, "GPU {} cap {} above max {}", g.index, c.cap_w, g.max_w);
        assert!(c.cap_w >= g.min_w - 1e-6, "GPU {} cap {} below min {}", g.index, c.cap_w, g.min_w);
        if let Some(mw) = c.set_limit_mw {
            let w = f64::from(mw) / 1000.0;
            assert!(w <= g.max_w + 1e-3 && w >= g.min_w - 1e-3, "GPU {} set {w} W", g.index);
        }
    }
}

#[test]
fn holds_the_budget_within_5_periods_over_100_seeded_random_budget_steps() {
    let mut rng = Rng(42);
    let scenario = Scenario::uniform("h100-sxm", 8, Workload::Training);
    let mut l = Loop::new(&scenario);
    let mut current = 5600;
    for _ in 0..20 {
        l.period(&budget(current));
    }
    for step in 0..100 {
        let previous = current;
        // 8 H100s can be held between 8 × 200 W and 8 × 700 W.
        current = rng.range(1800.0, 5600.0).round() as u32;
        let settings = budget(current);
        let b = f64::from(current);
        for period in 1..=8 {
            let gpus = l.inputs();
            let d = l.period(&settings);
            check_bounds(&d, &gpus);
            if period >= 5 {
                let p = l.true_power();
                assert!(
                    p <= 1.02 * b,
                    "step {step} ({previous} -> {current} W), period {period}: {p:.0} W"
                );
                if current < previous {
                    // A cut is not overdone: the node still uses most of the budget.
                    assert!(
                        p >= 0.88 * b,
                        "step {step} ({previous} -> {current} W), period {period}: {p:.0} W"
                    );
                }
            }
        }
    }
}

fn random_input(rng: &mut Rng, index: u32) -> GpuInput {
    let min_w = rng.range(50.0, 300.0).round();
    let max_w = (min_w + rng.range(0.0, 600.0)).round();
    let limit_w = rng.range(min_w, max_w);
    let draw_w = rng.range(0.0, max_w * 1.1);
    let enforced_w = if rng.next().is_multiple_of(5) { rng.range(10.0, limit_w) } else { limit_w };
    let util_gpu = (rng.next() % 101) as u32;
    GpuInput {
        index,
        min_w,
        max_w,
        default_w: rng.range(min_w, max_w),
        max_clock_mhz: 1980,
        t_limit_c: Some(87),
        mem_max_c: Some(95),
        fan_count: (rng.next() % 3) as u32,
        telemetry: Some(Telemetry {
            age_s: rng.range(0.0, 2.0),
            draw_w,
            limit_w,
            enforced_w,
            util_gpu,
            util_mem: (rng.next() % 101) as u32,
            temp_core_c: (25 + rng.next() % 75) as u32,
            temp_mem_c: Some((25 + rng.next() % 80) as u32),
            power_capped: rng.next().is_multiple_of(2),
            fans: (rng.next() % 3) as usize,
        }),
    }
}

#[test]
fn caps_are_never_above_max_nor_below_min() {
    let mut rng = Rng(7);
    for _case in 0..200 {
        let n = 1 + (rng.next() % 8) as u32;
        let mut c = Controller::new(PowerParams::default());
        let mut t = 0.0;
        let fixed: Vec<GpuInput> = (0..n).map(|i| random_input(&mut rng, i)).collect();
        for _ in 0..30 {
            // Same boards, new telemetry each period.
            let gpus: Vec<GpuInput> = fixed
                .iter()
                .map(|g| {
                    let mut r = random_input(&mut rng, g.index);
                    r.min_w = g.min_w;
                    r.max_w = g.max_w;
                    r.default_w = g.default_w;
                    r
                })
                .collect();
            let settings = PowerSettings {
                budget_w: match rng.next() % 4 {
                    0 => None,
                    1 => Some(1),
                    2 => Some(1_000_000),
                    _ => Some(rng.range(100.0, 6000.0) as u32),
                },
                core_target_c: (rng.next().is_multiple_of(2)).then_some(60),
                ..PowerSettings::default()
            };
            let d = c.tick(t, &settings, &gpus);
            check_bounds(&d, &gpus);
            t += rng.range(0.2, 2.0);
        }
    }
}

fn h100_input(index: u32, draw_w: f64, age_s: f64) -> GpuInput {
    GpuInput {
        index,
        min_w: 200.0,
        max_w: 700.0,
        default_w: 700.0,
        max_clock_mhz: 1980,
        t_limit_c: Some(87),
        mem_max_c: Some(95),
        fan_count: 0,
        telemetry: Some(Telemetry {
            age_s,
            draw_w,
            limit_w: 700.0,
            enforced_w: 700.0,
            util_gpu: 99,
            util_mem: 40,
            temp_core_c: 60,
            temp_mem_c: Some(62),
            power_capped: true,
            fans: 0,
        }),
    }
}

#[test]
fn failsafe_engages_when_telemetry_is_missing_for_more_than_3_s() {
    let mut c = Controller::new(PowerParams::default());
    let settings = budget(2000);
    let fresh: Vec<GpuInput> = (0..4).map(|i| h100_input(i, 690.0, 0.5)).collect();
    let d = c.tick(0.0, &settings, &fresh);
    assert_eq!(d.mode, PowerMode::Budget);

    // 2.9 s old: still controlling.
    let mut gpus = fresh.clone();
    for g in &mut gpus {
        if let Some(t) = &mut g.telemetry {
            t.age_s = 2.9;
        }
    }
    assert_eq!(c.tick(2.0, &settings, &gpus).mode, PowerMode::Budget);

    // One GPU's telemetry older than 3 s: every GPU at budget / GPUs.
    if let Some(t) = &mut gpus[2].telemetry {
        t.age_s = TELEMETRY_TIMEOUT_S + 0.1;
    }
    let d = c.tick(4.0, &settings, &gpus);
    assert_eq!(d.mode, PowerMode::Failsafe);
    for cmd in &d.gpus {
        assert_eq!(cmd.cap_w, 500.0);
        assert_eq!(cmd.reason, CapReason::Failsafe);
        assert_eq!(cmd.set_limit_mw, Some(500_000));
    }

    // No sample at all (a failing GPU): failsafe too; a budget below the minimums clamps.
    gpus[2].telemetry = None;
    let d = c.tick(6.0, &budget(400), &gpus);
    assert_eq!(d.mode, PowerMode::Failsafe);
    assert!(d.gpus.iter().all(|g| g.cap_w == 200.0), "{d:?}");

    // Telemetry back: control resumes.
    assert_eq!(c.tick(8.0, &settings, &fresh).mode, PowerMode::Budget);
}

#[test]
fn failsafe_on_the_simulator_leaves_budget_over_gpus() {
    let mut l = Loop::new(&Scenario::uniform("h100-sxm", 4, Workload::Training));
    for _ in 0..10 {
        l.period(&budget(2000));
    }
    // The sampler stops (telemetry 5 s old): the next step leaves 500 W on every GPU.
    let mut gpus = l.inputs();
    for g in &mut gpus {
        if let Some(t) = &mut g.telemetry {
            t.age_s = 5.0;
        }
    }
    let d = l.controller.tick(l.t, &budget(2000), &gpus);
    assert!(actuate(&l.backend, &gpus, &d).is_empty());
    l.host.advance(Duration::from_secs(1));
    for g in 0..4 {
        assert_eq!(l.backend.sample(g).map(|s| s.power_limit_mw).ok(), Some(500_000));
    }
}

#[test]
fn leave_safe_sets_static_caps_and_gives_clocks_back() {
    let mut s = Scenario::uniform("h100-sxm", 2, Workload::Inference);
    s.seed = 3;
    let mut l = Loop::new(&s);
    for _ in 0..5 {
        l.period(&budget(1000));
    }
    assert_eq!(l.controller.locked_clocks().len(), 2, "memory-bound GPUs are clock-locked");
    let gpus = l.inputs();
    let locked = l.controller.locked_clocks().clone();
    assert!(leave_safe(&l.backend, &budget(1000), &gpus, &locked, false).is_empty());
    l.host.advance(Duration::from_secs(2));
    for g in 0..2 {
        let sample = l.backend.sample(g).ok();
        assert_eq!(sample.as_ref().map(|s| s.power_limit_mw), Some(500_000));
        // Unlocked inference boosts again (a lock at 70 % would hold it at 1386 MHz).
        assert!(sample.is_some_and(|s| s.sm_clock_mhz > 1800), "{g}");
    }
}

#[test]
fn rate_limit_and_deadband() {
    let mut l = Limiter::default();
    l.learn(0, 700.0);
    assert_eq!(l.gate(0, 0.0, 695.0), None, "inside 1 %");
    assert_eq!(l.gate(0, 0.0, 600.0), Some(600_000));
    assert_eq!(l.gate(0, 0.5, 500.0), None, "a second change inside 1 s");
    assert_eq!(l.gate(0, 1.0, 500.0), Some(500_000));
    assert_eq!(l.gate(1, 1.0, 300.0), Some(300_000), "each GPU has its own clock");
}

#[test]
fn a_hot_gpu_is_capped_first_and_its_share_goes_to_the_others() {
    let mut c = Controller::new(PowerParams::default());
    let settings = budget(2400);
    let mut gpus: Vec<GpuInput> = (0..4).map(|i| h100_input(i, 600.0, 0.1)).collect();
    if let Some(t) = &mut gpus[0].telemetry {
        t.temp_core_c = 84; // target 87 - 8 = 79
    }
    // Over budget (2400 W drawn, 97 % of 2400 W is the limit): the cut lands on the hot GPU
    // (below what it draws), the cool ones keep more than they draw.
    let d = c.tick(0.0, &settings, &gpus);
    assert_eq!(d.gpus[0].reason, CapReason::Thermal);
    assert!(d.gpus[0].cap_w < 600.0, "{d:?}");
    assert!(d.gpus[1..].iter().all(|g| g.cap_w > 600.0), "{d:?}");
    assert!(d.allocated_w < 2800.0, "the allocation was cut: {d:?}");
}

#[test]
fn busy_gpus_get_more_than_idle_ones_and_priorities_weigh() {
    let mut c = Controller::new(PowerParams::default());
    let mut settings = budget(1800);
    let mut gpus: Vec<GpuInput> = (0..3).map(|i| h100_input(i, 640.0, 0.1)).collect();
    if let Some(t) = &mut gpus[2].telemetry {
        t.draw_w = 70.0;
        t.util_gpu = 0;
        t.power_capped = false;
    }
    let d = c.tick(0.0, &settings, &gpus);
    assert_eq!(d.gpus[2].reason, CapReason::Demand);
    assert_eq!(d.gpus[2].cap_w, 200.0, "idle: its minimum");
    assert!(d.gpus[0].cap_w > 600.0, "{d:?}");
    settings.gpus.push(GpuPowerSettings {
        index: 0,
        priority: 3,
        core_target_c: None,
        memory_target_c: None,
    });
    settings.budget_w = Some(900);
    let mut c = Controller::new(PowerParams::default());
    let d = c.tick(0.0, &settings, &gpus[..2]);
    assert!(d.gpus[0].cap_w > d.gpus[1].cap_w + 100.0, "{d:?}");
}

#[test]
fn an_outside_limit_is_respected() {
    let mut c = Controller::new(PowerParams::default());
    let mut gpus: Vec<GpuInput> = (0..2).map(|i| h100_input(i, 400.0, 0.1)).collect();
    if let Some(t) = &mut gpus[1].telemetry {
        t.enforced_w = 300.0; // a BMC holds GPU 1 at 300 W
    }
    let d = c.tick(0.0, &budget(1400), &gpus);
    assert!(d.gpus[1].cap_w <= 300.0 + 1e-9, "{d:?}");
    assert_eq!(d.gpus[1].reason, CapReason::External);
    assert_eq!(safe_cap_w(Some(1400), 2, &gpus[1]), 300.0);
}

#[test]
fn memory_bound_gpus_get_locked_clocks_only_under_a_budget() {
    let mut c = Controller::new(PowerParams::default());
    let mut g = h100_input(0, 440.0, 0.1);
    if let Some(t) = &mut g.telemetry {
        t.util_gpu = 65;
        t.util_mem = 85;
        t.power_capped = false;
    }
    let d = c.tick(0.0, &PowerSettings::default(), std::slice::from_ref(&g));
    assert_eq!(d.gpus[0].clocks, ClockCommand::Keep);
    let d = c.tick(1.0, &budget(600), std::slice::from_ref(&g));
    assert_eq!(d.gpus[0].clocks, ClockCommand::Lock(1386));
    let d = c.tick(2.0, &budget(600), std::slice::from_ref(&g));
    assert_eq!(d.gpus[0].clocks, ClockCommand::Keep, "already locked");
    let d = c.tick(3.0, &PowerSettings::default(), std::slice::from_ref(&g));
    assert_eq!(d.gpus[0].clocks, ClockCommand::Reset);
}

#[test]
fn fans_follow_a_curve_toward_the_target() {
    let mut c = Controller::new(PowerParams::default());
    let mut g = h100_input(0, 400.0, 0.1);
    g.fan_count = 2;
    if let Some(t) = &mut g.telemetry {
        t.fans = 2;
        t.temp_core_c = 79; // at the target (87 - 8)
    }
    let d = c.tick(0.0, &PowerSettings::default(), std::slice::from_ref(&g));
    assert_eq!(d.gpus[0].fans, FanCommand::Set(100));
    if let Some(t) = &mut g.telemetry {
        t.temp_core_c = 50;
    }
    let d = c.tick(1.0, &PowerSettings::default(), std::slice::from_ref(&g));
    assert_eq!(d.gpus[0].fans, FanCommand::Set(30));
}

#[test]
fn water_fill_splits_by_weight_up_to_demand() {
    let a = water_fill(1000.0, &[100.0, 100.0, 100.0], &[700.0, 700.0, 150.0], &[1.0, 1.0, 1.0]);
    assert!((a[2] - 150.0).abs() < 1e-6);
    assert!((a[0] - 425.0).abs() < 1e-6 && (a[1] - 425.0).abs() < 1e-6, "{a:?}");
    let a = water_fill(700.0, &[100.0, 100.0], &[700.0, 700.0], &[3.0, 1.0]);
    assert!((a[0] - 475.0).abs() < 1e-6 && (a[1] - 225.0).abs() < 1e-6, "{a:?}");
    let a = water_fill(100.0, &[100.0, 100.0], &[700.0, 700.0], &[1.0, 1.0]);
    assert_eq!(a, vec![100.0, 100.0], "never below the minimums");
}

#[test]
fn settings_are_validated_with_the_key_named() {
    let ok = PowerSettings { budget_w: Some(4000), core_target_c: Some(80), ..Default::default() };
    assert!(validate_settings(&ok, "gpus").is_ok());
    let bad = |s: PowerSettings, key: &str| {
        let e = validate_settings(&s, "gpus").err();
        assert_eq!(e.map(|e| e.key), Some(key.to_string()));
    };
    bad(budget(0), "budget_w");
    bad(PowerSettings { memory_target_c: Some(10), ..Default::default() }, "memory_target_c");
    let gpu = |index, priority| GpuPowerSettings {
        index,
        priority,
        core_target_c: None,
        memory_target_c: None,
    };
    bad(PowerSettings { gpus: vec![gpu(0, 1), gpu(0, 2)], ..Default::default() }, "gpus[1].index");
    bad(PowerSettings { gpus: vec![gpu(0, 101)], ..Default::default() }, "gpus[0].priority");
}

#[test]
fn boot_restores_runtime_settings_unless_the_configuration_changed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::new(store_path(dir.path()));
    let config = SettingsInput { settings: budget(5000), config: budget(5000) };
    assert_eq!(boot_settings(&store, &config), (config.clone(), 0), "nothing saved");

    // Set at runtime to 4000 W, saved as generation 3: restored at boot.
    let runtime = SettingsInput { settings: budget(4000), config: budget(5000) };
    store.save(3, &runtime)?;
    assert_eq!(boot_settings(&store, &config), (runtime, 3));

    // The configuration was edited since: it wins (and the generation continues).
    let edited = SettingsInput { settings: budget(4500), config: budget(4500) };
    assert_eq!(boot_settings(&store, &edited), (edited.clone(), 3));

    // A corrupt file: the configuration, not a crash.
    std::fs::write(store.path(), b"{ not json")?;
    assert_eq!(boot_settings(&store, &config), (config, 0));
    Ok(())
}

#[test]
fn a_bmc_limit_read_from_the_gpu_is_respected_and_its_share_goes_elsewhere() {
    let mut l = Loop::new(&Scenario::uniform("h100-sxm", 4, Workload::Training));
    assert!(l.host.lock().inject(0, hearth_sim::Fault::BmcPowerLimit { watts: 300 }).is_ok());
    let mut d = l.period(&budget(2400));
    for _ in 0..15 {
        d = l.period(&budget(2400));
    }
    assert_eq!(d.gpus[0].reason, CapReason::External, "{d:?}");
    assert!(d.gpus[0].cap_w <= 300.0 + 1e-9, "{d:?}");
    // The other three share what GPU 0 cannot use: 95 % of 2400 W less ~300 W.
    assert!(d.gpus[1..].iter().all(|g| g.cap_w > 600.0), "{d:?}");
    let p = l.true_power();
    assert!((2400.0 * 0.88..=2400.0 * 1.02).contains(&p), "{p:.0} W");
}

#[test]
fn fans_hold_a_fan_cooled_card_near_its_core_target() {
    let mut s = Scenario::uniform("rtx4090-pcie", 1, Workload::Training);
    s.seed = 9;
    let mut l = Loop::new(&s);
    let settings = PowerSettings { core_target_c: Some(70), ..PowerSettings::default() };
    let mut d = l.period(&settings);
    for _ in 0..300 {
        d = l.period(&settings);
    }
    let sample = l.backend.sample(0).ok();
    let fans = sample.as_ref().map(|s| s.fan_speed_pct.clone()).unwrap_or_default();
    assert!(fans.iter().all(|&f| f >= 90), "fans driven toward 100 % near the target: {fans:?}");
    let t = l.host.lock().true_temp_core_c(0).unwrap_or(f64::NAN);
    assert!(t <= 72.0, "die at {t:.1} °C, target 70 °C: {d:?}");
    // Leaving gives the fans back to the board's curve.
    let gpus = l.inputs();
    assert!(leave_safe(&l.backend, &settings, &gpus, &Default::default(), true).is_empty());
    l.host.advance(Duration::from_secs(30));
    let fans = l.backend.sample(0).map(|s| s.fan_speed_pct).unwrap_or_default();
    assert!(fans.iter().all(|&f| f < 90), "automatic curve again: {fans:?}");
}

#[test]
fn a_lost_gpu_is_left_out_and_a_stale_one_means_failsafe() {
    use crate::agent::{GpuEntry, GpuSnapshot};
    let mut l = Loop::new(&Scenario::uniform("h100-sxm", 3, Workload::Training));
    l.period(&budget(1500));
    let inv = inventory_all(&l.backend).unwrap_or_default();
    let entry = |i: usize, lost: bool, at: Option<u64>| GpuEntry {
        inventory: inv[i].clone(),
        sample: l.backend.sample(inv[i].index).ok(),
        sampled_at_ms: at,
        lost,
        error: None,
    };
    let snap = GpuSnapshot {
        driver: None,
        gpus: vec![
            entry(0, false, Some(9_500)),
            entry(1, true, None),
            entry(2, false, Some(9_000)),
        ],
        rounds: 5,
    };
    let gpus = super::task::inputs(&snap, 10_000);
    assert_eq!(gpus.iter().map(|g| g.index).collect::<Vec<_>>(), vec![0, 2]);
    assert_eq!(l.controller.tick(2.0, &budget(1500), &gpus).mode, PowerMode::Budget);
    // GPU 2's last sample is 3.5 s old: failsafe.
    let gpus = super::task::inputs(&snap, 12_500);
    assert_eq!(l.controller.tick(3.0, &budget(1500), &gpus).mode, PowerMode::Failsafe);
}
