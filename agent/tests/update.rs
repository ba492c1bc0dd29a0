//! Signed A/B updates end to end against the fakes (`agent/src/fakes/update.rs`): a real TUF
//! repository made with `hearthctl`'s signing code, a fake two-slot disk with a write counter,
//! a fake ESP and boot loader. Every refusal must leave the slot's content, its labels and the
//! ESP untouched, and name its reason.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hearth_agent::fakes::update::{DirEsp, GptSlotDisk, SystemctlReboot, SystemdBoot};
use hearth_agent::update::fetch::Fetcher;
use hearth_agent::update::platform::SlotDisk;
use hearth_agent::update::state::{HealthSnapshot, Phase};
use hearth_agent::update::{ApplyRequest, Observed, Platform, RepoSource, UpdateError, Updater};
use hearth_fleet_client::release::{self, KeysSpec, Part, ReleaseVersion, SignSpec};

const H1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const SLOT_SIZE: u64 = 1 << 20;

fn v(s: &str) -> ReleaseVersion {
    s.parse().expect("version")
}

fn roothash_for(version: &str) -> String {
    let d = sha2_hex(version.as_bytes());
    d[..64].to_string()
}

fn sha2_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// Artifacts of one release, as `image/build` would leave them.
fn artifacts(dir: &Path, version: &str) -> BTreeMap<Part, Vec<u8>> {
    std::fs::create_dir_all(dir).expect("mkdir");
    let vv = v(version);
    let seed = version.bytes().fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    let mut out = BTreeMap::new();
    let root: Vec<u8> = (0..200_000u32).map(|i| (i as u8).wrapping_mul(seed)).collect();
    let verity: Vec<u8> = (0..8192u32).map(|i| (i as u8) ^ seed).collect();
    let mut uki = b"MZ fake UKI .cmdline console=ttyS0 roothash=".to_vec();
    uki.extend(roothash_for(version).as_bytes());
    uki.extend(b" ro\0");
    uki.extend(std::iter::repeat_n(seed, 4000));
    for (part, bytes) in [(Part::Root, root), (Part::Verity, verity), (Part::Uki, uki)] {
        std::fs::write(dir.join(part.file_name(&vv)), &bytes).expect("write artifact");
        out.insert(part, bytes);
    }
    out
}

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    keys: PathBuf,
    repo: PathBuf,
    disk: Arc<GptSlotDisk>,
    esp: Arc<DirEsp>,
    boot: Arc<SystemdBoot>,
    reboots: Arc<SystemctlReboot>,
}

impl Env {
    async fn new(spec: KeysSpec) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let keys = dir.join("keys");
        release::init_keys(&keys, &spec).await.expect("keys init");
        Self {
            dir: dir.clone(),
            keys,
            repo: dir.join("repo"),
            disk: Arc::new(GptSlotDisk::new("1.0", H1, SLOT_SIZE)),
            esp: Arc::new(DirEsp::with_entries(&["hearth_1.0.efi"])),
            boot: Arc::new(SystemdBoot::new(H1, "hearth_1.0.efi")),
            reboots: Arc::new(SystemctlReboot::default()),
            _tmp: tmp,
        }
    }

    async fn sign(&self, version: &str, days: i64) -> BTreeMap<Part, Vec<u8>> {
        self.sign_into(&self.keys, &self.repo, version, days).await
    }

    async fn sign_into(
        &self,
        keys: &Path,
        repo: &Path,
        version: &str,
        days: i64,
    ) -> BTreeMap<Part, Vec<u8>> {
        let art = self.dir.join(format!("build-{version}"));
        let a = artifacts(&art, version);
        release::sign_release(&SignSpec {
            artifacts: art,
            version: v(version),
            channel: "stable".into(),
            keys: keys.to_path_buf(),
            out: repo.to_path_buf(),
            expires: release::days_from_now(days),
        })
        .await
        .expect("sign");
        a
    }

    fn updater_at(&self, metadata: url::Url, targets: url::Url, limit: u64) -> Updater {
        let source = RepoSource {
            root: self.keys.join("root.json"),
            metadata_url: metadata,
            targets_url: targets,
            datastore: self.dir.join("state/update/tuf"),
            limits: tough::Limits {
                max_root_size: limit,
                max_targets_size: limit * 10,
                max_timestamp_size: limit,
                max_snapshot_size: limit,
                max_root_updates: 16,
            },
        };
        let platform = Platform {
            disk: self.disk.clone(),
            esp: self.esp.clone(),
            boot: self.boot.clone(),
            rebooter: self.reboots.clone(),
        };
        let fetcher = Fetcher::new(None, Duration::from_secs(30)).expect("fetcher");
        Updater::new(source, "stable".into(), fetcher, platform, &self.dir.join("state"))
    }

    fn updater(&self) -> Updater {
        let m = url::Url::from_directory_path(&self.repo).expect("url");
        let t = m.join("targets/").expect("url");
        self.updater_at(m, t, 64 * 1024)
    }

    /// Slot B's content hashes, labels and the ESP log: what a refusal must not change.
    fn untouched(&self) -> (u32, u32, String, String, Vec<String>) {
        (
            self.disk.writes(),
            self.disk.relabels(),
            self.disk.content_hash(4),
            self.disk.content_hash(5),
            self.esp.log(),
        )
    }
}

