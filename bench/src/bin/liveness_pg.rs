//! Liveness batch cost on PostgreSQL, by the `node_liveness` table's fill factor: the table as
//! the registry first made it (fill factor 100: pages packed full) against one with free room on
//! each page, so that an `UPDATE` can put the new row version on the same page and skip the
//! primary-key index (a HOT update), in one run (`docs/fleet-scaling.md`, `docs/benchmarks.md`).
//!
//! Each table gets `--nodes` rows the way enrollment makes them (`node_id` only), then batches
//! alternate between the tables: one transaction per batch, one `UPDATE … FROM
//! json_to_recordset($1)` per 5,000 nodes, the statement `Registry::record_seen` runs. Per batch
//! it measures the server backend's CPU time (`/proc/<pid>`: the database runs on this
//! machine), the wall time including the commit, and the share of HOT updates
//! (`pg_stat_xact_user_tables`, read before the commit). The first batches, while the rows grow
//! from empty to a full heartbeat, are reported apart from the steady state.
//!
//! Run: `bench/liveness-pg` (a private PostgreSQL cluster), or `cargo run --release -p
//! hearth-bench --bin liveness_pg -- --url postgres://…`.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a benchmark prints its table

use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::Parser;

/// Command-line options.
#[derive(Debug, Parser)]
struct Opts {
    /// PostgreSQL URL (a scratch database: the benchmark creates and drops its own tables).
    #[arg(long)]
    url: String,
    /// Nodes (rows) per table.
    #[arg(long, default_value_t = 20_000)]
    nodes: usize,
    /// Batches per table (each updates every row once, as one liveness flush does).
    #[arg(long, default_value_t = 12)]
    batches: usize,
    /// Batches per table counted as warm-up (the rows grow to their full size).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// The fill factor compared with 100.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u32).range(10..=100))]
    fillfactor: u32,
}

/// Rows per statement, as the registry's `SEEN_CHUNK`.
const CHUNK: usize = hearth_fleet::registry::SEEN_CHUNK;

