//! Time from rollout start to all nodes updated, for a simulated fleet: one real `hearth-fleet`
//! (in-process, SQLite, TLS on loopback) and N light simulated nodes, each enrolled with its own
//! certificate and holding a `hearth/1` session. Told a version (desired state
//! `update_version`), a node reports `downloading` … `rebooting` as the agent does, spends a
//! seeded random update time (download + write) and a reboot-and-check time, then reports
//! `blessed`. The same fleet runs a single 100 % wave (baseline) and then staged waves with a
//! canary; per wave it prints the wall time and the fleet's own share of it (the wave's time
//! minus its slowest node's simulated update), the ratio of the staged rollout to the single wave,
//! and to the ideal (the sum of each wave's slowest node). A third rollout runs the same waves
//! with `--current` more nodes already on its version (their heartbeats say so: recorded
//! `current`, never told) and `--late` more enrolled just after it was created (they join it).
//!
//! Run: `cargo run --release -p hearth-bench --bin update_rollout -- --nodes 100`
//! (docs/benchmarks.md).

#![allow(clippy::print_stdout, clippy::print_stderr)] // a benchmark prints its table

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet_client::enroll::enroll;
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::identity::{csr_pem, generate_key_pem};
use hearth_fleet_client::session::Session;
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_proto::api::NodeState;
use hearth_proto::control::{
    ControlMessage, HealthSummary, Heartbeat, PowerSummary, UpdateReport, Versions,
};
use hearth_proto::fleet::{EnrollRequest, HardwareIdentity, TokenCreateRequest, TokenCreated};
use hearth_proto::rollout::{Rollout, RolloutCreate, RolloutState, WaveSpec};

/// Command-line options.
#[derive(Debug, Parser)]
struct Opts {
    /// Simulated nodes.
    #[arg(long, default_value_t = 100)]
    nodes: u32,
    /// Mean simulated download + slot write time per node, ms (uniform ±50 %).
    #[arg(long, default_value_t = 3000)]
    update_ms: u64,
    /// Simulated reboot and boot check per node, ms.
    #[arg(long, default_value_t = 1500)]
    reboot_ms: u64,
    /// Staged waves: cumulative shares, canary first.
    #[arg(long, default_value = "1,25,50,100")]
    waves: String,
    /// Seed of the simulated times.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Nodes added before the third rollout that already run its version.
    #[arg(long, default_value_t = 5)]
    current: u32,
    /// Nodes enrolled just after the third rollout was created (they join it).
    #[arg(long, default_value_t = 5)]
    late: u32,
}

/// Per node: the simulated update time of each version told, ms.
type Times = Arc<Mutex<BTreeMap<(String, String), u64>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn report(phase: &str, version: &str, done: u64) -> ControlMessage {
    ControlMessage::Update(UpdateReport {
        at_ms: hearth_fleet::now_ms(),
        phase: phase.into(),
        version: Some(version.into()),
        from_version: None,
        bytes_done: done,
        bytes_total: 100 << 20,
        reason: None,
    })
}

/// splitmix64: decorrelates the per-node seeds (neighbouring seeds give close xorshift draws).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

fn rand(x: &mut u64) -> f64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    (*x >> 11) as f64 / (1u64 << 53) as f64
}

fn heartbeat(seq: u64, os: Option<String>) -> ControlMessage {
    ControlMessage::Heartbeat(Heartbeat {
        seq,
        at_ms: hearth_fleet::now_ms(),
        state: NodeState::Ready,
        health: HealthSummary::default(),
        power: PowerSummary::default(),
        versions: Versions { agent: "0.1.0".into(), driver: None, os },
        desired_generation: 0,
    })
}

