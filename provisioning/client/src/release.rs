//! Signed releases: Hearth's TUF repository (design: `docs/0009-updates.md`).
//!
//! A release is three files made by `image/build` for one version `V`:
//! `hearth_V.root.raw` (the slot's erofs content), `hearth_V.root-verity.raw` (its dm-verity hash
//! tree) and `hearth_V.efi` (the UKI whose `roothash=` matches). They are TUF targets of one
//! repository whose `targets.json` says, per target, the release version, channel and part in
//! `custom`. The metadata is made with the `tough` crate on the signer's machine, never on the fleet:
//!
//! - [`init_keys`] (`hearthctl release keys init`): Ed25519 keys per role (root, targets,
//!   snapshot, timestamp) with thresholds, and the signed `root.json` the nodes trust.
//! - [`sign_release`] (`hearthctl release sign`): add a release to a repository directory,
//!   raising every role's version; a release version not above the channel's newest is refused.
//! - [`releases`]: the releases a verified repository lists (used by the node).
//!
//! Every metadata file of the output is replaced atomically, `timestamp.json` last, so a fleet
//! serving the directory never serves a half-written repository.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use aws_lc_rs::rand::SystemRandom;
use tough::editor::RepositoryEditor;
use tough::editor::signed::{PathExists, SignedRole};
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::{
    KeyHolder, RoleKeys, RoleType, Root, Signed, Snapshot, Target, Targets, Timestamp,
};
use tough::sign::Sign;

/// The TUF specification version written into the metadata.
pub const SPEC_VERSION: &str = "1.0.0";

/// Why keys or a release could not be made. Each names the file or the value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// A file could not be read or written.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A version string is not dotted numbers (`1.4.2`).
    #[error("release version {0:?} is not dotted numbers such as 1.4.2")]
    BadVersion(String),
    /// A channel name is not `[a-z0-9-]{1,32}`.
    #[error("channel {0:?} is not 1 to 32 of a-z, 0-9, '-'")]
    BadChannel(String),
    /// A key set specification is not usable.
    #[error("role {role}: threshold {threshold} needs at least as many keys (have {keys})")]
    Threshold {
        /// The role.
        role: &'static str,
        /// Its threshold.
        threshold: u64,
        /// Its key count.
        keys: u64,
    },
    /// The keys directory is not empty.
    #[error("{0} is not empty; refusing to replace keys or the trusted root")]
    KeysExist(PathBuf),
    /// An artifact of the release is missing.
    #[error("release artifact {path} is missing")]
    MissingArtifact {
        /// The file expected.
        path: PathBuf,
    },
    /// The release would not be newer than what the channel already has.
    #[error("channel {channel} already has release {existing}; {version} must be above it")]
    NotNewer {
        /// The channel.
        channel: String,
        /// The newest release in it.
        existing: ReleaseVersion,
        /// The release refused.
        version: ReleaseVersion,
    },
    /// The version is already signed (in any channel: a version names one build).
    #[error("release {version} is already signed (channel {channel}); a version names one build")]
    Exists {
        /// The version.
        version: ReleaseVersion,
        /// Its channel.
        channel: String,
    },
    /// The existing repository's metadata could not be read back.
    #[error("existing metadata {path} is not valid TUF metadata")]
    ExistingMetadata {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A key file could not be used.
    #[error("key {path}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The TUF library refused (missing keys, bad root, …).
    #[error("TUF {what}")]
    Tuf {
        /// What was being done.
        what: &'static str,
        /// The library's error.
        #[source]
        source: Box<tough::error::Error>,
    },
    /// Encoding metadata failed.
    #[error("encode {what}")]
    Encode {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// A release version: dotted unsigned numbers compared numerically (`0.10.0` > `0.9.3`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReleaseVersion(Vec<u64>);

impl ReleaseVersion {
    /// The numeric parts.
    pub fn parts(&self) -> &[u64] {
        &self.0
    }
}

impl Ord for ReleaseVersion {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Missing trailing parts count as 0: 1.2 == 1.2.0.
        let n = self.0.len().max(other.0.len());
        for i in 0..n {
            let a = self.0.get(i).copied().unwrap_or(0);
            let b = other.0.get(i).copied().unwrap_or(0);
            match a.cmp(&b) {
                std::cmp::Ordering::Equal => {}
                o => return o,
            }
        }
        std::cmp::Ordering::Equal
    }
}

impl PartialOrd for ReleaseVersion {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for ReleaseVersion {
    type Err = ReleaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 64 {
            return Err(ReleaseError::BadVersion(s.to_string()));
        }
        let parts: Result<Vec<u64>, _> = s.split('.').map(str::parse::<u64>).collect();
        match parts {
            Ok(p)
                if !p.is_empty() && s.split('.').all(|x| x.bytes().all(|b| b.is_ascii_digit())) =>
            {
                Ok(Self(p))
            }
            _ => Err(ReleaseError::BadVersion(s.to_string())),
        }
    }
}

impl fmt::Display for ReleaseVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(&s.join("."))
    }
}

