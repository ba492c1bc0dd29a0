//! Footprint benchmark: `hearth-agent` on 8 simulated H100s sampled at 1 Hz, against
//! `prometheus-node-exporter` (what an operator runs on a node today), measured side by side in
//! the same window: peak RSS, CPU as a share of one core, binary size.
//!
//! Run: `cargo build --release -p hearth-agent && cargo run --release -p hearth-bench --bin
//! footprint` (see docs/benchmarks.md). Needs the Debian package `prometheus-node-exporter`.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a benchmark prints its table

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use hearth_bench::{Guarded, ProcSample, file_size, mib, proc_sample, today};

/// Command-line options.
#[derive(Debug, Parser)]
struct Opts {
    /// Measurement window, seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The agent binary (default: target/release/hearth-agent of this workspace).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The node exporter binary.
    #[arg(long, default_value = "/usr/bin/prometheus-node-exporter")]
    node_exporter: PathBuf,
    /// Number of simulated GPUs.
    #[arg(long, default_value_t = 8)]
    gpus: u32,
}

/// One `GET` with `Connection: close`; returns the answer's size.
fn http_get(mut s: impl Read + Write, path: &str) -> anyhow::Result<usize> {
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(buf.len())
}

fn http_unix(socket: &Path, path: &str) -> anyhow::Result<usize> {
    http_get(UnixStream::connect(socket)?, path)
}

fn http_tcp(addr: &str, path: &str) -> anyhow::Result<usize> {
    http_get(TcpStream::connect(addr)?, path)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        if Instant::now() > deadline {
            bail!("{what} did not come up within 15 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn start_agent(
    bin: &Path,
    dir: &Path,
    name: &str,
    gpus: u32,
) -> anyhow::Result<(Guarded, PathBuf)> {
    let socket = dir.join(format!("{name}.sock"));
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[api]\nsocket = {:?}\n[gpu]\nbackend = \"sim\"\nsample_interval_ms = 1000\n\
             [sim]\ngpus = {gpus}\nworkload = \"training\"\n[log]\nlevel = \"warn\"\nformat = \"text\"\n\
             [state]\ndir = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            socket.display().to_string(),
            dir.join(format!("{name}-state")).display().to_string()
        ),
    )?;
    let child = Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let guard = Guarded(child);
    wait_for(name, || http_unix(&socket, "/v1/status").is_ok())?;
    Ok((guard, socket))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Row {
    name: String,
    start: ProcSample,
    end: ProcSample,
    binary: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let agent_bin = opts.agent.clone().unwrap_or_else(|| root.join("target/release/hearth-agent"));
    if !agent_bin.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release -p hearth-agent`",
            agent_bin.display()
        );
    }
    if !opts.node_exporter.exists() {
        bail!(
            "{} not found: install the reference with `apt-get install prometheus-node-exporter`",
            opts.node_exporter.display()
        );
    }
    let dir = tempfile::tempdir()?;

    let (agent_a, _sock_a) = start_agent(&agent_bin, dir.path(), "agent-idle-api", opts.gpus)?;
    let (agent_b, sock_b) = start_agent(&agent_bin, dir.path(), "agent-polled", opts.gpus)?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let ne = Guarded(
        Command::new(&opts.node_exporter)
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting prometheus-node-exporter")?,
    );
    wait_for("node exporter", || http_tcp(&addr, "/metrics").is_ok())?;
    // Let start-up settle (first inventory, first scrape) before the window opens.
    std::thread::sleep(Duration::from_secs(3));

    let pids = [agent_a.0.id(), agent_b.0.id(), ne.0.id()];
    let starts: Vec<ProcSample> = pids.iter().map(|p| proc_sample(*p)).collect::<Result<_, _>>()?;
    let t0 = Instant::now();
    let mut polls = 0u64;
    let mut scrapes = 0u64;
    let mut last_progress = 0;
    while t0.elapsed() < Duration::from_secs(opts.seconds) {
        let tick = Instant::now();
        http_unix(&sock_b, "/v1/status").context("polling the agent")?;
        polls += 1;
        http_tcp(&addr, "/metrics").context("scraping the node exporter")?;
        scrapes += 1;
        let elapsed = t0.elapsed().as_secs();
        if elapsed / 10 != last_progress {
            last_progress = elapsed / 10;
            eprintln!("  ... {elapsed}/{} s", opts.seconds);
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
    }
    let window = t0.elapsed();
    let ends: Vec<ProcSample> = pids.iter().map(|p| proc_sample(*p)).collect::<Result<_, _>>()?;

    let agent_size = file_size(&agent_bin)?;
    let ne_size = file_size(&opts.node_exporter)?;
    let rows = [
        Row {
            name: format!("hearth-agent, {} sim GPUs at 1 Hz", opts.gpus),
            start: starts[0],
            end: ends[0],
            binary: Some(agent_size),
        },
        Row {
            name: "hearth-agent, + GET /v1/status at 1 Hz".into(),
            start: starts[1],
            end: ends[1],
            binary: None,
        },
        Row {
            name: "prometheus-node-exporter, scraped at 1 Hz".into(),
            start: starts[2],
            end: ends[2],
            binary: Some(ne_size),
        },
    ];
    let cpu_pct = |r: &Row| (r.end.cpu - r.start.cpu).as_secs_f64() / window.as_secs_f64() * 100.0;
    println!(
        "\nFootprint, {:.0} s window, {} ({polls} agent polls, {scrapes} exporter scrapes)",
        window.as_secs_f64(),
        today()
    );
    println!("{:<44} {:>10} {:>12} {:>10}", "process", "peak RSS", "CPU % core", "binary");
    for r in &rows {
        println!(
            "{:<44} {:>10} {:>11.3}% {:>10}",
            r.name,
            mib(r.end.peak_rss),
            cpu_pct(r),
            r.binary.map(mib).unwrap_or_else(|| "".into())
        );
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}x", a / b) } else { "n/a".into() };
    println!(
        "{:<44} {:>10} {:>12} {:>10}",
        "agent / node-exporter",
        ratio(rows[0].end.peak_rss as f64, rows[2].end.peak_rss as f64),
        ratio(cpu_pct(&rows[0]), cpu_pct(&rows[2])),
        ratio(agent_size as f64, ne_size as f64)
    );
    let rss_ok = rows[0].end.peak_rss <= 10 * 1024 * 1024;
    let cpu_ok = cpu_pct(&rows[0]) <= 0.5;
    println!(
        "goal: agent peak RSS <= 10 MiB [{}], CPU <= 0.5% of a core [{}]",
        if rss_ok { "met" } else { "MISSED" },
        if cpu_ok { "met" } else { "MISSED" }
    );
    Ok(())
}
