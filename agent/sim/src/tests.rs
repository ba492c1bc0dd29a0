//! The crate's tests: physics, faults, events, determinism. Deterministic and fast (simulated
//! time only).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use hearth_proto::gpu::{GpuEventKind, GpuSample, ThrottleReasons};

use crate::gpu::{COOLING_TAU_S, SBE_EVENTS_PER_S};
use crate::{EVENT_LOG_CAPACITY, Fault, GpuProfile, STEP, Scenario, SimError, SimNode, Workload};

const H100: &str = "h100-sxm";
const RTX: &str = "rtx4090-pcie";

fn node(profile: &str, n: u32, workload: Workload) -> SimNode {
    SimNode::new(&Scenario::uniform(profile, n, workload))
}

fn seeded(profile: &str, n: u32, workload: Workload, seed: u64) -> SimNode {
    let mut s = Scenario::uniform(profile, n, workload);
    s.seed = seed;
    SimNode::new(&s)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Advance by `s` seconds from now.
fn run(n: &mut SimNode, s: f64) {
    let t = n.now() + secs(s);
    n.advance_to(t);
}

fn sample(n: &SimNode, gpu: u32) -> GpuSample {
    n.sample(gpu).unwrap()
}

fn has(s: &GpuSample, mask: u64) -> bool {
    s.throttle.contains(mask)
}

fn kinds(n: &SimNode, gpu: u32) -> Vec<GpuEventKind> {
    n.events_since(0).0.into_iter().filter(|e| e.gpu == gpu).map(|e| e.kind).collect()
}

fn within(actual: f64, expected: f64, rel: f64) -> bool {
    (actual - expected).abs() <= expected.abs() * rel
}

// ---------------------------------------------------------------- inventory and identity

#[test]
fn inventory_has_nvml_formats_and_profile_facts() -> Result<(), SimError> {
    let n = node(H100, 8, Workload::Idle);
    assert_eq!(n.gpu_count(), 8);
    let d = n.driver();
    assert_eq!(
        (d.driver_version.as_str(), d.cuda_version.as_str(), d.nvml_version.as_str()),
        ("580.95.05", "13.0", "13.580.95.05")
    );
    let mut buses = Vec::new();
    let mut uuids = Vec::new();
    for i in 0..8 {
        let inv = n.inventory(i)?;
        assert_eq!(inv.index, i);
        let groups: Vec<&str> = inv.uuid.trim_start_matches("GPU-").split('-').collect();
        assert!(inv.uuid.starts_with("GPU-"), "{}", inv.uuid);
        assert_eq!(groups.iter().map(|g| g.len()).collect::<Vec<_>>(), vec![8, 4, 4, 4, 12]);
        assert!(
            groups
                .iter()
                .all(|g| g.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))),
            "{}",
            inv.uuid
        );
        let serial = inv.serial.clone().unwrap();
        assert_eq!(serial.len(), 13);
        assert!(serial.chars().all(|c| c.is_ascii_digit()));
        assert_eq!(inv.pci_bus_id.len(), 16);
        assert!(inv.pci_bus_id.starts_with("00000000:") && inv.pci_bus_id.ends_with(":00.0"));
        buses.push(inv.pci_bus_id.clone());
        uuids.push(inv.uuid.clone());
        assert_eq!(inv.name, "NVIDIA H100 80GB HBM3");
        assert_eq!(
            (inv.power_limit_min_mw, inv.power_limit_max_mw, inv.power_limit_default_mw),
            (200_000, 700_000, 700_000)
        );
        assert_eq!((inv.max_pcie_gen, inv.max_pcie_width, inv.nvlink_count), (5, 16, 18));
        assert_eq!(inv.fan_count, 0);
        assert_eq!(inv.slowdown_temp_c, Some(89));
        assert_eq!(inv.shutdown_temp_c, Some(95));
        assert_eq!(inv.max_operating_temp_c, Some(87));
        assert_eq!(inv.max_memory_temp_c, Some(95));
        assert_eq!(inv.max_sm_clock_mhz, 1980);
    }
    buses.sort();
    buses.dedup();
    assert_eq!(buses.len(), 8, "bus ids are distinct");
    uuids.sort();
    uuids.dedup();
    assert_eq!(uuids.len(), 8, "uuids are distinct");

    let g = node(RTX, 1, Workload::Idle);
    let inv = g.inventory(0)?;
    assert_eq!(inv.serial, None, "GeForce boards report no serial");
    assert_eq!((inv.fan_count, inv.nvlink_count), (2, 0));
    assert_eq!(inv.max_memory_temp_c, None);
    Ok(())
}

#[test]
fn identity_is_deterministic_per_seed() -> Result<(), SimError> {
    let a = seeded(H100, 4, Workload::Idle, 7);
    let b = seeded(H100, 4, Workload::Idle, 7);
    let c = seeded(H100, 4, Workload::Idle, 8);
    for i in 0..4 {
        assert_eq!(a.inventory(i)?, b.inventory(i)?);
        assert_ne!(a.inventory(i)?.uuid, c.inventory(i)?.uuid);
        assert_ne!(a.inventory(i)?.serial, c.inventory(i)?.serial);
    }
    Ok(())
}

#[test]
fn unknown_gpu_is_an_error() {
    let mut n = node(H100, 2, Workload::Idle);
    let no = SimError::NoSuchGpu { gpu: 2, count: 2 };
    assert_eq!(n.inventory(2), Err(no.clone()));
    assert_eq!(n.sample(2), Err(no.clone()));
    assert_eq!(n.set_power_limit(2, 300_000), Err(no.clone()));
    assert_eq!(n.lock_clocks(2, 500, 600), Err(no.clone()));
    assert_eq!(n.reset_clocks(2), Err(no.clone()));
    assert_eq!(n.set_fan_speed(2, 0, 50), Err(no.clone()));
    assert_eq!(n.reset_fan(2, 0), Err(no.clone()));
    assert_eq!(n.set_workload(2, Workload::Training), Err(no.clone()));
    assert_eq!(n.inject(2, Fault::Clear), Err(no.clone()));
    assert_eq!(n.reset_gpu(2), Err(no.clone()));
    assert_eq!(n.work_done(2), Err(no.clone()));
    assert_eq!(n.throughput(2), Err(no));
}

// ---------------------------------------------------------------- thermal

#[test]
fn starts_in_idle_thermal_equilibrium() -> Result<(), SimError> {
    for (profile, r_total) in [(H100, 0.065), (RTX, 0.030 + 0.060 * 2.4)] {
        let mut s = Scenario::uniform(profile, 1, Workload::Training);
        s.ambient_c = 30.0;
        let n = SimNode::new(&s);
        let p = GpuProfile::by_id(profile).unwrap();
        let idle_w = f64::from(p.idle_power_mw) / 1000.0;
        let g = n.gpu_state(0);
        assert!((g.t_die - (30.0 + idle_w * r_total)).abs() < 1e-6, "{profile}: {}", g.t_die);
        assert!((g.t_sink - (g.t_die - idle_w * p.r_die_k_per_w)).abs() < 1e-6);
    }
    // An idle GPU stays where it started.
    let mut n = node(H100, 1, Workload::Idle);
    let t0 = n.gpu_state(0).t_die;
    run(&mut n, 120.0);
    assert!((n.gpu_state(0).t_die - t0).abs() < 0.01);
    let s = sample(&n, 0);
    assert!((29..=31).contains(&s.temp_core_c), "{}", s.temp_core_c);
    Ok(())
}

