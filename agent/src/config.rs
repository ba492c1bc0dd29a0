//! The agent's configuration file (TOML), typed and validated at load.
//!
//! Every key is documented below and in `docs/configuration.md`; an unknown key, a wrong type or
//! an out-of-range value is refused with an error that names the file and the key. The example
//! with every default is `agent/agent.example.toml`.

use std::path::{Path, PathBuf};

use hearth_sim::{Scenario, Workload};
use serde::Deserialize;

/// Default path of the local API socket.
pub const DEFAULT_SOCKET: &str = "/run/hearth/agent.sock";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The local API (`[api]`).
    #[serde(default)]
    pub api: ApiConfig,
    /// The GPU layer (`[gpu]`).
    #[serde(default)]
    pub gpu: GpuConfig,
    /// The simulator, used when `gpu.backend = "sim"` (`[sim]`).
    #[serde(default)]
    pub sim: SimConfig,
    /// Logging (`[log]`).
    #[serde(default)]
    pub log: LogConfig,
    /// Persistent state (`[state]`).
    #[serde(default)]
    pub state: StateConfig,
    /// GPU and host health (`[health]`).
    #[serde(default)]
    pub health: HealthConfig,
    /// Power and thermal control (`[power]`).
    #[serde(default)]
    pub power: PowerConfig,
    /// Fleet membership (`[fleet]`).
    #[serde(default)]
    pub fleet: FleetConfig,
    /// What the fleet may reach on this node through the tunnel (`[tunnel]`).
    #[serde(default)]
    pub tunnel: TunnelConfig,
    /// Signed A/B updates (`[update]`, `crate::update::config`).
    #[serde(default)]
    pub update: crate::update::config::UpdateConfig,
    /// The node's `/metrics` and offline summaries (`[metrics]`).
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// Default address of the node's `/metrics` (dcgm-exporter's port, loopback only).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9400";

/// `[metrics]`: the node's `/metrics` (dcgm-exporter-compatible names) and the summaries kept
/// while the node is disconnected (`docs/0007-telemetry.md`). The local API serves `/metrics`
/// too, so the fleet scrapes the node through the tunnel whatever these keys say.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` over HTTP on `listen`. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Address of the HTTP listener, `IP:PORT`. Default `127.0.0.1:9400` (loopback: expose it
    /// to a Prometheus on the LAN with `0.0.0.0:9400` and a firewall, or scrape through the
    /// fleet's proxy).
    #[serde(default = "default_metrics_listen")]
    pub listen: std::net::SocketAddr,
}

fn default_metrics_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 9400))
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true, listen: default_metrics_listen() }
    }
}

/// `[power]`: the node power budget, temperature targets and the control loop
/// (`docs/0004-power-control.md`). Budget and targets change at runtime too (`POST /v1/power`,
/// SIGHUP); the last ones set are kept in the state directory and re-applied at boot.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerConfig {
    /// Node power budget over all GPUs, W (1..=1000000). Unset (default): no budget, the GPUs
    /// keep their vendor limits (lowered only to hold temperature targets).
    #[serde(default)]
    pub budget_w: Option<u32>,
    /// Core temperature target of every GPU, °C (30..=120). Unset (default): each board's
    /// T.Limit − 8 °C.
    #[serde(default)]
    pub core_target_c: Option<u32>,
    /// Memory (HBM) temperature target, °C (30..=120). Unset (default): each board's memory
    /// maximum − 8 °C.
    #[serde(default)]
    pub memory_target_c: Option<u32>,
    /// Milliseconds between two control steps (250..=5000). Default 1000. A GPU's limit changes
    /// at most once per second whatever the period.
    #[serde(default = "default_control_period_ms")]
    pub control_period_ms: u64,
    /// Lock the SM clocks of memory-bound GPUs (memory busier than the SMs) while a budget is
    /// set, where a power cap would not bind. Default true.
    #[serde(default = "default_true")]
    pub lock_memory_bound_clocks: bool,
    /// The clock memory-bound GPUs are locked at, percent of the maximum SM clock (30..=100).
    /// Default 70.
    #[serde(default = "default_memory_bound_clock_pct")]
    pub memory_bound_clock_pct: u32,
    /// Drive the fans of fan-cooled boards toward the core target (30 % at 20 °C below it,
    /// 100 % at it). Default true; boards without fans of their own are left alone.
    #[serde(default = "default_true")]
    pub fan_control: bool,
    /// Per-GPU overrides: `[[power.gpu]]` with `index`, `priority` (1..=100, default 1: a GPU's
    /// weight when the budget is split), `core_target_c`, `memory_target_c`.
    #[serde(default)]
    pub gpu: Vec<hearth_proto::api::GpuPowerSettings>,
}

