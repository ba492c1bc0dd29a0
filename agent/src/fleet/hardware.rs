//! Hardware identity: DMI product UUID and board serial. Real nodes read
//! `/sys/class/dmi/id/{product_uuid,board_serial}` ([`SysfsDmi`]); a simulated node derives them
//! from its simulator seed ([`SimDmi`]), so each local agent is a distinct machine.

use std::path::PathBuf;

/// Why the identity could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}")]
pub struct DmiError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// DMI product UUID and board serial.
pub trait Dmi: Send + Sync + std::fmt::Debug {
    /// `(product_uuid, board_serial)`.
    fn identity(&self) -> Result<(String, String), DmiError>;
}

/// Reads sysfs.
#[derive(Debug, Clone)]
pub struct SysfsDmi {
    /// `/sys/class/dmi/id`.
    pub dir: PathBuf,
}

impl Default for SysfsDmi {
    fn default() -> Self {
        Self { dir: PathBuf::from("/sys/class/dmi/id") }
    }
}

impl Dmi for SysfsDmi {
    fn identity(&self) -> Result<(String, String), DmiError> {
        let read = |f: &str| {
            let path = self.dir.join(f);
            std::fs::read_to_string(&path)
                .map(|s| s.trim().to_lowercase())
                .map_err(|source| DmiError { path, source })
        };
        let serial = read("board_serial")?;
        Ok((read("product_uuid")?, serial.to_uppercase()))
    }
}

/// A simulated machine's identity, from the simulator seed.
#[derive(Debug, Clone, Copy)]
pub struct SimDmi {
    /// `sim.seed`.
    pub seed: u64,
}

impl Dmi for SimDmi {
    fn identity(&self) -> Result<(String, String), DmiError> {
        let s = self.seed;
        Ok((
            format!("5a4e0000-{:04x}-4000-8000-{:012x}", (s >> 48) & 0xffff, s & 0xffff_ffff_ffff),
            format!("SIM{s:09}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_is_read_and_sim_seeds_differ() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("product_uuid"), "4C4C4544-0042-3510-8056-B4C04F4E4E32\n")?;
        std::fs::write(dir.path().join("board_serial"), ".7P2NNN2.CN1296.\n")?;
        let (u, s) = SysfsDmi { dir: dir.path().to_path_buf() }.identity()?;
        assert_eq!(u, "4c4c4544-0042-3510-8056-b4c04f4e4e32");
        assert_eq!(s, ".7P2NNN2.CN1296.");
        assert!(SysfsDmi { dir: dir.path().join("x") }.identity().is_err());
        assert_ne!(SimDmi { seed: 1 }.identity()?, SimDmi { seed: 2 }.identity()?);
        assert_eq!(SimDmi { seed: 3 }.identity()?, SimDmi { seed: 3 }.identity()?);
        Ok(())
    }
}