#[test]
fn steady_state_temperature_matches_thermal_resistance() {
    // H100 training, held at its 700 W limit; no fans: full airflow.
    let mut n = node(H100, 1, Workload::Training);
    run(&mut n, 600.0);
    let g = n.gpu_state(0);
    let expected = 25.0 + g.power_w * (0.015 + 0.050);
    assert!((g.power_w - 700.0).abs() < 1.0, "{}", g.power_w);
    assert!((g.t_die - expected).abs() < 0.5, "die {} vs {expected}", g.t_die);
    let s = sample(&n, 0);
    assert!((f64::from(s.temp_core_c) - expected).abs() <= 2.0, "{} vs {expected}", s.temp_core_c);

    // RTX 4090 with fans at 100 %: r_sink at full airflow.
    let mut n = node(RTX, 1, Workload::Training);
    n.set_fan_speed(0, 0, 100).unwrap();
    n.set_fan_speed(0, 1, 100).unwrap();
    run(&mut n, 600.0);
    let g = n.gpu_state(0);
    let expected = 25.0 + g.power_w * (0.030 + 0.060);
    assert!((g.t_die - expected).abs() < 0.5, "die {} vs {expected}", g.t_die);
}

/// Time for `f` to reach 63 % of the way from its start to its value after `total` seconds.
fn time_to_63(n: &mut SimNode, total: f64, f: impl Fn(&SimNode) -> f64) -> f64 {
    let start = f(n);
    let mut trace = Vec::new();
    let steps = (total / 0.1) as usize;
    for i in 1..=steps {
        run(n, 0.1);
        trace.push((i as f64 * 0.1, f(n)));
    }
    let end = f(n);
    let target = start + 0.632 * (end - start);
    trace.iter().find(|(_, v)| *v >= target).map(|(t, _)| *t).unwrap()
}

#[test]
fn die_stage_time_constant_is_seconds() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Idle);
    n.set_workload(0, Workload::Training)?;
    // The die stage: die minus heatsink. Its final rise is ΔP × r_die.
    let t = time_to_63(&mut n, 30.0, |n| {
        let g = n.gpu_state(0);
        g.t_die - g.t_sink
    });
    assert!((2.5..=6.0).contains(&t), "die stage 63 % after {t} s (tau_die 4 s)");
    let g = n.gpu_state(0);
    // Below P × r_die by tau_die × (heatsink warming rate) while the heatsink still warms.
    assert!(((g.t_die - g.t_sink) - 700.0 * 0.015).abs() < 2.0, "{}", g.t_die - g.t_sink);
    Ok(())
}

#[test]
fn heatsink_time_constant_is_about_a_minute() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Idle);
    n.set_workload(0, Workload::Training)?;
    let t = time_to_63(&mut n, 600.0, |n| n.gpu_state(0).t_sink);
    assert!((45.0..=80.0).contains(&t), "heatsink 63 % after {t} s (tau_sink 60 s)");
    Ok(())
}

#[test]
fn hbm_runs_above_die_with_memory_load() {
    let mut n = SimNode::new(&Scenario {
        gpus: vec![
            crate::scenario::GpuSpec { profile: H100.into(), count: 1, workload: Workload::Idle },
            crate::scenario::GpuSpec {
                profile: H100.into(),
                count: 1,
                workload: Workload::Training,
            },
            crate::scenario::GpuSpec {
                profile: H100.into(),
                count: 1,
                workload: Workload::Inference,
            },
        ],
        ..Scenario::uniform(H100, 1, Workload::Idle)
    });
    run(&mut n, 60.0);
    let offsets: Vec<f64> = (0..3)
        .map(|i| {
            let g = n.gpu_state(i);
            g.t_hbm() - g.t_die
        })
        .collect();
    assert!(offsets[0].abs() < 0.01, "{offsets:?}");
    assert!((offsets[1] - 6.0 * 0.40).abs() < 0.05, "{offsets:?}");
    assert!((offsets[2] - 6.0 * 0.85).abs() < 0.05, "{offsets:?}");
    let s = sample(&n, 2);
    let mem = s.temp_memory_c.unwrap();
    assert!(mem > s.temp_core_c, "{mem} vs {}", s.temp_core_c);
    let r = node(RTX, 1, Workload::Inference);
    assert_eq!(sample(&r, 0).temp_memory_c, None);
}

#[test]
fn thermal_margin_is_distance_to_t_limit() {
    let mut n = node(H100, 1, Workload::Training);
    run(&mut n, 120.0);
    let s = sample(&n, 0);
    assert_eq!(s.thermal_margin_c, Some(87 - s.temp_core_c as i32));
    assert!(s.thermal_margin_c.unwrap() > 15);
}

// ---------------------------------------------------------------- power and clocks

#[test]
fn power_cap_binds_at_default_and_reduced_limits() -> Result<(), SimError> {
    let mut a = node(H100, 1, Workload::Training);
    let mut b = node(H100, 1, Workload::Training);
    b.set_power_limit(0, 400_000)?;
    run(&mut a, 2.0);
    run(&mut b, 2.0);
    let (sa, sb) = (sample(&a, 0), sample(&b, 0));
    assert!(within(f64::from(sa.power_avg_mw), 700_000.0, 0.03), "{}", sa.power_avg_mw);
    assert!(within(f64::from(sb.power_avg_mw), 400_000.0, 0.03), "{}", sb.power_avg_mw);
    assert!(has(&sa, ThrottleReasons::SW_POWER_CAP) && has(&sb, ThrottleReasons::SW_POWER_CAP));
    assert!(!has(&sb, ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN));
    assert!(sb.sm_clock_mhz < sa.sm_clock_mhz, "{} vs {}", sb.sm_clock_mhz, sa.sm_clock_mhz);
    // The clock solves idle + (full - idle) * util * (f / fmax)^2.5 = limit.
    let expected = 1980.0 * ((400.0f64 - 70.0) / (760.0 - 70.0)).powf(0.4);
    assert!((f64::from(sb.sm_clock_mhz) - expected).abs() <= 1.0, "{}", sb.sm_clock_mhz);
    assert_eq!((sb.power_limit_mw, sb.enforced_power_limit_mw), (400_000, 400_000));
    // Inference at 700 W is below the cap: full clock, no reason.
    let mut c = node(H100, 1, Workload::Inference);
    run(&mut c, 2.0);
    let sc = sample(&c, 0);
    assert_eq!(sc.sm_clock_mhz, 1980);
    assert_eq!(sc.throttle, ThrottleReasons(0));
    Ok(())
}

#[test]
fn power_limit_takes_effect_after_a_delay() -> Result<(), SimError> {
    for seed in 1..=12 {
        let mut n = seeded(H100, 1, Workload::Training, seed);
        run(&mut n, 3.0);
        n.set_power_limit(0, 400_000)?;
        run(&mut n, 0.09);
        let s = sample(&n, 0);
        assert!(s.power_instant_mw.unwrap() > 600_000, "seed {seed}: {:?}", s.power_instant_mw);
        assert_eq!(s.power_limit_mw, 700_000, "the request has not taken effect yet");
        run(&mut n, 0.51);
        let s = sample(&n, 0);
        assert!(s.power_instant_mw.unwrap() <= 408_500, "seed {seed}: {:?}", s.power_instant_mw);
        assert!(n.gpu_state(0).power_w <= 400.5, "seed {seed}: {}", n.gpu_state(0).power_w);
        assert_eq!(s.power_limit_mw, 400_000);
    }
    Ok(())
}

