//! Rebooting the node on the fleet's command: `systemctl reboot` on a real node; a simulated node
//! only logs it.

/// Why a reboot could not be started.
#[derive(Debug, thiserror::Error)]
#[error("systemctl reboot failed: {0}")]
pub struct RebootError(pub String);

/// Reboots the machine.
pub trait Rebooter: Send + Sync + std::fmt::Debug {
    /// Start a reboot.
    fn reboot(&self) -> Result<(), RebootError>;
}

/// `systemctl reboot`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemctlReboot;

impl Rebooter for SystemctlReboot {
    fn reboot(&self) -> Result<(), RebootError> {
        let out = std::process::Command::new("systemctl")
            .arg("reboot")
            .output()
            .map_err(|e| RebootError(e.to_string()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(RebootError(String::from_utf8_lossy(&out.stderr).trim().to_string()))
        }
    }
}

/// A simulated node: logs the reboot, reboots nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimReboot;

impl Rebooter for SimReboot {
    fn reboot(&self) -> Result<(), RebootError> {
        tracing::warn!("fleet asked for a reboot: simulated node, nothing rebooted");
        Ok(())
    }
}
