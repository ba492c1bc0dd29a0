//! Persisted state that survives a crash or a power cut: one file per state machine, written by
//! write-then-rename and carrying a generation number (Bottlerocket's signpost idea).
//!
//! [`write_atomic`] writes a temporary file beside the target, fsyncs it, renames it over the
//! target and fsyncs the directory, so a reader (or the next boot) sees either the old or the new
//! content, never a torn one. [`Store`] wraps a typed JSON document `{ "generation": N, "state": … }`
//! whose generation rises by one on every save; a file from the future (a newer agent's format)
//! or a corrupt one is reported, not silently replaced.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Why persisted state could not be read or written. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A filesystem call failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done (`write`, `rename`, `read`, …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not a valid document of this kind.
    #[error("{path} is corrupt")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PersistError + 'a {
    move |source| PersistError::Io { op, path: path.to_path_buf(), source }
}

/// Create `dir` (and its parents) owner-only (0700) if it does not exist.
pub fn ensure_dir(dir: &Path) -> Result<(), PersistError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("create", dir))
}

/// Replace `path` with `bytes` atomically and durably (mode 0600): temp file, fsync, rename, fsync
/// of the directory. The directory must exist.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io("rename", path))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync", dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A typed state document with a generation number, at one path.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Document<T> {
    generation: u64,
    state: T,
}

/// A loaded document: its generation and its state.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<T> {
    /// Rises by one on every save; 0 for a state never saved.
    pub generation: u64,
    /// The state.
    pub state: T,
}

impl Store {
    /// The store at `path` (nothing is read yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read the document; `Ok(None)` when the file does not exist.
    pub fn load<T: DeserializeOwned>(&self) -> Result<Option<Loaded<T>>, PersistError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &self.path)(e)),
        };
        let doc: Document<T> = serde_json::from_slice(&bytes)
            .map_err(|source| PersistError::Corrupt { path: self.path.clone(), source })?;
        Ok(Some(Loaded { generation: doc.generation, state: doc.state }))
    }

    /// Write `state` as generation `generation` (the caller's previous generation + 1).
    pub fn save<T: Serialize>(&self, generation: u64, state: &T) -> Result<(), PersistError> {
        let doc = Document { generation, state };
        let bytes = serde_json::to_vec_pretty(&doc)
            .map_err(|source| PersistError::Corrupt { path: self.path.clone(), source })?;
        write_atomic(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        budget_w: Option<u32>,
    }

    #[test]
    fn save_then_load_round_trips_with_generation() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::new(dir.path().join("power.json"));
        assert_eq!(store.load::<S>()?, None);
        store.save(1, &S { budget_w: Some(4000) })?;
        store.save(2, &S { budget_w: None })?;
        let loaded = store.load::<S>()?.ok_or("missing")?;
        assert_eq!(loaded, Loaded { generation: 2, state: S { budget_w: None } });
        // No temporary file is left beside it.
        assert_eq!(fs::read_dir(dir.path())?.count(), 1);
        Ok(())
    }

    #[test]
    fn corrupt_file_is_reported_with_its_path() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("x.json");
        fs::write(&path, b"{\"generation\": 1, \"sta")?;
        let err = Store::new(&path).load::<S>().err().ok_or("accepted a torn file")?;
        assert!(matches!(err, PersistError::Corrupt { .. }));
        assert!(err.to_string().contains("x.json"), "{err}");
        Ok(())
    }

    #[test]
    fn written_file_is_owner_only() -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let sub = dir.path().join("state");
        ensure_dir(&sub)?;
        let path = sub.join("f");
        write_atomic(&path, b"x")?;
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&sub)?.permissions().mode() & 0o777, 0o700);
        Ok(())
    }
}
