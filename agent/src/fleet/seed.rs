//! Seed discovery: the first source that has a seed wins, in this order:
//!
//! 1. `/etc/hearth/seed.toml` ([`SeedFile`]);
//! 2. `seed.toml` on a vfat partition labelled `HEARTH-SEED` ([`VfatSeed`], mounted read-only);
//! 3. the systemd credential `hearth.seed` in `$CREDENTIALS_DIRECTORY` ([`CredentialSeed`]; QEMU
//!    `-smbios type=11,value=io.systemd.credential.binary:hearth.seed=…` and PXE pass it);
//! 4. base64 in `hearth.seed=` on the kernel command line ([`CmdlineSeed`]).
//!
//! `fleet.seed` in the agent's configuration replaces the search with one file (local runs).
//! A found but invalid seed is an error naming its source, not a reason to try the next one.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use hearth_fleet_client::seed::{Seed, SeedError};

/// Why a seed source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Mounting the seed partition failed.
    #[error("cannot mount {device} read-only: {message}")]
    Mount {
        /// The device.
        device: PathBuf,
        /// What mount said.
        message: String,
    },
    /// The kernel command line value is not base64.
    #[error("hearth.seed= on {path} is not base64")]
    Base64 {
        /// The command line file.
        path: PathBuf,
        /// Why.
        #[source]
        source: base64::DecodeError,
    },
    /// The seed is invalid.
    #[error(transparent)]
    Invalid(#[from] SeedError),
    /// The seed's `[network]` table is invalid (the same check `render-network` makes at boot).
    #[error(transparent)]
    Network(#[from] crate::netconfig::NetConfigError),
}

/// One place a seed may be.
pub trait SeedSource: Send + Sync + fmt::Debug {
    /// Where, for messages.
    fn origin(&self) -> String;
    /// The seed text, `None` when this source has none.
    fn read(&self) -> Result<Option<String>, SourceError>;
}

fn read_if_exists(path: &Path) -> Result<Option<String>, SourceError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SourceError::Read { path: path.to_path_buf(), source }),
    }
}

/// A seed file at a path.
#[derive(Debug, Clone)]
pub struct SeedFile(pub PathBuf);

impl SeedSource for SeedFile {
    fn origin(&self) -> String {
        self.0.display().to_string()
    }
    fn read(&self) -> Result<Option<String>, SourceError> {
        read_if_exists(&self.0)
    }
}

/// `seed.toml` on the vfat partition labelled `HEARTH-SEED`.
#[derive(Debug, Clone)]
pub struct VfatSeed {
    /// `/dev/disk/by-label/HEARTH-SEED`.
    pub device: PathBuf,
    /// An empty directory to mount it on.
    pub mountpoint: PathBuf,
}

