//! The secure tunnel on loopback, side by side in one run, against its peers: direct TCP; direct
//! TLS 1.3 (rustls, the fleet's own certificate, no relay: the floor any TLS relay sits on); a
//! same-hop TLS relay built from stunnel4 (a client-mode stunnel turns the visitor's TCP into TLS,
//! a server-mode stunnel turns it back: plain → TLS → plain, the topology of every relay here);
//! rathole with its TLS transport; bore (plain TCP); and the Hearth tunnel through a real
//! `hearth-fleet` gateway with 1, 8 and 64 parallel streams, two ways: customer ingress
//! (`hearthctl expose`: plain TCP to a gateway port → the node's tunnel → the agent's target code
//! → the service; the peers' own topology, so the goals are judged on it) and an operator's
//! tunnel (TLS to the gateway → gateway relay → node tunnel → the service: two TLS legs).
//!
//! Every path is set up first and all stay up together. Figures: bulk throughput, the median of
//! `--rounds` interleaved rounds (each round measures every path once, so a path's samples are
//! spread over the run; the table shows the median and the range, the progress output every
//! sample), with the CPU-seconds per GB of the median sample; then, path by path, 64-byte round
//! trips p50/p99, idle and while a bulk stream runs on the same path, and the memory of 1,000
//! idle streams. CPU and memory count this process (both ends, and for Hearth the gateway too)
//! plus the peer's own processes. One table with ratios (of the medians) against stunnel and
//! rathole-TLS, then the goals of issue 6.
//!
//! Run: `bench/tunnel` (builds this in release, installs rathole and bore into a cache outside
//! the repository when missing, raises the open-files limit; docs/benchmarks.md).

#![allow(clippy::print_stdout, clippy::print_stderr)] // a benchmark prints its table

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hearth_agent::config::TunnelConfig as Policy;
use hearth_agent::fleet::tunnel::{Targets, serve};
use hearth_bench::Guarded;
use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet::tunnel::LANES;
use hearth_fleet_client::enroll::enroll;
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::identity::{csr_pem, generate_key_pem};
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_fleet_client::tunnel::lanes::{Lanes, Serve};
use hearth_fleet_client::tunnel::{Tunnel, TunnelConfig, TunnelHandle, connect};
use hearth_proto::fleet::{
    EnrollRequest, ExposeRequest, ExposeView, HardwareIdentity, TokenCreateRequest, TokenCreated,
};
use hearth_proto::mux::Target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Command-line options.
#[derive(Debug, Parser)]
struct Opts {
    /// MiB moved per throughput measurement.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Round trips per latency measurement.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Idle streams for the memory figure.
    #[arg(long, default_value_t = 1000)]
    idle_streams: usize,
    /// Where `rathole` and `bore` are looked for first (`bench/tunnel` installs them there under
    /// `bin/`); then `PATH`.
    #[arg(long, default_value = "/var/cache/hearth-bench-tools")]
    tools: PathBuf,
    /// Measure only these paths (comma-separated): `tcp`, `tls`, `stunnel`, `rathole`, `bore`,
    /// `expose`, `operator`; all when empty. A quicker look at one path (its ratios need the
    /// `stunnel` and `rathole` rows in the same run).
    #[arg(long, value_delimiter = ',', value_parser = ["tcp", "tls", "stunnel", "rathole", "bore", "expose", "operator"])]
    only: Vec<String>,
    /// Parallel stream counts of the Hearth throughput rows.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 64])]
    streams: Vec<usize>,
    /// Lanes the Hearth node opens when the gateway offers them (the agent's `tunnel.lanes`,
    /// default 2); the "one connection" row's node opens none.
    #[arg(long, default_value_t = 2)]
    lanes: u8,
    /// Throughput samples per path, taken in interleaved rounds (every path once per round); the
    /// table shows each path's median and the range.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

impl Opts {
    /// Whether the path `key` (see [`Opts::only`]) is measured in this run.
    fn wants(&self, key: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|k| k == key)
    }
}

/// CPU time of this process and of `pids` (a peer's processes).
fn cpu_of(pids: &[u32]) -> Duration {
    std::iter::once(std::process::id())
        .chain(pids.iter().copied())
        .filter_map(|p| hearth_bench::proc_sample(p).ok())
        .map(|s| s.cpu)
        .sum()
}

/// Resident memory of this process and of `pids`.
fn rss_of(pids: &[u32]) -> u64 {
    std::iter::once(std::process::id())
        .chain(pids.iter().copied())
        .filter_map(|p| hearth_bench::proc_sample(p).ok())
        .map(|s| s.rss)
        .sum()
}

/// A TCP server: `sink` connections read to the end and answer one byte; `echo` connections
/// echo.
async fn tcp_server(echo: bool) -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let _ = c.set_nodelay(true);
            tokio::spawn(async move { if echo { echo_conn(c).await } else { sink_conn(c).await } });
        }
    });
    Ok(port)
}

