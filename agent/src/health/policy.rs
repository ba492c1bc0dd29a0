//! The health policy file (TOML): thresholds, XID overrides, reset and host-check settings.
//!
//! Every key is optional; [`Policy::default`] is the policy the agent runs without a file. An
//! unknown key, a wrong type or an out-of-range value is refused with an error that names the
//! file and the key (`docs/0003-health.md` lists every key).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hearth_proto::api::HealthAction;
use serde::Deserialize;

/// The whole policy.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// `[xid]`: overrides of the XID action table.
    #[serde(default)]
    pub xid: XidPolicy,
    /// `[memory]`: ECC and HBM thresholds.
    #[serde(default)]
    pub memory: MemoryPolicy,
    /// `[interconnect]`: PCIe and NVLink thresholds.
    #[serde(default)]
    pub interconnect: InterconnectPolicy,
    /// `[thermal]`: thermal margins.
    #[serde(default)]
    pub thermal: ThermalPolicy,
    /// `[reset]`: GPU reset and recurrence.
    #[serde(default)]
    pub reset: ResetPolicy,
    /// `[host]`: host checks.
    #[serde(default)]
    pub host: HostPolicy,
    /// `[diag]`: active diagnostics.
    #[serde(default)]
    pub diag: DiagPolicy,
}

/// `[xid]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XidPolicy {
    /// XID number (as a string key) to action, replacing the built-in table's entry:
    /// `overrides = { "13" = "watch", "31" = "quarantine" }`. Actions: `none`, `watch`,
    /// `reset_when_idle`, `quarantine`, `quarantine_rma`, `reboot`.
    #[serde(default)]
    pub overrides: BTreeMap<String, HealthAction>,
}

/// `[memory]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryPolicy {
    /// More corrected (single-bit) ECC errors than this within one minute degrade the GPU.
    /// Default 10.
    #[serde(default = "d_sbe_per_min")]
    pub sbe_per_min: u64,
    /// Degrade when the HBM temperature is within this many °C of its maximum. Default 5.
    #[serde(default = "d_margin")]
    pub temp_margin_c: u32,
}

impl Default for MemoryPolicy {
    fn default() -> Self {
        Self { sbe_per_min: d_sbe_per_min(), temp_margin_c: d_margin() }
    }
}

/// `[interconnect]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterconnectPolicy {
    /// More PCIe replays than this within one minute degrade the GPU. Default 10.
    #[serde(default = "d_replay_per_min")]
    pub pcie_replay_per_min: u64,
    /// More NVLink errors (all links, all counters) than this within one minute degrade the
    /// GPU. Default 10.
    #[serde(default = "d_replay_per_min")]
    pub nvlink_errors_per_min: u64,
    /// A PCIe link below its maximum generation or width degrades the GPU. Default true.
    #[serde(default = "d_true")]
    pub pcie_downtrain: bool,
}

impl Default for InterconnectPolicy {
    fn default() -> Self {
        Self {
            pcie_replay_per_min: d_replay_per_min(),
            nvlink_errors_per_min: d_replay_per_min(),
            pcie_downtrain: true,
        }
    }
}

/// `[thermal]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThermalPolicy {
    /// Degrade when the core is within this many °C of the HW slowdown temperature. Default 5.
    #[serde(default = "d_margin")]
    pub slowdown_margin_c: u32,
}

impl Default for ThermalPolicy {
    fn default() -> Self {
        Self { slowdown_margin_c: d_margin() }
    }
}

/// `[reset]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetPolicy {
    /// After this many faults that needed a reset (within `recurrence_window_h`), the GPU stays
    /// quarantined with an RMA hint (1..=100). Default 3.
    #[serde(default = "d_recurrences")]
    pub max_recurrences: u32,
    /// A GPU that served clean this many hours forgets its earlier faults (1..=8760). Default 24.
    #[serde(default = "d_window_h")]
    pub recurrence_window_h: u64,
    /// The reset command, `{gpu}` replaced by the NVML index. Default
    /// `["nvidia-smi", "-r", "-i", "{gpu}"]`.
    #[serde(default = "d_reset_command")]
    pub command: Vec<String>,
    /// Seconds the reset command may run (1..=600). Default 60.
    #[serde(default = "d_reset_timeout")]
    pub timeout_s: u64,
}

