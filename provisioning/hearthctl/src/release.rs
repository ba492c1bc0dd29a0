//! `hearthctl release keys init|sign`: signing keys and signed releases, on the operator's
//! machine and never on the fleet (`hearth_fleet_client::release`, `docs/0009-updates.md`).

use std::path::PathBuf;

use clap::Subcommand;
use hearth_fleet_client::release::{self, KeysSpec, ReleaseVersion, RoleSpec, SignSpec};

/// `hearthctl release ...`
#[derive(Debug, Subcommand)]
pub enum ReleaseAction {
    /// Signing keys.
    Keys {
        /// What to do.
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Add a release made by `image/build` to a TUF repository directory (made if missing):
    /// copies `hearth_V.root.raw`, `hearth_V.root-verity.raw` and `hearth_V.efi` into
    /// `OUT/targets/` and signs new targets, snapshot and timestamp metadata.
    Sign {
        /// The image build's output directory.
        #[arg(long)]
        artifacts: PathBuf,
        /// The release version (dotted numbers); must be above the channel's newest.
        #[arg(long)]
        version: ReleaseVersion,
        /// The channel.
        #[arg(long, default_value = "stable")]
        channel: String,
        /// The keys directory (`release keys init`).
        #[arg(long)]
        keys: PathBuf,
        /// The repository directory.
        #[arg(long)]
        out: PathBuf,
        /// Days until the new metadata expires (a node refuses expired metadata).
        #[arg(long, default_value_t = 30)]
        expires_days: i64,
    },
}

/// `hearthctl release keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Generate Ed25519 keys per TUF role and the signed `root.json` the nodes trust (build it
    /// into the image with `image/build --update-root DIR/root.json`).
    Init {
        /// Directory for the keys (made if missing; keep the root keys offline).
        #[arg(long)]
        dir: PathBuf,
        /// Root keys.
        #[arg(long, default_value_t = 1)]
        root_keys: u64,
        /// Root signatures required.
        #[arg(long, default_value_t = 1)]
        root_threshold: u64,
        /// Targets keys (they sign releases).
        #[arg(long, default_value_t = 1)]
        targets_keys: u64,
        /// Targets signatures required.
        #[arg(long, default_value_t = 1)]
        targets_threshold: u64,
        /// Days the root is valid.
        #[arg(long, default_value_t = 365)]
        expires_days: i64,
    },
}

/// Run a release subcommand; returns what to print.
pub async fn run(action: ReleaseAction, json: bool) -> anyhow::Result<String> {
    match action {
        ReleaseAction::Keys {
            action:
                KeysAction::Init {
                    dir,
                    root_keys,
                    root_threshold,
                    targets_keys,
                    targets_threshold,
                    expires_days,
                },
        } => {
            let mut spec = KeysSpec::simple(root_keys, root_threshold, expires_days);
            spec.targets = RoleSpec { keys: targets_keys, threshold: targets_threshold };
            let root = release::init_keys(&dir, &spec).await?;
            Ok(if json {
                format!("{}\n", serde_json::json!({ "root": root }))
            } else {
                format!(
                    "keys in {}; trusted root {} (ship it in the image: image/build --update-root)\n",
                    dir.display(),
                    root.display()
                )
            })
        }
        ReleaseAction::Sign { artifacts, version, channel, keys, out, expires_days } => {
            let spec = SignSpec {
                artifacts,
                version,
                channel,
                keys,
                out: out.clone(),
                expires: release::days_from_now(expires_days),
            };
            let r = release::sign_release(&spec).await?;
            Ok(if json {
                format!("{}\n", serde_json::to_string_pretty(&r)?)
            } else {
                format!(
                    "release {} ({}) signed: {} bytes, metadata version {}, {} releases in {}\n",
                    r.release.version,
                    r.release.channel,
                    r.release.total_bytes(),
                    r.metadata_version,
                    r.releases,
                    out.display()
                )
            })
        }
    }
}
