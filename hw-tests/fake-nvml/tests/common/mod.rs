//! Shared by the fake library's integration tests: find the built `.so`, give each test a fresh
//! process with its own scenario, control socket and manual clock.
//!
//! Each test re-runs its own test binary for itself alone ([`hearth_hw_tests::isolate`]): the
//! fake's simulation is process-global, like a driver. That makes the tests correct under plain
//! `cargo test` (threads of one process) as well as under nextest (a process per test).

#![allow(dead_code)] // each test binary uses part of this module

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context as _;
use hearth_agent::gpu::nvml::NvmlBackend;
use hearth_fake_nvml::control::ControlClient;
use hearth_fake_nvml::{ENV_CLOCK, ENV_CONTROL, ENV_DRIVER, ENV_LIBRARY, ENV_SCENARIO, locate};
use hearth_hw_tests::conformance::SimControl;
use hearth_hw_tests::isolate::{self, ChildOutput};
use hearth_sim::{Fault, Workload};

/// The fake's control socket as a [`SimControl`].
#[derive(Debug)]
pub struct FakeControl(pub ControlClient);

impl SimControl for FakeControl {
    fn advance(&self, ms: u64) -> anyhow::Result<()> {
        Ok(self.0.advance(ms)?)
    }

    fn inject(&self, gpu: u32, fault: Fault) -> anyhow::Result<()> {
        Ok(self.0.inject(gpu, fault)?)
    }

    fn set_workload(&self, gpu: u32, workload: Workload) -> anyhow::Result<()> {
        Ok(self.0.set_workload(gpu, workload)?)
    }

    fn reset(&self, gpu: u32) -> anyhow::Result<()> {
        Ok(self.0.reset(gpu)?)
    }
}

/// A path the parent passed in the environment.
pub fn env_path(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os(name).map(PathBuf::from).with_context(|| format!("{name} is not set"))
}

/// In the child: the `nvml` backend over the fake library, and its control socket.
pub fn open_fake() -> anyhow::Result<(NvmlBackend, FakeControl)> {
    let backend = NvmlBackend::open(&env_path(ENV_LIBRARY)?)?;
    let control = ControlClient::connect(&env_path(ENV_CONTROL)?)?;
    Ok((backend, FakeControl(control)))
}

/// In the child: the control socket alone (for tests that call the C functions themselves).
pub fn control() -> anyhow::Result<ControlClient> {
    Ok(ControlClient::connect(&env_path(ENV_CONTROL)?)?)
}

/// Run `body` in a fresh process whose fake library loads `scenario` (TOML; `None`: the
/// built-in 8× H100 node), on a manual clock, with a control socket; `extra` overrides
/// variables. Fails, saying how to build it, when the library is not built. Returns the child's
/// output in the parent, `None` in the child.
pub fn in_fake(
    test: &str,
    scenario: Option<&str>,
    extra: &[(&str, OsString)],
    body: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Option<ChildOutput>> {
    if isolate::is_child(test) {
        body()?;
        return Ok(None);
    }
    let library = locate::library().map_err(anyhow::Error::msg)?;
    let dir = tempfile::tempdir()?;
    let scenario_path = match scenario {
        Some(text) => {
            let p = dir.path().join("scenario.toml");
            std::fs::write(&p, text)?;
            p.into_os_string()
        }
        None => OsString::new(),
    };
    let mut env: Vec<(&str, OsString)> = vec![
        (ENV_LIBRARY, library.into_os_string()),
        (ENV_SCENARIO, scenario_path),
        (ENV_CLOCK, "manual".into()),
        (ENV_CONTROL, dir.path().join("control.sock").into_os_string()),
        (ENV_DRIVER, "loaded".into()),
    ];
    for (k, v) in extra {
        env.retain(|(name, _)| name != k);
        env.push((k, v.clone()));
    }
    let out = isolate::run_child(test, &env)?;
    drop(dir);
    Ok(Some(out))
}
