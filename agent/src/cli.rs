//! The `hearth-agent` command line. `run` starts the agent; every other subcommand is a client
//! of the local API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hearth_proto::api::{
    DiagReport, DiagRequest, HealthReport, NodeStatus, PowerBudgetRequest, PowerLimitRequest,
    PowerReport, ReleaseRequest,
};
use hearth_sim::{Fault, Workload};

use crate::api::client::Client;
use crate::api::{Done, SimInfo, SimInjectRequest, SimWorkloadRequest};
use crate::config::{Config, ConfigError, DEFAULT_SOCKET, LogFormat};
use crate::render;

/// Exit code for a bad configuration or bad arguments.
pub const EXIT_USAGE: i32 = 2;

/// Hearth node agent.
#[derive(Debug, Parser)]
#[command(name = "hearth-agent", version, about = "Hearth node agent", propagate_version = true)]
pub struct Cli {
    /// The agent's API socket (client subcommands).
    #[arg(long, env = "HEARTH_AGENT_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (what the systemd unit starts).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Override `log.format`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Validate a configuration file and exit (0: valid, 2: invalid).
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Render the seed's `[network]` settings into systemd-networkd units (run at boot by
    /// `hearth-seed.service`, before networkd). Exit 2 when the seed is invalid (nothing written).
    RenderNetwork {
        /// The seed (TOML); keys other than `[network]` are ignored here.
        #[arg(long)]
        seed: PathBuf,
        /// Directory of the rendered units.
        #[arg(long, default_value = "/run/systemd/network")]
        out: PathBuf,
    },
    /// Node state and every GPU's telemetry and health.
    Status {
        /// Print JSON (`GET /v1/status`).
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds until interrupted.
        #[arg(long, value_name = "SECS")]
        watch: Option<f64>,
    },
    /// Health verdicts, service states, host checks, verdict history and recent GPU events;
    /// drain or undrain the node, return a GPU to service, run diagnostics.
    Health {
        /// Print JSON (`GET /v1/health`).
        #[arg(long)]
        json: bool,
        /// An action instead of the report.
        #[command(subcommand)]
        action: Option<HealthCmd>,
    },
    /// Power draw and limits; set or restore a GPU's limit.
    Power {
        /// Print JSON (`GET /v1/power`).
        #[arg(long)]
        json: bool,
        /// Change a limit.
        #[command(subcommand)]
        action: Option<PowerAction>,
    },
    /// Signed A/B updates: status, apply, the boot check (`docs/0009-updates.md`).
    Update {
        /// Configuration file (TOML).
        #[arg(long, short, default_value = "/etc/hearth/agent.toml")]
        config: PathBuf,
        /// What to do.
        #[command(subcommand)]
        action: crate::update::cli::UpdateCmd,
    },
    /// The simulator (nodes with `gpu.backend = "sim"`).
    Sim {
        /// What to do.
        #[command(subcommand)]
        action: SimAction,
    },
}

/// `hearth-agent power ...`
#[derive(Debug, Subcommand)]
pub enum PowerAction {
    /// Set a GPU's power limit.
    Set {
        /// GPU index.
        #[arg(long)]
        gpu: u32,
        /// Limit in watts.
        #[arg(long)]
        watts: u32,
    },
    /// Restore a GPU's default power limit.
    Restore {
        /// GPU index.
        #[arg(long)]
        gpu: u32,
    },
    /// Set the node power budget held by the controller (`none`: vendor limits).
    Budget {
        /// Watts over all GPUs, or `none`.
        #[arg(value_parser = parse_budget)]
        watts: Budget,
    },
    /// Set the node-wide temperature targets (°C; `none`: the board's limit − 8 °C).
    Targets {
        /// Core temperature target, °C, or `none`.
        #[arg(long, value_parser = parse_budget)]
        core: Option<Budget>,
        /// Memory temperature target, °C, or `none`.
        #[arg(long, value_parser = parse_budget)]
        memory: Option<Budget>,
    },
}

/// A number, or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget(pub Option<u32>);

