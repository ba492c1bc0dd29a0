//! The secure tunnel on loopback, side by side in one run: direct TCP; direct TLS 1.3 (rustls, the
//! fleet's own certificate, no relay: the floor any TLS relay sits on); and the Hearth tunnel
//! through a real `hearth-fleet` gateway (operator tunnel → gateway relay → node tunnel → the
//! agent's target code → a loopback TCP sink) with 1, 8 and 64 parallel streams.
//!
//! Figures: bulk throughput; 64-byte round trips p50/p99, idle and while a bulk stream runs on the
//! same path; memory per idle stream (1,000 streams); CPU-seconds per GB. Everything runs in this
//! process (both ends), so CPU per GB counts sender, relay and receiver together.
//!
//! Run: `cargo run --release -p hearth-bench --bin tunnel -- --mib 1024` (docs/benchmarks.md).

#![allow(clippy::print_stdout, clippy::print_stderr)] // a benchmark prints its table

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hearth_agent::config::TunnelConfig as Policy;
use hearth_agent::fleet::tunnel::{Targets, serve};
use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet_client::enroll::enroll;
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::identity::{csr_pem, generate_key_pem};
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_fleet_client::tunnel::{Tunnel, TunnelConfig, TunnelHandle, connect};
use hearth_proto::fleet::{EnrollRequest, HardwareIdentity, TokenCreateRequest, TokenCreated};
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
}

fn cpu_now() -> Duration {
    hearth_bench::proc_sample(std::process::id()).map(|s| s.cpu).unwrap_or_default()
}

fn rss_now() -> u64 {
    hearth_bench::proc_sample(std::process::id()).map(|s| s.rss).unwrap_or_default()
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
        if n == 0 || c.write_all(&buf[..n]).await.is_err() {
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
        s.read_exact(&mut back).await?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() as f64 * q) as usize).min(us.len() - 1)];
    Ok((at(0.50), at(0.99)))
}

#[derive(Debug, Default)]
struct Row {
    gbit_s: Option<f64>,
    cpu_s_per_gb: Option<f64>,
    idle: Option<(f64, f64)>,
    loaded: Option<(f64, f64)>,
}

/// Throughput over `streams` parallel connections made by `open`.
async fn bulk<S, F, Fut>(open: F, streams: usize, bytes: u64) -> anyhow::Result<(f64, f64)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<S>>,
{
    let mut conns = Vec::new();
    for _ in 0..streams {
        conns.push(open().await?);
    }
    let (cpu0, t0) = (cpu_now(), Instant::now());
    let each = bytes / streams as u64;
    let tasks: Vec<_> = conns.into_iter().map(|c| tokio::spawn(push(c, each))).collect();
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_now() - cpu0).as_secs_f64();
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

struct Hearth {
    op: TunnelHandle,
    node: String,
    _node_tunnel: TunnelHandle,
    _running: hearth_fleet::server::RunningFleet,
    _dir: tempfile::TempDir,
}