/// The delay of each of `count` requests, in ms, on a node with `seed`.
fn limit_delays(seed: u64, count: usize) -> Vec<u64> {
    let mut n = seeded(H100, 1, Workload::Idle, seed);
    let mut out = Vec::new();
    for i in 0..count {
        let mw = if i % 2 == 0 { 300_000 } else { 500_000 };
        n.set_power_limit(0, mw).unwrap();
        let mut waited = 0;
        while sample(&n, 0).power_limit_mw != mw {
            run(&mut n, 0.01);
            waited += 10;
            assert!(waited <= 1000);
        }
        out.push(waited);
    }
    out
}

#[test]
fn limit_delays_are_seeded_and_span_100_to_500_ms() {
    let a = limit_delays(3, 40);
    assert!(a.iter().all(|d| (100..=510).contains(d)), "{a:?}");
    assert!(a.iter().min().unwrap() < &200 && a.iter().max().unwrap() > &400, "{a:?}");
    assert_eq!(a, limit_delays(3, 40));
    assert_ne!(a, limit_delays(4, 40));
}

#[test]
fn invalid_power_limits_are_rejected() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    for mw in [0, 199_999, 700_001, u32::MAX] {
        assert!(matches!(n.set_power_limit(0, mw), Err(SimError::InvalidArgument { gpu: 0, .. })));
    }
    n.set_power_limit(0, 200_000)?;
    n.set_power_limit(0, 700_000)?;
    run(&mut n, 1.0);
    assert_eq!(sample(&n, 0).power_limit_mw, 700_000);
    let mut r = node(RTX, 1, Workload::Training);
    assert!(r.set_power_limit(0, 149_999).is_err());
    r.set_power_limit(0, 600_000)?;
    Ok(())
}

#[test]
fn a_new_request_replaces_a_waiting_one() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    n.set_power_limit(0, 300_000)?;
    n.set_power_limit(0, 500_000)?;
    run(&mut n, 1.0);
    assert_eq!(sample(&n, 0).power_limit_mw, 500_000);
    Ok(())
}

#[test]
fn locked_clocks_cap_the_sm_clock() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    n.lock_clocks(0, 1000, 1200)?;
    run(&mut n, 1.0);
    let s = sample(&n, 0);
    assert_eq!(s.sm_clock_mhz, 1200);
    assert_eq!(s.throttle, ThrottleReasons(0), "a lock sets no reason");
    assert!(s.power_avg_mw < 300_000);
    n.reset_clocks(0)?;
    run(&mut n, 1.0);
    assert_eq!(sample(&n, 0).sm_clock_mhz, 1909);

    // An idle GPU with locked clocks holds the lock's floor.
    n.set_workload(0, Workload::Idle)?;
    n.lock_clocks(0, 1000, 1200)?;
    run(&mut n, 1.0);
    assert_eq!(sample(&n, 0).sm_clock_mhz, 1000);

    for (lo, hi) in [(1200, 1000), (344, 1000), (1000, 1981), (0, 0)] {
        assert!(
            matches!(n.lock_clocks(0, lo, hi), Err(SimError::InvalidArgument { .. })),
            "{lo}..{hi}"
        );
    }
    n.lock_clocks(0, 345, 1980)?;
    n.lock_clocks(0, 1500, 1500)?;
    Ok(())
}

#[test]
fn clocks_settle_within_100_ms() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Idle);
    run(&mut n, 1.0);
    n.set_workload(0, Workload::Training)?;
    run(&mut n, 0.1);
    assert!((i64::from(sample(&n, 0).sm_clock_mhz) - 1909).abs() <= 2);
    n.lock_clocks(0, 600, 600)?;
    run(&mut n, 0.1);
    assert!((i64::from(sample(&n, 0).sm_clock_mhz) - 600).abs() <= 2);
    Ok(())
}

#[test]
fn one_second_average_lags_the_instant_value() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Idle);
    run(&mut n, 5.0);
    let s = sample(&n, 0);
    assert!(within(f64::from(s.power_avg_mw), 70_000.0, 0.021));
    n.set_workload(0, Workload::Training)?;
    run(&mut n, 0.2);
    let s = sample(&n, 0);
    let instant = f64::from(s.power_instant_mw.unwrap());
    assert!(instant > 650_000.0, "{instant}");
    assert!(f64::from(s.power_avg_mw) < 0.5 * instant, "{} vs {instant}", s.power_avg_mw);
    // The mean of the last second of true power, exactly (before noise).
    let g = n.gpu_state(0);
    assert!(within(f64::from(s.power_avg_mw) / 1000.0, g.power_avg_true_w(), 0.0201));
    run(&mut n, 1.0);
    let s = sample(&n, 0);
    assert!(within(f64::from(s.power_avg_mw), 700_000.0, 0.03), "{}", s.power_avg_mw);
    // Energy integrates true power: about 5 s idle + 1.2 s at ~700 W.
    let e = s.energy_mj as f64 / 1000.0;
    assert!((5.0 * 70.0 + 1.2 * 700.0 - e).abs() < 40.0, "{e} J");
    Ok(())
}

#[test]
fn noise_is_bounded_and_present() {
    let mut n = node(H100, 1, Workload::Training);
    run(&mut n, 5.0);
    let mut powers = Vec::new();
    let mut temps = Vec::new();
    for _ in 0..300 {
        run(&mut n, 0.01);
        let s = sample(&n, 0);
        let g = n.gpu_state(0);
        let avg = g.power_avg_true_w() * 1000.0;
        let inst = g.power_w * 1000.0;
        assert!(within(f64::from(s.power_avg_mw), avg, 0.0201), "{} vs {avg}", s.power_avg_mw);
        let pi = f64::from(s.power_instant_mw.unwrap());
        assert!(within(pi, inst, 0.0201), "{pi} vs {inst}");
        let t = f64::from(s.temp_core_c);
        assert!((t - g.t_die).abs() <= 0.02 * g.t_die + 0.5, "{t} vs {}", g.t_die);
        let hbm = f64::from(s.temp_memory_c.unwrap());
        assert!((hbm - g.t_hbm()).abs() <= 0.02 * g.t_hbm() + 0.5);
        powers.push(s.power_avg_mw);
        temps.push(s.temp_core_c);
    }
    powers.sort();
    powers.dedup();
    temps.sort();
    temps.dedup();
    assert!(powers.len() > 100, "power readings vary: {}", powers.len());
    assert!(temps.len() >= 2, "temperature readings vary: {temps:?}");
    // Noise spans most of ±2 %.
    let (lo, hi) = (powers[0], powers[powers.len() - 1]);
    assert!(f64::from(hi - lo) > 0.03 * 700_000.0, "{lo}..{hi}");
}

