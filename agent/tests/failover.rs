//! Several gateways: the seed names two fleet processes (one registry, one CA); the node's
//! session and tunnel are on the first, the session carried by the tunnel (one connection); when
//! it stops, both come up on the second within the backoff bound (the first retry's ceiling, 1 s,
//! plus the connect and the handshake). The second has `tunnel_sessions` off, like a fleet from
//! before it: there the node keeps a separate session beside its tunnel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_agent::agent::Agent;
use hearth_agent::config::{BackendKind, Config};
use hearth_agent::fakes::fleet::{FakeSeedSource, Netlink, Rebooted};
use hearth_agent::fleet::Fleet;
use hearth_agent::fleet::hardware::SimDmi;
use hearth_agent::supervisor::{BACKOFF_START, Supervisor};
use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet::server::RunningFleet;
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::seed::Seed;
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_proto::fleet::{TokenCreateRequest, TokenCreated};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn gateway(
    dir: &std::path::Path,
    id: &str,
    tunnel_sessions: bool,
) -> Result<RunningFleet, Box<dyn std::error::Error + Send + Sync>> {
    Ok(hearth_fleet::server::start(FleetConfig {
        listen: "127.0.0.1:0".parse()?,
        state_dir: dir.join("fleet"),
        registry: Some(format!("sqlite:{}", dir.join("registry.db").display())),
        flush_interval_ms: 200,
        gateway_id: Some(id.to_string()),
        tunnel_sessions,
        ..FleetConfig::default()
    })
    .await?)
}

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_tunnel_fail_over_to_the_seeds_next_gateway() -> TestResult {
    let dir = tempfile::tempdir()?;
    let first = gateway(dir.path(), "g1", true).await?;
    // The second loads the first's CA from the shared state directory.
    let second = gateway(dir.path(), "g2", false).await?;
    let (op, key) = first.fleet.ca.operator_cert("t", Role::Admin, Duration::from_secs(600))?;
    let admin = client_config(
        &first.fleet.ca.pin(),
        Some(&ClientIdentity { cert_pem: op.cert_pem, key_pem: key }),
        b"http/1.1",
    )?;
    let ep = Endpoint::from_url(&format!("https://{}", first.addr), "hearth-fleet")?;
    let req =
        TokenCreateRequest { labels: Default::default(), ttl_s: 600, max_uses: 1, channel: None };
    let token: TokenCreated = json(&ep, admin, "POST", "/v1/tokens", Some(&req)).await?;
    let mut seed = Seed::parse(&token.seed, "token")?;
    seed.fleet.url = format!("https://{}", first.addr);
    seed.fleet.fallback_urls = vec![format!("https://{}", second.addr)];

    let mut config = Config::default();
    config.state.dir = dir.path().join("agent");
    config.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.gpu.backend = BackendKind::Sim;
    config.api.socket = dir.path().join("agent.sock");
    let agent = Agent::new(config, None, "failover".into());
    let sub = Arc::new(
        Fleet::with(
            agent.clone(),
            vec![Box::new(FakeSeedSource::new("test seed", Some(seed.to_toml())))],
            Box::new(SimDmi { seed: 11 }),
            Arc::new(Rebooted::default()),
        )
        .with_netwatch(Arc::new(Netlink::default())),
    );
    agent.gpus().send_modify(|s| s.rounds = 1);
    let sup = Supervisor::start(vec![sub], BACKOFF_START);

    let limit = Duration::from_secs(30);
    wait_for("the session on the first gateway", limit, || {
        agent.fleet_status().borrow().state == "connected"
    })
    .await;
    let node = agent.fleet_status().borrow().node_id.clone().ok_or("no node id")?;
    let (f1, f2) = (first.fleet.clone(), second.fleet.clone());
    wait_for("the tunnel on the first gateway", limit, || f1.gateway.node(&node).is_some()).await;
    assert!(f1.gateway.carries_session(&node), "the session does not ride the tunnel");
    assert_eq!(
        agent.fleet_status().borrow().fleet_url.as_deref(),
        Some(format!("https://{}", first.addr).as_str())
    );
    assert!(f2.gateway.node(&node).is_none());

    first.stop().await;
    // The bound: the first retry waits at most 1 s (full jitter, attempt 0), then a loopback
    // connect, TLS handshake and welcome; 5 s leaves room for a loaded machine.
    let bound = Duration::from_secs(1) + Duration::from_secs(5);
    let took =
        wait_for("the tunnel on the second gateway", bound, || f2.gateway.node(&node).is_some())
            .await;
    wait_for("the session on the second gateway", bound, || {
        let s = agent.fleet_status().borrow().clone();
        s.state == "connected"
            && s.fleet_url.as_deref() == Some(&format!("https://{}", second.addr))
    })
    .await;
    assert!(took < bound, "failover took {took:?}");
    assert!(!f2.gateway.carries_session(&node), "a gateway without tunnel_sessions took one");
    assert!(f2.live().get(&node).is_some_and(|l| l.tx.is_some()), "no session on the second");
    sup.shutdown(Duration::from_secs(2)).await;
    second.stop().await;
    Ok(())
}
