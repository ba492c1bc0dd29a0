//! Fleet scale benchmark: many light simulated nodes, each with its own enrolled certificate,
//! holding mTLS `hearth/1` sessions to one `hearth-fleet`, on SQLite and on PostgreSQL. The logic
//! is in `hearth_bench::fleet_scale`; run it through `bench/fleet-scale` (docs/benchmarks.md).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use hearth_bench::fleet_scale::{Options, WorkerOptions, pin_self, raise_nofile, run, worker_main};

/// Command-line options.
#[derive(Debug, Parser)]
#[command(name = "fleet_scale")]
struct Opts {
    /// Registry to run on, repeatable, in order: `sqlite`, or a PostgreSQL server URL
    /// (`postgres://user@host:port/db`; a fresh database is created on it and dropped after).
    #[arg(long = "registry", default_value = "sqlite")]
    registries: Vec<String>,
    /// Simulated nodes: enrollments and held sessions.
    #[arg(long, default_value_t = 50_000)]
    sessions: u64,
    /// Heartbeats per second offered in total, spread over the sessions.
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
    /// Measurement window, seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Warm-up after the last session opened, seconds.
    #[arg(long, default_value_t = 15)]
    warmup: u64,
    /// Enrollments in flight.
    #[arg(long, default_value_t = 32)]
    enroll_concurrency: usize,
    /// Session opens in flight.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// The fleet's `flush_interval_ms` (its default: 5000).
    #[arg(long, default_value_t = 5000)]
    flush_ms: u64,
    /// CPU for hearth-fleet (and, in bench/fleet-scale, PostgreSQL).
    #[arg(long, default_value_t = 0)]
    fleet_cpu: usize,
    /// CPU for this load generator.
    #[arg(long, default_value_t = 1)]
    load_cpu: usize,
    /// The hearth-fleet binary (default: next to this one).
    #[arg(long)]
    fleet_bin: Option<PathBuf>,
    /// Fleet gateway processes sharing the address (default: as many as the per-process
    /// file-descriptor limit needs for the sessions).
    #[arg(long, default_value_t = 0)]
    gateways: usize,
    /// Load worker processes holding the sessions (default: as many as the limit needs).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Internal: run as a load worker over these identities (started by the benchmark itself).
    #[arg(long, hide = true)]
    worker_ids: Option<PathBuf>,
    /// Internal: the fleet address for a worker.
    #[arg(long, hide = true)]
    worker_fleet: Option<std::net::SocketAddr>,
    /// Internal: the fleet CA pin for a worker.
    #[arg(long, hide = true)]
    worker_pin: Option<String>,
    /// Internal: a worker's heartbeat period per session, ms.
    #[arg(long, hide = true, default_value_t = 2500)]
    worker_period_ms: u64,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("fleet_scale: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let o = Opts::parse();
    if let Some(ids) = o.worker_ids {
        pin_self(o.load_cpu)?;
        let w = WorkerOptions {
            ids,
            fleet: o.worker_fleet.context("--worker-fleet is required with --worker-ids")?,
            pin: o.worker_pin.context("--worker-pin is required with --worker-ids")?,
            period: std::time::Duration::from_millis(o.worker_period_ms.max(1)),
            connect_concurrency: o.connect_concurrency,
        };
        let _ = raise_nofile()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime")?;
        return rt.block_on(worker_main(w));
    }
    let fleet_bin = match o.fleet_bin {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no directory above this binary")?
            .join("hearth-fleet"),
    };
    anyhow::ensure!(
        fleet_bin.exists(),
        "{} not found: cargo build --release -p hearth-fleet",
        fleet_bin.display()
    );
    pin_self(o.load_cpu)?;
    let opts = Options {
        fleet_bin,
        registries: o.registries,
        sessions: o.sessions,
        rate: o.rate,
        warmup_s: o.warmup,
        seconds: o.seconds,
        enroll_concurrency: o.enroll_concurrency,
        connect_concurrency: o.connect_concurrency,
        flush_ms: o.flush_ms,
        fleet_cpu: o.fleet_cpu,
        load_cpu: o.load_cpu,
        gateways: o.gateways,
        workers: o.workers,
        nofile: 0,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(run(opts))?;
    Ok(())
}
