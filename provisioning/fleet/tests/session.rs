//! End to end on a real fleet: enroll with a token, open the mTLS `hearth/1` session, heartbeat,
//! receive desired state and commands, ack them; on SQLite and on PostgreSQL; the same session
//! carried by the node's tunnel.

mod common;

use std::time::Duration;

use common::{Db, TestResult, enroll_request, fleet_on};
use hearth_fleet_client::enroll::enroll;
use hearth_fleet_client::https::json;
use hearth_fleet_client::session::{Session, SessionError};
use hearth_fleet_client::tls::ClientIdentity;
use hearth_fleet_client::tunnel::{TunnelConfig, connect, connect_node};
use hearth_proto::api::NodeState;
use hearth_proto::control::{
    CommandAck, CommandKind, CommandOutcome, ControlMessage, HealthSummary, Heartbeat,
    PowerSummary, Versions,
};
use hearth_proto::fleet::{CommandRequest, CommandView, DrainRequest, NodeView};
use hearth_proto::mux::Target;
use tokio::io::AsyncReadExt;

fn heartbeat(seq: u64, gen_: u64) -> ControlMessage {
    ControlMessage::Heartbeat(Heartbeat {
        seq,
        at_ms: hearth_fleet::now_ms(),
        state: NodeState::Ready,
        health: HealthSummary { gpus: 8, healthy: 8, degraded: 0, failed: 0 },
        power: PowerSummary { draw_w: 4000, limit_w: 5600 },
        versions: Versions { agent: "0.1.0".into(), driver: None, os: None },
        desired_generation: gen_,
    })
}

async fn recv(s: &mut Session) -> Result<ControlMessage, Box<dyn std::error::Error + Send + Sync>> {
    Ok(tokio::time::timeout(Duration::from_secs(5), s.recv()).await??)
}

