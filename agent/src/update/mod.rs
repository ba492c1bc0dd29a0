//! Signed A/B updates on the node (design: `docs/0009-updates.md`).
//!
//! Entry point: [`Updater`], driven by `hearth-agent update apply|check|status` (`crate::cli`).
//! [`Updater::apply`] verifies the TUF metadata ([`verify_repository`], `tough`, trusted metadata
//! persisted under `state.dir/update/tuf`), picks the channel's release, refuses what the
//! anti-rollback floor or the running version rule out, downloads every file with resume into
//! `state.dir/update/download` (size-bounded, SHA-256 checked while streaming) and only then
//! writes the inactive slot ([`platform::SlotDisk`]), labels it `hearth_<V>` with the partition
//! UUIDs its UKI's `roothash=` expects, and installs the UKI as `EFI/Linux/hearth_<V>+3.efi`
//! through a temporary name ([`platform::Esp`]). [`Updater::boot_reconcile`] runs at every agent
//! start and on every command: it sees a trial boot, a blessed one (the anti-rollback floor rises
//! only then) or a rollback. [`Updater::check`] is the boot check: agent up, fleet session
//! within the bound when enrolled, GPU health not worse than before; on failure the entry is
//! marked bad and the node reboots into the old slot.
//!
//! The state machine is [`state::UpdateState`], persisted with `persist::Store` at
//! `state.dir/update.json` after every transition.

pub mod cli;
pub mod config;
pub mod fetch;
pub mod platform;
pub mod report;
pub mod state;
pub mod system;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_fleet_client::release::{self, Part, ReleaseInfo, ReleaseVersion};
use url::Url;

use crate::fleet::reboot::Rebooter;
use crate::persist::{PersistError, Store};
use fetch::{FetchError, Fetcher, UpdateTransport};
use platform::{BootControl, EMPTY_LABEL, Esp, PlatformError, Slot, SlotDisk};
use state::{HealthSnapshot, Phase, UpdateState};

/// Boot tries the new entry gets by default (`+3`; `update apply --tries N`).
pub const BOOT_TRIES: u32 = 3;

