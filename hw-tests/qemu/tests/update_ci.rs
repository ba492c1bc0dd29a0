//! The update tests' CI mode on one machine, three boots (`.ci/run`'s QEMU step; the full runs
//! of `update_ab`, `update_bad` and the power-cut sweep are documented commands):
//! - A boots on the `hearth-nbd` disk and enrolls in a real fleet;
//! - a signed release that does not boot (`image/release-variant --kind no-boot`) is installed
//!   with a single try: its kernel panics, the try is spent, A boots again, and the fleet gets
//!   `node.update.rolled_back` with the reason (`update_bad`'s assertions);
//! - a good signed release B (higher version) is then installed over the spent slot: it boots on
//!   trial, passes its boot check, is blessed, the anti-rollback version rises to B, and the
//!   fleet sees its phases before `node.update.blessed` (`update_ab`'s assertions);
//! - after a clean power-off, read from the disk: slot labels A and B, A's slot bytes as built,
//!   B's equal to its signed `root.raw`, the ESP holds both entries blessed, no counter, no
//!   `.partial`.
//!
//! Prints the time of each step. `#[ignore]`d: needs `image/build --profile ci --update-root
//! target/update-keys/root.json`.

#![allow(clippy::print_stdout)] // the steps' times are the output

mod common;

use std::time::{Duration, Instant};

use common::update::{Rig, bad_update, check_passed, good_update};
use common::{TestResult, file_digest, slot_digest};

#[test]
#[ignore = "needs the ci image built with --update-root (image/build); run by .ci/run"]
fn bad_update_falls_back_then_good_update_is_blessed() {
    if let Err(e) = run() {
        panic!("{e}");
    }
}

fn run() -> TestResult {
    let total = Instant::now();
    let rig = Rig::new("update_ci")?;
    let a = rig.a.clone();
    let (a_off, a_len, a_digest) = rig.built_slot_a()?;
    let bad = format!("{a}.11");
    let b = format!("{a}.12");
    let rel_bad = rig.derive(&rig.artifacts(), &a, &bad)?;
    let rel_bad = rig.variant(&rel_bad, &bad, "no-boot")?;
    let rel_b = rig.derive(&rig.artifacts(), &a, &b)?;
    rig.sign(&rel_bad, &bad)?;

    let mut vm = rig.start()?;
    println!(
        "booting A ({:?}) on the NBD disk, console log {}",
        rig.config.accel,
        vm.log_path().display()
    );
    let check = rig.boot_check(&mut vm, 0, "first boot check of A")?;
    if !check_passed(&check.text, &a) {
        return Err(format!("A did not boot cleanly: {}\n{}", check.text, vm.tail(60)).into());
    }
    let node = rig.online(&vm)?;
    println!("A ({a}) up and node {node} online after {:.1} s", total.elapsed().as_secs_f64());

    let (kernels, _) = bad_update(
        &rig,
        &mut vm,
        &a,
        &bad,
        "no-boot",
        "did not finish booting within its tries",
        1,
    )?;
    println!("no-boot: {kernels} kernel starts to get back to A");

    rig.sign(&rel_b, &b)?;
    good_update(&rig, &mut vm, &a, &b)?;

    vm.powerdown(Duration::from_secs(180))?;
    drop(vm);
    let slots = rig.slots()?;
    let labels: Vec<&str> = slots.iter().map(|s| s.0.as_str()).collect();
    let (want_a, want_b) = (format!("hearth_{a}"), format!("hearth_{b}"));
    if labels != [want_a.as_str(), want_b.as_str()] {
        return Err(format!("slot labels: {labels:?}, expected [{want_a}, {want_b}]").into());
    }
    if slot_digest(&rig.disk, a_off, a_len)? != a_digest {
        return Err("slot A changed".into());
    }
    let root_b = rel_b.join(format!("hearth_{b}.root.raw"));
    if slot_digest(&rig.disk, slots[1].1, std::fs::metadata(&root_b)?.len())?
        != file_digest(&root_b)?
    {
        return Err(format!("slot {want_b} does not hold the signed {}", root_b.display()).into());
    }
    let esp = rig.esp_entries()?;
    for w in [format!("hearth_{a}.efi"), format!("hearth_{b}.efi")] {
        if !esp.contains(&w) {
            return Err(format!("ESP EFI/Linux: {esp:?}, missing the blessed {w}").into());
        }
    }
    if esp.iter().any(|e| e.contains('+') || e.contains("partial") || e.contains(&bad)) {
        return Err(format!("ESP EFI/Linux: {esp:?}: a counted, partial or stale entry").into());
    }
    println!(
        "bad then good: slots [{}], ESP {esp:?}; {:.1} s in all",
        labels.join(", "),
        total.elapsed().as_secs_f64()
    );
    Ok(())
}
