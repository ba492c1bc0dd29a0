//! The GPU-backend conformance suite.
//!
//! Every [`Case`] names a scenario (TOML, `hearth_sim::Scenario`) and a check that runs against
//! any [`GpuBackend`] built on that scenario, with a [`SimControl`] to move the simulation's
//! manual clock and inject faults. The `sim` backend passes it with the in-process [`SimHost`] as
//! control; the `nvml` backend passes it over the fake `libnvidia-ml.so`, controlled through the
//! fake's socket. [`equality`] then runs one script on two backends side by side and requires
//! identical driver info, inventories, samples and errors at every checkpoint: the fake library
//! plus the `nvml` backend adds nothing to and loses nothing of what the simulator says.
//!
//! Checks compare against the simulator's documented model (`docs/0002-gpu-simulator.md`) and
//! NVML's semantics, with tolerances only where the simulator's ±2 % reading noise requires them.

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail, ensure};
use hearth_agent::gpu::{EventSource, GpuBackend, GpuError, inventory_all};
use hearth_agent::health::{self, Command, Monitor, policy::Policy};
use hearth_proto::api::{GpuService, GpuVerdict, HealthAction};
use hearth_proto::gpu::{
    EccCounters, GpuEvent, GpuEventKind, PcieLink, RemappedRows, ThrottleReasons,
};
use hearth_sim::{Fault, Scenario, SimHost, Workload};

/// Moves a simulation that a backend reads: the in-process [`SimHost`] or the fake library's
/// control socket.
pub trait SimControl {
    /// Advance simulated time by `ms` milliseconds.
    fn advance(&self, ms: u64) -> anyhow::Result<()>;
    /// Inject `fault` into GPU `gpu`.
    fn inject(&self, gpu: u32, fault: Fault) -> anyhow::Result<()>;
    /// Change what GPU `gpu` runs.
    fn set_workload(&self, gpu: u32, workload: Workload) -> anyhow::Result<()>;
    /// Reset GPU `gpu` (`nvidia-smi -r`).
    fn reset(&self, gpu: u32) -> anyhow::Result<()>;
}

impl SimControl for SimHost {
    fn advance(&self, ms: u64) -> anyhow::Result<()> {
        SimHost::advance(self, Duration::from_millis(ms));
        Ok(())
    }

    fn inject(&self, gpu: u32, fault: Fault) -> anyhow::Result<()> {
        Ok(self.lock().inject(gpu, fault)?)
    }

    fn set_workload(&self, gpu: u32, workload: Workload) -> anyhow::Result<()> {
        Ok(self.lock().set_workload(gpu, workload)?)
    }

    fn reset(&self, gpu: u32) -> anyhow::Result<()> {
        Ok(self.lock().reset_gpu(gpu)?)
    }
}

/// One conformance case.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// Short name; test functions are named `conformance_<name>`.
    pub name: &'static str,
    /// The scenario, as scenario-file TOML.
    pub scenario: &'static str,
    /// The check.
    pub run: fn(&dyn GpuBackend, &dyn SimControl) -> anyhow::Result<()>,
}

impl Case {
    /// The parsed scenario.
    pub fn scenario(&self) -> anyhow::Result<Scenario> {
        parse(self.scenario, self.name)
    }
}

fn parse(text: &str, name: &str) -> anyhow::Result<Scenario> {
    Ok(Scenario::parse(text, std::path::Path::new(&format!("<conformance {name}>")))?)
}

/// Three H100 SXM (two training, one inference) and an RTX 4090-like PCIe card, idle.
pub const MIXED: &str = r#"
seed = 7
ambient_c = 25.0

[[gpu]]
profile = "h100-sxm"
count = 2
workload = "training"

[[gpu]]
profile = "h100-sxm"
workload = "inference"

[[gpu]]
profile = "rtx4090-pcie"
workload = "idle"
"#;

/// Two H100 SXM training.
pub const TWO_H100: &str = r#"
seed = 3

[[gpu]]
profile = "h100-sxm"
count = 2
workload = "training"
"#;

/// Eight H100 SXM training (the fake library's default node).
pub const EIGHT_H100: &str = r#"
[[gpu]]
profile = "h100-sxm"
count = 8
workload = "training"
"#;

/// [`MIXED`] plus timed scenario events, for [`equality`].
pub const EQUALITY: &str = r#"
seed = 11
ambient_c = 27.0

[[gpu]]
profile = "h100-sxm"
count = 2
workload = "training"

[[gpu]]
profile = "h100-sxm"
workload = "inference"

[[gpu]]
profile = "rtx4090-pcie"
workload = "idle"

[[event]]
at_s = 4.0
gpu = 2
workload = "idle"

[[event]]
at_s = 6.0
gpu = 0
fault = "cooling_failure"
ambient_rise_c = 12.0
"#;

/// An H100 SXM (no fans of its own) and an RTX 4090-like card (two fans), both training.
pub const FANS: &str = r#"
seed = 5
ambient_c = 25.0

[[gpu]]
profile = "h100-sxm"
workload = "training"

[[gpu]]
profile = "rtx4090-pcie"
workload = "training"
"#;

/// Every case, in a stable order.
pub const CASES: &[Case] = &[
    Case { name: "inventory", scenario: MIXED, run: inventory },
    Case { name: "sample", scenario: MIXED, run: sample },
    Case { name: "power_limit", scenario: TWO_H100, run: power_limit },
    Case { name: "clocks", scenario: TWO_H100, run: clocks },
    Case { name: "xid79", scenario: EIGHT_H100, run: xid79 },
    Case { name: "double_bit_ecc", scenario: TWO_H100, run: double_bit_ecc },
    Case { name: "sbe_storm", scenario: TWO_H100, run: sbe_storm },
    Case { name: "row_remap", scenario: TWO_H100, run: row_remap },
    Case { name: "pcie_downtrain", scenario: TWO_H100, run: pcie_downtrain },
    Case { name: "nvlink_down", scenario: TWO_H100, run: nvlink_down },
    Case { name: "bmc_limit", scenario: TWO_H100, run: bmc_limit },
    Case { name: "workload", scenario: TWO_H100, run: workload },
    Case { name: "fans", scenario: FANS, run: fans },
    Case { name: "health_readings", scenario: MIXED, run: health_readings },
    Case { name: "health_faults", scenario: SIXTEEN_H100, run: health_faults },
];

