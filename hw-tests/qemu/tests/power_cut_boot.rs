//! Power cuts during the `ci` image's first boot, made real: the guest's disk is served by
//! `hearth-nbd`, which keeps only flushed writes, so killing QEMU loses what a power cut loses.
//! Each point starts from the built image (a sparse copy: the "snapshot" of the disk), boots,
//! pulls the plug a seeded 0-3 s after a milestone of the console (the phases in turn from a
//! seeded start: kernel start, initrd, first-boot repart creating `/var`, the journal moving to
//! `/var`, the boot check), then powers on again and requires the boot check to pass on the
//! same disk, with slot A byte-for-byte the built one and `/var` on its data partition. Prints
//! each kill point and "N of N".
//!
//! `#[ignore]`d (needs `image/build --profile ci`); `.ci/run` runs one point. The sweep:
//! `HEARTH_POWER_CUT_POINTS=40 cargo nextest run -p hearth-qemu --run-ignored only -E
//! 'test(first_boot_survives_power_cuts)' --no-capture`. `HEARTH_POWER_CUT_SEED` (default 1),
//! `HEARTH_IMAGE`, `HEARTH_QEMU_ACCEL`, `HEARTH_BOOT_TIMEOUT` (seconds, default 600).
//!
//! The update tests (`update_*.rs`) put their kill points across download, slot write, ESP
//! rename, boot switch and bless on the same machinery.

#![allow(clippy::print_stdout)] // the kill points and the tally are the output

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{ROOT_X86_64, TestResult, fresh_disk, gpt, slot_digest, workspace};
use hearth_nbd::{NbdServer, PowerCutDisk};
use hearth_qemu::{Accel, Vm, VmConfig, field};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn image() -> PathBuf {
    std::env::var_os("HEARTH_IMAGE").map(PathBuf::from).unwrap_or_else(|| {
        workspace().join(format!("target/image/ci/hearth_{}.raw", env!("CARGO_PKG_VERSION")))
    })
}

/// Where the plug may be pulled: a phase name and the console text that starts it.
const MILESTONES: &[(&str, &str)] = &[
    ("kernel start", "Linux version"),
    ("initrd (verity, switch root)", "Running in initrd"),
    ("first-boot repart of /var", "Starting systemd-repart.service"),
    ("journal moving to /var", "flush runtime journal"),
    ("agent running, boot check", "HEARTH-BOOT-CHECK "),
];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

#[test]
#[ignore = "needs the built ci image (image/build --profile ci); run by .ci/run"]
fn first_boot_survives_power_cuts() {
    if let Err(e) = run() {
        panic!("{e}");
    }
}

fn run() -> TestResult {
    let image = image();
    if !image.exists() {
        return Err(
            format!("{} does not exist: run image/build --profile ci", image.display()).into()
        );
    }
    let seed = env_u64("HEARTH_POWER_CUT_SEED", 1);
    let points = env_u64("HEARTH_POWER_CUT_POINTS", 1);
    let timeout = Duration::from_secs(env_u64("HEARTH_BOOT_TIMEOUT", 600));
    let version = env!("CARGO_PKG_VERSION");
    let slot = gpt(&image)?
        .into_iter()
        .find(|p| p.0 == ROOT_X86_64 && p.1 == format!("hearth_{version}"))
        .ok_or("no slot A in the image")?;
    let (slot_off, slot_len) = (slot.2 * 512, (slot.3 - slot.2 + 1) * 512);
    let built_slot = slot_digest(&image, slot_off, slot_len)?;
    let kernel = image.with_extension("vmlinuz");
    let accel = Accel::detect(kernel.exists().then_some(kernel.as_path()));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ok = 0;
    for point in 1..=points {
        let work = hearth_qemu::work_dir(&format!("power_cut_boot/{point}"))?;
        let disk = work.join("disk.raw");
        fresh_disk(&image, &disk)?;
        let server = NbdServer::start(
            &work.join("nbd.sock"),
            PowerCutDisk::open(&disk, &work.join("overlay"))?,
        )?;
        let mut config = VmConfig::new(server.path(), &work)?;
        config.nbd = true;
        config.accel = accel;
        // systemd prints `Starting …` status lines on the console only after a delay unless told
        // to always: the milestones below must not depend on how slow this boot happens to be
        // (a boot without systemd-resolved's restart loop never printed the repart line).
        config.cmdline_extra.push("systemd.show_status=1".into());
        // The plug is pulled a seeded 0-3 s after a seeded console milestone, so the points
        // land in the same phases however fast TCG runs on a loaded machine.
        // Phases in turn from a seeded start (seed 1, one point: the first-boot repart).
        let (phase, marker) = MILESTONES[((seed + point) % MILESTONES.len() as u64) as usize];
        let offset = Duration::from_millis(rng.random_range(0..=3_000));
        let mut vm = Vm::start(&config)?;
        let seen = vm.wait_for(phase, timeout, |l| l.contains(marker))?;
        std::thread::sleep(offset);
        let kill_at = vm.elapsed();
        let last = vm.lines().last().map(|l| l.text.clone()).unwrap_or_default();
        let before = server.stats();
        vm.kill();
        drop(vm);
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.stats().cuts == before.cuts && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let cut = server.stats();
        println!(
            "power cut {point}/{points} (seed {seed}): {phase} (at {:.1} s) + {:.1} s = {:.1} s, last line \"{}\"; disk: {} writes, {} flushes, {} sectors lost",
            seen.at.as_secs_f64(),
            offset.as_secs_f64(),
            kill_at.as_secs_f64(),
            last.chars().take(100).collect::<String>(),
            cut.writes,
            cut.flushes,
            cut.lost_sectors - before.lost_sectors,
        );
        // Power on again: the same disk, as the cut left it.
        let mut vm = Vm::start(&config)?;
        let check =
            vm.wait_for("HEARTH-BOOT-CHECK", timeout, |l| l.contains("HEARTH-BOOT-CHECK "))?;
        let image_line =
            vm.wait_for("HEARTH-IMAGE", Duration::from_secs(5), |l| l.contains("HEARTH-IMAGE "))?;
        let booted = check.text.contains("HEARTH-BOOT-CHECK OK ")
            && field(&check.text, "agent") == Some("active")
            && image_line.text.contains("var=ext4,hearth-data");
        if !booted {
            return Err(format!(
                "power cut {point} (seed {seed}, {phase} + {:.1} s): the restart did not boot cleanly: {}\n{}\n{}",
                offset.as_secs_f64(),
                check.text,
                image_line.text,
                vm.tail(60)
            )
            .into());
        }
        vm.powerdown(Duration::from_secs(120))?;
        drop(vm);
        drop(server);
        let slot_now = slot_digest(&disk, slot_off, slot_len)?;
        if slot_now != built_slot {
            return Err(format!("power cut {point}: slot A changed on disk").into());
        }
        ok += 1;
        println!(
            "restart {point}/{points}: boot check OK at {:.1} s, slot A unchanged, {}",
            check.at.as_secs_f64(),
            image_line.text
        );
        std::fs::remove_file(&disk)?;
    }
    println!(
        "power cuts during first boot: {ok} of {points} restarts booted ({accel:?}, seed {seed})"
    );
    Ok(())
}
