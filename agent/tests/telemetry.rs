//! Telemetry end to end: a full agent on simulated GPUs enrolled in a real `hearth-fleet`
//! (SQLite, loopback). The fleet's scrape proxy fetches the node's `/metrics` through the
//! tunnel and the values match the simulator's state; HTTP SD lists the node behind the proxy;
//! the node's own listener serves the same names; a stopped node's proxy answers 502.

use std::sync::Arc;
use std::time::Duration;

use hearth_agent::config::{BackendKind, Config};
use hearth_agent::fakes::systemd::SystemdNotifier;
use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet_client::https::{Endpoint, json, request};
use hearth_fleet_client::seed::Seed;
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_proto::exposition::parse_text;
use hearth_proto::fleet::{TokenCreateRequest, TokenCreated};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_proxies_node_metrics_through_the_tunnel_with_the_simulator_values() -> TestResult {
    let dir = tempfile::tempdir()?;
    let fleet = hearth_fleet::server::start(FleetConfig {
        listen: "127.0.0.1:0".parse()?,
        state_dir: dir.path().join("fleet"),
        ..FleetConfig::default()
    })
    .await?;
    let cert = |role| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
        let (op, key) =
            fleet.fleet.ca.operator_cert("prometheus", role, Duration::from_secs(600))?;
        Ok(client_config(
            &fleet.fleet.ca.pin(),
            Some(&ClientIdentity { cert_pem: op.cert_pem, key_pem: key }),
            b"http/1.1",
        )?)
    };
    let admin = cert(Role::Admin)?;
    let viewer = cert(Role::Viewer)?;
    let ep = Endpoint::from_url(&format!("https://{}", fleet.addr), "hearth-fleet")?;
    let req =
        TokenCreateRequest { labels: Default::default(), ttl_s: 600, max_uses: 1, channel: None };
    let token: TokenCreated = json(&ep, admin, "POST", "/v1/tokens", Some(&req)).await?;
    let mut seed = Seed::parse(&token.seed, "token")?;
    seed.fleet.url = format!("https://{}", fleet.addr);
    let seed_path = dir.path().join("seed.toml");
    std::fs::write(&seed_path, seed.to_toml())?;

    let mut config = Config::default();
    config.api.socket = dir.path().join("agent.sock");
    config.state.dir = dir.path().join("agent");
    config.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.gpu.backend = BackendKind::Sim;
    config.gpu.sample_interval_ms = 200;
    config.sim.gpus = 2;
    config.fleet.seed = Some(seed_path);
    let running = hearth_agent::start(config, Arc::new(SystemdNotifier::with_watchdog(None)))?;
    let agent = running.agent().clone();
    wait_for("the fleet session", || agent.fleet_status().borrow().state == "connected").await;
    let node = agent.fleet_status().borrow().node_id.clone().ok_or("no node id")?;
    wait_for("the node's tunnel", || !fleet.fleet.gateway.connected().is_empty()).await;

    // Without a certificate: refused.
    let anon = client_config(&fleet.fleet.ca.pin(), None, b"http/1.1")?;
    let r = request(&ep, anon, "GET", &format!("/v1/nodes/{node}/metrics"), None).await?;
    assert_eq!(r.status, 401);

    // Through the proxy, with a viewer certificate: the simulator's values.
    let r = request(&ep, viewer.clone(), "GET", &format!("/v1/nodes/{node}/metrics"), None).await?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let parsed = parse_text(std::str::from_utf8(&r.body)?)?;
    let snap = agent.gpus().borrow().clone();
    assert_eq!(snap.gpus.len(), 2);
    for g in &snap.gpus {
        let s = g.sample.as_ref().ok_or("not sampled")?;
        let get = |name: &str| {
            parsed
                .iter()
                .find(|(n, l, _)| {
                    n == name && l.iter().any(|(k, v)| k == "UUID" && *v == g.inventory.uuid)
                })
                .map(|p| p.2)
                .ok_or(format!("{name} of {} missing", g.inventory.uuid))
        };
        // The node sampled again since this snapshot (every 200 ms): a few degrees of drift.
        assert!((get("DCGM_FI_DEV_GPU_TEMP")? - f64::from(s.temp_core_c)).abs() <= 5.0);
        let w = get("DCGM_FI_DEV_POWER_USAGE")?;
        assert!(w > 10.0, "{w} W");
        assert_eq!(get("DCGM_FI_DEV_FB_FREE")?.fract(), 0.0);
    }
    let only = |name: &str| parsed.iter().find(|(n, _, _)| n == name).map(|p| p.2);
    assert_eq!(only("hearth_fleet_session_up"), Some(1.0));
    assert_eq!(only("hearth_tunnel_up"), Some(1.0));
    assert!(only("hearth_tunnel_streams_total").unwrap_or(0.0) >= 1.0);
    assert!(only("hearth_fleet_session_sent_bytes_total").unwrap_or(0.0) > 0.0);

    // HTTP SD lists the node behind the proxy.
    let sd = request(&ep, viewer.clone(), "GET", "/v1/sd", None).await?;
    assert_eq!(sd.status, 200);
    let groups: serde_json::Value = serde_json::from_slice(&sd.body)?;
    assert_eq!(groups[0]["labels"]["__metrics_path__"], format!("/v1/nodes/{node}/metrics"));
    assert_eq!(groups[0]["labels"]["instance"], node.as_str());

    // The fleet's own exposition counts the node.
    let fm = request(&ep, viewer.clone(), "GET", "/metrics", None).await?;
    let fp = parse_text(std::str::from_utf8(&fm.body)?)?;
    let online = fp.iter().find(|(n, l, _)| {
        n == "hearth_fleet_nodes" && l.iter().any(|(k, v)| k == "state" && v == "online")
    });
    assert_eq!(online.map(|p| p.2), Some(1.0));

    // A stopped node: the proxy answers 502 (so Prometheus marks its series stale).
    running.stop().await;
    wait_for("the tunnel to drop", || fleet.fleet.gateway.connected().is_empty()).await;
    let r = request(&ep, viewer, "GET", &format!("/v1/nodes/{node}/metrics"), None).await?;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    Ok(())
}