async fn sink_conn<S: AsyncRead + AsyncWrite + Unpin>(mut c: S) {
    let mut buf = vec![0u8; 256 * 1024];
    while let Ok(n) = c.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
    let _ = c.write_all(b"k").await;
    let _ = c.shutdown().await;
}

async fn echo_conn<S: AsyncRead + AsyncWrite + Unpin>(mut c: S) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = c.read(&mut buf).await {
        // A TLS stream may keep written bytes until flushed.
        if n == 0 || c.write_all(&buf[..n]).await.is_err() || c.flush().await.is_err() {
            break;
        }
    }
}

/// Send `bytes` and wait for the sink's answer.
async fn push<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, bytes: u64) -> anyhow::Result<()> {
    let chunk = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let mut k = [0u8; 1];
    s.read_exact(&mut k).await.context("no answer from the sink")?;
    Ok(())
}

/// 64-byte round trips on an echo connection: (p50, p99) in µs.
async fn round_trips<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut us = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).await?;
        // A TLS stream may keep written bytes until flushed (tokio-rustls does when the socket
        // would block): without this a round trip could wait forever.
        s.flush().await?;
        s.read_exact(&mut back).await?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() as f64 * q) as usize).min(us.len() - 1)];
    Ok((at(0.50), at(0.99)))
}

/// One path's figures; `failed` when it could not be measured.
#[derive(Debug, Default)]
struct Row {
    name: String,
    gbit_s: Option<f64>,
    cpu_s_per_gb: Option<f64>,
    idle: Option<(f64, f64)>,
    loaded: Option<(f64, f64)>,
    idle_rss: Option<u64>,
    /// Lowest and highest Gbit/s of the rounds (`gbit_s` is their median).
    range: Option<(f64, f64)>,
    failed: Option<String>,
}

/// Throughput over `streams` parallel connections made by `open`: (Gbit/s, CPU-s per GB), CPU
/// counted in this process and `pids`.
async fn bulk<S, F, Fut>(
    open: F,
    streams: usize,
    bytes: u64,
    pids: &[u32],
) -> anyhow::Result<(f64, f64)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<S>>,
{
    let mut conns = Vec::new();
    for _ in 0..streams {
        conns.push(open().await?);
    }
    let (cpu0, t0) = (cpu_of(pids), Instant::now());
    let each = bytes / streams as u64;
    let tasks: Vec<_> = conns.into_iter().map(|c| tokio::spawn(push(c, each))).collect();
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_of(pids) - cpu0).as_secs_f64();
    let moved = (each * streams as u64) as f64;
    Ok((moved * 8.0 / secs / 1e9, cpu / (moved / 1e9)))
}

/// Round trips idle, then while one bulk stream runs on the same path.
async fn latency<S, F, Fut>(open: F, n: usize) -> anyhow::Result<((f64, f64), (f64, f64))>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(bool) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<S>>,
{
    let idle = round_trips(open(true).await?, n).await?;
    let bulk_conn = open(false).await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let bulk = tokio::spawn(async move {
        let mut c = bulk_conn;
        let chunk = vec![1u8; 256 * 1024];
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            if c.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = c.shutdown().await;
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let loaded = round_trips(open(true).await?, n).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = bulk.await;
    Ok((idle, loaded?))
}

/// Memory growth (this process and `pids`) while `n` echo streams made by `open` are held open,
/// each after one round trip.
async fn idle_rss<S, F, Fut>(open: F, n: usize, pids: &[u32]) -> anyhow::Result<u64>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<S>>,
{
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_of(pids);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = open().await?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_of(pids);
    drop(held);
    Ok(after.saturating_sub(before))
}

async fn tcp_connect(port: u16) -> anyhow::Result<TcpStream> {
    let c = TcpStream::connect(("127.0.0.1", port)).await?;
    c.set_nodelay(true)?;
    Ok(c)
}

/// A relay the visitor reaches over plain TCP: the ports forwarding to the sink and the echo
/// server, and the relay's processes (none for direct TCP).
struct Relay {
    sink: u16,
    echo: u16,
    procs: Vec<Guarded>,
}

impl Relay {
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|g| g.0.id()).collect()
    }
}

/// How a row's connections are made.
enum Way {
    /// Plain TCP to a relay's ports: direct TCP, the peers, `expose`.
    Relay(Relay),
    /// TLS 1.3 straight to the TLS sink and echo servers (no relay).
    Tls { config: Arc<rustls::ClientConfig>, sink: u16, echo: u16 },
    /// Streams on the operator's tunnel through the gateway to the node's ports `sink` and `echo`.
    Operator { op: TunnelHandle, node: String, sink: u16, echo: u16 },
}

/// `target` on the node `node`, through the gateway.
fn via(node: &str, target: Target) -> Target {
    Target::Via { node: node.into(), target: Box::new(target) }
}

