//! Building an [`Updater`] from the configuration with the real touchpoints, and what the boot
//! check and `update apply` read from the running agent's API.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hearth_proto::api::{GpuVerdict, NodeStatus, SubsystemState};

use super::fetch::Fetcher;
use super::platform::{DirEsp, GptSlotDisk, SystemdBoot, uuids_from_roothash};
use super::state::HealthSnapshot;
use super::{Observed, Platform, RepoSource, UpdateError, Updater};
use crate::api::client::Client;
use crate::command::SystemRunner;
use crate::config::Config;
use crate::fleet::reboot::SystemctlReboot;

/// The updater of this machine, or an error naming the missing key.
pub fn updater(config: &Config) -> Result<Updater, UpdateError> {
    let u = &config.update;
    let (metadata_url, targets_url) = match u.urls() {
        None => {
            return Err(UpdateError::Config {
                key: "metadata_url",
                problem: "not set: updates are off".into(),
            });
        }
        Some(Err(e)) => {
            return Err(UpdateError::Config { key: "metadata_url", problem: e.to_string() });
        }
        Some(Ok(p)) => p,
    };
    let ca = match &u.ca {
        Some(p) => Some(std::fs::read(p).map_err(|e| UpdateError::Config {
            key: "ca",
            problem: format!("{}: {e}", p.display()),
        })?),
        None => None,
    };
    let fetcher = Fetcher::new(ca.as_deref(), Duration::from_secs(u.request_timeout_s))?;
    let runner = Arc::new(SystemRunner);
    let boot = Arc::new(SystemdBoot::new(runner.clone()));
    let disk = match &u.disk {
        Some(d) => d.clone(),
        None => {
            use super::platform::BootControl;
            let hash = boot.roothash()?.ok_or_else(|| UpdateError::Config {
                key: "disk",
                problem: "unset, and no roothash= on the kernel command line to find it".into(),
            })?;
            let (uuid, _) = uuids_from_roothash(&hash).ok_or_else(|| UpdateError::Config {
                key: "disk",
                problem: format!("roothash={hash} is not 64 hex digits"),
            })?;
            GptSlotDisk::disk_of(&Path::new("/dev/disk/by-partuuid").join(uuid))?
        }
    };
    let platform = Platform {
        disk: Arc::new(GptSlotDisk::new(disk, runner)),
        esp: Arc::new(DirEsp::new(&u.esp)),
        boot,
        rebooter: Arc::new(SystemctlReboot),
    };
    let source = RepoSource {
        root: u.root.clone(),
        metadata_url,
        targets_url,
        datastore: config.state.dir.join("update/tuf"),
        limits: u.limits(),
    };
    Ok(Updater::new(source, u.channel.clone(), fetcher, platform, &config.state.dir))
}

/// Health as the agent's status reports it.
pub fn snapshot(status: &NodeStatus) -> HealthSnapshot {
    let healthy = status.gpus.iter().filter(|g| g.health.verdict == GpuVerdict::Healthy).count();
    HealthSnapshot {
        gpus: u32::try_from(status.gpus.len()).unwrap_or(u32::MAX),
        healthy_gpus: u32::try_from(healthy).unwrap_or(u32::MAX),
        enrolled: status.fleet.node_id.is_some(),
    }
}

/// How long one look at the agent's API may take before it counts as "not answering": an agent
/// that accepts the connection and never replies must not hold the boot check past its bound.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the boot check sees through the agent's API socket.
pub async fn observe(socket: &Path) -> Observed {
    let down = |why: String| Observed {
        agent_up: Some(format!("API {}: {why}", socket.display())),
        fleet_state: "unknown".into(),
        health: HealthSnapshot::default(),
    };
    let client = Client::new(socket);
    match tokio::time::timeout(OBSERVE_TIMEOUT, client.get::<NodeStatus>("/v1/status")).await {
        Err(_) => down(format!("no answer within {} s", OBSERVE_TIMEOUT.as_secs())),
        Ok(Err(e)) => down(e.to_string()),
        Ok(Ok(status)) => {
            let failed: Vec<String> = status
                .subsystems
                .iter()
                .filter(|s| s.state == SubsystemState::Failed && s.name != "gpu-sampler")
                .map(|s| s.name.clone())
                .collect();
            Observed {
                agent_up: (!failed.is_empty())
                    .then(|| format!("failed subsystems: {}", failed.join(", "))),
                fleet_state: status.fleet.state.clone(),
                health: snapshot(&status),
            }
        }
    }
}