#[test]
fn readings_stay_physical() {
    let mut s = Scenario::uniform(H100, 4, Workload::Training);
    s.ambient_c = 5.0;
    s.gpus.push(crate::scenario::GpuSpec {
        profile: RTX.into(),
        count: 2,
        workload: Workload::Inference,
    });
    let mut n = SimNode::new(&s);
    n.inject(1, Fault::CoolingFailure { ambient_rise_c: 40.0 }).unwrap();
    n.set_workload(2, Workload::Idle).unwrap();
    for _ in 0..1200 {
        run(&mut n, 0.1);
        for i in 0..6 {
            let Ok(s) = n.sample(i) else { continue };
            let full = if i < 4 { 760_000 } else { 480_000 };
            assert!(s.power_avg_mw <= full && s.power_instant_mw.unwrap() <= full);
            assert!(s.temp_core_c >= 3, "{}", s.temp_core_c);
            assert!(s.util_gpu_pct <= 100 && s.util_mem_pct <= 100);
            assert!(s.fan_speed_pct.iter().all(|f| *f <= 100));
        }
    }
}

// ---------------------------------------------------------------- workloads

#[test]
fn idle_workload_readings() {
    let mut n = node(H100, 1, Workload::Idle);
    run(&mut n, 3.0);
    let s = sample(&n, 0);
    assert_eq!((s.util_gpu_pct, s.util_mem_pct, s.compute_processes), (0, 0, 0));
    assert_eq!(s.throttle, ThrottleReasons(ThrottleReasons::GPU_IDLE));
    assert_eq!(s.sm_clock_mhz, 345);
    assert!(within(f64::from(s.power_avg_mw), 70_000.0, 0.021));
    assert!(s.memory_used_bytes > 0 && s.memory_used_bytes < 1024 * 1024 * 1024);
    assert_eq!(n.throughput(0), Ok(0.0));
    assert_eq!(n.work_done(0), Ok(0.0));
}

#[test]
fn training_and_inference_readings() {
    let mut t = node(H100, 1, Workload::Training);
    let mut i = node(H100, 1, Workload::Inference);
    run(&mut t, 2.0);
    run(&mut i, 2.0);
    let total = GpuProfile::h100_sxm().memory_total_bytes;
    let mut seen_t = Vec::new();
    for _ in 0..100 {
        run(&mut t, 0.01);
        run(&mut i, 0.01);
        let (st, si) = (sample(&t, 0), sample(&i, 0));
        assert!((98..=100).contains(&st.util_gpu_pct) && (38..=42).contains(&st.util_mem_pct));
        assert!((60..=70).contains(&si.util_gpu_pct) && (80..=90).contains(&si.util_mem_pct));
        assert_eq!((st.compute_processes, si.compute_processes), (1, 1));
        assert!(st.memory_used_bytes > total * 8 / 10 && st.memory_used_bytes < total);
        assert!(si.memory_used_bytes > total / 2 && si.memory_used_bytes < st.memory_used_bytes);
        assert!(si.power_avg_mw < st.power_avg_mw * 3 / 4);
        assert!(!has(&st, ThrottleReasons::GPU_IDLE) && !has(&si, ThrottleReasons::GPU_IDLE));
        seen_t.push(st.util_gpu_pct);
    }
    seen_t.sort();
    seen_t.dedup();
    assert!(seen_t.len() > 1, "utilisation jitters");
}

#[test]
fn work_done_integrates_the_rate() -> Result<(), SimError> {
    let mut n = node(H100, 2, Workload::Training);
    n.set_workload(1, Workload::Inference)?;
    run(&mut n, 10.0);
    // Training: util (0.99) × f / fmax.
    let rate = 0.99 * (630.0f64 / 690.0).powf(0.4);
    assert!((n.throughput(0)? - rate).abs() < 0.001);
    assert!((n.work_done(0)? - 10.0 * rate).abs() < 0.05, "{}", n.work_done(0)?);
    // Inference: util (0.65) × min(1, f / (0.6 fmax)).
    assert!((n.throughput(1)? - 0.65).abs() < 1e-9);
    assert!((n.work_done(1)? - 6.5).abs() < 0.05);
    // Memory-bound work does not slow down until the clock falls below 0.6 fmax.
    n.lock_clocks(1, 1188, 1188)?;
    run(&mut n, 1.0);
    assert!((n.throughput(1)? - 0.65).abs() < 1e-9);
    n.lock_clocks(1, 990, 990)?;
    run(&mut n, 1.0);
    assert!((n.throughput(1)? - 0.65 * 990.0 / 1188.0).abs() < 1e-9);
    Ok(())
}

#[test]
fn inference_loses_much_less_work_than_training_under_a_cap() -> Result<(), SimError> {
    let mut s = Scenario::uniform(H100, 2, Workload::Training);
    s.gpus.push(crate::scenario::GpuSpec {
        profile: H100.into(),
        count: 2,
        workload: Workload::Inference,
    });
    let mut n = SimNode::new(&s);
    n.set_power_limit(1, 300_000)?;
    n.set_power_limit(3, 300_000)?;
    run(&mut n, 60.0);
    let loss = |full: f64, capped: f64| 1.0 - capped / full;
    let training = loss(n.work_done(0)?, n.work_done(1)?);
    let inference = loss(n.work_done(2)?, n.work_done(3)?);
    assert!(training > 0.25, "training loses {training}");
    assert!(inference < 0.10, "inference loses {inference}");
    assert!(training > 3.0 * inference, "{training} vs {inference}");
    Ok(())
}

// ---------------------------------------------------------------- fans

#[test]
fn fans_follow_the_automatic_curve() -> Result<(), SimError> {
    let mut n = node(RTX, 1, Workload::Idle);
    run(&mut n, 10.0);
    assert_eq!(sample(&n, 0).fan_speed_pct, vec![30, 30]);
    n.set_workload(0, Workload::Training)?;
    run(&mut n, 300.0);
    let s = sample(&n, 0);
    assert!(s.fan_speed_pct.iter().all(|f| *f > 60), "{:?}", s.fan_speed_pct);
    assert!((70..=80).contains(&s.temp_core_c), "{}", s.temp_core_c);
    n.set_workload(0, Workload::Idle)?;
    run(&mut n, 600.0);
    assert_eq!(sample(&n, 0).fan_speed_pct, vec![30, 30]);
    Ok(())
}

#[test]
fn manual_fan_speed_lowers_and_raises_temperature() -> Result<(), SimError> {
    let mut auto = node(RTX, 1, Workload::Training);
    let mut fast = node(RTX, 1, Workload::Training);
    let mut slow = node(RTX, 1, Workload::Training);
    for fan in 0..2 {
        fast.set_fan_speed(0, fan, 100)?;
        slow.set_fan_speed(0, fan, 30)?;
    }
    for n in [&mut auto, &mut fast, &mut slow] {
        run(n, 600.0);
    }
    let t = |n: &SimNode| n.gpu_state(0).t_die;
    assert!(t(&fast) + 5.0 < t(&auto), "{} vs {}", t(&fast), t(&auto));
    assert!(t(&auto) + 5.0 < t(&slow), "{} vs {}", t(&auto), t(&slow));
    assert_eq!(sample(&fast, 0).fan_speed_pct, vec![100, 100]);
    assert_eq!(sample(&slow, 0).fan_speed_pct, vec![30, 30]);
    // At 30 % the card runs into T.Limit and the driver holds it there.
    let s = sample(&slow, 0);
    assert!(has(&s, ThrottleReasons::SW_THERMAL_SLOWDOWN), "{:?}", s.throttle.names());
    assert!((t(&slow) - 83.0).abs() < 0.5, "{}", t(&slow));
    // Back to automatic.
    slow.reset_fan(0, 0)?;
    slow.reset_fan(0, 1)?;
    run(&mut slow, 60.0);
    assert!(sample(&slow, 0).fan_speed_pct.iter().all(|f| *f > 80));
    Ok(())
}

