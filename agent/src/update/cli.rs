//! `hearth-agent update status|apply|check`: run in their own process (the boot check unit, an
//! operator, the QEMU tests) with the agent's configuration; they read the running agent's API
//! for health, and act on the disk themselves.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use hearth_fleet_client::release::ReleaseVersion;

use super::state::UpdateState;
use super::{ApplyRequest, system};
use crate::config::Config;
use crate::render;

/// `hearth-agent update ...`
#[derive(Debug, Subcommand)]
pub enum UpdateCmd {
    /// Where the update is: phase, bytes, versions, anti-rollback floor, last reason.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify the signed metadata, download the release and write it to the inactive slot.
    // `--version V` is the release to install: not the version flag the top-level command
    // propagates (clap's debug build asserts on the clash).
    #[command(disable_version_flag = true)]
    Apply {
        /// Install this version (default: the channel's newest).
        #[arg(long)]
        version: Option<ReleaseVersion>,
        /// Reboot into the new slot when it is installed.
        #[arg(long)]
        reboot: bool,
        /// Boot tries of the new entry before systemd-boot falls back to the old slot (1..=9).
        #[arg(long, default_value_t = super::BOOT_TRIES, value_parser = clap::value_parser!(u32).range(1..=9))]
        tries: u32,
    },
    /// The boot check (`hearth-boot-check.service`): on a trial boot, wait up to
    /// `update.check_timeout_s` for the agent, the fleet session and GPU health; on failure mark
    /// the entry bad and reboot into the old slot. Exit 0: passed or nothing to check.
    Check {
        /// Do not reboot on failure (the entry is still marked bad).
        #[arg(long)]
        no_reboot: bool,
    },
    /// Fail a trial boot without checking: record the reason, mark the entry bad and reboot into
    /// the old slot. Run by `hearth-boot-check` when the agent never answered, and by
    /// `hearth-boot-check-failed.service` when the check was killed or crashed. Exit 0 also when
    /// no update is on trial (nothing to do).
    Fallback {
        /// Why the trial failed (sent to the fleet with the rollback report).
        #[arg(long)]
        reason: String,
        /// Do not reboot (the entry is still marked bad).
        #[arg(long)]
        no_reboot: bool,
    },
}

/// One line per field.
pub fn render_state(s: &UpdateState) -> String {
    let mut out = format!("update: {}", s.phase.as_str());
    if let Some(t) = &s.target {
        out.push_str(&format!("  target {} ({})", t.version, t.channel));
    }
    if let Some(f) = &s.from_version {
        out.push_str(&format!("  from {f}"));
    }
    out.push('\n');
    if s.bytes_total > 0 {
        let pct = s.bytes_done as f64 * 100.0 / s.bytes_total as f64;
        out.push_str(&format!("  bytes {} / {} ({pct:.1} %)\n", s.bytes_done, s.bytes_total));
    }
    if let Some(a) = &s.anti_rollback {
        out.push_str(&format!("  anti-rollback version {a}\n"));
    }
    if let Some(r) = &s.reason {
        out.push_str(&format!("  reason: {r}\n"));
    }
    out
}

