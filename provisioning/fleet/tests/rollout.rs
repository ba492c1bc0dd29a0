//! Staged rollouts on a real fleet over TLS, on SQLite and on PostgreSQL: simulated nodes speak
//! `hearth/1` (enrolled, holding sessions, answering the desired state's `update_version` with
//! the update reports a node sends), a rollout tells them wave by wave, halts when a wave
//! crosses its failure threshold (the remaining nodes are never told), holds a maintenance
//! window's group until its window opens (an injected clock), survives a fleet restart, and
//! refuses bad requests naming the cause while changing nothing. Nodes whose heartbeats say they
//! already run the version are recorded `current` and never told; a node enrolled while the
//! rollout runs joins it; held nodes moved off the channel or revoked are let go, so the rollout
//! completes without them. A token's channel is its nodes' channel from their first desired state.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Db, TestFleet, TestResult, enroll_request, fleet_on};
use hearth_fleet::config::FleetConfig;
use hearth_fleet::rollout::ManualClock;
use hearth_fleet_client::enroll::enroll;
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::session::Session;
use hearth_fleet_client::tls::ClientIdentity;
use hearth_proto::api::NodeState;
use hearth_proto::control::{
    ControlMessage, HealthSummary, Heartbeat, PowerSummary, UpdateReport, Versions,
};
use hearth_proto::fleet::{EventView, TokenCreateRequest, TokenCreated};
use hearth_proto::rollout::{Rollout, RolloutCreate, RolloutState, WaveSpec, Window};
use tokio_util::sync::CancellationToken;

/// A midnight, UTC.
const MIDNIGHT: u64 = 20_000 * 86_400_000;

fn at(h: u64, m: u64) -> u64 {
    MIDNIGHT + (h * 60 + m) * 60_000
}

/// Nodes told, with the version they were told.
type Told = Arc<Mutex<BTreeMap<String, String>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn report(phase: &str, version: &str, done: u64, reason: Option<&str>) -> ControlMessage {
    ControlMessage::Update(UpdateReport {
        at_ms: hearth_fleet::now_ms(),
        phase: phase.into(),
        version: Some(version.into()),
        from_version: Some("1.0".into()),
        bytes_done: done,
        bytes_total: 1000,
        reason: reason.map(Into::into),
    })
}

fn heartbeat(seq: u64, os: Option<&str>) -> ControlMessage {
    ControlMessage::Heartbeat(Heartbeat {
        seq,
        at_ms: hearth_fleet::now_ms(),
        state: NodeState::Ready,
        health: HealthSummary { gpus: 8, healthy: 8, degraded: 0, failed: 0 },
        power: PowerSummary::default(),
        versions: Versions { agent: "0.1.0".into(), driver: None, os: os.map(Into::into) },
        desired_generation: 0,
    })
}

/// A simulated node's behaviour.
#[derive(Debug, Clone, Copy, Default)]
struct Sim {
    /// Roll back with this reason instead of being blessed.
    fail: Option<&'static str>,
    /// The OS version its heartbeats name (a heartbeat goes out as soon as the session opens);
    /// told that version, it does nothing, like the agent.
    os: Option<&'static str>,
}