impl Default for PowerConfig {
    fn default() -> Self {
        Self {
            budget_w: None,
            core_target_c: None,
            memory_target_c: None,
            control_period_ms: default_control_period_ms(),
            lock_memory_bound_clocks: true,
            memory_bound_clock_pct: default_memory_bound_clock_pct(),
            fan_control: true,
            gpu: Vec::new(),
        }
    }
}

fn default_control_period_ms() -> u64 {
    1000
}

fn default_true() -> bool {
    true
}

fn default_memory_bound_clock_pct() -> u32 {
    70
}

impl PowerConfig {
    /// The runtime-changeable part: budget, targets, priorities.
    pub fn settings(&self) -> hearth_proto::api::PowerSettings {
        hearth_proto::api::PowerSettings {
            budget_w: self.budget_w,
            core_target_c: self.core_target_c,
            memory_target_c: self.memory_target_c,
            gpus: self.gpu.clone(),
        }
    }

    /// The controller's tunables.
    pub fn params(&self) -> crate::power::PowerParams {
        crate::power::PowerParams {
            lock_memory_bound_clocks: self.lock_memory_bound_clocks,
            memory_bound_clock_pct: self.memory_bound_clock_pct,
            fan_control: self.fan_control,
        }
    }
}

/// `[health]`: GPU and host health (`docs/0003-health.md`).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// A health policy file (TOML: thresholds, XID overrides, reset command, host checks). Unset:
    /// the built-in policy. Validated at load like the rest of this file.
    #[serde(default)]
    pub policy: Option<PathBuf>,
}

/// `[tunnel]`: the node's end of the secure tunnel (`docs/0006-tunnel.md`). The gateway checks
/// the operator's role; these keys are the node's own policy on top.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// Keep a tunnel to the fleet (needs an enrolled node), which also carries the control
    /// session when the fleet can (one connection). Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Allow `hearthctl exec` and `hearthctl shell` (commands run as the agent's user). Default
    /// true.
    #[serde(default = "default_true")]
    pub exec: bool,
    /// Loopback TCP ports the fleet may reach (`hearthctl expose`, workload ingress); every other
    /// port is refused. Default none.
    #[serde(default)]
    pub expose_ports: Vec<u16>,
    /// Most extra connections ("lanes") the node opens for the gateway's port streams when the
    /// gateway offers them, so bulk transfers do not queue ahead of shells and control messages;
    /// 0 keeps every stream on the one tunnel connection. 0..=8, default 2.
    #[serde(default = "default_lanes")]
    pub lanes: u8,
}

fn default_lanes() -> u8 {
    2
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self { enabled: true, exec: true, expose_ports: Vec::new(), lanes: default_lanes() }
    }
}

/// `[fleet]`: joining a fleet (`docs/0005-fleet.md`, `docs/operations.md`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Run the `fleet` subsystem (enrollment and the control session). Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A seed file to use instead of the search (`/etc/hearth/seed.toml`, the `HEARTH-SEED`
    /// partition, the `hearth.seed` credential, `hearth.seed=` on the kernel command line). Unset
    /// by default.
    #[serde(default)]
    pub seed: Option<PathBuf>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self { enabled: true, seed: None }
    }
}

/// Default directory of the agent's persistent state.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hearth";