fn parse_budget(s: &str) -> Result<Budget, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Budget(None));
    }
    s.parse::<u32>()
        .map(|w| Budget(Some(w)))
        .map_err(|_| format!("{s:?} is not a number or `none`"))
}

/// `hearth-agent health ...`
#[derive(Debug, Subcommand)]
pub enum HealthCmd {
    /// Drain the node: no new work (`POST /v1/health/drain`).
    Drain,
    /// Lift a drain (`POST /v1/health/undrain`).
    Undrain,
    /// Return a quarantined or RMA GPU to service (`POST /v1/health/release`).
    Release {
        /// GPU index.
        #[arg(long)]
        gpu: u32,
    },
    /// Run `dcgmi diag` (or the burn-in command) on a quarantined, idle GPU.
    Diag {
        /// GPU index.
        #[arg(long)]
        gpu: u32,
        /// `dcgmi diag -r LEVEL` (1..=4).
        #[arg(long, default_value_t = 1)]
        level: u8,
    },
}

/// `hearth-agent sim ...`
#[derive(Debug, Subcommand)]
pub enum SimAction {
    /// Simulated time and clock.
    Info,
    /// Inject a fault into a GPU.
    Inject {
        /// GPU index.
        #[arg(long)]
        gpu: u32,
        /// The fault.
        #[command(subcommand)]
        fault: FaultArg,
    },
    /// Change what a GPU runs: idle, training or inference.
    Workload {
        /// GPU index.
        #[arg(long)]
        gpu: u32,
        /// idle, training or inference.
        #[arg(value_parser = parse_workload)]
        workload: Workload,
    },
}