/// One simulated node: holds a session (reconnecting after a fleet restart); told a version,
/// it reports downloading, writing, installed, rebooting and then blessed, or rolled back with
/// `fail`'s reason.
async fn sim_node(
    ep: Endpoint,
    pin: String,
    id: ClientIdentity,
    node: String,
    sim: Sim,
    told: Told,
    stop: CancellationToken,
) {
    let mut seq = 0u64;
    while !stop.is_cancelled() {
        let Ok(mut s) = Session::open(&ep, &pin, &id, "0.1.0").await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        seq += 1;
        if s.send(&heartbeat(seq, sim.os)).await.is_err() {
            continue;
        }
        loop {
            let m = tokio::select! {
                () = stop.cancelled() => return,
                m = tokio::time::timeout(Duration::from_secs(3), s.recv()) => m,
            };
            let m = match m {
                Ok(Ok(m)) => m,
                Ok(Err(_)) => break,
                Err(_) => {
                    seq += 1;
                    if s.send(&heartbeat(seq, sim.os)).await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            let ControlMessage::Desired(d) = m else { continue };
            let Some(v) = d.update_version else { continue };
            if lock(&told).insert(node.clone(), v.clone()).is_some() || sim.os == Some(&v) {
                continue; // already handled, or already running it (the agent does nothing)
            }
            let mut msgs = vec![
                report("downloading", &v, 500, None),
                report("writing", &v, 1000, None),
                report("installed", &v, 1000, None),
                report("rebooting", &v, 1000, None),
            ];
            msgs.push(match sim.fail {
                None => report("blessed", &v, 0, None),
                Some(why) => report("rolled_back", &v, 0, Some(why)),
            });
            for m in &msgs {
                if s.send(m).await.is_err() {
                    break;
                }
            }
        }
    }
}

struct Nodes {
    ids: Vec<(String, ClientIdentity)>,
}

/// Enroll `n` nodes with a token carrying `labels`.
async fn enroll_nodes(f: &TestFleet, n: u32, first: u32, labels: &[(&str, &str)]) -> Nodes {
    let req = TokenCreateRequest {
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ttl_s: 600,
        max_uses: n,
        channel: None,
    };
    let token: TokenCreated =
        json(&f.ep(), f.http(Some(&f.admin)), "POST", "/v1/tokens", Some(&req))
            .await
            .unwrap_or_else(|e| panic!("token: {e}"));
    let mut ids = Vec::new();
    for k in 0..n {
        let (req, key) = enroll_request(&token.token, first + k);
        let resp = enroll(&f.ep(), &f.pin(), &req).await.unwrap_or_else(|e| panic!("enroll: {e}"));
        ids.push((resp.node_id, ClientIdentity { cert_pem: resp.cert_pem, key_pem: key }));
    }
    Nodes { ids }
}

fn start_sims(
    f: &TestFleet,
    nodes: &Nodes,
    fail: &BTreeMap<String, &'static str>,
    told: &Told,
    stop: &CancellationToken,
) {
    for (node, id) in &nodes.ids {
        let sim = Sim { fail: fail.get(node).copied(), os: None };
        start_sim(f, node, id, sim, told, stop);
    }
}

fn start_sim(
    f: &TestFleet,
    node: &str,
    id: &ClientIdentity,
    sim: Sim,
    told: &Told,
    stop: &CancellationToken,
) {
    tokio::spawn(sim_node(
        f.ep(),
        f.pin(),
        id.clone(),
        node.to_string(),
        sim,
        told.clone(),
        stop.clone(),
    ));
}

async fn get_rollout(f: &TestFleet, id: u64) -> Rollout {
    json::<(), _>(&f.ep(), f.http(Some(&f.viewer)), "GET", &format!("/v1/rollouts/{id}"), None)
        .await
        .unwrap_or_else(|e| panic!("rollout {id}: {e}"))
}

async fn wait_rollout(
    f: &TestFleet,
    id: u64,
    what: &str,
    ok: impl Fn(&Rollout) -> bool,
) -> Rollout {
    let mut last = None;
    // Up to 60 s: generous for a machine shared with builds (only a failure waits that long).
    for _ in 0..600 {
        let r = get_rollout(f, id).await;
        if ok(&r) {
            return r;
        }
        last = Some(r);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}: {last:#?}");
}

/// One wave of the whole channel, zero tolerance, the default node timeout; nodes labelled
/// `site=ams1` only inside their 02:00–04:00 window.
fn ams1_held_02_to_04() -> RolloutCreate {
    RolloutCreate {
        channel: "stable".into(),
        version: "2.0".into(),
        waves: waves(&[(100, 0)]),
        windows: vec![Window {
            label: "site=ams1".into(),
            start: "02:00".into(),
            end: "04:00".into(),
        }],
        node_timeout_s: None,
    }
}

fn waves(w: &[(u8, u8)]) -> Vec<WaveSpec> {
    w.iter().map(|&(until_pct, max_failure_pct)| WaveSpec { until_pct, max_failure_pct }).collect()
}

async fn create(f: &TestFleet, req: &RolloutCreate) -> Result<Rollout, String> {
    json(&f.ep(), f.http(Some(&f.admin)), "POST", "/v1/rollouts", Some(req))
        .await
        .map_err(|e| e.to_string())
}

/// Stop the fleet and start it again on the same address, state directory and registry.
async fn restart(f: TestFleet) -> TestFleet {
    let TestFleet { dir, running, admin, viewer, url } = f;
    let addr = running.addr;
    running.stop().await;
    let config = FleetConfig {
        listen: addr,
        state_dir: dir.path().join("fleet"),
        registry: Some(url.clone()),
        flush_interval_ms: 200,
        ..FleetConfig::default()
    };
    let running =
        hearth_fleet::server::start(config).await.unwrap_or_else(|e| panic!("restart: {e:#}"));
    TestFleet { dir, running, admin, viewer, url }
}

async fn halts_on_a_failing_wave_and_survives_a_restart(db: Db) -> TestResult {
    let Some(f) = fleet_on(db).await else { return Ok(()) };
    let nodes = enroll_nodes(&f, 10, 100, &[("site", "lab")]).await;
    // The plan sorts nodes by id: canary = 1st, wave 2 = next 4, wave 3 = the last 5.
    let mut sorted: Vec<String> = nodes.ids.iter().map(|n| n.0.clone()).collect();
    sorted.sort();
    let fail: BTreeMap<String, &'static str> = [
        (
            sorted[1].clone(),
            "GPU health worse than before the update: 7 of 8 GPUs healthy, 8 before",
        ),
        (sorted[3].clone(), "did not finish booting within its tries"),
    ]
    .into();
    let told: Told = Arc::default();
    let stop = CancellationToken::new();
    start_sims(&f, &nodes, &fail, &told, &stop);

    let req = RolloutCreate {
        channel: "stable".into(),
        version: "2.0".into(),
        waves: waves(&[(10, 0), (50, 25), (100, 10)]),
        windows: vec![],
        node_timeout_s: None,
    };
    let r = create(&f, &req).await?;
    assert_eq!(r.state, RolloutState::Running);
    assert_eq!((0..3).map(|w| r.counts(w).nodes).collect::<Vec<_>>(), [1, 4, 5]);
    // A second rollout of the channel is refused while this one runs.
    let e = create(&f, &req).await.expect_err("busy");
    assert!(e.contains(&format!("rollout {} of channel stable is running", r.id)), "{e}");

    let halted = wait_rollout(&f, r.id, "the halt", |r| r.state == RolloutState::Halted).await;
    let why = halted.reason.clone().unwrap_or_default();
    assert!(why.contains("wave 2 of 3: 2 of 4 node(s) failed or rolled back"), "{why}");
    assert!(why.contains("7 of 8 GPUs healthy") && why.contains(&sorted[3]), "{why}");
    assert_eq!(halted.counts(0).blessed, 1, "the canary blessed");
    // Give the fleet time to (wrongly) tell anyone else, then check nobody of wave 3 was told.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let wave3: BTreeSet<&String> = sorted[5..].iter().collect();
    let told_now = lock(&told).clone();
    assert!(told_now.keys().all(|n| !wave3.contains(n)), "wave 3 told: {told_now:?}");
    assert_eq!(told_now.len(), 5);
    let events: Vec<EventView> =
        json::<(), _>(&f.ep(), f.http(Some(&f.viewer)), "GET", "/v1/events?limit=500", None)
            .await?;
    let halt = events.iter().find(|e| e.kind == "rollout.halted").ok_or("no halt event")?;
    assert!(halt.message.contains("wave 2 of 3"), "{}", halt.message);
    assert!(events.iter().any(|e| e.kind == "node.update.rolled_back"));
    // Pausing a halted rollout is refused with the reason; the rollout does not change.
    let before = f.dump().get("rollouts").cloned();
    let e = json::<_, Rollout>(
        &f.ep(),
        f.http(Some(&f.admin)),
        "POST",
        &format!("/v1/rollouts/{}/pause", r.id),
        Some(&()),
    )
    .await
    .expect_err("halted");
    assert!(e.to_string().contains(&format!("rollout {} is halted: cannot pause", r.id)), "{e}");
    assert_eq!(f.dump().get("rollouts").cloned(), before);
    // Nodes told before the halt still report (a halt stops telling, not listening): compare
    // across the restart with the rollout as it stands once they have finished.
    let settled = get_rollout(&f, r.id).await;
    assert!(settled.nodes.iter().filter(|n| n.wave == 1).all(|n| n.finished()), "{settled:#?}");

    // The rollout is the same after a restart, and still tells no one.
    let f = restart(f).await;
    let after = get_rollout(&f, r.id).await;
    assert_eq!(after.state, RolloutState::Halted);
    assert_eq!(after.nodes, settled.nodes);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(lock(&told).len(), 5, "nobody told after the restart");
    stop.cancel();
    f.running.stop().await;
    Ok(())
}

async fn a_window_holds_its_group_across_a_restart_then_completes(db: Db) -> TestResult {
    let Some(f) = fleet_on(db).await else { return Ok(()) };
    f.running.fleet.set_clock(Arc::new(ManualClock::at(at(1, 0))));
    let ams = enroll_nodes(&f, 2, 200, &[("site", "ams1")]).await;
    let fra = enroll_nodes(&f, 2, 300, &[("site", "fra1")]).await;
    let told: Told = Arc::default();
    let stop = CancellationToken::new();
    start_sims(&f, &ams, &BTreeMap::new(), &told, &stop);
    start_sims(&f, &fra, &BTreeMap::new(), &told, &stop);
    let req = ams1_held_02_to_04();
    let r = create(&f, &req).await?;
    let ams_ids: BTreeSet<String> = ams.ids.iter().map(|n| n.0.clone()).collect();
    let held = wait_rollout(&f, r.id, "fra1 blessed", |r| r.counts(0).blessed == 2).await;
    for n in &held.nodes {
        let want = if ams_ids.contains(&n.node) { "pending" } else { "blessed" };
        assert_eq!(n.phase, want, "{}", n.node);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(lock(&told).keys().all(|n| !ams_ids.contains(n)), "ams1 told outside its window");

    // Restart (the rollout is in the registry), then the window opens.
    let f = restart(f).await;
    f.running.fleet.set_clock(Arc::new(ManualClock::at(at(2, 30))));
    let done = wait_rollout(&f, r.id, "completion", |r| r.state == RolloutState::Completed).await;
    assert_eq!(done.counts(0).blessed, 4);
    assert!(done.wave_done_ms[0].is_some());
    assert_eq!(lock(&told).len(), 4);
    stop.cancel();
    f.running.stop().await;
    Ok(())
}

async fn bad_requests_change_nothing(db: Db) -> TestResult {
    let Some(f) = fleet_on(db).await else { return Ok(()) };
    let _ = enroll_nodes(&f, 1, 400, &[("site", "lab")]).await;
    let before = f.dump();
    let good = RolloutCreate {
        channel: "stable".into(),
        version: "2.0".into(),
        waves: waves(&[(100, 0)]),
        windows: vec![],
        node_timeout_s: None,
    };
    let cases: Vec<(RolloutCreate, &str)> = vec![
        (RolloutCreate { channel: "beta".into(), ..good.clone() }, "no node is on channel beta"),
        (RolloutCreate { version: "two".into(), ..good.clone() }, "version"),
        (RolloutCreate { waves: waves(&[(50, 0)]), ..good.clone() }, "last wave must reach 100"),
        (
            RolloutCreate {
                windows: vec![Window {
                    label: "site=a".into(),
                    start: "2am".into(),
                    end: "04:00".into(),
                }],
                ..good.clone()
            },
            "not HH:MM-HH:MM",
        ),
        (RolloutCreate { node_timeout_s: Some(10), ..good.clone() }, "node_timeout_s"),
    ];
    for (req, want) in cases {
        let e = create(&f, &req).await.expect_err(want);
        assert!(e.contains(want), "{e:?} should name {want:?}");
    }
    let e =
        json::<_, Rollout>(&f.ep(), f.http(Some(&f.viewer)), "POST", "/v1/rollouts", Some(&good))
            .await
            .expect_err("viewer");
    assert!(e.to_string().contains("needs admin"), "{e}");
    let e = json::<(), Rollout>(&f.ep(), f.http(Some(&f.viewer)), "GET", "/v1/rollouts/77", None)
        .await
        .expect_err("unknown");
    assert!(e.to_string().contains("no rollout 77"), "{e}");
    let e = json::<_, Rollout>(
        &f.ep(),
        f.http(Some(&f.admin)),
        "POST",
        "/v1/rollouts",
        Some(&serde_json::json!({"channel": "stable", "version": "2.0", "waves": [], "extra": 1})),
    )
    .await
    .expect_err("unknown field");
    assert!(e.to_string().contains("unknown field"), "{e}");
    assert_eq!(f.dump(), before, "a refused request changes nothing");
    f.running.stop().await;
    Ok(())
}

/// Wait until the registry holds a heartbeat naming `os` for each of `nodes`.
async fn wait_heartbeats(f: &TestFleet, nodes: &[&String], os: &str) {
    for _ in 0..600 {
        let views = tokio::task::block_in_place(|| f.running.fleet.registry.nodes())
            .unwrap_or_else(|e| panic!("nodes: {e}"));
        let ok = nodes.iter().all(|id| {
            views.iter().any(|v| {
                &&v.id == id
                    && v.heartbeat.as_ref().and_then(|h| h.versions.os.as_deref()) == Some(os)
            })
        });
        if ok {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no heartbeat naming {os} in the registry for {nodes:?}");
}

async fn current_late_and_leaving_nodes(db: Db) -> TestResult {
    let Some(f) = fleet_on(db).await else { return Ok(()) };
    f.running.fleet.set_clock(Arc::new(ManualClock::at(at(1, 0))));
    // lab: one on 1.0 and two already on 2.0; ams1: two held by a closed window.
    let lab = enroll_nodes(&f, 3, 500, &[("site", "lab")]).await;
    let ams = enroll_nodes(&f, 2, 600, &[("site", "ams1")]).await;
    let told: Told = Arc::default();
    let stop = CancellationToken::new();
    for (k, (node, id)) in lab.ids.iter().enumerate() {
        let os = if k == 0 { Some("1.0") } else { Some("2.0") };
        start_sim(&f, node, id, Sim { fail: None, os }, &told, &stop);
    }
    start_sims(&f, &ams, &BTreeMap::new(), &told, &stop);
    let (l0, current) = (&lab.ids[0].0, [&lab.ids[1].0, &lab.ids[2].0]);
    wait_heartbeats(&f, &current, "2.0").await;

    // Zero tolerance and the default node timeout (6 h): a current node that timed out would
    // halt the rollout, and waiting for it would outlast the test.
    let req = ams1_held_02_to_04();
    let r = create(&f, &req).await?;
    for n in &r.nodes {
        let want = if current.contains(&&n.node) {
            "current"
        } else if n.node == *l0 {
            "told"
        } else {
            "pending"
        };
        assert_eq!(n.phase, want, "{} at creation", n.node);
    }
    assert_eq!(r.counts(0).current, 2);

    // A node enrolled now joins the running rollout and is told.
    let late = enroll_nodes(&f, 1, 700, &[("site", "lab")]).await;
    start_sims(&f, &late, &BTreeMap::new(), &told, &stop);
    let j = &late.ids[0].0;
    let r2 = wait_rollout(&f, r.id, "the late node blessed", |r| {
        r.nodes.iter().any(|n| &n.node == j && n.phase == "blessed")
            && r.nodes.iter().any(|n| &n.node == l0 && n.phase == "blessed")
    })
    .await;
    assert_eq!(r2.state, RolloutState::Running, "the ams1 nodes hold the wave");

    // The held ams1 nodes leave: one moved to another channel, one revoked. The rollout
    // completes without them and without the window opening; they were never told.
    let (a0, a1) = (ams.ids[0].0.clone(), ams.ids[1].0.clone());
    let moved: hearth_proto::fleet::NodeView = json(
        &f.ep(),
        f.http(Some(&f.admin)),
        "POST",
        &format!("/v1/nodes/{a0}/channel"),
        Some(&hearth_proto::fleet::ChannelRequest { channel: "beta".into() }),
    )
    .await?;
    assert_eq!(moved.desired.update_channel, "beta");
    let _: hearth_proto::fleet::NodeView =
        json(&f.ep(), f.http(Some(&f.admin)), "POST", &format!("/v1/nodes/{a1}/revoke"), Some(&()))
            .await?;
    let done = wait_rollout(&f, r.id, "completion", |r| r.state == RolloutState::Completed).await;
    let c = done.counts(0);
    assert_eq!((c.nodes, c.blessed, c.current, c.left, c.failed), (6, 2, 2, 2, 0), "{done:#?}");
    let told_now = lock(&told).clone();
    let told_ids: BTreeSet<&String> = told_now.keys().collect();
    assert_eq!(told_ids, BTreeSet::from([l0, j]), "only the nodes not on 2.0 were told");
    let events: Vec<EventView> =
        json::<(), _>(&f.ep(), f.http(Some(&f.viewer)), "GET", "/v1/events?limit=500", None)
            .await?;
    let of = |kind: &str| -> Vec<String> {
        events.iter().filter(|e| e.kind == kind).map(|e| e.message.clone()).collect()
    };
    assert_eq!(of("rollout.node_current").len(), 2);
    assert!(of("rollout.node_joined").iter().any(|m| m.contains(&format!("{j} joined"))));
    let left = of("rollout.node_left");
    assert!(left.iter().any(|m| m.contains(&a0)) && left.iter().any(|m| m.contains(&a1)));
    assert_eq!(of("rollout.completed").len(), 1);
    // The window opening later changes nothing: a completed rollout tells no one.
    f.running.fleet.set_clock(Arc::new(ManualClock::at(at(2, 30))));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(lock(&told).len(), 2);
    assert_eq!(get_rollout(&f, r.id).await.nodes, done.nodes);
    stop.cancel();
    f.running.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_late_and_leaving_on_sqlite() -> TestResult {
    current_late_and_leaving_nodes(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_late_and_leaving_on_postgres() -> TestResult {
    current_late_and_leaving_nodes(Db::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_on_sqlite() -> TestResult {
    halts_on_a_failing_wave_and_survives_a_restart(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_on_postgres() -> TestResult {
    halts_on_a_failing_wave_and_survives_a_restart(Db::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_on_sqlite() -> TestResult {
    a_window_holds_its_group_across_a_restart_then_completes(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_on_postgres() -> TestResult {
    a_window_holds_its_group_across_a_restart_then_completes(Db::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_on_sqlite() -> TestResult {
    bad_requests_change_nothing(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_on_postgres() -> TestResult {
    bad_requests_change_nothing(Db::Postgres).await
}

/// A token names the channel of the nodes that enroll with it: they are on it from their first
/// desired state, only its rollouts take them, and the token list shows it.
async fn token_channel(db: Db) -> TestResult {
    let Some(f) = fleet_on(db).await else { return Ok(()) };
    let admin = || f.http(Some(&f.admin));
    let req = TokenCreateRequest {
        labels: BTreeMap::new(),
        ttl_s: 600,
        max_uses: 2,
        channel: Some("canary".into()),
    };
    let token: TokenCreated = json(&f.ep(), admin(), "POST", "/v1/tokens", Some(&req)).await?;
    let tokens: Vec<hearth_proto::fleet::TokenView> =
        json::<(), _>(&f.ep(), f.http(Some(&f.viewer)), "GET", "/v1/tokens", None).await?;
    assert_eq!(tokens.iter().map(|t| t.channel.as_str()).collect::<Vec<_>>(), ["canary"]);
    let plain = f.token(1, 600).await;
    let mut canary = BTreeSet::new();
    for n in 0..2 {
        let (req, _) = enroll_request(&token.token, 800 + n);
        canary.insert(enroll(&f.ep(), &f.pin(), &req).await?.node_id);
    }
    let (req, _) = enroll_request(&plain.token, 810);
    let stable = enroll(&f.ep(), &f.pin(), &req).await?.node_id;
    for id in canary.iter().chain([&stable]) {
        let n: hearth_proto::fleet::NodeView =
            json::<(), _>(&f.ep(), admin(), "GET", &format!("/v1/nodes/{id}"), None).await?;
        let want = if canary.contains(id) { "canary" } else { "stable" };
        assert_eq!(n.desired.update_channel, want, "{id}");
        assert_eq!(n.desired.generation, 1, "{id}: the channel is in its first desired state");
    }
    let r = create(
        &f,
        &RolloutCreate {
            channel: "canary".into(),
            version: "2.0".into(),
            waves: waves(&[(100, 0)]),
            windows: vec![],
            node_timeout_s: None,
        },
    )
    .await?;
    let listed: BTreeSet<String> = r.nodes.iter().map(|n| n.node.clone()).collect();
    assert_eq!(listed, canary, "the canary rollout takes the canary token's nodes only");
    // A told node moved to another channel loses the old channel's version with the move.
    let moved = canary.iter().next().ok_or("no canary node")?.clone();
    let node = |id: String| {
        let tls = admin();
        let ep = f.ep();
        async move {
            json::<(), hearth_proto::fleet::NodeView>(
                &ep,
                tls,
                "GET",
                &format!("/v1/nodes/{id}"),
                None,
            )
            .await
        }
    };
    for _ in 0..100 {
        if node(moved.clone()).await?.desired.update_version.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(node(moved.clone()).await?.desired.update_version.as_deref(), Some("2.0"));
    let n: hearth_proto::fleet::NodeView = json(
        &f.ep(),
        admin(),
        "POST",
        &format!("/v1/nodes/{moved}/channel"),
        Some(&hearth_proto::fleet::ChannelRequest { channel: "stable".into() }),
    )
    .await?;
    assert_eq!((n.desired.update_channel.as_str(), n.desired.update_version), ("stable", None));
    f.running.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_channel_on_sqlite() -> TestResult {
    token_channel(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_channel_on_postgres() -> TestResult {
    token_channel(Db::Postgres).await
}