#[test]
fn fan_control_is_validated() {
    let mut h = node(H100, 1, Workload::Idle);
    assert!(sample(&h, 0).fan_speed_pct.is_empty());
    assert!(matches!(h.set_fan_speed(0, 0, 50), Err(SimError::NotSupported { gpu: 0, .. })));
    assert!(matches!(h.reset_fan(0, 0), Err(SimError::NotSupported { .. })));
    let mut r = node(RTX, 1, Workload::Idle);
    assert!(matches!(r.set_fan_speed(0, 2, 50), Err(SimError::InvalidArgument { .. })));
    assert!(matches!(r.set_fan_speed(0, 0, 101), Err(SimError::InvalidArgument { .. })));
    assert!(matches!(r.reset_fan(0, 2), Err(SimError::InvalidArgument { .. })));
    assert_eq!(r.set_fan_speed(0, 1, 0), Ok(()));
}

// ---------------------------------------------------------------- thermal protections

#[test]
fn cooling_failure_ramps_the_inlet_over_about_30_s() -> Result<(), SimError> {
    let mut n = node(H100, 2, Workload::Idle);
    n.inject(0, Fault::CoolingFailure { ambient_rise_c: 20.0 })?;
    run(&mut n, COOLING_TAU_S);
    let rise = n.gpu_state(0).inlet_rise;
    assert!((rise - 20.0 * 0.632).abs() < 0.3, "{rise}");
    assert_eq!(n.gpu_state(1).inlet_rise, 0.0, "only this GPU");
    run(&mut n, 600.0);
    let g = n.gpu_state(0);
    assert!((g.t_die - (45.0 + 70.0 * 0.065)).abs() < 0.5, "{}", g.t_die);
    n.inject(0, Fault::Clear)?;
    run(&mut n, 600.0);
    assert!(n.gpu_state(0).inlet_rise < 0.01);
    for bad in [-1.0, f64::NAN, f64::INFINITY, 151.0] {
        assert!(matches!(
            n.inject(0, Fault::CoolingFailure { ambient_rise_c: bad }),
            Err(SimError::InvalidArgument { .. })
        ));
    }
    Ok(())
}

#[test]
fn sw_thermal_slowdown_holds_t_limit() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    // 700 W over a 60 °C inlet would settle at 105 °C.
    n.inject(0, Fault::CoolingFailure { ambient_rise_c: 35.0 })?;
    let mut hottest: f64 = 0.0;
    for _ in 0..6000 {
        run(&mut n, 0.1);
        hottest = hottest.max(n.gpu_state(0).t_die);
    }
    let s = sample(&n, 0);
    assert!(has(&s, ThrottleReasons::SW_THERMAL_SLOWDOWN), "{:?}", s.throttle.names());
    assert!(!has(&s, ThrottleReasons::SW_POWER_CAP), "{:?}", s.throttle.names());
    assert!(!has(&s, ThrottleReasons::HW_SLOWDOWN));
    assert!((n.gpu_state(0).t_die - 87.0).abs() < 0.3, "{}", n.gpu_state(0).t_die);
    assert!(hottest < 88.0, "{hottest}");
    // Steady state: (87 - 60) / 0.065 = 415 W, the clock that draws it.
    let expected = 1980.0 * ((415.4 - 70.0) / 690.0f64).powf(0.4);
    assert!((f64::from(s.sm_clock_mhz) - expected).abs() < 5.0, "{}", s.sm_clock_mhz);
    // Cooling comes back: the slowdown releases.
    n.inject(0, Fault::Clear)?;
    run(&mut n, 600.0);
    let s = sample(&n, 0);
    assert!(!has(&s, ThrottleReasons::SW_THERMAL_SLOWDOWN), "{:?}", s.throttle.names());
    assert_eq!(s.sm_clock_mhz, 1909);
    Ok(())
}

#[test]
fn hw_slowdown_under_a_big_cooling_failure() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    // Inlet 86 °C: even the lowest clock (~79 W) settles the die at ~91 °C.
    n.inject(0, Fault::CoolingFailure { ambient_rise_c: 61.0 })?;
    let mut slowed_at = None;
    for i in 0..6000 {
        run(&mut n, 0.1);
        let s = sample(&n, 0);
        let hw = ThrottleReasons::HW_SLOWDOWN | ThrottleReasons::HW_THERMAL_SLOWDOWN;
        if has(&s, hw) && slowed_at.is_none() {
            slowed_at = Some(i);
            assert!(n.gpu_state(0).t_die >= 89.0);
            assert!(s.sm_clock_mhz <= 990, "{}", s.sm_clock_mhz);
        }
    }
    assert!(slowed_at.is_some(), "HW slowdown engaged");
    let s = sample(&n, 0);
    assert!(has(&s, ThrottleReasons::HW_SLOWDOWN | ThrottleReasons::HW_THERMAL_SLOWDOWN));
    assert!(s.thermal_margin_c.unwrap() <= 0, "{:?}", s.thermal_margin_c);
    // Released with hysteresis once the die is 2 °C below the threshold.
    n.inject(0, Fault::Clear)?;
    let mut released = false;
    for _ in 0..6000 {
        run(&mut n, 0.1);
        let g = n.gpu_state(0);
        if !g.hw_slowdown {
            assert!(g.t_die < 88.0, "{}", g.t_die);
            released = true;
            break;
        }
    }
    assert!(released);
    Ok(())
}

#[test]
fn overheating_shuts_the_gpu_down() -> Result<(), SimError> {
    let mut n = node(H100, 2, Workload::Training);
    let uuid = n.inventory(0)?.uuid;
    n.inject(0, Fault::CoolingFailure { ambient_rise_c: 80.0 })?;
    let cursor = n.events_since(u64::MAX).1;
    for _ in 0..600 {
        run(&mut n, 1.0);
        if n.sample(0).is_err() {
            break;
        }
    }
    assert_eq!(n.sample(0), Err(SimError::GpuLost { gpu: 0 }));
    assert!(n.gpu_state(0).t_die >= 92.0);
    let (events, _) = n.events_since(cursor);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, GpuEventKind::Xid(79));
    assert_eq!(events[0].gpu, 0);
    assert_eq!(events[0].uuid, uuid);
    assert_eq!(n.gpu_count(), 2);
    assert!(n.sample(1).is_ok(), "the other GPU is unaffected");
    Ok(())
}

// ---------------------------------------------------------------- faults

#[test]
fn xid_faults_log_events() -> Result<(), SimError> {
    let mut n = node(H100, 2, Workload::Training);
    let uuid = n.inventory(1)?.uuid;
    n.inject(1, Fault::Xid { xid: 13 })?;
    let (events, newest) = n.events_since(0);
    assert_eq!(newest, 1);
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].gpu, events[0].uuid.as_str()), (1, uuid.as_str()));
    assert_eq!(events[0].kind, GpuEventKind::Xid(13));
    assert_eq!(sample(&n, 1).ecc.unwrap().volatile_uncorrected, 0);

    n.inject(1, Fault::Xid { xid: 48 })?;
    let ecc = sample(&n, 1).ecc.unwrap();
    assert_eq!((ecc.volatile_uncorrected, ecc.aggregate_uncorrected), (1, 1));
    assert_eq!(kinds(&n, 1), vec![GpuEventKind::Xid(13), GpuEventKind::Xid(48)]);
    Ok(())
}

