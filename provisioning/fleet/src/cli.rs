//! The `hearth-fleet` command line: `serve` and `operator-cert`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::ca::{Ca, Role};
use crate::config::FleetConfig;

/// Hearth's fleet server.
#[derive(Debug, Parser)]
#[command(name = "hearth-fleet", version)]
pub struct Cli {
    /// Configuration file (TOML; every key optional).
    #[arg(long, global = true, env = "HEARTH_FLEET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override `state_dir`.
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the fleet server until SIGTERM or Ctrl-C.
    Serve {
        /// Override `listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Override `registry` (`sqlite:PATH` or `postgres://…`).
        #[arg(long)]
        registry: Option<String>,
        /// Override `public_url`.
        #[arg(long)]
        public_url: Option<String>,
    },
    /// Issue an operator certificate and write `operator.crt`, `operator.key` (0600) and
    /// `hearthctl.toml` into a directory.
    OperatorCert {
        /// Operator name.
        #[arg(long)]
        name: String,
        /// Role.
        #[arg(long, value_enum)]
        role: Role,
        /// Output directory (created 0700).
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
}

fn load(cli: &Cli) -> anyhow::Result<FleetConfig> {
    let mut config = match &cli.config {
        Some(p) => FleetConfig::load(p)?,
        None => FleetConfig::default(),
    };
    if let Some(d) = &cli.state_dir {
        config.state_dir = d.clone();
    }
    Ok(config)
}

/// `hearthctl.toml` content for an operator.
pub fn hearthctl_config(config: &FleetConfig, pin: &str, dir: &std::path::Path) -> String {
    format!(
        "# hearthctl configuration (written by hearth-fleet operator-cert)\nurl = \"{}\"\nname = \"{}\"\nca_sha256 = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        config.public_url(),
        config.name,
        pin,
        dir.join("operator.crt").display(),
        dir.join("operator.key").display()
    )
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = load(&cli)?;
    match cli.command {
        Command::Serve { listen, registry, public_url } => {
            if let Some(l) = listen {
                config.listen = l;
            }
            if registry.is_some() {
                config.registry = registry;
            }
            if public_url.is_some() {
                config.public_url = public_url;
            }
            config.validate(std::path::Path::new("command line"))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
                let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
                let running = crate::server::start(config).await?;
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                    _ = int.recv() => tracing::info!("SIGINT: stopping"),
                }
                running.stop().await;
                anyhow::Ok(())
            })
        }
        Command::OperatorCert { name, role, out, days } => {
            if !(1..=365).contains(&days) {
                anyhow::bail!("--days {days} is not in 1..=365");
            }
            let ca = Ca::load_or_create(&config.state_dir, &config.name)?;
            let (issued, key) =
                ca.operator_cert(&name, role, Duration::from_secs(u64::from(days) * 86_400))?;
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let write = |file: &str, body: &str| -> anyhow::Result<()> {
                use std::io::Write;
                let path = out.join(file);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                f.write_all(body.as_bytes())
                    .with_context(|| format!("cannot write {}", path.display()))
            };
            write("operator.crt", &issued.cert_pem)?;
            write("operator.key", &key)?;
            write("hearthctl.toml", &hearthctl_config(&config, &ca.pin(), &out))?;
            tracing::info!(%name, role = role.as_str(), out = %out.display(), "operator certificate issued");
            Ok(())
        }
    }
}

/// Parse arguments, set up logging, run; errors are logged once with their chain.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
