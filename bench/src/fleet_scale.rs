//! The fleet scale benchmark (`src/bin/fleet_scale.rs`, driven by `bench/fleet-scale`): many
//! light simulated nodes against one `hearth-fleet` process, on SQLite and on PostgreSQL.
//!
//! Entry point: [`run`]. For each registry it starts `hearth-fleet serve` pinned to one core
//! (`taskset`), pins itself to the other, and then:
//! 1. enrolls `--sessions` nodes through the real enrollment API (`POST /v1/enroll`, one token
//!    with that many uses), each with its own P-256 key and CSR made here beforehand: the
//!    enrollment rate is timed over all of them;
//! 2. opens one mTLS `hearth/1` session per node, each from its own source address in
//!    127.0.0.0/8 ([`source_addr`]) so ephemeral ports never run out;
//! 3. sends heartbeats at `--rate` per second in total (spread evenly over the sessions with
//!    random phases) and times each until its `HeartbeatAck`;
//! 4. after a warm-up, measures over `--seconds`: acks per second, latency quantiles
//!    ([`crate::hist::Histogram`]), the fleet's CPU and memory per session (`/proc`), and, read
//!    from the registry itself every poll, how many node rows changed (durable liveness writes)
//!    and how stale the oldest `last_seen_ms` is; the fleet's `liveness written` log lines give
//!    its batch write time; acks slower than the p99 goal are counted per second and the worst
//!    seconds set beside the batches written then ([`slowest_seconds`]), with the hypervisor's
//!    steal per core.
//!
//! Everything ends in one table ([`print_table`]) with both backends, the goals and the
//! extrapolation to 200,000 nodes. Design and the scaling past one machine:
//! `docs/fleet-scaling.md`.

#![allow(clippy::print_stdout)] // the benchmark's product is its table and progress lines

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hearth_fleet_client::enroll::enroll;
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::identity::{csr_pem, generate_key_pem};
use hearth_fleet_client::session::{SessionError, read_message, write_message};
use hearth_fleet_client::tls::{ClientIdentity, client_config, server_name};
use hearth_proto::api::NodeState;
use hearth_proto::control::{
    self, ControlMessage, HealthSummary, Heartbeat, Hello, PowerSummary, Versions,
};
use hearth_proto::fleet::{EnrollRequest, HardwareIdentity, TokenCreateRequest, TokenCreated};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::hist::Histogram;
use crate::{Guarded, mib, proc_sample, today};

/// The fleet name used by the benchmark's fleets.
const FLEET_NAME: &str = "hearth-fleet";
/// File descriptors kept back from `RLIMIT_NOFILE` for everything but sessions.
const FD_MARGIN: u64 = 512;
/// Nodes the extrapolation is made for.
pub const EXTRAPOLATE_NODES: u64 = 200_000;

/// The goals on a 2-core machine.
pub mod goals {
    /// Sessions held.
    pub const SESSIONS: u64 = 50_000;
    /// Heartbeats per second, sustained.
    pub const HEARTBEATS_PER_S: f64 = 20_000.0;
    /// p99 heartbeat latency, ms.
    pub const P99_MS: f64 = 50.0;
    /// Enrollments per second.
    pub const ENROLLMENTS_PER_S: f64 = 500.0;
    /// Oldest durable `last_seen_ms` of a node that heartbeats, seconds.
    pub const STALENESS_S: f64 = 30.0;
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `hearth-fleet` binary.
    pub fleet_bin: PathBuf,
    /// Registries, in order: `sqlite` or a PostgreSQL server URL (a fresh database is created
    /// on it for each run and dropped after).
    pub registries: Vec<String>,
    /// Nodes (enrollments and sessions).
    pub sessions: u64,
    /// Heartbeats per second offered in total.
    pub rate: f64,
    /// Warm-up after the last session opened, seconds.
    pub warmup_s: u64,
    /// Measurement window, seconds.
    pub seconds: u64,
    /// Enrollments in flight.
    pub enroll_concurrency: usize,
    /// Session opens in flight.
    pub connect_concurrency: usize,
    /// The fleet's `flush_interval_ms`.
    pub flush_ms: u64,
    /// CPU the fleet (and PostgreSQL) runs on.
    pub fleet_cpu: usize,
    /// CPU this load generator runs on.
    pub load_cpu: usize,
    /// Fleet gateway processes sharing one address (`SO_REUSEPORT`) and the registry; 0: as
    /// many as the file-descriptor limit needs for the sessions.
    pub gateways: usize,
    /// Load-generator worker processes holding the sessions; 0: as many as the limit needs.
    pub workers: usize,
    /// This machine's per-process file-descriptor limit (set by [`run`]).
    pub nofile: u64,
}

/// Processes needed to hold `sessions` with `per_process` each (at least one).
pub fn processes_for(sessions: u64, per_process: u64) -> usize {
    usize::try_from(sessions.div_ceil(per_process.max(1)).max(1)).unwrap_or(usize::MAX)
}

/// Source address of session `i`: spread over 127.1.0.1–127.1.64.254 (16,384 addresses), so each
/// address carries few connections and its ephemeral ports never run out.
pub fn source_addr(i: u64) -> Ipv4Addr {
    let k = i % 16_384;
    let c = (k / 254) as u8;
    let d = (k % 254) as u8 + 1;
    Ipv4Addr::new(127, 1, c, d)
}

