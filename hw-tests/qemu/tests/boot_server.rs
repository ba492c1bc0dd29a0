//! Boot test of the `server` image in QEMU, where there is no NVIDIA device (`#[ignore]`d and not
//! in CI: the server profile is built by hand, `image/build --profile server`; see
//! `image/README.md`).
//!
//! Asserts that the agent comes up READY, in state `degraded` with no GPU, without restarting
//! (no crash loop), and that the console says why on its `gpus:` line.
//!
//! `HEARTH_IMAGE` (default `target/image/server/hearth_<version>.raw`), `HEARTH_QEMU_ACCEL`,
//! `HEARTH_BOOT_TIMEOUT` (seconds, default 600).

#![allow(clippy::print_stdout)] // the boot time and the console line are the output

use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_qemu::{Accel, Vm, VmConfig, field, overlay};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn image() -> PathBuf {
    std::env::var_os("HEARTH_IMAGE").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(format!("target/image/server/hearth_{}.raw", env!("CARGO_PKG_VERSION")))
    })
}

#[test]
#[ignore = "needs the server image (image/build --profile server); run by hand"]
fn server_image_boots_without_gpu() {
    // Display, not Debug: a timeout carries the console's last lines.
    if let Err(e) = boot() {
        panic!("{e}");
    }
}

fn boot() -> TestResult {
    let image = image();
    // Kept after the run: the console log (target/qemu/boot_server/console.log) is what to read when
    // this test fails; the next run starts it afresh.
    let work = hearth_qemu::work_dir("boot_server")?;
    let disk = work.join("disk.qcow2");
    overlay(&image, &disk, 8)?;
    let kernel = image.with_extension("vmlinuz");
    let mut config = VmConfig::new(&disk, work.as_path())?;
    config.accel = Accel::detect(kernel.exists().then_some(kernel.as_path()));
    let timeout = Duration::from_secs(
        std::env::var("HEARTH_BOOT_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(600),
    );
    let mut vm = Vm::start(&config)?;
    let check = vm.wait_for("HEARTH-BOOT-CHECK", timeout, |l| l.contains("HEARTH-BOOT-CHECK "))?;
    let line = check.text.clone();
    assert!(line.contains("HEARTH-BOOT-CHECK OK "), "boot check failed: {line}\n{}", vm.tail(60));
    assert_eq!(field(&line, "agent"), Some("active"), "{line}");
    assert_eq!(field(&line, "state"), Some("degraded"), "{line}");
    assert_eq!(field(&line, "gpus"), Some("0"), "{line}");
    assert_eq!(field(&line, "restarts"), Some("0"), "the agent restarted: {line}");
    assert_eq!(field(&line, "seed"), Some("none"), "{line}");
    assert!(line.contains("failing: gpu-sampler"), "agent status line: {line}");
    let gpus = vm.wait_for("console gpus line", Duration::from_secs(60), |l| {
        l.starts_with("gpus:") && l.contains("none: ")
    })?;
    assert!(
        gpus.text.contains("NVML library") || gpus.text.contains("NVIDIA"),
        "the console does not say why there is no GPU: {}",
        gpus.text
    );
    let exit = vm.powerdown(Duration::from_secs(120))?;
    assert!(exit.success(), "QEMU exit after power-off: {exit}");
    println!(
        "server image: agent ready without GPU at {:.1} s ({:?}); console: {}",
        check.at.as_secs_f64(),
        config.accel,
        gpus.text
    );
    Ok(())
}