fn health() -> HealthSnapshot {
    HealthSnapshot { gpus: 2, healthy_gpus: 2, enrolled: true }
}

fn req(version: Option<&str>) -> ApplyRequest {
    ApplyRequest { version: version.map(v), channel: None, reboot: false, health: health() }
}

async fn refused(env: &Env, updater: &Updater, want: &str) -> String {
    let before = env.untouched();
    let err = updater.apply(req(None)).await.expect_err("must be refused");
    let msg = format!("{err}: {}", err_chain(&err));
    assert!(msg.contains(want), "expected {want:?} in {msg:?}");
    assert_eq!(env.untouched(), before, "a refusal wrote something ({msg})");
    assert_eq!(env.disk.writes(), 0, "slot written despite {msg}");
    let (_, st) = updater.load().expect("state");
    assert_eq!(st.phase, Phase::Failed, "{msg}");
    assert!(st.reason.as_deref().is_some_and(|r| !r.is_empty()));
    msg
}

fn err_chain(e: &dyn std::error::Error) -> String {
    let mut s = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&c.to_string());
        s.push_str(": ");
        cur = c.source();
    }
    s
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read") {
        let e = e.expect("entry");
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

#[tokio::test]
async fn good_update_writes_the_inactive_slot_then_blesses_and_raises_the_floor() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    let a = env.sign("2.0", 30).await;
    let updater = env.updater();
    let booted = updater.booted().expect("booted");
    assert_eq!(booted.version, Some(v("1.0")));
    let slot_a = env.disk.content_hash(2);

    let st = updater.apply(ApplyRequest { reboot: true, ..req(None) }).await.expect("apply");
    assert_eq!(st.phase, Phase::Rebooting);
    assert_eq!(env.reboots.count(), 1);
    assert_eq!(env.disk.content(4), a[&Part::Root], "slot B root content");
    assert_eq!(env.disk.content(5), a[&Part::Verity], "slot B verity content");
    assert_eq!(env.disk.content_hash(2), slot_a, "the booted slot is never written");
    let slots = env.disk.slots().expect("slots");
    assert_eq!(slots[1].root.label, "hearth_2.0");
    assert_eq!(slots[1].verity.label, "hearth_2.0_verity");
    let h2 = roothash_for("2.0");
    assert_eq!(slots[1].root.uuid.replace('-', ""), h2[..32]);
    assert_eq!(slots[1].verity.uuid.replace('-', ""), h2[32..]);
    assert_eq!(env.esp.content("hearth_2.0+3.efi").as_deref(), Some(&a[&Part::Uki][..]));
    assert!(env.esp.content("hearth_1.0.efi").is_some(), "the old entry stays as the fallback");
    assert_eq!(st.anti_rollback, Some(v("1.0")));

    // First boot of the new entry: a trial; the floor stays.
    env.boot.boot(&h2, "hearth_2.0+2-1.efi");
    let st = updater.boot_reconcile().expect("reconcile");
    assert_eq!(st.phase, Phase::Trial);
    assert_eq!(st.anti_rollback, Some(v("1.0")));
    let good =
        || async { Observed { agent_up: None, fleet_state: "connected".into(), health: health() } };
    let verdict = updater.check(Duration::from_secs(5), true, good).await.expect("check");
    assert_eq!(verdict, Some(Ok(())));
    assert_eq!(env.boot.bad_marks(), 0);
    // systemd-bless-boot renamed the entry: blessed, the floor rises.
    env.boot.boot(&h2, "hearth_2.0.efi");
    let st = updater.boot_reconcile().expect("reconcile");
    assert_eq!(st.phase, Phase::Blessed);
    assert_eq!(st.anti_rollback, Some(v("2.0")));

    // B -> A': the next update goes to slot A, and the stale 1.0 entry is removed first.
    let a3 = env.sign("3.0", 30).await;
    let st = updater.apply(req(None)).await.expect("apply 3.0");
    assert_eq!(st.phase, Phase::Installed);
    assert_eq!(env.disk.content(2), a3[&Part::Root]);
    assert_eq!(env.disk.content(4), a[&Part::Root], "the running slot B is untouched");
    let log = env.esp.log();
    let rm = log.iter().position(|l| l == "remove hearth_1.0.efi").expect("old entry removed");
    let inst = log.iter().position(|l| l == "install hearth_3.0+3.efi").expect("new entry");
    assert!(rm < inst, "{log:?}");
}

