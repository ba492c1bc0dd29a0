//! Staged rollouts end to end: several agents (the real agent code: the fleet subsystem and the
//! update client, on fake slot disks, ESPs and boot loaders from `hearth_agent::fakes::update`)
//! enrolled in a real fleet over TLS, one signed TUF repository. The test plays each machine's
//! firmware: when the update client reboots, the machine "boots" the new entry, runs the boot
//! check (`Updater::check`, with the agent's real fleet session state, or a faked failure) and
//! either blesses it or falls back to the old slot; the agent reports every phase to the fleet.
//! A failing second wave halts the rollout and the third wave is never told (its slots never
//! written); a clean rollout completes, a maintenance window holding its group back until the
//! fleet's (injected) clock opens it; a machine already running the version (its heartbeats say
//! so) is recorded `current` and its slots are never written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_agent::agent::Agent;
use hearth_agent::config::{BackendKind, Config};
use hearth_agent::fakes::fleet::{FakeSeedSource, Rebooted};
use hearth_agent::fakes::update::{DirEsp, GptSlotDisk, SystemctlReboot, SystemdBoot};
use hearth_agent::fleet::Fleet;
use hearth_agent::fleet::hardware::SimDmi;
use hearth_agent::supervisor::{BACKOFF_START, Supervisor};
use hearth_agent::update::fetch::Fetcher;
use hearth_agent::update::platform::SlotDisk;
use hearth_agent::update::state::{HealthSnapshot, Phase};
use hearth_agent::update::{Observed, Platform, RepoSource, Updater};
use hearth_fleet::ca::Role;
use hearth_fleet::config::FleetConfig;
use hearth_fleet::rollout::ManualClock;
use hearth_fleet::server::RunningFleet;
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::release::{self, KeysSpec, Part, ReleaseVersion, SignSpec};
use hearth_fleet_client::seed::Seed;
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_proto::fleet::{TokenCreateRequest, TokenCreated};
use hearth_proto::rollout::{Rollout, RolloutCreate, RolloutState, WaveSpec, Window};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const SLOT_SIZE: u64 = 1 << 20;

fn roothash_for(version: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(version.as_bytes()))
}

/// A release's files as `image/build` leaves them.
fn artifacts(dir: &Path, version: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let vv: ReleaseVersion = version.parse().expect("version");
    let seed = version.bytes().fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    let root: Vec<u8> = (0..200_000u32).map(|i| (i as u8).wrapping_mul(seed)).collect();
    let verity: Vec<u8> = (0..8192u32).map(|i| (i as u8) ^ seed).collect();
    let mut uki = b"MZ fake UKI .cmdline console=ttyS0 roothash=".to_vec();
    uki.extend(roothash_for(version).as_bytes());
    uki.extend(b" ro\0");
    for (part, bytes) in [(Part::Root, root), (Part::Verity, verity), (Part::Uki, uki)] {
        std::fs::write(dir.join(part.file_name(&vv)), &bytes).expect("write artifact");
    }
}

/// Keys and a repository with release 2.0 on `stable` and 2.1 on `beta`.
async fn repository(dir: &Path) -> (PathBuf, PathBuf) {
    let keys = dir.join("keys");
    release::init_keys(&keys, &KeysSpec::simple(1, 1, 30)).await.expect("keys");
    let repo = dir.join("repo");
    for (version, channel) in [("2.0", "stable"), ("2.1", "beta")] {
        let art = dir.join(format!("build-{version}"));
        artifacts(&art, version);
        release::sign_release(&SignSpec {
            artifacts: art,
            version: version.parse().expect("version"),
            channel: channel.into(),
            keys: keys.clone(),
            out: repo.clone(),
            expires: release::days_from_now(30),
        })
        .await
        .expect("sign");
    }
    (keys, repo)
}

/// One simulated machine: its agent (fleet subsystem with an updater) and its fake hardware.
struct Machine {
    agent: Arc<Agent>,
    sup: Supervisor,
    updater: Arc<Updater>,
    disk: Arc<GptSlotDisk>,
    boot: Arc<SystemdBoot>,
    reboots: Arc<SystemctlReboot>,
    /// The new system fails its boot check (its agent cannot reach the fleet).
    bad: bool,
}

const H1_VERSION: &str = "1.0";

