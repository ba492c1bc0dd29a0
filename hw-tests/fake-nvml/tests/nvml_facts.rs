//! The fake library through NVML's C ABI, checked against NVML's documented semantics and a real
//! H100 SXM capture.
//!
//! Sources of the facts (see `hw-tests/README.md` for the full list):
//! - nvml.h / the NVML API reference: return codes (`UNINITIALIZED` = 1, `INVALID_ARGUMENT` = 2,
//!   `NOT_SUPPORTED` = 3, `INSUFFICIENT_SIZE` = 7, `TIMEOUT` = 10, `GPU_IS_LOST` = 15,
//!   `ARGUMENT_VERSION_MISMATCH` = 25); `nvmlDeviceGetPowerUsage` in mW, a 1 s average on Ampere
//!   and later; `nvmlDeviceGetTotalEnergyConsumption` in mJ since the driver was last reloaded;
//!   `nvmlEventSetWait_v2` waits at most `timeoutms` and answers `NVML_ERROR_TIMEOUT` when no
//!   event arrived; field ids `NVML_FI_DEV_POWER_INSTANT` = 186, `NVML_FI_DEV_MEMORY_TEMP` = 82;
//!   `nvmlMarginTemperature_v1` = 0x1000008; MIG instance ids are 0xFFFFFFFF outside MIG.
//! - A real H100 80GB HBM3 (SXM) `nvidia-smi -q -x` capture, driver 580.105.08
//!   (NVIDIA/k8s-test-infra `tests/e2e/go/assertions/nvidiasmi/testdata/hardware/qx-h100.xml`):
//!   idle average power 68.57 W, instant 68.92 W; limits 200-700 W, default 700 W; die 29 °C;
//!   81 559 MiB; SM 345 MHz idle, max 1980 MHz; memory 2619 MHz; PCIe gen 5 x16; bus id
//!   `00000000:53:00.0`; device id 0x233010DE; fan speed `N/A`; retired pages `N/A`; remapped
//!   rows 0; ECC enabled; clock-event reason `gpu_idle` active at idle.
//!
//! Each test runs in its own process (the fake is process-global, like a driver).

mod common;

use std::ffi::{CStr, OsString};
use std::os::raw::{c_char, c_int, c_uint, c_ulonglong};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure};
use common::{control, env_path, in_fake};
use hearth_fake_nvml::{ENV_LIBRARY, EXPORTED_SYMBOLS, locate};
use hearth_sim::Fault;
use nvml_wrapper_sys::bindings::field_id::{
    NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_POWER_AVERAGE, NVML_FI_DEV_POWER_INSTANT,
};
use nvml_wrapper_sys::bindings::{
    NvmlLib, nvmlDevice_t, nvmlEventData_t, nvmlEventSet_t, nvmlFieldValue_t,
    nvmlMarginTemperature_t, nvmlMemory_v2_t, nvmlPciInfo_t, nvmlProcessInfo_t, nvmlReturn_t,
};

const SUCCESS: nvmlReturn_t = 0;
const UNINITIALIZED: nvmlReturn_t = 1;
const INVALID_ARGUMENT: nvmlReturn_t = 2;
const NOT_SUPPORTED: nvmlReturn_t = 3;
const INSUFFICIENT_SIZE: nvmlReturn_t = 7;
const TIMEOUT: nvmlReturn_t = 10;
const GPU_IS_LOST: nvmlReturn_t = 15;
const ARGUMENT_VERSION_MISMATCH: nvmlReturn_t = 25;

const XID_EVENT: u64 = 8;
const SBE_EVENT: u64 = 1;
const DBE_EVENT: u64 = 2;

const H100_IDLE: &str = "[[gpu]]\nprofile = \"h100-sxm\"\ncount = 8\nworkload = \"idle\"\n";
const ONE_H100_TRAINING: &str = "[[gpu]]\nprofile = \"h100-sxm\"\nworkload = \"training\"\n";
const H100_AND_4090: &str = "[[gpu]]\nprofile = \"h100-sxm\"\nworkload = \"training\"\n\
                             [[gpu]]\nprofile = \"rtx4090-pcie\"\nworkload = \"idle\"\n";

/// Call an NVML function of the loaded library by name.
macro_rules! call {
    ($lib:expr, $name:ident ( $($arg:expr),* $(,)? )) => {{
        let f = *$lib
            .$name
            .as_ref()
            .map_err(|e| anyhow!("{}: {e}", stringify!($name)))?;
        // SAFETY: `f` is the fake library's export of that name (its signature is checked at
        // compile time against these bindings); the arguments are null, a handle the library
        // gave us, a deliberately bad handle (which the library only compares, never
        // dereferences), or pointers to live locals of the right type and length.
        unsafe { f($($arg),*) }
    }};
}