#[allow(clippy::too_many_arguments)]
async fn sim_node(
    ep: Endpoint,
    pin: String,
    id: ClientIdentity,
    node: String,
    mut rng: u64,
    update_ms: u64,
    reboot_ms: u64,
    times: Times,
    os: &'static str,
) {
    let Ok(s) = Session::open(&ep, &pin, &id, "0.1.0").await else {
        eprintln!("{node}: session failed");
        return;
    };
    let Session { mut reader, writer, .. } = s;
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    // The OS version its heartbeats name: the one it runs (the agent's `Versions::os`).
    let os = Arc::new(Mutex::new(os.to_string()));
    let mut seq = 1u64;
    {
        let mut w = writer.lock().await;
        let hb = heartbeat(seq, Some(lock(&os).clone()));
        if hearth_fleet_client::session::write_message(&mut *w, &hb).await.is_err() {
            return;
        }
    }
    let mut handled = std::collections::HashSet::new();
    loop {
        let m = match tokio::time::timeout(
            Duration::from_secs(5),
            hearth_fleet_client::session::read_message(&mut reader),
        )
        .await
        {
            Ok(Ok(m)) => m,
            Ok(Err(_)) => return,
            Err(_) => {
                seq += 1;
                let hb = heartbeat(seq, Some(lock(&os).clone()));
                let mut w = writer.lock().await;
                if hearth_fleet_client::session::write_message(&mut *w, &hb).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let ControlMessage::Desired(d) = m else { continue };
        let Some(v) = d.update_version else { continue };
        if !handled.insert(v.clone()) || *lock(&os) == v {
            continue; // handled, or already running it (the agent does nothing)
        }
        let t = (update_ms as f64 * (0.5 + rand(&mut rng))) as u64;
        lock(&times).insert((node.clone(), v.clone()), t + reboot_ms);
        let w = writer.clone();
        let os = os.clone();
        tokio::spawn(async move {
            let send = |m: ControlMessage| {
                let w = w.clone();
                async move {
                    let mut w = w.lock().await;
                    hearth_fleet_client::session::write_message(&mut *w, &m).await.is_ok()
                }
            };
            if !send(report("downloading", &v, 0)).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(t / 2)).await;
            send(report("downloading", &v, 50 << 20)).await;
            tokio::time::sleep(Duration::from_millis(t - t / 2)).await;
            send(report("installed", &v, 100 << 20)).await;
            send(report("rebooting", &v, 100 << 20)).await;
            tokio::time::sleep(Duration::from_millis(reboot_ms)).await;
            *lock(&os) = v.clone();
            send(report("blessed", &v, 0)).await;
        });
    }
}

fn waves_of(spec: &str) -> anyhow::Result<Vec<WaveSpec>> {
    spec.split(',')
        .map(|p| {
            let until_pct = p.trim().parse().with_context(|| format!("--waves: {p:?}"))?;
            Ok(WaveSpec { until_pct, max_failure_pct: 10 })
        })
        .collect()
}

struct Run {
    total_s: f64,
    /// Per wave: nodes, wave seconds, slowest simulated update, slowest told → blessed.
    waves: Vec<(usize, f64, f64, f64)>,
    /// Nodes recorded already current, and nodes that joined after creation.
    current: usize,
    joined: usize,
}

/// Enrolls simulated nodes.
#[derive(Clone)]
struct Farm {
    ep: Endpoint,
    pin: String,
    token: String,
    times: Times,
    seed: u64,
    update_ms: u64,
    reboot_ms: u64,
}

impl Farm {
    /// Enroll nodes `first..first + n` running `os` and start their sessions.
    async fn add(&self, first: u32, n: u32, os: &'static str) -> anyhow::Result<()> {
        for n in first..first + n {
            let key = generate_key_pem()?;
            let req = EnrollRequest {
                token: self.token.clone(),
                csr_pem: csr_pem(&key, "node")?,
                hardware: HardwareIdentity {
                    dmi_uuid: format!("4c4c4544-0000-0000-0000-{n:012}"),
                    board_serial: format!("SN{n:06}"),
                    gpu_uuids: vec![],
                },
                hostname: format!("node{n}"),
                gpus: vec![],
                agent_version: "0.1.0".into(),
            };
            let resp = enroll(&self.ep, &self.pin, &req).await?;
            let id = ClientIdentity { cert_pem: resp.cert_pem, key_pem: key };
            tokio::spawn(sim_node(
                self.ep.clone(),
                self.pin.clone(),
                id,
                resp.node_id,
                mix(self.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(n))),
                self.update_ms,
                self.reboot_ms,
                self.times.clone(),
                os,
            ));
        }
        Ok(())
    }
}