/// Machine `n`, running `version` (1.0, or 2.0 for one already on the rollout's release).
async fn machine(
    dir: &Path,
    n: u64,
    seed: &Seed,
    keys: &Path,
    repo: &Path,
    bad: bool,
    version: &str,
) -> Machine {
    let state = dir.join(format!("node{n}"));
    let h1 = roothash_for(version);
    let entry = format!("hearth_{version}.efi");
    let disk = Arc::new(GptSlotDisk::new(version, &h1, SLOT_SIZE));
    let esp = Arc::new(DirEsp::with_entries(&[entry.as_str()]));
    let boot = Arc::new(SystemdBoot::new(&h1, &entry));
    let reboots = Arc::new(SystemctlReboot::default());
    let metadata = url::Url::from_directory_path(repo).expect("url");
    let source = RepoSource {
        root: keys.join("root.json"),
        targets_url: metadata.join("targets/").expect("url"),
        metadata_url: metadata,
        datastore: state.join("update/tuf"),
        limits: tough::Limits {
            max_root_size: 1 << 16,
            max_targets_size: 1 << 20,
            max_timestamp_size: 1 << 16,
            max_snapshot_size: 1 << 16,
            max_root_updates: 16,
        },
    };
    let platform =
        Platform { disk: disk.clone(), esp, boot: boot.clone(), rebooter: reboots.clone() };
    let fetcher = Fetcher::new(None, Duration::from_secs(30)).expect("fetcher");
    let updater = Arc::new(Updater::new(source, "stable".into(), fetcher, platform, &state));

    let mut config = Config::default();
    config.state.dir = state;
    config.metrics.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.gpu.backend = BackendKind::Sim;
    let agent = Agent::new(config, None, format!("node{n}"));
    let sub = Arc::new(
        Fleet::with(
            agent.clone(),
            vec![Box::new(FakeSeedSource::new("test seed", Some(seed.to_toml())))],
            Box::new(SimDmi { seed: 1000 + n }),
            Arc::new(Rebooted::default()),
        )
        .with_updater(updater.clone()),
    );
    agent.gpus().send_modify(|s| s.rounds = 1);
    let sup = Supervisor::start(vec![sub], BACKOFF_START);
    Machine { agent, sup, updater, disk, boot, reboots, bad }
}

impl Machine {
    /// Play the firmware and systemd once: after the update client's reboot, boot the new
    /// entry, run the boot check and bless it, or fall back to the old slot after the check
    /// marked it bad. Returns whether it did anything.
    async fn firmware_step(&self) -> bool {
        let (_, st) = self.updater.load().expect("state");
        if st.phase != Phase::Rebooting || self.reboots.count() == 0 {
            return false;
        }
        let v2 = st.target.as_ref().map_or("2.0".to_string(), |t| t.version.to_string());
        let h2 = roothash_for(&v2);
        self.boot.boot(&h2, &format!("hearth_{v2}+2-1.efi"));
        let agent = self.agent.clone();
        let bad = self.bad;
        let observe = move || {
            let fleet_state = if bad {
                "disconnected".to_string()
            } else {
                agent.fleet_status().borrow().state.clone()
            };
            async move {
                Observed {
                    agent_up: None,
                    fleet_state,
                    health: HealthSnapshot { gpus: 0, healthy_gpus: 0, enrolled: true },
                }
            }
        };
        let verdict =
            self.updater.check(Duration::from_millis(1500), true, observe).await.expect("check");
        match verdict {
            Some(Ok(())) => self.boot.boot(&h2, &format!("hearth_{v2}.efi")),
            _ => self.boot.boot(&roothash_for(H1_VERSION), "hearth_1.0.efi"),
        }
        self.updater.boot_reconcile().expect("reconcile");
        true
    }
}

struct Lab {
    _dir: tempfile::TempDir,
    fleet: RunningFleet,
    ep: Endpoint,
    pin: String,
    admin: ClientIdentity,
    machines: Vec<Machine>,
}

/// A fleet, a signed repository and machines enrolled with tokens carrying `sites` labels;
/// `bad(k)` says whether machine k's new system fails its check.
async fn lab(
    sites: &[&str],
    bad: impl Fn(usize) -> bool,
) -> Result<Lab, Box<dyn std::error::Error + Send + Sync>> {
    lab_on(sites, bad, |_| H1_VERSION).await
}