/// The fake library, loaded but not initialised.
fn load() -> anyhow::Result<NvmlLib> {
    let path = env_path(ENV_LIBRARY)?;
    // SAFETY: loading the fake library runs no initialisation code with preconditions (it has
    // no constructors; all state is created at nvmlInit).
    Ok(unsafe { NvmlLib::new(&path) }?)
}

/// The fake library, initialised.
fn init() -> anyhow::Result<NvmlLib> {
    let lib = load()?;
    ensure!(call!(lib, nvmlInit_v2()) == SUCCESS);
    Ok(lib)
}

fn handle(lib: &NvmlLib, index: u32) -> anyhow::Result<nvmlDevice_t> {
    let mut h: nvmlDevice_t = std::ptr::null_mut();
    let rc = call!(lib, nvmlDeviceGetHandleByIndex_v2(index, &mut h));
    ensure!(rc == SUCCESS, "handle {index}: {rc}");
    Ok(h)
}

fn uint(
    lib: &NvmlLib,
    f: fn(&NvmlLib, nvmlDevice_t, &mut c_uint) -> anyhow::Result<nvmlReturn_t>,
    h: nvmlDevice_t,
) -> anyhow::Result<(nvmlReturn_t, c_uint)> {
    let mut v: c_uint = 0;
    let rc = f(lib, h, &mut v)?;
    Ok((rc, v))
}

fn power_usage(lib: &NvmlLib, h: nvmlDevice_t, v: &mut c_uint) -> anyhow::Result<nvmlReturn_t> {
    Ok(call!(lib, nvmlDeviceGetPowerUsage(h, v)))
}

fn energy(lib: &NvmlLib, h: nvmlDevice_t) -> anyhow::Result<u64> {
    let mut e: c_ulonglong = 0;
    ensure!(call!(lib, nvmlDeviceGetTotalEnergyConsumption(h, &mut e)) == SUCCESS);
    Ok(e)
}

/// A string answer: return code and the text.
fn string(rc: nvmlReturn_t, buf: &[c_char]) -> (nvmlReturn_t, String) {
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    (rc, String::from_utf8_lossy(&bytes).into_owned())
}

fn field_values(
    lib: &NvmlLib,
    h: nvmlDevice_t,
    ids: &[c_uint],
) -> anyhow::Result<(nvmlReturn_t, Vec<nvmlFieldValue_t>)> {
    let mut v: Vec<nvmlFieldValue_t> = ids
        .iter()
        .map(|&id| {
            // SAFETY: nvmlFieldValue_t is plain old data (integers and a union of integers and
            // a double); all zeroes is a valid value, as NVML's own examples use memset 0.
            let mut f: nvmlFieldValue_t = unsafe { std::mem::zeroed() };
            f.fieldId = id;
            f
        })
        .collect();
    let n = c_int::try_from(v.len())?;
    let rc = call!(lib, nvmlDeviceGetFieldValues(h, n, v.as_mut_ptr()));
    Ok((rc, v))
}

fn field_u32(f: &nvmlFieldValue_t) -> c_uint {
    // SAFETY: read only for fields the library answered with NVML_VALUE_TYPE_UNSIGNED_INT (1),
    // whose value is in `uiVal`; the caller checks `valueType`.
    unsafe { f.value.uiVal }
}

#[test]
fn every_listed_symbol_is_exported() -> anyhow::Result<()> {
    let path = locate::library().map_err(anyhow::Error::msg)?;
    // SAFETY: as in `load`: the library has no constructors; nothing is called here.
    let lib = unsafe { NvmlLib::new(&path) }?;
    for name in EXPORTED_SYMBOLS {
        let symbol = format!("{name}\0");
        // SAFETY: only looks the symbol up; the pointer type is irrelevant and never called.
        let found = unsafe { lib.__library.get::<unsafe extern "C" fn()>(symbol.as_bytes()) };
        ensure!(found.is_ok(), "{name} is not exported");
    }
    ensure!(EXPORTED_SYMBOLS.contains(&"nvmlDeviceGetCurrentClocksThrottleReasons"));
    ensure!(EXPORTED_SYMBOLS.contains(&"nvmlDeviceGetCurrentClocksEventReasons"));
    Ok(())
}