/// A fault, as typed on the command line.
#[derive(Debug, Clone, Subcommand)]
pub enum FaultArg {
    /// An XID error by number.
    Xid {
        /// XID number.
        xid: u64,
    },
    /// A double-bit ECC error.
    Dbe,
    /// A storm of single-bit ECC errors.
    SbeStorm {
        /// Errors per second.
        #[arg(long, default_value_t = 100)]
        per_second: u32,
        /// Seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// A row remap waits for a reset.
    RowRemapPending,
    /// A row remap failed.
    RowRemapFailure,
    /// The PCIe link trains down.
    PcieDowntrain {
        /// Generation.
        #[arg(long, default_value_t = 3)]
        generation: u32,
        /// Width.
        #[arg(long, default_value_t = 8)]
        width: u32,
    },
    /// An NVLink link goes down.
    NvlinkDown {
        /// Link index.
        #[arg(long, default_value_t = 0)]
        link: u32,
    },
    /// The GPU falls off the bus.
    FallenOffBus,
    /// Cooling fails: the inlet temperature rises.
    CoolingFailure {
        /// Rise in °C.
        #[arg(long, default_value_t = 20.0)]
        rise: f64,
    },
    /// A BMC enforces a lower power limit.
    BmcLimit {
        /// The BMC's limit in watts.
        #[arg(long)]
        watts: u32,
    },
    /// Clear the GPU's active faults.
    Clear,
}

impl From<FaultArg> for Fault {
    fn from(f: FaultArg) -> Self {
        match f {
            FaultArg::Xid { xid } => Fault::Xid { xid },
            FaultArg::Dbe => Fault::DoubleBitEcc,
            FaultArg::SbeStorm { per_second, duration } => {
                Fault::SingleBitEccStorm { per_second, duration_s: duration }
            }
            FaultArg::RowRemapPending => Fault::RowRemapPending,
            FaultArg::RowRemapFailure => Fault::RowRemapFailure,
            FaultArg::PcieDowntrain { generation, width } => {
                Fault::PcieDowntrain { generation, width }
            }
            FaultArg::NvlinkDown { link } => Fault::NvlinkDown { link },
            FaultArg::FallenOffBus => Fault::FallenOffBus,
            FaultArg::CoolingFailure { rise } => Fault::CoolingFailure { ambient_rise_c: rise },
            FaultArg::BmcLimit { watts } => Fault::BmcPowerLimit { watts },
            FaultArg::Clear => Fault::Clear,
        }
    }
}

fn parse_workload(s: &str) -> Result<Workload, String> {
    match s {
        "idle" => Ok(Workload::Idle),
        "training" => Ok(Workload::Training),
        "inference" => Ok(Workload::Inference),
        other => Err(format!("unknown workload {other:?}; use idle, training or inference")),
    }
}

/// Load a config for `run`/`check-config`; a bad one is a usage error (exit 2).
pub fn load_config(path: &std::path::Path) -> Result<Config, ConfigError> {
    Config::load(path)
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    render::out(&text);
    Ok(())
}

/// Run a client subcommand. Returns the process exit code.
pub async fn run_client(socket: &std::path::Path, command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Run { .. } | Command::CheckConfig { .. } | Command::RenderNetwork { .. } => {
            Ok(EXIT_USAGE)
        }
        Command::Update { config, action } => {
            crate::update::cli::run(&config, socket, action).await
        }
        Command::Status { json, watch } => {
            let client = Client::new(socket);
            loop {
                let status: NodeStatus = client.get("/v1/status").await?;
                if json {
                    print_json(&status)?;
                } else {
                    if watch.is_some() {
                        render::out("\x1b[2J\x1b[H");
                    }
                    render::out(&render::status(&status));
                    if let Ok(h) = client.get::<HealthReport>("/v1/health").await {
                        render::out(&render::health_summary(&h));
                    }
                    if let Ok(u) =
                        client.get::<crate::update::state::UpdateState>("/v1/update").await
                        && u.phase != crate::update::state::Phase::Idle
                    {
                        render::out(&crate::update::cli::render_state(&u));
                    }
                }
                let Some(secs) = watch else { return Ok(0) };
                let period = Duration::try_from_secs_f64(secs.max(0.2))
                    .map_err(|e| anyhow::anyhow!("--watch {secs}: {e}"))?;
                tokio::select! {
                    () = tokio::time::sleep(period) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(0),
                }
            }
        }
        Command::Health { json, action: Some(action) } => {
            let client = Client::new(socket);
            match action {
                HealthCmd::Drain => {
                    let done: Done =
                        client.post("/v1/health/drain", &serde_json::json!({})).await?;
                    render::out(&done.done);
                }
                HealthCmd::Undrain => {
                    let done: Done =
                        client.post("/v1/health/undrain", &serde_json::json!({})).await?;
                    render::out(&done.done);
                }
                HealthCmd::Release { gpu } => {
                    let done: Done =
                        client.post("/v1/health/release", &ReleaseRequest { gpu }).await?;
                    render::out(&done.done);
                }
                HealthCmd::Diag { gpu, level } => {
                    let report: DiagReport =
                        client.post("/v1/health/diag", &DiagRequest { gpu, level }).await?;
                    if json {
                        print_json(&report)?;
                    } else {
                        render::out(&format!(
                            "GPU {} {} ({})",
                            report.gpu,
                            if report.passed { "passed" } else { "FAILED" },
                            report.command
                        ));
                        for t in &report.tests {
                            render::out(&format!(
                                "  {:<24} {}  {}",
                                t.name,
                                t.result,
                                t.info.as_deref().unwrap_or("")
                            ));
                        }
                    }
                    return Ok(if report.passed { 0 } else { 1 });
                }
            }
            Ok(0)
        }
        Command::Health { json, action: None } => {
            let report: HealthReport = Client::new(socket).get("/v1/health").await?;
            if json {
                print_json(&report)?;
            } else {
                render::out(&render::health(&report));
            }
            Ok(0)
        }
        Command::Power { json, action } => {
            let client = Client::new(socket);
            if let Some(action) = action {
                let req = match action {
                    PowerAction::Set { gpu, watts } => {
                        PowerLimitRequest { gpu, watts: Some(watts) }
                    }
                    PowerAction::Restore { gpu } => PowerLimitRequest { gpu, watts: None },
                    PowerAction::Budget { watts } => {
                        let req = PowerBudgetRequest { budget_w: watts.0 };
                        let done: Done = client.post("/v1/power/budget", &req).await?;
                        render::out(&done.done);
                        return Ok(0);
                    }
                    PowerAction::Targets { core, memory } => {
                        let report: PowerReport = client.get("/v1/power").await?;
                        let Some(control) = report.control else {
                            anyhow::bail!("power control has not started yet (no GPUs read)");
                        };
                        let mut settings = control.settings;
                        if let Some(c) = core {
                            settings.core_target_c = c.0;
                        }
                        if let Some(m) = memory {
                            settings.memory_target_c = m.0;
                        }
                        let done: Done = client.post("/v1/power", &settings).await?;
                        render::out(&done.done);
                        return Ok(0);
                    }
                };
                let done: Done = client.post("/v1/power/limit", &req).await?;
                render::out(&done.done);
                return Ok(0);
            }
            let report: PowerReport = client.get("/v1/power").await?;
            if json {
                print_json(&report)?;
            } else {
                render::out(&render::power(&report));
            }
            Ok(0)
        }
        Command::Sim { action } => {
            let client = Client::new(socket);
            match action {
                SimAction::Info => {
                    let info: SimInfo = client.get("/v1/sim").await?;
                    print_json(&info)?;
                }
                SimAction::Inject { gpu, fault } => {
                    let req = SimInjectRequest { gpu, fault: fault.into() };
                    let done: Done = client.post("/v1/sim/inject", &req).await?;
                    render::out(&done.done);
                }
                SimAction::Workload { gpu, workload } => {
                    let req = SimWorkloadRequest { gpu, workload };
                    let done: Done = client.post("/v1/sim/workload", &req).await?;
                    render::out(&done.done);
                }
            }
            Ok(0)
        }
    }
}