/// A stable pseudo-random fraction in [0, 1) for session `i` (its heartbeat phase).
pub fn phase_fraction(i: u64) -> f64 {
    // SplitMix64 finaliser.
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Pin this process (all its threads to come) to one CPU.
pub fn pin_self(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set`; `cpu` is bounds-checked by the macro.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; `set` is a valid cpu_set_t of the size given.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot pin to CPU {cpu}"));
    }
    Ok(())
}

/// Raise the soft `RLIMIT_NOFILE` to the hard one; the new soft limit.
pub fn raise_nofile() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid rlimit to write into.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit; raising the soft limit to the hard one is always allowed.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(lim.rlim_cur)
}

/// Sessions one process can hold with a file-descriptor limit of `nofile`.
pub fn sessions_allowed(nofile: u64) -> u64 {
    nofile.saturating_sub(FD_MARGIN)
}

/// Counters shared by every session task.
#[derive(Debug, Default)]
struct Load {
    /// Sessions open now.
    open: AtomicU64,
    /// Sessions that opened (some may have ended since).
    opened: AtomicU64,
    /// Sessions that failed to open.
    open_failed: AtomicU64,
    /// Sessions that ended after opening (the fleet closed or an error).
    dropped: AtomicU64,
    /// Recording window on.
    measuring: AtomicBool,
    /// Heartbeats sent in the window.
    sent: AtomicU64,
    /// Acks received in the window.
    acked: AtomicU64,
    /// Heartbeat → ack latency in the window.
    latency: Histogram,
    /// Acks slower than the p99 goal in the window, by the Unix second their heartbeat was
    /// sent: whether the tail is spread out or comes from a few stalls.
    slow: Mutex<BTreeMap<u64, u64>>,
    /// The first error seen.
    first_error: Mutex<Option<String>>,
}

impl Load {
    fn note(&self, latency: Duration) {
        self.latency.record(latency);
        self.acked.fetch_add(1, Ordering::Relaxed);
        if latency.as_secs_f64() * 1e3 > goals::P99_MS {
            let sent_s = now_ms().saturating_sub(latency.as_millis() as u64) / 1000;
            *self.slow.lock().unwrap_or_else(PoisonError::into_inner).entry(sent_s).or_default() +=
                1;
        }
    }

    fn error(&self, e: impl std::fmt::Display) {
        let mut f = self.first_error.lock().unwrap_or_else(PoisonError::into_inner);
        if f.is_none() {
            *f = Some(e.to_string());
        }
    }
}

/// One backend's figures.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// Sessions asked for.
    pub requested: u64,
    /// Enrollments that succeeded.
    pub enrolled: u64,
    /// Enrollments per second.
    pub enroll_rate: f64,
    /// p99 enrollment latency.
    pub enroll_p99: Duration,
    /// Sessions opened per second (TLS handshake with client certificate, Hello, Welcome).
    pub open_rate: f64,
    /// Sessions open at the end of the window.
    pub held: u64,
    /// Sessions that failed to open or dropped.
    pub failed: u64,
    /// Heartbeats offered per second.
    pub offered: f64,
    /// Heartbeats acked per second over the window.
    pub acked_rate: f64,
    /// Latency quantiles.
    pub p50: Duration,
    /// p99.
    pub p99: Duration,
    /// p99.9.
    pub p999: Duration,
    /// Node rows whose `last_seen_ms` changed in the registry, per second of the window.
    pub writes_rate: f64,
    /// Oldest `last_seen_ms` seen in the registry during the window, seconds.
    pub staleness_s: f64,
    /// Rows the fleet wrote per second of registry time (its batches).
    pub write_capacity: f64,
    /// Liveness batches in the window.
    pub batches: u64,
    /// Fleet RSS before sessions.
    pub rss_before: u64,
    /// Fleet RSS with the sessions open.
    pub rss_after: u64,
    /// Fleet CPU over the window, share of one core.
    pub fleet_cpu: f64,
    /// PostgreSQL server CPU over the window (postmaster and all its backends), share of one
    /// core; 0 on SQLite (there the registry runs inside the fleet process).
    pub db_cpu: f64,
    /// The PostgreSQL server's scheduler weight against the fleet on a shared core: the nice
    /// value of its autogroup (`/proc/PID/autogroup`); `None` on SQLite or when unreadable.
    pub db_nice: Option<i32>,
    /// The CPUs the PostgreSQL server may run on (`Cpus_allowed_list` of the postmaster), to
    /// say whether it shared the fleet's core; `None` on SQLite or when unreadable.
    pub db_cpus: Option<String>,
    /// The load generator's CPU over the window (its worker processes and this process), share
    /// of one core: near 100 % means the load core, not the fleet, sets the latency tail.
    pub load_cpu_share: f64,
    /// Acks slower than the p99 goal, by the Unix second their heartbeat was sent.
    pub slow: BTreeMap<u64, u64>,
    /// The window's liveness batches, every gateway's, in the order they ended.
    pub batch_log: Vec<Batch>,
    /// Share of the window the hypervisor took from the fleet's core and from the load's core
    /// (`steal` in `/proc/stat`): time neither could run, whatever its priority.
    pub steal: (f64, f64),
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Fleet gateway processes.
    pub gateways: usize,
    /// Load worker processes.
    pub workers: usize,
}

/// One liveness batch, from a gateway's `liveness written` log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Batch {
    /// Gateway index.
    pub gateway: usize,
    /// When the write ended, ms since midnight UTC (the log line's time).
    pub end_ms: u64,
    /// How long it took.
    pub elapsed_ms: u64,
    /// Rows written.
    pub rows: u64,
}

impl Figures {
    /// Acks slower than the p99 goal in the window.
    pub fn slow_total(&self) -> u64 {
        self.slow.values().sum()
    }

    /// CPU-µs spent per heartbeat acked: (fleet, database server). Everything the fleet does
    /// in the window (sessions, sweep, liveness writes) divided by the heartbeats it acked.
    pub fn cpu_us_per_heartbeat(&self) -> Option<(f64, f64)> {
        (self.acked_rate > 0.0)
            .then(|| (self.fleet_cpu / self.acked_rate * 1e6, self.db_cpu / self.acked_rate * 1e6))
    }

    /// Fleet memory per held session, bytes.
    pub fn bytes_per_session(&self) -> f64 {
        if self.held == 0 {
            return 0.0;
        }
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.held as f64
    }
}

fn heartbeat(seq: u64) -> ControlMessage {
    ControlMessage::Heartbeat(Heartbeat {
        seq,
        at_ms: now_ms(),
        state: NodeState::Ready,
        health: HealthSummary { gpus: 8, healthy: 8, degraded: 0, failed: 0 },
        power: PowerSummary { draw_w: 4200 + (seq % 50) as u32, limit_w: 5600 },
        versions: Versions {
            agent: "0.1.0".into(),
            driver: Some("580.65.06".into()),
            os: Some("hearth-os 2026.11".into()),
        },
        desired_generation: 1,
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Reader = ReadHalf<TlsStream<TcpStream>>;
type Writer = WriteHalf<TlsStream<TcpStream>>;

async fn read_owned(mut r: Reader) -> (Reader, Result<ControlMessage, SessionError>) {
    let m = read_message(&mut r).await;
    (r, m)
}

/// TCP from `src`, TLS 1.3 with the node's certificate (ALPN `hearth/1`), Hello → Welcome.
async fn open_session(
    fleet: SocketAddr,
    src: Ipv4Addr,
    config: Arc<rustls::ClientConfig>,
) -> anyhow::Result<(Reader, Writer)> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src.into(), 0)).with_context(|| format!("bind {src}"))?;
    let tcp = sock.connect(fleet).await.with_context(|| format!("connect from {src}"))?;
    tcp.set_nodelay(true)?;
    let name = server_name(FLEET_NAME)?;
    let tls = TlsConnector::from(config).connect(name, tcp).await.context("TLS handshake")?;
    let (mut r, mut w) = tokio::io::split(tls);
    let hello = ControlMessage::Hello(Hello {
        protocol_version: control::PROTOCOL_VERSION,
        agent_version: "0.1.0".into(),
    });
    write_message(&mut w, &hello).await?;
    match read_message(&mut r).await? {
        ControlMessage::Welcome(_) => Ok((r, w)),
        other => bail!("expected Welcome, got {other:?}"),
    }
}

/// Heartbeat every `period` (first after `phase`) until `stop`; time each ack.
async fn heartbeat_loop(
    r: Reader,
    mut w: Writer,
    period: Duration,
    phase: Duration,
    load: Arc<Load>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next = tokio::time::Instant::now() + phase;
    let mut seq = 0u64;
    let mut pending: VecDeque<(u64, Instant, bool)> = VecDeque::new();
    let mut read = Box::pin(read_owned(r));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            (r, m) = &mut read => {
                match m {
                    Ok(ControlMessage::HeartbeatAck { seq: s }) => {
                        while let Some((ps, at, measured)) = pending.pop_front() {
                            if ps == s {
                                if measured && load.measuring.load(Ordering::Relaxed) {
                                    load.note(at.elapsed());
                                }
                                break;
                            }
                        }
                    }
                    Ok(_) => {} // Desired state, commands: a light node ignores them.
                    Err(e) => {
                        load.error(format!("session ended: {e:#}"));
                        break;
                    }
                }
                read.set(read_owned(r));
            }
            () = tokio::time::sleep_until(next) => {
                seq += 1;
                let measured = load.measuring.load(Ordering::Relaxed);
                if measured {
                    load.sent.fetch_add(1, Ordering::Relaxed);
                }
                pending.push_back((seq, Instant::now(), measured));
                if pending.len() > 64 {
                    pending.pop_front();
                }
                if let Err(e) = write_message(&mut w, &heartbeat(seq)).await {
                    load.error(format!("heartbeat write: {e:#}"));
                    break;
                }
                let now = tokio::time::Instant::now();
                next += period;
                if next < now {
                    next = now + period; // fell behind: no catch-up burst
                }
            }
        }
    }
    load.open.fetch_sub(1, Ordering::Relaxed);
    load.dropped.fetch_add(1, Ordering::Relaxed);
}

/// The started fleet: its gateway processes (children and logs), the shared address and the
/// operator's credentials.
struct Fleets {
    procs: Vec<(Guarded, PathBuf)>,
    addr: SocketAddr,
    admin: ClientIdentity,
    ep: Endpoint,
    pin: String,
}

impl Fleets {
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|(c, _)| c.0.id()).collect()
    }

    /// CPU and RSS summed over the gateways.
    fn sample(&self) -> anyhow::Result<(Duration, u64)> {
        let mut cpu = Duration::ZERO;
        let mut rss = 0;
        for pid in self.pids() {
            let s = proc_sample(pid)?;
            cpu += s.cpu;
            rss += s.rss;
        }
        Ok((cpu, rss))
    }

    fn log_lens(&self) -> Vec<u64> {
        self.procs.iter().map(|(_, l)| log_len(l)).collect()
    }

    /// Every liveness batch between two [`Fleets::log_lens`], in the order they ended.
    fn batch_log(&self, from: &[u64], to: &[u64]) -> Vec<Batch> {
        let mut out = Vec::new();
        for (k, (((_, log), a), b)) in self.procs.iter().zip(from).zip(to).enumerate() {
            out.extend(parse_batch_lines(&log_slice(log, *a, *b), k));
        }
        out.sort_by_key(|b| b.end_ms);
        out
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(l.local_addr()?.port())
}

/// Start `n` gateway processes of one fleet on one address and one registry, one after the
/// other (the first creates the CA in the shared state directory, the others load it).
fn start_fleets(opts: &Options, dir: &Path, registry: &str, n: usize) -> anyhow::Result<Fleets> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let state = dir.join("fleet");
    let mut procs = Vec::with_capacity(n);
    let mut admin = None;
    for k in 0..n {
        let config = dir.join(format!("fleet-g{k}.toml"));
        let multi = if n > 1 {
            format!("gateway_id = \"g{k}\"\nreuse_port = true\n")
        } else {
            String::new()
        };
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\nname = \"{FLEET_NAME}\"\nstate_dir = \"{}\"\nregistry = \"{registry}\"\nflush_interval_ms = {}\n{multi}",
                state.display(),
                opts.flush_ms
            ),
        )
        .with_context(|| format!("write {}", config.display()))?;
        if admin.is_none() {
            let ops = dir.join("operator");
            let out = Command::new(&opts.fleet_bin)
                .arg("--config")
                .arg(&config)
                .args(["operator-cert", "--name", "bench", "--role", "admin", "--out"])
                .arg(&ops)
                .env("NO_COLOR", "1")
                .output()
                .with_context(|| format!("run {}", opts.fleet_bin.display()))?;
            if !out.status.success() {
                bail!(
                    "hearth-fleet operator-cert failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let read =
                |f: &str| std::fs::read_to_string(ops.join(f)).with_context(|| format!("read {f}"));
            admin = Some(ClientIdentity {
                cert_pem: read("operator.crt")?,
                key_pem: read("operator.key")?,
            });
        }
        let log = dir.join(format!("fleet-g{k}.log"));
        let logf =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        // All gateways stay in this benchmark's session: one scheduler group, as the gateway
        // processes of one machine run in one systemd unit (`docs/0005-fleet.md`); the load
        // workers get a session of their own (`Worker::spawn`).
        let child = Command::new("taskset")
            .arg("-c")
            .arg(opts.fleet_cpu.to_string())
            .arg(&opts.fleet_bin)
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("NO_COLOR", "1")
            .env("HEARTH_LOG", "info,hearth_fleet::server=debug")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .context("start `taskset … hearth-fleet serve` (is taskset installed?)")?;
        let mut child = Guarded(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        // Listening: its log says so (with SO_REUSEPORT a connect would reach an earlier one).
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("fleet listening") {
            if let Some(status) = child.0.try_wait()? {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("hearth-fleet exited ({status}) before listening:\n{tail}");
            }
            if Instant::now() > deadline {
                bail!("hearth-fleet did not listen on {addr} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        procs.push((child, log));
    }
    let ca = std::fs::read_to_string(state.join("ca.crt")).context("read the fleet CA")?;
    let pin = hearth_fleet_client::tls::pin_of_pem(&ca)?;
    let ep = Endpoint::from_url(&format!("https://{addr}"), FLEET_NAME)?;
    let admin = admin.context("no gateway started")?;
    Ok(Fleets { procs, addr, admin, ep, pin })
}

/// `postgres://…/DB` → a fresh database on the same server (its URL), created here.
fn fresh_postgres(base: &str) -> anyhow::Result<(String, String)> {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).context("getrandom")?;
    let name = format!("hearth_bench_{}", b.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let mut c = postgres::Client::connect(base, postgres::NoTls)
        .with_context(|| format!("connect to {base}"))?;
    c.batch_execute(&format!("CREATE DATABASE {name}")).context("CREATE DATABASE")?;
    let (prefix, _) = base.rsplit_once('/').unwrap_or((base, ""));
    Ok((format!("{prefix}/{name}"), name))
}

fn drop_postgres(base: &str, name: &str) {
    if let Ok(mut c) = postgres::Client::connect(base, postgres::NoTls) {
        let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    }
}

/// One reading of the registry's node rows.
#[derive(Debug, Clone, Copy)]
struct Poll {
    at: Instant,
    /// Rows whose `last_seen_ms` changed since the previous reading.
    changed: u64,
    /// Oldest `last_seen_ms` (rows without one count from `since_ms`), seconds.
    stalest_s: f64,
}

enum RegistryReader {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::Client),
}

impl RegistryReader {
    fn open(url: &str) -> anyhow::Result<Self> {
        if let Some(path) = url.strip_prefix("sqlite:") {
            let c = rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .with_context(|| format!("open {path} read-only"))?;
            c.busy_timeout(Duration::from_secs(10))?;
            Ok(Self::Sqlite(c))
        } else {
            Ok(Self::Postgres(
                postgres::Client::connect(url, postgres::NoTls).context("connect the poller")?,
            ))
        }
    }

    fn last_seen(&mut self) -> anyhow::Result<Vec<(String, Option<i64>)>> {
        const Q: &str = "SELECT node_id, last_seen_ms FROM node_liveness";
        match self {
            Self::Sqlite(c) => {
                let mut st = c.prepare_cached(Q)?;
                let rows = st
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?)))?;
                Ok(rows.collect::<Result<_, _>>()?)
            }
            Self::Postgres(c) => {
                Ok(c.query(Q, &[])?.iter().map(|r| (r.get(0), r.get(1))).collect())
            }
        }
    }
}

