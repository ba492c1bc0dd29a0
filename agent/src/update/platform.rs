//! The update's OS touchpoints, each a narrow trait with a real implementation here and a fake
//! of the same name in `crate::fakes::update`: the slot partitions ([`SlotDisk`]), the ESP
//! ([`Esp`]) and the boot loader ([`BootControl`]). Rebooting reuses
//! [`crate::fleet::reboot::Rebooter`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::command::CommandRunner;

/// GPT type of an x86-64 root partition.
pub const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// GPT type of an x86-64 root-verity partition.
pub const VERITY_TYPE: &str = "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5";
/// The label of a free slot partition.
pub const EMPTY_LABEL: &str = "_empty";

/// Why a touchpoint failed. Each names the device or file.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A file or device call failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The device or file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An external program failed.
    #[error("{program} failed: {detail}")]
    Command {
        /// The program.
        program: String,
        /// Its exit status and error output.
        detail: String,
    },
    /// What the disk reports cannot be used.
    #[error("disk {disk}: {problem}")]
    Layout {
        /// The disk.
        disk: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The data is larger than the partition.
    #[error("{path}: {len} bytes do not fit in {size}")]
    TooLarge {
        /// The partition.
        path: PathBuf,
        /// Bytes to write.
        len: u64,
        /// Partition size.
        size: u64,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PlatformError {
    let path = path.to_path_buf();
    move |source| PlatformError::Io { op, path, source }
}

/// One partition of a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPartition {
    /// Partition number on the disk (1-based).
    pub number: u32,
    /// Device node.
    pub node: PathBuf,
    /// GPT label.
    pub label: String,
    /// GPT partition UUID (lower case).
    pub uuid: String,
    /// Size in bytes.
    pub size: u64,
}

/// An A/B slot: a root partition and its verity partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The root partition.
    pub root: SlotPartition,
    /// Its verity hash partition.
    pub verity: SlotPartition,
}

impl Slot {
    /// The version in the root partition's label (`hearth_<version>`), if any.
    pub fn version(&self) -> Option<hearth_fleet_client::release::ReleaseVersion> {
        self.root.label.strip_prefix("hearth_")?.parse().ok()
    }

    /// A short name: the root partition's number.
    pub fn name(&self) -> String {
        format!("partition {}", self.root.number)
    }
}

/// The partition UUIDs systemd-repart derives from a verity root hash: the first 128 bits name
/// the data partition, the last 128 bits the hash partition.
pub fn uuids_from_roothash(roothash: &str) -> Option<(String, String)> {
    if roothash.len() != 64 || !roothash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let fmt = |h: &str| {
        let h = h.to_ascii_lowercase();
        format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    };
    Some((fmt(&roothash[..32]), fmt(&roothash[32..])))
}