#[test]
fn xid_79_and_fallen_off_bus_lose_the_gpu() -> Result<(), SimError> {
    let mut n = node(H100, 3, Workload::Training);
    n.inject(0, Fault::Xid { xid: 79 })?;
    n.inject(1, Fault::FallenOffBus)?;
    assert_eq!(kinds(&n, 0), vec![GpuEventKind::Xid(79)]);
    assert_eq!(kinds(&n, 1), vec![GpuEventKind::Xid(79)]);
    for gpu in 0..2 {
        let lost = SimError::GpuLost { gpu };
        assert_eq!(n.sample(gpu), Err(lost.clone()));
        assert_eq!(n.inventory(gpu), Err(lost.clone()));
        assert_eq!(n.set_power_limit(gpu, 300_000), Err(lost.clone()));
        assert_eq!(n.lock_clocks(gpu, 500, 600), Err(lost.clone()));
        assert_eq!(n.reset_clocks(gpu), Err(lost.clone()));
        assert_eq!(n.set_fan_speed(gpu, 0, 50), Err(lost.clone()));
        assert_eq!(n.reset_fan(gpu, 0), Err(lost.clone()));
        assert_eq!(n.set_workload(gpu, Workload::Idle), Err(lost.clone()));
        assert_eq!(n.workload(gpu), Err(lost.clone()));
        assert_eq!(n.inject(gpu, Fault::Clear), Err(lost.clone()));
        assert_eq!(n.inject(gpu, Fault::Xid { xid: 79 }), Err(lost.clone()));
        assert_eq!(n.reset_gpu(gpu), Err(lost.clone()));
        assert_eq!(n.work_done(gpu), Err(lost.clone()));
        assert_eq!(n.throughput(gpu), Err(lost));
    }
    assert_eq!(n.gpu_count(), 3);
    run(&mut n, 5.0);
    assert!(n.sample(2).is_ok());
    assert_eq!(n.events_since(0).1, 2, "a lost GPU logs nothing more");
    Ok(())
}

#[test]
fn double_bit_ecc_counts_and_pends_a_remap() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    n.inject(0, Fault::DoubleBitEcc)?;
    assert_eq!(kinds(&n, 0), vec![GpuEventKind::DoubleBitEcc, GpuEventKind::Xid(48)]);
    let s = sample(&n, 0);
    let ecc = s.ecc.unwrap();
    assert_eq!((ecc.volatile_uncorrected, ecc.aggregate_uncorrected), (1, 1));
    assert_eq!((ecc.volatile_corrected, ecc.aggregate_corrected), (0, 0));
    let rows = s.remapped_rows.unwrap();
    assert_eq!((rows.uncorrectable, rows.pending, rows.failed), (1, true, false));
    assert_eq!(s.retired_pages, None);
    Ok(())
}

#[test]
fn single_bit_storm_counts_exactly_and_bounds_events() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    n.inject(0, Fault::SingleBitEccStorm { per_second: 1000, duration_s: 2.5 })?;
    run(&mut n, 1.0);
    assert_eq!(sample(&n, 0).ecc.unwrap().volatile_corrected, 1000);
    run(&mut n, 4.0);
    let ecc = sample(&n, 0).ecc.unwrap();
    assert_eq!((ecc.volatile_corrected, ecc.aggregate_corrected), (2500, 2500));
    assert_eq!(ecc.volatile_uncorrected, 0);
    let sbe = kinds(&n, 0).into_iter().filter(|k| *k == GpuEventKind::SingleBitEcc).count();
    assert!((1..=3 * SBE_EVENTS_PER_S as usize).contains(&sbe), "{sbe} events");

    // A slow storm logs every error.
    let mut n = node(H100, 1, Workload::Training);
    n.inject(0, Fault::SingleBitEccStorm { per_second: 3, duration_s: 2.0 })?;
    run(&mut n, 10.0);
    assert_eq!(sample(&n, 0).ecc.unwrap().aggregate_corrected, 6);
    assert_eq!(kinds(&n, 0), vec![GpuEventKind::SingleBitEcc; 6]);

    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            n.inject(0, Fault::SingleBitEccStorm { per_second: 1, duration_s: bad }),
            Err(SimError::InvalidArgument { .. })
        ));
    }
    Ok(())
}

#[test]
fn row_remap_faults() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    n.inject(0, Fault::RowRemapPending)?;
    assert!(sample(&n, 0).remapped_rows.unwrap().pending);
    assert!(kinds(&n, 0).is_empty());
    n.inject(0, Fault::RowRemapFailure)?;
    assert!(sample(&n, 0).remapped_rows.unwrap().failed);
    assert_eq!(kinds(&n, 0), vec![GpuEventKind::Xid(64)]);
    Ok(())
}

#[test]
fn pcie_downtrain_is_validated_and_shows() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    assert_eq!((sample(&n, 0).pcie.generation, sample(&n, 0).pcie.width), (5, 16));
    n.inject(0, Fault::PcieDowntrain { generation: 3, width: 8 })?;
    assert_eq!((sample(&n, 0).pcie.generation, sample(&n, 0).pcie.width), (3, 8));
    for (generation, width) in [(6, 16), (0, 16), (5, 32), (5, 0), (5, 12)] {
        assert!(matches!(
            n.inject(0, Fault::PcieDowntrain { generation, width }),
            Err(SimError::InvalidArgument { .. })
        ));
    }
    let mut r = node(RTX, 1, Workload::Idle);
    assert!(r.inject(0, Fault::PcieDowntrain { generation: 5, width: 16 }).is_err());
    r.inject(0, Fault::PcieDowntrain { generation: 4, width: 1 })?;
    Ok(())
}

#[test]
fn nvlink_down_is_validated_and_shows() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    assert_eq!(sample(&n, 0).nvlink_active, vec![true; 18]);
    n.inject(0, Fault::NvlinkDown { link: 3 })?;
    let links = sample(&n, 0).nvlink_active;
    assert!(!links[3] && links.iter().filter(|l| **l).count() == 17);
    assert_eq!(kinds(&n, 0), vec![GpuEventKind::Xid(74)]);
    assert!(matches!(
        n.inject(0, Fault::NvlinkDown { link: 18 }),
        Err(SimError::InvalidArgument { .. })
    ));
    let mut r = node(RTX, 1, Workload::Idle);
    assert!(sample(&r, 0).nvlink_active.is_empty());
    assert!(matches!(
        r.inject(0, Fault::NvlinkDown { link: 0 }),
        Err(SimError::NotSupported { .. })
    ));
    Ok(())
}

#[test]
fn ecc_faults_are_not_supported_without_ecc() -> Result<(), SimError> {
    let mut r = node(RTX, 1, Workload::Training);
    let s = sample(&r, 0);
    assert_eq!((s.ecc, s.remapped_rows, s.retired_pages), (None, None, None));
    for fault in [
        Fault::DoubleBitEcc,
        Fault::SingleBitEccStorm { per_second: 10, duration_s: 1.0 },
        Fault::RowRemapPending,
        Fault::RowRemapFailure,
    ] {
        assert!(matches!(r.inject(0, fault), Err(SimError::NotSupported { gpu: 0, .. })));
    }
    // An XID 48 is still an event.
    r.inject(0, Fault::Xid { xid: 48 })?;
    assert_eq!(kinds(&r, 0), vec![GpuEventKind::Xid(48)]);
    assert_eq!(sample(&r, 0).ecc, None);
    Ok(())
}