/// `render-network`: 0 when written, 2 for an invalid or unreadable seed, 1 when writing failed.
fn render_network(seed: &std::path::Path, out: &std::path::Path) -> i32 {
    use crate::netconfig::NetConfigError;
    match crate::netconfig::render_seed(seed, out) {
        Ok(n) => {
            render::out(&format!("{}: {n} network units in {}", seed.display(), out.display()));
            0
        }
        Err(e @ NetConfigError::Write { .. }) => {
            render::err(&format!("error: {}", format_args!("{:#}", anyhow::Error::new(e))));
            1
        }
        Err(e) => {
            render::err(&format!("error: {}", format_args!("{:#}", anyhow::Error::new(e))));
            EXIT_USAGE
        }
    }
}

/// Entry point of the binary: parse, dispatch, map errors to exit codes.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load_config(&config) {
            Ok(_) => {
                render::out(&format!("{}: valid", config.display()));
                0
            }
            Err(e) => {
                render::err(&format!("error: {e}"));
                EXIT_USAGE
            }
        },
        Command::RenderNetwork { seed, out } => render_network(&seed, &out),
        Command::Run { config: config_path, log_format } => {
            let config = match load_config(&config_path) {
                Ok(c) => c,
                Err(e) => {
                    render::err(&format!("error: {e}"));
                    return EXIT_USAGE;
                }
            };
            let format = log_format.unwrap_or(config.log.format);
            if let Err(e) = crate::logging::init(format, &config.log.level) {
                render::err(&format!("error: cannot set up logging: {e:#}"));
                return 1;
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(8)
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the runtime");
                    return 1;
                }
            };
            let notifier = Arc::new(crate::systemd::SystemdNotifier::from_env());
            match runtime.block_on(crate::run(config, Some(config_path), notifier)) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("agent failed: {e:#}");
                    1
                }
            }
        }
        command => {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    render::err(&format!("error: cannot start the runtime: {e}"));
                    return 1;
                }
            };
            match runtime.block_on(run_client(&cli.socket, command)) {
                Ok(code) => code,
                Err(e) => {
                    render::err(&format!("error: {e:#}"));
                    1
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks the whole command tree in debug builds only, when a subcommand is parsed: a
    /// clash (an argument named like the propagated `--version`) panics on the node at run
    /// time. Check every subcommand here instead.
    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
