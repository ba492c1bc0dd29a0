//! Fakes of the update's touchpoints (`crate::update::platform`), in memory: a two-slot GPT disk
//! with a write counter, an ESP directory with an operation log, a boot loader whose booted
//! slot and entry the test sets, and a rebooter that counts.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use sha2::{Digest, Sha256};

use crate::fleet::reboot::{RebootError, Rebooter};
use crate::update::platform::{self, BootControl, PlatformError, Slot, SlotPartition, copy_hashed};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A fake two-slot disk: partitions 2/3 (slot A) and 4/5 (slot B), each a byte vector.
#[derive(Debug)]
pub struct GptSlotDisk {
    parts: Mutex<BTreeMap<u32, (SlotPartition, Vec<u8>)>>,
    writes: AtomicU32,
    relabels: AtomicU32,
}

impl GptSlotDisk {
    /// Slot A labelled `hearth_<version>` with the UUIDs `roothash` gives, slot B `_empty`;
    /// each partition `size` bytes.
    pub fn new(version: &str, roothash: &str, size: u64) -> Self {
        let (ru, vu) = platform::uuids_from_roothash(roothash).unwrap_or_default();
        let mk = |n: u32, label: &str, uuid: &str| {
            (
                n,
                (
                    SlotPartition {
                        number: n,
                        node: format!("/dev/fake{n}").into(),
                        label: label.to_string(),
                        uuid: uuid.to_string(),
                        size,
                    },
                    Vec::new(),
                ),
            )
        };
        let parts = [
            mk(2, &format!("hearth_{version}"), &ru),
            mk(3, &format!("hearth_{version}_verity"), &vu),
            mk(4, platform::EMPTY_LABEL, "00000000-0000-0000-0000-000000000004"),
            mk(5, platform::EMPTY_LABEL, "00000000-0000-0000-0000-000000000005"),
        ];
        Self {
            parts: Mutex::new(parts.into_iter().collect()),
            writes: AtomicU32::new(0),
            relabels: AtomicU32::new(0),
        }
    }

    /// Partition writes so far.
    pub fn writes(&self) -> u32 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Label or UUID changes so far.
    pub fn relabels(&self) -> u32 {
        self.relabels.load(Ordering::SeqCst)
    }

    /// SHA-256 (hex) of a partition's content.
    pub fn content_hash(&self, number: u32) -> String {
        let parts = lock(&self.parts);
        hex::encode(Sha256::digest(parts.get(&number).map(|p| p.1.as_slice()).unwrap_or(&[])))
    }

    /// A partition's content.
    pub fn content(&self, number: u32) -> Vec<u8> {
        lock(&self.parts).get(&number).map(|p| p.1.clone()).unwrap_or_default()
    }
}

impl platform::SlotDisk for GptSlotDisk {
    fn slots(&self) -> Result<Vec<Slot>, PlatformError> {
        let parts = lock(&self.parts);
        let get = |n: u32| parts.get(&n).map(|p| p.0.clone());
        match (get(2), get(3), get(4), get(5)) {
            (Some(a), Some(av), Some(b), Some(bv)) => {
                Ok(vec![Slot { root: a, verity: av }, Slot { root: b, verity: bv }])
            }
            _ => Err(PlatformError::Layout { disk: "/dev/fake".into(), problem: "missing".into() }),
        }
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
        self.writes.fetch_add(1, Ordering::SeqCst);
        let mut buf = Vec::new();
        let hash = copy_hashed(src, &mut buf, len, &part.node, progress)?;
        if let Some(p) = lock(&self.parts).get_mut(&part.number) {
            p.1 = buf;
        }
        Ok(hash)
    }

    fn set_identity(
        &self,
        part: &SlotPartition,
        label: &str,
        uuid: Option<&str>,
    ) -> Result<(), PlatformError> {
        self.relabels.fetch_add(1, Ordering::SeqCst);
        if let Some(p) = lock(&self.parts).get_mut(&part.number) {
            p.0.label = label.to_string();
            if let Some(u) = uuid {
                p.0.uuid = u.to_string();
            }
        }
        Ok(())
    }
}

/// A fake ESP: entries in memory, every operation logged.
#[derive(Debug, Default)]
pub struct DirEsp {
    entries: Mutex<BTreeMap<String, Vec<u8>>>,
    log: Mutex<Vec<String>>,
}

impl DirEsp {
    /// An ESP holding `entries` (names; empty content).
    pub fn with_entries(entries: &[&str]) -> Self {
        let esp = Self::default();
        for e in entries {
            lock(&esp.entries).insert((*e).to_string(), Vec::new());
        }
        esp
    }

    /// Operations so far (`install NAME`, `remove NAME`, `rename A B`).
    pub fn log(&self) -> Vec<String> {
        lock(&self.log).clone()
    }

    /// An entry's content.
    pub fn content(&self, name: &str) -> Option<Vec<u8>> {
        lock(&self.entries).get(name).cloned()
    }
}

impl platform::Esp for DirEsp {
    fn entries(&self) -> Result<Vec<String>, PlatformError> {
        Ok(lock(&self.entries).keys().cloned().collect())
    }

    fn install(&self, name: &str, src: &Path) -> Result<(), PlatformError> {
        let b = std::fs::read(src).map_err(|source| PlatformError::Io {
            op: "read",
            path: src.to_path_buf(),
            source,
        })?;
        lock(&self.entries).insert(name.to_string(), b);
        lock(&self.log).push(format!("install {name}"));
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), PlatformError> {
        lock(&self.entries).remove(name);
        lock(&self.log).push(format!("remove {name}"));
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), PlatformError> {
        let mut e = lock(&self.entries);
        if let Some(b) = e.remove(from) {
            e.insert(to.to_string(), b);
        }
        lock(&self.log).push(format!("rename {from} {to}"));
        Ok(())
    }
}

/// A fake boot loader: the test sets the booted roothash and entry.
#[derive(Debug, Default)]
pub struct SystemdBoot {
    roothash: Mutex<Option<String>>,
    entry: Mutex<Option<String>>,
    bad_marks: AtomicU32,
}

impl SystemdBoot {
    /// Booted with `roothash` from `entry`.
    pub fn new(roothash: &str, entry: &str) -> Self {
        let b = Self::default();
        b.boot(roothash, entry);
        b
    }

    /// Simulate a boot.
    pub fn boot(&self, roothash: &str, entry: &str) {
        *lock(&self.roothash) = Some(roothash.to_string());
        *lock(&self.entry) = Some(entry.to_string());
    }

    /// How often the booted entry was marked bad.
    pub fn bad_marks(&self) -> u32 {
        self.bad_marks.load(Ordering::SeqCst)
    }
}

impl BootControl for SystemdBoot {
    fn roothash(&self) -> Result<Option<String>, PlatformError> {
        Ok(lock(&self.roothash).clone())
    }

    fn booted_entry(&self) -> Result<Option<String>, PlatformError> {
        Ok(lock(&self.entry).clone())
    }

    fn mark_bad(&self) -> Result<(), PlatformError> {
        self.bad_marks.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A rebooter that counts.
#[derive(Debug, Default)]
pub struct SystemctlReboot {
    count: AtomicU32,
}

impl SystemctlReboot {
    /// Reboots asked for.
    pub fn count(&self) -> u32 {
        self.count.load(Ordering::SeqCst)
    }
}

impl Rebooter for SystemctlReboot {
    fn reboot(&self) -> Result<(), RebootError> {
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