/// Sixteen H100 SXM training: one GPU per fault of [`health_faults`], the rest healthy.
pub const SIXTEEN_H100: &str = r#"
seed = 5

[[gpu]]
profile = "h100-sxm"
count = 16
workload = "training"
"#;

/// The case called `name`.
pub fn case(name: &str) -> anyhow::Result<&'static Case> {
    CASES.iter().find(|c| c.name == name).ok_or_else(|| anyhow!("no conformance case {name:?}"))
}

/// The scenario of [`equality`].
pub fn equality_scenario() -> anyhow::Result<Scenario> {
    parse(EQUALITY, "equality")
}

// ------------------------------------------------------------------------------------------
// Helpers.

/// Every event that arrives before a quiet spell of `quiet`.
fn drain(events: &mut dyn EventSource, quiet: Duration) -> anyhow::Result<Vec<GpuEvent>> {
    let mut out = Vec::new();
    while let Some(e) = events.wait(quiet)? {
        out.push(e);
        ensure!(out.len() < 10_000, "event storm without end");
    }
    Ok(out)
}

/// The next event, which must arrive within 2 s.
fn next_event(events: &mut dyn EventSource) -> anyhow::Result<GpuEvent> {
    events.wait(Duration::from_secs(2))?.context("no event arrived within 2 s")
}

/// NVML's UUID format, `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex).
pub fn is_uuid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("GPU-") else { return false };
    let groups: Vec<&str> = rest.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A PCI bus id, `DDDDDDDD:BB:DD.F` (hex).
pub fn is_pci_bus_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 16
        && b[8] == b':'
        && b[11] == b':'
        && b[14] == b'.'
        && [0..8, 9..11, 12..14, 15..16]
            .into_iter()
            .all(|r| s.get(r).is_some_and(|p| p.bytes().all(|c| c.is_ascii_hexdigit())))
}

fn expect_lost<T: std::fmt::Debug>(
    r: Result<T, GpuError>,
    gpu: u32,
    what: &str,
) -> anyhow::Result<()> {
    match r {
        Err(GpuError::GpuLost { gpu: g }) if g == gpu => Ok(()),
        other => bail!("{what} on lost GPU {gpu}: expected GpuLost, got {other:?}"),
    }
}

fn expect_invalid<T: std::fmt::Debug>(
    r: Result<T, GpuError>,
    gpu: u32,
    what: &str,
) -> anyhow::Result<String> {
    match r {
        Err(GpuError::InvalidArgument { gpu: g, message, .. }) if g == gpu => Ok(message),
        other => bail!("{what}: expected InvalidArgument on GPU {gpu}, got {other:?}"),
    }
}

/// Only bits NVML defines.
fn known_reasons(t: ThrottleReasons) -> bool {
    t.names().iter().all(|n| !n.starts_with("0x"))
}

// ------------------------------------------------------------------------------------------
// Cases.

/// Inventory facts: count, UUID and bus-id formats, distinct identities, ordered limits, board
/// facts of both profiles, and `NoSuchGpu` past the end.
pub fn inventory(b: &dyn GpuBackend, _c: &dyn SimControl) -> anyhow::Result<()> {
    ensure!(!b.kind().is_empty());
    let driver = b.driver()?;
    ensure!(!driver.driver_version.is_empty() && !driver.nvml_version.is_empty(), "{driver:?}");
    ensure!(driver.cuda_version.contains('.'), "{driver:?}");
    ensure!(b.gpu_count()? == 4);
    let all = inventory_all(b)?;
    for (i, inv) in (0u32..).zip(&all) {
        ensure!(inv.index == i, "{inv:?}");
        ensure!(is_uuid(&inv.uuid), "UUID {:?}", inv.uuid);
        ensure!(is_pci_bus_id(&inv.pci_bus_id), "bus id {:?}", inv.pci_bus_id);
        ensure!(!inv.name.is_empty() && inv.memory_total_bytes > 0, "{inv:?}");
        ensure!(
            inv.power_limit_min_mw <= inv.power_limit_default_mw
                && inv.power_limit_default_mw <= inv.power_limit_max_mw,
            "limits out of order: {inv:?}"
        );
        ensure!(inv.max_sm_clock_mhz > 0 && inv.max_mem_clock_mhz > 0, "{inv:?}");
        let (slow, shut, tlimit) = (
            inv.slowdown_temp_c.context("slowdown")?,
            inv.shutdown_temp_c.context("shutdown")?,
            inv.max_operating_temp_c.context("T.Limit")?,
        );
        ensure!(tlimit <= slow && slow < shut, "thresholds out of order: {inv:?}");
    }
    let mut uuids: Vec<&str> = all.iter().map(|i| i.uuid.as_str()).collect();
    let mut buses: Vec<&str> = all.iter().map(|i| i.pci_bus_id.as_str()).collect();
    uuids.sort_unstable();
    uuids.dedup();
    buses.sort_unstable();
    buses.dedup();
    ensure!(uuids.len() == 4 && buses.len() == 4, "identities repeat: {all:?}");

    for h100 in &all[..3] {
        ensure!(h100.name == "NVIDIA H100 80GB HBM3", "{h100:?}");
        let serial = h100.serial.as_deref().context("H100 serial")?;
        ensure!(serial.len() == 13 && serial.bytes().all(|c| c.is_ascii_digit()), "{serial}");
        ensure!(h100.memory_total_bytes == 81_559 * 1024 * 1024, "{h100:?}");
        ensure!(
            (h100.power_limit_min_mw, h100.power_limit_default_mw, h100.power_limit_max_mw)
                == (200_000, 700_000, 700_000),
            "{h100:?}"
        );
        ensure!((h100.max_pcie_gen, h100.max_pcie_width, h100.nvlink_count) == (5, 16, 18));
        ensure!(h100.fan_count == 0 && h100.max_memory_temp_c.is_some(), "{h100:?}");
        ensure!((h100.max_sm_clock_mhz, h100.max_mem_clock_mhz) == (1980, 2619), "{h100:?}");
    }
    let geforce = &all[3];
    ensure!(geforce.serial.is_none(), "GeForce boards report no serial: {geforce:?}");
    ensure!((geforce.fan_count, geforce.nvlink_count) == (2, 0), "{geforce:?}");
    ensure!(geforce.max_memory_temp_c.is_none(), "{geforce:?}");

    match b.inventory(4) {
        Err(GpuError::NoSuchGpu { gpu: 4 }) => {}
        other => bail!("inventory(4) of 4 GPUs: expected NoSuchGpu, got {other:?}"),
    }
    match b.sample(4) {
        Err(GpuError::NoSuchGpu { gpu: 4 }) => {}
        other => bail!("sample(4) of 4 GPUs: expected NoSuchGpu, got {other:?}"),
    }
    Ok(())
}

