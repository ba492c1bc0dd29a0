//! Scenario files: which GPUs a simulated node has, what they run, and timed faults.
//!
//! ```toml
//! seed = 7                 # every random draw (noise, limit delays) comes from it
//! ambient_c = 25.0         # inlet temperature
//!
//! [[gpu]]                  # one table per GPU, in index order
//! profile = "h100-sxm"
//! count = 8                # optional: this many identical GPUs
//! workload = "training"
//!
//! [[event]]                # timed events, simulated seconds from start
//! at_s = 30.0
//! gpu = 2
//! fault = "xid"
//! xid = 79
//!
//! [[event]]
//! at_s = 60.0
//! gpu = 0
//! workload = "idle"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fault::{Fault, Workload};

/// A whole scenario file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Seed of every random draw.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Inlet (ambient) temperature, °C.
    #[serde(default = "default_ambient")]
    pub ambient_c: f64,
    /// GPUs in index order.
    #[serde(rename = "gpu")]
    pub gpus: Vec<GpuSpec>,
    /// Timed events.
    #[serde(default, rename = "event")]
    pub events: Vec<TimedAction>,
    /// Background error rates of healthy hardware (`[background]`; all zero by default).
    #[serde(default)]
    pub background: Background,
}

/// `[background]`: error rates a healthy board shows anyway (cosmic-ray single-bit ECC
/// corrections, occasional PCIe and NVLink replays). Counted deterministically: a rate of
/// 2 per hour adds one error every 1800 simulated seconds; no random draw, so the physics'
/// random stream does not depend on them.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Background {
    /// Corrected (single-bit) ECC errors per GPU per hour (boards with ECC).
    #[serde(default)]
    pub sbe_per_hour: f64,
    /// PCIe replays per GPU per hour.
    #[serde(default)]
    pub pcie_replay_per_hour: f64,
    /// NVLink replays per link per hour (boards with NVLink).
    #[serde(default)]
    pub nvlink_replay_per_hour: f64,
}

fn default_seed() -> u64 {
    1
}

fn default_ambient() -> f64 {
    25.0
}

/// One `[[gpu]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// Built-in profile id (`h100-sxm`, `rtx4090-pcie`).
    pub profile: String,
    /// How many GPUs of this spec (default 1).
    #[serde(default = "default_count")]
    pub count: u32,
    /// Workload at start.
    #[serde(default)]
    pub workload: Workload,
}

fn default_count() -> u32 {
    1
}

/// One `[[event]]` table: at a time, on a GPU, a fault or a workload change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimedAction {
    /// Simulated seconds from start.
    pub at_s: f64,
    /// GPU index.
    pub gpu: u32,
    /// What happens.
    #[serde(flatten)]
    pub action: Action,
}

/// What a timed event does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Action {
    /// Inject a fault.
    Fault(Fault),
    /// Change the workload.
    Workload {
        /// The new workload.
        workload: Workload,
    },
}

/// A scenario that cannot be used. Each names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file cannot be read.
    #[error("cannot read scenario {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or a key is wrong.
    #[error("scenario {path}: key `{key}`: {message}")]
    Parse {
        /// The file (or `<inline>`).
        path: PathBuf,
        /// Dotted key path.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("scenario {path}: key `{key}`: {message}")]
    Invalid {
        /// The file (or `<inline>`).
        path: PathBuf,
        /// Dotted key path.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Scenario {
    /// A node of `n` GPUs of one profile running one workload, seed 1.
    pub fn uniform(profile: &str, n: u32, workload: Workload) -> Self {
        Self {
            seed: default_seed(),
            ambient_c: default_ambient(),
            gpus: vec![GpuSpec { profile: profile.to_string(), count: n, workload }],
            events: Vec::new(),
            background: Background::default(),
        }
    }

    /// Read and validate a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parse and validate scenario text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ScenarioError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ScenarioError::Parse {
            path: path.to_path_buf(),
            key: String::from("(document)"),
            message: e.message().to_string(),
        })?;
        let scenario: Scenario =
            serde_path_to_error::deserialize(de).map_err(|e| ScenarioError::Parse {
                path: path.to_path_buf(),
                key: e.path().to_string(),
                message: e.inner().message().to_string(),
            })?;
        scenario.validate(path)?;
        Ok(scenario)
    }

    /// Check ranges: known profiles, GPU indexes inside the node, finite times, sane ambient.
    pub fn validate(&self, path: &Path) -> Result<(), ScenarioError> {
        let invalid = |key: String, message: String| ScenarioError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        if !self.ambient_c.is_finite() || !(-20.0..=60.0).contains(&self.ambient_c) {
            return Err(invalid(
                "ambient_c".into(),
                format!("{} is outside -20..=60 °C", self.ambient_c),
            ));
        }
        let bg = self.background;
        for (key, v) in [
            ("background.sbe_per_hour", bg.sbe_per_hour),
            ("background.pcie_replay_per_hour", bg.pcie_replay_per_hour),
            ("background.nvlink_replay_per_hour", bg.nvlink_replay_per_hour),
        ] {
            if !v.is_finite() || !(0.0..=1e6).contains(&v) {
                return Err(invalid(key.into(), format!("{v} is outside 0..=1e6 per hour")));
            }
        }
        if self.gpus.is_empty() {
            return Err(invalid("gpu".into(), "a node needs at least one [[gpu]]".into()));
        }
        let mut total = 0u32;
        for (i, g) in self.gpus.iter().enumerate() {
            if crate::profile::GpuProfile::by_id(&g.profile).is_none() {
                let known: Vec<String> =
                    crate::profile::GpuProfile::builtin().into_iter().map(|p| p.id).collect();
                return Err(invalid(
                    format!("gpu[{i}].profile"),
                    format!("unknown profile {:?}; known: {}", g.profile, known.join(", ")),
                ));
            }
            if g.count == 0 || g.count > 64 {
                return Err(invalid(
                    format!("gpu[{i}].count"),
                    format!("{} is outside 1..=64", g.count),
                ));
            }
            total += g.count;
        }
        if total > 64 {
            return Err(invalid("gpu".into(), format!("{total} GPUs; at most 64")));
        }
        for (i, e) in self.events.iter().enumerate() {
            if !e.at_s.is_finite() || e.at_s < 0.0 {
                return Err(invalid(
                    format!("event[{i}].at_s"),
                    format!("{} is not a time >= 0", e.at_s),
                ));
            }
            if e.gpu >= total {
                return Err(invalid(
                    format!("event[{i}].gpu"),
                    format!("GPU {} does not exist (the node has {total})", e.gpu),
                ));
            }
        }
        Ok(())
    }

    /// Profiles and start workloads, expanded to one entry per GPU in index order.
    pub fn expanded(&self) -> Vec<(crate::profile::GpuProfile, Workload)> {
        let mut out = Vec::new();
        for g in &self.gpus {
            if let Some(p) = crate::profile::GpuProfile::by_id(&g.profile) {
                for _ in 0..g.count {
                    out.push((p.clone(), g.workload));
                }
            }
        }
        out
    }
}
