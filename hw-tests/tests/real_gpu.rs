//! The read-only real-GPU suite: the `nvml` backend on the system's NVIDIA driver.
//!
//! READ-ONLY. These tests only read inventory and telemetry and register for events. They never
//! set a power limit, lock or reset clocks, touch fans, persistence, ECC or MIG, or reset a GPU:
//! they may run on a machine serving real work. Keep it that way.
//!
//! The library is `libnvidia-ml.so.1` (the soname the driver installs); `HEARTH_NVML_LIBRARY`
//! overrides it. Every test is `#[ignore]`d, so a CI machine without a GPU reports them as
//! ignored rather than passed. Run them explicitly on a GPU machine:
//!
//! ```sh
//! cargo nextest run -p hearth-hw-tests --run-ignored only -E 'binary(real_gpu)' --no-capture
//! cargo test -p hearth-hw-tests --test real_gpu -- --ignored --nocapture   # or
//! ```
//!
//! Running them explicitly claims a GPU is there: without a driver they fail, each saying
//! `no NVIDIA driver (...)`. `hw-tests/real-gpu-bundle` packages this binary for a GPU machine
//! without a toolchain. `real_report` prints the inventory and one sample as JSON for a
//! closing note.

#![allow(clippy::print_stdout)] // the report is the output

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, ensure};
use hearth_agent::gpu::nvml::NvmlBackend;
use hearth_agent::gpu::{GpuBackend, GpuError, inventory_all};
use hearth_hw_tests::conformance::{is_pci_bus_id, is_uuid};

/// Every clock-event reason bit NVML defines (`nvmlClocksEventReason*`, 0x1 to 0x100).
const KNOWN_REASONS: u64 = 0x1FF;

fn library() -> PathBuf {
    std::env::var_os("HEARTH_NVML_LIBRARY")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("libnvidia-ml.so.1"), PathBuf::from)
}