impl Default for ResetPolicy {
    fn default() -> Self {
        Self {
            max_recurrences: d_recurrences(),
            recurrence_window_h: d_window_h(),
            command: d_reset_command(),
            timeout_s: d_reset_timeout(),
        }
    }
}

/// `[host]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPolicy {
    /// Seconds between two rounds of host checks (1..=3600). Default 5.
    #[serde(default = "d_host_interval")]
    pub interval_s: u64,
    /// Filesystems to watch (mount points). Default `["/"]`; the state directory is always
    /// watched too.
    #[serde(default = "d_filesystems")]
    pub filesystems: Vec<PathBuf>,
    /// Degrade a filesystem with less free space than this percentage (0..=100). Default 5.
    #[serde(default = "d_min_free")]
    pub min_free_pct: u32,
    /// Degrade when memory EDAC counts more corrected errors than this since start. Default 100.
    #[serde(default = "d_edac_ce")]
    pub edac_ce_max: u64,
    /// Degrade when the kernel's clock error estimate exceeds this, ms. Default 500.
    #[serde(default = "d_clock_error")]
    pub clock_max_error_ms: u64,
    /// Seconds a fleet reachability probe may take (1..=60). Default 5.
    #[serde(default = "d_reach_timeout")]
    pub reach_timeout_s: u64,
}

impl Default for HostPolicy {
    fn default() -> Self {
        Self {
            interval_s: d_host_interval(),
            filesystems: d_filesystems(),
            min_free_pct: d_min_free(),
            edac_ce_max: d_edac_ce(),
            clock_max_error_ms: d_clock_error(),
            reach_timeout_s: d_reach_timeout(),
        }
    }
}

/// `[diag]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiagPolicy {
    /// The DCGM CLI. Default `dcgmi`.
    #[serde(default = "d_dcgmi")]
    pub dcgmi: String,
    /// A burn-in command run instead of `dcgmi diag` when set, `{gpu}` replaced by the NVML
    /// index; exit status 0 passes.
    #[serde(default)]
    pub burn_in_command: Option<Vec<String>>,
    /// Seconds a diagnostic may run (1..=7200). Default 1800 (`dcgmi diag -r 3` takes ~15 min).
    #[serde(default = "d_diag_timeout")]
    pub timeout_s: u64,
}

impl Default for DiagPolicy {
    fn default() -> Self {
        Self { dcgmi: d_dcgmi(), burn_in_command: None, timeout_s: d_diag_timeout() }
    }
}

fn d_sbe_per_min() -> u64 {
    10
}
fn d_margin() -> u32 {
    5
}
fn d_replay_per_min() -> u64 {
    10
}
fn d_true() -> bool {
    true
}
fn d_recurrences() -> u32 {
    3
}
fn d_window_h() -> u64 {
    24
}
fn d_reset_command() -> Vec<String> {
    ["nvidia-smi", "-r", "-i", "{gpu}"].map(String::from).to_vec()
}
fn d_reset_timeout() -> u64 {
    60
}
fn d_host_interval() -> u64 {
    5
}
fn d_filesystems() -> Vec<PathBuf> {
    // The system (on the image: the read-only erofs slot, healthy by design); the state
    // directory (the data partition) is always added.
    vec![PathBuf::from("/")]
}
fn d_min_free() -> u32 {
    5
}
fn d_edac_ce() -> u64 {
    100
}
fn d_clock_error() -> u64 {
    500
}
fn d_reach_timeout() -> u64 {
    5
}
fn d_dcgmi() -> String {
    "dcgmi".into()
}
fn d_diag_timeout() -> u64 {
    1800
}