#[test]
fn bmc_limit_binds_and_sets_the_power_brake() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    n.inject(0, Fault::BmcPowerLimit { watts: 300 })?;
    run(&mut n, 2.0);
    let s = sample(&n, 0);
    assert_eq!((s.power_limit_mw, s.enforced_power_limit_mw), (700_000, 300_000));
    assert!(within(f64::from(s.power_avg_mw), 300_000.0, 0.03), "{}", s.power_avg_mw);
    assert!(has(&s, ThrottleReasons::SW_POWER_CAP | ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN));
    // A requested limit below the BMC's binds instead: no brake.
    n.set_power_limit(0, 250_000)?;
    run(&mut n, 2.0);
    let s = sample(&n, 0);
    assert_eq!((s.power_limit_mw, s.enforced_power_limit_mw), (250_000, 250_000));
    assert!(has(&s, ThrottleReasons::SW_POWER_CAP));
    assert!(!has(&s, ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN));
    n.inject(0, Fault::Clear)?;
    n.set_power_limit(0, 700_000)?;
    run(&mut n, 2.0);
    let s = sample(&n, 0);
    assert_eq!(s.enforced_power_limit_mw, 700_000);
    assert!(matches!(
        n.inject(0, Fault::BmcPowerLimit { watts: 0 }),
        Err(SimError::InvalidArgument { .. })
    ));
    Ok(())
}

#[test]
fn clear_removes_faults_but_keeps_counters() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    n.inject(0, Fault::DoubleBitEcc)?;
    n.inject(0, Fault::RowRemapFailure)?;
    n.inject(0, Fault::PcieDowntrain { generation: 1, width: 1 })?;
    n.inject(0, Fault::NvlinkDown { link: 0 })?;
    n.inject(0, Fault::BmcPowerLimit { watts: 300 })?;
    n.inject(0, Fault::CoolingFailure { ambient_rise_c: 10.0 })?;
    n.inject(0, Fault::SingleBitEccStorm { per_second: 100, duration_s: 100.0 })?;
    n.set_power_limit(0, 500_000)?;
    run(&mut n, 1.0);
    n.inject(0, Fault::Clear)?;
    let s = sample(&n, 0);
    assert_eq!((s.pcie.generation, s.pcie.width), (5, 16));
    assert_eq!(s.nvlink_active, vec![true; 18]);
    assert_eq!(s.enforced_power_limit_mw, 500_000);
    assert_eq!(s.power_limit_mw, 500_000, "settings are not faults");
    let rows = s.remapped_rows.unwrap();
    assert_eq!((rows.uncorrectable, rows.pending, rows.failed), (1, false, false));
    let ecc = s.ecc.unwrap();
    assert_eq!((ecc.volatile_uncorrected, ecc.aggregate_uncorrected), (1, 1));
    assert_eq!(ecc.volatile_corrected, 100);
    run(&mut n, 5.0);
    assert_eq!(sample(&n, 0).ecc.unwrap().aggregate_corrected, 100, "the storm ended");
    assert!(n.gpu_state(0).inlet_rise < 10.0 * 0.9);
    Ok(())
}

#[test]
fn reset_gpu_semantics() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Training);
    n.inject(0, Fault::DoubleBitEcc)?;
    n.inject(0, Fault::RowRemapFailure)?;
    n.inject(0, Fault::PcieDowntrain { generation: 2, width: 4 })?;
    n.inject(0, Fault::NvlinkDown { link: 5 })?;
    n.inject(0, Fault::SingleBitEccStorm { per_second: 50, duration_s: 100.0 })?;
    n.inject(0, Fault::BmcPowerLimit { watts: 600 })?;
    n.set_power_limit(0, 400_000)?;
    n.lock_clocks(0, 800, 900)?;
    run(&mut n, 2.0);
    assert_eq!(sample(&n, 0).sm_clock_mhz, 900);
    n.set_power_limit(0, 300_000)?; // still waiting when the reset comes
    n.reset_gpu(0)?;
    let s = sample(&n, 0);
    assert_eq!(s.power_limit_mw, 700_000, "default limit restored at once");
    assert_eq!(s.enforced_power_limit_mw, 600_000, "the BMC is outside the GPU");
    assert_eq!((s.pcie.generation, s.pcie.width), (5, 16));
    assert_eq!(s.nvlink_active, vec![true; 18]);
    let rows = s.remapped_rows.unwrap();
    assert_eq!((rows.uncorrectable, rows.pending, rows.failed), (1, false, true));
    let ecc = s.ecc.unwrap();
    assert_eq!((ecc.volatile_corrected, ecc.volatile_uncorrected), (0, 0));
    assert_eq!((ecc.aggregate_corrected, ecc.aggregate_uncorrected), (100, 1));
    run(&mut n, 2.0);
    let s = sample(&n, 0);
    assert_eq!(s.power_limit_mw, 700_000, "the waiting request was dropped");
    assert!(s.sm_clock_mhz > 1500, "clocks unlocked: {}", s.sm_clock_mhz);
    assert_eq!(s.ecc.unwrap().aggregate_corrected, 100, "the storm ended");

    n.inject(0, Fault::FallenOffBus)?;
    assert_eq!(n.reset_gpu(0), Err(SimError::GpuLost { gpu: 0 }));
    assert_eq!(n.sample(0), Err(SimError::GpuLost { gpu: 0 }));
    Ok(())
}

// ---------------------------------------------------------------- events

#[test]
fn events_since_cursor_semantics() -> Result<(), SimError> {
    let mut n = node(H100, 2, Workload::Idle);
    assert_eq!(n.events_since(0), (vec![], 0));
    assert_eq!(n.events_since(u64::MAX), (vec![], 0));
    n.inject(0, Fault::Xid { xid: 13 })?;
    n.inject(1, Fault::Xid { xid: 31 })?;
    n.inject(0, Fault::Xid { xid: 43 })?;
    let (all, newest) = n.events_since(0);
    assert_eq!(newest, 3);
    let xids: Vec<_> = all.iter().map(|e| (e.gpu, e.kind)).collect();
    assert_eq!(
        xids,
        vec![(0, GpuEventKind::Xid(13)), (1, GpuEventKind::Xid(31)), (0, GpuEventKind::Xid(43))]
    );
    let (rest, newest) = n.events_since(1);
    assert_eq!((rest.len(), newest), (2, 3));
    assert_eq!(rest[0].kind, GpuEventKind::Xid(31));
    assert_eq!(n.events_since(3), (vec![], 3));
    assert_eq!(n.events_since(100), (vec![], 3));
    assert_eq!(n.events_since(u64::MAX), (vec![], 3));
    Ok(())
}

#[test]
fn event_log_keeps_the_last_4096() -> Result<(), SimError> {
    let mut n = node(H100, 1, Workload::Idle);
    for i in 0..5000u64 {
        n.inject(0, Fault::Xid { xid: 1000 + i })?;
    }
    let (events, newest) = n.events_since(0);
    assert_eq!(newest, 5000);
    assert_eq!(events.len(), EVENT_LOG_CAPACITY);
    // Event with sequence s carries XID 999 + s.
    assert_eq!(events[0].kind, GpuEventKind::Xid(999 + 5000 - 4096 + 1));
    assert_eq!(events[4095].kind, GpuEventKind::Xid(999 + 5000));
    let (tail, _) = n.events_since(4990);
    assert_eq!(tail.len(), 10);
    assert_eq!(tail[0].kind, GpuEventKind::Xid(999 + 4991));
    Ok(())
}