/// The disk holding the A/B slots.
pub trait SlotDisk: Send + Sync + std::fmt::Debug {
    /// The slots, in partition order.
    fn slots(&self) -> Result<Vec<Slot>, PlatformError>;
    /// Write `src` (exactly `len` bytes) to the start of `part`, flush it to the device, and
    /// return the SHA-256 of what was written. `progress` gets the bytes written so far.
    fn write_partition(
        &self,
        part: &SlotPartition,
        src: &mut dyn Read,
        len: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<[u8; 32], PlatformError>;
    /// Set a partition's GPT label and, if given, its UUID.
    fn set_identity(
        &self,
        part: &SlotPartition,
        label: &str,
        uuid: Option<&str>,
    ) -> Result<(), PlatformError>;
}

/// The EFI system partition's `EFI/Linux` directory.
pub trait Esp: Send + Sync + std::fmt::Debug {
    /// File names in it.
    fn entries(&self) -> Result<Vec<String>, PlatformError>;
    /// Put `src` in as `name`: written under a temporary name, flushed, renamed into place, the
    /// directory flushed.
    fn install(&self, name: &str, src: &Path) -> Result<(), PlatformError>;
    /// Remove an entry.
    fn remove(&self, name: &str) -> Result<(), PlatformError>;
    /// Rename an entry (boot counting: `+0-N` marks it bad).
    fn rename(&self, from: &str, to: &str) -> Result<(), PlatformError>;
}

/// What the boot loader and kernel say about this boot.
pub trait BootControl: Send + Sync + std::fmt::Debug {
    /// `roothash=` from the kernel command line.
    fn roothash(&self) -> Result<Option<String>, PlatformError>;
    /// The boot entry the loader started (`LoaderEntrySelected`), e.g. `hearth_2.0+2-1.efi`.
    fn booted_entry(&self) -> Result<Option<String>, PlatformError>;
    /// Mark the booted entry bad so the next boot picks the other one.
    fn mark_bad(&self) -> Result<(), PlatformError>;
}

/// Copy `len` bytes from `src` to `dst` in 1 MiB blocks, hashing; fail on a short source.
pub fn copy_hashed(
    src: &mut dyn Read,
    dst: &mut dyn Write,
    len: u64,
    path: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<[u8; 32], PlatformError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from((len - done).min(buf.len() as u64)).unwrap_or(buf.len());
        let n = src.read(&mut buf[..want]).map_err(io("read source for", path))?;
        if n == 0 {
            return Err(PlatformError::Io {
                op: "short source for",
                path: path.to_path_buf(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        dst.write_all(&buf[..n]).map_err(io("write", path))?;
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(hasher.finalize().into())
}

/// The real slot disk: a GPT disk read with `sfdisk --json`, written through its partition
/// device nodes, relabelled with `sfdisk --part-label/--part-uuid`.
#[derive(Debug, Clone)]
pub struct GptSlotDisk {
    disk: PathBuf,
    runner: Arc<dyn CommandRunner>,
}

impl GptSlotDisk {
    /// The slots of `disk` (e.g. `/dev/nvme0n1`).
    pub fn new(disk: PathBuf, runner: Arc<dyn CommandRunner>) -> Self {
        Self { disk, runner }
    }

    /// The whole disk that holds `partition` (via sysfs), e.g. `/dev/vda` for `/dev/vda2`.
    pub fn disk_of(partition: &Path) -> Result<PathBuf, PlatformError> {
        let real = std::fs::canonicalize(partition).map_err(io("resolve", partition))?;
        let name = real.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let sys = PathBuf::from("/sys/class/block").join(&name);
        let link = std::fs::canonicalize(&sys).map_err(io("resolve", &sys))?;
        let parent = link.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str());
        match parent {
            Some(p) => Ok(PathBuf::from("/dev").join(p)),
            None => Err(PlatformError::Layout { disk: real, problem: "no parent disk".into() }),
        }
    }

    fn sfdisk(&self, args: &[&str]) -> Result<String, PlatformError> {
        let mut argv = vec!["sfdisk".to_string()];
        argv.extend(args.iter().map(|s| s.to_string()));
        let out = self.runner.run(&argv, Duration::from_secs(30)).map_err(|e| {
            PlatformError::Command { program: "sfdisk".into(), detail: e.to_string() }
        })?;
        if !out.success() {
            return Err(PlatformError::Command {
                program: "sfdisk".into(),
                detail: format!("{:?}: {}", out.status, out.stderr.trim()),
            });
        }
        Ok(out.stdout)
    }
}

/// Parse `sfdisk --json` output into slots: the k-th root partition pairs with the k-th
/// root-verity partition.
pub fn parse_sfdisk(disk: &Path, json: &str) -> Result<Vec<Slot>, PlatformError> {
    #[derive(serde::Deserialize)]
    struct Out {
        partitiontable: Table,
    }
    #[derive(serde::Deserialize)]
    struct Table {
        #[serde(default)]
        sectorsize: Option<u64>,
        partitions: Vec<Part>,
    }
    #[derive(serde::Deserialize)]
    struct Part {
        node: String,
        size: u64,
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        uuid: String,
        #[serde(default)]
        name: String,
    }
    let bad = |problem: String| PlatformError::Layout { disk: disk.to_path_buf(), problem };
    let out: Out = serde_json::from_str(json).map_err(|e| bad(format!("sfdisk output: {e}")))?;
    let sector = out.partitiontable.sectorsize.unwrap_or(512);
    let mut roots = Vec::new();
    let mut verities = Vec::new();
    for (i, p) in out.partitiontable.partitions.iter().enumerate() {
        let number = p
            .node
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(u32::try_from(i + 1).unwrap_or(u32::MAX));
        let part = SlotPartition {
            number,
            node: PathBuf::from(&p.node),
            label: p.name.clone(),
            uuid: p.uuid.to_ascii_lowercase(),
            size: p.size.saturating_mul(sector),
        };
        if p.kind.eq_ignore_ascii_case(ROOT_TYPE) {
            roots.push(part);
        } else if p.kind.eq_ignore_ascii_case(VERITY_TYPE) {
            verities.push(part);
        }
    }
    if roots.len() != 2 || verities.len() != 2 {
        return Err(bad(format!(
            "expected 2 root and 2 root-verity partitions, found {} and {}",
            roots.len(),
            verities.len()
        )));
    }
    Ok(roots.into_iter().zip(verities).map(|(root, verity)| Slot { root, verity }).collect())
}

impl SlotDisk for GptSlotDisk {
    fn slots(&self) -> Result<Vec<Slot>, PlatformError> {
        let disk = self.disk.to_string_lossy().to_string();
        let json = self.sfdisk(&["--json", &disk])?;
        parse_sfdisk(&self.disk, &json)
    }

    fn write_partition(
        &self,
        part: &SlotPartition,
        src: &mut dyn Read,
        len: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<[u8; 32], PlatformError> {
        if len > part.size {
            return Err(PlatformError::TooLarge { path: part.node.clone(), len, size: part.size });
        }
        let mut dev = std::fs::OpenOptions::new()
            .write(true)
            .open(&part.node)
            .map_err(io("open", &part.node))?;
        let hash = copy_hashed(src, &mut dev, len, &part.node, progress)?;
        dev.sync_all().map_err(io("fsync", &part.node))?;
        Ok(hash)
    }

    fn set_identity(
        &self,
        part: &SlotPartition,
        label: &str,
        uuid: Option<&str>,
    ) -> Result<(), PlatformError> {
        let disk = self.disk.to_string_lossy().to_string();
        let n = part.number.to_string();
        self.sfdisk(&["--part-label", &disk, &n, label])?;
        if let Some(u) = uuid {
            self.sfdisk(&["--part-uuid", &disk, &n, u])?;
        }
        Ok(())
    }
}

/// The real ESP: a mounted directory (`/efi/EFI/Linux`).
#[derive(Debug, Clone)]
pub struct DirEsp {
    dir: PathBuf,
}

impl DirEsp {
    /// The `EFI/Linux` directory under the ESP mount point `esp`.
    pub fn new(esp: &Path) -> Self {
        Self { dir: esp.join("EFI/Linux") }
    }
}

fn sync_dir(dir: &Path) -> Result<(), PlatformError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync", dir))
}

impl Esp for DirEsp {
    fn entries(&self) -> Result<Vec<String>, PlatformError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(io("read", &self.dir))? {
            let e = e.map_err(io("read", &self.dir))?;
            if let Some(n) = e.file_name().to_str() {
                out.push(n.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    fn install(&self, name: &str, src: &Path) -> Result<(), PlatformError> {
        // The temporary name does not end in .efi, so systemd-boot never lists a half-written
        // UKI.
        let tmp = self.dir.join(format!(".{name}.partial"));
        let dst = self.dir.join(name);
        let mut input = std::fs::File::open(src).map_err(io("open", src))?;
        let len = input.metadata().map_err(io("stat", src))?.len();
        let mut out = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        copy_hashed(&mut input, &mut out, len, &tmp, &mut |_| {})?;
        out.sync_all().map_err(io("fsync", &tmp))?;
        drop(out);
        std::fs::rename(&tmp, &dst).map_err(io("rename", &dst))?;
        sync_dir(&self.dir)
    }

    fn remove(&self, name: &str) -> Result<(), PlatformError> {
        let p = self.dir.join(name);
        std::fs::remove_file(&p).map_err(io("remove", &p))?;
        sync_dir(&self.dir)
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), PlatformError> {
        let to_path = self.dir.join(to);
        std::fs::rename(self.dir.join(from), &to_path).map_err(io("rename", &to_path))?;
        sync_dir(&self.dir)
    }
}

/// systemd's boot-assessment helper (Debian and every distribution with systemd >= 240).
pub const BLESS_BOOT: &str = "/usr/lib/systemd/systemd-bless-boot";

/// The systemd-boot loader interface: `/proc/cmdline`, the `LoaderEntrySelected` EFI variable,
/// `systemd-bless-boot bad`.
#[derive(Debug, Clone)]
pub struct SystemdBoot {
    cmdline: PathBuf,
    efivars: PathBuf,
    runner: Arc<dyn CommandRunner>,
}

/// systemd-boot's vendor GUID for its EFI variables.
const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

impl SystemdBoot {
    /// The real paths.
    pub fn new(runner: Arc<dyn CommandRunner>) -> Self {
        Self {
            cmdline: PathBuf::from("/proc/cmdline"),
            efivars: PathBuf::from("/sys/firmware/efi/efivars"),
            runner,
        }
    }

    /// Other paths for `/proc/cmdline` and the efivars directory (tests).
    pub fn at(cmdline: PathBuf, efivars: PathBuf, runner: Arc<dyn CommandRunner>) -> Self {
        Self { cmdline, efivars, runner }
    }
}

/// `roothash=` on a kernel command line.
pub fn cmdline_roothash(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("roothash="))
        .map(str::to_ascii_lowercase)
}

/// Decode an EFI string variable (4 attribute bytes, then UTF-16LE, NUL-terminated).
pub fn decode_efi_string(raw: &[u8]) -> Option<String> {
    let body = raw.get(4..)?;
    let units: Vec<u16> = body
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).ok()
}

impl BootControl for SystemdBoot {
    fn roothash(&self) -> Result<Option<String>, PlatformError> {
        let s = std::fs::read_to_string(&self.cmdline).map_err(io("read", &self.cmdline))?;
        Ok(cmdline_roothash(&s))
    }

    fn booted_entry(&self) -> Result<Option<String>, PlatformError> {
        let read = |name: &str| {
            let p = self.efivars.join(format!("{name}-{LOADER_GUID}"));
            match std::fs::read(&p) {
                Ok(raw) => Ok(decode_efi_string(&raw)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(PlatformError::Io { op: "read", path: p, source: e }),
            }
        };
        // A counted boot: systemd-boot names the entry file it counted in LoaderBootCountPath
        // (LoaderEntrySelected is the entry's id, which carries no counter). The variable keeps
        // the boot-time name after systemd-bless-boot renamed the file, so whether this boot was
        // blessed since is what `systemd-bless-boot status` says (`good`).
        let Some(counted) = read("LoaderBootCountPath")? else {
            return read("LoaderEntrySelected");
        };
        let name = counted.rsplit(['\\', '/']).next().unwrap_or(&counted).to_string();
        let argv = vec![BLESS_BOOT.to_string(), "status".to_string()];
        let out = self.runner.run(&argv, Duration::from_secs(30)).map_err(|e| {
            PlatformError::Command { program: "systemd-bless-boot".into(), detail: e.to_string() }
        })?;
        if out.success() && out.stdout.trim() == "good" {
            Ok(Some(strip_counter(&name)))
        } else {
            Ok(Some(name))
        }
    }

    fn mark_bad(&self) -> Result<(), PlatformError> {
        // Not on PATH: systemd installs it with its other helpers.
        let argv = vec![BLESS_BOOT.to_string(), "bad".to_string()];
        let out = self.runner.run(&argv, Duration::from_secs(30)).map_err(|e| {
            PlatformError::Command { program: "systemd-bless-boot".into(), detail: e.to_string() }
        })?;
        if out.success() {
            Ok(())
        } else {
            Err(PlatformError::Command {
                program: "systemd-bless-boot".into(),
                detail: format!("{:?}: {}", out.status, out.stderr.trim()),
            })
        }
    }
}

/// Whether a boot entry name still carries a boot counter (`NAME+LEFT[-DONE].efi`): not yet
/// blessed.
pub fn entry_has_counter(entry: &str) -> bool {
    let stem = entry.strip_suffix(".efi").or_else(|| entry.strip_suffix(".conf")).unwrap_or(entry);
    match stem.rsplit_once('+') {
        Some((_, counter)) => {
            let mut it = counter.splitn(2, '-');
            it.next().is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
                && it.next().is_none_or(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        }
        None => false,
    }
}

/// The entry's name without its boot counter (`hearth_2.0+2-1.efi` -> `hearth_2.0.efi`).
pub fn strip_counter(entry: &str) -> String {
    if !entry_has_counter(entry) {
        return entry.to_string();
    }
    let (stem, ext) = match entry.rsplit_once('.') {
        Some((s, e)) if e == "efi" || e == "conf" => (s, format!(".{e}")),
        _ => (entry, String::new()),
    };
    let base = stem.rsplit_once('+').map_or(stem, |(b, _)| b);
    format!("{base}{ext}")
}

/// The version an ESP entry boots (`hearth_<V>[+N[-M]].efi`).
pub fn entry_version(entry: &str) -> Option<hearth_fleet_client::release::ReleaseVersion> {
    let stem = entry.strip_suffix(".efi")?;
    let stem = stem.strip_prefix("hearth_")?;
    let v = stem.split('+').next()?;
    v.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn efi_string(s: &str) -> Vec<u8> {
        let mut v = vec![6, 0, 0, 0];
        v.extend(s.encode_utf16().chain([0]).flat_map(u16::to_le_bytes));
        v
    }

    #[test]
    fn a_counted_boot_is_blessed_only_when_bless_boot_says_good() {
        let dir = std::env::temp_dir().join(format!("hearth-efivars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let var = |name: &str, value: &str| {
            std::fs::write(dir.join(format!("{name}-{LOADER_GUID}")), efi_string(value))
                .expect("var")
        };
        let runner = Arc::new(crate::fakes::command::SystemRunner::default());
        let boot = SystemdBoot::at(dir.join("cmdline"), dir.clone(), runner.clone());
        // Not counted: the selected entry as it is.
        var("LoaderEntrySelected", "hearth_1.0.efi");
        assert_eq!(boot.booted_entry().expect("entry").as_deref(), Some("hearth_1.0.efi"));
        assert!(runner.calls().is_empty(), "no bless-boot call for an uncounted boot");
        // Counted (the id carries no counter; the count path does): on trial until `good`.
        var("LoaderEntrySelected", "hearth_2.0.efi");
        var("LoaderBootCountPath", "\\EFI\\Linux\\hearth_2.0+2-1.efi");
        let out = |s: &str| crate::command::CommandOutput {
            status: Some(0),
            stdout: format!("{s}\n"),
            stderr: String::new(),
        };
        runner.answer(out("indeterminate"));
        assert_eq!(boot.booted_entry().expect("entry").as_deref(), Some("hearth_2.0+2-1.efi"));
        runner.answer(out("good"));
        assert_eq!(boot.booted_entry().expect("entry").as_deref(), Some("hearth_2.0.efi"));
        runner.answer(out("bad"));
        assert_eq!(boot.booted_entry().expect("entry").as_deref(), Some("hearth_2.0+2-1.efi"));
        assert_eq!(runner.calls()[0], [BLESS_BOOT, "status"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn counters_are_stripped_from_entry_names() {
        assert_eq!(strip_counter("hearth_2.0+2-1.efi"), "hearth_2.0.efi");
        assert_eq!(strip_counter("hearth_2.0+3.efi"), "hearth_2.0.efi");
        assert_eq!(strip_counter("hearth_2.0.efi"), "hearth_2.0.efi");
        assert_eq!(strip_counter("hearth-6.12+deb13-cloud.efi"), "hearth-6.12+deb13-cloud.efi");
    }

    #[test]
    fn counters_and_versions_of_entries() {
        assert!(entry_has_counter("hearth_2.0+3.efi"));
        assert!(entry_has_counter("hearth_2.0+0-3.efi"));
        assert!(!entry_has_counter("hearth_2.0.efi"));
        assert!(!entry_has_counter("hearth_2.0+x.efi"));
        assert_eq!(entry_version("hearth_2.0+1-2.efi"), Some("2.0".parse().expect("test value")));
        assert_eq!(entry_version("other.efi"), None);
    }

    #[test]
    fn roothash_uuids_split_the_hash() {
        let h = "00112233445566778899aabbccddeeff0123456789abcdef0123456789ABCDEF";
        let (a, b) = uuids_from_roothash(h).expect("test value");
        assert_eq!(a, "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(b, "01234567-89ab-cdef-0123-456789abcdef");
        assert!(uuids_from_roothash("zz").is_none());
        assert_eq!(cmdline_roothash("ro roothash=ABcd quiet").as_deref(), Some("abcd"));
    }

    #[test]
    fn efi_strings_decode() {
        let mut raw = vec![6, 0, 0, 0];
        for u in "hearth_1.efi".encode_utf16().chain([0]) {
            raw.extend(u.to_le_bytes());
        }
        assert_eq!(decode_efi_string(&raw).as_deref(), Some("hearth_1.efi"));
    }

    #[test]
    fn sfdisk_json_pairs_slots() {
        let json = format!(
            r#"{{"partitiontable":{{"sectorsize":512,"partitions":[
            {{"node":"/dev/vda1","size":1024,"type":"C12A7328-F81F-11D2-BA4B-00A0C93EC93B","uuid":"x","name":"ESP"}},
            {{"node":"/dev/vda2","size":4096,"type":"{ROOT_TYPE}","uuid":"AA","name":"hearth_1.0"}},
            {{"node":"/dev/vda3","size":64,"type":"{VERITY_TYPE}","uuid":"BB","name":"hearth_1.0_verity"}},
            {{"node":"/dev/vda4","size":4096,"type":"{ROOT_TYPE}","uuid":"CC","name":"_empty"}},
            {{"node":"/dev/vda5","size":64,"type":"{VERITY_TYPE}","uuid":"DD","name":"_empty"}}]}}}}"#
        );
        let slots = parse_sfdisk(Path::new("/dev/vda"), &json).expect("test value");
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[0].root.number, 2);
        assert_eq!(slots[0].version(), Some("1.0".parse().expect("test value")));
        assert_eq!(slots[1].verity.node, PathBuf::from("/dev/vda5"));
        assert_eq!(slots[1].root.size, 4096 * 512);
        let bad = parse_sfdisk(Path::new("/dev/vda"), r#"{"partitiontable":{"partitions":[]}}"#);
        assert!(bad.expect_err("must fail").to_string().contains("expected 2 root"));
    }
}
