//! Health detection latency: from an injected double-bit ECC error to the health verdict, over
//! many injections through the fake `libnvidia-ml` (NVML event set + 1 Hz sampling, as the agent
//! runs them), side by side with a dcgm-exporter-style poller reading the ECC counters every
//! 30 s on the same injections, in the same run.
//!
//! Run: `cargo build --release -p hearth-fake-nvml -p hearth-bench && target/release/health_latency`
//! (see docs/benchmarks.md). The simulated GPUs run idle, so each quarantined GPU is reset by the
//! health engine and returns to service before its next injection.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a benchmark prints its table

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hearth_agent::gpu::nvml::NvmlBackend;
use hearth_agent::gpu::{GpuBackend, inventory_all};
use hearth_agent::health::{Command, Monitor, observe_inventory, policy::Policy};
use hearth_bench::today;
use hearth_fake_nvml::control::ControlClient;
use hearth_proto::api::{GpuService, GpuVerdict};
use hearth_sim::Fault;

/// Command-line options.
#[derive(Debug, Parser)]
struct Opts {
    /// Number of injections.
    #[arg(long, default_value_t = 60)]
    injections: u32,
    /// Mean spacing of injections, ms (each spacing is drawn in 0.5x..1.5x of it).
    #[arg(long, default_value_t = 1000)]
    spacing_ms: u64,
    /// Sampling period of the health engine, ms (the agent's default is 1000).
    #[arg(long, default_value_t = 1000)]
    sample_ms: u64,
    /// Period of the dcgm-exporter-style poller, s (dcgm-exporter's default is 30).
    #[arg(long, default_value_t = 30)]
    poll_s: u64,
}

/// One injection and when each path saw it.
#[derive(Debug, Clone, Copy)]
struct Injection {
    gpu: u32,
    at: Instant,
    event: Option<Instant>,
    sampled: Option<Instant>,
    poller: Option<Instant>,
}