impl serde::Serialize for ReleaseVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ReleaseVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Check a channel name.
pub fn check_channel(channel: &str) -> Result<(), ReleaseError> {
    let ok = !channel.is_empty()
        && channel.len() <= 32
        && channel.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(()) } else { Err(ReleaseError::BadChannel(channel.to_string())) }
}

/// One of a release's three files.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// The slot's root filesystem (erofs).
    Root,
    /// The root's dm-verity hash tree.
    Verity,
    /// The unified kernel image for the ESP.
    Uki,
}

impl Part {
    /// Every part, in the order a node writes them (root and verity before the UKI that boots
    /// them).
    pub const ALL: [Part; 3] = [Part::Root, Part::Verity, Part::Uki];

    /// The file name of this part for release `version`.
    pub fn file_name(self, version: &ReleaseVersion) -> String {
        match self {
            Part::Root => format!("hearth_{version}.root.raw"),
            Part::Verity => format!("hearth_{version}.root-verity.raw"),
            Part::Uki => format!("hearth_{version}.efi"),
        }
    }

    /// Its name in `custom`.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Root => "root",
            Part::Verity => "verity",
            Part::Uki => "uki",
        }
    }
}

/// One target of a release as the signed metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TargetRef {
    /// The target's name (its file name in `targets/`).
    pub name: String,
    /// Its exact length in bytes.
    pub length: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
}

/// A release listed by verified metadata.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReleaseInfo {
    /// Its version.
    pub version: ReleaseVersion,
    /// Its channel.
    pub channel: String,
    /// Its files.
    pub parts: BTreeMap<Part, TargetRef>,
    /// The dm-verity root hash its UKI boots (`roothash=`), hex; the node derives the slot's
    /// partition UUIDs from it.
    #[serde(default)]
    pub roothash: Option<String>,
}

impl ReleaseInfo {
    /// Total bytes of its files.
    pub fn total_bytes(&self) -> u64 {
        self.parts.values().map(|t| t.length).sum()
    }
}

/// The custom fields Hearth puts on each target.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HearthCustom {
    version: ReleaseVersion,
    channel: String,
    part: Part,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    roothash: Option<String>,
}

const CUSTOM_KEY: &str = "hearth";

/// The complete releases in a set of targets (all three parts present), oldest first. Targets
/// without Hearth's custom fields, or with ones that do not parse, are ignored.
pub fn releases_in(targets: &Targets) -> Vec<ReleaseInfo> {
    let mut by: BTreeMap<(ReleaseVersion, String), BTreeMap<Part, TargetRef>> = BTreeMap::new();
    let mut hashes: BTreeMap<(ReleaseVersion, String), String> = BTreeMap::new();
    for (name, target) in &targets.targets {
        let Some(custom) = target.custom.get(CUSTOM_KEY) else { continue };
        let Ok(c) = serde_json::from_value::<HearthCustom>(custom.clone()) else { continue };
        if name.raw() != c.part.file_name(&c.version) {
            continue;
        }
        if let Some(h) = c.roothash.filter(|h| is_roothash(h)) {
            hashes.insert((c.version.clone(), c.channel.clone()), h);
        }
        by.entry((c.version, c.channel)).or_default().insert(
            c.part,
            TargetRef {
                name: name.raw().to_string(),
                length: target.length,
                sha256: hex::encode(&*target.hashes.sha256),
            },
        );
    }
    let mut out: Vec<ReleaseInfo> = by
        .into_iter()
        .filter(|(_, parts)| parts.len() == Part::ALL.len())
        .map(|((version, channel), parts)| {
            let roothash = hashes.get(&(version.clone(), channel.clone())).cloned();
            ReleaseInfo { version, channel, parts, roothash }
        })
        .collect();
    out.sort_by(|a, b| a.version.cmp(&b.version));
    out
}