/// Why an update step failed or was refused. A refusal changes nothing on the disk.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The signed metadata was refused (unsigned, wrong key, below threshold, expired, rolled
    /// back, mixed, oversized…).
    #[error("metadata refused: {reason}")]
    Metadata {
        /// Why, with `tough`'s cause chain.
        reason: String,
    },
    /// No release fits, or the one asked for is not allowed.
    #[error("release refused: {reason}")]
    Release {
        /// Why.
        reason: String,
    },
    /// A release file could not be downloaded or did not verify.
    #[error("download")]
    Fetch(#[from] FetchError),
    /// A disk, ESP or boot-loader step failed.
    #[error("platform")]
    Platform(#[from] PlatformError),
    /// The state document could not be read or written.
    #[error("update state")]
    Persist(#[from] PersistError),
    /// The state machine does not allow the step.
    #[error(transparent)]
    Transition(#[from] state::BadTransition),
    /// The configuration is incomplete for this step.
    #[error("[update] {key}: {problem}")]
    Config {
        /// The key.
        key: &'static str,
        /// What is missing or wrong.
        problem: String,
    },
    /// The written slot does not hash to the signed value.
    #[error("slot {slot}: written data hashes to {got}, not the signed {want}")]
    SlotVerify {
        /// The slot.
        slot: String,
        /// Signed hash.
        want: String,
        /// What the device got.
        got: String,
    },
}

/// Where the metadata comes from and how it is trusted.
#[derive(Debug, Clone)]
pub struct RepoSource {
    /// The shipped trusted root (`root.json`).
    pub root: PathBuf,
    /// Base URL of the metadata (`file://` or `https://`).
    pub metadata_url: Url,
    /// Base URL of the targets.
    pub targets_url: Url,
    /// Where trusted metadata is kept between runs (rollback and freeze defence).
    pub datastore: PathBuf,
    /// Size limits of the metadata files.
    pub limits: tough::Limits,
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Load and verify the repository: the trusted root is the one persisted in the datastore (a
/// rotated root) or else the shipped one; timestamp, snapshot and targets must verify against
/// it with their thresholds, be unexpired, not older than what the datastore holds, and agree
/// with each other (versions, lengths and hashes), each within its size limit.
pub async fn verify_repository(
    src: &RepoSource,
    fetcher: &Fetcher,
) -> Result<tough::Repository, UpdateError> {
    let refuse = |reason: String| UpdateError::Metadata { reason };
    crate::persist::ensure_dir(&src.datastore)?;
    let persisted = src.datastore.join("root.json");
    let root = match std::fs::read(&persisted) {
        Ok(b) => b,
        Err(_) => std::fs::read(&src.root).map_err(|e| UpdateError::Config {
            key: "root",
            problem: format!("{}: {e}", src.root.display()),
        })?,
    };
    tough::RepositoryLoader::new(&root, src.metadata_url.clone(), src.targets_url.clone())
        .transport(UpdateTransport::new(fetcher.clone()))
        .datastore(&src.datastore)
        .limits(src.limits)
        .expiration_enforcement(tough::ExpirationEnforcement::Safe)
        .load()
        .await
        .map_err(|e| refuse(chain(&e)))
}

/// The touchpoints an [`Updater`] acts through.
#[derive(Debug, Clone)]
pub struct Platform {
    /// The slot disk.
    pub disk: Arc<dyn SlotDisk>,
    /// The ESP.
    pub esp: Arc<dyn Esp>,
    /// The boot loader.
    pub boot: Arc<dyn BootControl>,
    /// Reboots.
    pub rebooter: Arc<dyn Rebooter>,
}

/// The running system as the disk and the loader describe it.
#[derive(Debug, Clone)]
pub struct Booted {
    /// All slots.
    pub slots: Vec<Slot>,
    /// Index of the booted one.
    pub index: usize,
    /// Its version.
    pub version: Option<ReleaseVersion>,
    /// Whether its boot entry is blessed (no counter).
    pub blessed: bool,
}

/// Drives updates of one node.
#[derive(Debug)]
pub struct Updater {
    source: RepoSource,
    channel: String,
    fetcher: Fetcher,
    platform: Platform,
    store: Store,
    download_dir: PathBuf,
    boot_tries: u32,
    /// The running version by the `roothash=` it was found for ([`Updater::running_version`]).
    running: std::sync::Mutex<Option<(String, Option<String>)>>,
    /// Every state this updater saved, with its generation, in order ([`Updater::saved`]).
    saved: tokio::sync::broadcast::Sender<(u64, UpdateState)>,
}

/// States kept for a slow [`Updater::saved`] receiver before it lags (an install saves a few
/// dozen: phases and progress).
const SAVED_BACKLOG: usize = 64;

/// What `update apply` asks for.
#[derive(Debug, Clone, Default)]
pub struct ApplyRequest {
    /// A given version (else the channel's newest).
    pub version: Option<ReleaseVersion>,
    /// The channel to install from; `None`: the configured `update.channel`. A fleet-requested
    /// update names the channel of the node's desired state.
    pub channel: Option<String>,
    /// Reboot into the new slot when installed.
    pub reboot: bool,
    /// Health now, kept for the boot check.
    pub health: HealthSnapshot,
}

impl Updater {
    /// An updater keeping its state under `state_dir`.
    pub fn new(
        source: RepoSource,
        channel: String,
        fetcher: Fetcher,
        platform: Platform,
        state_dir: &Path,
    ) -> Self {
        Self {
            source,
            channel,
            fetcher,
            platform,
            store: Store::new(state_dir.join("update.json")),
            download_dir: state_dir.join("update/download"),
            boot_tries: BOOT_TRIES,
            running: std::sync::Mutex::new(None),
            saved: tokio::sync::broadcast::channel(SAVED_BACKLOG).0,
        }
    }

    /// Each state this updater saves from now on, in order, as soon as it is durable: the fleet
    /// session reports every phase from it, even phases shorter than its poll of the state file
    /// (which still catches changes made by another process, such as the boot check unit).
    pub fn saved(&self) -> tokio::sync::broadcast::Receiver<(u64, UpdateState)> {
        self.saved.subscribe()
    }

    /// Boot tries the new entry gets (`hearth_<V>+N.efi`), 1..=9; default [`BOOT_TRIES`].
    pub fn with_boot_tries(mut self, tries: u32) -> Self {
        self.boot_tries = tries.clamp(1, 9);
        self
    }

    /// The persisted state (default when none).
    pub fn load(&self) -> Result<(u64, UpdateState), UpdateError> {
        Ok(self.store.load()?.map(|l| (l.generation, l.state)).unwrap_or_default())
    }

    fn save(&self, generation: &mut u64, state: &UpdateState) -> Result<(), UpdateError> {
        if let Some(dir) = self.store.path().parent() {
            crate::persist::ensure_dir(dir)?;
        }
        *generation += 1;
        self.store.save(*generation, state)?;
        // No receiver (no fleet session) is fine: the state file has it.
        let _ = self.saved.send((*generation, state.clone()));
        Ok(())
    }

    /// Find the booted slot: the root partition whose UUID the kernel's `roothash=` names.
    pub fn booted(&self) -> Result<Booted, UpdateError> {
        let slots = self.platform.disk.slots()?;
        let hash = self.platform.boot.roothash()?.ok_or_else(|| UpdateError::Config {
            key: "root",
            problem: "no roothash= on the kernel command line: booted slot unknown".into(),
        })?;
        let (root_uuid, _) =
            platform::uuids_from_roothash(&hash).ok_or_else(|| UpdateError::Config {
                key: "root",
                problem: format!("roothash={hash} is not 64 hex digits"),
            })?;
        let index = slots.iter().position(|s| s.root.uuid == root_uuid).ok_or_else(|| {
            UpdateError::Config {
                key: "root",
                problem: format!("no slot's root partition has UUID {root_uuid} (roothash={hash})"),
            }
        })?;
        let version = slots[index].version();
        let blessed = match self.platform.boot.booted_entry()? {
            Some(e) => !platform::entry_has_counter(&e),
            None => true,
        };
        Ok(Booted { slots, index, version, blessed })
    }

    /// The OS version running now (the booted slot's label), for the fleet's heartbeat: a staged
    /// rollout does not tell a node already on its version. The slots are read again only when
    /// the kernel's `roothash=` changes (a boot), so a heartbeat costs one read of the command
    /// line. None when the booted slot is unknown.
    pub fn running_version(&self) -> Option<String> {
        let hash = self.platform.boot.roothash().ok().flatten()?;
        let mut cache = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, v)) = cache.as_ref().filter(|(h, _)| *h == hash) {
            return v.clone();
        }
        let version = match self.booted() {
            Ok(b) => b.version.map(|v| v.to_string()),
            Err(e) => {
                tracing::debug!(error = %e, "running version unknown");
                None
            }
        };
        *cache = Some((hash, version.clone()));
        version
    }

    /// Reconcile the state with this boot (trial, bless, rollback). Returns the state.
    pub fn boot_reconcile(&self) -> Result<UpdateState, UpdateError> {
        let (mut generation, mut state) = self.load()?;
        let booted = self.booted()?;
        if state.on_boot(booted.version.as_ref(), booted.blessed) {
            self.save(&mut generation, &state)?;
            match state.phase {
                Phase::RolledBack => tracing::warn!(
                    version = ?state.target.as_ref().map(|t| t.version.to_string()),
                    reason = state.reason.as_deref().unwrap_or(""),
                    "update rolled back"
                ),
                Phase::Blessed => tracing::info!(
                    version = ?booted.version.as_ref().map(ToString::to_string),
                    "update blessed"
                ),
                _ => {}
            }
        }
        Ok(state)
    }

    /// Verify the metadata and list the configured channel's releases.
    pub async fn releases(&self) -> Result<Vec<ReleaseInfo>, UpdateError> {
        self.releases_in(&self.channel).await
    }

    /// Verify the metadata and list the releases of `channel`.
    pub async fn releases_in(&self, channel: &str) -> Result<Vec<ReleaseInfo>, UpdateError> {
        let repo = verify_repository(&self.source, &self.fetcher).await?;
        Ok(release::releases(&repo).into_iter().filter(|r| r.channel == channel).collect())
    }

    /// Install a release into the inactive slot (and reboot into it when asked). Every refusal
    /// happens before the first write to the slot or the ESP.
    pub async fn apply(&self, req: ApplyRequest) -> Result<UpdateState, UpdateError> {
        let mut state = self.boot_reconcile()?;
        let (mut generation, _) = self.load()?;
        if state.phase.busy() && state.phase != Phase::Downloading && state.phase != Phase::Writing
        {
            return Err(
                state::BadTransition { phase: state.phase.as_str(), action: "apply" }.into()
            );
        }
        let booted = self.booted()?;
        let channel = req.channel.as_deref().unwrap_or(&self.channel);
        let outcome = self.choose(&state, &booted, channel, req.version.as_ref()).await;
        let chosen = match outcome {
            Ok(r) => r,
            Err(e) => {
                state.fail(chain(&e));
                self.save(&mut generation, &state)?;
                return Err(e);
            }
        };
        let inactive = 1 - booted.index.min(1);
        let slot = booted.slots[inactive].clone();
        let resume = matches!(state.phase, Phase::Downloading | Phase::Writing)
            && state.target.as_ref() == Some(&chosen);
        if !resume {
            state.begin(chosen.clone(), booted.version.clone(), slot.name(), req.health.clone())?;
        } else {
            state.phase = Phase::Downloading;
        }
        self.save(&mut generation, &state)?;
        match self.install(&mut state, &mut generation, &chosen, &slot, &booted).await {
            Ok(()) => {}
            Err(e) => {
                state.fail(chain(&e));
                self.save(&mut generation, &state)?;
                return Err(e);
            }
        }
        if req.reboot {
            state.rebooting()?;
            self.save(&mut generation, &state)?;
            tracing::info!(version = %chosen.version, "rebooting into the new slot");
            self.platform
                .rebooter
                .reboot()
                .map_err(|e| UpdateError::Config { key: "reboot", problem: e.to_string() })?;
        }
        Ok(state)
    }

    async fn choose(
        &self,
        state: &UpdateState,
        booted: &Booted,
        channel: &str,
        want: Option<&ReleaseVersion>,
    ) -> Result<ReleaseInfo, UpdateError> {
        let releases = self.releases_in(channel).await?;
        let refuse = |reason: String| UpdateError::Release { reason };
        let chosen = match want {
            Some(v) => releases
                .into_iter()
                .find(|r| &r.version == v)
                .ok_or_else(|| refuse(format!("channel {channel} lists no release {v}")))?,
            None => releases
                .into_iter()
                .max_by(|a, b| a.version.cmp(&b.version))
                .ok_or_else(|| refuse(format!("channel {channel} lists no release")))?,
        };
        state.admits(&chosen.version, booted.version.as_ref()).map_err(refuse)?;
        let slot = &booted.slots[1 - booted.index.min(1)];
        for part in [Part::Root, Part::Verity] {
            let (t, p) = match part {
                Part::Root => (&chosen.parts[&Part::Root], &slot.root),
                _ => (&chosen.parts[&Part::Verity], &slot.verity),
            };
            if t.length > p.size {
                return Err(refuse(format!(
                    "{} is {} bytes, partition {} holds {}",
                    t.name, t.length, p.number, p.size
                )));
            }
        }
        if chosen.roothash.is_none() {
            return Err(refuse(format!("release {} names no roothash", chosen.version)));
        }
        Ok(chosen)
    }

    async fn install(
        &self,
        state: &mut UpdateState,
        generation: &mut u64,
        rel: &ReleaseInfo,
        slot: &Slot,
        booted: &Booted,
    ) -> Result<(), UpdateError> {
        crate::persist::ensure_dir(&self.download_dir)?;
        // 1. Download and verify every file before anything is written.
        let mut base = 0u64;
        let mut last_saved = 0u64;
        for part in Part::ALL {
            let t = &rel.parts[&part];
            let url = self
                .source
                .targets_url
                .join(&t.name)
                .map_err(|e| UpdateError::Config { key: "targets_url", problem: e.to_string() })?;
            let dest = self.download_dir.join(&t.name);
            let fetcher = self.fetcher.clone();
            let (tx, mut rx) = tokio::sync::watch::channel(0u64);
            let (length, sha) = (t.length, t.sha256.clone());
            let job = tokio::task::spawn_blocking(move || {
                fetcher.download(&url, &dest, length, &sha, &mut |n| {
                    let _ = tx.send(n);
                })
            });
            tokio::pin!(job);
            let res = loop {
                tokio::select! {
                    r = &mut job => break r,
                    c = rx.changed() => {
                        if c.is_ok() {
                            let n = *rx.borrow_and_update();
                            state.progress(base + n);
                            if state.bytes_done >= last_saved + (state.bytes_total / 20).max(1 << 20) {
                                last_saved = state.bytes_done;
                                self.save(generation, state)?;
                            }
                        }
                    }
                }
            };
            res.map_err(|e| UpdateError::Config { key: "download", problem: e.to_string() })??;
            base += t.length;
            state.progress(base);
        }
        // 2. The slot: free it (labels and stale entries) before writing it.
        let lengths = rel.parts[&Part::Root].length + rel.parts[&Part::Verity].length;
        state.writing(lengths)?;
        self.save(generation, state)?;
        let booted_version = booted.version.clone();
        for entry in self.platform.esp.entries()? {
            if let Some(v) = platform::entry_version(&entry)
                && Some(&v) != booted_version.as_ref()
            {
                self.platform.esp.remove(&entry)?;
            }
        }
        let disk = &self.platform.disk;
        disk.set_identity(&slot.root, EMPTY_LABEL, None)?;
        disk.set_identity(&slot.verity, EMPTY_LABEL, None)?;
        let mut written = 0u64;
        for (part, p) in [(Part::Root, &slot.root), (Part::Verity, &slot.verity)] {
            let t = &rel.parts[&part];
            let path = self.download_dir.join(&t.name);
            let mut f = std::fs::File::open(&path).map_err(|source| {
                UpdateError::Fetch(FetchError::Io { op: "open", path: path.clone(), source })
            })?;
            let hash = disk.write_partition(p, &mut f, t.length, &mut |n| {
                state.progress(written + n);
            })?;
            let got = hex::encode(hash);
            if !got.eq_ignore_ascii_case(&t.sha256) {
                return Err(UpdateError::SlotVerify {
                    slot: slot.name(),
                    want: t.sha256.clone(),
                    got,
                });
            }
            written += t.length;
            self.save(generation, state)?;
        }
        let roothash = rel.roothash.clone().unwrap_or_default();
        let (root_uuid, verity_uuid) = platform::uuids_from_roothash(&roothash)
            .ok_or_else(|| UpdateError::Release { reason: format!("bad roothash {roothash}") })?;
        disk.set_identity(&slot.root, &format!("hearth_{}", rel.version), Some(&root_uuid))?;
        disk.set_identity(
            &slot.verity,
            &format!("hearth_{}_verity", rel.version),
            Some(&verity_uuid),
        )?;
        // 3. The counted boot entry, last: until it exists the old slot is the only choice.
        let uki = self.download_dir.join(&rel.parts[&Part::Uki].name);
        self.platform
            .esp
            .install(&format!("hearth_{}+{}.efi", rel.version, self.boot_tries), &uki)?;
        state.installed()?;
        self.save(generation, state)?;
        for part in Part::ALL {
            let _ = std::fs::remove_file(self.download_dir.join(&rel.parts[&part].name));
        }
        tracing::info!(version = %rel.version, slot = %slot.name(), "update installed");
        Ok(())
    }

    /// The boot check on a trial boot: `observe` is asked for the current health until it
    /// passes or `bound` runs out. On failure the entry is marked bad, the reason persisted, and
    /// (when `reboot`) the node reboots into the old slot. Ok(None): not a trial boot, nothing
    /// to check.
    pub async fn check<F, Fut>(
        &self,
        bound: Duration,
        reboot: bool,
        mut observe: F,
    ) -> Result<Option<Result<(), String>>, UpdateError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Observed>,
    {
        let state = self.boot_reconcile()?;
        if state.phase != Phase::Trial {
            return Ok(None);
        }
        let before = state.health_before.clone().unwrap_or_default();
        let deadline = tokio::time::Instant::now() + bound;
        let mut last: Option<String> = None;
        let verdict = loop {
            // An observation that does not answer (an agent whose API hangs) is cut off at the
            // deadline: the bound holds whatever `observe` does. The verdict is then the last
            // one an observation gave (what was still wrong), or, when none ever completed, that
            // the API never answered.
            let v = match tokio::time::timeout_at(deadline, observe()).await {
                Ok(obs) => judge(&before, &obs),
                Err(_) => Err(last.take().unwrap_or_else(|| {
                    format!(
                        "agent not up: its API did not answer within the check's {} s",
                        bound.as_secs()
                    )
                })),
            };
            if v.is_ok() || tokio::time::Instant::now() >= deadline {
                break v;
            }
            last = v.err();
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        match &verdict {
            // systemd-bless-boot renames the entry once boot-complete.target is reached; the
            // floor rises at the next reconcile that sees the blessed entry.
            Ok(()) => tracing::info!("boot check passed"),
            Err(reason) => {
                self.fall_back(reason, reboot)?;
            }
        }
        Ok(Some(verdict))
    }

    /// Give up a trial boot without checking: the reason is persisted (and reported to the fleet
    /// from the old slot), the entry marked bad and, when `reboot`, the node reboots into the
    /// old slot. What `hearth-boot-check` runs when the agent never answered, and what
    /// `hearth-boot-check-failed.service` runs when the check itself was killed or crashed
    /// (`docs/0009-updates.md`). Ok(false): not a trial boot (nothing on trial, or the check
    /// already failed it), nothing done.
    pub fn fallback(&self, reason: &str, reboot: bool) -> Result<bool, UpdateError> {
        // Failed already in this boot (the check's own fallback, then its unit's OnFailure=):
        // read before reconciling, which would take a failed entry that is still booted for one
        // that came back after its reboot.
        if self.load()?.1.phase == Phase::CheckFailed {
            return Ok(false);
        }
        let state = self.boot_reconcile()?;
        if state.phase != Phase::Trial {
            return Ok(false);
        }
        self.fall_back(reason, reboot)?;
        Ok(true)
    }

    /// The failing end of a trial: persist the reason, mark the entry bad, reboot if asked.
    fn fall_back(&self, reason: &str, reboot: bool) -> Result<(), UpdateError> {
        tracing::warn!(reason, "boot check failed: falling back");
        let (mut generation, mut state) = self.load()?;
        state.check_failed(reason.to_string())?;
        self.save(&mut generation, &state)?;
        self.platform.boot.mark_bad()?;
        if reboot {
            self.platform
                .rebooter
                .reboot()
                .map_err(|e| UpdateError::Config { key: "reboot", problem: e.to_string() })?;
        }
        Ok(())
    }

    /// Install `want` from `channel` because the fleet's desired state names them (a staged
    /// rollout of that channel opened this node's wave, `docs/0009-updates.md`): the same path as
    /// `update apply --version V --reboot`, from the desired state's channel rather than the
    /// configured one, run only when [`fleet_wants`] says the request is new. Ok(None): nothing
    /// to do.
    pub async fn apply_for_fleet(
        &self,
        channel: &str,
        want: &str,
        health: HealthSnapshot,
    ) -> Result<Option<UpdateState>, UpdateError> {
        let version: ReleaseVersion = want.parse().map_err(|e: release::ReleaseError| {
            UpdateError::Release { reason: format!("the fleet asks for {want:?}: {e}") }
        })?;
        let state = self.boot_reconcile()?;
        let booted = self.booted()?;
        if !fleet_wants(&state, booted.version.as_ref(), &version) {
            return Ok(None);
        }
        tracing::info!(version = %version, channel, "installing the release the fleet asks for");
        let req = ApplyRequest {
            version: Some(version),
            channel: Some(channel.to_string()),
            reboot: true,
            health,
        };
        self.apply(req).await.map(Some)
    }

    /// Record that the fleet was told about the last rollback.
    pub fn rollback_reported(&self) -> Result<(), UpdateError> {
        let (mut generation, mut state) = self.load()?;
        if state.phase == Phase::RolledBack && !state.rollback_reported {
            state.rollback_reported = true;
            self.save(&mut generation, &state)?;
        }
        Ok(())
    }
}

/// Whether the fleet's request to install `want` should start an apply now. Not when the node
/// already runs it, nor when this node already tried it (installed, on trial, blessed, rolled
/// back or failed: the fleet counted the outcome, and the desired state is sent again at every
/// session, so retrying here would loop); an interrupted download or write of it resumes.
pub fn fleet_wants(
    state: &UpdateState,
    booted: Option<&ReleaseVersion>,
    want: &ReleaseVersion,
) -> bool {
    if booted == Some(want) {
        return false;
    }
    let resumable = matches!(state.phase, Phase::Idle | Phase::Downloading | Phase::Writing);
    match &state.target {
        Some(t) if &t.version == want => resumable,
        _ => resumable || !state.phase.busy(),
    }
}

/// What the boot check sees now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The agent answered its API with no failed subsystem.
    pub agent_up: Option<String>,
    /// The fleet session state (`connected`, …).
    pub fleet_state: String,
    /// GPUs and healthy GPUs now.
    pub health: HealthSnapshot,
}

/// The check's verdict: `Err(reason)` names the first thing that is worse than before.
pub fn judge(before: &HealthSnapshot, now: &Observed) -> Result<(), String> {
    if let Some(why) = &now.agent_up {
        return Err(format!("agent not up: {why}"));
    }
    if before.enrolled && now.fleet_state != "connected" {
        return Err(format!("fleet session not established (fleet {})", now.fleet_state));
    }
    if now.health.healthy_gpus < before.healthy_gpus {
        return Err(format!(
            "GPU health worse than before the update: {} of {} GPUs healthy, {} before",
            now.health.healthy_gpus, now.health.gpus, before.healthy_gpus
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_request_runs_once_per_version() {
        let v = |s: &str| s.parse::<ReleaseVersion>().expect("version");
        let info = |s: &str| ReleaseInfo {
            version: v(s),
            channel: "stable".into(),
            parts: Default::default(),
            roothash: None,
        };
        let idle = UpdateState::default();
        assert!(fleet_wants(&idle, Some(&v("1.0")), &v("2.0")));
        assert!(!fleet_wants(&idle, Some(&v("2.0")), &v("2.0")), "already running it");
        let mut s = UpdateState { target: Some(info("2.0")), ..Default::default() };
        for (phase, want) in [
            (Phase::Downloading, true),
            (Phase::Writing, true),
            (Phase::Installed, false),
            (Phase::Rebooting, false),
            (Phase::Trial, false),
            (Phase::RolledBack, false),
            (Phase::Failed, false),
            (Phase::Blessed, false),
        ] {
            s.phase = phase;
            assert_eq!(fleet_wants(&s, Some(&v("1.0")), &v("2.0")), want, "{phase:?}");
        }
        // A newer release after a rolled-back one is a new request.
        s.phase = Phase::RolledBack;
        assert!(fleet_wants(&s, Some(&v("1.0")), &v("2.1")));
        s.phase = Phase::Trial;
        assert!(!fleet_wants(&s, Some(&v("1.0")), &v("2.1")), "not while another is on trial");
    }

    #[test]
    fn judge_names_what_is_worse() {
        let before = HealthSnapshot { gpus: 8, healthy_gpus: 8, enrolled: true };
        let good = Observed {
            agent_up: None,
            fleet_state: "connected".into(),
            health: HealthSnapshot { gpus: 8, healthy_gpus: 8, enrolled: true },
        };
        assert_eq!(judge(&before, &good), Ok(()));
        let mut o = good.clone();
        o.fleet_state = "disconnected".into();
        assert!(judge(&before, &o).expect_err("must fail").contains("fleet session"));
        let mut o = good.clone();
        o.health.healthy_gpus = 7;
        assert!(judge(&before, &o).expect_err("must fail").contains("7 of 8"));
        let mut o = good;
        o.agent_up = Some("api unreachable".into());
        assert!(judge(&before, &o).expect_err("must fail").contains("agent not up"));
        let unenrolled = HealthSnapshot { enrolled: false, ..before };
        let o = Observed {
            fleet_state: "no-seed".into(),
            health: unenrolled.clone(),
            ..Default::default()
        };
        assert_eq!(judge(&unenrolled, &o), Ok(()));
    }
}
