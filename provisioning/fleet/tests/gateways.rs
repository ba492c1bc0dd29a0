//! The fleet as several gateway processes on one registry (docs/fleet-scaling.md): two fleets
//! share the CA and the registry; a node's session is on one, the operator talks to the other,
//! and drains, commands and revocations still reach the node. Two gateways share one address
//! with `SO_REUSEPORT`. Exposures are bound by the process holding their node's tunnel and move
//! with it. Enrollments committed in groups: a refused one changes nothing and the others of its
//! batch commit. On SQLite and on PostgreSQL.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Db, TestResult, enroll_request, registry_url};
use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet::registry::{
    BatchItem, CertRecord, Enrollment, NewToken, Refusal, Registry, RegistryError, SignFn,
};
use hearth_fleet::server::{RunningFleet, start};
use hearth_fleet_client::enroll::enroll;
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::session::Session;
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_fleet_client::tunnel::{TunnelConfig, connect, connect_node};
use hearth_proto::api::NodeState;
use hearth_proto::control::{
    CommandKind, ControlMessage, HealthSummary, Heartbeat, PowerSummary, Versions,
};
use hearth_proto::fleet::{
    CommandRequest, CommandView, DrainRequest, ExposeRequest, ExposeView, HardwareIdentity,
    NodeView, TokenCreateRequest, TokenCreated,
};
use hearth_proto::mux::Target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn gateway(dir: &std::path::Path, url: &str, id: &str, listen: &str) -> RunningFleet {
    let config = FleetConfig {
        listen: listen.parse().unwrap_or_else(|e| panic!("{e}")),
        state_dir: dir.join("fleet"),
        registry: Some(url.to_string()),
        flush_interval_ms: 200,
        gateway_id: Some(id.to_string()),
        reuse_port: true,
        ..FleetConfig::default()
    };
    start(config).await.unwrap_or_else(|e| panic!("gateway {id}: {e:#}"))
}

fn ep(f: &RunningFleet) -> Endpoint {
    Endpoint::from_url(&format!("https://{}", f.addr), "hearth-fleet")
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The next message that is not a heartbeat ack, within 5 s.
async fn next(s: &mut Session) -> Result<ControlMessage, Box<dyn std::error::Error + Send + Sync>> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.recv()).await?? {
            ControlMessage::HeartbeatAck { .. } => {}
            m => return Ok(m),
        }
    }
}

fn heartbeat(seq: u64) -> ControlMessage {
    ControlMessage::Heartbeat(Heartbeat {
        seq,
        at_ms: 1,
        state: NodeState::Ready,
        health: HealthSummary { gpus: 1, healthy: 1, degraded: 0, failed: 0 },
        power: PowerSummary { draw_w: 300, limit_w: 700 },
        versions: Versions { agent: "0.1.0".into(), driver: None, os: None },
        desired_generation: 1,
    })
}