async fn rollout(
    ep: &Endpoint,
    admin: &Arc<rustls::ClientConfig>,
    version: &str,
    waves: Vec<WaveSpec>,
    times: &Times,
    late: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>)>,
) -> anyhow::Result<Run> {
    let req = RolloutCreate {
        channel: "stable".into(),
        version: version.into(),
        waves,
        windows: vec![],
        node_timeout_s: None,
    };
    let t0 = Instant::now();
    let r: Rollout = json(ep, admin.clone(), "POST", "/v1/rollouts", Some(&req)).await?;
    let planned = r.nodes.len();
    if let Some((gate, late)) = late {
        // Released now: the late nodes enroll while the rollout runs.
        let _ = gate.send(());
        late.await??;
    }
    let done = loop {
        let r: Rollout =
            json::<(), _>(ep, admin.clone(), "GET", &format!("/v1/rollouts/{}", r.id), None)
                .await?;
        match r.state {
            RolloutState::Completed => break r,
            RolloutState::Running => {}
            other => anyhow::bail!("rollout {} is {other:?}: {:?}", r.id, r.reason),
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(3600), "rollout did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let total_s = t0.elapsed().as_secs_f64();
    let times = lock(times).clone();
    let mut waves = Vec::new();
    for w in 0..done.waves.len() {
        let n = done.counts(w).nodes;
        let (Some(a), Some(b)) = (done.wave_opened_ms[w], done.wave_done_ms[w]) else { continue };
        let in_wave = || done.nodes.iter().filter(|x| x.wave == w);
        let simulated = in_wave()
            .filter_map(|x| times.get(&(x.node.clone(), version.to_string())))
            .max()
            .copied()
            .unwrap_or(0);
        // What the slowest node took from being told to reporting blessed (its own clock is
        // the fleet's here: one process).
        let node_s =
            in_wave().filter_map(|x| Some(x.at_ms?.saturating_sub(x.told_ms?))).max().unwrap_or(0);
        waves.push((
            n,
            b.saturating_sub(a) as f64 / 1000.0,
            simulated as f64 / 1000.0,
            node_s as f64 / 1000.0,
        ));
    }
    let current = done.nodes.iter().filter(|n| n.phase == "current").count();
    Ok(Run { total_s, waves, current, joined: done.nodes.len() - planned })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let tmp = tempfile::tempdir_in({
        std::fs::create_dir_all("target")?;
        "target"
    })?;
    let fleet = hearth_fleet::server::start(FleetConfig {
        listen: "127.0.0.1:0".parse()?,
        state_dir: tmp.path().join("fleet"),
        flush_interval_ms: 1000,
        ..FleetConfig::default()
    })
    .await?;
    let pin = fleet.fleet.ca.pin();
    let (op, key) =
        fleet.fleet.ca.operator_cert("bench", Role::Admin, Duration::from_secs(7200))?;
    let admin = client_config(
        &pin,
        Some(&ClientIdentity { cert_pem: op.cert_pem, key_pem: key }),
        b"http/1.1",
    )?;
    let ep = Endpoint::from_url(&format!("https://{}", fleet.addr), "hearth-fleet")?;
    let req = TokenCreateRequest {
        labels: BTreeMap::new(),
        ttl_s: 3600,
        max_uses: o.nodes + o.current + o.late,
        channel: None,
    };
    let token: TokenCreated = json(&ep, admin.clone(), "POST", "/v1/tokens", Some(&req)).await?;
    let times: Times = Arc::default();
    let farm = Farm {
        ep: ep.clone(),
        pin: pin.clone(),
        token: token.token.clone(),
        times: times.clone(),
        seed: o.seed,
        update_ms: o.update_ms,
        reboot_ms: o.reboot_ms,
    };
    let t = Instant::now();
    farm.add(0, o.nodes, "1.0").await?;
    eprintln!("{} nodes enrolled in {:.1} s", o.nodes, t.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(2)).await;

    let single = rollout(&ep, &admin, "2.0", waves_of("100")?, &times, None).await?;
    let staged = rollout(&ep, &admin, "3.0", waves_of(&o.waves)?, &times, None).await?;
    // The same waves with nodes already on the version and nodes joining late.
    farm.add(o.nodes, o.current, "4.0").await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // their heartbeats reach the registry
    let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
    let late_farm = farm.clone();
    let (first_late, late_n) = (o.nodes + o.current, o.late);
    let late = tokio::spawn(async move {
        gate_rx.await.ok();
        late_farm.add(first_late, late_n, "1.0").await
    });
    let mixed =
        rollout(&ep, &admin, "4.0", waves_of(&o.waves)?, &times, Some((gate_tx, late))).await?;
    println!(
        "time from rollout start to all nodes updated: {} simulated nodes, update {} ms ±50 %, reboot + check {} ms",
        o.nodes, o.update_ms, o.reboot_ms
    );
    println!(
        "| rollout | wave | nodes | wave s | slowest simulated update s | slowest told -> blessed s | fleet share s |"
    );
    println!("|---|---|---|---|---|---|---|");
    let staged_name = format!("waves {}", o.waves);
    let mixed_name = format!(
        "waves {}, +{} current, +{} late ({} current, {} joined)",
        o.waves, o.current, o.late, mixed.current, mixed.joined
    );
    for (name, run) in [
        ("single 100 % wave", &single),
        (staged_name.as_str(), &staged),
        (mixed_name.as_str(), &mixed),
    ] {
        for (w, (n, secs, simulated, node_s)) in run.waves.iter().enumerate() {
            println!(
                "| {name} | {} | {n} | {secs:.2} | {simulated:.2} | {node_s:.2} | {:.2} |",
                w + 1,
                secs - simulated
            );
        }
    }
    let ideal: f64 = staged.waves.iter().map(|w| w.2).sum();
    println!("| total | | | | | | |");
    println!("| single 100 % wave | all | {} | {:.2} | | | |", o.nodes, single.total_s);
    println!(
        "| waves {} | all | {} | {:.2} ({:.2}x the single wave; ideal {ideal:.2} s, {:.2}x of it) | | | |",
        o.waves,
        o.nodes,
        staged.total_s,
        staged.total_s / single.total_s,
        staged.total_s / ideal.max(0.001)
    );
    let ideal_mixed: f64 = mixed.waves.iter().map(|w| w.2).sum();
    println!(
        "| {mixed_name} | all | {} | {:.2} ({:.2}x the plain staged run; ideal {ideal_mixed:.2} s, {:.2}x of it) | | | |",
        o.nodes + o.current + o.late,
        mixed.total_s,
        mixed.total_s / staged.total_s,
        mixed.total_s / ideal_mixed.max(0.001)
    );
    fleet.stop().await;
    Ok(())
}