fn is_roothash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The `roothash=` value (64 hex digits) on a UKI's embedded command line, if any.
pub fn uki_roothash(uki: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"roothash=";
    let mut at = 0;
    while let Some(pos) = uki.get(at..)?.windows(KEY.len()).position(|w| w == KEY) {
        let start = at + pos + KEY.len();
        if let Some(v) = uki.get(start..start + 64)
            && let Ok(s) = std::str::from_utf8(v)
            && is_roothash(s)
        {
            return Some(s.to_ascii_lowercase());
        }
        at = start;
    }
    None
}

/// The releases a verified repository lists.
pub fn releases(repo: &tough::Repository) -> Vec<ReleaseInfo> {
    releases_in(&repo.targets().signed)
}

/// How many keys each role gets and how many signatures it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleSpec {
    /// Keys generated.
    pub keys: u64,
    /// Signatures required.
    pub threshold: u64,
}

/// The key set [`init_keys`] makes.
#[derive(Debug, Clone)]
pub struct KeysSpec {
    /// Root role (signs the key set itself; keep its keys offline).
    pub root: RoleSpec,
    /// Targets role (signs releases).
    pub targets: RoleSpec,
    /// Snapshot role.
    pub snapshot: RoleSpec,
    /// Timestamp role.
    pub timestamp: RoleSpec,
    /// When the root expires.
    pub expires: jiff::Timestamp,
}

impl KeysSpec {
    /// One key per role except root (`root_keys` of which `root_threshold` must sign), root
    /// valid for `days`.
    pub fn simple(root_keys: u64, root_threshold: u64, days: i64) -> Self {
        let one = RoleSpec { keys: 1, threshold: 1 };
        Self {
            root: RoleSpec { keys: root_keys, threshold: root_threshold },
            targets: one,
            snapshot: one,
            timestamp: one,
            expires: days_from_now(days),
        }
    }
}

/// Now plus `days` (negative: in the past).
pub fn days_from_now(days: i64) -> jiff::Timestamp {
    let now = jiff::Timestamp::now();
    let secs = days.saturating_mul(86_400);
    now.checked_add(jiff::SignedDuration::from_secs(secs)).unwrap_or(now)
}

fn tuf(what: &'static str) -> impl FnOnce(tough::error::Error) -> ReleaseError {
    move |source| ReleaseError::Tuf { what, source: Box::new(source) }
}

fn role_name(role: RoleType) -> &'static str {
    match role {
        RoleType::Root => "root",
        RoleType::Targets => "targets",
        RoleType::Snapshot => "snapshot",
        RoleType::Timestamp => "timestamp",
        _ => "other",
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ReleaseError {
    let path = path.to_path_buf();
    move |source| ReleaseError::Io { op, path, source }
}

/// Generate one Ed25519 key (PKCS#8 DER, what `tough` reads), write it owner-only, return its
/// TUF key.
fn generate_key(path: &Path) -> Result<tough::schema::key::Key, ReleaseError> {
    let rng = SystemRandom::new();
    let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| {
        ReleaseError::Key { path: path.to_path_buf(), source: format!("generate: {e}").into() }
    })?;
    write_private(path, doc.as_ref())?;
    let pair = tough::sign::parse_keypair(doc.as_ref())
        .map_err(|e| ReleaseError::Key { path: path.to_path_buf(), source: Box::new(e) })?;
    Ok(pair.tuf_key())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ReleaseError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create", path))?;
    f.write_all(bytes).map_err(io("write", path))?;
    f.sync_all().map_err(io("fsync", path))
}

