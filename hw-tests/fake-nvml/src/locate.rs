//! Finding the built `libhearth_fake_nvml.so` from a test executable.
//!
//! Cargo builds the cdylib whenever it builds this package's integration tests (they depend on
//! the library target, all of whose crate types are built), and puts it in `target/<profile>/`
//! (and `target/<profile>/deps/`); test executables live in `target/<profile>/deps/`.

use std::path::PathBuf;

use crate::{ENV_LIBRARY, LIBRARY_FILE_NAME};

/// The fake library: `$HEARTH_FAKE_NVML_LIB` if set, else next to the running executable
/// (`deps/`) or one directory up (`target/<profile>/`). The error says how to build it.
pub fn library() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(ENV_LIBRARY).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{ENV_LIBRARY}={} does not exist", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the test binary: {e}"))?;
    let mut tried = Vec::new();
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(LIBRARY_FILE_NAME);
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
        dir = d.parent();
    }
    Err(format!(
        "{LIBRARY_FILE_NAME} not found (looked at {}); build it with \
         `cargo build -p hearth-fake-nvml` (cargo test / cargo nextest on the hearth-fake-nvml \
         package build it too) or set {ENV_LIBRARY}",
        tried.join(", ")
    ))
}