/// The PostgreSQL server's processes (postmaster and its children, backends and background
/// workers) behind `url`: the postmaster is the parent of this connection's backend.
fn postgres_server(url: &str) -> anyhow::Result<u32> {
    let mut c = postgres::Client::connect(url, postgres::NoTls).context("connect for the pid")?;
    let backend: i32 = c.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    let stat = std::fs::read_to_string(format!("/proc/{backend}/stat"))
        .context("PostgreSQL is not on this machine (no /proc entry for its backend)")?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let ppid: u32 = after.split_whitespace().nth(1).context("no ppid")?.parse()?;
    Ok(ppid)
}

/// The nice value of `pid`'s scheduler autogroup (`/autogroup-133 nice 10`).
fn autogroup_nice(pid: u32) -> Option<i32> {
    parse_autogroup_nice(&std::fs::read_to_string(format!("/proc/{pid}/autogroup")).ok()?)
}

/// The CPUs `pid` may run on (`Cpus_allowed_list` in `/proc/PID/status`, e.g. `1` or `0-1`).
fn allowed_cpus(pid: u32) -> Option<String> {
    parse_allowed_cpus(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

fn parse_allowed_cpus(status: &str) -> Option<String> {
    let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

fn parse_autogroup_nice(line: &str) -> Option<i32> {
    line.split_once(" nice ")?.1.trim().parse().ok()
}

/// CPU time so far of `root` and its direct children (a postmaster's backends and workers).
fn tree_cpu(root: u32) -> Duration {
    let mut total = proc_sample(root).map(|s| s.cpu).unwrap_or_default();
    let Ok(dir) = std::fs::read_dir("/proc") else { return total };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(root) {
            total += proc_sample(pid).map(|s| s.cpu).unwrap_or_default();
        }
    }
    total
}

/// CPU time so far of the load generator: its worker processes and this process.
fn load_cpu(pool: &[Worker]) -> Duration {
    let own = proc_sample(std::process::id()).map(|s| s.cpu).unwrap_or_default();
    pool.iter().filter_map(|w| proc_sample(w.child.0.id()).ok()).fold(own, |t, s| t + s.cpu)
}

/// Read the registry every `every` until `stop`, sending one [`Poll`] per reading.
fn poll_registry(
    url: String,
    every: Duration,
    since_ms: u64,
    stop: Arc<AtomicBool>,
    out: std::sync::mpsc::Sender<Poll>,
) -> anyhow::Result<()> {
    let mut reader = RegistryReader::open(&url)?;
    let mut prev: HashMap<String, Option<i64>> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let rows = reader.last_seen()?;
        let now = now_ms() as i64;
        let mut changed = 0;
        let mut oldest = now;
        for (id, seen) in rows {
            oldest = oldest.min(seen.unwrap_or(since_ms as i64));
            if prev.get(&id).is_some_and(|p| *p != seen) {
                changed += 1;
            }
            prev.insert(id, seen);
        }
        let stalest_s = (now - oldest).max(0) as f64 / 1000.0;
        if out.send(Poll { at: started, changed, stalest_s }).is_err() {
            break;
        }
        std::thread::sleep(every.saturating_sub(started.elapsed()));
    }
    Ok(())
}

/// The fleet's `liveness written` log lines in `text`: (batches, rows, milliseconds).
pub fn parse_liveness_log(text: &str) -> (u64, u64, u64) {
    batch_totals(&parse_batch_lines(text, 0))
}

/// (batches, rows, milliseconds) of `batches`.
pub fn batch_totals(batches: &[Batch]) -> (u64, u64, u64) {
    batches.iter().fold((0, 0, 0), |t, b| (t.0 + 1, t.1 + b.rows, t.2 + b.elapsed_ms))
}

/// The number after `key` in a log line (`nodes=16667`).
fn log_field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(key)? + key.len();
    line.get(at..)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The `liveness written` lines of gateway `gateway`'s log with their times (the log line
/// opens with an RFC 3339 UTC time, `2026-12-06T10:02:03.123456Z`).
pub fn parse_batch_lines(text: &str, gateway: usize) -> Vec<Batch> {
    text.lines()
        .filter(|l| l.contains("liveness written"))
        .filter_map(|line| {
            Some(Batch {
                gateway,
                end_ms: ms_of_day(line.split_whitespace().next()?)?,
                elapsed_ms: log_field(line, "elapsed_ms=")?,
                rows: log_field(line, "nodes=")?,
            })
        })
        .collect()
}

/// `2026-12-06T10:02:03.123456Z` → milliseconds since that day's midnight.
fn ms_of_day(stamp: &str) -> Option<u64> {
    let time = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.splitn(3, ':');
    let h: u64 = parts.next()?.parse().ok()?;
    let m: u64 = parts.next()?.parse().ok()?;
    let seconds = parts.next()?;
    let (sec, frac) = seconds.split_once('.').unwrap_or((seconds, "0"));
    let s: u64 = sec.parse().ok()?;
    let frac_ms: u64 = format!("{:0<3}", frac.get(..3).unwrap_or(frac)).parse().ok()?;
    (h < 24 && m < 60 && s < 61).then_some(((h * 60 + m) * 60 + s) * 1000 + frac_ms)
}

/// `HH:MM:SS` of a Unix second, UTC.
fn clock(unix_s: u64) -> String {
    let d = unix_s % 86_400;
    format!("{:02}:{:02}:{:02}", d / 3600, d / 60 % 60, d % 60)
}

/// Steal ticks of `cpuN` so far (`/proc/stat`, the eighth value).
fn steal_ticks(cpu: usize) -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_steal(&stat, cpu)
}