#[test]
fn uninitialized_before_init_and_after_the_last_shutdown() -> anyhow::Result<()> {
    in_fake("uninitialized_before_init_and_after_the_last_shutdown", None, &[], || {
        let lib = load()?;
        let mut n: c_uint = 0;
        ensure!(call!(lib, nvmlDeviceGetCount_v2(&mut n)) == UNINITIALIZED);
        let mut h: nvmlDevice_t = std::ptr::null_mut();
        ensure!(call!(lib, nvmlDeviceGetHandleByIndex_v2(0, &mut h)) == UNINITIALIZED);
        ensure!(call!(lib, nvmlShutdown()) == UNINITIALIZED);
        ensure!(call!(lib, nvmlInit_v2()) == SUCCESS);
        ensure!(call!(lib, nvmlInitWithFlags(0)) == SUCCESS);
        ensure!(call!(lib, nvmlDeviceGetCount_v2(&mut n)) == SUCCESS && n == 8, "{n}");
        // Reference counted: one shutdown per init.
        ensure!(call!(lib, nvmlShutdown()) == SUCCESS);
        ensure!(call!(lib, nvmlDeviceGetCount_v2(&mut n)) == SUCCESS);
        ensure!(call!(lib, nvmlShutdown()) == SUCCESS);
        ensure!(call!(lib, nvmlDeviceGetCount_v2(&mut n)) == UNINITIALIZED);
        ensure!(call!(lib, nvmlShutdown()) == UNINITIALIZED);
        Ok(())
    })?;
    Ok(())
}

#[test]
fn an_idle_h100_matches_a_real_capture() -> anyhow::Result<()> {
    in_fake("an_idle_h100_matches_a_real_capture", Some(H100_IDLE), &[], || {
        let lib = init()?;
        control()?.advance(2_000)?;
        for i in 0..8 {
            let h = handle(&lib, i)?;
            // Power: capture 68.57 W average, 68.92 W instant (mW in NVML).
            let (rc, avg) = uint(&lib, power_usage, h)?;
            ensure!(rc == SUCCESS && (65_000..=75_000).contains(&avg), "{rc} {avg} mW");
            let (rc, f) = field_values(&lib, h, &[NVML_FI_DEV_POWER_INSTANT])?;
            ensure!(rc == SUCCESS && f[0].nvmlReturn == SUCCESS && f[0].valueType == 1);
            ensure!((65_000..=75_000).contains(&field_u32(&f[0])), "{}", field_u32(&f[0]));
            // Limits 200-700 W, default 700 W.
            let (mut lo, mut hi, mut def) = (0, 0, 0);
            ensure!(
                call!(lib, nvmlDeviceGetPowerManagementLimitConstraints(h, &mut lo, &mut hi))
                    == SUCCESS
            );
            ensure!(call!(lib, nvmlDeviceGetPowerManagementDefaultLimit(h, &mut def)) == SUCCESS);
            ensure!((lo, hi, def) == (200_000, 700_000, 700_000), "{lo} {hi} {def}");
            // Die 29 °C idle (the capture's room); here 25 °C inlet.
            let mut t: c_uint = 0;
            ensure!(call!(lib, nvmlDeviceGetTemperature(h, 0, &mut t)) == SUCCESS);
            ensure!((27..=32).contains(&t), "{t} °C");
            // 81 559 MiB.
            // SAFETY: nvmlMemory_v2_t is plain integers; zero is valid.
            let mut m: nvmlMemory_v2_t = unsafe { std::mem::zeroed() };
            m.version = (std::mem::size_of::<nvmlMemory_v2_t>() as c_uint) | (2 << 24);
            ensure!(call!(lib, nvmlDeviceGetMemoryInfo_v2(h, &mut m)) == SUCCESS);
            ensure!(m.total == 81_559 * 1024 * 1024 && m.used + m.free == m.total, "{m:?}");
            // Clocks: SM 345 MHz idle of 1980, memory 2619.
            let (mut sm, mut sm_max, mut mem, mut mem_max) = (0, 0, 0, 0);
            ensure!(call!(lib, nvmlDeviceGetClockInfo(h, 1, &mut sm)) == SUCCESS);
            ensure!(call!(lib, nvmlDeviceGetMaxClockInfo(h, 1, &mut sm_max)) == SUCCESS);
            ensure!(call!(lib, nvmlDeviceGetClockInfo(h, 2, &mut mem)) == SUCCESS);
            ensure!(call!(lib, nvmlDeviceGetMaxClockInfo(h, 2, &mut mem_max)) == SUCCESS);
            ensure!((sm, sm_max, mem, mem_max) == (345, 1980, 2619, 2619));
            // PCIe gen 5 x16.
            let (mut gen_, mut width) = (0, 0);
            ensure!(call!(lib, nvmlDeviceGetCurrPcieLinkGeneration(h, &mut gen_)) == SUCCESS);
            ensure!(call!(lib, nvmlDeviceGetCurrPcieLinkWidth(h, &mut width)) == SUCCESS);
            ensure!((gen_, width) == (5, 16));
            // Bus id `%08X:%02X:%02X.0`, device id 0x233010DE.
            // SAFETY: nvmlPciInfo_t is plain integers and char arrays; zero is valid.
            let mut pci: nvmlPciInfo_t = unsafe { std::mem::zeroed() };
            ensure!(call!(lib, nvmlDeviceGetPciInfo_v3(h, &mut pci)) == SUCCESS);
            let (_, bus_id) = string(SUCCESS, &pci.busId);
            ensure!(bus_id.len() == 16 && bus_id.starts_with("00000000:"), "{bus_id}");
            ensure!(bus_id == format!("{:08X}:{:02X}:{:02X}.0", pci.domain, pci.bus, pci.device));
            ensure!(pci.pciDeviceId == 0x2330_10DE);
            // Fan speed N/A on SXM; no fans of its own.
            let mut fans: c_uint = 9;
            let mut speed: c_uint = 0;
            ensure!(call!(lib, nvmlDeviceGetNumFans(h, &mut fans)) == SUCCESS && fans == 0);
            ensure!(call!(lib, nvmlDeviceGetFanSpeed_v2(h, 0, &mut speed)) == NOT_SUPPORTED);
            ensure!(call!(lib, nvmlDeviceGetFanSpeed(h, &mut speed)) == NOT_SUPPORTED);
            // Retired pages N/A (Hopper remaps rows); remapped rows 0; ECC enabled.
            let mut count: c_uint = 0;
            let mut addr: c_ulonglong = 0;
            ensure!(
                call!(lib, nvmlDeviceGetRetiredPages(h, 0, &mut count, &mut addr)) == NOT_SUPPORTED
            );
            let (mut c, mut u, mut p, mut fl) = (9, 9, 9, 9);
            ensure!(
                call!(lib, nvmlDeviceGetRemappedRows(h, &mut c, &mut u, &mut p, &mut fl))
                    == SUCCESS
            );
            ensure!((c, u, p, fl) == (0, 0, 0, 0));
            let (mut cur, mut pend) = (0, 0);
            ensure!(call!(lib, nvmlDeviceGetEccMode(h, &mut cur, &mut pend)) == SUCCESS);
            ensure!((cur, pend) == (1, 1));
            // gpu_idle active (bit 0x1), under both names of the call.
            let (mut reasons, mut throttle) = (0, 0);
            ensure!(call!(lib, nvmlDeviceGetCurrentClocksEventReasons(h, &mut reasons)) == 0);
            ensure!(call!(lib, nvmlDeviceGetCurrentClocksThrottleReasons(h, &mut throttle)) == 0);
            ensure!(reasons == 0x1 && throttle == reasons, "{reasons:#x} {throttle:#x}");
            // Name and 13-digit serial.
            let mut buf = [0 as c_char; 96];
            let (rc, name) = string(call!(lib, nvmlDeviceGetName(h, buf.as_mut_ptr(), 96)), &buf);
            ensure!(rc == SUCCESS && name == "NVIDIA H100 80GB HBM3", "{name}");
            let (rc, serial) =
                string(call!(lib, nvmlDeviceGetSerial(h, buf.as_mut_ptr(), 30)), &buf);
            ensure!(rc == SUCCESS && serial.len() == 13, "{serial}");
        }
        Ok(())
    })?;
    Ok(())
}

