//! Bad signed updates fall back to the old slot, and the fleet hears why: releases made by
//! `image/release-variant` from a good derived release (the same slot content, a UKI command
//! line that breaks one thing):
//! - `no-boot`: the kernel panics before userspace; systemd-boot's tries run out and the old
//!   entry boots; the reason is "did not finish booting within its tries";
//! - `agent-fails`: the agent cannot bind its API socket; the boot check fails, marks the entry
//!   bad and reboots into the old slot;
//! - `no-fleet`: networking is masked; the boot check fails on the fleet session.
//!
//! Each case: the node runs A (enrolled in a real fleet), `hearth-agent update apply --reboot
//! --tries N` installs the bad release into the other slot, and then, asserted:
//! - A boots again within the tries (for `no-boot`: exactly N failed kernel starts, then A), its
//!   boot check passes with `version=A` and no agent restart;
//! - the fleet's event log gets `node.update.rolled_back` with `A -> V` and the reason;
//! - after a clean power-off, read from the disk: slot A's bytes are the built ones (the
//!   fallback booted the untouched old slot), the other slot holds the bad release, and the ESP
//!   keeps A's blessed entry with the bad entry's tries used up (`+0-N`).
//!
//! Cases start from a snapshot: A is booted and enrolled once, powered off, and its NBD disk
//! copied (`Rig::save_snapshot`); each case boots from a copy of it. A single case (CI) runs on
//! the first boot.
//!
//! Environment: `HEARTH_UPDATE_BAD` (`no-boot` by default, the CI mode; `all` or a
//! comma-separated list), `HEARTH_UPDATE_TRIES` (default 1 in CI mode; the full run uses 3),
//! plus the rig's (`HEARTH_IMAGE`, `HEARTH_UPDATE_KEYS`, `HEARTH_BOOT_TIMEOUT`).

#![allow(clippy::print_stdout)] // the cases' times are the output

mod common;

use std::time::{Duration, Instant};

use common::update::{Rig, bad_update, check_passed};
use common::{TestResult, env_u64, file_digest, slot_digest};

const KINDS: &[(&str, &str)] = &[
    // (kind, what the rollback reason must say)
    ("no-boot", "did not finish booting within its tries"),
    ("agent-fails", ""),
    ("no-fleet", "fleet"),
];

#[test]
#[ignore = "needs the ci image built with --update-root (image/build); run by hand (hw-tests/qemu/README.md)"]
fn bad_updates_fall_back_and_the_fleet_sees_the_rollback() {
    if let Err(e) = run() {
        panic!("{e}");
    }
}

fn run() -> TestResult {
    let total = Instant::now();
    let wanted = std::env::var("HEARTH_UPDATE_BAD").unwrap_or_else(|_| "no-boot".into());
    let kinds: Vec<(&str, &str)> = KINDS
        .iter()
        .copied()
        .filter(|(k, _)| wanted == "all" || wanted.split(',').any(|w| w.trim() == *k))
        .collect();
    if kinds.is_empty() {
        return Err(format!(
            "HEARTH_UPDATE_BAD={wanted}: no such case (no-boot, agent-fails, no-fleet, all)"
        )
        .into());
    }
    let tries = env_u64("HEARTH_UPDATE_TRIES", 1).clamp(1, 9);
    let mut rig = Rig::new("update_bad")?;
    let a = rig.a.clone();
    // A's slot as built, to compare with after each fallback.
    let (a_off, a_len, a_digest) = rig.built_slot_a()?;

    // Releases: one good derived version per case, then its bad variant, all signed.
    let mut releases = Vec::new();
    for (i, (kind, _)) in kinds.iter().enumerate() {
        let version = format!("{a}.{}", 11 + i);
        let good = rig.derive(&rig.artifacts(), &a, &version)?;
        let bad = rig.variant(&good, &version, kind)?;
        rig.sign(&bad, &version)?;
        releases.push((version, bad));
    }

    // The snapshot: A booted once and enrolled, then powered off; each case boots a copy. With
    // one case (CI) the first boot runs it directly.
    let mut vm = Some(rig.start()?);
    let mut first = true;
    let snapshot = if kinds.len() > 1 {
        let mut v = vm.take().ok_or("no VM")?;
        println!("booting A ({:?}), console log {}", rig.config.accel, v.log_path().display());
        let check = rig.boot_check(&mut v, 0, "first boot check of A")?;
        if !check_passed(&check.text, &a) {
            return Err(format!("A did not boot cleanly: {}\n{}", check.text, v.tail(60)).into());
        }
        let node = rig.online(&v)?;
        v.powerdown(Duration::from_secs(180))?;
        drop(v);
        let snap = rig.save_snapshot("enrolled")?;
        println!(
            "snapshot: A enrolled as node {node}, powered off, disk saved after {:.1} s",
            total.elapsed().as_secs_f64()
        );
        Some(snap)
    } else {
        None
    };

    for ((kind, reason), (version, bad)) in kinds.iter().zip(&releases) {
        let t = Instant::now();
        let mut vm = match (vm.take(), &snapshot) {
            (Some(v), _) => v,
            (None, Some(snap)) => {
                rig.restore_snapshot(snap)?;
                rig.start()?
            }
            (None, None) => return Err("no VM and no snapshot".into()),
        };
        let what = if first && snapshot.is_none() {
            "first boot check of A"
        } else {
            "boot check of A from the snapshot"
        };
        first = false;
        let check = rig.boot_check(&mut vm, 0, what)?;
        if !check_passed(&check.text, &a) {
            return Err(format!("{kind}: A: {}\n{}", check.text, vm.tail(60)).into());
        }
        rig.online(&vm)?;
        let (kernels, rolled) = bad_update(&rig, &mut vm, &a, version, kind, reason, tries)?;
        vm.powerdown(Duration::from_secs(180))?;
        drop(vm);
        rig.nbd = None;
        // From the disk: A's slot untouched, the other holds the bad release, its entry spent.
        if slot_digest(&rig.disk, a_off, a_len)? != a_digest {
            return Err(format!("{kind}: slot A changed").into());
        }
        let slots = rig.slots()?;
        let other = slots
            .iter()
            .find(|s| s.0 == format!("hearth_{version}"))
            .ok_or(format!("{kind}: no slot labelled hearth_{version}: {slots:?}"))?;
        let root = bad.join(format!("hearth_{version}.root.raw"));
        let size = std::fs::metadata(&root)?.len();
        if slot_digest(&rig.disk, other.1, size)? != file_digest(&root)? {
            return Err(format!("{kind}: the other slot does not hold the signed release").into());
        }
        let esp = rig.esp_entries()?;
        if !esp.contains(&format!("hearth_{a}.efi")) {
            return Err(format!("{kind}: ESP {esp:?} lost A's entry").into());
        }
        if !esp.iter().any(|e| e.starts_with(&format!("hearth_{version}+0-"))) {
            return Err(
                format!("{kind}: ESP {esp:?}: the bad entry's tries are not used up").into()
            );
        }
        println!(
            "{kind}: fell back to A ({kernels} kernel starts), fleet: node.update.rolled_back \"{rolled}\"; ESP {esp:?}; {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    println!(
        "bad updates: {} of {} fell back to A and were reported ({:.1} s in all)",
        kinds.len(),
        kinds.len(),
        total.elapsed().as_secs_f64()
    );
    Ok(())
}
