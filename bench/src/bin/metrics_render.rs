//! Metrics render benchmark: time and heap allocations to build and encode one node's
//! exposition (8 simulated H100s, dcgm-exporter names plus Hearth's series) in both formats,
//! beside a scrape of `prometheus-node-exporter` (what an operator already runs on a node) on the
//! same machine in the same run. Goal: under 1 ms per render (docs/benchmarks.md).
//!
//! Run: `cargo run --release -p hearth-bench --bin metrics_render`. Needs the Debian package
//! `prometheus-node-exporter`.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a benchmark prints its table

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use hearth_agent::agent::{Agent, GpuEntry, GpuSnapshot};
use hearth_agent::config::{BackendKind, Config};
use hearth_agent::gpu::GpuBackend;
use hearth_agent::gpu::sim::SimBackend;
use hearth_agent::telemetry::process::ProcSelf;
use hearth_bench::{Guarded, today};
use hearth_proto::exposition::Format;
use hearth_sim::{Scenario, SimClock, SimHost, Workload};

/// Counts every allocation (and its bytes) of the process.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counters are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's layout contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: as for `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Command-line options.
#[derive(Debug, Parser)]
struct Opts {
    /// Renders (and node-exporter scrapes) to time.
    #[arg(long, default_value_t = 2000)]
    iterations: u32,
    /// Number of simulated GPUs.
    #[arg(long, default_value_t = 8)]
    gpus: u32,
    /// The node exporter binary.
    #[arg(long, default_value = "/usr/bin/prometheus-node-exporter")]
    node_exporter: std::path::PathBuf,
}

fn agent(gpus: u32) -> anyhow::Result<Arc<Agent>> {
    let host = Arc::new(SimHost::new(
        &Scenario::uniform("h100-sxm", gpus, Workload::Training),
        SimClock::Manual,
    ));
    host.advance(Duration::from_secs(60));
    let mut config = Config::default();
    config.gpu.backend = BackendKind::Sim;
    let agent = Agent::new(config, Some(host.clone()), "bench-node".into());
    let b = SimBackend::new(host);
    let mut entries = Vec::new();
    for inventory in hearth_agent::gpu::inventory_all(&b)? {
        entries.push(GpuEntry {
            sample: Some(b.sample(inventory.index)?),
            inventory,
            sampled_at_ms: Some(1),
            lost: false,
            error: None,
        });
    }
    agent.gpus().send_replace(GpuSnapshot { driver: Some(b.driver()?), gpus: entries, rounds: 1 });
    Ok(agent)
}

struct Row {
    name: String,
    p50_us: f64,
    p99_us: f64,
    allocs: f64,
    alloc_kib: f64,
    bytes: usize,
}

fn measure(
    name: &str,
    n: u32,
    mut f: impl FnMut() -> anyhow::Result<usize>,
) -> anyhow::Result<Row> {
    let bytes = f()?; // warm-up
    let mut times = Vec::with_capacity(n as usize);
    let (a0, b0) = (ALLOCS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(f()?);
        times.push(t.elapsed());
    }
    let (a1, b1) = (ALLOCS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
    times.sort();
    let q = |p: f64| times[((times.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    Ok(Row {
        name: name.to_string(),
        p50_us: q(0.5),
        p99_us: q(0.99),
        allocs: (a1 - a0) as f64 / f64::from(n),
        alloc_kib: (b1 - b0) as f64 / f64::from(n) / 1024.0,
        bytes,
    })
}

fn scrape(addr: &str) -> anyhow::Result<usize> {
    let mut s = TcpStream::connect(addr)?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(buf.len())
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    if !opts.node_exporter.exists() {
        bail!(
            "{} not found: install the reference with `apt-get install prometheus-node-exporter`",
            opts.node_exporter.display()
        );
    }
    let agent = agent(opts.gpus)?;
    let n = opts.iterations;
    eprintln!("rendering {n} times ({} GPUs) ...", opts.gpus);
    let text = measure(&format!("hearth /metrics, {} GPUs, text 0.0.4", opts.gpus), n, || {
        Ok(hearth_agent::telemetry::node::render(&agent, &ProcSelf).encode(Format::Text).len())
    })?;
    let om = measure(&format!("hearth /metrics, {} GPUs, OpenMetrics", opts.gpus), n, || {
        Ok(hearth_agent::telemetry::node::render(&agent, &ProcSelf)
            .encode(Format::OpenMetrics)
            .len())
    })?;

    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    drop(listener);
    let _ne = Guarded(
        Command::new(&opts.node_exporter)
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting prometheus-node-exporter")?,
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while scrape(&addr).is_err() {
        if Instant::now() > deadline {
            bail!("the node exporter did not come up within 15 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ne_n = (n / 10).max(20);
    eprintln!("scraping the node exporter {ne_n} times ...");
    let ne =
        measure("prometheus-node-exporter scrape (HTTP GET, loopback)", ne_n, || scrape(&addr))?;

    println!("metrics_render ({}; goal: a render under 1 ms)", today());
    println!(
        "{:<48} {:>10} {:>10} {:>12} {:>12} {:>9}",
        "what", "p50 µs", "p99 µs", "allocs/op", "KiB alloc", "bytes"
    );
    for r in [&text, &om, &ne] {
        println!(
            "{:<48} {:>10.1} {:>10.1} {:>12.0} {:>12.1} {:>9}",
            r.name, r.p50_us, r.p99_us, r.allocs, r.alloc_kib, r.bytes
        );
    }
    println!(
        "hearth text render p50 is {:.1}x faster than a node_exporter scrape; goal < 1000 µs: {}",
        ne.p50_us / text.p50_us,
        if text.p50_us < 1000.0 && om.p50_us < 1000.0 { "met (p50)" } else { "NOT met" }
    );
    println!("(node_exporter's allocations are in its own process: the column counts only ours)");
    Ok(())
}