#[test]
fn energy_is_the_integral_of_power_in_millijoules() -> anyhow::Result<()> {
    in_fake(
        "energy_is_the_integral_of_power_in_millijoules",
        Some(ONE_H100_TRAINING),
        &[],
        || {
            let lib = init()?;
            let ctl = control()?;
            let h = handle(&lib, 0)?;
            ensure!(energy(&lib, h)? == 0, "energy counts from driver load");
            ctl.advance(5_000)?;
            let e0 = energy(&lib, h)?;
            let mut integral = 0u64;
            let mut last = e0;
            for _ in 0..10 {
                ctl.advance(1_000)?;
                let (rc, p) = uint(&lib, power_usage, h)?;
                ensure!(rc == SUCCESS);
                integral += u64::from(p); // mW over 1 s = mJ
                let e = energy(&lib, h)?;
                ensure!(e > last, "energy is monotonic: {last} then {e}");
                last = e;
            }
            let delta = last - e0;
            ensure!(
                delta.abs_diff(integral) * 100 < integral * 3,
                "energy rose {delta} mJ, power integrates to {integral} mJ"
            );
            // ~700 W for 10 s = ~7 000 000 mJ: the unit is mJ (not J, not µJ).
            ensure!((6_500_000..=7_500_000).contains(&delta), "{delta} mJ");
            Ok(())
        },
    )?;
    Ok(())
}