#[derive(Debug, Default)]
struct Shared {
    injections: Vec<Injection>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Mark the open injection on `gpu` seen by one path.
fn seen(
    shared: &Mutex<Shared>,
    gpu: u32,
    when: Instant,
    pick: fn(&mut Injection) -> &mut Option<Instant>,
) {
    let mut s = lock(shared);
    // The latest injection on this GPU at or before `when`.
    if let Some(inj) = s.injections.iter_mut().rev().find(|i| i.gpu == gpu && i.at <= when) {
        let slot = pick(inj);
        if slot.is_none() {
            *slot = Some(when);
        }
    }
}

fn failed(monitor: &Monitor, gpu: u32) -> bool {
    monitor.view().gpus.get(gpu as usize).is_some_and(|g| g.health.verdict == GpuVerdict::Failed)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let lib = hearth_fake_nvml::locate::library().map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let control_path = dir.path().join("control.sock");
    let scenario = dir.path().join("scenario.toml");
    std::fs::write(
        &scenario,
        "seed = 9\n[[gpu]]\nprofile = \"h100-sxm\"\ncount = 8\nworkload = \"idle\"\n",
    )?;
    // SAFETY: set before any other thread exists (single-threaded at this point).
    unsafe {
        std::env::set_var(hearth_fake_nvml::ENV_SCENARIO, &scenario);
        std::env::set_var(hearth_fake_nvml::ENV_CLOCK, "1");
        std::env::set_var(hearth_fake_nvml::ENV_CONTROL, &control_path);
    }
    let backend: Arc<dyn GpuBackend> = Arc::new(NvmlBackend::open(&lib)?);
    let control = Arc::new(ControlClient::connect(&control_path)?);
    let inventory = inventory_all(backend.as_ref())?;
    let gpus = u32::try_from(inventory.len())?;
    let mut policy = Policy::default();
    policy.reset.max_recurrences = 100;
    let monitor = Arc::new(Mutex::new(Monitor::new(policy, None)?));
    let shared = Arc::new(Mutex::new(Shared::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let now_ms = move || 1_800_000_000_000 + t0.elapsed().as_millis() as u64;

    // The agent's event path: NVML event set, judged at once.
    let event_thread = {
        let (backend, monitor, shared, stop) =
            (backend.clone(), monitor.clone(), shared.clone(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut events = backend.events()?;
            while !stop.load(Ordering::Relaxed) {
                let Some(e) = events.wait(Duration::from_millis(100))? else { continue };
                let mut m = lock(&monitor);
                m.observe_event(&e, now_ms());
                if failed(&m, e.gpu) {
                    seen(&shared, e.gpu, Instant::now(), |i| &mut i.event);
                }
            }
            Ok(())
        })
    };
    // The agent's 1 Hz sampling with resets of idle quarantined GPUs.
    let sample_thread = {
        let (backend, monitor, shared, stop, control) =
            (backend.clone(), monitor.clone(), shared.clone(), stop.clone(), control.clone());
        let period = Duration::from_millis(opts.sample_ms);
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                next += period;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                let obs = observe_inventory(backend.as_ref(), &inventory);
                let when = Instant::now();
                let cmds = {
                    let mut m = lock(&monitor);
                    let cmds = m.observe_round(&obs, now_ms());
                    for o in &obs {
                        let dbe = o
                            .sample
                            .as_ref()
                            .and_then(|s| s.ecc)
                            .is_some_and(|e| e.volatile_uncorrected > 0);
                        if dbe {
                            seen(&shared, o.inventory.index, when, |i| &mut i.sampled);
                        }
                    }
                    cmds
                };
                for Command::Reset { gpu, uuid } in cmds {
                    let r = if backend.compute_processes(gpu)?.is_empty() {
                        control.reset(gpu).map_err(|e| e.to_string())
                    } else {
                        continue;
                    };
                    lock(&monitor).reset_result(&uuid, r, now_ms());
                }
            }
            Ok(())
        })
    };
    // dcgm-exporter style: read the counters every poll_s.
    let poll_thread = {
        let (backend, shared, stop) = (backend.clone(), shared.clone(), stop.clone());
        let period = Duration::from_secs(opts.poll_s);
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut last: BTreeMap<u32, u64> = BTreeMap::new();
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                for gpu in 0..gpus {
                    let n = backend.sample(gpu)?.ecc.map_or(0, |e| e.aggregate_uncorrected);
                    let before = last.insert(gpu, n).unwrap_or(n);
                    if n > before {
                        let when = Instant::now();
                        // Every injection on this GPU since the last poll is seen now.
                        let mut s = lock(&shared);
                        for inj in
                            s.injections.iter_mut().filter(|i| i.gpu == gpu && i.poller.is_none())
                        {
                            inj.poller = Some(when);
                        }
                    }
                }
                next += period;
                while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Ok(())
        })
    };

    std::thread::sleep(Duration::from_millis(2 * opts.sample_ms));
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    eprintln!("injecting {} double-bit ECC errors into 8 simulated H100s ...", opts.injections);
    for k in 0..opts.injections {
        let gpu = k % gpus;
        // Wait until the GPU serves healthy again (reset after its previous fault).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = lock(&monitor).view().gpus.get(gpu as usize).is_some_and(|g| {
                g.service == GpuService::Serving && g.health.verdict == GpuVerdict::Healthy
            });
            if ok {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "GPU {gpu} did not return to service");
            std::thread::sleep(Duration::from_millis(20));
        }
        lock(&shared).injections.push(Injection {
            gpu,
            at: Instant::now(),
            event: None,
            sampled: None,
            poller: None,
        });
        control.inject(gpu, Fault::DoubleBitEcc).context("inject")?;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let spacing = opts.spacing_ms / 2 + rng % opts.spacing_ms.max(1);
        std::thread::sleep(Duration::from_millis(spacing));
        if (k + 1) % 20 == 0 {
            eprintln!("  {} injected", k + 1);
        }
    }
    eprintln!("waiting up to {} s for the last poll ...", opts.poll_s + 2);
    let deadline = Instant::now() + Duration::from_secs(opts.poll_s + 2);
    while Instant::now() < deadline && lock(&shared).injections.iter().any(|i| i.poller.is_none()) {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for t in [event_thread, sample_thread, poll_thread] {
        t.join().map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))??;
    }

    let injections = lock(&shared).injections.clone();
    let lat = |pick: fn(&Injection) -> Option<Instant>| -> (Vec<f64>, usize) {
        let mut v: Vec<f64> = injections
            .iter()
            .filter_map(|i| pick(i).map(|t| t.duration_since(i.at).as_secs_f64() * 1000.0))
            .collect();
        v.sort_by(f64::total_cmp);
        let missed = injections.len() - v.len();
        (v, missed)
    };
    let rows = [
        ("hearth, NVML event path", lat(|i| i.event)),
        ("hearth, 1 Hz sampling path", lat(|i| i.sampled)),
        (
            "hearth, first of the two",
            lat(|i| match (i.event, i.sampled) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }),
        ),
        (&*format!("dcgm-exporter-style {} s poller", opts.poll_s), lat(|i| i.poller)),
    ];
    println!(
        "health detection latency, {} injections of a double-bit ECC error, {} \
         (8x H100 sim on a real-time clock, through the fake libnvidia-ml)",
        injections.len(),
        today()
    );
    println!("{:<34} {:>10} {:>10} {:>10} {:>7}", "path", "p50 ms", "p99 ms", "max ms", "missed");
    for (name, (v, missed)) in &rows {
        println!(
            "{:<34} {:>10.1} {:>10.1} {:>10.1} {:>7}",
            name,
            percentile(v, 50.0),
            percentile(v, 99.0),
            v.last().copied().unwrap_or(f64::NAN),
            missed
        );
    }
    let (ev, _) = &rows[0].1;
    let (poll, _) = &rows[3].1;
    println!(
        "poller / event path: p50 {:.0}x, p99 {:.0}x; goal p99 <= 1000 ms for events: {}",
        percentile(poll, 50.0) / percentile(ev, 50.0),
        percentile(poll, 99.0) / percentile(ev, 99.0),
        if percentile(ev, 99.0) <= 1000.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