#[test]
fn scenario_events_fire_in_time_order() -> Result<(), Box<dyn std::error::Error>> {
    let text = r#"
seed = 9
[[gpu]]
profile = "h100-sxm"
count = 2
workload = "training"

[[event]]
at_s = 2.0
gpu = 0
fault = "xid"
xid = 13

[[event]]
at_s = 1.0
gpu = 1
fault = "xid"
xid = 31

[[event]]
at_s = 1.0
gpu = 0
fault = "xid"
xid = 43

[[event]]
at_s = 0.0
gpu = 1
fault = "xid"
xid = 45

[[event]]
at_s = 3.005
gpu = 0
workload = "idle"

[[event]]
at_s = 4.0
gpu = 1
fault = "double_bit_ecc"
"#;
    let scenario = Scenario::parse(text, Path::new("<inline>"))?;
    let mut n = SimNode::new(&scenario);
    let xids = |n: &SimNode| -> Vec<(u32, GpuEventKind)> {
        n.events_since(0).0.into_iter().map(|e| (e.gpu, e.kind)).collect()
    };
    assert_eq!(xids(&n), vec![(1, GpuEventKind::Xid(45))], "time-zero events fire at start");
    n.advance_to(secs(0.999));
    assert_eq!(xids(&n).len(), 1);
    n.advance_to(secs(1.0));
    assert_eq!(
        xids(&n)[1..],
        [(1, GpuEventKind::Xid(31)), (0, GpuEventKind::Xid(43))],
        "equal times keep file order"
    );
    n.advance_to(secs(3.0));
    assert_eq!(xids(&n)[3], (0, GpuEventKind::Xid(13)));
    assert_eq!(n.workload(0)?, Workload::Training, "3.005 s fires at the 3.01 s boundary");
    n.advance_to(secs(3.01));
    assert_eq!(n.workload(0)?, Workload::Idle);
    n.advance_to(secs(10.0));
    assert_eq!(xids(&n)[4..], [(1, GpuEventKind::DoubleBitEcc), (1, GpuEventKind::Xid(48))]);
    Ok(())
}

#[test]
fn failing_scenario_events_are_skipped() {
    let mut s = Scenario::uniform(RTX, 1, Workload::Training);
    s.events = vec![
        crate::scenario::TimedAction {
            at_s: 1.0,
            gpu: 0,
            action: crate::scenario::Action::Fault(Fault::DoubleBitEcc),
        },
        crate::scenario::TimedAction {
            at_s: 2.0,
            gpu: 0,
            action: crate::scenario::Action::Fault(Fault::Xid { xid: 31 }),
        },
    ];
    let mut n = SimNode::new(&s);
    n.advance_to(secs(5.0));
    assert_eq!(kinds(&n, 0), vec![GpuEventKind::Xid(31)]);
}

// ---------------------------------------------------------------- determinism

/// Every observable of every GPU.
fn snapshot(n: &SimNode) -> Vec<String> {
    (0..n.gpu_count())
        .map(|i| {
            format!(
                "{:?} {:?} {:?} {:?}",
                n.sample(i),
                n.work_done(i).map(f64::to_bits),
                n.events_since(0),
                n.now()
            )
        })
        .collect()
}

fn busy_scenario(seed: u64) -> Scenario {
    let mut s = Scenario::uniform(H100, 3, Workload::Training);
    s.seed = seed;
    s.gpus.push(crate::scenario::GpuSpec {
        profile: RTX.into(),
        count: 1,
        workload: Workload::Inference,
    });
    s.events = vec![
        crate::scenario::TimedAction {
            at_s: 0.305,
            gpu: 1,
            action: crate::scenario::Action::Fault(Fault::SingleBitEccStorm {
                per_second: 77,
                duration_s: 0.5,
            }),
        },
        crate::scenario::TimedAction {
            at_s: 0.5,
            gpu: 2,
            action: crate::scenario::Action::Workload { workload: Workload::Idle },
        },
    ];
    s
}

#[test]
fn state_does_not_depend_on_advance_chunking() {
    let s = busy_scenario(5);
    let mut once = SimNode::new(&s);
    let mut steps = SimNode::new(&s);
    let mut odd = SimNode::new(&s);
    for n in [&mut once, &mut steps, &mut odd] {
        n.set_power_limit(0, 450_000).unwrap();
    }
    once.advance_to(Duration::from_secs(1));
    for i in 1..=100 {
        steps.advance_to(STEP * i);
    }
    // Irregular chunks, not aligned to the step, some empty or backwards.
    let mut t = Duration::ZERO;
    let mut k = 0u64;
    while t < Duration::from_secs(1) {
        k += 1;
        t = (t + Duration::from_micros(1_000 + (k * 7_919) % 37_000)).min(Duration::from_secs(1));
        odd.advance_to(t);
        odd.advance_to(t / 2);
    }
    assert_eq!(snapshot(&once), snapshot(&steps));
    assert_eq!(snapshot(&once), snapshot(&odd));
    // And later, after more calls at equal times.
    for n in [&mut once, &mut steps, &mut odd] {
        n.set_power_limit(1, 300_000).unwrap();
        n.inject(3, Fault::CoolingFailure { ambient_rise_c: 5.0 }).unwrap();
    }
    once.advance_to(Duration::from_secs(3));
    for i in 101..=300 {
        steps.advance_to(STEP * i);
    }
    odd.advance_to(Duration::from_millis(2_345));
    odd.advance_to(Duration::from_secs(3));
    assert_eq!(snapshot(&once), snapshot(&steps));
    assert_eq!(snapshot(&once), snapshot(&odd));
}

#[test]
fn same_scenario_same_samples_and_seeds_differ() {
    let mut a = SimNode::new(&busy_scenario(11));
    let mut b = SimNode::new(&busy_scenario(11));
    let mut c = SimNode::new(&busy_scenario(12));
    for n in [&mut a, &mut b, &mut c] {
        n.advance_to(Duration::from_secs(20));
    }
    assert_eq!(snapshot(&a), snapshot(&b));
    assert_ne!(snapshot(&a), snapshot(&c));
}

#[test]
fn reads_are_pure() {
    let s = busy_scenario(2);
    let mut read = SimNode::new(&s);
    let mut unread = SimNode::new(&s);
    for i in 1..=200 {
        read.advance_to(STEP * i);
        let first = snapshot(&read);
        assert_eq!(first, snapshot(&read), "two reads in a row agree");
    }
    unread.advance_to(STEP * 200);
    assert_eq!(snapshot(&read), snapshot(&unread));
}

/// Manual benchmark: `cargo test -p hearth-sim --release -- --ignored --nocapture stepping`.
#[test]
#[ignore = "timing; run by hand in release"]
#[allow(clippy::print_stderr)]
fn stepping_cost() {
    let mut n = node(H100, 8, Workload::Training);
    let started = std::time::Instant::now();
    n.advance_to(Duration::from_secs(3600));
    let per_step = started.elapsed() / (360_000 * 8);
    let speedup = 3600.0 / started.elapsed().as_secs_f64();
    eprintln!(
        "8 GPUs, 1 h simulated in {:?}: {per_step:?} per GPU-step, {speedup:.0}x faster than real time",
        started.elapsed()
    );
}