#[test]
fn the_geforce_profile_has_no_ecc_nvlink_or_serial() -> anyhow::Result<()> {
    in_fake("the_geforce_profile_has_no_ecc_nvlink_or_serial", Some(H100_AND_4090), &[], || {
        let lib = init()?;
        let (h100, g) = (handle(&lib, 0)?, handle(&lib, 1)?);
        let (mut cur, mut pend) = (0, 0);
        ensure!(call!(lib, nvmlDeviceGetEccMode(g, &mut cur, &mut pend)) == NOT_SUPPORTED);
        let mut count: c_ulonglong = 0;
        ensure!(call!(lib, nvmlDeviceGetTotalEccErrors(g, 0, 0, &mut count)) == NOT_SUPPORTED);
        let (mut c, mut u, mut p, mut f) = (0, 0, 0, 0);
        ensure!(
            call!(lib, nvmlDeviceGetRemappedRows(g, &mut c, &mut u, &mut p, &mut f))
                == NOT_SUPPORTED
        );
        let mut buf = [0 as c_char; 30];
        ensure!(call!(lib, nvmlDeviceGetSerial(g, buf.as_mut_ptr(), 30)) == NOT_SUPPORTED);
        let mut state: c_uint = 0;
        ensure!(call!(lib, nvmlDeviceGetNvLinkState(g, 0, &mut state)) == NOT_SUPPORTED);
        ensure!(call!(lib, nvmlDeviceGetNvLinkState(h100, 17, &mut state)) == SUCCESS);
        ensure!(call!(lib, nvmlDeviceGetNvLinkState(h100, 18, &mut state)) == INVALID_ARGUMENT);
        // Fans: two, each 0-100 %; no third.
        let mut fans: c_uint = 0;
        let mut speed: c_uint = 0;
        ensure!(call!(lib, nvmlDeviceGetNumFans(g, &mut fans)) == SUCCESS && fans == 2);
        ensure!(call!(lib, nvmlDeviceGetFanSpeed_v2(g, 1, &mut speed)) == SUCCESS);
        ensure!((30..=100).contains(&speed), "{speed} %");
        ensure!(call!(lib, nvmlDeviceGetFanSpeed_v2(g, 2, &mut speed)) == INVALID_ARGUMENT);
        // No HBM temperature on this board: a per-field NOT_SUPPORTED, the call succeeds.
        let (rc, v) = field_values(&lib, g, &[NVML_FI_DEV_MEMORY_TEMP])?;
        ensure!(rc == SUCCESS && v[0].nvmlReturn == NOT_SUPPORTED);
        let mut t: c_uint = 0;
        ensure!(call!(lib, nvmlDeviceGetTemperatureThreshold(g, 2, &mut t)) == NOT_SUPPORTED);
        // XID events only.
        let mut types: c_ulonglong = 0;
        ensure!(call!(lib, nvmlDeviceGetSupportedEventTypes(g, &mut types)) == SUCCESS);
        ensure!(types == XID_EVENT, "{types:#x}");
        ensure!(call!(lib, nvmlDeviceGetSupportedEventTypes(h100, &mut types)) == SUCCESS);
        ensure!(types == XID_EVENT | SBE_EVENT | DBE_EVENT, "{types:#x}");
        let mut set: nvmlEventSet_t = std::ptr::null_mut();
        ensure!(call!(lib, nvmlEventSetCreate(&mut set)) == SUCCESS);
        ensure!(call!(lib, nvmlDeviceRegisterEvents(g, SBE_EVENT, set)) == NOT_SUPPORTED);
        ensure!(call!(lib, nvmlDeviceRegisterEvents(g, XID_EVENT, set)) == SUCCESS);
        ensure!(call!(lib, nvmlEventSetFree(set)) == SUCCESS);
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_gpu_off_the_bus_is_lost() -> anyhow::Result<()> {
    in_fake("a_gpu_off_the_bus_is_lost", None, &[], || {
        let lib = init()?;
        let h2 = handle(&lib, 2)?;
        let mut set: nvmlEventSet_t = std::ptr::null_mut();
        ensure!(call!(lib, nvmlEventSetCreate(&mut set)) == SUCCESS);
        ensure!(call!(lib, nvmlDeviceRegisterEvents(h2, XID_EVENT, set)) == SUCCESS);
        control()?.inject(2, Fault::FallenOffBus)?;
        let (rc, _) = uint(&lib, power_usage, h2)?;
        ensure!(rc == GPU_IS_LOST, "{rc}");
        let mut buf = [0 as c_char; 96];
        ensure!(call!(lib, nvmlDeviceGetUUID(h2, buf.as_mut_ptr(), 96)) == GPU_IS_LOST);
        let mut h: nvmlDevice_t = std::ptr::null_mut();
        ensure!(call!(lib, nvmlDeviceGetHandleByIndex_v2(2, &mut h)) == GPU_IS_LOST);
        let mut n: c_uint = 0;
        ensure!(call!(lib, nvmlDeviceGetCount_v2(&mut n)) == SUCCESS && n == 8);
        let (rc, _) = uint(&lib, power_usage, handle(&lib, 1)?)?;
        ensure!(rc == SUCCESS, "the other GPUs keep working");
        // SAFETY: nvmlEventData_t is a pointer and integers; zero is valid.
        let mut e: nvmlEventData_t = unsafe { std::mem::zeroed() };
        ensure!(call!(lib, nvmlEventSetWait_v2(set, &mut e, 1_000)) == SUCCESS);
        ensure!(e.device == h2 && e.eventType == XID_EVENT && e.eventData == 79, "{e:?}");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn short_buffers_are_insufficient_size() -> anyhow::Result<()> {
    in_fake("short_buffers_are_insufficient_size", None, &[], || {
        let lib = init()?;
        let h = handle(&lib, 0)?;
        let mut buf = [0 as c_char; 96];
        let (rc, uuid) = string(call!(lib, nvmlDeviceGetUUID(h, buf.as_mut_ptr(), 96)), &buf);
        ensure!(rc == SUCCESS && uuid.len() == 40, "{uuid}");
        let exact = c_uint::try_from(uuid.len() + 1)?;
        ensure!(call!(lib, nvmlDeviceGetUUID(h, buf.as_mut_ptr(), exact)) == SUCCESS);
        ensure!(call!(lib, nvmlDeviceGetUUID(h, buf.as_mut_ptr(), exact - 1)) == INSUFFICIENT_SIZE);
        ensure!(call!(lib, nvmlDeviceGetName(h, buf.as_mut_ptr(), 5)) == INSUFFICIENT_SIZE);
        ensure!(call!(lib, nvmlSystemGetDriverVersion(buf.as_mut_ptr(), 4)) == INSUFFICIENT_SIZE);
        ensure!(call!(lib, nvmlDeviceGetSerial(h, buf.as_mut_ptr(), 0)) == INSUFFICIENT_SIZE);
        // The process list: a size query with room for none, then the list.
        let mut count: c_uint = 0;
        let rc = call!(
            lib,
            nvmlDeviceGetComputeRunningProcesses_v3(h, &mut count, std::ptr::null_mut())
        );
        ensure!(rc == INSUFFICIENT_SIZE && count == 1, "{rc} {count}");
        // SAFETY: nvmlProcessInfo_t is plain integers; zero is valid.
        let mut infos: [nvmlProcessInfo_t; 2] = unsafe { std::mem::zeroed() };
        count = 2;
        let rc =
            call!(lib, nvmlDeviceGetComputeRunningProcesses_v3(h, &mut count, infos.as_mut_ptr()));
        ensure!(rc == SUCCESS && count == 1, "{rc} {count}");
        ensure!(infos[0].pid > 0 && infos[0].usedGpuMemory > 0, "{:?}", infos[0]);
        ensure!(infos[0].gpuInstanceId == 0xFFFF_FFFF && infos[0].computeInstanceId == 0xFFFF_FFFF);
        Ok(())
    })?;
    Ok(())
}

#[test]
fn null_pointers_bad_handles_and_versions_are_rejected() -> anyhow::Result<()> {
    in_fake("null_pointers_bad_handles_and_versions_are_rejected", None, &[], || {
        let lib = init()?;
        let h = handle(&lib, 0)?;
        use std::ptr::null_mut as null;
        ensure!(call!(lib, nvmlDeviceGetCount_v2(null())) == INVALID_ARGUMENT);
        ensure!(call!(lib, nvmlDeviceGetPowerUsage(h, null())) == INVALID_ARGUMENT);
        ensure!(call!(lib, nvmlDeviceGetUUID(h, null(), 96)) == INVALID_ARGUMENT);
        ensure!(call!(lib, nvmlDeviceGetHandleByIndex_v2(0, null())) == INVALID_ARGUMENT);
        let mut v: c_uint = 0;
        for bad in [std::ptr::null_mut(), std::ptr::without_provenance_mut(0x1234)] {
            ensure!(call!(lib, nvmlDeviceGetPowerUsage(bad, &mut v)) == INVALID_ARGUMENT);
        }
        let mut other: nvmlDevice_t = null();
        ensure!(call!(lib, nvmlDeviceGetHandleByIndex_v2(8, &mut other)) == INVALID_ARGUMENT);
        ensure!(call!(lib, nvmlDeviceGetTemperature(h, 1, &mut v)) == INVALID_ARGUMENT);
        ensure!(call!(lib, nvmlDeviceGetClockInfo(h, 9, &mut v)) == INVALID_ARGUMENT);
        let (rc, _) = field_values(&lib, h, &[])?;
        ensure!(rc == INVALID_ARGUMENT, "zero field values: {rc}");
        // Versioned structs must carry their version.
        // SAFETY: plain integers; zero is valid.
        let mut m: nvmlMemory_v2_t = unsafe { std::mem::zeroed() };
        ensure!(call!(lib, nvmlDeviceGetMemoryInfo_v2(h, &mut m)) == ARGUMENT_VERSION_MISMATCH);
        let mut margin = nvmlMarginTemperature_t { version: 0, marginTemperature: 0 };
        let rc = call!(lib, nvmlDeviceGetMarginTemperature(h, &mut margin));
        ensure!(rc == ARGUMENT_VERSION_MISMATCH);
        margin.version = 0x0100_0008;
        ensure!(call!(lib, nvmlDeviceGetMarginTemperature(h, &mut margin)) == SUCCESS);
        // Event sets: unknown, freed twice.
        let mut set: nvmlEventSet_t = null();
        // SAFETY: plain data; zero is valid.
        let mut e: nvmlEventData_t = unsafe { std::mem::zeroed() };
        let bogus: nvmlEventSet_t = std::ptr::without_provenance_mut(0x99);
        ensure!(call!(lib, nvmlEventSetWait_v2(bogus, &mut e, 0)) == INVALID_ARGUMENT);
        ensure!(call!(lib, nvmlEventSetCreate(&mut set)) == SUCCESS);
        ensure!(call!(lib, nvmlEventSetWait_v2(set, std::ptr::null_mut(), 0)) == INVALID_ARGUMENT);
        ensure!(call!(lib, nvmlEventSetFree(set)) == SUCCESS);
        ensure!(call!(lib, nvmlEventSetFree(set)) == INVALID_ARGUMENT);
        Ok(())
    })?;
    Ok(())
}

#[test]
fn event_wait_honours_its_timeout_and_wakes_for_an_event() -> anyhow::Result<()> {
    in_fake("event_wait_honours_its_timeout_and_wakes_for_an_event", None, &[], || {
        let lib = init()?;
        let h = handle(&lib, 0)?;
        let mut set: nvmlEventSet_t = std::ptr::null_mut();
        ensure!(call!(lib, nvmlEventSetCreate(&mut set)) == SUCCESS);
        ensure!(call!(lib, nvmlDeviceRegisterEvents(h, XID_EVENT | DBE_EVENT, set)) == SUCCESS);
        // SAFETY: plain data; zero is valid.
        let mut e: nvmlEventData_t = unsafe { std::mem::zeroed() };
        let t0 = Instant::now();
        ensure!(call!(lib, nvmlEventSetWait_v2(set, &mut e, 250)) == TIMEOUT);
        let waited = t0.elapsed();
        ensure!((250..1_000).contains(&waited.as_millis()), "{waited:?}");
        ensure!(call!(lib, nvmlEventSetWait_v2(set, &mut e, 0)) == TIMEOUT);

        let injector = std::thread::spawn(|| -> anyhow::Result<()> {
            std::thread::sleep(Duration::from_millis(100));
            control()?.inject(0, Fault::Xid { xid: 31 })?;
            control()?.inject(1, Fault::Xid { xid: 43 })?; // GPU 1 is not registered
            Ok(())
        });
        let t0 = Instant::now();
        ensure!(call!(lib, nvmlEventSetWait_v2(set, &mut e, 5_000)) == SUCCESS);
        ensure!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        injector.join().map_err(|_| anyhow!("injector panicked"))??;
        ensure!(e.device == h && e.eventType == XID_EVENT && e.eventData == 31, "{e:?}");
        ensure!(e.gpuInstanceId == 0xFFFF_FFFF && e.computeInstanceId == 0xFFFF_FFFF);
        ensure!(call!(lib, nvmlEventSetWait_v2(set, &mut e, 100)) == TIMEOUT, "not GPU 1's");
        // A double-bit error: the DBE event, then XID 48.
        control()?.inject(0, Fault::DoubleBitEcc)?;
        ensure!(call!(lib, nvmlEventSetWait_v2(set, &mut e, 1_000)) == SUCCESS);
        ensure!(e.eventType == DBE_EVENT && e.eventData == 0, "{e:?}");
        ensure!(call!(lib, nvmlEventSetWait_v2(set, &mut e, 1_000)) == SUCCESS);
        ensure!(e.eventType == XID_EVENT && e.eventData == 48, "{e:?}");
        ensure!(call!(lib, nvmlEventSetFree(set)) == SUCCESS);
        Ok(())
    })?;
    Ok(())
}

#[test]
fn field_values_follow_nvml_h() -> anyhow::Result<()> {
    assert_eq!((NVML_FI_DEV_POWER_INSTANT, NVML_FI_DEV_MEMORY_TEMP), (186, 82));
    in_fake("field_values_follow_nvml_h", None, &[], || {
        let lib = init()?;
        control()?.advance(3_000)?;
        let h = handle(&lib, 0)?;
        let ids =
            [NVML_FI_DEV_POWER_INSTANT, NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_POWER_AVERAGE, 9_999];
        let (rc, v) = field_values(&lib, h, &ids)?;
        ensure!(rc == SUCCESS);
        let codes: Vec<nvmlReturn_t> = v.iter().map(|f| f.nvmlReturn).collect();
        ensure!(codes == [SUCCESS, SUCCESS, SUCCESS, NOT_SUPPORTED], "{codes:?}");
        ensure!(v[..3].iter().all(|f| f.valueType == 1 && f.timestamp == 3_000_000));
        let (_, avg) = uint(&lib, power_usage, h)?;
        ensure!(field_u32(&v[2]) == avg, "field 185 is nvmlDeviceGetPowerUsage's average");
        let mut t: c_uint = 0;
        ensure!(call!(lib, nvmlDeviceGetTemperature(h, 0, &mut t)) == SUCCESS);
        ensure!(field_u32(&v[1]) + 3 >= t, "HBM {} °C vs die {t} °C", field_u32(&v[1]));
        Ok(())
    })?;
    Ok(())
}

#[test]
fn driver_versions_and_error_strings() -> anyhow::Result<()> {
    in_fake("driver_versions_and_error_strings", None, &[], || {
        let lib = load()?;
        let text = |code| -> anyhow::Result<String> {
            let p = call!(lib, nvmlErrorString(code));
            ensure!(!p.is_null());
            // SAFETY: nvmlErrorString returns a static NUL-terminated string.
            Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        };
        ensure!(text(GPU_IS_LOST)? == "GPU is lost", "before init, too");
        ensure!(text(TIMEOUT)? == "Timeout");
        ensure!(text(12_345)? == "Unknown Error");
        ensure!(call!(lib, nvmlInit_v2()) == SUCCESS);
        let mut buf = [0 as c_char; 80];
        let (rc, v) = string(call!(lib, nvmlSystemGetDriverVersion(buf.as_mut_ptr(), 80)), &buf);
        ensure!(rc == SUCCESS && v == "580.95.05", "{v}");
        let (rc, v) = string(call!(lib, nvmlSystemGetNVMLVersion(buf.as_mut_ptr(), 80)), &buf);
        ensure!(rc == SUCCESS && v == "13.580.95.05", "{v}");
        let mut cuda: c_int = 0;
        ensure!(call!(lib, nvmlSystemGetCudaDriverVersion_v2(&mut cuda)) == SUCCESS);
        ensure!(cuda == 13_000, "{cuda}");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn power_limits_are_checked_and_delayed() -> anyhow::Result<()> {
    in_fake("power_limits_are_checked_and_delayed", Some(ONE_H100_TRAINING), &[], || {
        let lib = init()?;
        let ctl = control()?;
        let h = handle(&lib, 0)?;
        ensure!(call!(lib, nvmlDeviceSetPowerManagementLimit(h, 199_999)) == INVALID_ARGUMENT);
        ensure!(call!(lib, nvmlDeviceSetPowerManagementLimit(h, 700_001)) == INVALID_ARGUMENT);
        ensure!(call!(lib, nvmlDeviceSetPowerManagementLimit(h, 350_000)) == SUCCESS);
        let mut limit: c_uint = 0;
        ensure!(call!(lib, nvmlDeviceGetPowerManagementLimit(h, &mut limit)) == SUCCESS);
        ensure!(limit == 700_000, "not yet: {limit}");
        ctl.advance(600)?;
        ensure!(call!(lib, nvmlDeviceGetPowerManagementLimit(h, &mut limit)) == SUCCESS);
        ensure!(limit == 350_000, "{limit}");
        ensure!(call!(lib, nvmlDeviceGetEnforcedPowerLimit(h, &mut limit)) == SUCCESS);
        ensure!(limit == 350_000, "{limit}");
        ensure!(call!(lib, nvmlDeviceSetGpuLockedClocks(h, 1_200, 1_000)) == INVALID_ARGUMENT);
        ensure!(call!(lib, nvmlDeviceSetGpuLockedClocks(h, 800, 1_000)) == SUCCESS);
        ensure!(call!(lib, nvmlDeviceResetGpuLockedClocks(h)) == SUCCESS);
        Ok(())
    })?;
    Ok(())
}

/// The library reads its configuration at the first `nvmlInit` only, so the variables of a
/// finished test cannot leak into another: a guard that the harness gives each test a process.
#[test]
fn each_test_gets_its_own_process() -> anyhow::Result<()> {
    let marker = [("HEARTH_TEST_MARKER", OsString::from("1"))];
    in_fake("each_test_gets_its_own_process", None, &marker, || {
        ensure!(std::env::var("HEARTH_TEST_MARKER").as_deref() == Ok("1"));
        ensure!(hearth_hw_tests::isolate::is_child("each_test_gets_its_own_process"));
        Ok(())
    })?;
    Ok(())
}