async fn tls_connect(
    config: Arc<rustls::ClientConfig>,
    port: u16,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tcp_connect(port).await?;
    let name = rustls::pki_types::ServerName::try_from("hearth-fleet")?;
    Ok(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?)
}

impl Way {
    /// One throughput sample over `streams` parallel streams: (Gbit/s, CPU-s per GB).
    async fn bulk(&self, streams: usize, bytes: u64) -> anyhow::Result<(f64, f64)> {
        match self {
            Way::Relay(relay) => {
                bulk(|| tcp_connect(relay.sink), streams, bytes, &relay.pids()).await
            }
            Way::Tls { config, sink, .. } => {
                bulk(|| tls_connect(config.clone(), *sink), streams, bytes, &[]).await
            }
            Way::Operator { op, node, sink, .. } => {
                let t = via(node, Target::Port(*sink));
                bulk(
                    || {
                        let s = op.open(&t);
                        async move { Ok(s?) }
                    },
                    streams,
                    bytes,
                    &[],
                )
                .await
            }
        }
    }

    /// Round trips idle and under bulk into `row`, then, but for direct TLS, the memory of
    /// `o.idle_streams` idle streams.
    async fn latency_and_idle(&self, o: &Opts, row: &mut Row) -> anyhow::Result<()> {
        match self {
            Way::Relay(relay) => {
                let (i, l) = latency(
                    |e| tcp_connect(if e { relay.echo } else { relay.sink }),
                    o.round_trips,
                )
                .await?;
                (row.idle, row.loaded) = (Some(i), Some(l));
                row.idle_rss = Some(
                    idle_rss(|| tcp_connect(relay.echo), o.idle_streams, &relay.pids()).await?,
                );
            }
            Way::Tls { config, sink, echo } => {
                let (i, l) = latency(
                    |e| tls_connect(config.clone(), if e { *echo } else { *sink }),
                    o.round_trips,
                )
                .await?;
                (row.idle, row.loaded) = (Some(i), Some(l));
            }
            Way::Operator { op, node, sink, echo } => {
                let (te, ts) = (via(node, Target::Port(*echo)), via(node, Target::Port(*sink)));
                let (i, l) = latency(
                    |e| {
                        let s = op.open(if e { &te } else { &ts });
                        async move { Ok(s?) }
                    },
                    o.round_trips,
                )
                .await?;
                (row.idle, row.loaded) = (Some(i), Some(l));
                eprintln!("{} idle streams…", o.idle_streams);
                let echo_target = via(node, Target::Echo);
                row.idle_rss = Some(
                    idle_rss(
                        || {
                            let s = op.open(&echo_target);
                            async move { Ok(s?) }
                        },
                        o.idle_streams,
                        &[],
                    )
                    .await?,
                );
            }
        }
        Ok(())
    }
}

/// A row being measured: its path (`None` when the path could not be set up), the parallel
/// streams of its throughput, whether its round trips (and idle memory) are measured too, and its
/// throughput samples (Gbit/s, CPU-s per GB), one per round.
struct Probe {
    row: Row,
    way: Option<Way>,
    streams: usize,
    latency: bool,
    samples: Vec<(f64, f64)>,
}

impl Probe {
    fn new(name: impl Into<String>, way: Way, streams: usize, latency: bool) -> Self {
        let row = Row { name: name.into(), ..Row::default() };
        Probe { row, way: Some(way), streams, latency, samples: Vec::new() }
    }

    /// Mark the row failed with `e`; it is skipped from then on.
    fn fail(&mut self, e: &anyhow::Error) {
        eprintln!("{}: {e:#}", self.row.name);
        self.row.failed = Some(format!("{e:#}"));
    }

    /// Put the sample with the median Gbit/s (the lower middle of an even count) in the row, with
    /// its CPU-s per GB, and the range of the samples.
    fn settle(&mut self) {
        let mut s = std::mem::take(&mut self.samples);
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        if let (Some(lo), Some(hi), Some(mid)) =
            (s.first(), s.last(), s.get(s.len().saturating_sub(1) / 2))
        {
            (self.row.gbit_s, self.row.cpu_s_per_gb) = (Some(mid.0), Some(mid.1));
            self.row.range = Some((lo.0, hi.0));
        }
    }
}

/// A free loopback port (bound and released; the peer binds it right after).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Start `bin` with its output in `log`.
fn spawn(bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Guarded> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    Ok(Guarded(child))
}