/// The backend on the real driver; without one, an error that says so.
fn open() -> anyhow::Result<NvmlBackend> {
    let lib = library();
    NvmlBackend::open(&lib).map_err(|e| match e {
        GpuError::LibraryNotFound { .. } | GpuError::DriverNotLoaded { .. } => anyhow!(
            "no NVIDIA driver ({e}); this suite needs a GPU machine (set HEARTH_NVML_LIBRARY \
             to use another library)"
        ),
        other => anyhow!(other).context(format!("opening {}", lib.display())),
    })
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p hearth-hw-tests --run-ignored only -E 'binary(real_gpu)'"]
fn real_driver_info() -> anyhow::Result<()> {
    let b = open()?;
    let d = b.driver()?;
    ensure!(!d.driver_version.is_empty() && !d.nvml_version.is_empty(), "{d:?}");
    ensure!(d.cuda_version.contains('.'), "{d:?}");
    ensure!(b.gpu_count()? >= 1, "the driver enumerates no GPU");
    Ok(())
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p hearth-hw-tests --run-ignored only -E 'binary(real_gpu)'"]
fn real_inventory_is_sane() -> anyhow::Result<()> {
    let b = open()?;
    let all = inventory_all(&b)?;
    ensure!(!all.is_empty(), "no GPU");
    for (i, inv) in (0u32..).zip(&all) {
        ensure!(inv.index == i, "{inv:?}");
        ensure!(is_uuid(&inv.uuid), "UUID {:?}", inv.uuid);
        ensure!(!inv.name.trim().is_empty(), "{inv:?}");
        ensure!(is_pci_bus_id(&inv.pci_bus_id), "bus id {:?}", inv.pci_bus_id);
        ensure!(inv.memory_total_bytes > 0, "{inv:?}");
        ensure!(
            inv.power_limit_min_mw <= inv.power_limit_default_mw
                && inv.power_limit_default_mw <= inv.power_limit_max_mw
                && inv.power_limit_max_mw > 0,
            "limits out of order: {inv:?}"
        );
        ensure!(inv.max_sm_clock_mhz > 0 && inv.max_mem_clock_mhz > 0, "{inv:?}");
        ensure!(inv.max_pcie_gen >= 1 && inv.max_pcie_width >= 1, "{inv:?}");
        if let (Some(slow), Some(shut)) = (inv.slowdown_temp_c, inv.shutdown_temp_c) {
            ensure!(slow <= shut, "thresholds out of order: {inv:?}");
        }
    }
    let mut uuids: Vec<&str> = all.iter().map(|i| i.uuid.as_str()).collect();
    uuids.sort_unstable();
    uuids.dedup();
    ensure!(uuids.len() == all.len(), "UUIDs repeat");
    Ok(())
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p hearth-hw-tests --run-ignored only -E 'binary(real_gpu)'"]
fn real_telemetry_is_sane() -> anyhow::Result<()> {
    let b = open()?;
    let all = inventory_all(&b)?;
    let first: Vec<_> = (0..b.gpu_count()?).map(|i| b.sample(i)).collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_secs(1));
    for ((i, inv), before) in (0u32..).zip(&all).zip(&first) {
        let s = b.sample(i)?;
        let ctx = || format!("GPU {i}: {s:?}");
        ensure!((10..=100).contains(&s.temp_core_c), "temperature: {}", ctx());
        let max_ok = u64::from(inv.power_limit_max_mw) * 11 / 10;
        ensure!(u64::from(s.power_avg_mw) <= max_ok, "power: {}", ctx());
        if let Some(p) = s.power_instant_mw {
            ensure!(u64::from(p) <= max_ok, "instant power: {}", ctx());
        }
        ensure!(s.energy_mj > before.energy_mj, "energy must rise over 1 s: {}", ctx());
        ensure!(s.sm_clock_mhz <= inv.max_sm_clock_mhz, "SM clock: {}", ctx());
        ensure!(s.mem_clock_mhz <= inv.max_mem_clock_mhz, "memory clock: {}", ctx());
        ensure!(s.throttle.0 & !KNOWN_REASONS == 0, "unknown reason bits: {}", ctx());
        ensure!(s.enforced_power_limit_mw <= inv.power_limit_max_mw, "enforced: {}", ctx());
        ensure!(s.util_gpu_pct <= 100 && s.util_mem_pct <= 100, "utilisation: {}", ctx());
        ensure!(s.memory_used_bytes <= inv.memory_total_bytes, "memory: {}", ctx());
        ensure!(s.fan_speed_pct.len() <= inv.fan_count as usize, "fans: {}", ctx());
        ensure!(s.nvlink_active.len() == inv.nvlink_count as usize, "NVLink: {}", ctx());
        ensure!(s.pcie.generation <= inv.max_pcie_gen, "PCIe: {}", ctx());
    }
    Ok(())
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p hearth-hw-tests --run-ignored only -E 'binary(real_gpu)'"]
fn real_events_register_and_wait() -> anyhow::Result<()> {
    let b = open()?;
    let mut events = b.events().context("registering for XID and ECC events")?;
    // Ok(None) on a quiet GPU, Ok(Some(..)) if something happened: both are fine.
    let got = events.wait(Duration::from_secs(1))?;
    println!("event within 1 s: {got:?}");
    Ok(())
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p hearth-hw-tests --run-ignored only -E 'binary(real_gpu)'"]
fn real_report() -> anyhow::Result<()> {
    let b = open()?;
    let mut gpus = Vec::new();
    for i in 0..b.gpu_count()? {
        gpus.push(serde_json::json!({
            "inventory": b.inventory(i)?,
            "sample": b.sample(i)?,
        }));
    }
    let report = serde_json::json!({
        "library": b.library(),
        "driver": b.driver()?,
        "gpus": gpus,
    });
    println!("REAL-GPU REPORT {}", serde_json::to_string(&report)?);
    Ok(())
}