/// [`lab`] with machine k running `version(k)`.
async fn lab_on(
    sites: &[&str],
    bad: impl Fn(usize) -> bool,
    version: impl Fn(usize) -> &'static str,
) -> Result<Lab, Box<dyn std::error::Error + Send + Sync>> {
    let dir = tempfile::tempdir()?;
    let fleet = hearth_fleet::server::start(FleetConfig {
        listen: "127.0.0.1:0".parse()?,
        state_dir: dir.path().join("fleet"),
        flush_interval_ms: 200,
        ..FleetConfig::default()
    })
    .await?;
    let (op, key) = fleet.fleet.ca.operator_cert("t", Role::Admin, Duration::from_secs(600))?;
    let admin_id = ClientIdentity { cert_pem: op.cert_pem, key_pem: key };
    let pin = fleet.fleet.ca.pin();
    let admin = client_config(&pin, Some(&admin_id), b"http/1.1")?;
    let ep = Endpoint::from_url(&format!("https://{}", fleet.addr), "hearth-fleet")?;
    let (keys, repo) = repository(dir.path()).await;
    let mut machines = Vec::new();
    for (k, site) in sites.iter().enumerate() {
        let req = TokenCreateRequest {
            labels: BTreeMap::from([("site".to_string(), site.to_string())]),
            ttl_s: 600,
            max_uses: 1,
            channel: None,
        };
        let token: TokenCreated =
            json(&ep, admin.clone(), "POST", "/v1/tokens", Some(&req)).await?;
        let mut seed = Seed::parse(&token.seed, "token")?;
        seed.fleet.url = format!("https://{}", fleet.addr);
        machines.push(machine(dir.path(), k as u64, &seed, &keys, &repo, bad(k), version(k)).await);
    }
    let l = Lab { _dir: dir, fleet, ep, pin, admin: admin_id, machines };
    for m in &l.machines {
        wait_for("sessions", || m.agent.fleet_status().borrow().state == "connected").await;
    }
    // Every node in the registry before the rollout is planned.
    for _ in 0..100 {
        let nodes: Vec<hearth_proto::fleet::NodeView> = l.get("/v1/nodes").await?;
        if nodes.len() == sites.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(l)
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

impl Lab {
    fn node_of(&self, k: usize) -> String {
        self.machines[k].agent.fleet_status().borrow().node_id.clone().unwrap_or_default()
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, Box<dyn std::error::Error + Send + Sync>> {
        let tls = client_config(&self.pin, Some(&self.admin), b"http/1.1")?;
        Ok(json::<(), T>(&self.ep, tls, "GET", path, None).await?)
    }

    async fn create(
        &self,
        req: &RolloutCreate,
    ) -> Result<Rollout, Box<dyn std::error::Error + Send + Sync>> {
        let tls = client_config(&self.pin, Some(&self.admin), b"http/1.1")?;
        Ok(json(&self.ep, tls, "POST", "/v1/rollouts", Some(req)).await?)
    }

    async fn rollout(&self, id: u64) -> Rollout {
        self.get(&format!("/v1/rollouts/{id}"))
            .await
            .unwrap_or_else(|e| panic!("rollout {id}: {e}"))
    }

    /// Run the machines' firmware until the rollout satisfies `done`.
    async fn run_until(&self, id: u64, what: &str, done: impl Fn(&Rollout) -> bool) -> Rollout {
        for _ in 0..300 {
            for m in &self.machines {
                m.firmware_step().await;
            }
            let r = self.rollout(id).await;
            if done(&r) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for {what}: {:#?}", self.rollout(id).await);
    }

    async fn stop(self) {
        for m in self.machines {
            m.sup.shutdown(Duration::from_secs(2)).await;
        }
        self.fleet.stop().await;
    }
}

fn waves(w: &[(u8, u8)]) -> Vec<WaveSpec> {
    w.iter().map(|&(until_pct, max_failure_pct)| WaveSpec { until_pct, max_failure_pct }).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_wave_halts_the_rollout_and_the_rest_is_never_told() -> TestResult {
    // Which machine lands in which wave depends on node ids (sorted): decide "bad" after
    // enrollment through the order, so machine order does not matter.
    let l = lab(&["lab"; 5], |_| false).await?;
    let mut order: Vec<(String, usize)> = (0..5).map(|k| (l.node_of(k), k)).collect();
    order.sort();
    // Waves: 1 canary, then 2, then 2. One of the second wave's two fails: 50 % > 0 %.
    let bad_k = order[2].1;
    let mut l = l;
    l.machines[bad_k].bad = true;
    let req = RolloutCreate {
        channel: "stable".into(),
        version: "2.0".into(),
        waves: waves(&[(20, 0), (60, 0), (100, 0)]),
        windows: vec![],
        node_timeout_s: None,
    };
    let r = l.create(&req).await?;
    assert_eq!((0..3).map(|w| r.counts(w).nodes).collect::<Vec<_>>(), [1, 2, 2]);
    let halted = l.run_until(r.id, "the halt", |r| r.state == RolloutState::Halted).await;
    let why = halted.reason.clone().unwrap_or_default();
    assert!(why.contains("wave 2 of 3: 1 of 2"), "{why}");
    assert!(
        why.contains("fleet session not established"),
        "the check's reason reaches the fleet: {why}"
    );
    // The canary runs 2.0, blessed, its anti-rollback floor raised.
    let canary = &l.machines[order[0].1];
    let (_, st) = canary.updater.load()?;
    assert_eq!(st.phase, Phase::Blessed);
    assert_eq!(st.anti_rollback, Some("2.0".parse()?));
    // The bad machine is back on 1.0 and said why.
    let bad = &l.machines[bad_k];
    let (_, st) = bad.updater.load()?;
    assert_eq!(st.phase, Phase::RolledBack);
    assert_eq!(bad.updater.booted()?.version, Some("1.0".parse()?));
    assert_eq!(bad.boot.bad_marks(), 1);
    // Let the other second-wave node finish; the third wave is never told: nothing written.
    l.run_until(r.id, "wave 2 settled", |r| r.counts(1).blessed + r.counts(1).failed == 2).await;
    for _ in 0..20 {
        for m in &l.machines {
            m.firmware_step().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (_, k) in &order[3..] {
        let m = &l.machines[*k];
        assert_eq!(m.disk.writes(), 0, "a third-wave slot was written");
        assert_eq!(m.updater.load()?.1.phase, Phase::Idle);
        let d = m.agent.desired().borrow().clone();
        assert_eq!(d.and_then(|d| d.update_version), None, "a third-wave node was told");
    }
    assert_eq!(l.rollout(r.id).await.state, RolloutState::Halted);
    l.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_rollout_completes_and_a_window_holds_its_group_until_it_opens() -> TestResult {
    let l = lab(&["ams1", "fra1", "ams1", "fra1"], |_| false).await?;
    let clock = Arc::new(ManualClock::at(20_000 * 86_400_000 + 3_600_000)); // 01:00 UTC
    l.fleet.fleet.set_clock(clock.clone());
    let req = RolloutCreate {
        channel: "stable".into(),
        version: "2.0".into(),
        waves: waves(&[(50, 0), (100, 0)]),
        windows: vec![Window {
            label: "site=ams1".into(),
            start: "02:00".into(),
            end: "04:00".into(),
        }],
        node_timeout_s: None,
    };
    let r = l.create(&req).await?;
    // Waves are drawn from the node ids, so which wave holds an ams1 node varies from run to run.
    // The first wave with an ams1 node cannot finish before 02:00: the fra1 nodes up to and in it
    // update, the ams1 ones are held, and no later wave opens.
    let site = |n: &hearth_proto::rollout::NodeProgress| n.labels.get("site").cloned();
    let held_wave = r
        .nodes
        .iter()
        .filter(|n| site(n).as_deref() == Some("ams1"))
        .map(|n| n.wave)
        .min()
        .expect("the lab has ams1 nodes");
    let fra_before: Vec<String> = r
        .nodes
        .iter()
        .filter(|n| n.wave <= held_wave && site(n).as_deref() == Some("fra1"))
        .map(|n| n.node.clone())
        .collect();
    let held = l
        .run_until(r.id, "fra1 up to the held wave", |r| {
            r.wave == held_wave
                && r.nodes
                    .iter()
                    .filter(|n| fra_before.contains(&n.node))
                    .all(|n| n.phase == "blessed")
        })
        .await;
    // Give the fleet a few more ticks: the held wave must stay open and the ams1 nodes untold.
    for _ in 0..10 {
        for m in &l.machines {
            m.firmware_step().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let still = l.rollout(r.id).await;
    assert_eq!(still.wave, held_wave, "{held:#?}");
    assert_eq!(still.state, RolloutState::Running, "{still:#?}");
    for n in still.nodes.iter().filter(|n| site(n).as_deref() == Some("ams1")) {
        assert_eq!(n.told_ms, None, "an ams1 node was told outside its window: {n:#?}");
    }
    for k in [0, 2] {
        assert_eq!(l.machines[k].disk.writes(), 0, "an ams1 slot was written outside its window");
    }
    // 02:00: the window opens; everything completes.
    clock.set(20_000 * 86_400_000 + 2 * 3_600_000);
    let done = l.run_until(r.id, "completion", |r| r.state == RolloutState::Completed).await;
    assert_eq!(done.counts(0).blessed + done.counts(1).blessed, 4);
    for m in &l.machines {
        let (_, st) = m.updater.load()?;
        assert_eq!(st.phase, Phase::Blessed);
        assert_eq!(m.updater.booted()?.version, Some("2.0".parse()?));
        let slots = m.disk.slots()?;
        assert_eq!(slots[1].root.label, "hearth_2.0");
    }
    // Every phase reached the fleet, in order, even those shorter than the agent's poll of its
    // state file (writing a 1 MiB slot, installed → rebooting, the boot check's trial).
    let mut events: Vec<hearth_proto::fleet::EventView> = l.get("/v1/events?limit=1000").await?;
    events.sort_by_key(|e| e.id);
    for k in 0..l.machines.len() {
        let node = l.node_of(k);
        let mut phases: Vec<&str> = events
            .iter()
            .filter(|e| e.node_id.as_deref() == Some(node.as_str()))
            .filter_map(|e| e.kind.strip_prefix("node.update."))
            .collect();
        phases.dedup();
        assert_eq!(
            phases,
            ["downloading", "writing", "installed", "rebooting", "trial", "blessed"],
            "node {node}"
        );
    }
    l.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_machine_already_on_the_version_is_current_and_its_slot_never_written() -> TestResult {
    // Machine 1 already runs 2.0; zero tolerance and the default 6 h node timeout: were it told
    // and left to time out, the rollout could not complete within the test.
    let l = lab_on(&["lab"; 3], |_| false, |k| if k == 1 { "2.0" } else { H1_VERSION }).await?;
    let req = RolloutCreate {
        channel: "stable".into(),
        version: "2.0".into(),
        waves: waves(&[(100, 0)]),
        windows: vec![],
        node_timeout_s: None,
    };
    let r = l.create(&req).await?;
    let done = l.run_until(r.id, "completion", |r| r.state == RolloutState::Completed).await;
    let c = done.counts(0);
    assert_eq!((c.blessed, c.current, c.failed), (2, 1, 0), "{done:#?}");
    let current = l.node_of(1);
    let n = done.nodes.iter().find(|n| n.node == current).ok_or("machine 1 not in the rollout")?;
    assert_eq!(n.phase, "current");
    let m = &l.machines[1];
    assert_eq!(m.disk.writes(), 0, "the current machine's slot was written");
    assert_eq!(m.updater.load()?.1.phase, Phase::Idle);
    l.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_moved_to_another_channel_installs_that_channels_release() -> TestResult {
    // Both machines are configured for `stable` (`update.channel`); machine 0 is moved to `beta`
    // through the API. A `beta` rollout reaches only it, and it installs 2.1 from `beta` (which
    // `stable` does not list); machine 1 is never told and its slot never written.
    let l = lab(&["lab"; 2], |_| false).await?;
    let moved = l.node_of(0);
    let tls = client_config(&l.pin, Some(&l.admin), b"http/1.1")?;
    let req = hearth_proto::fleet::ChannelRequest { channel: "beta".into() };
    let n: hearth_proto::fleet::NodeView =
        json(&l.ep, tls, "POST", &format!("/v1/nodes/{moved}/channel"), Some(&req)).await?;
    assert_eq!(n.desired.update_channel, "beta");
    let req = RolloutCreate {
        channel: "beta".into(),
        version: "2.1".into(),
        waves: waves(&[(100, 0)]),
        windows: vec![],
        node_timeout_s: None,
    };
    let r = l.create(&req).await?;
    let nodes: Vec<&str> = r.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(nodes, [moved.as_str()], "only the moved node is on beta");
    let done = l.run_until(r.id, "completion", |r| r.state == RolloutState::Completed).await;
    assert_eq!(done.counts(0).blessed, 1, "{done:#?}");
    let m = &l.machines[0];
    assert_eq!(m.updater.load()?.1.phase, Phase::Blessed);
    assert_eq!(m.updater.booted()?.version, Some("2.1".parse()?));
    assert_eq!(m.disk.slots()?[1].root.label, "hearth_2.1");
    let other = &l.machines[1];
    assert_eq!(other.disk.writes(), 0, "the stable machine's slot was written");
    assert_eq!(other.updater.load()?.1.phase, Phase::Idle);
    l.stop().await;
    Ok(())
}
