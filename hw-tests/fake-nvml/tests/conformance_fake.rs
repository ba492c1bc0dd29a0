//! The conformance suite on the `nvml` backend over the fake `libnvidia-ml.so`, and the
//! sim-versus-NVML equality test.
//!
//! Each test runs in its own process (see `common`): the fake loads the case's scenario from
//! `HEARTH_FAKE_NVML_SCENARIO` at `nvmlInit`, on a manual clock moved through its control socket.
//! The library is found next to this test binary; if it is missing the tests fail and say how to
//! build it (cargo builds it whenever it builds these tests).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use common::{env_path, in_fake, open_fake};
use hearth_agent::gpu::nvml::NvmlBackend;
use hearth_agent::gpu::sim::SimBackend;
use hearth_agent::gpu::{GpuBackend, GpuError};
use hearth_fake_nvml::{ENV_CLOCK, ENV_DRIVER, ENV_LIBRARY, ENV_SCENARIO};
use hearth_hw_tests::conformance::{self, SimControl};
use hearth_sim::{Scenario, SimClock, SimHost};

fn case(test: &str) -> anyhow::Result<()> {
    let case = conformance::case(test)?;
    in_fake(test, Some(case.scenario), &[], || {
        let (backend, control) = open_fake()?;
        ensure!(backend.kind() == "nvml");
        (case.run)(&backend, &control)
    })?;
    Ok(())
}

hearth_hw_tests::conformance_tests!(case);

/// The strongest check: the same scenario on the `sim` backend (in process) and on the `nvml`
/// backend over the fake library, driven by the same script to the same manual times, gives
/// identical driver info, inventories, samples and errors.
#[test]
fn equality_sim_vs_nvml() -> anyhow::Result<()> {
    in_fake("equality_sim_vs_nvml", Some(conformance::EQUALITY), &[], || {
        let (nvml, control) = open_fake()?;
        let scenario = Scenario::load(&env_path(ENV_SCENARIO)?)?;
        ensure!(scenario == conformance::equality_scenario()?);
        let host = Arc::new(SimHost::new(&scenario, SimClock::Manual));
        let sim = SimBackend::new(host.clone());
        conformance::equality((&sim, host.as_ref() as &dyn SimControl), (&nvml, &control))
    })?;
    Ok(())
}

#[test]
fn open_missing_library_is_library_not_found() {
    let e = NvmlBackend::open(std::path::Path::new("/nonexistent/libnvidia-ml.so.1"));
    assert!(matches!(e, Err(GpuError::LibraryNotFound { .. })), "{e:?}");
}

#[test]
fn open_a_library_that_is_not_nvml_is_library_not_found() -> anyhow::Result<()> {
    // libc loads but has no nvmlInit_v2.
    match NvmlBackend::open(std::path::Path::new("libc.so.6")) {
        Err(GpuError::LibraryNotFound { path, source }) => {
            assert_eq!(path, "libc.so.6");
            assert!(source.to_string().contains("nvmlInit_v2"), "{source}");
            Ok(())
        }
        other => bail!("expected LibraryNotFound, got {other:?}"),
    }
}

#[test]
fn open_with_the_driver_unloaded_is_driver_not_loaded() -> anyhow::Result<()> {
    let extra = [(ENV_DRIVER, "unloaded".into())];
    in_fake("open_with_the_driver_unloaded_is_driver_not_loaded", None, &extra, || {
        let lib = env_path(ENV_LIBRARY)?;
        match NvmlBackend::open(&lib) {
            Err(GpuError::DriverNotLoaded { path }) => {
                ensure!(path == lib.display().to_string(), "{path}");
                Ok(())
            }
            other => bail!("expected DriverNotLoaded, got {other:?}"),
        }
    })?;
    Ok(())
}

#[test]
fn a_bad_scenario_fails_init_and_says_why_once() -> anyhow::Result<()> {
    let bad = "[[gpu]]\nprofile = \"a100-imaginary\"\n";
    let out = in_fake("a_bad_scenario_fails_init_and_says_why_once", Some(bad), &[], || {
        let lib = env_path(ENV_LIBRARY)?;
        for _ in 0..2 {
            match NvmlBackend::open(&lib) {
                Err(GpuError::Call { op: "nvmlInit", .. }) => {}
                other => bail!("expected an nvmlInit failure, got {other:?}"),
            }
        }
        Ok(())
    })?;
    if let Some(out) = out {
        let needle = "hearth-fake-nvml: nvmlInit fails: HEARTH_FAKE_NVML_SCENARIO";
        assert_eq!(out.stderr.matches(needle).count(), 1, "stderr: {}", out.stderr);
        assert!(out.stderr.contains("a100-imaginary"), "stderr: {}", out.stderr);
    }
    Ok(())
}

