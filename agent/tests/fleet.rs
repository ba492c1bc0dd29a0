//! The agent's `fleet` subsystem against a real `hearth-fleet` (SQLite, loopback): it enrolls
//! with the seed's token, holds the `hearth/1` session, publishes desired state on the agent's
//! watch channel, acks commands (reboot through the Rebooter; diagnostics "not supported yet"),
//! and, once revoked, persists `Revoked` and says so.

use std::sync::Arc;
use std::time::Duration;

use hearth_agent::agent::Agent;
use hearth_agent::config::{BackendKind, Config};
use hearth_agent::fakes::fleet::{FakeSeedSource, Rebooted};
use hearth_agent::fleet::Fleet;
use hearth_agent::fleet::hardware::SimDmi;
use hearth_agent::fleet::state::Membership;
use hearth_agent::persist::Store;
use hearth_agent::supervisor::{BACKOFF_START, Supervisor};
use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::seed::Seed;
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_proto::api::{GpuVerdict, HealthAction, VerdictChange};
use hearth_proto::control::{CommandKind, CommandOutcome};
use hearth_proto::fleet::{
    CommandRequest, CommandView, DrainRequest, EventView, NodeView, PowerBudgetRequest,
    TokenCreateRequest, TokenCreated,
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrolls_follows_desired_state_acks_commands_and_stops_when_revoked() -> TestResult {
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
    let token: TokenCreated = json(&ep, admin.clone(), "POST", "/v1/tokens", Some(&req)).await?;
    let mut seed = Seed::parse(&token.seed, "token")?;
    // The listener was bound to port 0: point the seed at the real port.
    seed.fleet.url = format!("https://{}", fleet.addr);

    let mut config = Config::default();
    config.state.dir = dir.path().join("agent");
    config.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.gpu.backend = BackendKind::Sim;
    let agent = Agent::new(config, None, "testhost".into());
    let rebooted = Arc::new(Rebooted::default());
    let sub = Arc::new(Fleet::with(
        agent.clone(),
        vec![Box::new(FakeSeedSource::new("test seed", Some(seed.to_toml())))],
        Box::new(SimDmi { seed: 7 }),
        rebooted.clone(),
    ));
    // Enrollment waits for the GPU layer's first round (no sampler runs here: mark it done).
    agent.gpus().send_modify(|s| s.rounds = 1);
    let sup = Supervisor::start(vec![sub], BACKOFF_START);

    wait_for("the fleet session", || agent.fleet_status().borrow().state == "connected").await;
    let node = agent.fleet_status().borrow().node_id.clone().ok_or("no node id")?;
    wait_for("desired state", || agent.desired().borrow().is_some()).await;
    let store = Store::new(dir.path().join("agent/fleet.json"));
    assert!(matches!(store.load::<Membership>()?.map(|l| l.state), Some(Membership::Enrolled(_))));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("agent/fleet/node.key"))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the node key is owner-only");
    }

    // Drain reaches the agent's desired-state channel with a new generation.
    let _: NodeView = json(
        &ep,
        admin.clone(),
        "POST",
        &format!("/v1/nodes/{node}/drain"),
        Some(&DrainRequest { drain: true }),
    )
    .await?;
    wait_for("drain", || {
        agent.desired().borrow().as_ref().is_some_and(|d| d.drain && d.generation == 2)
    })
    .await;

    // A power budget set on the fleet reaches the node's power settings.
    let _: NodeView = json(
        &ep,
        admin.clone(),
        "POST",
        &format!("/v1/nodes/{node}/power-budget"),
        Some(&PowerBudgetRequest { watts: Some(3000) }),
    )
    .await?;
    wait_for("the fleet's power budget", || {
        agent.power_settings().borrow().settings.budget_w == Some(3000)
    })
    .await;

    // A health verdict change on the node lands in the fleet's event log.
    let mut view = agent.health_watch().borrow().clone();
    view.history.push(VerdictChange {
        seq: 1,
        at_ms: 1_700_000_000_000,
        subject: "gpu 3".into(),
        uuid: None,
        from: GpuVerdict::Healthy,
        to: GpuVerdict::Failed,
        service: None,
        action: HealthAction::Quarantine,
        reasons: vec!["XID 79: fallen off the bus".into()],
    });
    agent.publish_health(view);
    let mut reported = false;
    for _ in 0..100 {
        let events: Vec<EventView> =
            json::<(), _>(&ep, admin.clone(), "GET", "/v1/events", None).await?;
        reported = events.iter().any(|e| {
            e.kind == "node.health"
                && e.node_id.as_deref() == Some(node.as_str())
                && e.message.contains("gpu 3: Healthy -> Failed")
                && e.message.contains("XID 79")
        });
        if reported {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reported, "the verdict change never reached the fleet's events");

    // Reboot goes through the Rebooter; diagnostics need a GPU the command cannot name.
    let cmds = format!("/v1/nodes/{node}/commands");
    let _: CommandView = json(
        &ep,
        admin.clone(),
        "POST",
        &cmds,
        Some(&CommandRequest { kind: CommandKind::Reboot }),
    )
    .await?;
    let _: CommandView = json(
        &ep,
        admin.clone(),
        "POST",
        &cmds,
        Some(&CommandRequest { kind: CommandKind::RunDiagnostics }),
    )
    .await?;
    wait_for("the reboot", || rebooted.count() == 1).await;
    let mut outcomes = Vec::new();
    for _ in 0..100 {
        let cs: Vec<CommandView> = json::<(), _>(&ep, admin.clone(), "GET", &cmds, None).await?;
        outcomes = cs.into_iter().filter_map(|c| c.outcome.map(|o| (c.kind, o))).collect();
        if outcomes.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(outcomes.contains(&(CommandKind::Reboot, CommandOutcome::Accepted)), "{outcomes:?}");
    assert!(
        outcomes.iter().any(|(k, o)| *k == CommandKind::RunDiagnostics
            && matches!(o, CommandOutcome::NotSupported(r) if r.contains("names none"))),
        "{outcomes:?}"
    );

    // Revoked: the fleet ends the session, refuses the next one, the agent persists Revoked.
    let _: NodeView =
        json::<(), _>(&ep, admin.clone(), "POST", &format!("/v1/nodes/{node}/revoke"), None)
            .await?;
    wait_for("revoked", || agent.fleet_status().borrow().state == "revoked").await;
    assert!(matches!(
        store.load::<Membership>()?.map(|l| l.state),
        Some(Membership::Revoked { .. })
    ));
    let status = agent.fleet_status().borrow().clone();
    assert!(status.last_error.is_some_and(|e| e.contains("revoked")));

    sup.shutdown(Duration::from_secs(2)).await;
    fleet.stop().await;
    Ok(())
}