#[tokio::test]
async fn the_new_entry_gets_the_asked_number_of_boot_tries() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    let updater = env.updater().with_boot_tries(1);
    let st = updater.apply(req(None)).await.expect("apply");
    assert_eq!(st.phase, Phase::Installed);
    assert!(env.esp.content("hearth_2.0+1.efi").is_some(), "{:?}", env.esp.log());
    assert!(env.esp.content("hearth_2.0+3.efi").is_none(), "{:?}", env.esp.log());
    // Out of range asks are held to systemd-boot's single digit.
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    env.updater().with_boot_tries(0).apply(req(None)).await.expect("apply");
    assert!(env.esp.content("hearth_2.0+1.efi").is_some(), "{:?}", env.esp.log());
}

/// Install 2.0 with a reboot, then boot it on trial (the first try of its counted entry).
async fn on_trial_of_2_0(env: &Env, updater: &Updater) {
    updater.apply(ApplyRequest { reboot: true, ..req(None) }).await.expect("apply");
    env.boot.boot(&roothash_for("2.0"), "hearth_2.0+2-1.efi");
}

/// What the boot check sees on a node up and healthy but without its fleet session.
fn no_fleet_session() -> Observed {
    Observed { agent_up: None, fleet_state: "disconnected".into(), health: health() }
}

#[tokio::test]
async fn failed_boot_check_marks_bad_reboots_and_reports_a_rollback_with_the_reason() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    let updater = env.updater();
    on_trial_of_2_0(&env, &updater).await;
    let no_fleet = || async { no_fleet_session() };
    let verdict = updater.check(Duration::from_millis(10), true, no_fleet).await.expect("check");
    let reason = verdict.expect("a trial boot").expect_err("must fail");
    assert!(reason.contains("fleet session"), "{reason}");
    assert_eq!(env.boot.bad_marks(), 1);
    assert_eq!(env.reboots.count(), 2, "apply's reboot and the fallback reboot");
    // The loader falls back to the old entry.
    env.boot.boot(H1, "hearth_1.0.efi");
    let st = updater.boot_reconcile().expect("reconcile");
    assert_eq!(st.phase, Phase::RolledBack);
    assert!(st.reason.as_deref().unwrap_or("").contains("fleet session"));
    assert_eq!(st.anti_rollback, Some(v("1.0")), "the floor never rose");
    assert!(!st.rollback_reported);
    updater.rollback_reported().expect("reported");
    assert!(updater.load().expect("load").1.rollback_reported);
    // Not a trial boot any more: the check has nothing to do.
    let verdict = updater.check(Duration::from_millis(10), true, no_fleet).await.expect("check");
    assert_eq!(verdict, None);
}

#[tokio::test]
async fn a_check_whose_agent_never_answers_fails_within_its_bound() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    let updater = env.updater();
    on_trial_of_2_0(&env, &updater).await;
    // An API that accepts and never replies: the observation never completes.
    let silent = || std::future::pending::<Observed>();
    let started = std::time::Instant::now();
    let verdict = updater.check(Duration::from_millis(300), true, silent).await.expect("check");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    let reason = verdict.expect("a trial boot").expect_err("must fail");
    assert!(reason.contains("did not answer"), "{reason}");
    assert_eq!(env.boot.bad_marks(), 1);
    assert_eq!(env.reboots.count(), 2, "apply's reboot and the fallback reboot");
}

#[tokio::test]
async fn a_look_cut_off_at_the_deadline_keeps_the_reason_seen_before() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    let updater = env.updater();
    on_trial_of_2_0(&env, &updater).await;
    // The API answers "no fleet session" at once the first time, then slower than the bound
    // (a slow guest): the reason is still the fleet session, not "did not answer".
    let calls = std::sync::atomic::AtomicU32::new(0);
    let slow_no_fleet = || {
        let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n > 0 {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            no_fleet_session()
        }
    };
    let verdict =
        updater.check(Duration::from_millis(1500), true, slow_no_fleet).await.expect("check");
    let reason = verdict.expect("a trial boot").expect_err("must fail");
    assert!(reason.contains("fleet session"), "{reason}");
    assert_eq!(env.boot.bad_marks(), 1);
}