/// A policy that cannot be used; each names the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file cannot be read.
    #[error("cannot read health policy {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Malformed TOML, an unknown key or a wrong type.
    #[error("health policy {path}: key `{key}`: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Dotted key path.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A value out of range.
    #[error("health policy {path}: key `{key}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted key path.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Policy {
    /// Read and validate a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PolicyError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parse and validate policy text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
        let de = toml::Deserializer::parse(text).map_err(|e| PolicyError::Parse {
            path: path.to_path_buf(),
            key: ".".into(),
            message: e.message().to_string(),
        })?;
        let policy: Policy =
            serde_path_to_error::deserialize(de).map_err(|e| PolicyError::Parse {
                path: path.to_path_buf(),
                key: e.path().to_string(),
                message: e.inner().message().to_string(),
            })?;
        policy.validate(path)?;
        Ok(policy)
    }

    fn validate(&self, path: &Path) -> Result<(), PolicyError> {
        let invalid = |key: String, message: String| PolicyError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        for k in self.xid.overrides.keys() {
            if k.parse::<u64>().is_err() {
                return Err(invalid(
                    format!("xid.overrides.{k}"),
                    format!("{k:?} is not an XID number"),
                ));
            }
        }
        let ranges: [(&str, u64, u64, u64); 6] = [
            ("reset.max_recurrences", u64::from(self.reset.max_recurrences), 1, 100),
            ("reset.recurrence_window_h", self.reset.recurrence_window_h, 1, 8760),
            ("reset.timeout_s", self.reset.timeout_s, 1, 600),
            ("host.interval_s", self.host.interval_s, 1, 3600),
            ("host.reach_timeout_s", self.host.reach_timeout_s, 1, 60),
            ("diag.timeout_s", self.diag.timeout_s, 1, 7200),
        ];
        for (key, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return Err(invalid(key.into(), format!("{v} is outside {lo}..={hi}")));
            }
        }
        if self.host.min_free_pct > 100 {
            return Err(invalid(
                "host.min_free_pct".into(),
                format!("{} is outside 0..=100", self.host.min_free_pct),
            ));
        }
        if self.reset.command.is_empty() {
            return Err(invalid("reset.command".into(), "is empty".into()));
        }
        if self.diag.burn_in_command.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid("diag.burn_in_command".into(), "is empty".into()));
        }
        if let Some(fs) = self.host.filesystems.iter().find(|p| !p.is_absolute()) {
            return Err(invalid(
                "host.filesystems".into(),
                format!("{} is not an absolute path", fs.display()),
            ));
        }
        Ok(())
    }

    /// The action for `xid`: the override, else the built-in table ([`super::xid::default_action`]).
    pub fn xid_action(&self, xid: u64) -> HealthAction {
        self.xid
            .overrides
            .get(&xid.to_string())
            .copied()
            .unwrap_or_else(|| super::xid::default_action(xid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, Path::new("/etc/hearth/health.toml"))
    }

    #[test]
    fn empty_file_is_the_default_policy() -> Result<(), PolicyError> {
        assert_eq!(parse("")?, Policy::default());
        Ok(())
    }

    #[test]
    fn overrides_replace_the_table() -> Result<(), PolicyError> {
        let p = parse("[xid]\noverrides = { \"13\" = \"quarantine\", \"48\" = \"watch\" }\n")?;
        assert_eq!(p.xid_action(13), HealthAction::Quarantine);
        assert_eq!(p.xid_action(48), HealthAction::Watch);
        assert_eq!(p.xid_action(79), HealthAction::Quarantine);
        Ok(())
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        for (text, key) in [
            ("[memory]\nsbe_per_minute = 3\n", "memory.sbe_per_minute"),
            ("[xid]\noverrides = { \"x1\" = \"watch\" }\n", "xid.overrides.x1"),
            ("[xid]\noverrides = { \"13\" = \"explode\" }\n", "xid.overrides.13"),
            ("[reset]\nmax_recurrences = 0\n", "reset.max_recurrences"),
            ("[reset]\ncommand = []\n", "reset.command"),
            ("[host]\nmin_free_pct = 101\n", "host.min_free_pct"),
            ("[host]\nfilesystems = [\"data\"]\n", "host.filesystems"),
            ("[diag]\ntimeout_s = 0\n", "diag.timeout_s"),
        ] {
            match parse(text) {
                Ok(p) => panic!("accepted {text:?}: {p:?}"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.contains(&format!("key `{key}`")), "{text}: {e}");
                    assert!(e.contains("/etc/hearth/health.toml"), "{e}");
                }
            }
        }
    }
}