/// `[state]`: where the agent keeps what must survive a restart or a power cut.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Directory of the agent's persistent state (identity, health and power state), created
    /// owner-only (0700) if missing; every file in it is written atomically (`persist.rs`).
    /// Default `/var/lib/hearth` (systemd's `StateDirectory=hearth`).
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self { dir: default_state_dir() }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

/// `[api]`: the local HTTP API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Unix socket the API listens on; created owner-only (0600), its directory 0700 if the
    /// agent creates it. Default `/run/hearth/agent.sock`.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self { socket: default_socket() }
    }
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

/// Which GPU backend the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Real GPUs through NVML (`libnvidia-ml.so.1`).
    #[default]
    Nvml,
    /// Simulated GPUs (`hearth-sim`), configured by `[sim]`.
    Sim,
}

/// `[gpu]`: the GPU layer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// `"nvml"` (default) for real GPUs, `"sim"` for simulated ones.
    #[serde(default)]
    pub backend: BackendKind,
    /// The NVML library to load: a soname searched by the loader, or a path. Default
    /// `libnvidia-ml.so.1`.
    #[serde(default = "default_nvml_library")]
    pub nvml_library: PathBuf,
    /// Milliseconds between two telemetry samples of every GPU (100..=60000). Default 1000.
    #[serde(default = "default_sample_interval_ms")]
    pub sample_interval_ms: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::default(),
            nvml_library: default_nvml_library(),
            sample_interval_ms: default_sample_interval_ms(),
        }
    }
}

fn default_nvml_library() -> PathBuf {
    PathBuf::from("libnvidia-ml.so.1")
}

fn default_sample_interval_ms() -> u64 {
    1000
}

/// `[sim]`: the simulated node.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// A scenario file (GPUs, workloads, timed faults; see `docs/0002-gpu-simulator.md`). When
    /// set, `gpus`, `profile`, `workload` and `seed` are taken from it instead.
    #[serde(default)]
    pub scenario: Option<PathBuf>,
    /// Number of simulated GPUs (1..=64). Default 8.
    #[serde(default = "default_sim_gpus")]
    pub gpus: u32,
    /// GPU profile: `h100-sxm` (default) or `rtx4090-pcie`.
    #[serde(default = "default_sim_profile")]
    pub profile: String,
    /// What the GPUs run at start: `idle`, `training` (default) or `inference`.
    #[serde(default = "default_sim_workload")]
    pub workload: Workload,
    /// Seed of the simulator's random draws. Default 1.
    #[serde(default = "default_sim_seed")]
    pub seed: u64,
    /// Simulated seconds per wall-clock second (0.1..=1000). Default 1.
    #[serde(default = "default_time_scale")]
    pub time_scale: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            scenario: None,
            gpus: default_sim_gpus(),
            profile: default_sim_profile(),
            workload: default_sim_workload(),
            seed: default_sim_seed(),
            time_scale: default_time_scale(),
        }
    }
}

fn default_sim_gpus() -> u32 {
    8
}

fn default_sim_profile() -> String {
    "h100-sxm".into()
}

fn default_sim_workload() -> Workload {
    Workload::Training
}

fn default_sim_seed() -> u64 {
    1
}

fn default_time_scale() -> f64 {
    1.0
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// journald when started by systemd (`JOURNAL_STREAM`), else human text.
    #[default]
    Auto,
    /// Human-readable text (colours on a terminal).
    Text,
    /// One JSON object per line.
    Json,
    /// Native journald fields.
    Journald,
}

