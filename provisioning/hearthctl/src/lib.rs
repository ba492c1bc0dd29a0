//! `hearthctl`: the operator CLI of `hearth-fleet`.
//!
//! Entry point: [`main`]. It reads `hearthctl.toml` ([`CtlConfig`]: fleet URL and name, CA pin,
//! operator certificate and key, as written by `hearth-fleet operator-cert`), sends one HTTPS
//! request with the operator certificate ([`hearth_fleet_client::https`]) and prints a table or
//! JSON. Errors name the cause and exit non-zero. `rollout` drives staged rollouts ([`rollout`]).
//! `expose` / `unexpose` manage customer ingress through the gateway ([`expose`]). `exec`,
//! `shell`, `api` and `forward` open streams to a
//! node through the fleet's tunnel gateway instead ([`stream`], `docs/0006-tunnel.md`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use hearth_fleet_client::https::{Endpoint, json};
use hearth_fleet_client::tls::{ClientIdentity, client_config};
use hearth_proto::control::CommandKind;
use hearth_proto::fleet::{
    ChannelRequest, CommandRequest, CommandView, DrainRequest, EventView, NodeView,
    PowerBudgetRequest, TokenCreateRequest, TokenCreated, TokenView,
};
use serde::Deserialize;

pub mod expose;
pub mod release;
pub mod rollout;
pub mod stream;

/// `hearthctl.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlConfig {
    /// Fleet URL, `https://HOST:PORT`.
    pub url: String,
    /// The fleet certificate's name.
    pub name: String,
    /// SHA-256 of the fleet CA.
    pub ca_sha256: String,
    /// Operator certificate (PEM file).
    pub cert: PathBuf,
    /// Operator key (PEM file).
    pub key: PathBuf,
}

/// Hearth's operator CLI.
#[derive(Debug, Parser)]
#[command(name = "hearthctl", version)]
pub struct Cli {
    /// Configuration (default `$HEARTHCTL_CONFIG`, then `~/.config/hearth/hearthctl.toml`).
    #[arg(long, global = true, env = "HEARTHCTL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enrollment tokens.
    Tokens {
        /// What to do with tokens.
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Nodes.
    Nodes {
        /// What to do with nodes.
        #[command(subcommand)]
        action: NodeAction,
    },
    /// Stop a node taking new work.
    Drain {
        /// Node id.
        node: String,
    },
    /// Let a drained node take work again.
    Undrain {
        /// Node id.
        node: String,
    },
    /// Set a node's power budget in watts (0 clears it).
    PowerBudget {
        /// Node id.
        node: String,
        /// Watts.
        watts: u32,
    },
    /// Move a node to another update channel (admin): the channel's staged rollouts reach it,
    /// and it installs what they ask for from that channel's releases.
    Channel {
        /// Node id.
        node: String,
        /// The channel, `[a-z0-9-]{1,32}`.
        channel: String,
    },
    /// Reboot a node.
    Reboot {
        /// Node id.
        node: String,
    },
    /// Recent registry events.
    Events {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Run a command on a node through the tunnel (admin); exits with its status.
    Exec {
        /// Node id.
        node: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// An interactive login shell on a node through the tunnel (admin; the node's
    /// `tunnel.exec` must allow it); exits with the shell's status.
    Shell {
        /// Node id.
        node: String,
    },
    /// GET a path of a node's local API through the tunnel (viewer or admin).
    Api {
        /// Node id.
        node: String,
        /// API path.
        #[arg(default_value = "/v1/status")]
        path: String,
    },
    /// Staged rollouts of a signed release to a channel's nodes.
    Rollout {
        /// What to do.
        #[command(subcommand)]
        action: rollout::RolloutAction,
    },
    /// Signing keys and signed releases (offline; nothing is sent to the fleet).
    Release {
        /// What to do.
        #[command(subcommand)]
        action: release::ReleaseAction,
    },
    /// Forward a local TCP address to a loopback port of a node (admin; the node's
    /// `tunnel.expose_ports` must list it).
    Forward {
        /// Node id.
        node: String,
        /// Port on the node.
        port: u16,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// Customer ingress: make a port of the fleet's gateway forward to PORT on NODE (admin; the
    /// node's `tunnel.expose_ports` must list it); kept across fleet restarts. `--list` shows
    /// every exposure (viewer or admin).
    Expose {
        /// Node id.
        #[arg(required_unless_present = "list")]
        node: Option<String>,
        /// Port on the node.
        #[arg(required_unless_present = "list")]
        port: Option<u16>,
        /// List the exposures instead.
        #[arg(long, conflicts_with_all = ["node", "port"])]
        list: bool,
    },
    /// Remove an exposure, named by its gateway port (admin).
    Unexpose {
        /// The gateway port (`hearthctl expose --list`).
        gateway_port: u16,
    },
}

/// `tokens` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create a token and print a ready seed.
    Create {
        /// Label `KEY=VALUE` given to nodes enrolling with it (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Lifetime in hours.
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
        /// Enrollments allowed.
        #[arg(long, default_value_t = 1)]
        max_uses: u32,
        /// Update channel of the nodes enrolling with it (`[a-z0-9-]{1,32}`; default `stable`).
        #[arg(long)]
        channel: Option<String>,
    },
    /// List tokens.
    List,
    /// Revoke a token.
    Revoke {
        /// Token id.
        id: String,
    },
}

/// `nodes` subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// List nodes.
    List,
    /// One node in detail.
    Show {
        /// Node id.
        id: String,
    },
}

fn config_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(p) = &cli.config {
        return Ok(p.clone());
    }
    let home = std::env::var_os("HOME").context("no --config, $HEARTHCTL_CONFIG or $HOME")?;
    Ok(Path::new(&home).join(".config/hearth/hearthctl.toml"))
}

/// Load `hearthctl.toml`.
pub fn load_config(path: &Path) -> anyhow::Result<CtlConfig> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("cannot read {} (write it with hearth-fleet operator-cert)", path.display())
    })?;
    toml::from_str(&text).with_context(|| format!("{} is invalid", path.display()))
}

