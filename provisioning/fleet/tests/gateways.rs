//! The fleet as several gateway processes on one registry (docs/fleet-scaling.md): two fleets
//! share the CA and the registry; a node's session is on one, the operator talks to the other,
//! and drains, commands and revocations still reach the node. Two gateways share one address
//! with `SO_REUSEPORT`. Enrollments committed in groups: a refused one changes nothing and
//! the others of its batch commit. On SQLite and on PostgreSQL.

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
use hearth_proto::api::NodeState;
use hearth_proto::control::{
    CommandKind, ControlMessage, HealthSummary, Heartbeat, PowerSummary, Versions,
};
use hearth_proto::fleet::{
    CommandRequest, CommandView, DrainRequest, HardwareIdentity, NodeView, TokenCreateRequest,
    TokenCreated,
};

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