/// `[log]`: logging.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `auto` (default), `text`, `json` or `journald`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter: a level (`info`, default) or directives like `info,hearth_agent=debug`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::default(), level: default_log_level() }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// A configuration that cannot be used; each names the file, and the key where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, a key is unknown or a value has the wrong type.
    #[error("config {path}: key `{key}`: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Dotted key path (`.` for the document).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("config {path}: key `{key}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted key path.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parse and validate configuration text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse_err = |key: String, message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            key,
            message,
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| parse_err(".".into(), e.message().to_string()))?;
        let config: Config = serde_path_to_error::deserialize(de)
            .map_err(|e| parse_err(e.path().to_string(), e.inner().message().to_string()))?;
        config.validate(path)?;
        Ok(config)
    }

    /// Check every value's range. Also loads the sim scenario file when one is named, so a bad
    /// scenario is refused at load like any other bad value.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        if !self.api.socket.is_absolute() {
            return Err(invalid(
                "api.socket",
                format!("{} is not an absolute path", self.api.socket.display()),
            ));
        }
        if self.tunnel.expose_ports.contains(&0) {
            return Err(invalid("tunnel.expose_ports", "port 0 is not a port".into()));
        }
        if self.tunnel.lanes > hearth_proto::lane::MAX_LANES {
            return Err(invalid(
                "tunnel.lanes",
                format!(
                    "{} lanes asked; at most {} are allowed",
                    self.tunnel.lanes,
                    hearth_proto::lane::MAX_LANES
                ),
            ));
        }
        if !self.state.dir.is_absolute() {
            return Err(invalid(
                "state.dir",
                format!("{} is not an absolute path", self.state.dir.display()),
            ));
        }
        if self.gpu.nvml_library.as_os_str().is_empty() {
            return Err(invalid("gpu.nvml_library", "is empty".into()));
        }
        if !(100..=60_000).contains(&self.gpu.sample_interval_ms) {
            return Err(invalid(
                "gpu.sample_interval_ms",
                format!("{} is outside 100..=60000", self.gpu.sample_interval_ms),
            ));
        }
        if !(1..=64).contains(&self.sim.gpus) {
            return Err(invalid("sim.gpus", format!("{} is outside 1..=64", self.sim.gpus)));
        }
        if hearth_sim::GpuProfile::by_id(&self.sim.profile).is_none() {
            let known: Vec<String> =
                hearth_sim::GpuProfile::builtin().into_iter().map(|p| p.id).collect();
            return Err(invalid(
                "sim.profile",
                format!("unknown profile {:?}; known: {}", self.sim.profile, known.join(", ")),
            ));
        }
        if !self.sim.time_scale.is_finite() || !(0.1..=1000.0).contains(&self.sim.time_scale) {
            return Err(invalid(
                "sim.time_scale",
                format!("{} is outside 0.1..=1000", self.sim.time_scale),
            ));
        }
        if let Some(scenario) = &self.sim.scenario {
            Scenario::load(scenario).map_err(|e| invalid("sim.scenario", format!("{e}")))?;
        }
        if let Some(policy) = &self.health.policy {
            crate::health::policy::Policy::load(policy)
                .map_err(|e| invalid("health.policy", format!("{e}")))?;
        }
        if !(250..=5000).contains(&self.power.control_period_ms) {
            return Err(invalid(
                "power.control_period_ms",
                format!("{} is outside 250..=5000", self.power.control_period_ms),
            ));
        }
        if !(30..=100).contains(&self.power.memory_bound_clock_pct) {
            return Err(invalid(
                "power.memory_bound_clock_pct",
                format!("{} is outside 30..=100", self.power.memory_bound_clock_pct),
            ));
        }
        crate::power::validate_settings(&self.power.settings(), "gpu")
            .map_err(|e| invalid(&format!("power.{}", e.key), e.message))?;
        self.update.validate().map_err(|(key, message)| invalid(key, message))?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid(
                "log.level",
                format!("{:?} is not a log filter: {e}", self.log.level),
            ));
        }
        Ok(())
    }

    /// The scenario the `sim` backend runs: the scenario file, or `sim.gpus` GPUs of `sim.profile`.
    pub fn sim_scenario(&self) -> Result<Scenario, hearth_sim::ScenarioError> {
        match &self.sim.scenario {
            Some(path) => Scenario::load(path),
            None => {
                let mut s = Scenario::uniform(&self.sim.profile, self.sim.gpus, self.sim.workload);
                s.seed = self.sim.seed;
                Ok(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/hearth/agent.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() -> Result<(), ConfigError> {
        let c = parse("")?;
        assert_eq!(c, Config::default());
        assert_eq!(c.api.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.gpu.backend, BackendKind::Nvml);
        Ok(())
    }

    #[test]
    fn example_file_is_valid_and_shows_the_defaults() -> Result<(), ConfigError> {
        let c = parse(include_str!("../agent.example.toml"))?;
        assert_eq!(c, Config::default());
        Ok(())
    }

    #[test]
    fn full_file_parses() -> Result<(), ConfigError> {
        let c = parse(
            r#"
            [api]
            socket = "/tmp/x.sock"
            [gpu]
            backend = "sim"
            sample_interval_ms = 500
            [sim]
            gpus = 4
            profile = "rtx4090-pcie"
            workload = "inference"
            seed = 9
            time_scale = 10.0
            [log]
            format = "json"
            level = "debug,hyper=info"
            [power]
            budget_w = 4000
            core_target_c = 80
            control_period_ms = 500
            [[power.gpu]]
            index = 2
            priority = 3
            "#,
        )?;
        assert_eq!(c.power.budget_w, Some(4000));
        assert_eq!(c.power.gpu[0].priority, 3);
        assert_eq!(c.power.settings().core_target_c, Some(80));
        assert_eq!(c.gpu.backend, BackendKind::Sim);
        assert_eq!(c.sim.gpus, 4);
        assert_eq!(c.log.format, LogFormat::Json);
        Ok(())
    }

    fn err_text(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("accepted bad config: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unknown_key_is_named_with_its_table() {
        let e = err_text("[gpu]\nbackend = \"sim\"\nsample_intervl_ms = 5\n");
        assert!(e.contains("/etc/hearth/agent.toml"), "{e}");
        assert!(e.contains("gpu.sample_intervl_ms"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn wrong_type_and_variant_are_named() {
        let e = err_text("[gpu]\nbackend = \"cuda\"\n");
        assert!(e.contains("key `gpu.backend`"), "{e}");
        let e = err_text("[sim]\ngpus = \"eight\"\n");
        assert!(e.contains("key `sim.gpus`"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        for (text, key) in [
            ("[gpu]\nsample_interval_ms = 5\n", "gpu.sample_interval_ms"),
            ("[sim]\ngpus = 0\n", "sim.gpus"),
            ("[sim]\nprofile = \"a100\"\n", "sim.profile"),
            ("[sim]\ntime_scale = 0.0\n", "sim.time_scale"),
            ("[api]\nsocket = \"relative.sock\"\n", "api.socket"),
            ("[state]\ndir = \"var/lib\"\n", "state.dir"),
            ("[tunnel]\nexpose_ports = [8080, 0]\n", "tunnel.expose_ports"),
            ("[tunnel]\nlanes = 9\n", "tunnel.lanes"),
            ("[log]\nlevel = \"[[[\"\n", "log.level"),
            ("[sim]\nscenario = \"/nonexistent/scenario.toml\"\n", "sim.scenario"),
            ("[health]\npolicy = \"/nonexistent/health.toml\"\n", "health.policy"),
            ("[power]\nbudget_w = 0\n", "power.budget_w"),
            ("[power]\ncore_target_c = 200\n", "power.core_target_c"),
            ("[power]\ncontrol_period_ms = 10\n", "power.control_period_ms"),
            ("[power]\nmemory_bound_clock_pct = 5\n", "power.memory_bound_clock_pct"),
            ("[[power.gpu]]\nindex = 1\npriority = 0\n", "power.gpu[0].priority"),
            ("[[power.gpu]]\nindex = 1\n[[power.gpu]]\nindex = 1\n", "power.gpu[1].index"),
        ] {
            let e = err_text(text);
            assert!(e.contains(&format!("key `{key}`")), "{text}: {e}");
        }
    }

    #[test]
    fn malformed_toml_names_the_file() {
        let e = err_text("[gpu\n");
        assert!(e.contains("/etc/hearth/agent.toml"), "{e}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let Err(e) = Config::load(Path::new("/nonexistent/agent.toml")) else {
            panic!("loaded a missing file")
        };
        assert!(e.to_string().contains("/nonexistent/agent.toml"));
    }
}
