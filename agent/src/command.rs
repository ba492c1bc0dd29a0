//! [`CommandRunner`]: the narrow trait over running an external program with a timeout (GPU
//! reset through `nvidia-smi`, `dcgmi diag`, burn-in commands). Real: [`SystemRunner`]; fake:
//! `crate::fakes::command::SystemRunner` (scripted answers).

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a finished program left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit status (`None` when killed by a signal).
    pub status: Option<i32>,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl CommandOutput {
    /// Exit status 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
}

/// Why a program could not be run to its end.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// It could not be started (not installed, not executable).
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It ran past its timeout and was killed.
    #[error("{program} ran longer than {timeout_s} s and was killed")]
    Timeout {
        /// The program.
        program: String,
        /// The timeout.
        timeout_s: u64,
    },
    /// An empty command line.
    #[error("empty command line")]
    Empty,
}

/// Runs external programs (blocking).
pub trait CommandRunner: Send + Sync + std::fmt::Debug {
    /// Run `argv` to its end or until `timeout`.
    fn run(&self, argv: &[String], timeout: Duration) -> Result<CommandOutput, CommandError>;
}

/// Runs programs with `std::process`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRunner;

impl CommandRunner for SystemRunner {
    fn run(&self, argv: &[String], timeout: Duration) -> Result<CommandOutput, CommandError> {
        let (program, args) = argv.split_first().ok_or(CommandError::Empty)?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| CommandError::Spawn { program: program.clone(), source })?;
        // Drain both pipes on threads so a chatty program cannot block on a full pipe.
        let pipe = |r: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let out = pipe(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
        let err = pipe(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(CommandError::Timeout {
                        program: program.clone(),
                        timeout_s: timeout.as_secs(),
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(source) => {
                    return Err(CommandError::Spawn { program: program.clone(), source });
                }
            }
        };
        Ok(CommandOutput {
            status: status.code(),
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }
}

/// Replace `{gpu}` in each argument.
pub fn with_gpu(template: &[String], gpu: u32) -> Vec<String> {
    template.iter().map(|a| a.replace("{gpu}", &gpu.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn runs_and_captures() -> Result<(), CommandError> {
        let o = SystemRunner
            .run(&argv(&["sh", "-c", "echo out; echo err >&2; exit 3"]), Duration::from_secs(5))?;
        assert_eq!((o.status, o.stdout.as_str(), o.stderr.as_str()), (Some(3), "out\n", "err\n"));
        Ok(())
    }

    #[test]
    fn timeout_kills_and_missing_program_is_named() {
        let e = SystemRunner.run(&argv(&["sleep", "5"]), Duration::from_millis(100));
        assert!(matches!(e, Err(CommandError::Timeout { .. })), "{e:?}");
        let e = SystemRunner.run(&argv(&["/nonexistent/nvidia-smi"]), Duration::from_secs(1));
        assert!(
            matches!(e, Err(CommandError::Spawn { ref program, .. }) if program == "/nonexistent/nvidia-smi"),
            "{e:?}"
        );
        assert_eq!(with_gpu(&argv(&["-i", "{gpu}"]), 3), argv(&["-i", "3"]));
    }
}