struct Ctl {
    ep: Endpoint,
    tls: std::sync::Arc<rustls::ClientConfig>,
}

impl Ctl {
    fn new(c: &CtlConfig) -> anyhow::Result<Self> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let id = ClientIdentity { cert_pem: read(&c.cert)?, key_pem: read(&c.key)? };
        Ok(Self {
            ep: Endpoint::from_url(&c.url, &c.name)?,
            tls: client_config(&c.ca_sha256, Some(&id), b"http/1.1")?,
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(json::<(), T>(&self.ep, self.tls.clone(), "GET", path, None).await?)
    }

    async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        Ok(json(&self.ep, self.tls.clone(), "POST", path, Some(body)).await?)
    }
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(t) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            format!("{}s ago", now.saturating_sub(t) / 1000)
        }
    }
}

/// The node table.
pub fn nodes_table(nodes: &[NodeView]) -> String {
    let mut out = format!(
        "{:<16} {:<16} {:<8} {:>4} {:>8} {:<7} {:<10} {:<12} {:<12}\n",
        "NODE", "HOST", "STATE", "GPUS", "POWER W", "DRAIN", "CHANNEL", "OS", "LAST SEEN"
    );
    for n in nodes {
        let state = if n.revoked {
            "revoked"
        } else if n.online {
            "online"
        } else {
            "offline"
        };
        let gpus = n.heartbeat.as_ref().map_or(n.gpus.len() as u32, |h| h.health.gpus);
        let power = n.heartbeat.as_ref().map_or("-".into(), |h| h.power.draw_w.to_string());
        let os = n.heartbeat.as_ref().and_then(|h| h.versions.os.as_deref()).unwrap_or("-");
        let _ = writeln!(
            out,
            "{:<16} {:<16} {:<8} {:>4} {:>8} {:<7} {:<10} {:<12} {:<12}",
            n.id,
            n.hostname,
            state,
            gpus,
            power,
            if n.desired.drain { "yes" } else { "no" },
            n.desired.update_channel,
            os,
            ago(n.last_seen_ms)
        );
    }
    out
}

