//! Boot test of the `ci` image in QEMU (`#[ignore]`d: it needs the built image and about two
//! minutes under TCG; `.ci/run` runs it after `image/build --profile ci`).
//!
//! Boots the image through OVMF + systemd-boot + UKI on an 8 GiB overlay with user-mode
//! networking, passes a seed as the `hearth.seed` systemd credential (SMBIOS type 11), and
//! asserts over the serial console:
//! - the read-only, verity-protected erofs root and the data partition that first boot created
//!   and grew into the larger disk (`HEARTH-IMAGE` line);
//! - the seed's `[network]` settings took effect: the static address it names, not DHCP's
//!   (console status `ip:` line);
//! - the agent is active and READY, its status line, the two simulated GPUs, and the seed
//!   credential arrived byte for byte (`HEARTH-BOOT-CHECK` line: SHA-256 of
//!   `/run/credentials/hearth-agent.service/hearth.seed`);
//! - the console status shows fleet, seed, IP, GPUs and agent state;
//! - from the fleet: a real `hearth-fleet` on the host's loopback (the guest reaches it at
//!   10.0.2.2) issued the token in the seed; the node enrolls, holds its session and heartbeats
//!   with its two GPUs (`GET /v1/nodes` as an admin operator);
//! - an ACPI power-off ends QEMU cleanly.
//!
//! Prints boot-to-agent-ready and boot-to-enrolled times (host wall clock from QEMU start).
//!
//! Environment: `HEARTH_IMAGE` (default `target/image/ci/hearth_<version>.raw`),
//! `HEARTH_QEMU_ACCEL` (`tcg`/`kvm`; default: detected), `HEARTH_BOOT_TIMEOUT` (seconds, default
//! 420).

#![allow(clippy::print_stdout, clippy::print_stderr)] // the boot time and the console log path are the output

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::fleet::TestFleet;
use hearth_qemu::{Accel, HOST_FROM_GUEST, Vm, VmConfig, field, overlay};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The address the seed gives the guest's NIC instead of DHCP's 10.0.2.15.
const STATIC_ADDRESS: &str = "10.0.2.20/24";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn image() -> PathBuf {
    std::env::var_os("HEARTH_IMAGE").map(PathBuf::from).unwrap_or_else(|| {
        workspace().join(format!("target/image/ci/hearth_{}.raw", env!("CARGO_PKG_VERSION")))
    })
}

/// The seed the node boots with: the one the fleet printed for a new token, plus a `[network]`
/// table giving the guest a static address.
fn seed(fleet_seed: &str) -> String {
    format!(
        r#"{fleet_seed}
[network]
[[network.links]]
name = "en*"
addresses = ["{STATIC_ADDRESS}"]
gateway = "{HOST_FROM_GUEST}"
dns = ["10.0.2.3"]
"#
    )
}

fn sha256_hex(bytes: &[u8], dir: &Path) -> Result<String, Box<dyn std::error::Error>> {
    let path = dir.join("seed.toml");
    std::fs::write(&path, bytes)?;
    let out = Command::new("sha256sum").arg(&path).output()?;
    let text = String::from_utf8(out.stdout)?;
    Ok(text.split_whitespace().next().ok_or("sha256sum printed nothing")?.to_string())
}

#[test]
#[ignore = "needs the built ci image (image/build --profile ci) and QEMU; run by .ci/run"]
fn ci_image_boots_to_agent_ready_with_seed() {
    // Display, not Debug: a timeout carries the console's last lines.
    if let Err(e) = boot() {
        panic!("{e}");
    }
}