#[test]
fn event_wait_honours_its_timeout() -> anyhow::Result<()> {
    in_fake("event_wait_honours_its_timeout", None, &[], || {
        let (backend, _control) = open_fake()?;
        let mut events = backend.events()?;
        let t0 = Instant::now();
        ensure!(events.wait(Duration::from_millis(300))?.is_none());
        let waited = t0.elapsed();
        ensure!(waited >= Duration::from_millis(300), "returned after {waited:?}");
        ensure!(waited < Duration::from_millis(1_500), "returned after {waited:?}");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_scaled_real_clock_moves_without_advances() -> anyhow::Result<()> {
    let extra = [(ENV_CLOCK, "50".into())];
    in_fake("a_scaled_real_clock_moves_without_advances", None, &extra, || {
        let (backend, _control) = open_fake()?;
        let e0 = backend.sample(0)?.energy_mj;
        std::thread::sleep(Duration::from_millis(200));
        let e1 = backend.sample(0)?.energy_mj;
        // 0.2 s × 50 = 10 simulated seconds at ~700 W: ~7 000 000 mJ.
        ensure!(e1 > e0 + 3_000_000, "energy {e0} -> {e1} mJ");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn the_driver_outlives_a_backend() -> anyhow::Result<()> {
    in_fake("the_driver_outlives_a_backend", None, &[], || {
        let (first, control) = open_fake()?;
        control.advance(2_000)?;
        let before = first.sample(0)?;
        drop(first);
        let lib = env_path(ENV_LIBRARY)?;
        let second = NvmlBackend::open(&lib).context("reopen")?;
        ensure!(second.sample(0)? == before, "same simulation after nvmlShutdown and nvmlInit");
        Ok(())
    })?;
    Ok(())
}

/// The power controller's actuation path over NVML: Hearth's control loop (the agent's code:
/// inputs from samples, `Controller::tick`, `actuate`) drives four training H100s of the fake
/// library to a 1600 W budget, through `nvmlDeviceSetPowerManagementLimit`; leaving safe caps
/// then sets budget / GPUs on each.
#[test]
fn power_control_through_the_fake_library() -> anyhow::Result<()> {
    use hearth_agent::gpu::inventory_all;
    use hearth_agent::power::{Controller, GpuInput, Policy, PowerParams, actuate, leave_safe};
    use hearth_proto::api::{PowerMode, PowerSettings};

    const FOUR_H100: &str =
        "seed = 4\n[[gpu]]\nprofile = \"h100-sxm\"\ncount = 4\nworkload = \"training\"\n";
    in_fake("power_control_through_the_fake_library", Some(FOUR_H100), &[], || {
        let (backend, control) = open_fake()?;
        let inventory = inventory_all(&backend)?;
        let settings = PowerSettings { budget_w: Some(1600), ..PowerSettings::default() };
        let mut controller = Controller::new(PowerParams::default());
        let mut gpus = Vec::new();
        for period in 0..10 {
            gpus = inventory
                .iter()
                .map(|i| GpuInput::new(i, backend.sample(i.index).ok().as_ref(), 0.0))
                .collect::<Vec<_>>();
            let d = controller.tick(f64::from(period), &settings, &gpus);
            ensure!(d.mode == PowerMode::Budget, "{d:?}");
            let failed = actuate(&backend, &gpus, &d);
            ensure!(failed.is_empty(), "{failed:?}");
            control.advance(1_000)?;
        }
        let mut draw = 0;
        let mut limits = 0;
        for i in &inventory {
            let s = backend.sample(i.index)?;
            draw += s.power_avg_mw;
            limits += s.power_limit_mw;
        }
        ensure!(draw <= 1_632_000, "draw {draw} mW over a 1600 W budget");
        ensure!(draw >= 1_400_000, "draw {draw} mW: the budget is used");
        ensure!(limits < 4 * 700_000, "limits were set: {limits} mW");
        let failed = leave_safe(&backend, &settings, &gpus, controller.locked_clocks(), false);
        ensure!(failed.is_empty(), "{failed:?}");
        control.advance(1_000)?;
        for i in &inventory {
            ensure!(backend.sample(i.index)?.power_limit_mw == 400_000, "GPU {}", i.index);
        }
        Ok(())
    })?;
    Ok(())
}