impl SeedSource for VfatSeed {
    fn origin(&self) -> String {
        format!("seed.toml on {}", self.device.display())
    }
    fn read(&self) -> Result<Option<String>, SourceError> {
        if !self.device.exists() {
            return Ok(None);
        }
        let mount_err =
            |message: String| SourceError::Mount { device: self.device.clone(), message };
        std::fs::create_dir_all(&self.mountpoint)
            .map_err(|e| mount_err(format!("cannot create {}: {e}", self.mountpoint.display())))?;
        let out = std::process::Command::new("mount")
            .args(["-t", "vfat", "-o", "ro,nosuid,nodev,noexec"])
            .arg(&self.device)
            .arg(&self.mountpoint)
            .output()
            .map_err(|e| mount_err(e.to_string()))?;
        if !out.status.success() {
            return Err(mount_err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        let text = read_if_exists(&self.mountpoint.join("seed.toml"));
        let _ = std::process::Command::new("umount").arg(&self.mountpoint).status();
        text
    }
}

/// The systemd credential `hearth.seed`.
#[derive(Debug, Clone)]
pub struct CredentialSeed {
    /// `$CREDENTIALS_DIRECTORY`, if set.
    pub dir: Option<PathBuf>,
}

impl SeedSource for CredentialSeed {
    fn origin(&self) -> String {
        "systemd credential hearth.seed".into()
    }
    fn read(&self) -> Result<Option<String>, SourceError> {
        match &self.dir {
            Some(d) => read_if_exists(&d.join("hearth.seed")),
            None => Ok(None),
        }
    }
}

/// `hearth.seed=BASE64` on the kernel command line.
#[derive(Debug, Clone)]
pub struct CmdlineSeed(pub PathBuf);

/// The seed text in a kernel command line, if any.
pub fn seed_from_cmdline(cmdline: &str, path: &Path) -> Result<Option<String>, SourceError> {
    let Some(b64) = cmdline.split_whitespace().find_map(|w| w.strip_prefix("hearth.seed=")) else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .or_else(|_| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64.trim_end_matches('='))
        })
        .map_err(|source| SourceError::Base64 { path: path.to_path_buf(), source })?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

impl SeedSource for CmdlineSeed {
    fn origin(&self) -> String {
        format!("hearth.seed= on {}", self.0.display())
    }
    fn read(&self) -> Result<Option<String>, SourceError> {
        match read_if_exists(&self.0)? {
            Some(c) => seed_from_cmdline(&c, &self.0),
            None => Ok(None),
        }
    }
}

/// The real sources in order, or just `override_path` when configured.
pub fn sources(override_path: Option<&Path>, state_dir: &Path) -> Vec<Box<dyn SeedSource>> {
    if let Some(p) = override_path {
        return vec![Box::new(SeedFile(p.to_path_buf()))];
    }
    vec![
        Box::new(SeedFile(PathBuf::from("/etc/hearth/seed.toml"))),
        Box::new(VfatSeed {
            device: PathBuf::from("/dev/disk/by-label/HEARTH-SEED"),
            mountpoint: state_dir.join("seed-mnt"),
        }),
        Box::new(CredentialSeed {
            dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        }),
        Box::new(CmdlineSeed(PathBuf::from("/proc/cmdline"))),
    ]
}

/// The first seed found, with its origin.
pub fn discover(sources: &[Box<dyn SeedSource>]) -> Result<Option<(Seed, String)>, SourceError> {
    for s in sources {
        let read = match s.read() {
            // A seed partition that cannot be mounted (e.g. inside the agent's sandbox, where
            // hearth-seed.service has already copied its seed to the credential) does not hide
            // the sources after it.
            Err(e @ SourceError::Mount { .. }) => {
                tracing::warn!(source = %s.origin(), error = %e, "seed source unreadable: trying the next");
                continue;
            }
            other => other?,
        };
        if let Some(text) = read {
            let origin = s.origin();
            let seed = Seed::parse(&text, &origin)?;
            crate::netconfig::NetworkSettings::parse_seed(&text, Path::new(&origin))?;
            return Ok(Some((seed, origin)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::fleet::FakeSeedSource;

    fn seed_text(token: &str) -> String {
        format!(
            "[fleet]\nurl = \"https://10.0.2.2:7443\"\nname = \"hearth-fleet\"\nca_sha256 = \"{}\"\ntoken = \"{token}\"\n",
            "0f".repeat(32)
        )
    }

    #[test]
    fn first_source_with_a_seed_wins() -> Result<(), SourceError> {
        let sources: Vec<Box<dyn SeedSource>> = vec![
            Box::new(FakeSeedSource::new("etc", None)),
            Box::new(FakeSeedSource::new("vfat", Some(seed_text("from-vfat")))),
            Box::new(FakeSeedSource::new("credential", Some(seed_text("from-cred")))),
        ];
        let (seed, origin) = discover(&sources)?
            .ok_or(SourceError::Mount { device: "none".into(), message: "no seed".into() })?;
        assert_eq!((seed.fleet.token.as_str(), origin.as_str()), ("from-vfat", "vfat"));
        let none: Vec<Box<dyn SeedSource>> = vec![Box::new(FakeSeedSource::new("etc", None))];
        assert!(discover(&none)?.is_none());
        Ok(())
    }

    #[test]
    fn an_invalid_seed_is_an_error_naming_its_source() {
        let sources: Vec<Box<dyn SeedSource>> = vec![
            Box::new(FakeSeedSource::new("credential", Some("[fleet]\nurl = 3\n".into()))),
            Box::new(FakeSeedSource::new("cmdline", Some(seed_text("t")))),
        ];
        let e = discover(&sources).err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("seed from credential is invalid"));
    }

    #[derive(Debug)]
    struct Unmountable;
    impl SeedSource for Unmountable {
        fn origin(&self) -> String {
            "seed.toml on /dev/disk/by-label/HEARTH-SEED".into()
        }
        fn read(&self) -> Result<Option<String>, SourceError> {
            Err(SourceError::Mount {
                device: "/dev/sda5".into(),
                message: "permission denied".into(),
            })
        }
    }

    #[test]
    fn an_unmountable_seed_partition_does_not_hide_the_credential() -> Result<(), SourceError> {
        let sources: Vec<Box<dyn SeedSource>> = vec![
            Box::new(Unmountable),
            Box::new(FakeSeedSource::new("credential", Some(seed_text("from-cred")))),
        ];
        let (seed, origin) = discover(&sources)?
            .ok_or(SourceError::Mount { device: "none".into(), message: "no seed".into() })?;
        assert_eq!((seed.fleet.token.as_str(), origin.as_str()), ("from-cred", "credential"));
        Ok(())
    }

    #[test]
    fn an_invalid_network_table_is_refused_naming_the_key() {
        let text = format!("{}[network]\nmtu = 5\n", seed_text("t"));
        let sources: Vec<Box<dyn SeedSource>> =
            vec![Box::new(FakeSeedSource::new("credential", Some(text)))];
        let e = discover(&sources).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("network.mtu"), "{e}");
    }

    #[test]
    fn kernel_cmdline_carries_base64() -> Result<(), SourceError> {
        let text = seed_text("cmd");
        let b64 = base64::engine::general_purpose::STANDARD.encode(&text);
        let line = format!("BOOT_IMAGE=/vmlinuz ro quiet hearth.seed={b64} console=ttyS0\n");
        assert_eq!(seed_from_cmdline(&line, Path::new("/proc/cmdline"))?, Some(text));
        assert_eq!(seed_from_cmdline("ro quiet", Path::new("/proc/cmdline"))?, None);
        assert!(matches!(
            seed_from_cmdline("hearth.seed=!!!", Path::new("/proc/cmdline")),
            Err(SourceError::Base64 { .. })
        ));
        Ok(())
    }

    #[test]
    fn credential_and_file_sources_read_their_paths() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("hearth.seed"), seed_text("cred"))?;
        let c = CredentialSeed { dir: Some(dir.path().to_path_buf()) };
        assert!(c.read()?.is_some_and(|t| t.contains("cred")));
        assert_eq!(CredentialSeed { dir: None }.read()?, None);
        assert_eq!(SeedFile(dir.path().join("absent.toml")).read()?, None);
        let v = VfatSeed {
            device: dir.path().join("no-such-device"),
            mountpoint: dir.path().join("m"),
        };
        assert_eq!(v.read()?, None);
        Ok(())
    }
}