#[tokio::test]
async fn fallback_fails_a_trial_boot_once_and_leaves_other_boots_alone() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    let updater = env.updater();
    // Nothing on trial: nothing done.
    assert!(!updater.fallback("boot check: agent=failed", true).expect("fallback"));
    assert_eq!(env.boot.bad_marks(), 0);
    assert_eq!(env.reboots.count(), 0);

    on_trial_of_2_0(&env, &updater).await;
    assert!(updater.fallback("boot check: agent=active api=unreachable", true).expect("fallback"));
    assert_eq!(env.boot.bad_marks(), 1);
    assert_eq!(env.reboots.count(), 2, "apply's reboot and the fallback reboot");
    // The check's unit failing afterwards runs it again (OnFailure=): nothing more happens.
    assert!(!updater.fallback("the boot check did not pass (exit-code)", true).expect("again"));
    assert_eq!(env.boot.bad_marks(), 1);
    assert_eq!(env.reboots.count(), 2);
    // From the old slot the rollback carries the first reason.
    env.boot.boot(H1, "hearth_1.0.efi");
    let st = updater.boot_reconcile().expect("reconcile");
    assert_eq!(st.phase, Phase::RolledBack);
    assert_eq!(st.reason.as_deref(), Some("boot check: agent=active api=unreachable"));
    assert_eq!(st.anti_rollback, Some(v("1.0")), "the floor never rose");
}

#[tokio::test]
async fn unsigned_metadata_is_refused_before_any_write() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    let p = env.repo.join("timestamp.json");
    let mut ts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
    ts["signatures"] = serde_json::json!([]);
    std::fs::write(&p, serde_json::to_vec_pretty(&ts).expect("json")).expect("write");
    refused(&env, &env.updater(), "not met for role timestamp (0 valid signatures)").await;
}

#[tokio::test]
async fn metadata_signed_with_the_wrong_key_is_refused() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    let other = env.dir.join("other-keys");
    release::init_keys(&other, &KeysSpec::simple(1, 1, 30)).await.expect("other keys");
    env.sign_into(&other, &env.repo, "2.0", 30).await;
    // The repository carries the other root as 1.root.json; the node trusts its own.
    refused(&env, &env.updater(), "not met for role timestamp (0 valid signatures)").await;
}

#[tokio::test]
async fn a_root_below_its_threshold_is_refused() {
    let env = Env::new(KeysSpec::simple(2, 2, 30)).await;
    env.sign("2.0", 30).await;
    let old: tough::schema::Signed<tough::schema::Root> =
        serde_json::from_slice(&std::fs::read(env.keys.join("root.json")).expect("read"))
            .expect("root");
    let mut root = old.signed.clone();
    root.version = std::num::NonZeroU64::new(2).expect("2");
    let one_key = [env.keys.join("root-1.pk8")];
    let signed = release::sign_root(root, &one_key).await.expect("sign with one key");
    std::fs::write(env.repo.join("2.root.json"), signed.buffer()).expect("write");
    refused(&env, &env.updater(), "threshold of 2 not met for role root (1 valid").await;
}

#[tokio::test]
async fn expired_metadata_is_refused() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", -1).await;
    refused(&env, &env.updater(), "timestamp metadata is expired").await;
}

#[tokio::test]
async fn older_metadata_after_newer_was_trusted_is_refused() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    let v1 = env.dir.join("repo-v1");
    copy_dir(&env.repo, &v1);
    env.sign("3.0", 30).await;
    // The node sees (and persists) metadata version 2 …
    let updater = env.updater();
    let rels = updater.releases().await.expect("releases");
    assert_eq!(rels.iter().map(|r| r.version.to_string()).collect::<Vec<_>>(), ["2.0", "3.0"]);
    // … then a mirror replays version 1.
    std::fs::remove_dir_all(&env.repo).expect("rm");
    copy_dir(&v1, &env.repo);
    refused(
        &env,
        &updater,
        "version 1 of timestamp metadata when we had previously fetched version 2",
    )
    .await;
}

#[tokio::test]
async fn a_release_below_the_anti_rollback_version_is_refused() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    // The node runs and has blessed 1.0 (the fake loader's entry has no counter); the channel's
    // newest is 0.9, freshly and validly signed.
    env.sign("0.9", 30).await;
    refused(&env, &env.updater(), "anti-rollback").await;
}