fn boot() -> TestResult {
    let image = image();
    // Kept after the run: the console log (target/qemu/boot_ci/console.log) is what to read when
    // this test fails; the next run starts it afresh.
    let work = hearth_qemu::work_dir("boot_ci")?;
    let disk = work.join("disk.qcow2");
    overlay(&image, &disk, 8)?;
    let kernel = image.with_extension("vmlinuz");
    let accel = Accel::detect(kernel.exists().then_some(kernel.as_path()));
    let (fleet, fleet_seed) = TestFleet::start(&work.as_path().join("fleet"))?;
    let seed = seed(&fleet_seed);
    let seed_sha = sha256_hex(seed.as_bytes(), &work)?;
    let mut config =
        VmConfig::new(&disk, work.as_path())?.credential("hearth.seed", seed.as_bytes());
    config.accel = accel;
    let timeout = Duration::from_secs(
        std::env::var("HEARTH_BOOT_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(420),
    );
    eprintln!(
        "booting {} ({accel:?}), console log {}",
        image.display(),
        work.as_path().join("console.log").display()
    );
    let booted = Instant::now();
    let mut vm = Vm::start(&config)?;

    let check = vm.wait_for("HEARTH-BOOT-CHECK", timeout, |l| l.contains("HEARTH-BOOT-CHECK "))?;
    let ready_at = check.at;
    let line = check.text.clone();
    assert!(line.contains("HEARTH-BOOT-CHECK OK "), "boot check failed: {line}\n{}", vm.tail(60));
    assert_eq!(field(&line, "agent"), Some("active"), "{line}");
    assert_eq!(field(&line, "state"), Some("ready"), "{line}");
    assert_eq!(field(&line, "gpus"), Some("2"), "{line}");
    assert_eq!(field(&line, "restarts"), Some("0"), "the agent restarted: {line}");
    assert_eq!(
        field(&line, "seed"),
        Some(format!("sha256:{seed_sha}").as_str()),
        "the seed credential did not arrive intact: {line}"
    );
    assert!(
        line.contains("status=\"ready; 2 GPUs (2 healthy) on sim\""),
        "agent status line: {line}"
    );

    let layout =
        vm.wait_for("HEARTH-IMAGE", Duration::from_secs(5), |l| l.contains("HEARTH-IMAGE "))?.text;
    assert_eq!(field(&layout, "root"), Some("erofs,ro,/dev/mapper/root"), "{layout}");
    assert_eq!(field(&layout, "var"), Some("ext4,hearth-data"), "{layout}");
    let bytes: u64 =
        field(&layout, "var_bytes").and_then(|s| s.parse().ok()).ok_or("no var_bytes= field")?;
    // The image is about 4.6 GiB; the disk 8 GiB: the data partition grew into the difference.
    assert!(bytes > 2 * 1024 * 1024 * 1024, "data partition not grown to the disk: {layout}");

    let status =
        vm.wait_for("console status with the seed's address", Duration::from_secs(60), |l| {
            l.starts_with("ip:") && l.contains(STATIC_ADDRESS)
        })?;
    assert!(
        !status.text.contains("10.0.2.15/"),
        "DHCP's address beside the static one: {}",
        status.text
    );
    // The status block prints line by line: wait for its last line before reading it.
    vm.wait_for("console GPU line", Duration::from_secs(60), |l| {
        l.starts_with("gpus:") && l.contains("2x NVIDIA H100")
    })?;
    let lines = vm.lines();
    let console: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert!(console.iter().any(|l| l.starts_with("==== Hearth node ")), "no console status block");
    assert!(console.iter().any(|l| l.starts_with("fleet:")), "console fleet line");
    assert!(console.contains(&"seed:     credential"), "console seed line");
    // No unit failed to start (systemd's red `[FAILED] Failed to start …` lines): a restart loop
    // (systemd-resolved's, before /var/tmp existed on the read-only root) costs seconds of CPU
    // on every try.
    let failed: Vec<&str> =
        console.iter().copied().filter(|l| l.contains("Failed to start")).collect();
    assert!(failed.is_empty(), "units failed to start during boot: {failed:#?}");

    // From the fleet: the node enrolled and heartbeats over its session with its two GPUs.
    let node = fleet.wait_online(&vm, Duration::from_secs(180))?;
    let enrolled_at = booted.elapsed();
    assert_eq!(node.gpus.len(), 2, "inventory in the registry: {node:?}");
    assert!(node.gpus.iter().all(|g| g.name.contains("H100")), "{:?}", node.gpus);
    let hb = node.heartbeat.as_ref().ok_or("no heartbeat")?;
    assert_eq!(hb.health.gpus, 2, "heartbeat: {hb:?}");

    let exit = vm.powerdown(Duration::from_secs(120))?;
    assert!(exit.success(), "QEMU exit after power-off: {exit}");
    println!(
        "boot-to-agent-ready ({accel:?}): {:.1} s host wall clock (guest uptime at the check: {})",
        ready_at.as_secs_f64(),
        field(&line, "uptime").unwrap_or("?")
    );
    println!(
        "boot-to-enrolled ({accel:?}): {:.1} s host wall clock (node {} online in the fleet)",
        enrolled_at.as_secs_f64(),
        node.id
    );
    Ok(())
}