async fn run(cli: Cli) -> anyhow::Result<String> {
    let config = load_config(&config_path(&cli)?)?;
    match &cli.command {
        Command::Api { node, path } => return stream::api(&config, node, path).await,
        Command::Forward { node, port, listen } => {
            stream::forward(&config, node, *port, listen).await?;
            return Ok(String::new());
        }
        _ => {}
    }
    let ctl = Ctl::new(&config)?;
    let as_json = cli.json;
    let out = |v: &dyn erased_json::Json, table: String| -> anyhow::Result<String> {
        if as_json { v.pretty() } else { Ok(table) }
    };
    match cli.command {
        Command::Tokens {
            action: TokenAction::Create { labels, ttl_hours, max_uses, channel },
        } => {
            let mut map = BTreeMap::new();
            for l in labels {
                let Some((k, v)) = l.split_once('=') else {
                    bail!("--label {l:?} is not KEY=VALUE");
                };
                map.insert(k.to_string(), v.to_string());
            }
            let req =
                TokenCreateRequest { labels: map, ttl_s: ttl_hours * 3600, max_uses, channel };
            let t: TokenCreated = ctl.post("/v1/tokens", &req).await?;
            out(
                &t,
                format!(
                    "# token {} ({} use(s), expires in {} h). Seed: save as /etc/hearth/seed.toml,\n# seed.toml on a vfat partition labelled HEARTH-SEED, or pass as the hearth.seed credential.\n{}",
                    t.id, max_uses, ttl_hours, t.seed
                ),
            )
        }
        Command::Tokens { action: TokenAction::List } => {
            let ts: Vec<TokenView> = ctl.get("/v1/tokens").await?;
            let mut table = format!(
                "{:<12} {:>5} {:>8} {:<8} {:<10} {}\n",
                "TOKEN", "USES", "MAX", "STATE", "CHANNEL", "LABELS"
            );
            for t in &ts {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let state = if t.revoked {
                    "revoked"
                } else if t.expires_ms <= now {
                    "expired"
                } else if t.uses >= t.max_uses {
                    "used"
                } else {
                    "valid"
                };
                let labels: Vec<String> =
                    t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(
                    table,
                    "{:<12} {:>5} {:>8} {:<8} {:<10} {}",
                    t.id,
                    t.uses,
                    t.max_uses,
                    state,
                    t.channel,
                    labels.join(",")
                );
            }
            out(&ts, table)
        }
        Command::Tokens { action: TokenAction::Revoke { id } } => {
            let t: TokenView = ctl.post(&format!("/v1/tokens/{id}/revoke"), &()).await?;
            out(&t, format!("token {} revoked\n", t.id))
        }
        Command::Nodes { action: NodeAction::List } => {
            let ns: Vec<NodeView> = ctl.get("/v1/nodes").await?;
            out(&ns, nodes_table(&ns))
        }
        Command::Nodes { action: NodeAction::Show { id } } => {
            let n: NodeView = ctl.get(&format!("/v1/nodes/{id}")).await?;
            let mut t = nodes_table(std::slice::from_ref(&n));
            let _ = writeln!(
                t,
                "hardware: DMI {} serial {}",
                n.hardware.dmi_uuid, n.hardware.board_serial
            );
            let _ = writeln!(
                t,
                "desired:  generation {} drain {} power budget {} channel {} labels {:?}",
                n.desired.generation,
                n.desired.drain,
                n.desired.power_budget_w.map_or("none".into(), |w| format!("{w} W")),
                n.desired.update_channel,
                n.desired.labels
            );
            if let Some(h) = &n.heartbeat {
                let _ = writeln!(
                    t,
                    "health:   {} GPUs: {} healthy, {} degraded, {} failed; applied generation {}",
                    h.health.gpus,
                    h.health.healthy,
                    h.health.degraded,
                    h.health.failed,
                    h.desired_generation
                );
                let _ = writeln!(
                    t,
                    "agent:    {} (protocol {})",
                    h.versions.agent,
                    n.protocol_version.unwrap_or(0)
                );
            }
            out(&n, t)
        }
        Command::Drain { node } => {
            let n: NodeView =
                ctl.post(&format!("/v1/nodes/{node}/drain"), &DrainRequest { drain: true }).await?;
            out(&n, format!("node {} draining (generation {})\n", n.id, n.desired.generation))
        }
        Command::Undrain { node } => {
            let n: NodeView = ctl
                .post(&format!("/v1/nodes/{node}/drain"), &DrainRequest { drain: false })
                .await?;
            out(&n, format!("node {} undrained (generation {})\n", n.id, n.desired.generation))
        }
        Command::PowerBudget { node, watts } => {
            let req = PowerBudgetRequest { watts: (watts > 0).then_some(watts) };
            let n: NodeView = ctl.post(&format!("/v1/nodes/{node}/power-budget"), &req).await?;
            out(
                &n,
                format!(
                    "node {} power budget {} (generation {})\n",
                    n.id,
                    n.desired.power_budget_w.map_or("cleared".into(), |w| format!("{w} W")),
                    n.desired.generation
                ),
            )
        }
        Command::Channel { node, channel } => {
            let req = ChannelRequest { channel };
            let n: NodeView = ctl.post(&format!("/v1/nodes/{node}/channel"), &req).await?;
            out(
                &n,
                format!(
                    "node {} on update channel {} (generation {})\n",
                    n.id, n.desired.update_channel, n.desired.generation
                ),
            )
        }
        Command::Reboot { node } => {
            let c: CommandView = ctl
                .post(
                    &format!("/v1/nodes/{node}/commands"),
                    &CommandRequest { kind: CommandKind::Reboot },
                )
                .await?;
            out(
                &c,
                format!(
                    "reboot queued as command {} ({})\n",
                    c.id,
                    if c.sent { "sent" } else { "node offline: sent when it connects" }
                ),
            )
        }
        Command::Release { action } => release::run(action, cli.json).await,
        Command::Rollout { action } => {
            use hearth_proto::rollout::Rollout;
            use rollout::RolloutAction as A;
            match action {
                A::Create { channel, version, waves, max_failure_pct, windows, node_timeout } => {
                    let req = rollout::create_request(
                        &channel,
                        &version,
                        &waves,
                        &max_failure_pct,
                        &windows,
                        node_timeout.as_deref(),
                    )?;
                    let r: Rollout = ctl.post("/v1/rollouts", &req).await?;
                    out(&r, rollout::status_text(&r))
                }
                A::Status { id: None } => {
                    let rs: Vec<Rollout> = ctl.get("/v1/rollouts").await?;
                    out(&rs, rollout::list_text(&rs))
                }
                A::Status { id: Some(id) } => {
                    let r: Rollout = ctl.get(&format!("/v1/rollouts/{id}")).await?;
                    out(&r, rollout::status_text(&r))
                }
                A::Pause { id } => {
                    let r: Rollout = ctl.post(&format!("/v1/rollouts/{id}/pause"), &()).await?;
                    out(&r, rollout::status_text(&r))
                }
                A::Resume { id } => {
                    let r: Rollout = ctl.post(&format!("/v1/rollouts/{id}/resume"), &()).await?;
                    out(&r, rollout::status_text(&r))
                }
            }
        }
        Command::Expose { list: true, .. } => expose::list(&ctl, as_json).await,
        Command::Expose { node: Some(node), port: Some(port), .. } => {
            expose::expose(&ctl, &node, port, as_json).await
        }
        Command::Expose { .. } => bail!("expose needs NODE and PORT, or --list"),
        Command::Unexpose { gateway_port } => expose::unexpose(&ctl, gateway_port, as_json).await,
        Command::Exec { .. }
        | Command::Shell { .. }
        | Command::Api { .. }
        | Command::Forward { .. } => {
            bail!(
                "exec, shell, api and forward are served through the tunnel, not this request path"
            )
        }
        Command::Events { limit } => {
            let es: Vec<EventView> = ctl.get(&format!("/v1/events?limit={limit}")).await?;
            let mut t = String::new();
            for e in &es {
                let _ = writeln!(
                    t,
                    "{:>6} {:>10} {:<14} {:<14} {}",
                    e.id,
                    ago(Some(e.at_ms)),
                    e.node_id.as_deref().unwrap_or("-"),
                    e.kind,
                    e.message
                );
            }
            out(&es, t)
        }
    }
}

mod erased_json {
    /// Anything printable as JSON.
    pub trait Json {
        fn pretty(&self) -> anyhow::Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn pretty(&self) -> anyhow::Result<String> {
            Ok(format!("{}\n", serde_json::to_string_pretty(self)?))
        }
    }
}

/// Parse arguments, run, print; an error is printed with its cause chain and exits 1.
#[allow(clippy::print_stdout, clippy::print_stderr)]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hearthctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let streamed = match &cli.command {
        Command::Exec { node, argv } => Some((node.clone(), Some(argv.clone()))),
        Command::Shell { node } => Some((node.clone(), None)),
        _ => None,
    };
    if let Some((node, argv)) = streamed {
        let r = rt.block_on(async {
            let config = load_config(&config_path(&cli)?)?;
            match argv {
                Some(argv) => stream::exec(&config, &node, argv).await,
                None => stream::shell(&config, &node).await,
            }
        });
        return match r {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("hearthctl: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let r = match cli.command {
        Command::Release { action } => rt.block_on(release::run(action, cli.json)),
        _ => rt.block_on(run(cli)),
    };
    match r {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hearthctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