/// Run an update subcommand. Returns the exit code.
pub async fn run(config_path: &Path, socket: &Path, cmd: UpdateCmd) -> anyhow::Result<i32> {
    let config = Config::load(config_path)?;
    let socket: PathBuf = if socket.as_os_str().is_empty() {
        config.api.socket.clone()
    } else {
        socket.to_path_buf()
    };
    match cmd {
        UpdateCmd::Status { json } => {
            // With updates on, reconcile with this boot first: a blessed entry raises the
            // anti-rollback version, a fallback is recorded as a rollback. Nothing else did it
            // between the boot check and the next apply (hearth-update-reconcile.service runs
            // this after systemd-bless-boot). A failure leaves the state as it was and is shown.
            if config.update.urls().is_some()
                && let Err(e) = system::updater(&config).and_then(|u| u.boot_reconcile())
            {
                tracing::warn!(error = %e, "update status: not reconciled with this boot");
            }
            let state = stored_state(&config)?;
            if json {
                render::out(&serde_json::to_string_pretty(&state)?);
            } else {
                render::out(&render_state(&state));
            }
            Ok(0)
        }
        UpdateCmd::Apply { version, reboot, tries } => {
            let updater = system::updater(&config)?.with_boot_tries(tries);
            let health = match crate::api::client::Client::new(&socket)
                .get::<hearth_proto::api::NodeStatus>("/v1/status")
                .await
            {
                Ok(s) => system::snapshot(&s),
                Err(e) => anyhow::bail!("the agent must run for an update (health snapshot): {e}"),
            };
            let state =
                updater.apply(ApplyRequest { version, channel: None, reboot, health }).await?;
            render::out(&render_state(&state));
            Ok(0)
        }
        UpdateCmd::Check { no_reboot } => {
            // An image whose updates are off still runs the boot check: with no update on
            // trial there is nothing to check, and the boot is good.
            if config.update.urls().is_none() {
                let state = stored_state(&config)?;
                if !trial(&state) {
                    render::out(
                        "update check: updates are off and no update is on trial, nothing to check",
                    );
                    return Ok(0);
                }
            }
            let updater = system::updater(&config)?;
            let bound = Duration::from_secs(config.update.check_timeout_s);
            match updater.check(bound, !no_reboot, || system::observe(&socket)).await? {
                None => {
                    render::out("update check: not a trial boot, nothing to check");
                    Ok(0)
                }
                Some(Ok(())) => {
                    render::out("update check: passed");
                    Ok(0)
                }
                Some(Err(reason)) => {
                    render::err(&format!("update check failed: {reason}"));
                    Ok(1)
                }
            }
        }
        UpdateCmd::Fallback { reason, no_reboot } => {
            let reason = reason.trim();
            if reason.is_empty() {
                anyhow::bail!("update fallback: --reason must say why the trial failed");
            }
            // Updates off: an entry can still be on trial from before they were turned off.
            if config.update.urls().is_none() && !trial(&stored_state(&config)?) {
                render::out("update fallback: no update is on trial, nothing to do");
                return Ok(0);
            }
            if system::updater(&config)?.fallback(reason, !no_reboot)? {
                render::out(&format!(
                    "update fallback: the trial failed ({reason}); entry marked bad"
                ));
            } else {
                render::out("update fallback: not a trial boot, nothing to do");
            }
            Ok(0)
        }
    }
}

/// The update state as persisted (`state.dir/update.json`), without reconciling it with this
/// boot; the default when there is none yet.
fn stored_state(config: &Config) -> anyhow::Result<UpdateState> {
    let store = crate::persist::Store::new(config.state.dir.join("update.json"));
    Ok(store.load()?.map(|l| l.state).unwrap_or_default())
}

/// Whether `state` is a trial boot of a new version (what `update check` judges).
fn trial(state: &UpdateState) -> bool {
    state.phase == super::state::Phase::Trial
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent configuration with updates off and its state in a temporary directory.
    fn updates_off() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!("[state]\ndir = \"{}\"\n", dir.path().join("state").display()),
        )
        .expect("config");
        (dir, config)
    }

    #[tokio::test]
    async fn check_passes_when_updates_are_off_and_nothing_is_on_trial() {
        let (dir, config) = updates_off();
        let code = run(&config, Path::new(""), UpdateCmd::Check { no_reboot: true })
            .await
            .expect("check runs");
        assert_eq!(code, 0, "an image with updates off passes its boot check");
        // On trial with updates off is a configuration error, not a pass.
        std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
        let state = UpdateState { phase: super::super::state::Phase::Trial, ..Default::default() };
        crate::persist::Store::new(dir.path().join("state/update.json"))
            .save(1, &state)
            .expect("save");
        let r = run(&config, Path::new(""), UpdateCmd::Check { no_reboot: true }).await;
        assert!(r.is_err_and(|e| format!("{e:#}").contains("updates are off")));
    }

    #[tokio::test]
    async fn fallback_needs_a_reason_and_does_nothing_with_nothing_on_trial() {
        let (dir, config) = updates_off();
        let fallback =
            |reason: &str| UpdateCmd::Fallback { reason: reason.into(), no_reboot: true };
        let r = run(&config, Path::new(""), fallback("  ")).await;
        assert!(r.is_err_and(|e| format!("{e:#}").contains("--reason")));
        let code = run(&config, Path::new(""), fallback("boot check: agent=failed"))
            .await
            .expect("fallback runs");
        assert_eq!(code, 0, "nothing on trial: nothing to do");
        assert!(!dir.path().join("state/update.json").exists(), "no state written");
    }
}