async fn changes_reach_a_node_through_its_gateway(db: Db) -> TestResult {
    let dir = tempfile::tempdir()?;
    let Some(url) = registry_url(db, dir.path()) else { return Ok(()) };
    let g1 = gateway(dir.path(), &url, "g1", "127.0.0.1:0").await;
    // g2 loads g1's CA from the shared state directory and shares g1's address.
    let g2 = gateway(dir.path(), &url, "g2", "127.0.0.1:0").await;
    let g3 = gateway(dir.path(), &url, "g3", &g1.addr.to_string()).await;
    assert_eq!(g3.addr, g1.addr, "SO_REUSEPORT: a second gateway shares the address");
    g3.stop().await;
    assert_eq!(g1.fleet.ca.pin(), g2.fleet.ca.pin(), "one CA for every gateway");
    let pin = g1.fleet.ca.pin();
    let (cert, key) = g2
        .fleet
        .ca
        .operator_cert("tester", Role::Admin, Duration::from_secs(600))
        .map_err(|e| e.to_string())?;
    let admin = client_config(
        &pin,
        Some(&ClientIdentity { cert_pem: cert.cert_pem, key_pem: key }),
        b"http/1.1",
    )?;

    // Enrolled through g2, session on g1.
    let token: TokenCreated = json(
        &ep(&g2),
        admin.clone(),
        "POST",
        "/v1/tokens",
        Some(&TokenCreateRequest {
            labels: BTreeMap::new(),
            ttl_s: 600,
            max_uses: 1,
            channel: None,
        }),
    )
    .await?;
    let (req, key) = enroll_request(&token.token, 1);
    let resp = enroll(&ep(&g2), &pin, &req).await?;
    let node = resp.node_id.clone();
    let id = ClientIdentity { cert_pem: resp.cert_pem, key_pem: key };
    let mut s = Session::open(&ep(&g1), &pin, &id, "0.1.0").await?;
    let ControlMessage::Desired(d) = next(&mut s).await? else { panic!("expected Desired") };
    assert_eq!(d.generation, 1);
    s.send(&heartbeat(1)).await?;

    // g1 records that it holds the session (with the liveness batch); g2 shows it online.
    let mut online = false;
    for _ in 0..50 {
        let n: NodeView =
            json::<(), _>(&ep(&g2), admin.clone(), "GET", &format!("/v1/nodes/{node}"), None)
                .await?;
        if n.online {
            online = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(online, "another gateway shows the node online from the registry");

    // A drain made through g2 reaches the session on g1.
    let _: NodeView = json(
        &ep(&g2),
        admin.clone(),
        "POST",
        &format!("/v1/nodes/{node}/drain"),
        Some(&DrainRequest { drain: true }),
    )
    .await?;
    let ControlMessage::Desired(d) = next(&mut s).await? else { panic!("expected Desired") };
    assert!(d.drain);
    assert_eq!(d.generation, 2);

    // So does a command, sent once.
    let c: CommandView = json(
        &ep(&g2),
        admin.clone(),
        "POST",
        &format!("/v1/nodes/{node}/commands"),
        Some(&CommandRequest { kind: CommandKind::Reboot }),
    )
    .await?;
    // Delivered with the desired state again (same generation: the node ignores it).
    let m = loop {
        match next(&mut s).await? {
            ControlMessage::Desired(d) => assert_eq!(d.generation, 2),
            m => break m,
        }
    };
    let ControlMessage::Command(cmd) = m else { panic!("expected Command, got {m:?}") };
    assert_eq!(cmd.id, c.id);

    // Revoked through g2: g1 ends the session.
    let _: NodeView =
        json::<(), _>(&ep(&g2), admin.clone(), "POST", &format!("/v1/nodes/{node}/revoke"), None)
            .await?;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.recv().await {
                Ok(ControlMessage::HeartbeatAck { .. } | ControlMessage::Desired(_)) => {}
                other => return other,
            }
        }
    })
    .await;
    assert!(matches!(ended, Ok(Err(_))), "the session on g1 ends: {ended:?}");
    g1.stop().await;
    g2.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_on_sqlite() -> TestResult {
    changes_reach_a_node_through_its_gateway(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_on_postgres() -> TestResult {
    changes_reach_a_node_through_its_gateway(Db::Postgres).await
}

fn enrollment(token: &str, n: u32) -> Enrollment {
    Enrollment {
        token_hash: hearth_fleet_client::tls::sha256_hex(token.as_bytes()),
        hardware: HardwareIdentity {
            dmi_uuid: format!("uuid-{n}"),
            board_serial: format!("SN{n}"),
            gpu_uuids: vec![],
        },
        hostname: format!("node{n}"),
        gpus: vec![],
        agent_version: "0.1.0".into(),
        new_id: format!("n-batch{n}"),
    }
}

fn enroll_batch(db: Db) -> TestResult {
    let dir = tempfile::tempdir()?;
    let Some(url) = registry_url(db, dir.path()) else { return Ok(()) };
    let r = Registry::open_url(&url)?;
    let now = 1_000_000;
    for (id, secret, uses) in [("t-single", "single", 1), ("t-multi", "multi", 10)] {
        r.create_token(&NewToken {
            id: id.into(),
            hash: hearth_fleet_client::tls::sha256_hex(secret.as_bytes()),
            labels: BTreeMap::new(),
            created_ms: now,
            expires_ms: now + 60_000,
            max_uses: uses,
            update_channel: "stable".into(),
        })?;
    }
    let before = r.dump()?;
    let es = [
        enrollment("single", 1),
        enrollment("single", 2), // used up by the first, in the same transaction
        enrollment("nope", 3),   // unknown
        enrollment("multi", 4),
    ];
    let mut signs: Vec<Box<SignFn<'static>>> = (0..es.len())
        .map(|k| {
            Box::new(move |_: &str| Ok(CertRecord { serial: format!("{k:02x}"), not_after_ms: 9 }))
                as Box<SignFn<'static>>
        })
        .collect();
    let mut batch: Vec<BatchItem<'_>> =
        es.iter().zip(signs.iter_mut()).map(|(e, s)| (e, &mut **s as _)).collect();
    let out = r.enroll_batch(&mut batch, now)?;
    assert!(matches!(&out[0], Ok((id, true)) if id == "n-batch1"), "{:?}", out[0]);
    assert!(
        matches!(&out[1], Err(RegistryError::Refused(Refusal::UsedUpToken { .. }))),
        "{:?}",
        out[1]
    );
    assert!(matches!(&out[2], Err(RegistryError::Refused(Refusal::UnknownToken))), "{:?}", out[2]);
    assert!(matches!(&out[3], Ok((id, true)) if id == "n-batch4"), "{:?}", out[3]);
    let after = r.dump()?;
    assert_eq!(after["nodes"].len(), before["nodes"].len() + 2, "only the two winners");
    assert_eq!(after["node_liveness"].len(), 2, "a liveness row per new node: {after:?}");
    let enrolled = after["events"].iter().filter(|e| e.contains("\"enrolled\"")).count();
    assert_eq!(enrolled, 2, "an enrolled event per new node: {:?}", after["events"]);
    let ids: Vec<_> = r.nodes()?.into_iter().map(|n| n.id).collect();
    assert_eq!(ids, ["n-batch1", "n-batch4"]);
    let uses: BTreeMap<_, _> = r.tokens()?.into_iter().map(|t| (t.id, t.uses)).collect();
    assert_eq!(uses["t-single"], 1);
    assert_eq!(uses["t-multi"], 1);

    // Revoked hardware is refused after its token use was taken: the use is given back; known
    // hardware re-enrolls under its node id.
    r.revoke_node("n-batch1", now)?;
    let es = [enrollment("multi", 1), enrollment("multi", 5), enrollment("multi", 4)];
    let mut signs: Vec<Box<SignFn<'static>>> = (0..es.len())
        .map(|_| {
            Box::new(|_: &str| Ok(CertRecord { serial: "ff".into(), not_after_ms: 9 }))
                as Box<SignFn<'static>>
        })
        .collect();
    let mut batch: Vec<BatchItem<'_>> =
        es.iter().zip(signs.iter_mut()).map(|(e, s)| (e, &mut **s as _)).collect();
    let out = r.enroll_batch(&mut batch, now)?;
    assert!(
        matches!(&out[0], Err(RegistryError::Refused(Refusal::RevokedHardware { node })) if node == "n-batch1"),
        "{:?}",
        out[0]
    );
    assert!(matches!(&out[1], Ok((id, true)) if id == "n-batch5"), "{:?}", out[1]);
    assert!(matches!(&out[2], Ok((id, false)) if id == "n-batch4"), "{:?}", out[2]);
    let uses: BTreeMap<_, _> = r.tokens()?.into_iter().map(|t| (t.id, t.uses)).collect();
    assert_eq!(uses["t-multi"], 3, "the refused enrollment's use was given back");
    let after = r.dump()?;
    assert_eq!((after["nodes"].len(), after["node_liveness"].len()), (3, 3));
    Ok(())
}

#[test]
fn enroll_batch_refuses_alone_on_sqlite() -> TestResult {
    enroll_batch(Db::Sqlite)
}

#[test]
fn enroll_batch_refuses_alone_on_postgres() -> TestResult {
    enroll_batch(Db::Postgres)
}

/// A node tunnel that carries its session (heartbeats every 200 ms, so the registry records its
/// gateway) and echoes every `Port` stream; ends with the returned handle.
async fn echo_node(
    g: &RunningFleet,
    pin: &str,
    id: &ClientIdentity,
) -> Result<hearth_fleet_client::tunnel::TunnelHandle, Box<dyn std::error::Error + Send + Sync>> {
    let (mut t, with_session) = connect_node(&ep(g), pin, id, TunnelConfig::default()).await?;
    assert!(with_session);
    let mut s = Session::on_tunnel(&t.handle, "0.1.0").await?;
    let handle = t.handle.clone();
    tokio::spawn(async move {
        let mut seq = 0;
        loop {
            seq += 1;
            if s.send(&heartbeat(seq)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::spawn(async move {
        while let Some(inc) = t.incoming.recv().await {
            tokio::spawn(async move {
                let mut st = inc.stream;
                let mut buf = [0u8; 1024];
                while let Ok(n) = st.read(&mut buf).await {
                    if n == 0 || st.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = st.shutdown().await;
            });
        }
    });
    Ok(handle)
}

/// Whether a customer connection to `port` on the loopback gets its bytes echoed.
async fn echoes(port: u16) -> bool {
    let attempt = async {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        c.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(&b == b"ping")
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), attempt).await, Ok(Ok(true)))
}

async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) -> TestResult {
    for _ in 0..150 {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("timed out waiting for {what}").into())
}

/// With several gateway processes an exposure's port is bound where the node's tunnel is: an
/// exposure made through the other process is bound by the tunnel's within a second and
/// forwards; an operator's stream taken by the other process reaches the node through the
/// tunnel's process; when the tunnel moves, the port moves with it; a removal made through the
/// other process releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposures_follow_the_nodes_tunnel_across_gateway_processes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let Some(url) = registry_url(Db::Sqlite, dir.path()) else { return Ok(()) };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let gw = |id: &'static str| {
        let config = FleetConfig {
            listen: "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
            state_dir: dir.path().join("fleet"),
            registry: Some(url.clone()),
            flush_interval_ms: 200,
            gateway_id: Some(id.to_string()),
            expose_ports: [port, port],
            ..FleetConfig::default()
        };
        async move { start(config).await.unwrap_or_else(|e| panic!("gateway {id}: {e:#}")) }
    };
    let g1 = gw("g1").await;
    let g2 = gw("g2").await;
    let pin = g1.fleet.ca.pin();
    let (cert, key) = g1
        .fleet
        .ca
        .operator_cert("tester", Role::Admin, Duration::from_secs(600))
        .map_err(|e| e.to_string())?;
    let operator = ClientIdentity { cert_pem: cert.cert_pem, key_pem: key };
    let admin = client_config(&pin, Some(&operator), b"http/1.1")?;
    let req =
        TokenCreateRequest { labels: BTreeMap::new(), ttl_s: 600, max_uses: 1, channel: None };
    let token: TokenCreated =
        json(&ep(&g2), admin.clone(), "POST", "/v1/tokens", Some(&req)).await?;
    let (req, key) = enroll_request(&token.token, 7);
    let resp = enroll(&ep(&g2), &pin, &req).await?;
    let node = resp.node_id.clone();
    let id = ClientIdentity { cert_pem: resp.cert_pem, key_pem: key };

    // The tunnel on g1; the exposure made through g2, which binds nothing.
    let on_g1 = echo_node(&g1, &pin, &id).await?;
    let (f1, f2) = (g1.fleet.clone(), g2.fleet.clone());
    // Online at g2 once g1's liveness batch (which names the session's gateway) is written.
    let path = format!("/v1/nodes/{node}");
    eventually("the session recorded by g1", async || {
        let n = json::<(), NodeView>(&ep(&g2), admin.clone(), "GET", &path, None).await;
        n.is_ok_and(|n| n.online)
    })
    .await?;
    let e: ExposeView = json(
        &ep(&g2),
        admin.clone(),
        "POST",
        &format!("/v1/nodes/{node}/expose"),
        Some(&ExposeRequest { port: 7007 }),
    )
    .await?;
    assert_eq!(e.gateway_port, port);
    eventually("g1 to bind the exposure", async || f1.exposer.listening() == vec![port]).await?;
    assert!(
        f2.exposer.listening().is_empty(),
        "g2 bound an exposure of a node it has no tunnel of"
    );
    assert!(echoes(port).await, "the exposure does not reach the node through g1");

    // An operator's tunnel on g2 reaches the node, whose tunnel is on g1, through g1's socket.
    let op = connect(&ep(&g2), &pin, &operator, TunnelConfig::default()).await?;
    let via = Target::Via { node: node.clone(), target: Box::new(Target::Port(7007)) };
    let mut st = op.handle.open(&via)?;
    st.write_all(b"through g1").await?;
    let mut got = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), st.read_exact(&mut got)).await??;
    assert_eq!(&got, b"through g1");
    let unknown = Target::Via { node: "n-nobody".into(), target: Box::new(Target::Port(7007)) };
    let mut st = op.handle.open(&unknown)?;
    let r = tokio::time::timeout(Duration::from_secs(5), st.read(&mut got)).await?;
    assert!(r.is_err(), "a node no gateway holds was reached: {r:?}");
    op.handle.close();

    // The tunnel moves to g2: the port follows.
    on_g1.close();
    let _on_g2 = echo_node(&g2, &pin, &id).await?;
    eventually("g2 to bind the exposure", async || f2.exposer.listening() == vec![port]).await?;
    assert!(f1.exposer.listening().is_empty(), "g1 kept the port after the tunnel left");
    eventually("the exposure to reach the node through g2", async || echoes(port).await).await?;

    // Removed through g1: g2 lets the port go (told through the outbox once the registry names
    // g2 as the node's gateway, or by its periodic reconciliation, `expose::RECONCILE`).
    let _: ExposeView = json::<(), _>(
        &ep(&g1),
        admin.clone(),
        "POST",
        &format!("/v1/exposures/{port}/remove"),
        None,
    )
    .await?;
    eventually("g2 to release the removed exposure", async || f2.exposer.listening().is_empty())
        .await?;
    assert!(!echoes(port).await, "a removed exposure still forwards");
    g1.stop().await;
    g2.stop().await;
    Ok(())
}