/// Sample sanity on every GPU after 5 s, and energy equal to the integral of power.
pub fn sample(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    c.advance(5_000)?;
    let all = inventory_all(b)?;
    for (i, inv) in (0u32..).zip(&all) {
        let s = b.sample(i)?;
        let ctx = || format!("GPU {i}: {s:?}");
        ensure!((20..=100).contains(&s.temp_core_c), "{}", ctx());
        ensure!(s.thermal_margin_c.is_some() && s.power_instant_mw.is_some(), "{}", ctx());
        let max_ok = u64::from(inv.power_limit_max_mw) * 11 / 10;
        ensure!(s.power_avg_mw > 0 && u64::from(s.power_avg_mw) <= max_ok, "{}", ctx());
        ensure!(s.energy_mj > 0, "{}", ctx());
        ensure!(s.power_limit_mw == inv.power_limit_default_mw, "{}", ctx());
        ensure!(s.enforced_power_limit_mw <= s.power_limit_mw, "{}", ctx());
        ensure!(s.sm_clock_mhz <= inv.max_sm_clock_mhz, "{}", ctx());
        ensure!(s.mem_clock_mhz <= inv.max_mem_clock_mhz, "{}", ctx());
        ensure!(known_reasons(s.throttle), "{}", ctx());
        ensure!(s.util_gpu_pct <= 100 && s.util_mem_pct <= 100, "{}", ctx());
        ensure!(s.memory_used_bytes <= inv.memory_total_bytes, "{}", ctx());
        ensure!(s.retired_pages.is_none(), "row-remapping boards retire no pages: {}", ctx());
        ensure!(
            s.pcie
                == PcieLink {
                    generation: inv.max_pcie_gen,
                    width: inv.max_pcie_width,
                    replay_counter: 0
                },
            "{}",
            ctx()
        );
        ensure!(s.fan_speed_pct.len() == inv.fan_count as usize, "{}", ctx());
        ensure!(s.fan_speed_pct.iter().all(|&p| p <= 100), "{}", ctx());
        ensure!(s.nvlink_active.len() == inv.nvlink_count as usize, "{}", ctx());
        ensure!(s.nvlink_active.iter().all(|&a| a), "{}", ctx());
    }
    for i in 0..3 {
        let s = b.sample(i)?;
        let mem = s.temp_memory_c.context("H100 HBM temperature")?;
        ensure!(mem + 3 >= s.temp_core_c, "HBM {mem} °C well below die {}", s.temp_core_c);
        ensure!(s.ecc == Some(EccCounters::default()), "{s:?}");
        ensure!(s.remapped_rows == Some(RemappedRows::default()), "{s:?}");
        ensure!(s.compute_processes == 1 && s.memory_used_bytes > 0, "{s:?}");
    }
    for i in 0..2 {
        let s = b.sample(i)?;
        ensure!((98..=100).contains(&s.util_gpu_pct), "training utilisation: {s:?}");
        ensure!(s.power_avg_mw > 600_000, "training at the 700 W default: {s:?}");
    }
    let inference = b.sample(2)?;
    ensure!((80..=90).contains(&inference.util_mem_pct), "{inference:?}");
    let idle = b.sample(3)?;
    ensure!(idle.ecc.is_none() && idle.remapped_rows.is_none(), "no ECC on GeForce: {idle:?}");
    ensure!(idle.temp_memory_c.is_none() && idle.nvlink_active.is_empty(), "{idle:?}");
    ensure!(idle.fan_speed_pct.len() == 2, "{idle:?}");
    ensure!(idle.throttle.contains(ThrottleReasons::GPU_IDLE), "{idle:?}");
    ensure!(idle.compute_processes == 0 && idle.util_gpu_pct == 0, "{idle:?}");
    ensure!(idle.power_avg_mw < 60_000, "idle 4090 near 25 W: {idle:?}");

    // Energy (mJ) rises by the integral of power: the sum of ten 1 s averages (mW × 1 s = mJ).
    let e0 = b.sample(0)?.energy_mj;
    let mut integral = 0u64;
    let mut last = e0;
    for _ in 0..10 {
        c.advance(1_000)?;
        let s = b.sample(0)?;
        ensure!(s.energy_mj > last, "energy must increase: {} then {}", last, s.energy_mj);
        last = s.energy_mj;
        integral += u64::from(s.power_avg_mw);
    }
    let delta = last - e0;
    let err = delta.abs_diff(integral) as f64 / integral as f64;
    ensure!(err < 0.03, "energy rose {delta} mJ but power integrates to {integral} mJ");
    Ok(())
}