/// Summaries recorded while disconnected, then a crash (the spool dropped without any shutdown
/// step) and a torn last record: after restart and reconnect every whole summary is in the
/// fleet's registry, and the node forgets them once acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_summaries_reach_the_fleet_after_a_crash_and_reconnect() -> TestResult {
    use hearth_agent::telemetry::offline::{FILE, Spool};
    use hearth_proto::control::{GpuSummary, Summary};

    let dir = tempfile::tempdir()?;
    let fleet = hearth_fleet::server::start(FleetConfig {
        listen: "127.0.0.1:0".parse()?,
        state_dir: dir.path().join("fleet"),
        ..FleetConfig::default()
    })
    .await?;
    let (op, key) = fleet.fleet.ca.operator_cert("t", Role::Admin, Duration::from_secs(600))?;
    let admin = client_config(
        &fleet.fleet.ca.pin(),
        Some(&ClientIdentity { cert_pem: op.cert_pem, key_pem: key }),
        b"http/1.1",
    )?;
    let ep = Endpoint::from_url(&format!("https://{}", fleet.addr), "hearth-fleet")?;
    let req =
        TokenCreateRequest { labels: Default::default(), ttl_s: 600, max_uses: 1, channel: None };
    let token: TokenCreated = json(&ep, admin, "POST", "/v1/tokens", Some(&req)).await?;
    let mut seed = Seed::parse(&token.seed, "token")?;
    seed.fleet.url = format!("https://{}", fleet.addr);
    let seed_path = dir.path().join("seed.toml");
    std::fs::write(&seed_path, seed.to_toml())?;

    // 130 intervals while disconnected (more than two upload batches), then a crash.
    let state = dir.path().join("agent");
    std::fs::create_dir_all(&state)?;
    let mut spool = Spool::open(&state.join(FILE))?;
    for i in 0..131u64 {
        spool.push(Summary {
            seq: 0,
            start_ms: 1_790_000_000_000 + i * 10_000,
            duration_ms: 10_000,
            state: None,
            gpus: vec![GpuSummary { index: 0, samples: 10, temp_avg_c: 60, ..Default::default() }],
        })?;
    }
    drop(spool);
    // The power went while the 131st was being written.
    let path = state.join(FILE);
    let len = std::fs::metadata(&path)?.len();
    std::fs::OpenOptions::new().write(true).open(&path)?.set_len(len - 2)?;

    let mut config = Config::default();
    config.api.socket = dir.path().join("agent.sock");
    config.state.dir = state;
    config.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.gpu.backend = BackendKind::Sim;
    config.sim.gpus = 1;
    config.fleet.seed = Some(seed_path);
    let running = hearth_agent::start(config, Arc::new(SystemdNotifier::with_watchdog(None)))?;
    let agent = running.agent().clone();
    wait_for("the fleet session", || agent.fleet_status().borrow().state == "connected").await;
    let node = agent.fleet_status().borrow().node_id.clone().ok_or("no node id")?;
    let mut stored = Vec::new();
    for _ in 0..200 {
        let id = node.clone();
        stored = fleet.fleet.db(move |r| r.summaries(&id)).await?;
        let forgotten =
            agent.offline_spool().is_some_and(|s| s.lock().map(|s| s.is_empty()).unwrap_or(false));
        if stored.len() >= 130 && forgotten {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seqs: Vec<u64> = stored.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, (1..=130).collect::<Vec<_>>(), "every whole summary, once, in order");
    assert_eq!(stored[129].start_ms, 1_790_000_000_000 + 129 * 10_000);
    let spool = agent.offline_spool().ok_or("no spool")?;
    assert!(spool.lock().map(|s| s.is_empty()).unwrap_or(false), "acked summaries are forgotten");
    running.stop().await;
    assert!(Spool::open(&path)?.is_empty(), "and stay forgotten across a restart");
    Ok(())
}
