//! Power cuts across a signed update, made real on the `hearth-nbd` disk (unflushed writes are
//! lost when QEMU dies): the plug is pulled at points chosen by seed in each phase of A -> B,
//! found from the host:
//! - `download`: the file server has sent a seeded share (5-90 %) of B's `root.raw`;
//! - `slot write`: a seeded 1-16 MiB of the inactive slot is on the NBD disk written but not
//!   yet flushed (its dirty sectors there): what the cut loses is the slot's;
//! - `ESP rename`: the inactive slot's GPT label reads `hearth_B` (the next step writes the UKI
//!   under a temporary name, flushes and renames it), then a seeded 0-1 s;
//! - `boot switch`: after `apply` returned, the firmware starts the boot loader (`BdsDxe:
//!   starting`, or the kernel's first line), then a seeded 0-2.5 s (systemd-boot counts the try);
//! - `bless`: B's boot check line, then a seeded 0-3 s (`systemd-bless-boot`, the reconcile).
//!
//! After each cut the machine is powered on again on the same disk: it must reach a passing boot
//! check (zero restarts without a bootable slot), on A or B, and after a clean power-off the
//! slot it booted must hold exactly the old or the new signed image (SHA-256 of the partition
//! against the built slot or B's `root.raw`). Each point resumes a machine snapshot of A booted,
//! enrolled and running (`Rig::save_machine`: QEMU's state and the disk, saved once), so only
//! the restart after the cut is a boot. Prints every kill point and "N of N".
//!
//! Environment: `HEARTH_UPDATE_CUT_POINTS` (default 5: one per phase), `HEARTH_UPDATE_CUT_SEED`
//! (default 1), and the rig's. The sweep: `HEARTH_UPDATE_CUT_POINTS=40`.

#![allow(clippy::print_stdout)] // the kill points and the tally are the output

mod common;

use std::time::{Duration, Instant};

use common::update::{Rig, check_passed};
use common::{ROOT_X86_64, TestResult, env_u64, file_digest, gpt, slot_digest};
use hearth_qemu::field;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const PHASES: &[&str] = &["download", "slot write", "ESP rename", "boot switch", "bless"];