/// A power limit takes effect after a delay and caps power; out-of-range limits are rejected
/// with an error naming the range; the default can be restored.
pub fn power_limit(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    let inv = b.inventory(0)?;
    c.advance(2_000)?;
    b.set_power_limit(0, 300_000)?;
    ensure!(b.sample(0)?.power_limit_mw == 700_000, "a new limit takes effect after a delay");
    c.advance(50)?;
    ensure!(b.sample(0)?.power_limit_mw == 700_000, "not within 50 ms (delay is 100-500 ms)");
    c.advance(550)?;
    let s = b.sample(0)?;
    ensure!(s.power_limit_mw == 300_000 && s.enforced_power_limit_mw == 300_000, "{s:?}");
    c.advance(3_000)?;
    let s = b.sample(0)?;
    ensure!(s.power_avg_mw <= 315_000, "power must follow the 300 W cap: {s:?}");
    ensure!(s.throttle.contains(ThrottleReasons::SW_POWER_CAP), "{s:?}");
    ensure!(b.sample(1)?.power_limit_mw == 700_000, "GPU 1 keeps its limit");

    for bad in [inv.power_limit_min_mw - 1, inv.power_limit_max_mw + 1, 0] {
        let msg = expect_invalid(b.set_power_limit(0, bad), 0, &format!("set {bad} mW"))?;
        ensure!(
            msg.contains(&inv.power_limit_min_mw.to_string())
                && msg.contains(&inv.power_limit_max_mw.to_string()),
            "the error must name the range: {msg}"
        );
    }
    b.restore_power_limit(0)?;
    c.advance(600)?;
    ensure!(b.sample(0)?.power_limit_mw == inv.power_limit_default_mw);
    Ok(())
}

/// Locked clocks hold the SM clock in the range; a reset releases it; bad ranges are rejected.
pub fn clocks(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    c.advance(2_000)?;
    let free = b.sample(0)?.sm_clock_mhz;
    ensure!(free > 1_500, "a training H100 at 700 W boosts: {free} MHz");
    b.lock_clocks(0, 1_000, 1_200)?;
    c.advance(1_000)?;
    let locked = b.sample(0)?;
    ensure!((1_000..=1_200).contains(&locked.sm_clock_mhz), "{locked:?}");
    ensure!(locked.power_avg_mw < b.sample(1)?.power_avg_mw, "a lower clock draws less power");
    ensure!(b.sample(1)?.sm_clock_mhz > 1_500, "GPU 1 is not locked");
    b.reset_clocks(0)?;
    c.advance(1_000)?;
    ensure!(b.sample(0)?.sm_clock_mhz > 1_200, "reset releases the lock");
    expect_invalid(b.lock_clocks(0, 1_500, 1_000), 0, "lock 1500..1000")?;
    expect_invalid(b.lock_clocks(0, 100, 5_000), 0, "lock 100..5000")?;
    Ok(())
}

/// Fan control: manual speeds are followed (and cool the card), a reset gives the fans back to
/// the automatic curve; a fanless board answers `NotSupported`, a fan the board lacks or a speed
/// above 100 % `InvalidArgument`.
pub fn fans(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    match b.set_fan_speed(0, 0, 80) {
        Err(GpuError::NotSupported { gpu: 0, .. }) => {}
        other => bail!("fan speed on a fanless H100: expected NotSupported, got {other:?}"),
    }
    match b.reset_fan_speed(0, 0) {
        Err(GpuError::NotSupported { gpu: 0, .. }) => {}
        other => bail!("fan reset on a fanless H100: expected NotSupported, got {other:?}"),
    }
    c.advance(120_000)?;
    let auto = b.sample(1)?;
    ensure!(auto.fan_speed_pct.iter().all(|&p| p < 100), "automatic curve below 100 %: {auto:?}");
    b.set_fan_speed(1, 0, 100)?;
    b.set_fan_speed(1, 1, 100)?;
    c.advance(60_000)?;
    let manual = b.sample(1)?;
    ensure!(manual.fan_speed_pct.iter().all(|&p| p >= 99), "manual 100 %: {manual:?}");
    ensure!(
        manual.temp_core_c + 2 < auto.temp_core_c,
        "full airflow cools: {} °C vs {} °C",
        manual.temp_core_c,
        auto.temp_core_c
    );
    b.set_fan_speed(1, 0, 30)?;
    b.reset_fan_speed(1, 1)?;
    c.advance(20_000)?;
    let mixed = b.sample(1)?;
    ensure!(mixed.fan_speed_pct[0] <= 31, "fan 0 at manual 30 %: {mixed:?}");
    ensure!(mixed.fan_speed_pct[1] > 31, "fan 1 back on the automatic curve: {mixed:?}");
    expect_invalid(b.set_fan_speed(1, 2, 50), 1, "fan 2 of a two-fan card")?;
    expect_invalid(b.set_fan_speed(1, 0, 101), 1, "fan speed 101 %")?;
    Ok(())
}

/// XID 79: an event from that GPU, then `GpuLost` on that GPU only, for good.
pub fn xid79(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    let mut events = b.events()?;
    ensure!(events.wait(Duration::from_millis(100))?.is_none(), "no events before a fault");
    let uuid = b.inventory(2)?.uuid;
    c.inject(2, Fault::Xid { xid: 79 })?;
    let e = next_event(events.as_mut())?;
    ensure!(e == GpuEvent { gpu: 2, uuid, kind: GpuEventKind::Xid(79) }, "{e:?}");
    expect_lost(b.sample(2), 2, "sample")?;
    expect_lost(b.inventory(2), 2, "inventory")?;
    expect_lost(b.set_power_limit(2, 300_000), 2, "set power limit")?;
    ensure!(b.gpu_count()? == 8, "a lost GPU is still enumerated");
    for gpu in (0..8).filter(|&g| g != 2) {
        b.sample(gpu).with_context(|| format!("GPU {gpu} must keep working"))?;
    }
    c.advance(1_000)?;
    expect_lost(b.sample(2), 2, "sample after 1 s")?;
    ensure!(drain(events.as_mut(), Duration::from_millis(200))?.is_empty());
    // A new event source skips the lost GPU and still works.
    let mut again = b.events()?;
    c.inject(5, Fault::Xid { xid: 13 })?;
    let e = next_event(again.as_mut())?;
    ensure!(e.gpu == 5 && e.kind == GpuEventKind::Xid(13), "{e:?}");
    Ok(())
}

