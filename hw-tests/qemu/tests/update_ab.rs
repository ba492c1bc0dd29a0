//! A good signed update and a second one, in QEMU: A -> B -> A' (versions rise; B and A' are
//! derived from the one ci build by `image/release-version`: B with A's slot content but its
//! own version and os-release, A' with A's content again under a higher version).
//!
//! The ci image boots on the `hearth-nbd` disk and enrolls in a real `hearth-fleet` on the
//! host's loopback. The host signs B with the release keys the image trusts and serves the TUF
//! repository over plain HTTP; the guest's root shell (ttyS1) runs `hearth-agent update apply
//! --reboot`. Asserted:
//! - B boots on trial from the other slot, its boot check passes (`version=B`, the update gate
//!   `update=pass`, no agent restart), systemd-bless-boot blesses it, the update state says
//!   `blessed` with the anti-rollback version raised to B (`hearth-update-reconcile.service`'s
//!   console line);
//! - the fleet's event log shows the update's phases in order: at least one of
//!   `node.update.downloading|writing|installed|rebooting|trial` before `node.update.blessed`
//!   with `A -> B` (the session reports the phase it finds at each heartbeat);
//! - then B -> A' the same way (A' signed into the same repository, metadata versions rising);
//! - after a clean power-off, read directly from the disk: the slot labels `hearth_A'` and
//!   `hearth_B` (A's label gone), each slot's bytes equal its signed release file (SHA-256), and
//!   the ESP holds `hearth_A'.efi` and `hearth_B.efi` without boot counters (both blessed) and
//!   no `.partial` file.
//!
//! Prints the time of each step. `#[ignore]`d: needs `image/build --profile ci --update-root
//! target/update-keys/root.json` (see `hw-tests/qemu/README.md`); run by hand until it has passed
//! here (then in `.ci/run`'s QEMU step).

#![allow(clippy::print_stdout)] // the steps' times are the output

mod common;

use std::time::Instant;

use common::update::{Rig, check_passed, good_update};
use common::{TestResult, file_digest, slot_digest};

#[test]
#[ignore = "needs the ci image built with --update-root (image/build); run by hand (hw-tests/qemu/README.md)"]
fn good_updates_a_to_b_to_a_prime() {
    if let Err(e) = run() {
        panic!("{e}");
    }
}

fn run() -> TestResult {
    let total = Instant::now();
    let rig = Rig::new("update_ab")?;
    let a = rig.a.clone();
    let b = format!("{a}.1");
    let a2 = format!("{a}.2");
    let rel_b = rig.derive(&rig.artifacts(), &a, &b)?;
    let rel_a2 = rig.derive(&rig.artifacts(), &a, &a2)?;
    rig.sign(&rel_b, &b)?;

    let mut vm = rig.start()?;
    println!(
        "booting {} ({:?}) on the NBD disk, console log {}",
        rig.image.display(),
        rig.config.accel,
        vm.log_path().display()
    );
    let check = rig.boot_check(&mut vm, 0, "boot check of A")?;
    if !check_passed(&check.text, &a) {
        return Err(format!("A did not boot cleanly: {}\n{}", check.text, vm.tail(60)).into());
    }
    let node = rig.online(&vm)?;
    println!("A ({a}) up and node {node} online after {:.1} s", total.elapsed().as_secs_f64());

    good_update(&rig, &mut vm, &a, &b)?;
    rig.sign(&rel_a2, &a2)?;
    good_update(&rig, &mut vm, &b, &a2)?;

    vm.powerdown(std::time::Duration::from_secs(180))?;
    drop(vm);
    let slots = rig.slots()?;
    let labels: Vec<&str> = slots.iter().map(|s| s.0.as_str()).collect();
    let want_a2 = format!("hearth_{a2}");
    let want_b = format!("hearth_{b}");
    if labels != [want_a2.as_str(), want_b.as_str()] {
        return Err(format!("slot labels after A -> B -> A': {labels:?}, expected [{want_a2}, {want_b}] (A' over A's slot)").into());
    }
    for ((label, off, len), dir, version) in
        [(&slots[0], &rel_a2, &a2), (&slots[1], &rel_b, &b)].map(|(s, d, v)| (s.clone(), d, v))
    {
        let release = dir.join(format!("hearth_{version}.root.raw"));
        let size = std::fs::metadata(&release)?.len();
        assert!(size <= len, "release larger than its slot");
        if slot_digest(&rig.disk, off, size)? != file_digest(&release)? {
            return Err(
                format!("slot {label} does not hold the signed {}", release.display()).into()
            );
        }
    }
    let esp = rig.esp_entries()?;
    let want = [format!("hearth_{a2}.efi"), format!("hearth_{b}.efi")];
    for w in &want {
        if !esp.contains(w) {
            return Err(format!("ESP EFI/Linux: {esp:?}, missing the blessed {w}").into());
        }
    }
    if esp
        .iter()
        .any(|e| e.contains('+') || e.contains("partial") || e.contains(&format!("hearth_{a}.efi")))
    {
        return Err(format!("ESP EFI/Linux: {esp:?}: a counted, partial or stale entry").into());
    }
    println!(
        "A -> B -> A': slots [{}], ESP {esp:?}; {:.1} s in all",
        labels.join(", "),
        total.elapsed().as_secs_f64()
    );
    Ok(())
}
