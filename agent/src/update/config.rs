//! `[update]`: where signed releases come from (`docs/0009-updates.md`, `docs/configuration.md`).

use std::path::PathBuf;

use serde::Deserialize;

/// Default path of the trusted TUF root shipped in the image.
pub const DEFAULT_ROOT: &str = "/usr/lib/hearth/update-root.json";

/// `[update]`: signed A/B updates.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// The trusted TUF root (`root.json` from `hearthctl release keys init`). Default
    /// `/usr/lib/hearth/update-root.json` (built into the image). A newer root signed by the
    /// old one replaces it in `state.dir/update/tuf`.
    #[serde(default = "default_root")]
    pub root: PathBuf,
    /// Base URL of the TUF metadata: `https://…` (the fleet serves it under `/v1/updates/`) or
    /// `file:///…` (a repository directory). Unset (default): updates are off.
    #[serde(default)]
    pub metadata_url: Option<String>,
    /// Base URL of the release files. Default: `targets/` under `metadata_url`.
    #[serde(default)]
    pub targets_url: Option<String>,
    /// The channel `hearth-agent update apply` installs from (`[a-z0-9-]`, 1..=32). Default
    /// `stable`. An update the fleet asks for comes from the channel the fleet's desired state
    /// names (`hearthctl channel NODE NAME`).
    #[serde(default = "default_channel")]
    pub channel: String,
    /// PEM file of the CA that signs the update server's certificate (the fleet CA). Unset
    /// (default): the platform's roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Mount point of the EFI system partition. Default `/efi`.
    #[serde(default = "default_esp")]
    pub esp: PathBuf,
    /// The disk holding the A/B slots. Unset (default): the disk of the booted root partition.
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// Seconds `hearth-agent update check` waits for the agent, the fleet session and GPU health
    /// before it falls back (10..=1800). Default 120.
    #[serde(default = "default_check_timeout_s")]
    pub check_timeout_s: u64,
    /// Largest accepted `root.json`, `timestamp.json` and `snapshot.json`, bytes
    /// (1024..=16777216); `targets.json` may be 10 times this. Default 1048576.
    #[serde(default = "default_max_metadata_bytes")]
    pub max_metadata_bytes: u64,
    /// Seconds one HTTP request may take (10..=86400). Default 3600.
    #[serde(default = "default_request_timeout_s")]
    pub request_timeout_s: u64,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            root: default_root(),
            metadata_url: None,
            targets_url: None,
            channel: default_channel(),
            ca: None,
            esp: default_esp(),
            disk: None,
            check_timeout_s: default_check_timeout_s(),
            max_metadata_bytes: default_max_metadata_bytes(),
            request_timeout_s: default_request_timeout_s(),
        }
    }
}

fn default_root() -> PathBuf {
    PathBuf::from(DEFAULT_ROOT)
}
fn default_channel() -> String {
    hearth_proto::fleet::DEFAULT_CHANNEL.to_string()
}
fn default_esp() -> PathBuf {
    PathBuf::from("/efi")
}
fn default_check_timeout_s() -> u64 {
    120
}
fn default_max_metadata_bytes() -> u64 {
    1 << 20
}
fn default_request_timeout_s() -> u64 {
    3600
}

impl UpdateConfig {
    /// Check every value; `Err((key, problem))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        hearth_fleet_client::release::check_channel(&self.channel)
            .map_err(|e| ("update.channel", e.to_string()))?;
        for (key, url) in
            [("update.metadata_url", &self.metadata_url), ("update.targets_url", &self.targets_url)]
        {
            if let Some(u) = url {
                let parsed = url::Url::parse(u).map_err(|e| (key, format!("{u:?}: {e}")))?;
                if !matches!(parsed.scheme(), "https" | "http" | "file") {
                    return Err((key, format!("{u:?}: scheme must be https, http or file")));
                }
            }
        }
        if self.targets_url.is_some() && self.metadata_url.is_none() {
            return Err(("update.targets_url", "set without update.metadata_url".into()));
        }
        if !(10..=1800).contains(&self.check_timeout_s) {
            return Err((
                "update.check_timeout_s",
                format!("{} is outside 10..=1800", self.check_timeout_s),
            ));
        }
        if !(1024..=16 << 20).contains(&self.max_metadata_bytes) {
            return Err((
                "update.max_metadata_bytes",
                format!("{} is outside 1024..=16777216", self.max_metadata_bytes),
            ));
        }
        if !(10..=86_400).contains(&self.request_timeout_s) {
            return Err((
                "update.request_timeout_s",
                format!("{} is outside 10..=86400", self.request_timeout_s),
            ));
        }
        Ok(())
    }

    /// The metadata and targets base URLs (each ending in `/`), or `None` when updates are off.
    pub fn urls(&self) -> Option<Result<(url::Url, url::Url), url::ParseError>> {
        let meta = self.metadata_url.as_ref()?;
        let slash = |s: &str| if s.ends_with('/') { s.to_string() } else { format!("{s}/") };
        Some((|| {
            let m = url::Url::parse(&slash(meta))?;
            let t = match &self.targets_url {
                Some(t) => url::Url::parse(&slash(t))?,
                None => m.join("targets/")?,
            };
            Ok((m, t))
        })())
    }

    /// TUF size limits from `max_metadata_bytes`.
    pub fn limits(&self) -> tough::Limits {
        tough::Limits {
            max_root_size: self.max_metadata_bytes,
            max_targets_size: self.max_metadata_bytes.saturating_mul(10),
            max_timestamp_size: self.max_metadata_bytes,
            max_snapshot_size: self.max_metadata_bytes,
            max_root_updates: 1024,
        }
    }
}
