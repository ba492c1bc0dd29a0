//! Enrollment throughput of `hearth-fleet`: light clients enroll with one multi-use token (each
//! with its own key, CSR and hardware identity) against a fleet on SQLite and, when a URL is
//! given, PostgreSQL. Baseline in the same run: the same number of fresh TLS 1.3 connections to
//! the same listener each making one cheap authenticated-refused request (`GET /v1/nodes` without
//! a certificate: handshake + HTTP, no registry write), so the ratio shows what enrollment
//! (CSR verification, signing, one registry transaction) costs on top of a connection.
//!
//! The fleet runs on a runtime pinned to CPU 0 (its blocking registry threads too), the load on
//! CPU 1. Keys and CSRs are made before the clock starts (node-side cost).
//!
//! Run: `cargo run --release -p hearth-bench --bin enroll -- --count 2000 --concurrency 32
//! [--postgres URL]` (see docs/benchmarks.md).

#![allow(clippy::print_stdout, clippy::print_stderr)] // a benchmark prints its table

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet_client::https::{Endpoint, json, request};
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_proto::fleet::{EnrollRequest, HardwareIdentity, TokenCreateRequest, TokenCreated};

/// Command-line options.
#[derive(Debug, Parser)]
struct Opts {
    /// Enrollments (and baseline requests) per backend.
    #[arg(long, default_value_t = 2000)]
    count: u32,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Also measure on this PostgreSQL database (an empty one; e.g. $HEARTH_TEST_POSTGRES_URL).
    #[arg(long, env = "HEARTH_BENCH_POSTGRES_URL")]
    postgres: Option<String>,
}

fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it; sched_setaffinity(0, …)
    // changes only the calling thread and reports failure by its return value (ignored: on a
    // 1-CPU machine the bench still runs, unpinned).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn runtime(cpu: usize, workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .on_thread_start(move || pin_to(cpu))
        .enable_all()
        .build()
        .context("cannot build a runtime")
}

struct Result_ {
    enroll_s: f64,
    baseline_s: f64,
}

fn measure(opts: &Opts, registry: String, label: &str) -> anyhow::Result<Result_> {
    let dir = tempfile::tempdir()?;
    let fleet_rt = runtime(0, 1)?;
    let load_rt = runtime(1, 1)?;
    let config = FleetConfig {
        listen: "127.0.0.1:0".parse()?,
        state_dir: dir.path().join("fleet"),
        registry: Some(registry),
        ..FleetConfig::default()
    };
    let fleet = fleet_rt.block_on(hearth_fleet::server::start(config))?;
    let addr = fleet.addr;
    let pin = fleet.fleet.ca.pin();
    let (op, key) =
        fleet.fleet.ca.operator_cert("bench", Role::Admin, Duration::from_secs(3600))?;
    let admin = client_config(
        &pin,
        Some(&ClientIdentity { cert_pem: op.cert_pem, key_pem: key }),
        b"http/1.1",
    )?;
    let anon = client_config(&pin, None, b"http/1.1")?;
    let ep = Endpoint::from_url(&format!("https://{addr}"), "hearth-fleet")?;

    eprintln!("[{label}] preparing {} keys and CSRs", opts.count);
    let token: TokenCreated = load_rt.block_on(json(
        &ep,
        admin,
        "POST",
        "/v1/tokens",
        Some(&TokenCreateRequest {
            labels: Default::default(),
            ttl_s: 3600,
            max_uses: opts.count,
            channel: None,
        }),
    ))?;
    let mut bodies = Vec::with_capacity(opts.count as usize);
    let inventory = hearth_bench::sim_gpu_inventory(8)?;
    for n in 0..opts.count {
        let key = hearth_fleet_client::identity::generate_key_pem()?;
        let req = EnrollRequest {
            token: token.token.clone(),
            csr_pem: hearth_fleet_client::identity::csr_pem(&key, "bench")?,
            hardware: HardwareIdentity {
                dmi_uuid: format!("b0000000-0000-4000-8000-{n:012}"),
                board_serial: format!("BENCH{n:08}"),
                gpu_uuids: inventory
                    .iter()
                    .map(|g| hearth_bench::node_gpu_uuid(u64::from(n), g.index))
                    .collect(),
            },
            hostname: format!("bench{n}"),
            gpus: hearth_bench::node_gpu_inventory(&inventory, u64::from(n)),
            agent_version: "bench".into(),
        };
        bodies.push(serde_json::to_vec(&req)?);
    }

    let run =
        |path: &'static str, method: &'static str, bodies: Vec<Option<Vec<u8>>>, want: u16| {
            let ep = ep.clone();
            let cfg = anon.clone();
            let conc = opts.concurrency;
            load_rt.block_on(async move {
                let queue = Arc::new(tokio::sync::Mutex::new(bodies));
                let t0 = Instant::now();
                let mut tasks = Vec::new();
                for _ in 0..conc {
                    let (queue, ep, cfg) = (queue.clone(), ep.clone(), cfg.clone());
                    tasks.push(tokio::spawn(async move {
                        loop {
                            let Some(body) = queue.lock().await.pop() else {
                                return Ok::<_, anyhow::Error>(());
                            };
                            let r = request(&ep, cfg.clone(), method, path, body).await?;
                            anyhow::ensure!(
                                r.status == want,
                                "{path}: status {} {}",
                                r.status,
                                String::from_utf8_lossy(&r.body)
                            );
                        }
                    }));
                }
                for t in tasks {
                    t.await??;
                }
                anyhow::Ok(t0.elapsed().as_secs_f64())
            })
        };
    eprintln!("[{label}] baseline: {} TLS connections with one refused request each", opts.count);
    let baseline_s = run("/v1/nodes", "GET", vec![None; opts.count as usize], 401)?;
    eprintln!("[{label}] {} enrollments", opts.count);
    let enroll_s = run("/v1/enroll", "POST", bodies.into_iter().map(Some).collect(), 200)?;
    let nodes = fleet.fleet.registry.nodes()?.len();
    anyhow::ensure!(
        nodes == opts.count as usize,
        "{nodes} nodes registered, expected {}",
        opts.count
    );
    fleet_rt.block_on(fleet.stop());
    Ok(Result_ { enroll_s, baseline_s })
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let mut rows = Vec::new();
    let dir = tempfile::tempdir()?;
    let sqlite = format!("sqlite:{}", dir.path().join("bench.db").display());
    rows.push(("sqlite", measure(&opts, sqlite, "sqlite")?));
    if let Some(pg) = opts.postgres.clone() {
        rows.push(("postgres", measure(&opts, pg, "postgres")?));
    }
    println!(
        "\nhearth-fleet enrollments, {} per backend, {} in flight, fleet on CPU 0, load on CPU 1 ({})",
        opts.count,
        opts.concurrency,
        hearth_bench::today()
    );
    println!("| registry | enrollments/s | baseline connections+request/s | enroll / baseline |");
    println!("|---|---|---|---|");
    for (name, r) in rows {
        let e = f64::from(opts.count) / r.enroll_s;
        let b = f64::from(opts.count) / r.baseline_s;
        println!("| {name} | {e:.0} | {b:.0} | {:.2}x |", e / b);
    }
    println!("goal: >= 500 enrollments/s");
    Ok(())
}