#[tokio::test]
async fn mix_and_match_metadata_is_refused() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    let old_targets = std::fs::read(env.repo.join("targets.json")).expect("read");
    env.sign("3.0", 30).await;
    // targets.json of version 1 beside snapshot and timestamp of version 2.
    std::fs::write(env.repo.join("targets.json"), old_targets).expect("write");
    refused(&env, &env.updater(), "Hash mismatch for").await;
}

#[tokio::test]
async fn oversized_metadata_is_refused() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    let p = env.repo.join("timestamp.json");
    let mut b = std::fs::read(&p).expect("read");
    b.extend(std::iter::repeat_n(b' ', 70 * 1024)); // valid JSON, over the 64 KiB limit
    std::fs::write(&p, b).expect("write");
    refused(&env, &env.updater(), "Maximum size 65536").await;
}

#[tokio::test]
async fn an_oversized_target_is_refused() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    let p = env.repo.join("targets").join(Part::Root.file_name(&v("2.0")));
    let mut f = std::fs::OpenOptions::new().append(true).open(&p).expect("open");
    f.write_all(&[0u8; 4096]).expect("grow");
    refused(&env, &env.updater(), "endless data").await;
}

#[tokio::test]
async fn a_target_hash_mismatch_is_refused() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    let p = env.repo.join("targets").join(Part::Verity.file_name(&v("2.0")));
    let mut b = std::fs::read(&p).expect("read");
    b[100] ^= 0xff;
    std::fs::write(&p, b).expect("write");
    let msg = refused(&env, &env.updater(), "SHA-256").await;
    assert!(msg.contains("is not the signed"), "{msg}");
}

#[tokio::test]
async fn signing_refuses_a_version_not_above_the_channel() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    env.sign("2.0", 30).await;
    let art = env.dir.join("build-1.5");
    artifacts(&art, "1.5");
    let err = release::sign_release(&SignSpec {
        artifacts: art,
        version: v("1.5"),
        channel: "stable".into(),
        keys: env.keys.clone(),
        out: env.repo.clone(),
        expires: release::days_from_now(30),
    })
    .await
    .expect_err("older version");
    assert!(err.to_string().contains("must be above"), "{err}");
}

/// A loopback HTTP server over the repository that honours `Range` and cuts the first transfer
/// of the root image after `cut` bytes.
fn serve(repo: PathBuf, cut: u64) -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let ranged = Arc::new(AtomicU64::new(0));
    let ranged2 = ranged.clone();
    std::thread::spawn(move || {
        let mut cut_done = false;
        for conn in listener.incoming().take(64) {
            let Ok(mut s) = conn else { continue };
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut offset = 0u64;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    offset = v.trim().trim_end_matches('-').parse().unwrap_or(0);
                }
            }
            let file = repo.join(path.trim_start_matches('/'));
            let Ok(body) = std::fs::read(&file) else {
                let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
                continue;
            };
            let body = &body[usize::try_from(offset).unwrap_or(0).min(body.len())..];
            let status = if offset > 0 {
                ranged2.fetch_add(1, Ordering::SeqCst);
                "206 Partial Content"
            } else {
                "200 OK"
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            if path.ends_with(".root.raw") && !cut_done {
                cut_done = true;
                let _ = s.write_all(&body[..usize::try_from(cut).unwrap_or(0)]);
                let _ = s.shutdown(std::net::Shutdown::Both);
                continue;
            }
            let _ = s.write_all(body);
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        }
    });
    (format!("http://{addr}/"), ranged)
}

#[tokio::test]
async fn an_interrupted_download_resumes_with_a_range_request() {
    let env = Env::new(KeysSpec::simple(1, 1, 30)).await;
    let a = env.sign("2.0", 30).await;
    let (base, ranged) = serve(env.repo.clone(), 70_000);
    let m = url::Url::parse(&base).expect("url");
    let updater = env.updater_at(m.clone(), m.join("targets/").expect("url"), 64 * 1024);
    let err = updater.apply(req(None)).await.expect_err("cut short");
    assert!(matches!(err, UpdateError::Fetch(_)), "{err}");
    assert_eq!(env.disk.writes(), 0);
    let partial = env.dir.join("state/update/download").join(Part::Root.file_name(&v("2.0")));
    assert_eq!(std::fs::metadata(&partial).expect("partial kept").len(), 70_000);
    let st = updater.apply(req(None)).await.expect("resumed");
    assert_eq!(st.phase, Phase::Installed);
    assert!(ranged.load(Ordering::SeqCst) >= 1, "the second try asked for a range");
    assert_eq!(env.disk.content(4), a[&Part::Root]);
}