/// The key files of a keys directory (`*.pk8`), sorted.
pub fn key_files(dir: &Path) -> Result<Vec<PathBuf>, ReleaseError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io("read", dir))? {
        let p = e.map_err(io("read", dir))?.path();
        if p.extension().is_some_and(|x| x == "pk8") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn key_sources(files: &[PathBuf]) -> Vec<Box<dyn KeySource>> {
    files
        .iter()
        .map(|p| Box::new(LocalKeySource { path: p.clone() }) as Box<dyn KeySource>)
        .collect()
}

/// Make a key set in `dir`: `ROLE-N.pk8` per key (0600) and `root.json` (also as `1.root.json`),
/// the trusted root nodes ship with. Refuses a directory that is not empty.
pub async fn init_keys(dir: &Path, spec: &KeysSpec) -> Result<PathBuf, ReleaseError> {
    let root_path = dir.join("root.json");
    let non_empty = std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if root_path.exists() || non_empty {
        return Err(ReleaseError::KeysExist(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let mut keys = HashMap::new();
    let mut roles = HashMap::new();
    let mut root_key_files = Vec::new();
    for (role, rs) in [
        (RoleType::Root, spec.root),
        (RoleType::Targets, spec.targets),
        (RoleType::Snapshot, spec.snapshot),
        (RoleType::Timestamp, spec.timestamp),
    ] {
        let name = role_name(role);
        if rs.threshold == 0 || rs.threshold > rs.keys {
            return Err(ReleaseError::Threshold {
                role: name,
                threshold: rs.threshold,
                keys: rs.keys,
            });
        }
        let mut keyids = Vec::new();
        for i in 1..=rs.keys {
            let path = dir.join(format!("{name}-{i}.pk8"));
            let key = generate_key(&path)?;
            let id = key
                .key_id()
                .map_err(|e| ReleaseError::Key { path: path.clone(), source: Box::new(e) })?;
            keys.insert(id.clone(), key);
            keyids.push(id);
            if role == RoleType::Root {
                root_key_files.push(path);
            }
        }
        let threshold = NonZeroU64::new(rs.threshold).unwrap_or(NonZeroU64::MIN);
        roles.insert(role, RoleKeys { keyids, threshold, _extra: HashMap::new() });
    }
    let root = Root {
        spec_version: SPEC_VERSION.to_string(),
        consistent_snapshot: false,
        version: NonZeroU64::MIN,
        expires: spec.expires,
        keys,
        roles,
        _extra: HashMap::new(),
    };
    let signed = sign_root(root, &root_key_files).await?;
    write_replace(&dir.join("1.root.json"), signed.buffer())?;
    write_replace(&root_path, signed.buffer())?;
    Ok(root_path)
}

/// Sign a root with the given key files (every root key among them signs).
pub async fn sign_root(
    root: Root,
    key_files: &[PathBuf],
) -> Result<SignedRole<Root>, ReleaseError> {
    let holder = KeyHolder::Root(root.clone());
    SignedRole::new(root, &holder, &key_sources(key_files), &SystemRandom::new())
        .await
        .map_err(tuf("sign root"))
}

/// What [`sign_release`] does.
#[derive(Debug, Clone)]
pub struct SignSpec {
    /// The image build's output directory (holds the three artifacts).
    pub artifacts: PathBuf,
    /// The release version.
    pub version: ReleaseVersion,
    /// Its channel.
    pub channel: String,
    /// The keys directory ([`init_keys`]).
    pub keys: PathBuf,
    /// The repository directory (made if missing; metadata at its top, files in `targets/`).
    pub out: PathBuf,
    /// When the new targets, snapshot and timestamp metadata expire.
    pub expires: jiff::Timestamp,
}

/// What [`sign_release`] made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SignReport {
    /// The release added.
    pub release: ReleaseInfo,
    /// The new metadata version (targets, snapshot and timestamp all carry it).
    pub metadata_version: u64,
    /// Releases now listed.
    pub releases: usize,
}

fn read_existing<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, ReleaseError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|source| ReleaseError::ExistingMetadata { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ReleaseError::Io { op: "read", path: path.to_path_buf(), source: e }),
    }
}

/// Replace `path` atomically and durably (temp, fsync, rename, fsync dir).
fn write_replace(path: &Path, bytes: &[u8]) -> Result<(), ReleaseError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp-write");
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync", dir))
}

