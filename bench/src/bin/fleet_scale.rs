//! Fleet scale benchmark: many light simulated nodes, each with its own enrolled certificate,
//! holding mTLS `hearth/1` sessions to one `hearth-fleet`, on SQLite and on PostgreSQL. The logic
//! is in `hearth_bench::fleet_scale`; run it through `bench/fleet-scale` (docs/benchmarks.md).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use hearth_bench::fleet_scale::{Options, pin_self, run};

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
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(run(opts))?;
    Ok(())
}
