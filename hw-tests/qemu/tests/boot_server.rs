//! Boot test of the `server` image in QEMU, where there is no NVIDIA device (`#[ignore]`d and not
//! in CI: the server profile is built by hand, `image/build --profile server`; see
//! `image/README.md`).
//!
//! Asserts that the image carries the NVIDIA kernel module built by the profile's build script
//! and no compiler, and, booted, that the agent comes up READY, in state `degraded` with no GPU,
//! without restarting (no crash loop), and that the console says why on its `gpus:` line.
//!
//! `HEARTH_IMAGE` (default `target/image/server/hearth_<version>.raw`), `HEARTH_QEMU_ACCEL`,
//! `HEARTH_BOOT_TIMEOUT` (seconds, default 600).

#![allow(clippy::print_stdout)] // the boot time and the console line are the output

mod common;

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
fn server_image_has_the_nvidia_module_and_no_compiler() -> common::TestResult {
    let image = image();
    let slot = format!("hearth_{}", env!("CARGO_PKG_VERSION"));
    let kvers = common::erofs_ls(&image, &slot, "/usr/lib/modules")?;
    let kver = kvers.first().ok_or("no kernel in /usr/lib/modules")?;
    let dkms = common::erofs_ls(&image, &slot, &format!("/usr/lib/modules/{kver}/updates/dkms"))?;
    for module in ["nvidia-current", "nvidia-current-uvm", "nvidia-current-modeset"] {
        assert!(
            dkms.iter().any(|f| f.strip_prefix(module).is_some_and(|r| r.starts_with(".ko"))),
            "{module} not built into the image: {dkms:?}"
        );
    }
    // depmod ran after the modules were added: modprobe finds them.
    let dep = common::erofs_cat(&image, &slot, &format!("/usr/lib/modules/{kver}/modules.dep"))?;
    assert!(dep.contains("updates/dkms/nvidia-current.ko"), "depmod did not index the module");
    for path in ["/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1", "/usr/lib/firmware/nvidia"] {
        assert!(common::erofs(&image, &slot, &[], path)?.is_some(), "{path} missing");
    }
    // The build overlay stayed out: no compiler, headers or DKMS in the image.
    for absent in ["/usr/bin/gcc", "/usr/bin/cc", "/usr/bin/make", "/usr/sbin/dkms"] {
        assert!(
            common::erofs(&image, &slot, &[], absent)?.is_none(),
            "{absent} ships in the image"
        );
    }
    // base-files makes an empty /usr/src; the sources and headers must not be in it.
    if common::erofs(&image, &slot, &[], "/usr/src")?.is_some() {
        let src = common::erofs_ls(&image, &slot, "/usr/src")?;
        assert!(src.is_empty(), "sources or headers ship in the image: {src:?}");
    }
    println!("server image: NVIDIA modules for {kver}: {dkms:?}");
    Ok(())
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
    // The generic kernel loads virtio and every platform driver as modules: under TCG on a busy
    // 2-core machine udev took longer than the default 90 s to show the root partitions.
    config.cmdline_extra.push("systemd.default_device_timeout_sec=600".into());
    let timeout = Duration::from_secs(
        std::env::var("HEARTH_BOOT_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(600),
    );
    let mut vm = Vm::start(&config)?;
    let check = vm.wait_for("HEARTH-BOOT-CHECK", timeout, |l| l.contains("HEARTH-BOOT-CHECK "))?;
    let line = check.text.clone();
    assert!(line.contains("HEARTH-BOOT-CHECK OK "), "boot check failed: {line}\n{}", vm.tail(60));
    assert_eq!(field(&line, "agent"), Some("active"), "{line}");
    // The API's state can still read `starting` when the boot check asks (the first GPU round
    // under TCG); the agent's own status line (systemd STATUS=) already says degraded.
    assert!(matches!(field(&line, "state"), Some("degraded" | "starting")), "{line}");
    assert!(line.contains("status=\"degraded; 0 GPUs"), "agent status line: {line}");
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
