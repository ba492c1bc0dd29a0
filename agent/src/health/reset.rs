//! [`GpuReset`]: the narrow trait over resetting one GPU. Real: [`NvidiaSmiReset`] (the
//! driver's reset, `nvidia-smi -r -i N`, through a [`CommandRunner`]); fake:
//! [`crate::fakes::reset::SimReset`], the simulator's `reset_gpu` (used by the `sim` backend). The engine resets only idle GPUs; the executor checks the process list again
//! right before calling [`GpuReset::reset`].

use std::sync::Arc;
use std::time::Duration;

use crate::command::{CommandError, CommandRunner, with_gpu};

/// Why a reset failed. Names the GPU.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// The reset command could not run.
    #[error("GPU {gpu}: reset command failed to run")]
    Run {
        /// The GPU.
        gpu: u32,
        /// Why.
        #[source]
        source: CommandError,
    },
    /// The reset command ran and refused.
    #[error("GPU {gpu}: reset refused (exit {status:?}): {output}")]
    Refused {
        /// The GPU.
        gpu: u32,
        /// Exit status.
        status: Option<i32>,
        /// Its last output line.
        output: String,
    },
    /// The GPU still has compute processes.
    #[error("GPU {gpu}: not idle ({processes} compute processes); reset skipped")]
    Busy {
        /// The GPU.
        gpu: u32,
        /// How many.
        processes: usize,
    },
    /// The backend refused (simulator: lost GPU).
    #[error("GPU {gpu}: reset failed: {message}")]
    Backend {
        /// The GPU.
        gpu: u32,
        /// What it said.
        message: String,
    },
}

/// Resets one GPU (blocking).
pub trait GpuReset: Send + Sync + std::fmt::Debug {
    /// Reset GPU `gpu` (NVML index).
    fn reset(&self, gpu: u32) -> Result<(), ResetError>;
}

/// The driver's reset through `nvidia-smi -r -i N` (the command is `reset.command`).
#[derive(Debug, Clone)]
pub struct NvidiaSmiReset {
    runner: Arc<dyn CommandRunner>,
    command: Vec<String>,
    timeout: Duration,
}

impl NvidiaSmiReset {
    /// Reset with `command` (`{gpu}` replaced) through `runner`.
    pub fn new(runner: Arc<dyn CommandRunner>, command: Vec<String>, timeout: Duration) -> Self {
        Self { runner, command, timeout }
    }
}

impl GpuReset for NvidiaSmiReset {
    fn reset(&self, gpu: u32) -> Result<(), ResetError> {
        let out = self
            .runner
            .run(&with_gpu(&self.command, gpu), self.timeout)
            .map_err(|source| ResetError::Run { gpu, source })?;
        if out.success() {
            Ok(())
        } else {
            let text = if out.stderr.trim().is_empty() { &out.stdout } else { &out.stderr };
            Err(ResetError::Refused {
                gpu,
                status: out.status,
                output: text.trim().lines().last().unwrap_or("").to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::CommandOutput;
    use crate::fakes::command::SystemRunner;

    #[test]
    fn runs_nvidia_smi_for_the_gpu_and_reports_refusals() {
        let runner = Arc::new(SystemRunner::default());
        runner.answer(CommandOutput {
            status: Some(0),
            stdout: "GPU reset".into(),
            stderr: String::new(),
        });
        let r = NvidiaSmiReset::new(
            runner.clone(),
            crate::health::policy::ResetPolicy::default().command,
            Duration::from_secs(5),
        );
        assert!(r.reset(3).is_ok());
        assert_eq!(runner.calls()[0], ["nvidia-smi", "-r", "-i", "3"]);
        runner.answer(CommandOutput {
            status: Some(255),
            stdout: String::new(),
            stderr: "GPU 00000000:13:00.0 is currently in use by another process.\n".into(),
        });
        let e = r.reset(1).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("GPU 1") && e.contains("in use"), "{e}");
    }
}