async fn hearth(sink: u16, echo: u16) -> anyhow::Result<(Hearth, Arc<rustls::ServerConfig>)> {
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
    let req = TokenCreateRequest { labels: BTreeMap::new(), ttl_s: 600, max_uses: 1 };
    let http = client_config(&pin, Some(&admin), b"http/1.1")?;
    let token: TokenCreated = json(&ep, http, "POST", "/v1/tokens", Some(&req)).await?;
    let key = generate_key_pem()?;
    let resp = enroll(
        &ep,
        &pin,
        &EnrollRequest {
            token: token.token,
            csr_pem: csr_pem(&key, "bench-node")?,
            hardware: HardwareIdentity {
                dmi_uuid: "4c4c4544-0000-0000-0000-00000000b001".into(),
                board_serial: "BENCH1".into(),
                gpu_uuids: vec![],
            },
            hostname: "bench-node".into(),
            gpus: vec![],
            agent_version: "bench".into(),
        },
    )
    .await?;
    let node_id = ClientIdentity { cert_pem: resp.cert_pem, key_pem: key };
    let mut node: Tunnel = connect(&ep, &pin, &node_id, TunnelConfig::default()).await?;
    let node_handle = node.handle.clone();
    let targets = Arc::new(Targets {
        api_socket: dir.path().join("none.sock"),
        policy: Policy { enabled: true, exec: false, expose_ports: vec![sink, echo] },
    });
    tokio::spawn(async move {
        while let Some(inc) = node.incoming.recv().await {
            tokio::spawn(serve(targets.clone(), inc));
        }
    });
    while fleet.gateway.node(&resp.node_id).is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
        node: resp.node_id,
        _node_tunnel: node_handle,
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

async fn run(o: Opts) -> anyhow::Result<()> {
    let bytes = o.mib * 1024 * 1024;
    let (sink, echo) = (tcp_server(false).await?, tcp_server(true).await?);
    let (h, tls_config) = hearth(sink, echo).await?;
    let pin = h._running.fleet.ca.pin();
    let (tls_sink, tls_echo) =
        (tls_server(tls_config.clone(), false).await?, tls_server(tls_config, true).await?);
    let client_tls = client_config(&pin, None, b"bench")?;
    let tls_connect = |port: u16| {
        let cfg = client_tls.clone();
        async move {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from("hearth-fleet")?;
            Ok::<_, anyhow::Error>(tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await?)
        }
    };
    let tcp_connect = |port: u16| async move {
        let c = TcpStream::connect(("127.0.0.1", port)).await?;
        c.set_nodelay(true)?;
        Ok::<_, anyhow::Error>(c)
    };
    let via =
        |port: u16| Target::Via { node: h.node.clone(), target: Box::new(Target::Port(port)) };
    let mut rows: Vec<(String, Row)> = Vec::new();

    eprintln!("direct TCP…");
    let mut r = Row::default();
    let (g, c) = bulk(|| tcp_connect(sink), 1, bytes).await?;
    (r.gbit_s, r.cpu_s_per_gb) = (Some(g), Some(c));
    let (i, l) = latency(|e| tcp_connect(if e { echo } else { sink }), o.round_trips).await?;
    (r.idle, r.loaded) = (Some(i), Some(l));
    rows.push(("direct TCP".into(), r));

    eprintln!("direct TLS…");
    let mut r = Row::default();
    let (g, c) = bulk(|| tls_connect(tls_sink), 1, bytes).await?;
    (r.gbit_s, r.cpu_s_per_gb) = (Some(g), Some(c));
    let (i, l) =
        latency(|e| tls_connect(if e { tls_echo } else { tls_sink }), o.round_trips).await?;
    (r.idle, r.loaded) = (Some(i), Some(l));
    rows.push(("direct TLS 1.3 (rustls, no relay)".into(), r));

    for streams in [1usize, 8, 64] {
        eprintln!("hearth, {streams} streams…");
        let mut r = Row::default();
        let op = h.op.clone();
        let t = via(sink);
        let (g, c) = bulk(
            || {
                let s = op.open(&t);
                async move { Ok(s?) }
            },
            streams,
            bytes,
        )
        .await?;
        (r.gbit_s, r.cpu_s_per_gb) = (Some(g), Some(c));
        if streams == 1 {
            let (te, ts) = (via(echo), via(sink));
            let (i, l) = latency(
                |e| {
                    let s = h.op.open(if e { &te } else { &ts });
                    async move { Ok(s?) }
                },
                o.round_trips,
            )
            .await?;
            (r.idle, r.loaded) = (Some(i), Some(l));
        }
        rows.push((format!("hearth tunnel via gateway, {streams} stream(s)"), r));
    }

    eprintln!("{} idle streams…", o.idle_streams);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_now();
    let mut idle = Vec::new();
    let echo_target = Target::Via { node: h.node.clone(), target: Box::new(Target::Echo) };
    for _ in 0..o.idle_streams {
        let mut s = h.op.open(&echo_target)?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        idle.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_now();
    let per_stream = after.saturating_sub(before) as f64 / o.idle_streams as f64;

    let base = rows.iter().find(|(n, _)| n.starts_with("direct TLS")).and_then(|(_, r)| r.gbit_s);
    println!(
        "\nTunnel on loopback, {} MiB per throughput run, {} round trips of 64 B ({})\n",
        o.mib,
        o.round_trips,
        hearth_bench::today()
    );
    println!(
        "| path | Gbit/s | vs direct TLS | CPU-s/GB | RTT p50 idle | RTT p99 idle | RTT p50 bulk | RTT p99 bulk |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let us = |v: Option<(f64, f64)>, p99: bool| {
        v.map_or("-".into(), |(a, b)| format!("{:.0} µs", if p99 { b } else { a }))
    };
    for (name, r) in &rows {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} |",
            r.gbit_s.map_or("-".into(), |g| format!("{g:.2}")),
            match (r.gbit_s, base) {
                (Some(g), Some(b)) if b > 0.0 => format!("{:.2}x", g / b),
                _ => "-".into(),
            },
            r.cpu_s_per_gb.map_or("-".into(), |c| format!("{c:.2}")),
            us(r.idle, false),
            us(r.idle, true),
            us(r.loaded, false),
            us(r.loaded, true),
        );
    }
    println!(
        "\n{} idle streams through the gateway (operator, gateway and node ends in this process): \
         RSS +{} ({:.0} B per stream, all three ends)",
        o.idle_streams,
        hearth_bench::mib(after.saturating_sub(before)),
        per_stream
    );
    drop(idle);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot build a runtime")?
        .block_on(run(o))
}