fn parse_steal(stat: &str, cpu: usize) -> Option<u64> {
    let name = format!("cpu{cpu}");
    let line = stat.lines().find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    line.split_whitespace().nth(8)?.parse().ok()
}

/// Share of `secs` that `cpu` lost to steal between two readings.
fn steal_share(before: Option<u64>, after: Option<u64>, secs: f64) -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    match (before, after) {
        (Some(a), Some(b)) if hz > 0 && secs > 0.0 => b.saturating_sub(a) as f64 / hz as f64 / secs,
        _ => 0.0,
    }
}

fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn log_slice(path: &Path, from: u64, to: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path)
        && f.seek(SeekFrom::Start(from)).is_ok()
    {
        let _ = f.take(to.saturating_sub(from)).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn progress(what: &str, done: u64, total: u64, started: Instant) {
    let s = started.elapsed().as_secs_f64().max(1e-9);
    println!("  {what}: {done}/{total} ({:.0}/s, {:.0} s)", done as f64 / s, s);
}

/// Enroll `n` nodes with concurrency `c`: their identities (index → node certificate and key).
async fn enroll_all(
    fleet: &Fleets,
    n: u64,
    c: usize,
    figures: &mut Figures,
) -> anyhow::Result<Vec<Option<ClientIdentity>>> {
    let req = TokenCreateRequest {
        labels: BTreeMap::from([("site".to_string(), "bench".to_string())]),
        ttl_s: 86_400,
        max_uses: u32::try_from(n).context("too many sessions for one token")?,
        channel: None,
    };
    let http = client_config(&fleet.pin, Some(&fleet.admin), b"http/1.1")?;
    let token: TokenCreated = json(&fleet.ep, http, "POST", "/v1/tokens", Some(&req)).await?;

    println!("  generating {n} node keys and CSRs (on the load core; not timed)");
    let started = Instant::now();
    let mut prepared = Vec::with_capacity(n as usize);
    let inventory = crate::sim_gpu_inventory(8)?;
    for i in 0..n {
        let key = generate_key_pem()?;
        let csr = csr_pem(&key, &format!("node{i}"))?;
        prepared.push((
            key,
            EnrollRequest {
                token: token.token.clone(),
                csr_pem: csr,
                hardware: HardwareIdentity {
                    dmi_uuid: format!("4c4c4544-0000-4000-8000-{i:012}"),
                    board_serial: format!("BENCH{i:08}"),
                    gpu_uuids: inventory.iter().map(|g| crate::node_gpu_uuid(i, g.index)).collect(),
                },
                hostname: format!("bench-node-{i}"),
                gpus: crate::node_gpu_inventory(&inventory, i),
                agent_version: "0.1.0".into(),
            },
        ));
        if (i + 1) % 10_000 == 0 {
            progress("keys", i + 1, n, started);
        }
    }

    let prepared = Arc::new(prepared);
    let results: Arc<Mutex<Vec<Option<ClientIdentity>>>> =
        Arc::new(Mutex::new(vec![None; n as usize]));
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Histogram::new());
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..c.max(1) {
        let (prepared, results, next, done, hist, first_error) = (
            prepared.clone(),
            results.clone(),
            next.clone(),
            done.clone(),
            hist.clone(),
            first_error.clone(),
        );
        let ep = fleet.ep.clone();
        let pin = fleet.pin.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((key, req)) = prepared.get(i) else { return };
                let t = Instant::now();
                match enroll(&ep, &pin, req).await {
                    Ok(resp) => {
                        hist.record(t.elapsed());
                        done.fetch_add(1, Ordering::Relaxed);
                        let id = ClientIdentity { cert_pem: resp.cert_pem, key_pem: key.clone() };
                        if let Some(slot) =
                            results.lock().unwrap_or_else(PoisonError::into_inner).get_mut(i)
                        {
                            *slot = Some(id);
                        }
                    }
                    Err(e) => {
                        first_error
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert(format!("{e:#}"));
                    }
                }
            }
        }));
    }
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    let all = futures_join(workers);
    tokio::pin!(all);
    loop {
        tokio::select! {
            () = &mut all => break,
            _ = tick.tick() => progress("enrolled", done.load(Ordering::Relaxed), n, started),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    figures.enrolled = done.load(Ordering::Relaxed);
    figures.enroll_rate = figures.enrolled as f64 / secs;
    figures.enroll_p99 = hist.quantile(0.99);
    progress("enrolled", figures.enrolled, n, started);
    if let Some(e) = first_error.lock().unwrap_or_else(PoisonError::into_inner).take() {
        println!("  first enrollment error: {e}");
        figures.first_error.get_or_insert(format!("enrollment: {e}"));
    }
    let out = std::mem::take(&mut *results.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(out)
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// One backend, start to end.
async fn run_backend(opts: &Options, registry: &str, sessions: u64) -> anyhow::Result<Figures> {
    let dir = tempfile::Builder::new().prefix("hearth-fleet-scale.").tempdir()?;
    let (url, pg) = if registry == "sqlite" {
        (format!("sqlite:{}", dir.path().join("fleet").join("registry.db").display()), None)
    } else {
        let base = registry.to_string();
        let (url, name) = tokio::task::spawn_blocking(move || fresh_postgres(&base)).await??;
        (url, Some(name))
    };
    let backend = if pg.is_some() { "postgres" } else { "sqlite" };
    println!("== {backend}: {sessions} nodes, {} heartbeats/s offered", opts.rate);
    let result = run_on(opts, dir.path(), &url, backend, sessions).await;
    if let Some(name) = pg {
        let base = registry.to_string();
        let _ = tokio::task::spawn_blocking(move || drop_postgres(&base, &name)).await;
    }
    result
}

async fn run_on(
    opts: &Options,
    dir: &Path,
    url: &str,
    backend: &str,
    sessions: u64,
) -> anyhow::Result<Figures> {
    let mut f = Figures {
        backend: backend.to_string(),
        requested: opts.sessions,
        offered: opts.rate,
        ..Figures::default()
    };
    let per_process = sessions_allowed(opts.nofile);
    let gateways =
        if opts.gateways > 0 { opts.gateways } else { processes_for(sessions, per_process) };
    let workers =
        if opts.workers > 0 { opts.workers } else { processes_for(sessions, per_process) };
    f.gateways = gateways;
    f.workers = workers;
    let fleet = {
        let (o, d, u) = (opts.clone(), dir.to_path_buf(), url.to_string());
        tokio::task::spawn_blocking(move || start_fleets(&o, &d, &u, gateways)).await??
    };
    println!(
        "  hearth-fleet: {gateways} gateway process(es) {:?} on CPU {} at {}",
        fleet.pids(),
        opts.fleet_cpu,
        fleet.addr
    );

    // 1. Enrollment.
    let ids = enroll_all(&fleet, sessions, opts.enroll_concurrency, &mut f).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    f.rss_before = fleet.sample()?.1;

    // 2. Sessions, held by worker processes (each within its own file-descriptor limit),
    // heartbeating as soon as they are open.
    let ids: Vec<(u64, ClientIdentity)> =
        ids.into_iter().enumerate().filter_map(|(i, id)| id.map(|id| (i as u64, id))).collect();
    let want = ids.len() as u64;
    let period = Duration::from_secs_f64(sessions.max(1) as f64 / opts.rate.max(1e-3));
    let since_ms = now_ms();
    let started = Instant::now();
    let chunk = ids.len().div_ceil(workers).max(1);
    let mut pool = Vec::with_capacity(workers);
    for (k, part) in ids.chunks(chunk).enumerate() {
        let file = dir.join(format!("worker-{k}.json"));
        let list: Vec<serde_json::Value> = part
            .iter()
            .map(|(i, id)| serde_json::json!({"i": i, "cert": id.cert_pem, "key": id.key_pem}))
            .collect();
        std::fs::write(&file, serde_json::to_vec(&list)?)
            .with_context(|| format!("write {}", file.display()))?;
        pool.push(Worker::spawn(opts, &fleet, &file, period)?);
    }
    drop(ids);
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<(usize, String)>();
    for (k, w) in pool.iter_mut().enumerate() {
        w.forward(k, lines_tx.clone())?;
    }
    drop(lines_tx);
    let mut opened = vec![0u64; pool.len()];
    let mut failed = vec![0u64; pool.len()];
    let mut ready = vec![false; pool.len()];
    let mut last = Instant::now();
    while !ready.iter().all(|r| *r) {
        match lines_rx.recv_timeout(Duration::from_millis(200)) {
            Ok((k, line)) => {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .with_context(|| format!("worker {k} said {line:?}"))?;
                opened[k] = v["opened"].as_u64().unwrap_or(opened[k]);
                failed[k] = v["failed"].as_u64().unwrap_or(failed[k]);
                if v["ready"].as_bool() == Some(true) {
                    ready[k] = true;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("a load worker exited before its sessions were open")
            }
        }
        if last.elapsed() >= Duration::from_secs(5) {
            progress("sessions open", opened.iter().sum(), want, started);
            last = Instant::now();
        }
    }
    let open_total: u64 = opened.iter().sum();
    f.open_rate = open_total as f64 / started.elapsed().as_secs_f64();
    progress("sessions open", open_total, want, started);

    // 3. Warm-up, then the window.
    let stop_poll = Arc::new(AtomicBool::new(false));
    let (poll_tx, poll_rx) = std::sync::mpsc::channel();
    let poll_every = Duration::from_millis((opts.flush_ms / 2).clamp(200, 2000));
    let poller = {
        let (u, s) = (url.to_string(), stop_poll.clone());
        std::thread::spawn(move || poll_registry(u, poll_every, since_ms, s, poll_tx))
    };
    println!("  warm-up {} s, then measuring {} s", opts.warmup_s, opts.seconds);
    tokio::time::sleep(Duration::from_secs(opts.warmup_s)).await;
    for w in &mut pool {
        w.say("measure")?;
    }
    let db_server = if backend == "postgres" {
        let u = url.to_string();
        match tokio::task::spawn_blocking(move || postgres_server(&u)).await? {
            Ok(pid) => Some(pid),
            Err(e) => {
                println!("  PostgreSQL CPU not measured: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let db0 = db_server.map(tree_cpu);
    f.db_nice = db_server.and_then(autogroup_nice);
    f.db_cpus = db_server.and_then(allowed_cpus);
    let (cpu0, _) = fleet.sample()?;
    let load0 = load_cpu(&pool);
    let log0 = fleet.log_lens();
    let steal0 = (steal_ticks(opts.fleet_cpu), steal_ticks(opts.load_cpu));
    let window_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(opts.seconds)).await;
    for w in &mut pool {
        w.say("report")?;
    }
    let secs = window_start.elapsed().as_secs_f64();
    let window_end = Instant::now();
    f.steal = (
        steal_share(steal0.0, steal_ticks(opts.fleet_cpu), secs),
        steal_share(steal0.1, steal_ticks(opts.load_cpu), secs),
    );
    let (cpu1, rss1) = fleet.sample()?;
    f.load_cpu_share = load_cpu(&pool).saturating_sub(load0).as_secs_f64() / secs;
    let log1 = fleet.log_lens();
    f.rss_after = rss1;
    f.fleet_cpu = cpu1.saturating_sub(cpu0).as_secs_f64() / secs;
    if let (Some(pid), Some(db0)) = (db_server, db0) {
        f.db_cpu = tree_cpu(pid).saturating_sub(db0).as_secs_f64() / secs;
    }
    let latency = Histogram::new();
    let mut reports = 0;
    let (mut held, mut acked) = (0u64, 0u64);
    while reports < pool.len() {
        let (k, line) = lines_rx
            .recv_timeout(Duration::from_secs(60))
            .context("a load worker did not report within 60 s")?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("worker {k} said {line:?}"))?;
        if v["report"].as_bool() != Some(true) {
            continue;
        }
        reports += 1;
        held += v["held"].as_u64().unwrap_or(0);
        acked += v["acked"].as_u64().unwrap_or(0);
        let snap: Vec<(usize, u64)> = serde_json::from_value(v["latency"].clone())
            .with_context(|| format!("worker {k}: latency"))?;
        latency.add(&snap);
        let slow: BTreeMap<u64, u64> = serde_json::from_value(v["slow"].clone())
            .with_context(|| format!("worker {k}: slow acks"))?;
        for (s, n) in slow {
            *f.slow.entry(s).or_default() += n;
        }
        if let Some(e) = v["first_error"].as_str() {
            f.first_error.get_or_insert(e.to_string());
        }
    }
    f.held = held;
    f.acked_rate = acked as f64 / secs;
    f.p50 = latency.quantile(0.5);
    f.p99 = latency.quantile(0.99);
    f.p999 = latency.quantile(0.999);
    f.batch_log = fleet.batch_log(&log0, &log1);
    let (batches, rows, ms) = batch_totals(&f.batch_log);
    f.batches = batches;
    f.write_capacity = if ms > 0 { rows as f64 * 1000.0 / ms as f64 } else { 0.0 };

    stop_poll.store(true, Ordering::Relaxed);
    let polled = tokio::task::spawn_blocking(move || poller.join()).await;
    match polled {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => bail!("reading the registry failed: {e:#}"),
        _ => bail!("the registry poller panicked"),
    }
    let polls: Vec<Poll> =
        poll_rx.try_iter().filter(|p| p.at >= window_start && p.at <= window_end).collect();
    let changed: u64 = polls.iter().map(|p| p.changed).sum();
    f.writes_rate = changed as f64 / secs;
    f.staleness_s = polls.iter().map(|p| p.stalest_s).fold(0.0, f64::max);
    if polls.is_empty() {
        f.staleness_s = f64::INFINITY;
    }
    drop(pool);
    // Failed to open, or dropped before the window ended.
    f.failed = want.saturating_sub(f.held);
    drop(fleet);
    println!(
        "  {backend}: {} held, {:.0} acks/s, p99 {:.1} ms, {:.0} registry writes/s",
        f.held,
        f.acked_rate,
        f.p99.as_secs_f64() * 1e3,
        f.writes_rate
    );
    Ok(f)
}

/// A load-generator worker process ([`worker_main`]): its child, its stdin for commands.
struct Worker {
    child: Guarded,
    stdin: Option<std::process::ChildStdin>,
}

impl Worker {
    fn spawn(opts: &Options, fleet: &Fleets, ids: &Path, period: Duration) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("this benchmark's path")?;
        // `setsid`: the load in a session (scheduler autogroup) of its own, apart from the
        // fleet's gateways, as a load from other machines would be. Sharing one group with the
        // gateways, the load's weight was split across both cores and the PostgreSQL server
        // (pg_ctl starts it in a session of its own) got twice the gateways' weight on the
        // fleet's core (`docs/fleet-scaling.md`).
        let mut child = Command::new("setsid")
            .arg(exe)
            .arg("--worker-ids")
            .arg(ids)
            .arg("--worker-fleet")
            .arg(fleet.addr.to_string())
            .arg("--worker-pin")
            .arg(&fleet.pin)
            .arg("--worker-period-ms")
            .arg(period.as_millis().to_string())
            .arg("--connect-concurrency")
            .arg(opts.connect_concurrency.to_string())
            .arg("--load-cpu")
            .arg(opts.load_cpu.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start a load worker (`setsid`: util-linux installed?)")?;
        let stdin = child.stdin.take();
        Ok(Self { child: Guarded(child), stdin })
    }

    /// Forward the worker's stdout lines, tagged with `k`.
    fn forward(
        &mut self,
        k: usize,
        tx: std::sync::mpsc::Sender<(usize, String)>,
    ) -> anyhow::Result<()> {
        use std::io::BufRead as _;
        let out = self.child.0.stdout.take().context("worker stdout")?;
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((k, line)).is_err() {
                    break;
                }
            }
        });
        Ok(())
    }

    fn say(&mut self, what: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let stdin = self.stdin.as_mut().context("worker stdin closed")?;
        writeln!(stdin, "{what}").context("tell a load worker")?;
        stdin.flush().context("tell a load worker")
    }
}

/// What a load worker is given.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// JSON file: `[{"i": index, "cert": PEM, "key": PEM}, …]`.
    pub ids: PathBuf,
    /// The fleet's address.
    pub fleet: SocketAddr,
    /// SHA-256 pin of the fleet CA.
    pub pin: String,
    /// Heartbeat period of each session.
    pub period: Duration,
    /// Session opens in flight.
    pub connect_concurrency: usize,
}

/// A load worker: opens its sessions (progress as JSON lines on stdout, then `{"ready":true}`),
/// heartbeats; on `measure` (a stdin line) starts counting, on `report` prints its figures as
/// one JSON line; ends at stdin's end.
pub async fn worker_main(w: WorkerOptions) -> anyhow::Result<()> {
    let text = std::fs::read(&w.ids).with_context(|| format!("read {}", w.ids.display()))?;
    let list: Vec<serde_json::Value> = serde_json::from_slice(&text).context("identities")?;
    let load = Arc::new(Load::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(w.connect_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(list.len());
    for v in &list {
        let i = v["i"].as_u64().context("identity index")?;
        let id = ClientIdentity {
            cert_pem: v["cert"].as_str().context("identity cert")?.to_string(),
            key_pem: v["key"].as_str().context("identity key")?.to_string(),
        };
        let config = client_config(&w.pin, Some(&id), control::ALPN)?;
        let (load, stop, gate, addr) = (load.clone(), stop_rx.clone(), gate.clone(), w.fleet);
        let phase = w.period.mul_f64(phase_fraction(i));
        let period = w.period;
        tasks.push(tokio::spawn(async move {
            let opened = {
                let Ok(_permit) = gate.acquire().await else { return };
                tokio::time::timeout(
                    Duration::from_secs(60),
                    open_session(addr, source_addr(i), config),
                )
                .await
            };
            match opened {
                Ok(Ok((r, wr))) => {
                    load.open.fetch_add(1, Ordering::Relaxed);
                    load.opened.fetch_add(1, Ordering::Relaxed);
                    heartbeat_loop(r, wr, period, phase, load, stop).await;
                }
                Ok(Err(e)) => {
                    load.open_failed.fetch_add(1, Ordering::Relaxed);
                    load.error(format!("session open: {e:#}"));
                }
                Err(_) => {
                    load.open_failed.fetch_add(1, Ordering::Relaxed);
                    load.error("session open: timed out after 60 s");
                }
            }
        }));
        if tasks.len() % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
    drop(list);
    let want = tasks.len() as u64;
    let say = |v: serde_json::Value| println!("{v}");
    loop {
        let opened = load.opened.load(Ordering::Relaxed);
        let failed = load.open_failed.load(Ordering::Relaxed);
        let ready = opened + failed >= want;
        say(serde_json::json!({"opened": opened, "failed": failed, "ready": ready}));
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if cmd_tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(cmd) = cmd_rx.recv().await {
        match cmd.trim() {
            "measure" => {
                load.latency.reset();
                load.slow.lock().unwrap_or_else(PoisonError::into_inner).clear();
                load.sent.store(0, Ordering::Relaxed);
                load.acked.store(0, Ordering::Relaxed);
                load.measuring.store(true, Ordering::Relaxed);
            }
            "report" => {
                load.measuring.store(false, Ordering::Relaxed);
                let first_error =
                    load.first_error.lock().unwrap_or_else(PoisonError::into_inner).clone();
                say(serde_json::json!({
                    "report": true,
                    "held": load.open.load(Ordering::Relaxed),
                    "sent": load.sent.load(Ordering::Relaxed),
                    "acked": load.acked.load(Ordering::Relaxed),
                    "latency": load.latency.snapshot(),
                    "slow": load.slow.lock().unwrap_or_else(PoisonError::into_inner).clone(),
                    "first_error": first_error,
                }));
            }
            _ => {}
        }
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mark(ok: bool) -> &'static str {
    if ok { "yes" } else { "NO" }
}

/// The one table: both backends, the goals, whether each is met, and the 200,000-node
/// extrapolation.
pub fn print_table(all: &[Figures], opts: &Options, load_note: &str) {
    let cols: Vec<&Figures> = all.iter().collect();
    let header: Vec<String> = cols.iter().map(|f| f.backend.clone()).collect();
    println!();
    println!(
        "fleet scale, {} (fleet on CPU {}, load on CPU {}; {load_note})",
        today(),
        opts.fleet_cpu,
        opts.load_cpu
    );
    println!();
    println!("| figure | {} | goal |", header.join(" | "));
    println!("|---|{}---|", "---|".repeat(cols.len()));
    let row = |name: &str, vals: Vec<String>, goal: &str| {
        println!("| {name} | {} | {goal} |", vals.join(" | "));
    };
    row(
        "sessions held (mTLS, own certificate each)",
        cols.iter()
            .map(|f| {
                format!(
                    "{} of {} ({} gateway / {} load processes) [{}]",
                    f.held,
                    f.requested,
                    f.gateways,
                    f.workers,
                    mark(f.held >= goals::SESSIONS)
                )
            })
            .collect(),
        ">= 50,000",
    );
    row(
        "sessions opened per second",
        cols.iter().map(|f| format!("{:.0}", f.open_rate)).collect(),
        "",
    );
    row(
        "heartbeats acked per second (offered)",
        cols.iter()
            .map(|f| {
                format!(
                    "{:.0} ({:.0}) [{}]",
                    f.acked_rate,
                    f.offered,
                    mark(f.acked_rate >= goals::HEARTBEATS_PER_S * 0.99)
                )
            })
            .collect(),
        ">= 20,000",
    );
    row(
        "heartbeat latency p50 / p99 / p99.9",
        cols.iter()
            .map(|f| {
                format!(
                    "{} / {} / {} [{}]",
                    ms(f.p50),
                    ms(f.p99),
                    ms(f.p999),
                    mark(f.p99.as_secs_f64() * 1e3 <= goals::P99_MS && f.acked_rate > 0.0)
                )
            })
            .collect(),
        "p99 <= 50 ms",
    );
    row(
        "registry liveness writes per second (rows)",
        cols.iter().map(|f| format!("{:.0} in {} batches", f.writes_rate, f.batches)).collect(),
        "",
    );
    row(
        "registry write capacity (rows per second of batch time)",
        cols.iter().map(|f| format!("{:.0}", f.write_capacity)).collect(),
        "",
    );
    row(
        "oldest last_seen in the registry",
        cols.iter()
            .map(|f| {
                format!("{:.1} s [{}]", f.staleness_s, mark(f.staleness_s <= goals::STALENESS_S))
            })
            .collect(),
        "<= 30 s",
    );
    row(
        "enrollments per second (p99 latency)",
        cols.iter()
            .map(|f| {
                format!(
                    "{:.0} ({}) [{}]",
                    f.enroll_rate,
                    ms(f.enroll_p99),
                    mark(f.enroll_rate >= goals::ENROLLMENTS_PER_S)
                )
            })
            .collect(),
        ">= 500",
    );
    row(
        "fleet memory per session",
        cols.iter().map(|f| format!("{:.1} KiB", f.bytes_per_session() / 1024.0)).collect(),
        "",
    );
    row(
        "fleet RSS before / with sessions",
        cols.iter().map(|f| format!("{} / {}", mib(f.rss_before), mib(f.rss_after))).collect(),
        "",
    );
    row(
        "fleet CPU (share of its core)",
        cols.iter().map(|f| format!("{:.0}%", f.fleet_cpu * 100.0)).collect(),
        "",
    );
    row(
        "load generator CPU (share of its core)",
        cols.iter().map(|f| format!("{:.0}%", f.load_cpu_share * 100.0)).collect(),
        "",
    );
    row(
        "CPU-µs per heartbeat acked (fleet + PostgreSQL server)",
        cols.iter()
            .map(|f| match f.cpu_us_per_heartbeat() {
                Some((fleet, db)) if f.db_cpu > 0.0 => {
                    format!("{fleet:.1} + {db:.1} = {:.1}", fleet + db)
                }
                Some((fleet, _)) => format!("{fleet:.1}"),
                None => "-".into(),
            })
            .collect(),
        "",
    );
    row(
        "PostgreSQL server CPU (share of one core; its CPUs; its autogroup's nice)",
        cols.iter()
            .map(|f| {
                if f.backend == "postgres" {
                    let nice = f.db_nice.map_or("nice ?".into(), |n| format!("nice {n}"));
                    let cpus = f.db_cpus.as_deref().unwrap_or("?");
                    let shared =
                        if f.db_cpus.as_deref() == Some(opts.fleet_cpu.to_string().as_str()) {
                            ", the fleet's core"
                        } else if f.db_cpus.as_deref() == Some(opts.load_cpu.to_string().as_str()) {
                            ", the load's core"
                        } else {
                            ""
                        };
                    format!("{:.0}% (CPU {cpus}{shared}; {nice})", f.db_cpu * 100.0)
                } else {
                    "-".into()
                }
            })
            .collect(),
        "",
    );
    row(
        "heartbeats over 50 ms (seconds of the window with any)",
        cols.iter()
            .map(|f| {
                let n = f.slow_total();
                let share = if f.acked_rate > 0.0 {
                    n as f64 / (f.acked_rate * opts.seconds as f64) * 100.0
                } else {
                    0.0
                };
                format!("{n} = {share:.2}% ({} of {} s)", f.slow.len(), opts.seconds)
            })
            .collect(),
        "",
    );
    row(
        "CPU stolen by the hypervisor (fleet core / load core)",
        cols.iter()
            .map(|f| format!("{:.1}% / {:.1}%", f.steal.0 * 100.0, f.steal.1 * 100.0))
            .collect(),
        "",
    );
    println!();
    for f in &cols {
        for line in slowest_seconds(f, 3) {
            println!("  {}: {line}", f.backend);
        }
    }
    println!();
    println!(
        "Extrapolation to {EXTRAPOLATE_NODES} nodes (heartbeat every {} s):",
        control::HEARTBEAT_INTERVAL_S
    );
    for f in &cols {
        for line in extrapolate(f, opts.flush_ms) {
            println!("  {}: {line}", f.backend);
        }
    }
    for f in &cols {
        if let Some(e) = &f.first_error {
            println!("  {}: first error: {e}", f.backend);
        }
    }
}

/// The `n` seconds with the most acks over 50 ms (UTC), each with the liveness batches that
/// were being written from a second before it to the end of the next.
pub fn slowest_seconds(f: &Figures, n: usize) -> Vec<String> {
    let mut worst: Vec<(u64, u64)> = f.slow.iter().map(|(s, c)| (*s, *c)).collect();
    worst.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    worst
        .into_iter()
        .take(n)
        .map(|(s, count)| {
            let from = (s % 86_400) * 1000;
            let (lo, hi) = (from.saturating_sub(1000), from + 2000);
            let batches: Vec<String> = f
                .batch_log
                .iter()
                .filter(|b| b.end_ms >= lo && b.end_ms.saturating_sub(b.elapsed_ms) <= hi)
                .map(|b| {
                    let start = b.end_ms.saturating_sub(b.elapsed_ms);
                    format!(
                        "g{} {} rows {}.{:03}+{} ms",
                        b.gateway,
                        b.rows,
                        clock(start / 1000),
                        start % 1000,
                        b.elapsed_ms
                    )
                })
                .collect();
            let batches = if batches.is_empty() { "none".to_string() } else { batches.join(", ") };
            format!("{} UTC: {count} acks over 50 ms; liveness batches then: {batches}", clock(s))
        })
        .collect()
}

/// What 200,000 nodes need of one fleet, from one backend's measurements.
pub fn extrapolate(f: &Figures, flush_ms: u64) -> Vec<String> {
    let n = EXTRAPOLATE_NODES as f64;
    let hb_needed = n / f64::from(control::HEARTBEAT_INTERVAL_S);
    let mem = f.rss_before as f64 + n * f.bytes_per_session();
    let rows_needed = n * 1000.0 / flush_ms as f64;
    let flush_s = if f.write_capacity > 0.0 { n / f.write_capacity } else { f64::INFINITY };
    let cpu_per_hb =
        if f.acked_rate > 0.0 { (f.fleet_cpu + f.db_cpu) / f.acked_rate } else { f64::INFINITY };
    vec![
        format!(
            "heartbeats {hb_needed:.0}/s needed, {:.0}/s measured ({:.0}% of one core at that rate, database server included)",
            f.acked_rate,
            cpu_per_hb * hb_needed * 100.0
        ),
        format!(
            "memory {:.2} GiB ({:.1} KiB × {n:.0} + base)",
            mem / (1u64 << 30) as f64,
            f.bytes_per_session() / 1024.0
        ),
        format!(
            "registry {rows_needed:.0} rows/s at a {flush_ms} ms flush; one batch of {n:.0} rows takes {flush_s:.1} s at the measured capacity"
        ),
        format!("file descriptors {n:.0} (set LimitNOFILE above that)"),
    ]
}

/// Run every registry in `opts.registries` and print the table.
pub async fn run(mut opts: Options) -> anyhow::Result<Vec<Figures>> {
    let nofile = raise_nofile()?;
    opts.nofile = nofile;
    let sessions = opts.sessions;
    let per = sessions_allowed(nofile);
    if sessions > per {
        println!(
            "RLIMIT_NOFILE is {nofile} per process here: the fleet runs as {} gateway processes \
             sharing its address (SO_REUSEPORT) and the load as {} worker processes",
            if opts.gateways > 0 { opts.gateways } else { processes_for(sessions, per) },
            if opts.workers > 0 { opts.workers } else { processes_for(sessions, per) },
        );
    }
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_note = format!(
        "load average before: {}",
        load_avg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let mut all = Vec::new();
    for r in &opts.registries {
        all.push(run_backend(&opts, r, sessions).await.with_context(|| format!("the run on {r}"))?);
    }
    print_table(&all, &opts, &load_note);
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_spread_over_127_8_and_avoid_network_and_broadcast() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..50_000u64 {
            let a = source_addr(i);
            let o = a.octets();
            assert_eq!(o[0], 127);
            assert!(a.is_loopback());
            assert!(o[3] != 0 && o[3] != 255, "{a}");
            seen.insert(a);
        }
        assert_eq!(seen.len(), 16_384, "each address carries at most 4 of 50,000 sessions");
        assert_ne!(source_addr(0), source_addr(1));
    }

    #[test]
    fn phases_are_spread_over_the_period() {
        let mut buckets = [0u32; 10];
        for i in 0..10_000 {
            let p = phase_fraction(i);
            assert!((0.0..1.0).contains(&p));
            buckets[(p * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((900..=1100).contains(&b), "uneven phases: {buckets:?}");
        }
    }

    #[test]
    fn liveness_lines_are_summed_and_others_ignored() {
        let log = "2026-11-27T04:00:00Z DEBUG hearth_fleet::server: liveness written nodes=50000 elapsed_ms=812\n\
                   2026-11-27T04:00:01Z  INFO hearth_fleet::session: session open node=n-1\n\
                   2026-11-27T04:00:05Z DEBUG hearth_fleet::server: liveness written nodes=49000 elapsed_ms=788\n\
                   liveness written nodes=garbage\n";
        assert_eq!(parse_liveness_log(log), (2, 99_000, 1600));
        assert_eq!(parse_liveness_log(""), (0, 0, 0));
    }

    #[test]
    fn batch_lines_carry_their_time_and_others_are_skipped() {
        let log = "2026-11-27T04:00:00.250Z DEBUG hearth_fleet::server: liveness written nodes=50000 elapsed_ms=812\n\
                   2026-11-27T04:00:01Z  INFO hearth_fleet::session: session open node=n-1\n\
                   2026-11-27T23:59:59Z DEBUG hearth_fleet::server: liveness written nodes=49000 elapsed_ms=788\n\
                   2026-11-27T25:00:00Z DEBUG hearth_fleet::server: liveness written nodes=1 elapsed_ms=1\n\
                   liveness written nodes=garbage\n";
        let b = parse_batch_lines(log, 2);
        assert_eq!(
            b,
            vec![
                Batch { gateway: 2, end_ms: 4 * 3_600_000 + 250, elapsed_ms: 812, rows: 50_000 },
                Batch { gateway: 2, end_ms: 86_399_000, elapsed_ms: 788, rows: 49_000 },
            ]
        );
    }

    #[test]
    fn slowest_seconds_name_the_batches_around_them() {
        let day = 20_000 * 86_400;
        let f = Figures {
            slow: BTreeMap::from([(day + 10, 5), (day + 20, 900), (day + 30, 40)]),
            batch_log: vec![
                Batch { gateway: 0, end_ms: 20_400, elapsed_ms: 300, rows: 16_000 },
                Batch { gateway: 1, end_ms: 25_000, elapsed_ms: 100, rows: 15_000 },
            ],
            ..Figures::default()
        };
        let lines = slowest_seconds(&f, 2);
        assert_eq!(
            lines,
            vec![
                "00:00:20 UTC: 900 acks over 50 ms; liveness batches then: g0 16000 rows 00:00:20.100+300 ms",
                "00:00:30 UTC: 40 acks over 50 ms; liveness batches then: none",
            ]
        );
        assert_eq!(f.slow_total(), 945);
    }

    #[test]
    fn steal_is_the_eighth_value_of_the_cpu_line() {
        let stat = "cpu  1990 0 1378 12559 218 0 24 9 0 0\ncpu0 729 0 469 6880 4 0 4 3 0 0\ncpu1 1260 0 908 5678 213 0 19 6 0 0\n";
        assert_eq!(parse_steal(stat, 0), Some(3));
        assert_eq!(parse_steal(stat, 1), Some(6));
        assert_eq!(parse_steal(stat, 2), None);
    }

    #[test]
    fn fd_margin_is_kept_and_processes_cover_the_sessions() {
        assert_eq!(sessions_allowed(20_000), 19_488);
        assert_eq!(sessions_allowed(100), 0);
        assert_eq!(processes_for(50_000, 19_488), 3);
        assert_eq!(processes_for(19_488, 19_488), 1);
        assert_eq!(processes_for(0, 19_488), 1);
        assert_eq!(processes_for(10, 0), 10, "a zero limit still gives one session each");
    }

    #[test]
    fn extrapolation_scales_memory_and_registry_load() {
        let f = Figures {
            backend: "sqlite".into(),
            held: 50_000,
            rss_before: 100 << 20,
            rss_after: (100 << 20) + 50_000 * 20 * 1024,
            acked_rate: 20_000.0,
            fleet_cpu: 0.5,
            write_capacity: 100_000.0,
            ..Figures::default()
        };
        assert!((f.bytes_per_session() - 20.0 * 1024.0).abs() < 1e-6);
        let lines = extrapolate(&f, 5000);
        assert!(lines[0].contains("20000/s needed"), "{lines:?}");
        assert!(lines[0].contains("(50% of one core"), "{lines:?}");
        let (fleet, db) = f.cpu_us_per_heartbeat().unwrap_or_default();
        assert!((fleet - 25.0).abs() < 1e-9 && db == 0.0, "{fleet} {db}");
        let pg = Figures { db_cpu: 0.25, backend: "postgres".into(), ..f.clone() };
        assert!(extrapolate(&pg, 5000)[0].contains("(75% of one core"));
        assert_eq!(pg.cpu_us_per_heartbeat(), Some((25.0, 12.5)));
        // 100 MiB + 200,000 × 20 KiB = 3.91 GiB.
        assert!(lines[1].starts_with("memory 3.91 GiB"), "{lines:?}");
        assert!(lines[2].contains("40000 rows/s") && lines[2].contains("takes 2.0 s"), "{lines:?}");
    }

    #[test]
    fn reads_the_allowed_cpus() {
        let status = "Name:\tpostgres\nCpus_allowed:\t2\nCpus_allowed_list:\t1\nMems_allowed:\t1\n";
        assert_eq!(parse_allowed_cpus(status).as_deref(), Some("1"));
        assert_eq!(parse_allowed_cpus("Cpus_allowed_list:\t0-1\n").as_deref(), Some("0-1"));
        assert_eq!(parse_allowed_cpus("Name:\tx\n"), None);
    }

    #[test]
    fn reads_the_autogroup_nice() {
        assert_eq!(parse_autogroup_nice("/autogroup-133 nice 10\n"), Some(10));
        assert_eq!(parse_autogroup_nice("/autogroup-4 nice -5"), Some(-5));
        assert_eq!(parse_autogroup_nice("/autogroup-4"), None);
        assert_eq!(parse_autogroup_nice("/autogroup-4 nice x"), None);
    }
}