/// One batch's figures.
#[derive(Debug, Clone, Copy)]
struct Batch {
    cpu_us_per_row: f64,
    wall_us_per_row: f64,
    hot_share: f64,
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    if o.warmup >= o.batches {
        bail!("--warmup {} must be below --batches {}", o.warmup, o.batches);
    }
    let mut c = postgres::Client::connect(&o.url, postgres::NoTls)
        .with_context(|| format!("connect to {}", o.url))?;
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    let version: String = c.query_one("SHOW server_version", &[])?.get(0);
    let tables = [(100u32, "bench_liveness_ff100"), (o.fillfactor, "bench_liveness_ffx")];
    for (ff, t) in tables {
        c.batch_execute(&format!(
            "DROP TABLE IF EXISTS {t};
             CREATE TABLE {t} (node_id TEXT PRIMARY KEY, last_seen_ms BIGINT, heartbeat TEXT,
                 protocol_version BIGINT, gateway TEXT) WITH (fillfactor = {ff})"
        ))?;
        let mut tx = c.transaction()?;
        let ins = tx.prepare(&format!("INSERT INTO {t} (node_id) VALUES ($1)"))?;
        for i in 0..o.nodes {
            tx.execute(&ins, &[&node(i)])?;
        }
        tx.commit()?;
    }
    println!(
        "liveness batches on PostgreSQL {version}: {} rows per table, {} batches each ({} warm-up), \
         fill factor 100 against {}",
        o.nodes, o.batches, o.warmup, o.fillfactor
    );
    let mut results: Vec<Vec<Batch>> = vec![Vec::new(), Vec::new()];
    for b in 0..o.batches {
        for (k, (_, t)) in tables.iter().enumerate() {
            let r = batch(&mut c, pid, t, o.nodes, 1_000_000 + b as i64)?;
            eprintln!(
                "  batch {b} {t}: CPU {:.1} µs/row, wall {:.1} µs/row, HOT {:.0} %",
                r.cpu_us_per_row,
                r.wall_us_per_row,
                r.hot_share * 100.0
            );
            results[k].push(r);
        }
    }
    let mut sizes = Vec::new();
    for (_, t) in tables {
        let bytes: i64 = c.query_one(&format!("SELECT pg_table_size('{t}')"), &[])?.get(0);
        sizes.push(bytes);
        c.batch_execute(&format!("DROP TABLE {t}"))?;
    }
    println!();
    println!(
        "| figure (median of {} batches after {} warm-up) | fill factor 100 | fill factor {} | ratio |",
        o.batches - o.warmup,
        o.warmup,
        o.fillfactor
    );
    println!("|---|---|---|---|");
    let steady = |k: usize, f: fn(&Batch) -> f64| median(results[k][o.warmup..].iter().map(f));
    for (name, f) in [
        ("server CPU per row (µs)", (|b: &Batch| b.cpu_us_per_row) as fn(&Batch) -> f64),
        ("wall time per row, commit included (µs)", |b: &Batch| b.wall_us_per_row),
    ] {
        let (a, x) = (steady(0, f), steady(1, f));
        println!("| {name} | {a:.2} | {x:.2} | {:.2} |", x / a);
    }
    let (a, x) = (steady(0, |b| b.hot_share), steady(1, |b| b.hot_share));
    println!("| HOT updates (share of rows) | {:.0} % | {:.0} % | |", a * 100.0, x * 100.0);
    println!(
        "| table size at the end (MiB) | {:.1} | {:.1} | {:.2} |",
        sizes[0] as f64 / 1048576.0,
        sizes[1] as f64 / 1048576.0,
        sizes[1] as f64 / sizes[0] as f64
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    Ok(())
}

/// Node id `i`, in the fleet's format.
fn node(i: usize) -> String {
    format!("n-{i:012x}")
}

/// One liveness flush of every row of `table`, in one transaction.
fn batch(
    c: &mut postgres::Client,
    pid: i32,
    table: &str,
    nodes: usize,
    seen: i64,
) -> anyhow::Result<Batch> {
    let sql = format!(
        "UPDATE {table} SET last_seen_ms = v.seen, heartbeat = v.hb::text, \
         protocol_version = v.pv, gateway = v.gw \
         FROM json_to_recordset(CAST($1 AS TEXT)::json) \
         AS v(id TEXT, seen BIGINT, hb JSON, pv BIGINT, gw TEXT) \
         WHERE {table}.node_id = v.id"
    );
    // The JSON is built before the clock starts: the fleet's side of the work is not measured.
    let chunks: Vec<String> = (0..nodes)
        .collect::<Vec<_>>()
        .chunks(CHUNK)
        .map(|ids| {
            let rows: Vec<serde_json::Value> = ids
                .iter()
                .map(|&i| {
                    serde_json::json!({
                        "id": node(i), "seen": seen + i as i64, "pv": 2, "gw": "g1",
                        "hb": heartbeat(seen, i),
                    })
                })
                .collect();
            serde_json::Value::Array(rows).to_string()
        })
        .collect();
    let cpu0 = backend_cpu_us(pid)?;
    let t0 = Instant::now();
    let mut tx = c.transaction()?;
    let stmt = tx.prepare(&sql)?;
    let mut updated = 0u64;
    for chunk in &chunks {
        updated += tx.execute(&stmt, &[chunk])?;
    }
    let row = tx.query_one(
        "SELECT COALESCE(n_tup_upd, 0), COALESCE(n_tup_hot_upd, 0) \
         FROM pg_stat_xact_user_tables WHERE relname = $1",
        &[&table],
    )?;
    tx.commit()?;
    let wall = t0.elapsed();
    let cpu = backend_cpu_us(pid)? - cpu0;
    if updated != nodes as u64 {
        bail!("{table}: the batch updated {updated} rows of {nodes}");
    }
    let (upd, hot): (i64, i64) = (row.get(0), row.get(1));
    Ok(Batch {
        cpu_us_per_row: cpu / nodes as f64,
        wall_us_per_row: wall.as_secs_f64() * 1e6 / nodes as f64,
        hot_share: if upd > 0 { hot as f64 / upd as f64 } else { 0.0 },
    })
}

/// A heartbeat as a node with 8 GPUs sends it (≈ 0.3 KB; the sequence number varies its size
/// a little, as real ones do).
fn heartbeat(seen: i64, i: usize) -> serde_json::Value {
    serde_json::json!({
        "seq": seen % 100_000 + i as i64, "at_ms": seen, "state": "ready",
        "health": {"gpus": 8, "healthy": 8, "degraded": 0, "failed": 0},
        "power": {"draw_w": 4000 + (i % 700), "limit_w": 5600},
        "versions": {"agent": "0.1.0", "driver": "550.54.15", "os": "hearth 1"},
        "desired_generation": 1,
    })
}

/// CPU time (user + system) of the server backend `pid`, microseconds.
fn backend_cpu_us(pid: i32) -> anyhow::Result<f64> {
    let pid = u32::try_from(pid).context("backend pid")?;
    let sample = hearth_bench::proc_sample(pid)
        .context("sample the server backend (the server must run on this machine)")?;
    Ok(sample.cpu.as_secs_f64() * 1e6)
}

fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