/// A double-bit ECC error: `DoubleBitEcc` then XID 48, counters and a pending row remap.
pub fn double_bit_ecc(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    let mut events = b.events()?;
    let uuid = b.inventory(1)?.uuid;
    c.inject(1, Fault::DoubleBitEcc)?;
    let got = drain(events.as_mut(), Duration::from_millis(300))?;
    let want = vec![
        GpuEvent { gpu: 1, uuid: uuid.clone(), kind: GpuEventKind::DoubleBitEcc },
        GpuEvent { gpu: 1, uuid, kind: GpuEventKind::Xid(48) },
    ];
    ensure!(got == want, "events {got:?}");
    let s = b.sample(1)?;
    let ecc = s.ecc.context("ECC counters")?;
    ensure!(ecc.volatile_uncorrected == 1 && ecc.aggregate_uncorrected == 1, "{ecc:?}");
    ensure!(ecc.volatile_corrected == 0, "{ecc:?}");
    let rows = s.remapped_rows.context("remapped rows")?;
    ensure!(rows.uncorrectable == 1 && rows.pending && !rows.failed, "{rows:?}");
    ensure!(b.sample(0)?.ecc == Some(EccCounters::default()), "GPU 0 unaffected");
    Ok(())
}

/// A storm of single-bit errors: exact counters, rate-limited `SingleBitEcc` events.
pub fn sbe_storm(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    let mut events = b.events()?;
    c.inject(0, Fault::SingleBitEccStorm { per_second: 100, duration_s: 2.0 })?;
    c.advance(2_000)?;
    let got = drain(events.as_mut(), Duration::from_millis(300))?;
    ensure!(
        got.iter().all(|e| e.gpu == 0 && e.kind == GpuEventKind::SingleBitEcc),
        "events {got:?}"
    );
    // At most 10 events per GPU per simulated second (docs/0002): 2 s give 10..=30.
    ensure!((10..=30).contains(&got.len()), "{} SingleBitEcc events", got.len());
    let ecc = b.sample(0)?.ecc.context("ECC counters")?;
    ensure!(ecc.volatile_corrected == 200 && ecc.aggregate_corrected == 200, "{ecc:?}");
    ensure!(ecc.volatile_uncorrected == 0, "{ecc:?}");
    c.advance(2_000)?;
    let after = b.sample(0)?.ecc.context("ECC counters")?;
    ensure!(after.volatile_corrected == 200, "the storm ended: {after:?}");
    Ok(())
}

/// Row remapping: pending (cleared by a reset) and failed (XID 64).
pub fn row_remap(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    let mut events = b.events()?;
    c.inject(0, Fault::RowRemapPending)?;
    let rows = b.sample(0)?.remapped_rows.context("remapped rows")?;
    ensure!(rows.pending && !rows.failed, "{rows:?}");
    c.inject(1, Fault::RowRemapFailure)?;
    let rows = b.sample(1)?.remapped_rows.context("remapped rows")?;
    ensure!(rows.failed, "{rows:?}");
    let e = next_event(events.as_mut())?;
    ensure!(e.gpu == 1 && e.kind == GpuEventKind::Xid(64), "{e:?}");
    c.reset(0)?;
    let rows = b.sample(0)?.remapped_rows.context("remapped rows")?;
    ensure!(!rows.pending, "a reset applies the pending remap: {rows:?}");
    Ok(())
}

/// A PCIe downtrain shows in the current link, not in the maxima.
pub fn pcie_downtrain(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    c.inject(1, Fault::PcieDowntrain { generation: 3, width: 8 })?;
    let s = b.sample(1)?;
    ensure!(s.pcie.generation == 3 && s.pcie.width == 8, "{:?}", s.pcie);
    let inv = b.inventory(1)?;
    ensure!((inv.max_pcie_gen, inv.max_pcie_width) == (5, 16), "{inv:?}");
    let other = b.sample(0)?.pcie;
    ensure!(other.generation == 5 && other.width == 16, "GPU 0 unaffected: {other:?}");
    c.inject(1, Fault::Clear)?;
    let s = b.sample(1)?;
    ensure!(s.pcie.generation == 5 && s.pcie.width == 16, "{:?}", s.pcie);
    Ok(())
}

/// A link going down shows in `nvlink_active` and raises XID 74.
pub fn nvlink_down(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    let mut events = b.events()?;
    c.inject(0, Fault::NvlinkDown { link: 5 })?;
    let links = b.sample(0)?.nvlink_active;
    ensure!(links.len() == 18, "{links:?}");
    ensure!(!links[5] && links.iter().filter(|&&a| a).count() == 17, "{links:?}");
    ensure!(b.inventory(0)?.nvlink_count == 18, "a down link is still a link");
    let e = next_event(events.as_mut())?;
    ensure!(e.gpu == 0 && e.kind == GpuEventKind::Xid(74), "{e:?}");
    ensure!(b.sample(1)?.nvlink_active.iter().all(|&a| a), "GPU 1 unaffected");
    Ok(())
}