/// Queue a reboot command at `path`.
async fn reboot(
    f: &common::TestFleet,
    admin: &std::sync::Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<CommandView, Box<dyn std::error::Error + Send + Sync>> {
    let req = CommandRequest { kind: CommandKind::Reboot };
    Ok(json(&f.ep(), admin.clone(), "POST", path, Some(&req)).await?)
}

/// Whether the fleet records `outcome` for command `id` (at `path`) within 2.5 s.
async fn recorded(
    f: &common::TestFleet,
    admin: &std::sync::Arc<rustls::ClientConfig>,
    path: &str,
    id: u64,
    outcome: CommandOutcome,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    for _ in 0..50 {
        let cs: Vec<CommandView> = json::<(), _>(&f.ep(), admin.clone(), "GET", path, None).await?;
        if cs.iter().any(|x| x.id == id && x.outcome.as_ref() == Some(&outcome)) {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(false)
}

async fn enroll_session_heartbeat_desired_commands(db: Db) -> TestResult {
    let Some(f) = fleet_on(db).await else { return Ok(()) };
    let token = f.token(1, 600).await;
    assert!(token.seed.contains(&f.pin()), "the seed pins the CA: {}", token.seed);
    let (req, key) = enroll_request(&token.token, 1);
    let resp = enroll(&f.ep(), &f.pin(), &req).await?;
    assert!(resp.node_id.starts_with("n-"));
    let days = (resp.not_after_ms - resp.not_before_ms) / 86_400_000;
    assert_eq!(days, 7, "node certificates are valid days, not years");
    let id = ClientIdentity { cert_pem: resp.cert_pem.clone(), key_pem: key };

    let mut s = Session::open(&f.ep(), &f.pin(), &id, "0.1.0").await?;
    assert_eq!(s.welcome.node_id, resp.node_id);
    let ControlMessage::Desired(d) = recv(&mut s).await? else { panic!("expected Desired") };
    assert_eq!(d.generation, 1);
    assert_eq!(d.labels.get("site").map(String::as_str), Some("lab"));
    s.send(&heartbeat(1, 1)).await?;
    assert_eq!(recv(&mut s).await?, ControlMessage::HeartbeatAck { seq: 1 });

    let admin = f.http(Some(&f.admin));
    let nodes: Vec<NodeView> =
        json::<(), _>(&f.ep(), f.http(Some(&f.viewer)), "GET", "/v1/nodes", None).await?;
    assert_eq!(nodes.len(), 1);
    assert!(nodes[0].online);
    assert_eq!(nodes[0].heartbeat.as_ref().map(|h| h.power.draw_w), Some(4000));

    // Drain: the desired state reaches the session with a higher generation.
    let path = format!("/v1/nodes/{}/drain", resp.node_id);
    let _: NodeView =
        json(&f.ep(), admin.clone(), "POST", &path, Some(&DrainRequest { drain: true })).await?;
    let ControlMessage::Desired(d) = recv(&mut s).await? else { panic!("expected Desired") };
    assert!(d.drain);
    assert_eq!(d.generation, 2);

    // A viewer may not drain.
    let denied = json::<_, NodeView>(
        &f.ep(),
        f.http(Some(&f.viewer)),
        "POST",
        &path,
        Some(&DrainRequest { drain: false }),
    )
    .await;
    assert!(denied.is_err_and(|e| e.to_string().contains("needs admin")));

    // A command and its ack.
    let path = format!("/v1/nodes/{}/commands", resp.node_id);
    let c = reboot(&f, &admin, &path).await?;
    let ControlMessage::Command(cmd) = recv(&mut s).await? else { panic!("expected Command") };
    assert_eq!((cmd.id, cmd.kind), (c.id, CommandKind::Reboot));
    s.send(&ControlMessage::CommandAck(CommandAck {
        id: cmd.id,
        outcome: CommandOutcome::Accepted,
    }))
    .await?;
    let acked = recorded(&f, &admin, &path, c.id, CommandOutcome::Accepted).await?;
    assert!(acked, "command ack recorded");

    // Renewal with the node's own certificate: same node, new certificate; an operator
    // certificate cannot renew.
    let csr = hearth_fleet_client::identity::csr_pem(&id.key_pem, "node")?;
    let renewed = hearth_fleet_client::enroll::renew(&f.ep(), &f.pin(), &id, &csr).await?;
    assert_eq!(renewed.node_id, resp.node_id);
    assert_ne!(renewed.cert_pem, resp.cert_pem);
    let op = hearth_fleet_client::enroll::renew(&f.ep(), &f.pin(), &f.admin, &csr).await;
    assert!(
        op.is_err_and(|e| e.to_string().contains("renewal needs the node's current certificate"))
    );

    // Liveness reaches the registry in a batch.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let row = tokio::task::block_in_place(|| f.running.fleet.registry.node(&resp.node_id))?
        .ok_or("node row")?;
    assert!(row.last_seen_ms.is_some(), "last seen flushed");
    f.running.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_on_sqlite() -> TestResult {
    enroll_session_heartbeat_desired_commands(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_on_postgres() -> TestResult {
    enroll_session_heartbeat_desired_commands(Db::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_accepts_one_version_older_and_refuses_two() -> TestResult {
    let Some(f) = fleet_on(Db::Sqlite).await else { return Ok(()) };
    let token = f.token(1, 600).await;
    let (req, key) = enroll_request(&token.token, 2);
    let resp = enroll(&f.ep(), &f.pin(), &req).await?;
    let id = ClientIdentity { cert_pem: resp.cert_pem, key_pem: key };
    let cfg =
        hearth_fleet_client::tls::client_config(&f.pin(), Some(&id), hearth_proto::control::ALPN)?;
    let v = hearth_proto::control::PROTOCOL_VERSION;
    // With version 1 there is no older one; a newer node is refused by name.
    let newer = Session::open_with(&f.ep(), cfg.clone(), "9.9", v + 1).await;
    assert!(newer.is_err_and(|e| e.to_string().contains("upgrade the fleet first")));
    let s = Session::open_with(&f.ep(), cfg, "0.1.0", v).await?;
    assert_eq!(s.welcome.protocol_version, v);
    Ok(())
}

/// Commands sent on a session that dies before the node acks them are sent again, in id order and
/// without gaps, on the next session (also those queued while the node was away); a repeated ack
/// changes nothing.
async fn unacked_commands_resent_in_order(db: Db) -> TestResult {
    let Some(f) = fleet_on(db).await else { return Ok(()) };
    let token = f.token(1, 600).await;
    let (req, key) = enroll_request(&token.token, 1);
    let resp = enroll(&f.ep(), &f.pin(), &req).await?;
    let id = ClientIdentity { cert_pem: resp.cert_pem.clone(), key_pem: key };
    let admin = f.http(Some(&f.admin));
    let path = format!("/v1/nodes/{}/commands", resp.node_id);
    let post = || async {
        json::<_, CommandView>(
            &f.ep(),
            admin.clone(),
            "POST",
            &path,
            Some(&CommandRequest { kind: CommandKind::RunDiagnostics }),
        )
        .await
    };

    let mut s = Session::open(&f.ep(), &f.pin(), &id, "0.1.0").await?;
    let ControlMessage::Desired(_) = recv(&mut s).await? else { panic!("expected Desired") };
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(post().await?.id);
    }
    for want in &ids {
        let ControlMessage::Command(c) = recv(&mut s).await? else { panic!("expected Command") };
        assert_eq!(c.id, *want);
    }
    // Ack only the first two, then the session dies; two more are queued while away.
    for cid in &ids[..2] {
        s.send(&ControlMessage::CommandAck(CommandAck { id: *cid, outcome: CommandOutcome::Done }))
            .await?;
    }
    s.send(&heartbeat(1, 1)).await?;
    assert_eq!(recv(&mut s).await?, ControlMessage::HeartbeatAck { seq: 1 });
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    ids.push(post().await?.id);
    ids.push(post().await?.id);

    let mut s = Session::open(&f.ep(), &f.pin(), &id, "0.1.0").await?;
    let ControlMessage::Desired(_) = recv(&mut s).await? else { panic!("expected Desired") };
    let mut got = Vec::new();
    for _ in 0..5 {
        let ControlMessage::Command(c) = recv(&mut s).await? else { panic!("expected Command") };
        got.push(c.id);
    }
    assert_eq!(got, ids[2..].to_vec(), "the unacked commands, in order, nothing else");
    // A live push after the resend continues the sequence.
    ids.push(post().await?.id);
    let ControlMessage::Command(c) = recv(&mut s).await? else { panic!("expected Command") };
    assert_eq!(Some(&c.id), ids.last());

    // Every command acked, the first twice: one ack recorded each, the first outcome kept.
    for cid in &ids {
        s.send(&ControlMessage::CommandAck(CommandAck { id: *cid, outcome: CommandOutcome::Done }))
            .await?;
    }
    let late = CommandOutcome::Failed("late duplicate".into());
    s.send(&ControlMessage::CommandAck(CommandAck { id: ids[0], outcome: late })).await?;
    s.send(&heartbeat(2, 1)).await?;
    assert_eq!(recv(&mut s).await?, ControlMessage::HeartbeatAck { seq: 2 });
    let cs: Vec<CommandView> = json::<(), _>(&f.ep(), admin.clone(), "GET", &path, None).await?;
    assert_eq!(cs.len(), ids.len());
    assert!(cs.iter().all(|c| c.outcome == Some(CommandOutcome::Done)), "{cs:?}");
    let events = tokio::task::block_in_place(|| f.running.fleet.registry.events(1000))?;
    let acks = events.iter().filter(|e| e.kind == "command-ack").count();
    assert_eq!(acks, ids.len(), "one command-ack event per command");
    f.running.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_commands_resent_on_sqlite() -> TestResult {
    unacked_commands_resent_in_order(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_commands_resent_on_postgres() -> TestResult {
    unacked_commands_resent_in_order(Db::Postgres).await
}

/// The session rides the node's tunnel (ALPN `hearth-tunnel/2`): Hello, Welcome, desired state,
/// heartbeats and commands go as Session frames on the one connection; when the tunnel ends, the
/// session ends with it; a revoked node is told so on its tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_rides_the_nodes_tunnel_and_ends_with_it() -> TestResult {
    let Some(f) = fleet_on(Db::Sqlite).await else { return Ok(()) };
    let token = f.token(1, 600).await;
    let (req, key) = enroll_request(&token.token, 3);
    let resp = enroll(&f.ep(), &f.pin(), &req).await?;
    let node = resp.node_id.clone();
    let id = ClientIdentity { cert_pem: resp.cert_pem, key_pem: key };
    let on_tunnel = || async {
        let (t, with_session) =
            connect_node(&f.ep(), &f.pin(), &id, TunnelConfig::default()).await?;
        assert!(with_session, "the fleet did not take the session on the tunnel");
        let s = Session::on_tunnel(&t.handle, "0.1.0").await;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((t, s))
    };

    let (t, s) = on_tunnel().await?;
    let mut s = s?;
    assert_eq!(s.welcome.node_id, node);
    let ControlMessage::Desired(d) = recv(&mut s).await? else { panic!("expected Desired") };
    assert_eq!(d.generation, 1);
    s.send(&heartbeat(1, 1)).await?;
    assert_eq!(recv(&mut s).await?, ControlMessage::HeartbeatAck { seq: 1 });
    let gw = &f.running.fleet.gateway;
    assert_eq!(gw.connected(), vec![node.clone()]);
    assert!(gw.carries_session(&node));
    assert_eq!(gw.session_total(), 1);

    // One session per tunnel: a second Session stream is refused, as is one on a tunnel that
    // carries no session and one an operator asks the gateway to relay.
    let refused = |mut st: hearth_fleet_client::tunnel::TunnelStream| async move {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), st.read(&mut b)).await;
        matches!(r, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    assert!(refused(t.handle.open(&Target::Session)?).await, "a second session stream");
    let admin_tunnel = connect(&f.ep(), &f.pin(), &f.admin, TunnelConfig::default()).await?;
    let via = Target::Via { node: node.clone(), target: Box::new(Target::Session) };
    assert!(refused(admin_tunnel.handle.open(&via)?).await, "a relayed session stream");
    admin_tunnel.handle.close();
    s.send(&heartbeat(2, 1)).await?;
    assert_eq!(
        recv(&mut s).await?,
        ControlMessage::HeartbeatAck { seq: 2 },
        "the session lives on"
    );

    // A command reaches the node on the tunnel and its ack is recorded.
    let admin = f.http(Some(&f.admin));
    let path = format!("/v1/nodes/{node}/commands");
    let c = reboot(&f, &admin, &path).await?;
    let ControlMessage::Command(cmd) = recv(&mut s).await? else { panic!("expected Command") };
    assert_eq!(cmd.id, c.id);
    s.send(&ControlMessage::CommandAck(CommandAck { id: cmd.id, outcome: CommandOutcome::Done }))
        .await?;
    let acked = recorded(&f, &admin, &path, c.id, CommandOutcome::Done).await?;
    assert!(acked, "the ack sent on the tunnel was not recorded");

    // The tunnel ends: so does the session, on both ends.
    t.handle.close();
    assert!(recv(&mut s).await.is_err(), "the session outlived its tunnel");
    let live = || f.running.fleet.live().get(&node).is_some_and(|l| l.tx.is_some());
    for _ in 0..250 {
        if !live() && gw.connected().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!live(), "the fleet kept a session whose tunnel ended");
    assert!(gw.connected().is_empty());

    // A node tunnel without the session (`hearth-tunnel/1`, as a node of an older fleet would
    // connect): a Session stream on it is refused.
    let old_style = connect(&f.ep(), &f.pin(), &id, TunnelConfig::default()).await?;
    assert!(
        refused(old_style.handle.open(&Target::Session)?).await,
        "a session on hearth-tunnel/1"
    );
    old_style.handle.close();

    // Revoked: the node learns it on the tunnel (and stops), and the tunnel closes.
    let _: NodeView =
        json::<(), _>(&f.ep(), admin.clone(), "POST", &format!("/v1/nodes/{node}/revoke"), None)
            .await?;
    let (t, s) = on_tunnel().await?;
    match s {
        Err(SessionError::Refused { revoked: true, reason }) => {
            assert!(reason.contains("revoked"), "{reason}")
        }
        other => panic!("a revoked node's session on its tunnel: {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(5), t.handle.ended()).await?;
    assert!(gw.connected().is_empty(), "a revoked node's tunnel was registered");
    f.running.stop().await;
    Ok(())
}