/// Add a release to the repository in `spec.out`: copy its three files into `targets/`, list
/// them with their hashes and lengths, and sign new targets, snapshot and timestamp metadata one
/// version above the existing ones. Earlier releases stay listed.
pub async fn sign_release(spec: &SignSpec) -> Result<SignReport, ReleaseError> {
    check_channel(&spec.channel)?;
    let root_path = spec.keys.join("root.json");
    let keys = key_sources(&key_files(&spec.keys)?);
    let old_targets: Option<Signed<Targets>> = read_existing(&spec.out.join("targets.json"))?;
    let old_snapshot: Option<Signed<Snapshot>> = read_existing(&spec.out.join("snapshot.json"))?;
    let old_timestamp: Option<Signed<Timestamp>> = read_existing(&spec.out.join("timestamp.json"))?;

    if let Some(old) = &old_targets {
        if let Some(same) = releases_in(&old.signed).into_iter().find(|r| r.version == spec.version)
        {
            return Err(ReleaseError::Exists { version: same.version, channel: same.channel });
        }
        if let Some(newest) = releases_in(&old.signed)
            .into_iter()
            .filter(|r| r.channel == spec.channel)
            .map(|r| r.version)
            .max()
            && newest >= spec.version
        {
            return Err(ReleaseError::NotNewer {
                channel: spec.channel.clone(),
                existing: newest,
                version: spec.version.clone(),
            });
        }
    }

    let mut editor = RepositoryEditor::new(&root_path).await.map_err(tuf("load root"))?;
    if let Some(old) = &old_targets {
        for (name, target) in &old.signed.targets {
            editor.add_target(name.clone(), target.clone()).map_err(tuf("keep target"))?;
        }
    }
    let uki_path = spec.artifacts.join(Part::Uki.file_name(&spec.version));
    let roothash = match std::fs::read(&uki_path) {
        Ok(b) => uki_roothash(&b),
        Err(_) => return Err(ReleaseError::MissingArtifact { path: uki_path }),
    };
    for part in Part::ALL {
        let path = spec.artifacts.join(part.file_name(&spec.version));
        if !path.is_file() {
            return Err(ReleaseError::MissingArtifact { path });
        }
        let (name, mut target): (tough::TargetName, Target) =
            RepositoryEditor::build_target(&path).await.map_err(tuf("hash artifact"))?;
        let custom = HearthCustom {
            version: spec.version.clone(),
            channel: spec.channel.clone(),
            part,
            roothash: roothash.clone(),
        };
        target.custom.insert(
            CUSTOM_KEY.to_string(),
            serde_json::to_value(&custom)
                .map_err(|source| ReleaseError::Encode { what: "custom", source })?,
        );
        editor.add_target(name, target).map_err(tuf("add target"))?;
    }
    let version = [
        old_targets.as_ref().map(|t| t.signed.version.get()),
        old_snapshot.as_ref().map(|t| t.signed.version.get()),
        old_timestamp.as_ref().map(|t| t.signed.version.get()),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0)
        + 1;
    let v = NonZeroU64::new(version).unwrap_or(NonZeroU64::MIN);
    editor.targets_version(v).map_err(tuf("targets version"))?;
    editor.targets_expires(spec.expires).map_err(tuf("targets expiry"))?;
    editor
        .snapshot_version(v)
        .snapshot_expires(spec.expires)
        .timestamp_version(v)
        .timestamp_expires(spec.expires);
    let signed = editor.sign(&keys).await.map_err(tuf("sign"))?;

    // Files first, then metadata bottom-up, timestamp last: a reader sees the old repository or
    // the new one.
    let targets_dir = spec.out.join("targets");
    std::fs::create_dir_all(&targets_dir).map_err(io("create", &targets_dir))?;
    signed
        .copy_targets(&spec.artifacts, &targets_dir, PathExists::Replace)
        .await
        .map_err(tuf("copy targets"))?;
    for e in std::fs::read_dir(&spec.keys).map_err(io("read", &spec.keys))? {
        let p = e.map_err(io("read", &spec.keys))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if name.ends_with(".root.json") || name == "root.json" {
            let b = std::fs::read(&p).map_err(io("read", &p))?;
            write_replace(&spec.out.join(&name), &b)?;
        }
    }
    let stage = spec.out.join(".staging");
    let _ = std::fs::remove_dir_all(&stage);
    signed.write(&stage).await.map_err(tuf("write metadata"))?;
    let mut new_targets = None;
    for name in ["targets.json", "snapshot.json", "timestamp.json"] {
        let p = stage.join(name);
        let b = std::fs::read(&p).map_err(io("read", &p))?;
        if name == "targets.json" {
            new_targets =
                Some(serde_json::from_slice::<Signed<Targets>>(&b).map_err(|source| {
                    ReleaseError::ExistingMetadata { path: p.clone(), source }
                })?);
        }
        write_replace(&spec.out.join(name), &b)?;
    }
    let _ = std::fs::remove_dir_all(&stage);

    let all = new_targets.map(|t| releases_in(&t.signed)).unwrap_or_default();
    let release = all
        .iter()
        .find(|r| r.version == spec.version && r.channel == spec.channel)
        .cloned()
        .ok_or_else(|| ReleaseError::MissingArtifact { path: spec.artifacts.clone() })?;
    Ok(SignReport { release, metadata_version: version, releases: all.len() })
}