#[test]
#[ignore = "needs the ci image built with --update-root (image/build); minutes per point"]
fn update_survives_power_cuts_in_every_phase() {
    if let Err(e) = run() {
        panic!("{e}");
    }
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn run() -> TestResult {
    let total = Instant::now();
    let points = env_u64("HEARTH_UPDATE_CUT_POINTS", PHASES.len() as u64);
    let seed = env_u64("HEARTH_UPDATE_CUT_SEED", 1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rig = Rig::new("update_power_cut")?;
    let a = rig.a.clone();
    let b = format!("{a}.1");
    let parts = gpt(&rig.image)?;
    let roots: Vec<_> = parts.iter().filter(|p| p.0 == ROOT_X86_64).cloned().collect();
    let (slot_a, slot_b) = match roots.as_slice() {
        [x, y] => (x.clone(), y.clone()),
        _ => return Err(format!("expected two root slots: {roots:?}").into()),
    };
    let (a_off, a_len) = (slot_a.2 * 512, (slot_a.3 - slot_a.2 + 1) * 512);
    let a_digest = slot_digest(&rig.image, a_off, a_len)?;
    let (b_off, b_slot_len) = (slot_b.2 * 512, (slot_b.3 - slot_b.2 + 1) * 512);
    let rel_b = rig.derive(&rig.artifacts(), &a, &b)?;
    let b_root = rel_b.join(format!("hearth_{b}.root.raw"));
    let b_len = std::fs::metadata(&b_root)?.len();
    let b_digest = file_digest(&b_root)?;
    rig.sign(&rel_b, &b)?;

    let mut vm = rig.start()?;
    let check = rig.boot_check(&mut vm, 0, "first boot check of A")?;
    if !check_passed(&check.text, &a) {
        return Err(format!("A did not boot cleanly: {}\n{}", check.text, vm.tail(60)).into());
    }
    rig.online(&vm)?;
    // Saved running: each point resumes A as it was here, in seconds, instead of booting it.
    let snapshot = rig.save_machine(vm, "enrolled")?;
    println!("snapshot of A enrolled and running after {:.1} s", total.elapsed().as_secs_f64());

    let label_b = utf16(&format!("hearth_{b}"));
    let mut ok = 0;
    for point in 1..=points {
        let phase = PHASES[((seed + point - 1) % PHASES.len() as u64) as usize];
        let t = Instant::now();
        let mut vm = rig.resume(&snapshot)?;
        let mark = vm.mark();
        let served_before: u64 = root_bytes(&rig);
        vm.shell(
            "hearth-agent update apply --reboot > /dev/ttyS0 2>&1; echo \"HEARTH-TEST-APPLY rc=$?\" > /dev/ttyS0",
        )?;
        let deadline = Instant::now() + rig.timeout;
        let nbd = || rig.nbd.as_ref().ok_or("no NBD server");
        let detail = match phase {
            "download" => {
                let share = rng.random_range(0.05..0.90);
                let want = served_before + (b_len as f64 * share) as u64;
                while root_bytes(&rig) < want {
                    if Instant::now() > deadline {
                        return Err(format!(
                            "point {point}: the download never reached {share:.2}\n{}",
                            vm.tail(30)
                        )
                        .into());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                format!("{:.0} % of root.raw served", share * 100.0)
            }
            "slot write" => {
                // B's slot written but not flushed. The guest writes the slot back in a burst
                // (mostly at the writer's fsync), so a delay after B's first block landed fell
                // after the flush at low load (0 sectors lost). Instead the cut comes when a
                // seeded 1-16 MiB of the inactive slot is written and not yet durable: what the
                // cut then loses is the slot's.
                let want = rng.random_range(2048..=32768u64);
                let mut most = 0;
                loop {
                    let dirty = nbd()?.dirty_in(b_off, b_slot_len);
                    most = most.max(dirty);
                    if dirty >= want {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(format!(
                            "point {point}: never {want} sectors of B's slot unflushed (at most {most})\n{}",
                            vm.tail(30)
                        )
                        .into());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                format!("{:.1} MiB of B's slot written, not flushed", want as f64 / 2048.0)
            }
            "ESP rename" => {
                let mut buf = vec![0u8; 16384];
                loop {
                    nbd()?.read(1024, &mut buf)?;
                    if buf.windows(label_b.len()).any(|w| w == label_b.as_slice()) {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(format!(
                            "point {point}: {phase} never seen on the disk\n{}",
                            vm.tail(30)
                        )
                        .into());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let ms = rng.random_range(0..=1000);
                std::thread::sleep(Duration::from_millis(ms));
                format!("{phase} seen + {ms} ms")
            }
            "boot switch" => {
                let rc = vm.wait_for_from(mark, "apply to return", rig.timeout, |l| {
                    !l.starts_with("ttyS1:") && l.contains("HEARTH-TEST-APPLY rc=")
                })?;
                let from = vm.mark();
                vm.wait_for_from(from, "the reboot's firmware", rig.timeout, |l| {
                    l.contains("BdsDxe: starting") || l.contains("Linux version")
                })?;
                let ms = rng.random_range(0..=2500);
                std::thread::sleep(Duration::from_millis(ms));
                format!("after {} , boot start + {ms} ms", rc.text.trim())
            }
            _ => {
                let line = vm.wait_for_from(mark, "B's boot check", rig.timeout, |l| {
                    l.contains("HEARTH-BOOT-CHECK ")
                })?;
                let ms = rng.random_range(0..=3000);
                std::thread::sleep(Duration::from_millis(ms));
                format!("B's check ({}) + {ms} ms", field(&line.text, "version").unwrap_or("?"))
            }
        };
        let last = vm.lines().last().map(|l| l.text.clone()).unwrap_or_default();
        let before = nbd()?.stats();
        vm.kill();
        drop(vm);
        let cut_deadline = Instant::now() + Duration::from_secs(10);
        while nbd()?.stats().cuts == before.cuts && Instant::now() < cut_deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let lost = nbd()?.stats().lost_sectors - before.lost_sectors;
        println!(
            "power cut {point}/{points} (seed {seed}): {phase}: {detail}, at {:.1} s of the case; {lost} sectors lost; last line \"{}\"",
            t.elapsed().as_secs_f64(),
            last.chars().take(90).collect::<String>()
        );
        // Power on again, on the disk as the cut left it.
        rig.serve_disk()?;
        let mut vm = rig.start()?;
        let mut from = 0;
        let booted = loop {
            let line = rig.boot_check(&mut vm, from, "a boot check after the cut")?;
            if line.text.contains("HEARTH-BOOT-CHECK OK ") {
                break line;
            }
            // A failed trial falls back by itself: wait for the next boot's check.
            from = vm.mark();
        };
        let version = field(&booted.text, "version").unwrap_or_default().to_string();
        vm.powerdown(Duration::from_secs(180))?;
        drop(vm);
        rig.nbd = None;
        let slots = rig.slots()?;
        let slot = slots.iter().find(|s| s.0 == format!("hearth_{version}")).ok_or(format!(
            "point {point}: booted {version} but no slot is labelled so: {slots:?}"
        ))?;
        let good = if version == a {
            slot_digest(&rig.disk, slot.1, slot.2)? == a_digest
        } else if version == b {
            slot_digest(&rig.disk, slot.1, b_len)? == b_digest
        } else {
            false
        };
        if !good {
            return Err(format!(
                "point {point} ({phase}): booted {version} from a slot that is neither the old nor the new signed image"
            )
            .into());
        }
        ok += 1;
        println!(
            "restart {point}/{points}: booted {version} (slot equals the signed image), {:.1} s for the point",
            t.elapsed().as_secs_f64()
        );
    }
    println!(
        "power cuts across an update: {ok} of {points} restarts booted the old or the new signed image (seed {seed}, {:.1} s)",
        total.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Bytes of `*.root.raw` the repository server has sent so far.
fn root_bytes(rig: &Rig) -> u64 {
    rig.server.stats().bytes.iter().filter(|(k, _)| k.ends_with(".root.raw")).map(|(_, v)| v).sum()
}