/// A BMC limit below ours shows in the enforced limit and brakes the GPU.
pub fn bmc_limit(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    c.advance(1_000)?;
    c.inject(0, Fault::BmcPowerLimit { watts: 400 })?;
    let s = b.sample(0)?;
    ensure!(s.enforced_power_limit_mw == 400_000 && s.power_limit_mw == 700_000, "{s:?}");
    c.advance(3_000)?;
    let s = b.sample(0)?;
    ensure!(s.power_avg_mw <= 420_000, "power must follow the BMC's 400 W: {s:?}");
    ensure!(s.throttle.contains(ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN), "{s:?}");
    ensure!(b.sample(1)?.enforced_power_limit_mw == 700_000, "GPU 1 unaffected");
    Ok(())
}

/// A workload change shows in utilisation, processes, power and the idle reason.
pub fn workload(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    c.advance(2_000)?;
    c.set_workload(0, Workload::Idle)?;
    c.advance(3_000)?;
    let s = b.sample(0)?;
    ensure!(s.util_gpu_pct == 0 && s.compute_processes == 0, "{s:?}");
    ensure!(s.throttle.contains(ThrottleReasons::GPU_IDLE), "{s:?}");
    ensure!(s.power_avg_mw < 80_000, "an idle H100 draws ~70 W: {s:?}");
    let busy = b.sample(1)?;
    ensure!(busy.util_gpu_pct >= 98 && busy.compute_processes == 1, "{busy:?}");
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Equality of two backends.

/// A comparable kind of error: the variant and its GPU.
fn error_kind(e: &GpuError) -> anyhow::Result<String> {
    Ok(match e {
        GpuError::GpuLost { gpu } => format!("GpuLost({gpu})"),
        GpuError::NoSuchGpu { gpu } => format!("NoSuchGpu({gpu})"),
        GpuError::InvalidArgument { gpu, .. } => format!("InvalidArgument({gpu})"),
        GpuError::NotSupported { gpu, .. } => format!("NotSupported({gpu})"),
        other => bail!("unexpected error: {other}"),
    })
}

/// The fields in which two values differ, from their JSON forms.
fn differences<T: serde::Serialize>(a: &T, b: &T) -> String {
    let (Ok(a), Ok(b)) = (serde_json::to_value(a), serde_json::to_value(b)) else {
        return "(not serialisable)".into();
    };
    match (a.as_object(), b.as_object()) {
        (Some(x), Some(y)) => x
            .iter()
            .filter(|(k, v)| y.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k}: {v} vs {}", y.get(k).unwrap_or(&serde_json::Value::Null)))
            .collect::<Vec<_>>()
            .join("; "),
        _ => format!("{a} vs {b}"),
    }
}

/// Two answers to the same call are the same value, or errors of the same kind.
fn same<T: PartialEq + std::fmt::Debug + serde::Serialize>(
    what: &str,
    x: Result<T, GpuError>,
    y: Result<T, GpuError>,
) -> anyhow::Result<()> {
    match (x, y) {
        (Ok(x), Ok(y)) => ensure!(x == y, "{what} differs: {}", differences(&x, &y)),
        (Err(x), Err(y)) => {
            ensure!(error_kind(&x)? == error_kind(&y)?, "{what}: errors differ: {x} / {y}")
        }
        (x, y) => bail!("{what}: {x:?} / {y:?}"),
    }
    Ok(())
}

/// Everything two backends report, compared: driver, count, and for each GPU (and one past the
/// end) inventory and sample.
fn compare(at: &str, a: &dyn GpuBackend, b: &dyn GpuBackend) -> anyhow::Result<()> {
    let ctx = || format!("{at}: {} vs {}", a.kind(), b.kind());
    same("driver info", a.driver(), b.driver()).with_context(ctx)?;
    same("GPU count", a.gpu_count(), b.gpu_count()).with_context(ctx)?;
    for gpu in 0..=a.gpu_count()? {
        same(&format!("GPU {gpu} inventory"), a.inventory(gpu), b.inventory(gpu))
            .with_context(ctx)?;
        same(&format!("GPU {gpu} sample"), a.sample(gpu), b.sample(gpu)).with_context(ctx)?;
    }
    Ok(())
}

/// One script on two backends built on [`EQUALITY`], each with its own control: identical
/// answers at every checkpoint (values, and errors by kind), across limits, clock locks,
/// faults, workload changes, scenario events and a lost GPU.
pub fn equality(
    a: (&dyn GpuBackend, &dyn SimControl),
    b: (&dyn GpuBackend, &dyn SimControl),
) -> anyhow::Result<()> {
    let (ba, ca) = a;
    let (bb, cb) = b;
    let mut t_ms = 0u64;
    let check = |label: &str, t: u64| compare(&format!("t={t} ms ({label})"), ba, bb);
    let both = |f: &dyn Fn(&dyn GpuBackend, &dyn SimControl) -> anyhow::Result<()>| {
        f(ba, ca).context("first backend")?;
        f(bb, cb).context("second backend")
    };
    let advance = |ms: u64, t: &mut u64| -> anyhow::Result<()> {
        *t += ms;
        both(&|_, c| c.advance(ms))
    };

    check("start", t_ms)?;
    advance(1_000, &mut t_ms)?;
    check("after 1 s", t_ms)?;
    both(&|b, _| Ok(b.set_power_limit(1, 450_000)?))?;
    check("limit requested", t_ms)?;
    for step in [60, 240, 700] {
        advance(step, &mut t_ms)?;
        check("limit taking effect", t_ms)?;
    }
    both(&|b, _| Ok(b.lock_clocks(0, 900, 1_400)?))?;
    advance(1_500, &mut t_ms)?;
    check("clocks locked", t_ms)?;
    both(&|_, c| c.inject(3, Fault::PcieDowntrain { generation: 2, width: 8 }))?;
    both(&|_, c| c.inject(1, Fault::DoubleBitEcc))?;
    both(&|_, c| c.inject(0, Fault::NvlinkDown { link: 3 }))?;
    both(&|_, c| c.inject(1, Fault::BmcPowerLimit { watts: 350 }))?;
    both(&|_, c| c.inject(2, Fault::SingleBitEccStorm { per_second: 40, duration_s: 1.5 }))?;
    check("faults injected", t_ms)?;
    advance(2_500, &mut t_ms)?;
    check("past the 4 s scenario event", t_ms)?;
    both(&|_, c| c.set_workload(3, Workload::Training))?;
    both(&|b, _| Ok(b.set_power_limit(3, 300_000)?))?;
    for step in [10, 990, 2_000] {
        advance(step, &mut t_ms)?;
        check("past the 6 s cooling failure", t_ms)?;
    }
    both(&|_, c| c.inject(2, Fault::FallenOffBus))?;
    check("GPU 2 lost", t_ms)?;
    both(&|b, _| {
        b.reset_clocks(0)?;
        b.restore_power_limit(1)?;
        Ok(())
    })?;
    both(&|_, c| c.reset(1))?;
    for step in [5, 995, 9_000, 20_000] {
        advance(step, &mut t_ms)?;
        check("settling", t_ms)?;
    }
    Ok(())
}

/// The health layer's GPU readings: compute processes tied to the workload, NVLink error
/// counters (zero, rising in a burst, zeroed by a reset), persistence mode, the PCIe replay
/// counter rising in a burst, and `GpuLost` for each on a lost GPU.
pub fn health_readings(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    let busy = b.compute_processes(0)?;
    ensure!(busy.len() == 1 && busy[0].pid == 40_000 && busy[0].used_memory_bytes > 0, "{busy:?}");
    ensure!(b.compute_processes(1)?[0].pid == 40_100);
    ensure!(b.compute_processes(3)?.is_empty(), "the idle GPU lists processes");
    for gpu in 0..4 {
        ensure!(b.persistence_mode(gpu)? == Some(true), "GPU {gpu} persistence mode");
    }
    let links = b.nvlink_errors(0)?;
    ensure!(links.len() == 18 && links.iter().all(|l| l.total() == 0), "{links:?}");
    ensure!(b.nvlink_errors(3)?.is_empty(), "the PCIe card has no NVLink");
    c.inject(0, Fault::NvlinkErrors { link: 2, per_second: 50, duration_s: 2.0 })?;
    c.inject(1, Fault::PcieReplayStorm { per_second: 30, duration_s: 1.0 })?;
    c.advance(3000)?;
    let links = b.nvlink_errors(0)?;
    ensure!(links[2].replay == 100 && links[1].total() == 0, "{:?}", links[2]);
    ensure!(b.sample(1)?.pcie.replay_counter == 30, "{:?}", b.sample(1)?.pcie);
    c.reset(0)?;
    ensure!(b.nvlink_errors(0)?.iter().all(|l| l.total() == 0), "reset keeps NVLink counters");
    c.set_workload(0, Workload::Idle)?;
    ensure!(b.compute_processes(0)?.is_empty());
    c.inject(1, Fault::FallenOffBus)?;
    expect_lost(b.compute_processes(1), 1, "compute_processes")?;
    expect_lost(b.nvlink_errors(1), 1, "nvlink_errors")?;
    expect_lost(b.persistence_mode(1), 1, "persistence_mode")?;
    Ok(())
}

/// One row of [`health_faults`]: a fault on its own GPU and what the health layer must make of it.
struct HealthRow {
    gpu: u32,
    fault: Fault,
    verdict: GpuVerdict,
    action: HealthAction,
    service: GpuService,
    /// Once idle, the GPU is reset and returns to service healthy.
    returns: bool,
}

fn health_rows() -> Vec<HealthRow> {
    use GpuService::*;
    use GpuVerdict::*;
    use HealthAction as A;
    let row = |gpu, fault, verdict, action, service, returns| HealthRow {
        gpu,
        fault,
        verdict,
        action,
        service,
        returns,
    };
    vec![
        row(1, Fault::Xid { xid: 13 }, Healthy, A::None, Serving, false),
        row(2, Fault::DoubleBitEcc, Failed, A::Quarantine, Quarantined, true),
        row(3, Fault::Xid { xid: 63 }, Degraded, A::ResetWhenIdle, ResetPending, true),
        row(4, Fault::RowRemapFailure, Failed, A::QuarantineRma, Rma, false),
        row(
            5,
            Fault::PcieDowntrain { generation: 3, width: 8 },
            Degraded,
            A::Watch,
            Serving,
            false,
        ),
        row(
            6,
            Fault::SingleBitEccStorm { per_second: 100, duration_s: 5.0 },
            Degraded,
            A::Watch,
            Serving,
            false,
        ),
        row(7, Fault::NvlinkDown { link: 0 }, Failed, A::Quarantine, Quarantined, true),
        row(8, Fault::FallenOffBus, Failed, A::Reboot, Quarantined, false),
        row(
            9,
            Fault::PcieReplayStorm { per_second: 20, duration_s: 5.0 },
            Degraded,
            A::Watch,
            Serving,
            false,
        ),
        row(
            10,
            Fault::NvlinkErrors { link: 1, per_second: 20, duration_s: 5.0 },
            Degraded,
            A::Watch,
            Serving,
            false,
        ),
        row(11, Fault::BmcPowerLimit { watts: 400 }, Degraded, A::Watch, Serving, false),
        row(12, Fault::Xid { xid: 12345 }, Degraded, A::Watch, Serving, false),
        row(13, Fault::RowRemapPending, Degraded, A::ResetWhenIdle, ResetPending, true),
        row(14, Fault::Xid { xid: 119 }, Failed, A::Quarantine, Quarantined, true),
    ]
}

/// Reset commands as the agent carries them out: only a GPU NVML lists no process on.
fn run_resets(
    m: &mut Monitor,
    b: &dyn GpuBackend,
    c: &dyn SimControl,
    commands: Vec<Command>,
    now: u64,
) -> anyhow::Result<u32> {
    let mut done = 0;
    for Command::Reset { gpu, uuid } in commands {
        ensure!(b.compute_processes(gpu)?.is_empty(), "reset asked for busy GPU {gpu}");
        c.reset(gpu)?;
        m.reset_result(&uuid, Ok(()), now);
        done += 1;
    }
    Ok(done)
}

/// One health round: wait for events (judged at once), then one sampling round.
fn health_round(
    m: &mut Monitor,
    b: &dyn GpuBackend,
    c: &dyn SimControl,
    events: &mut dyn EventSource,
    inv: &[hearth_proto::gpu::GpuInventory],
    now: u64,
) -> anyhow::Result<u32> {
    let mut resets = 0;
    while let Some(e) = events.wait(Duration::from_millis(30))? {
        let cmds = m.observe_event(&e, now);
        resets += run_resets(m, b, c, cmds, now)?;
    }
    let cmds = m.observe_round(&health::observe_inventory(b, inv), now);
    resets += run_resets(m, b, c, cmds, now)?;
    Ok(resets)
}

/// Every fault kind of the simulator yields its verdict, action and service state on its own
/// GPU while the others keep serving healthy; busy GPUs are never reset; once idle, resettable
/// faults are reset and the GPU serves again after a clean check.
pub fn health_faults(b: &dyn GpuBackend, c: &dyn SimControl) -> anyhow::Result<()> {
    let mut m = Monitor::new(Policy::default(), None)?;
    let inv = inventory_all(b)?;
    let mut events = b.events()?;
    let mut now = 1_000_000u64;
    for _ in 0..3 {
        c.advance(1000)?;
        now += 1000;
        health_round(&mut m, b, c, events.as_mut(), &inv, now)?;
    }
    let v = m.view();
    ensure!(
        v.gpus.len() == 16 && v.gpus.iter().all(|g| g.health.verdict == GpuVerdict::Healthy),
        "{v:?}"
    );
    let rows = health_rows();
    for r in &rows {
        c.inject(r.gpu, r.fault.clone())?;
    }
    let mut resets = 0;
    for _ in 0..4 {
        c.advance(1000)?;
        now += 1000;
        resets += health_round(&mut m, b, c, events.as_mut(), &inv, now)?;
    }
    ensure!(resets == 0, "{resets} resets of GPUs that are busy");
    let v = m.view();
    for r in &rows {
        let g = &v.gpus[r.gpu as usize];
        ensure!(
            (g.health.verdict, g.action, g.service) == (r.verdict, r.action, r.service),
            "GPU {} after {:?}: got {:?}/{:?}/{:?} ({:?}), want {:?}/{:?}/{:?}",
            r.gpu,
            r.fault,
            g.health.verdict,
            g.action,
            g.service,
            g.health.reasons,
            r.verdict,
            r.action,
            r.service
        );
    }
    for gpu in [0, 15] {
        ensure!(
            v.gpus[gpu].health.verdict == GpuVerdict::Healthy,
            "bystander {gpu}: {:?}",
            v.gpus[gpu]
        );
    }
    ensure!(v.gpus[4].rma_hint.is_some(), "{:?}", v.gpus[4]);
    ensure!(
        v.reboot_requested.as_deref().is_some_and(|r| r.contains("GPU 8")),
        "{:?}",
        v.reboot_requested
    );
    ensure!(
        v.history.iter().any(|h| h.subject == "gpu 2" && h.to == GpuVerdict::Failed),
        "{:?}",
        v.history
    );
    // The jobs end: resettable GPUs are reset and return.
    for r in rows.iter().filter(|r| r.returns || r.service == GpuService::Rma) {
        c.set_workload(r.gpu, Workload::Idle)?;
    }
    for _ in 0..3 {
        c.advance(1000)?;
        now += 1000;
        resets += health_round(&mut m, b, c, events.as_mut(), &inv, now)?;
    }
    let want = u32::try_from(rows.iter().filter(|r| r.returns).count())?;
    ensure!(resets == want, "{resets} resets, want {want}");
    let v = m.view();
    for r in &rows {
        let g = &v.gpus[r.gpu as usize];
        if r.returns {
            ensure!(
                g.service == GpuService::Serving && g.health.verdict == GpuVerdict::Healthy,
                "GPU {} did not return after reset: {g:?}",
                r.gpu
            );
        } else if r.service == GpuService::Rma {
            ensure!(g.service == GpuService::Rma, "RMA GPU {} left quarantine: {g:?}", r.gpu);
        }
    }
    Ok(())
}

/// Defines, in the calling test file, one `#[test]` per conformance case that calls
/// `$run(case_name) -> anyhow::Result<()>`, and `every_case_is_run`, which checks that this list
/// is [`CASES`]. One list serves every backend's test file.
#[macro_export]
macro_rules! conformance_tests {
    ($run:path) => {
        $crate::conformance_tests!(@cases $run;
            inventory, sample, power_limit, clocks, xid79, double_bit_ecc, sbe_storm, row_remap,
            pcie_downtrain, nvlink_down, bmc_limit, workload, fans, health_readings,
            health_faults);
    };
    (@cases $run:path; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() -> anyhow::Result<()> {
                $run(stringify!($name))
            }
        )*

        /// Every case of the suite has a test here.
        #[test]
        fn every_case_is_run() {
            let here = [$(stringify!($name)),*];
            let suite: Vec<&str> =
                $crate::conformance::CASES.iter().map(|c| c.name).collect();
            assert_eq!(suite, here);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert!(is_uuid("GPU-0123abcd-0000-1111-2222-333344445555"));
        assert!(!is_uuid("GPU-0123abcd-0000-1111-2222-33334444555"));
        assert!(!is_uuid("MIG-0123abcd-0000-1111-2222-333344445555"));
        assert!(is_pci_bus_id("00000000:1A:00.0"));
        assert!(!is_pci_bus_id("0000:1A:00.0"));
    }

    #[test]
    fn case_scenarios_parse() -> anyhow::Result<()> {
        for c in CASES {
            c.scenario().with_context(|| c.name)?;
        }
        equality_scenario()?;
        Ok(())
    }
}