/// `name` in `tools/bin`, else on `PATH`.
fn find_bin(tools: &Path, names: &[&str]) -> anyhow::Result<PathBuf> {
    for name in names {
        let cached = tools.join("bin").join(name);
        if cached.is_file() {
            return Ok(cached);
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        for dir in std::env::split_paths(&path) {
            if dir.join(name).is_file() {
                return Ok(dir.join(name));
            }
        }
    }
    anyhow::bail!(
        "{} not found in {}/bin or on PATH (bench/tunnel installs it)",
        names.join(" or "),
        tools.display()
    )
}

/// Wait until a relay's ports answer: an echo round trip on `echo`, a connection on `sink`.
async fn wait_ready(relay: &Relay, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = async {
            let mut c = tcp_connect(relay.echo).await?;
            c.write_all(b"?").await?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await?;
            tcp_connect(relay.sink).await?;
            Ok::<_, anyhow::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(2), probe).await {
            Ok(Ok(())) => return Ok(()),
            _ if Instant::now() > deadline => anyhow::bail!("{what} did not come up within 20 s"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The server certificate (chain and key, PEM and PKCS#12) and the CA, issued by the fleet's CA,
/// written for the peers.
struct Pki {
    chain: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// stunnel4 pair: client mode (TCP in, TLS 1.3 out) → server mode (TLS in, TCP out).
async fn stunnel(
    tools: &Path,
    pki: &Pki,
    dir: &Path,
    sink: u16,
    echo: u16,
) -> anyhow::Result<Relay> {
    let bin = find_bin(tools, &["stunnel4", "stunnel"])?;
    let (ss, se, cs, ce) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let global =
        "foreground = yes\npid =\ndebug = 4\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n";
    let server = format!(
        "{global}cert = {chain}\nkey = {key}\nsslVersionMin = TLSv1.3\n\
         [sink]\naccept = 127.0.0.1:{ss}\nconnect = 127.0.0.1:{sink}\n\
         [echo]\naccept = 127.0.0.1:{se}\nconnect = 127.0.0.1:{echo}\n",
        chain = pki.chain.display(),
        key = pki.key.display(),
    );
    let client = format!(
        "{global}client = yes\nsslVersionMin = TLSv1.3\nverifyChain = yes\nCAfile = {ca}\n\
         checkHost = hearth-fleet\n\
         [sink]\naccept = 127.0.0.1:{cs}\nconnect = 127.0.0.1:{ss}\n\
         [echo]\naccept = 127.0.0.1:{ce}\nconnect = 127.0.0.1:{se}\n",
        ca = pki.ca.display(),
    );
    let (sconf, cconf) = (dir.join("stunnel-server.conf"), dir.join("stunnel-client.conf"));
    std::fs::write(&sconf, server)?;
    std::fs::write(&cconf, client)?;
    let procs = vec![
        spawn(&bin, &[sconf.display().to_string()], &dir.join("stunnel-server.log"))?,
        spawn(&bin, &[cconf.display().to_string()], &dir.join("stunnel-client.log"))?,
    ];
    let relay = Relay { sink: cs, echo: ce, procs };
    wait_ready(&relay, "stunnel").await?;
    Ok(relay)
}

/// rathole with its TLS transport (native-tls, OpenSSL): a server holding the visitor ports and
/// a client next to the services, one TLS data channel per visitor.
async fn rathole(
    tools: &Path,
    pki: &Pki,
    dir: &Path,
    sink: u16,
    echo: u16,
) -> anyhow::Result<Relay> {
    let bin = find_bin(tools, &["rathole"])?;
    let pfx = dir.join("rathole.pfx");
    let status = Command::new("openssl")
        .args(["pkcs12", "-export", "-passout", "pass:hearth", "-out"])
        .arg(&pfx)
        .arg("-inkey")
        .arg(&pki.key)
        .arg("-in")
        .arg(&pki.chain)
        .status()
        .context("cannot run openssl (for rathole's PKCS#12 identity)")?;
    anyhow::ensure!(status.success(), "openssl pkcs12 failed: {status}");
    let (ctl, ps, pe) = (free_port()?, free_port()?, free_port()?);
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{ctl}\"\n\
         [server.transport]\ntype = \"tls\"\n\
         [server.transport.tls]\npkcs12 = \"{pfx}\"\npkcs12_password = \"hearth\"\n\
         [server.services.sink]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{ps}\"\n\
         [server.services.echo]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{pe}\"\n",
        pfx = pfx.display(),
    );
    let client = format!(
        "[client]\nremote_addr = \"127.0.0.1:{ctl}\"\n\
         [client.transport]\ntype = \"tls\"\n\
         [client.transport.tls]\ntrusted_root = \"{ca}\"\nhostname = \"hearth-fleet\"\n\
         [client.services.sink]\ntoken = \"bench\"\nlocal_addr = \"127.0.0.1:{sink}\"\n\
         [client.services.echo]\ntoken = \"bench\"\nlocal_addr = \"127.0.0.1:{echo}\"\n",
        ca = pki.ca.display(),
    );
    let (sconf, cconf) = (dir.join("rathole-server.toml"), dir.join("rathole-client.toml"));
    std::fs::write(&sconf, server)?;
    std::fs::write(&cconf, client)?;
    let server = spawn(
        &bin,
        &["--server".into(), sconf.display().to_string()],
        &dir.join("rathole-server.log"),
    )?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = spawn(
        &bin,
        &["--client".into(), cconf.display().to_string()],
        &dir.join("rathole-client.log"),
    )?;
    let relay = Relay { sink: ps, echo: pe, procs: vec![server, client] };
    wait_ready(&relay, "rathole").await?;
    Ok(relay)
}

/// bore (plain TCP, no encryption): a server and one `bore local` per service; its control port
/// is bore's fixed 7835.
async fn bore(tools: &Path, dir: &Path, sink: u16, echo: u16) -> anyhow::Result<Relay> {
    let bin = find_bin(tools, &["bore"])?;
    let (ps, pe) = (free_port()?, free_port()?);
    let server = spawn(&bin, &["server".into()], &dir.join("bore-server.log"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let local = |port: u16, remote: u16, log: &str| {
        spawn(
            &bin,
            &[
                "local".into(),
                port.to_string(),
                "--local-host".into(),
                "127.0.0.1".into(),
                "--to".into(),
                "127.0.0.1".into(),
                "--port".into(),
                remote.to_string(),
            ],
            &dir.join(log),
        )
    };
    let procs = vec![server, local(sink, ps, "bore-sink.log")?, local(echo, pe, "bore-echo.log")?];
    let relay = Relay { sink: ps, echo: pe, procs };
    wait_ready(&relay, "bore").await?;
    Ok(relay)
}

struct Hearth {
    op: TunnelHandle,
    node: String,
    /// Customer ingress through the gateway (`hearthctl expose`): TCP → gateway → node, on a node
    /// that opens the lanes the gateway offers (`--lanes`).
    exposed: Relay,
    /// The same through a node that opens none: every stream on its one tunnel connection.
    exposed_one: Relay,
    /// Lanes the first node opened.
    lanes: usize,
    _nodes: Vec<TunnelHandle>,
    _running: hearth_fleet::server::RunningFleet,
    _dir: tempfile::TempDir,
}

/// A node enrolled through the fleet's API, with its tunnel up and serving the agent's own target
/// code (ports `sink` and `echo` allowed), opening up to `lanes` lanes; both ports exposed on the
/// gateway. Returns the node's id, its tunnel and the gateway ports.
#[allow(clippy::too_many_arguments)]
async fn bench_node(
    fleet: &hearth_fleet::server::Fleet,
    ep: &Endpoint,
    pin: &str,
    http: &Arc<rustls::ClientConfig>,
    name: &str,
    serial: u8,
    lanes: u8,
    (sink, echo): (u16, u16),
) -> anyhow::Result<(String, TunnelHandle, Relay)> {
    let req =
        TokenCreateRequest { labels: BTreeMap::new(), ttl_s: 600, max_uses: 1, channel: None };
    let token: TokenCreated = json(ep, http.clone(), "POST", "/v1/tokens", Some(&req)).await?;
    let key = generate_key_pem()?;
    let resp = enroll(
        ep,
        pin,
        &EnrollRequest {
            token: token.token,
            csr_pem: csr_pem(&key, name)?,
            hardware: HardwareIdentity {
                dmi_uuid: format!("4c4c4544-0000-0000-0000-00000000b0{serial:02x}"),
                board_serial: format!("BENCH{serial}"),
                gpu_uuids: vec![],
            },
            hostname: name.into(),
            gpus: vec![],
            agent_version: "bench".into(),
        },
    )
    .await?;
    let node_id = ClientIdentity { cert_pem: resp.cert_pem, key_pem: key };
    let mut node: Tunnel = connect(ep, pin, &node_id, TunnelConfig::default()).await?;
    let node_handle = node.handle.clone();
    let targets = Arc::new(Targets {
        api_socket: PathBuf::from("/nonexistent/hearth-bench.sock"),
        policy: Policy { enabled: true, exec: false, expose_ports: vec![sink, echo], lanes },
    });
    // The agent's own handling: streams on the tunnel and its lanes go to the target code.
    let on_lane: Serve = {
        let targets = targets.clone();
        Arc::new(move |inc| {
            tokio::spawn(serve(targets.clone(), inc));
        })
    };
    let mut lane_set = Lanes::new(ep.clone(), pin.into(), node_id, lanes, on_lane);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                inc = node.incoming.recv() => match inc {
                    Some(inc) => { tokio::spawn(serve(targets.clone(), inc)); }
                    None => break,
                },
                Some(msg) = node.control.recv() => { lane_set.on_control(&msg); }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.gateway.node(&resp.node_id).is_none()
        || fleet.gateway.lanes(&resp.node_id) < usize::from(lanes.min(LANES))
    {
        anyhow::ensure!(Instant::now() < deadline, "{name}: tunnel and lanes not up within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let expose = |port: u16| {
        let (ep, http, node) = (ep.clone(), http.clone(), resp.node_id.clone());
        async move {
            let path = format!("/v1/nodes/{node}/expose");
            let v: ExposeView =
                json(&ep, http, "POST", &path, Some(&ExposeRequest { port })).await?;
            Ok::<_, anyhow::Error>(v.gateway_port)
        }
    };
    let exposed = Relay { sink: expose(sink).await?, echo: expose(echo).await?, procs: Vec::new() };
    Ok((resp.node_id, node_handle, exposed))
}

async fn hearth(
    sink: u16,
    echo: u16,
    lanes: u8,
) -> anyhow::Result<(Hearth, Arc<rustls::ServerConfig>)> {
    let dir = tempfile::tempdir()?;
    let config = FleetConfig {
        listen: "127.0.0.1:0".parse()?,
        state_dir: dir.path().join("fleet"),
        registry: Some(format!("sqlite:{}", dir.path().join("registry.db").display())),
        ..FleetConfig::default()
    };
    let running = hearth_fleet::server::start(config).await?;
    let fleet = running.fleet.clone();
    let pin = fleet.ca.pin();
    let ep = Endpoint::from_url(&format!("https://{}", running.addr), "hearth-fleet")?;
    let (c, k) = fleet.ca.operator_cert("bench", Role::Admin, Duration::from_secs(3600))?;
    let admin = ClientIdentity { cert_pem: c.cert_pem, key_pem: k };
    let http = client_config(&pin, Some(&admin), b"http/1.1")?;
    let ports = (sink, echo);
    let (node, lane_node, exposed) =
        bench_node(&fleet, &ep, &pin, &http, "bench-node", 1, lanes, ports).await?;
    let (_, one_node, exposed_one) =
        bench_node(&fleet, &ep, &pin, &http, "bench-node-one", 2, 0, ports).await?;
    let op = connect(&ep, &pin, &admin, TunnelConfig::default()).await?;
    // A TLS server with the fleet's certificate, for the direct-TLS row.
    let (issued, key_pem) = fleet.ca.server_cert("hearth-fleet")?;
    let mut chain = hearth_fleet_client::tls::certs_from_pem(&issued.cert_pem, "server")?;
    chain.extend(hearth_fleet_client::tls::certs_from_pem(fleet.ca.cert_pem(), "CA")?);
    let key = hearth_fleet_client::tls::key_from_pem(&key_pem, "server")?;
    let tls = rustls::ServerConfig::builder_with_provider(hearth_fleet_client::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let h = Hearth {
        op: op.handle.clone(),
        lanes: fleet.gateway.lanes(&node),
        node,
        exposed,
        exposed_one,
        _nodes: vec![lane_node, one_node],
        _running: running,
        _dir: dir,
    };
    std::mem::forget(op); // keep its receivers alive for the whole run
    Ok((h, Arc::new(tls)))
}

async fn tls_server(config: Arc<rustls::ServerConfig>, echo: bool) -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let _ = c.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(t) = acceptor.accept(c).await {
                    if echo { echo_conn(t).await } else { sink_conn(t).await }
                }
            });
        }
    });
    Ok(port)
}

/// Raise this process's open-files limit to its hard limit (1,000 idle streams through a relay
/// hold several descriptors each; the peers inherit it).
fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own; setrlimit reads it; both only fail with an
    // error code, which leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Start a peer; a peer that cannot start becomes a row saying why.
async fn start_peer<Fut>(name: &str, start: Fut) -> Probe
where
    Fut: std::future::Future<Output = anyhow::Result<Relay>>,
{
    eprintln!("starting {name}…");
    match start.await {
        Ok(relay) => Probe::new(name, Way::Relay(relay), 1, true),
        Err(e) => {
            let mut p = Probe {
                row: Row { name: name.into(), ..Row::default() },
                way: None,
                streams: 1,
                latency: false,
                samples: Vec::new(),
            };
            p.fail(&e);
            p
        }
    }
}

async fn run(o: Opts) -> anyhow::Result<()> {
    raise_nofile();
    let load_before = loadavg();
    let bytes = o.mib * 1024 * 1024;
    let (sink, echo) = (tcp_server(false).await?, tcp_server(true).await?);
    let (h, tls_config) = hearth(sink, echo, o.lanes).await?;
    let ca = &h._running.fleet.ca;
    let pin = ca.pin();
    let work = tempfile::tempdir()?;
    let pki = {
        let (issued, key_pem) = ca.server_cert("hearth-fleet")?;
        let p = Pki {
            chain: work.path().join("server-chain.pem"),
            key: work.path().join("server-key.pem"),
            ca: work.path().join("ca.pem"),
        };
        std::fs::write(&p.chain, format!("{}\n{}", issued.cert_pem, ca.cert_pem()))?;
        std::fs::write(&p.key, key_pem)?;
        std::fs::write(&p.ca, ca.cert_pem())?;
        p
    };
    let (tls_sink, tls_echo) =
        (tls_server(tls_config.clone(), false).await?, tls_server(tls_config, true).await?);
    let client_tls = client_config(&pin, None, b"bench")?;

    // Every path first, all kept up together (the peers' processes until the end of the run), in
    // the table's order.
    let mut probes: Vec<Probe> = Vec::new();
    if o.wants("tcp") {
        let direct = Relay { sink, echo, procs: Vec::new() };
        probes.push(Probe::new("direct TCP", Way::Relay(direct), 1, true));
    }
    if o.wants("tls") {
        let way = Way::Tls { config: client_tls, sink: tls_sink, echo: tls_echo };
        probes.push(Probe::new("direct TLS 1.3 (rustls, no relay)", way, 1, true));
    }
    let dir = work.path();
    if o.wants("stunnel") {
        probes.push(start_peer(STUNNEL, stunnel(&o.tools, &pki, dir, sink, echo)).await);
    }
    if o.wants("rathole") {
        probes.push(start_peer(RATHOLE, rathole(&o.tools, &pki, dir, sink, echo)).await);
    }
    if o.wants("bore") {
        probes.push(start_peer("bore (plain TCP)", bore(&o.tools, dir, sink, echo)).await);
    }
    // Customer ingress, the peers' topology: TCP → gateway → the node's tunnel → the service.
    // First through a node without lanes (every stream on one connection), the baseline of the
    // lanes below.
    let ports = |r: &Relay| Way::Relay(Relay { sink: r.sink, echo: r.echo, procs: Vec::new() });
    if o.wants("expose") {
        probes.push(Probe::new(
            format!("{EXPOSE_ONE}, 1 stream(s)"),
            ports(&h.exposed_one),
            1,
            true,
        ));
        let expose_name = format!("{EXPOSE}, {} lane(s)", h.lanes);
        for &streams in &o.streams {
            let name = format!("{expose_name}, {streams} stream(s)");
            probes.push(Probe::new(name, ports(&h.exposed), streams, streams == 1));
        }
    }
    if o.wants("operator") {
        for &streams in &o.streams {
            let name = format!("{HEARTH}, {streams} stream(s)");
            let way = Way::Operator { op: h.op.clone(), node: h.node.clone(), sink, echo };
            probes.push(Probe::new(name, way, streams, streams == 1));
        }
    }

    // Throughput in interleaved rounds, every path once per round, so that each path's samples
    // spread over the run and the machine's slow and fast spells fall on all of them alike.
    for round in 1..=o.rounds {
        eprintln!("throughput, round {round}/{}…", o.rounds);
        for p in &mut probes {
            let Some(way) = p.way.as_ref().filter(|_| p.row.failed.is_none()) else { continue };
            match way.bulk(p.streams, bytes).await {
                Ok(sample) => {
                    // Each sample on the progress output: a slow spell shows as one path's
                    // sample with more CPU per byte, not as a change of its median.
                    eprintln!("  {}: {:.2} Gbit/s, {:.2} CPU-s/GB", p.row.name, sample.0, sample.1);
                    p.samples.push(sample);
                }
                Err(e) => p.fail(&e),
            }
        }
    }
    for p in &mut probes {
        p.settle();
    }

    // Then round trips and idle memory, path by path.
    for p in probes.iter_mut().filter(|p| p.latency && p.row.failed.is_none()) {
        let Some(way) = &p.way else { continue };
        eprintln!("{}: round trips…", p.row.name);
        if let Err(e) = way.latency_and_idle(&o, &mut p.row).await {
            p.fail(&e);
        }
    }
    let load_after = loadavg();
    let rows: Vec<Row> = probes.iter_mut().map(|p| std::mem::take(&mut p.row)).collect();
    print_table(&rows, &o, &load_before, &load_after);
    drop(probes); // the peers' processes
    Ok(())
}

const STUNNEL: &str = "stunnel4 pair (TCP → TLS 1.3 → TCP)";
const RATHOLE: &str = "rathole, TLS transport";
const HEARTH: &str = "hearth operator tunnel via gateway";
const EXPOSE: &str = "hearth expose (TCP → gateway → node tunnel)";
const EXPOSE_ONE: &str = "hearth expose, one connection (no lanes)";

/// The kernel's default TCP congestion control, which every path's sockets use: BBR's pacing
/// costs CPU per byte on loopback, more of it for the faster paths (`docs/benchmarks.md`).
fn congestion_control() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

/// The CPU's model name (`/proc/cpuinfo`): the ratios depend on it (OpenSSL's and aws-lc's
/// AES-GCM, the cost of a wake-up on the VM), so runs are compared on one model.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn print_table(rows: &[Row], o: &Opts, load_before: &str, load_after: &str) {
    let gbit = |name: &str| rows.iter().find(|r| r.name == name).and_then(|r| r.gbit_s);
    let (stunnel, rathole) = (gbit(STUNNEL), gbit(RATHOLE));
    println!(
        "\nTunnel on loopback, {} MiB per throughput run, {} interleaved throughput rounds per \
         path (median shown), {} round trips of 64 B, {} idle streams ({}; load average \
         {load_before} before, {load_after} after; {} CPUs, {}; TCP congestion control {})\n",
        o.mib,
        o.rounds,
        o.round_trips,
        o.idle_streams,
        hearth_bench::today(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        congestion_control(),
    );
    println!(
        "| path | Gbit/s | range of {} rounds | vs stunnel | vs rathole-TLS | CPU-s/GB | RTT p50 \
         idle | RTT p99 idle | RTT p50 bulk | RTT p99 bulk | RSS, {} idle streams |",
        o.rounds, o.idle_streams
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let us = |v: Option<(f64, f64)>, p99: bool| {
        v.map_or("-".into(), |(a, b)| format!("{:.0} µs", if p99 { b } else { a }))
    };
    let ratio = |g: Option<f64>, base: Option<f64>| match (g, base) {
        (Some(g), Some(b)) if b > 0.0 => format!("{:.2}x", g / b),
        _ => "-".into(),
    };
    for r in rows {
        if let Some(why) = &r.failed {
            println!("| {} | not measured: {why} | | | | | | | | | |", r.name);
            continue;
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.gbit_s.map_or("-".into(), |g| format!("{g:.2}")),
            r.range.map_or("-".into(), |(lo, hi)| format!("{lo:.2}–{hi:.2}")),
            ratio(r.gbit_s, stunnel),
            ratio(r.gbit_s, rathole),
            r.cpu_s_per_gb.map_or("-".into(), |c| format!("{c:.2}")),
            us(r.idle, false),
            us(r.idle, true),
            us(r.loaded, false),
            us(r.loaded, true),
            r.idle_rss.map_or("-".into(), hearth_bench::mib),
        );
    }
    let find = |name: String| rows.iter().find(|r| r.name == name);
    let ex = rows.iter().find(|r| r.name.starts_with(EXPOSE) && r.name.ends_with(", 1 stream(s)"));
    let one = find(format!("{EXPOSE_ONE}, 1 stream(s)"));
    let op = find(format!("{HEARTH}, 1 stream(s)"));
    let direct_rss = find("direct TCP".into()).and_then(|r| r.idle_rss);
    let best = rows
        .iter()
        .filter(|r| r.name.starts_with("hearth"))
        .filter_map(|r| r.gbit_s)
        .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.max(g))));
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "not measured",
    };
    let gbit = |r: Option<&Row>| r.and_then(|r| r.gbit_s);
    let p99 = |r: Option<&Row>| r.and_then(|r| r.loaded).map(|(_, p)| p);
    let us = |p: Option<f64>| p.map_or("-".into(), |p| format!("{p:.0} µs"));
    // Memory per 1,000 streams: the operator rows hold no service sockets (the node's built-in
    // echo); the ingress rows' service and client sockets are the direct-TCP row's, subtracted.
    let per_1000 = |m: u64| (m as f64) * 1000.0 / (o.idle_streams.max(1) as f64);
    let mem_op = op.and_then(|r| r.idle_rss).map(per_1000);
    let over_tcp = |r: Option<&Row>| {
        r.and_then(|r| r.idle_rss).zip(direct_rss).map(|(m, d)| per_1000(m.saturating_sub(d)))
    };
    let (mem_ex, mem_one) = (over_tcp(ex), over_tcp(one));
    let mib = |m: Option<f64>| m.map_or("-".into(), |m| format!("{:.1} MiB", m / 1048576.0));
    println!(
        "\n| goal (issue 6) | hearth expose, 1 stream (the peers' topology) | hearth expose, one \
         connection | hearth operator tunnel, 1 stream | best hearth row | verdict (expose, 1 \
         stream) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| >= 90 % of the stunnel pair | {} | {} | {} | {} | {} |",
        ratio(gbit(ex), stunnel),
        ratio(gbit(one), stunnel),
        ratio(gbit(op), stunnel),
        ratio(best, stunnel),
        verdict(gbit(ex).zip(stunnel).map(|(g, s)| g >= 0.9 * s)),
    );
    println!(
        "| >= 2x rathole-TLS | {} | {} | {} | {} | {} |",
        ratio(gbit(ex), rathole),
        ratio(gbit(one), rathole),
        ratio(gbit(op), rathole),
        ratio(best, rathole),
        verdict(gbit(ex).zip(rathole).map(|(g, s)| g >= 2.0 * s)),
    );
    println!(
        "| round trip p99 < 1 ms under bulk | {} | {} | {} | | {} |",
        us(p99(ex)),
        us(p99(one)),
        us(p99(op)),
        verdict(p99(ex).map(|p| p < 1000.0)),
    );
    println!(
        "| <= 32 MiB for 1,000 idle streams | {} (over direct TCP) | {} (over direct TCP) | {} | \
         | {} |",
        mib(mem_ex),
        mib(mem_one),
        mib(mem_op),
        verdict(mem_ex.map(|m| m <= 32.0 * 1048576.0)),
    );
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot build a runtime")?
        .block_on(run(o))
}
