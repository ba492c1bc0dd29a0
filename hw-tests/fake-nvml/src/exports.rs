//! The exported NVML C functions.
//!
//! Every export checks, in this order: NVML initialised (`UNINITIALIZED`), the device handle is
//! one of ours (`INVALID_ARGUMENT`), each pointer argument is non-null (`INVALID_ARGUMENT`) and
//! each buffer is large enough (`INSUFFICIENT_SIZE`), then asks the simulator (`GPU_IS_LOST` for a
//! GPU off the bus, `NOT_SUPPORTED` for a feature the board lacks). Pointers are trusted only as
//! far as NVML's contract goes: null or valid for the documented number of elements.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_uint, c_ulonglong};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use hearth_proto::gpu::{GpuInventory, GpuSample};
use nvml_wrapper_sys::bindings::{self as b, field_id as fi};
use nvml_wrapper_sys::bindings::{
    nvmlClockType_t, nvmlDevice_t, nvmlEccCounterType_t, nvmlEnableState_t, nvmlEventData_t,
    nvmlEventSet_t, nvmlFieldValue_t, nvmlMarginTemperature_t, nvmlMemory_t, nvmlMemory_v2_t,
    nvmlMemoryErrorType_t, nvmlPageRetirementCause_t, nvmlPciInfo_t, nvmlProcessInfo_t,
    nvmlTemperatureSensors_t, nvmlTemperatureThresholds_t, nvmlUtilization_t,
};

use crate::driver::{self, Driver, EventSet, code, device_handle, rc, rc::Code};

/// Every NVML symbol the library exports.
pub const EXPORTED_SYMBOLS: &[&str] = &[
    "nvmlInit_v2",
    "nvmlInit",
    "nvmlInitWithFlags",
    "nvmlShutdown",
    "nvmlErrorString",
    "nvmlSystemGetDriverVersion",
    "nvmlSystemGetNVMLVersion",
    "nvmlSystemGetCudaDriverVersion",
    "nvmlSystemGetCudaDriverVersion_v2",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetCount_v2",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetIndex",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetName",
    "nvmlDeviceGetSerial",
    "nvmlDeviceGetPciInfo_v3",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetPowerManagementLimitConstraints",
    "nvmlDeviceGetPowerManagementDefaultLimit",
    "nvmlDeviceGetPowerManagementLimit",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetFieldValues",
    "nvmlDeviceGetMaxPcieLinkGeneration",
    "nvmlDeviceGetMaxPcieLinkWidth",
    "nvmlDeviceGetCurrPcieLinkGeneration",
    "nvmlDeviceGetCurrPcieLinkWidth",
    "nvmlDeviceGetPcieReplayCounter",
    "nvmlDeviceGetNvLinkState",
    "nvmlDeviceGetNvLinkErrorCounter",
    "nvmlDeviceGetPersistenceMode",
    "nvmlDeviceGetNumFans",
    "nvmlDeviceGetFanSpeed",
    "nvmlDeviceGetFanSpeed_v2",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetTemperatureThreshold",
    "nvmlDeviceGetMarginTemperature",
    "nvmlDeviceGetMaxClockInfo",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceGetEccMode",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetRetiredPages",
    "nvmlDeviceGetRetiredPages_v2",
    "nvmlDeviceGetRetiredPagesPendingStatus",
    "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceSetPowerManagementLimit",
    "nvmlDeviceSetGpuLockedClocks",
    "nvmlDeviceResetGpuLockedClocks",
    "nvmlDeviceSetFanSpeed_v2",
    "nvmlDeviceSetDefaultFanSpeed_v2",
    "nvmlDeviceGetSupportedEventTypes",
    "nvmlDeviceRegisterEvents",
    "nvmlEventSetCreate",
    "nvmlEventSetWait_v2",
    "nvmlEventSetFree",
];

/// `nvmlMemory_v2`: `NVML_STRUCT_VERSION(Memory, 2)` = size | 2 << 24.
const MEMORY_V2: c_uint = (size_of::<nvmlMemory_v2_t>() as c_uint) | (2 << 24);
/// `nvmlMarginTemperature_v1`: size | 1 << 24 (= 0x1000008, as in NVML's Python bindings).
const MARGIN_TEMPERATURE_V1: c_uint = (size_of::<nvmlMarginTemperature_t>() as c_uint) | (1 << 24);
/// GPU and compute instance id outside MIG (nvml.h: "set to 0xFFFFFFFF otherwise").
const NO_INSTANCE: c_uint = 0xFFFF_FFFF;
/// How often a waiting `nvmlEventSetWait_v2` looks at the event log.
const EVENT_POLL: Duration = Duration::from_millis(5);

/// Run an export's body; a panic becomes `NVML_ERROR_UNKNOWN` instead of unwinding into C.
fn run(body: impl FnOnce() -> Result<(), Code>) -> Code {
    match std::panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => rc::SUCCESS,
        Ok(Err(c)) => c,
        Err(_) => rc::UNKNOWN,
    }
}

/// NVML is initialised and `device` is one of our handles.
fn gpu(device: nvmlDevice_t) -> Result<(&'static Driver, u32), Code> {
    let d = driver::driver()?;
    Ok((d, d.index_of(device)?))
}

/// A GPU that answers: its inventory (`GPU_IS_LOST` once it fell off the bus).
fn alive(d: &Driver, gpu: u32) -> Result<GpuInventory, Code> {
    d.inventory(gpu)
}

/// The out-parameter behind `p`, or `INVALID_ARGUMENT` for null.
///
/// # Safety
/// `p` is null or valid for writes of one `T` for `'a` (NVML's contract for out-parameters).
unsafe fn out<'a, T>(p: *mut T) -> Result<&'a mut T, Code> {
    // SAFETY: the caller guarantees `p` is null (handled by `as_mut`) or valid for writes.
    unsafe { p.as_mut() }.ok_or(rc::INVALID_ARGUMENT)
}

/// Copy `s` and a NUL into the caller's buffer of `length` bytes.
///
/// # Safety
/// `buf` is null or valid for writes of `length` bytes.
unsafe fn write_str(buf: *mut c_char, length: c_uint, s: &str) -> Result<(), Code> {
    if buf.is_null() {
        return Err(rc::INVALID_ARGUMENT);
    }
    if (length as usize) < s.len() + 1 {
        return Err(rc::INSUFFICIENT_SIZE);
    }
    // SAFETY: `buf` is valid for `length >= s.len() + 1` bytes (checked above, caller's
    // contract), and a caller's buffer cannot overlap our string.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        *buf.add(s.len()) = 0;
    }
    Ok(())
}

fn sat_u32(v: u64) -> c_uint {
    c_uint::try_from(v).unwrap_or(c_uint::MAX)
}

/// An export that writes one value for a device: `name(device, *mut T)`.
macro_rules! device_getter {
    ($(#[$doc:meta])* $name:ident -> $ty:ty = |$d:ident, $i:ident| $value:expr) => {
        $(#[$doc])*
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(device: nvmlDevice_t, value: *mut $ty) -> Code {
            run(|| {
                let ($d, $i) = gpu(device)?;
                // SAFETY: NVML's contract: `value` is null or valid for writes of one value.
                let slot = unsafe { out(value) }?;
                *slot = $value;
                Ok(())
            })
        }
    };
}

// ------------------------------------------------------------------------------------------
// Init and system queries.

/// `nvmlInit_v2`: load the simulated driver (first call) and count a reference.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit_v2() -> Code {
    run(|| match driver::init() {
        rc::SUCCESS => Ok(()),
        c => Err(c),
    })
}

/// `nvmlInit` (v1): as `nvmlInit_v2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit() -> Code {
    run(|| match driver::init() {
        rc::SUCCESS => Ok(()),
        c => Err(c),
    })
}

/// `nvmlInitWithFlags`: as `nvmlInit_v2`; the flags (no GPUs, no attach) change nothing here.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Code {
    run(|| match driver::init() {
        rc::SUCCESS => Ok(()),
        c => Err(c),
    })
}

/// `nvmlShutdown`: drop a reference (`UNINITIALIZED` when none is left).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlShutdown() -> Code {
    run(|| match driver::shutdown() {
        rc::SUCCESS => Ok(()),
        c => Err(c),
    })
}

/// NVML's text for a return code.
pub(crate) fn error_string(result: Code) -> &'static CStr {
    match result {
        0 => c"Success",
        1 => c"Uninitialized",
        2 => c"Invalid Argument",
        3 => c"Not Supported",
        4 => c"Insufficient Permissions",
        5 => c"Already Initialized",
        6 => c"Not Found",
        7 => c"Insufficient Size",
        8 => c"Insufficient External Power",
        9 => c"Driver Not Loaded",
        10 => c"Timeout",
        11 => c"Interrupt request issue",
        12 => c"NVML Shared Library Not Found",
        13 => c"Function Not Found",
        14 => c"Corrupted infoROM",
        15 => c"GPU is lost",
        16 => c"GPU requires restart",
        17 => c"The operating system has blocked the request.",
        18 => c"RM has detected an NVML/RM version mismatch.",
        19 => c"In use by another client",
        20 => c"Insufficient Memory",
        21 => c"No data",
        25 => c"Argument version mismatch",
        _ => c"Unknown Error",
    }
}

/// `nvmlErrorString`: a static string for any code (valid before init, never null).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlErrorString(result: Code) -> *const c_char {
    error_string(result).as_ptr()
}

/// `nvmlSystemGetDriverVersion`: the simulated driver's version, e.g. `580.95.05`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> Code {
    run(|| {
        let d = driver::driver()?;
        let v = d.node().driver().driver_version;
        // SAFETY: NVML's contract: `version` is null or valid for `length` bytes.
        unsafe { write_str(version, length, &v) }
    })
}

/// `nvmlSystemGetNVMLVersion`: e.g. `13.580.95.05`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(version: *mut c_char, length: c_uint) -> Code {
    run(|| {
        let d = driver::driver()?;
        let v = d.node().driver().nvml_version;
        // SAFETY: NVML's contract: `version` is null or valid for `length` bytes.
        unsafe { write_str(version, length, &v) }
    })
}

/// CUDA version `major.minor` as NVML's integer `major * 1000 + minor * 10`.
fn cuda_version_int(s: &str) -> Option<c_int> {
    let (major, minor) = s.split_once('.')?;
    Some(major.parse::<c_int>().ok()? * 1000 + minor.parse::<c_int>().ok()? * 10)
}

fn cuda_driver_version(out_: *mut c_int) -> Code {
    run(|| {
        let d = driver::driver()?;
        // SAFETY: NVML's contract: the pointer is null or valid for writes of one int.
        let slot = unsafe { out(out_) }?;
        *slot = cuda_version_int(&d.node().driver().cuda_version).ok_or(rc::UNKNOWN)?;
        Ok(())
    })
}

/// `nvmlSystemGetCudaDriverVersion_v2`: e.g. 13000 for CUDA 13.0.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> Code {
    cuda_driver_version(version)
}

/// `nvmlSystemGetCudaDriverVersion`: as `_v2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(version: *mut c_int) -> Code {
    cuda_driver_version(version)
}

fn device_count(count: *mut c_uint) -> Code {
    run(|| {
        let d = driver::driver()?;
        // SAFETY: NVML's contract: `count` is null or valid for writes of one value.
        *unsafe { out(count) }? = d.count();
        Ok(())
    })
}

/// `nvmlDeviceGetCount_v2`: every GPU of the scenario, lost ones included.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Code {
    device_count(count)
}

/// `nvmlDeviceGetCount` (v1): as `_v2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(count: *mut c_uint) -> Code {
    device_count(count)
}

fn handle_by_index(index: c_uint, device: *mut nvmlDevice_t) -> Code {
    run(|| {
        let d = driver::driver()?;
        if index >= d.count() {
            return Err(rc::INVALID_ARGUMENT);
        }
        // SAFETY: NVML's contract: `device` is null or valid for writes of one handle.
        let slot = unsafe { out(device) }?;
        alive(d, index)?;
        *slot = device_handle(index);
        Ok(())
    })
}

/// `nvmlDeviceGetHandleByIndex_v2`: `GPU_IS_LOST` for a GPU off the bus (nvidia-smi's "Unable
/// to determine the device handle for GPU ...: GPU is lost").
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> Code {
    handle_by_index(index, device)
}

/// `nvmlDeviceGetHandleByIndex` (v1): as `_v2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> Code {
    handle_by_index(index, device)
}

// ------------------------------------------------------------------------------------------
// Identity and fixed facts.

device_getter!(
    /// `nvmlDeviceGetIndex`.
    nvmlDeviceGetIndex -> c_uint = |_d, i| i
);

/// `nvmlDeviceGetUUID`: `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        let inv = alive(d, i)?;
        // SAFETY: NVML's contract: `uuid` is null or valid for `length` bytes.
        unsafe { write_str(uuid, length, &inv.uuid) }
    })
}

/// `nvmlDeviceGetName`: the marketing name.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        let inv = alive(d, i)?;
        // SAFETY: NVML's contract: `name` is null or valid for `length` bytes.
        unsafe { write_str(name, length, &inv.name) }
    })
}

/// `nvmlDeviceGetSerial`: `NOT_SUPPORTED` on boards without one (GeForce).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSerial(
    device: nvmlDevice_t,
    serial: *mut c_char,
    length: c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        let inv = alive(d, i)?;
        let s = inv.serial.ok_or(rc::NOT_SUPPORTED)?;
        // SAFETY: NVML's contract: `serial` is null or valid for `length` bytes.
        unsafe { write_str(serial, length, &s) }
    })
}

/// PCI device and subsystem ids of a profile (H100 SXM from a real `nvidia-smi -q`; the 4090's
/// subsystem id is a placeholder).
fn pci_ids(profile_id: &str) -> (c_uint, c_uint) {
    match profile_id {
        "h100-sxm" => (0x2330_10DE, 0x16C1_10DE),
        "rtx4090-pcie" => (0x2684_10DE, 0x0000_10DE),
        _ => (0, 0),
    }
}

/// Copy an ASCII string into a fixed C array, NUL-terminated (truncating).
fn fill_array(dst: &mut [c_char], s: &str) {
    dst.fill(0);
    let room = dst.len().saturating_sub(1);
    for (d, b) in dst.iter_mut().zip(s.bytes().take(room)) {
        *d = b as c_char;
    }
}

fn pci_info(d: &Driver, i: u32) -> Result<nvmlPciInfo_t, Code> {
    let inv = alive(d, i)?;
    let (device_id, subsystem_id) = pci_ids(&d.profile(i)?.id);
    // `DDDDDDDD:BB:DD.F`
    let hex = |range: std::ops::Range<usize>| {
        inv.pci_bus_id.get(range).and_then(|s| c_uint::from_str_radix(s, 16).ok()).unwrap_or(0)
    };
    let (domain, bus, dev) = (hex(0..8), hex(9..11), hex(12..14));
    let mut info = nvmlPciInfo_t {
        busIdLegacy: [0; 16],
        domain,
        bus,
        device: dev,
        pciDeviceId: device_id,
        pciSubSystemId: subsystem_id,
        busId: [0; 32],
    };
    fill_array(&mut info.busIdLegacy, &format!("{domain:04X}:{bus:02X}:{dev:02X}.0"));
    fill_array(&mut info.busId, &inv.pci_bus_id);
    Ok(info)
}

device_getter!(
    /// `nvmlDeviceGetPciInfo_v3`: bus id `%08X:%02X:%02X.0` and the legacy `%04X:...` one.
    nvmlDeviceGetPciInfo_v3 -> nvmlPciInfo_t = |d, i| pci_info(d, i)?
);

/// Framebuffer: total, used (the workload's share) and the rest free; nothing reserved.
fn memory(d: &Driver, i: u32) -> Result<(u64, u64), Code> {
    let inv = alive(d, i)?;
    let s = d.sample(i)?;
    Ok((inv.memory_total_bytes, s.memory_used_bytes.min(inv.memory_total_bytes)))
}

device_getter!(
    /// `nvmlDeviceGetMemoryInfo` (v1), bytes.
    nvmlDeviceGetMemoryInfo -> nvmlMemory_t = |d, i| {
        let (total, used) = memory(d, i)?;
        nvmlMemory_t { total, free: total - used, used }
    }
);

/// `nvmlDeviceGetMemoryInfo_v2`, bytes; `ARGUMENT_VERSION_MISMATCH` unless `version` is
/// `nvmlMemory_v2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory_: *mut nvmlMemory_v2_t,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: `memory_` is null or valid for reads and writes.
        let m = unsafe { out(memory_) }?;
        if m.version != MEMORY_V2 {
            return Err(rc::ARGUMENT_VERSION_MISMATCH);
        }
        let (total, used) = memory(d, i)?;
        *m = nvmlMemory_v2_t { version: MEMORY_V2, total, reserved: 0, free: total - used, used };
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// Power.

/// `nvmlDeviceGetPowerManagementLimitConstraints`: min and max settable limit, mW.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerManagementLimitConstraints(
    device: nvmlDevice_t,
    min_limit: *mut c_uint,
    max_limit: *mut c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: both pointers are null or valid for writes.
        let (lo, hi) = unsafe { (out(min_limit)?, out(max_limit)?) };
        let inv = alive(d, i)?;
        *lo = inv.power_limit_min_mw;
        *hi = inv.power_limit_max_mw;
        Ok(())
    })
}

device_getter!(
    /// `nvmlDeviceGetPowerManagementDefaultLimit`, mW.
    nvmlDeviceGetPowerManagementDefaultLimit -> c_uint =
        |d, i| alive(d, i)?.power_limit_default_mw
);

device_getter!(
    /// `nvmlDeviceGetPowerManagementLimit`: the requested limit once in effect, mW.
    nvmlDeviceGetPowerManagementLimit -> c_uint = |d, i| d.sample(i)?.power_limit_mw
);

device_getter!(
    /// `nvmlDeviceGetEnforcedPowerLimit`: min(requested, BMC), mW.
    nvmlDeviceGetEnforcedPowerLimit -> c_uint = |d, i| d.sample(i)?.enforced_power_limit_mw
);

device_getter!(
    /// `nvmlDeviceGetPowerUsage`: power averaged over the last second (Ampere and later), mW.
    nvmlDeviceGetPowerUsage -> c_uint = |d, i| d.sample(i)?.power_avg_mw
);

device_getter!(
    /// `nvmlDeviceGetTotalEnergyConsumption`: mJ since the driver loaded (simulation start).
    nvmlDeviceGetTotalEnergyConsumption -> c_ulonglong = |d, i| d.sample(i)?.energy_mj
);

/// One field value from a sample, or the per-field return code.
fn field(s: &GpuSample, inv: &GpuInventory, id: c_uint) -> Result<(c_uint, b::nvmlValue_t), Code> {
    let uint = |v: Option<u32>| -> Result<(c_uint, b::nvmlValue_t), Code> {
        let v = v.ok_or(rc::NOT_SUPPORTED)?;
        Ok((b::nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT, b::nvmlValue_t { uiVal: v }))
    };
    match id {
        fi::NVML_FI_DEV_POWER_INSTANT => uint(s.power_instant_mw),
        fi::NVML_FI_DEV_POWER_AVERAGE => uint(Some(s.power_avg_mw)),
        fi::NVML_FI_DEV_MEMORY_TEMP => uint(s.temp_memory_c),
        fi::NVML_FI_DEV_NVLINK_LINK_COUNT => uint(Some(inv.nvlink_count).filter(|&n| n > 0)),
        fi::NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION => Ok((
            b::nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
            b::nvmlValue_t { ullVal: s.energy_mj },
        )),
        fi::NVML_FI_DEV_PCIE_REPLAY_COUNTER => Ok((
            b::nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
            b::nvmlValue_t { ullVal: s.pcie.replay_counter },
        )),
        _ => Err(rc::NOT_SUPPORTED),
    }
}

/// `nvmlDeviceGetFieldValues`: `NVML_FI_DEV_POWER_INSTANT` (186) and `_POWER_AVERAGE` (185) in
/// mW, `_MEMORY_TEMP` (82) in °C, `_NVLINK_LINK_COUNT` (91), `_TOTAL_ENERGY_CONSUMPTION` (83) in
/// mJ, `_PCIE_REPLAY_COUNTER` (94); any other id gets `NOT_SUPPORTED` in its own `nvmlReturn`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: nvmlDevice_t,
    values_count: c_int,
    values: *mut nvmlFieldValue_t,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        let n =
            usize::try_from(values_count).ok().filter(|&n| n > 0).ok_or(rc::INVALID_ARGUMENT)?;
        if values.is_null() {
            return Err(rc::INVALID_ARGUMENT);
        }
        // SAFETY: NVML's contract: `values` points at `values_count` initialised entries (the
        // caller set their `fieldId`), valid for reads and writes; checked non-null and n > 0.
        let values = unsafe { std::slice::from_raw_parts_mut(values, n) };
        let inv = alive(d, i)?;
        let (s, now) = {
            let node = d.node();
            (node.sample(i).map_err(code)?, node.now())
        };
        let timestamp = i64::try_from(now.as_micros()).unwrap_or(i64::MAX);
        for v in values.iter_mut() {
            v.timestamp = timestamp;
            v.latencyUsec = 0;
            match field(&s, &inv, v.fieldId) {
                Ok((ty, value)) => {
                    v.valueType = ty;
                    v.value = value;
                    v.nvmlReturn = rc::SUCCESS;
                }
                Err(c) => v.nvmlReturn = c,
            }
        }
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// PCIe, NVLink, fans.

device_getter!(
    /// `nvmlDeviceGetMaxPcieLinkGeneration`.
    nvmlDeviceGetMaxPcieLinkGeneration -> c_uint = |d, i| alive(d, i)?.max_pcie_gen
);

device_getter!(
    /// `nvmlDeviceGetMaxPcieLinkWidth`.
    nvmlDeviceGetMaxPcieLinkWidth -> c_uint = |d, i| alive(d, i)?.max_pcie_width
);

device_getter!(
    /// `nvmlDeviceGetCurrPcieLinkGeneration` (a downtrain shows here).
    nvmlDeviceGetCurrPcieLinkGeneration -> c_uint = |d, i| d.sample(i)?.pcie.generation
);

device_getter!(
    /// `nvmlDeviceGetCurrPcieLinkWidth`.
    nvmlDeviceGetCurrPcieLinkWidth -> c_uint = |d, i| d.sample(i)?.pcie.width
);

device_getter!(
    /// `nvmlDeviceGetPcieReplayCounter`.
    nvmlDeviceGetPcieReplayCounter -> c_uint = |d, i| sat_u32(d.sample(i)?.pcie.replay_counter)
);

/// `nvmlDeviceGetNvLinkState`: `NOT_SUPPORTED` without NVLink, `INVALID_ARGUMENT` for a link the
/// GPU lacks.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkState(
    device: nvmlDevice_t,
    link: c_uint,
    is_active: *mut nvmlEnableState_t,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: `is_active` is null or valid for writes.
        let slot = unsafe { out(is_active) }?;
        let s = d.sample(i)?;
        if s.nvlink_active.is_empty() {
            return Err(rc::NOT_SUPPORTED);
        }
        let active = *s.nvlink_active.get(link as usize).ok_or(rc::INVALID_ARGUMENT)?;
        *slot = if active {
            b::nvmlEnableState_enum_NVML_FEATURE_ENABLED
        } else {
            b::nvmlEnableState_enum_NVML_FEATURE_DISABLED
        };
        Ok(())
    })
}

/// `nvmlDeviceGetNvLinkErrorCounter`: the simulator's per-link counters; `NOT_SUPPORTED`
/// without NVLink and for the ECC-data counter, `INVALID_ARGUMENT` for a link the GPU lacks or
/// an unknown counter.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkErrorCounter(
    device: nvmlDevice_t,
    link: c_uint,
    counter: b::nvmlNvLinkErrorCounter_t,
    value: *mut c_ulonglong,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: `value` is null or valid for writes.
        let slot = unsafe { out(value) }?;
        let links = d.node().nvlink_errors(i).map_err(code)?;
        if links.is_empty() {
            return Err(rc::NOT_SUPPORTED);
        }
        let c = links.get(link as usize).ok_or(rc::INVALID_ARGUMENT)?;
        *slot = match counter {
            b::nvmlNvLinkErrorCounter_enum_NVML_NVLINK_ERROR_DL_REPLAY => c.replay,
            b::nvmlNvLinkErrorCounter_enum_NVML_NVLINK_ERROR_DL_RECOVERY => c.recovery,
            b::nvmlNvLinkErrorCounter_enum_NVML_NVLINK_ERROR_DL_CRC_FLIT => c.crc_flit,
            b::nvmlNvLinkErrorCounter_enum_NVML_NVLINK_ERROR_DL_CRC_DATA => c.crc_data,
            b::nvmlNvLinkErrorCounter_enum_NVML_NVLINK_ERROR_DL_ECC_DATA => {
                return Err(rc::NOT_SUPPORTED);
            }
            _ => return Err(rc::INVALID_ARGUMENT),
        };
        Ok(())
    })
}

device_getter!(
    /// `nvmlDeviceGetPersistenceMode`: the simulated driver keeps persistence mode on.
    nvmlDeviceGetPersistenceMode -> nvmlEnableState_t = |d, i| {
        if d.node().persistence_mode(i).map_err(code)? {
            b::nvmlEnableState_enum_NVML_FEATURE_ENABLED
        } else {
            b::nvmlEnableState_enum_NVML_FEATURE_DISABLED
        }
    }
);

device_getter!(
    /// `nvmlDeviceGetNumFans`: 0 on boards whose cooling is the chassis' (SXM).
    nvmlDeviceGetNumFans -> c_uint = |d, i| alive(d, i)?.fan_count
);

/// One fan's speed in percent: `NOT_SUPPORTED` on fanless boards (nvidia-smi's `N/A` on H100),
/// `INVALID_ARGUMENT` for a fan the board lacks.
fn fan_speed(d: &Driver, i: u32, fan: c_uint) -> Result<c_uint, Code> {
    let s = d.sample(i)?;
    if s.fan_speed_pct.is_empty() {
        return Err(rc::NOT_SUPPORTED);
    }
    s.fan_speed_pct.get(fan as usize).copied().ok_or(rc::INVALID_ARGUMENT)
}

/// `nvmlDeviceGetFanSpeed_v2`, percent of maximum.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetFanSpeed_v2(
    device: nvmlDevice_t,
    fan: c_uint,
    speed: *mut c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: `speed` is null or valid for writes.
        let slot = unsafe { out(speed) }?;
        *slot = fan_speed(d, i, fan)?;
        Ok(())
    })
}

device_getter!(
    /// `nvmlDeviceGetFanSpeed` (v1): fan 0.
    nvmlDeviceGetFanSpeed -> c_uint = |d, i| fan_speed(d, i, 0)?
);

// ------------------------------------------------------------------------------------------
// Temperatures and clocks.

/// `nvmlDeviceGetTemperature`: the die (`NVML_TEMPERATURE_GPU`, the only sensor), °C.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: nvmlTemperatureSensors_t,
    temp: *mut c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: `temp` is null or valid for writes.
        let slot = unsafe { out(temp) }?;
        if sensor != b::nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU {
            return Err(rc::INVALID_ARGUMENT);
        }
        *slot = d.sample(i)?.temp_core_c;
        Ok(())
    })
}

/// `nvmlDeviceGetTemperatureThreshold`: shutdown, slowdown, GPU max (T.Limit) and memory max,
/// °C; the acoustic and GPS thresholds are not modelled (`NOT_SUPPORTED`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperatureThreshold(
    device: nvmlDevice_t,
    threshold: nvmlTemperatureThresholds_t,
    temp: *mut c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: `temp` is null or valid for writes.
        let slot = unsafe { out(temp) }?;
        let inv = alive(d, i)?;
        let value = match threshold {
            b::nvmlTemperatureThresholds_enum_NVML_TEMPERATURE_THRESHOLD_SHUTDOWN => {
                inv.shutdown_temp_c
            }
            b::nvmlTemperatureThresholds_enum_NVML_TEMPERATURE_THRESHOLD_SLOWDOWN => {
                inv.slowdown_temp_c
            }
            b::nvmlTemperatureThresholds_enum_NVML_TEMPERATURE_THRESHOLD_MEM_MAX => {
                inv.max_memory_temp_c
            }
            b::nvmlTemperatureThresholds_enum_NVML_TEMPERATURE_THRESHOLD_GPU_MAX => {
                inv.max_operating_temp_c
            }
            t if t < b::nvmlTemperatureThresholds_enum_NVML_TEMPERATURE_THRESHOLD_COUNT => None,
            _ => return Err(rc::INVALID_ARGUMENT),
        };
        *slot = value.ok_or(rc::NOT_SUPPORTED)?;
        Ok(())
    })
}

/// `nvmlDeviceGetMarginTemperature`: the thermal margin, °C (may be negative);
/// `ARGUMENT_VERSION_MISMATCH` unless `version` is `nvmlMarginTemperature_v1`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMarginTemperature(
    device: nvmlDevice_t,
    margin: *mut nvmlMarginTemperature_t,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: `margin` is null or valid for reads and writes.
        let m = unsafe { out(margin) }?;
        if m.version != MARGIN_TEMPERATURE_V1 {
            return Err(rc::ARGUMENT_VERSION_MISMATCH);
        }
        m.marginTemperature = d.sample(i)?.thermal_margin_c.ok_or(rc::NOT_SUPPORTED)?;
        Ok(())
    })
}

/// A clock of a sample or of the maxima: graphics and SM are one domain here; video is not
/// modelled.
fn clock(clock_type: nvmlClockType_t, sm: u32, mem: u32) -> Result<c_uint, Code> {
    match clock_type {
        b::nvmlClockType_enum_NVML_CLOCK_GRAPHICS | b::nvmlClockType_enum_NVML_CLOCK_SM => Ok(sm),
        b::nvmlClockType_enum_NVML_CLOCK_MEM => Ok(mem),
        b::nvmlClockType_enum_NVML_CLOCK_VIDEO => Err(rc::NOT_SUPPORTED),
        _ => Err(rc::INVALID_ARGUMENT),
    }
}

/// `nvmlDeviceGetClockInfo`: the current clock, MHz.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    clock_type: nvmlClockType_t,
    mhz: *mut c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: `mhz` is null or valid for writes.
        let slot = unsafe { out(mhz) }?;
        let s = d.sample(i)?;
        *slot = clock(clock_type, s.sm_clock_mhz, s.mem_clock_mhz)?;
        Ok(())
    })
}

/// `nvmlDeviceGetMaxClockInfo`: the highest clock, MHz.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxClockInfo(
    device: nvmlDevice_t,
    clock_type: nvmlClockType_t,
    mhz: *mut c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: `mhz` is null or valid for writes.
        let slot = unsafe { out(mhz) }?;
        let inv = alive(d, i)?;
        *slot = clock(clock_type, inv.max_sm_clock_mhz, inv.max_mem_clock_mhz)?;
        Ok(())
    })
}

device_getter!(
    /// `nvmlDeviceGetUtilizationRates`, percent.
    nvmlDeviceGetUtilizationRates -> nvmlUtilization_t = |d, i| {
        let s = d.sample(i)?;
        nvmlUtilization_t { gpu: s.util_gpu_pct, memory: s.util_mem_pct }
    }
);

device_getter!(
    /// `nvmlDeviceGetCurrentClocksEventReasons`: `nvmlClocksEventReason*` bits.
    nvmlDeviceGetCurrentClocksEventReasons -> c_ulonglong = |d, i| d.sample(i)?.throttle.0
);

device_getter!(
    /// `nvmlDeviceGetCurrentClocksThrottleReasons`: the deprecated name, the same bits.
    nvmlDeviceGetCurrentClocksThrottleReasons -> c_ulonglong = |d, i| d.sample(i)?.throttle.0
);

// ------------------------------------------------------------------------------------------
// ECC, page retirement, row remapping.

/// `nvmlDeviceGetEccMode`: enabled (current and pending) on ECC boards, else `NOT_SUPPORTED`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEccMode(
    device: nvmlDevice_t,
    current: *mut nvmlEnableState_t,
    pending: *mut nvmlEnableState_t,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: both pointers are null or valid for writes.
        let (cur, pend) = unsafe { (out(current)?, out(pending)?) };
        alive(d, i)?;
        if !d.profile(i)?.ecc {
            return Err(rc::NOT_SUPPORTED);
        }
        *cur = b::nvmlEnableState_enum_NVML_FEATURE_ENABLED;
        *pend = b::nvmlEnableState_enum_NVML_FEATURE_ENABLED;
        Ok(())
    })
}

/// `nvmlDeviceGetTotalEccErrors`: corrected / uncorrected, volatile / aggregate counts.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error_type: nvmlMemoryErrorType_t,
    counter_type: nvmlEccCounterType_t,
    ecc_counts: *mut c_ulonglong,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: `ecc_counts` is null or valid for writes.
        let slot = unsafe { out(ecc_counts) }?;
        let ecc = d.sample(i)?.ecc.ok_or(rc::NOT_SUPPORTED)?;
        const CORRECTED: c_uint = b::nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_CORRECTED;
        const UNCORRECTED: c_uint = b::nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_UNCORRECTED;
        const VOLATILE: c_uint = b::nvmlEccCounterType_enum_NVML_VOLATILE_ECC;
        const AGGREGATE: c_uint = b::nvmlEccCounterType_enum_NVML_AGGREGATE_ECC;
        *slot = match (error_type, counter_type) {
            (CORRECTED, VOLATILE) => ecc.volatile_corrected,
            (UNCORRECTED, VOLATILE) => ecc.volatile_uncorrected,
            (CORRECTED, AGGREGATE) => ecc.aggregate_corrected,
            (UNCORRECTED, AGGREGATE) => ecc.aggregate_uncorrected,
            _ => return Err(rc::INVALID_ARGUMENT),
        };
        Ok(())
    })
}

/// Page retirement: the simulated boards remap rows instead (Ampere and later answer
/// `NOT_SUPPORTED`, nvidia-smi's `N/A` on H100), after the usual checks.
fn retired_pages(device: nvmlDevice_t, cause: c_uint, count: *mut c_uint) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        if cause >= b::nvmlPageRetirementCause_enum_NVML_PAGE_RETIREMENT_CAUSE_COUNT {
            return Err(rc::INVALID_ARGUMENT);
        }
        // SAFETY: NVML's contract: `count` is null or valid for reads and writes.
        unsafe { out(count) }?;
        alive(d, i)?;
        Err(rc::NOT_SUPPORTED)
    })
}

/// `nvmlDeviceGetRetiredPages`: `NOT_SUPPORTED` (see above).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    device: nvmlDevice_t,
    cause: nvmlPageRetirementCause_t,
    page_count: *mut c_uint,
    _addresses: *mut c_ulonglong,
) -> Code {
    retired_pages(device, cause, page_count)
}

/// `nvmlDeviceGetRetiredPages_v2`: `NOT_SUPPORTED` (see above).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages_v2(
    device: nvmlDevice_t,
    cause: nvmlPageRetirementCause_t,
    page_count: *mut c_uint,
    _addresses: *mut c_ulonglong,
    _timestamps: *mut c_ulonglong,
) -> Code {
    retired_pages(device, cause, page_count)
}

/// `nvmlDeviceGetRetiredPagesPendingStatus`: `NOT_SUPPORTED` (see above).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPagesPendingStatus(
    device: nvmlDevice_t,
    is_pending: *mut nvmlEnableState_t,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: `is_pending` is null or valid for writes.
        unsafe { out(is_pending) }?;
        alive(d, i)?;
        Err(rc::NOT_SUPPORTED)
    })
}

/// `nvmlDeviceGetRemappedRows`: counts, pending and failure flags (ECC boards only).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: nvmlDevice_t,
    corr_rows: *mut c_uint,
    unc_rows: *mut c_uint,
    is_pending: *mut c_uint,
    failure_occurred: *mut c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: all four pointers are null or valid for writes.
        let (corr, unc, pending, failed) =
            unsafe { (out(corr_rows)?, out(unc_rows)?, out(is_pending)?, out(failure_occurred)?) };
        let r = d.sample(i)?.remapped_rows.ok_or(rc::NOT_SUPPORTED)?;
        *corr = r.correctable;
        *unc = r.uncorrectable;
        *pending = c_uint::from(r.pending);
        *failed = c_uint::from(r.failed);
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// Processes.

/// `nvmlDeviceGetComputeRunningProcesses_v3`: the simulator's process list (one process while a
/// workload runs, pid `40000 + 100 × index`).
/// `*info_count` below the number of processes: `INSUFFICIENT_SIZE` with the number written
/// (a null `infos` with a count of 0 is NVML's size query).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    info_count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        // SAFETY: NVML's contract: `info_count` is null or valid for reads and writes.
        let count = unsafe { out(info_count) }?;
        let procs = d.node().compute_processes(i).map_err(code)?;
        let n = u32::try_from(procs.len()).unwrap_or(c_uint::MAX);
        let room = *count;
        *count = n;
        if room < n {
            return Err(rc::INSUFFICIENT_SIZE);
        }
        if n == 0 {
            return Ok(());
        }
        if infos.is_null() {
            return Err(rc::INVALID_ARGUMENT);
        }
        // SAFETY: NVML's contract: `infos` is valid for `room >= n` entries (checked above).
        let infos = unsafe { std::slice::from_raw_parts_mut(infos, n as usize) };
        for (info, p) in infos.iter_mut().zip(&procs) {
            *info = nvmlProcessInfo_t {
                pid: p.pid,
                usedGpuMemory: p.used_memory_bytes,
                gpuInstanceId: NO_INSTANCE,
                computeInstanceId: NO_INSTANCE,
            };
        }
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// Controls (NVML needs root for these; the fake does not check: no NO_PERMISSION).

/// `nvmlDeviceSetPowerManagementLimit`, mW: `INVALID_ARGUMENT` outside the constraints; takes
/// effect 100-500 ms of simulated time later.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceSetPowerManagementLimit(
    device: nvmlDevice_t,
    limit: c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        d.node().set_power_limit(i, limit).map_err(code)
    })
}

/// `nvmlDeviceSetGpuLockedClocks`, MHz: `INVALID_ARGUMENT` for a range outside the board's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceSetGpuLockedClocks(
    device: nvmlDevice_t,
    min_gpu_clock_mhz: c_uint,
    max_gpu_clock_mhz: c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        d.node().lock_clocks(i, min_gpu_clock_mhz, max_gpu_clock_mhz).map_err(code)
    })
}

/// `nvmlDeviceResetGpuLockedClocks`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceResetGpuLockedClocks(device: nvmlDevice_t) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        d.node().reset_clocks(i).map_err(code)
    })
}

/// `nvmlDeviceSetFanSpeed_v2`, percent: manual control of one fan. `NOT_SUPPORTED` on fanless
/// boards, `INVALID_ARGUMENT` for a fan the board lacks or a speed above 100.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceSetFanSpeed_v2(
    device: nvmlDevice_t,
    fan: c_uint,
    speed: c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        d.node().set_fan_speed(i, fan, speed).map_err(code)
    })
}

/// `nvmlDeviceSetDefaultFanSpeed_v2`: one fan back to the board's automatic curve.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceSetDefaultFanSpeed_v2(
    device: nvmlDevice_t,
    fan: c_uint,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        d.node().reset_fan(i, fan).map_err(code)
    })
}

// ------------------------------------------------------------------------------------------
// Events.

device_getter!(
    /// `nvmlDeviceGetSupportedEventTypes`: XID, plus single- and double-bit ECC on ECC boards.
    nvmlDeviceGetSupportedEventTypes -> c_ulonglong = |d, i| {
        alive(d, i)?;
        d.supported_events(i)?
    }
);

/// `nvmlEventSetCreate`: a set that sees events from now on.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> Code {
    run(|| {
        let d = driver::driver()?;
        // SAFETY: NVML's contract: `set` is null or valid for writes of one handle.
        let slot = unsafe { out(set) }?;
        let handle = driver::new_event_set_handle();
        let mut sets = d.event_sets();
        let state = EventSet::new(&d.node());
        sets.insert(handle.addr(), state);
        *slot = handle;
        Ok(())
    })
}

/// `nvmlDeviceRegisterEvents`: `NOT_SUPPORTED` if any requested type is not supported by the
/// GPU, `INVALID_ARGUMENT` for an unknown set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    event_types: c_ulonglong,
    set: nvmlEventSet_t,
) -> Code {
    run(|| {
        let (d, i) = gpu(device)?;
        alive(d, i)?;
        if event_types & !d.supported_events(i)? != 0 {
            return Err(rc::NOT_SUPPORTED);
        }
        let mut sets = d.event_sets();
        let state = sets.get_mut(&set.addr()).ok_or(rc::INVALID_ARGUMENT)?;
        // Events logged before the registration are not this GPU's to deliver.
        state.drain(&d.node());
        *state.masks.entry(i).or_insert(0) |= event_types;
        Ok(())
    })
}

/// `nvmlEventSetWait_v2`: the next event, waiting up to `timeoutms` ms for one; `TIMEOUT` when
/// none arrives. XID events carry the XID number in `eventData`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeoutms: c_uint,
) -> Code {
    run(|| {
        let d = driver::driver()?;
        // SAFETY: NVML's contract: `data` is null or valid for writes of one event.
        let slot = unsafe { out(data) }?;
        let deadline = Instant::now() + Duration::from_millis(u64::from(timeoutms));
        loop {
            {
                let mut sets = d.event_sets();
                let state = sets.get_mut(&set.addr()).ok_or(rc::INVALID_ARGUMENT)?;
                if state.pending.is_empty() {
                    state.drain(&d.node());
                }
                if let Some((gpu, kind, value)) = state.pending.pop_front() {
                    *slot = nvmlEventData_t {
                        device: device_handle(gpu),
                        eventType: kind,
                        eventData: value,
                        gpuInstanceId: NO_INSTANCE,
                        computeInstanceId: NO_INSTANCE,
                    };
                    return Ok(());
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(rc::TIMEOUT);
            }
            std::thread::sleep(EVENT_POLL.min(deadline - now));
        }
    })
}

/// `nvmlEventSetFree`: `INVALID_ARGUMENT` for an unknown (or already freed) set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> Code {
    run(|| {
        let d = driver::driver()?;
        d.event_sets().remove(&set.addr()).map(|_| ()).ok_or(rc::INVALID_ARGUMENT)
    })
}

// ------------------------------------------------------------------------------------------

/// Compile-time check that every export has exactly the C signature nvml-wrapper-sys declares:
/// each assignment coerces our function to the binding's function-pointer type. Never called.
fn signatures_match_bindings(lib: &mut b::NvmlLib) {
    lib.nvmlInit_v2 = Ok(nvmlInit_v2);
    lib.nvmlInitWithFlags = Ok(nvmlInitWithFlags);
    lib.nvmlShutdown = Ok(nvmlShutdown);
    lib.nvmlErrorString = Ok(nvmlErrorString);
    lib.nvmlSystemGetDriverVersion = Ok(nvmlSystemGetDriverVersion);
    lib.nvmlSystemGetNVMLVersion = Ok(nvmlSystemGetNVMLVersion);
    lib.nvmlSystemGetCudaDriverVersion = Ok(nvmlSystemGetCudaDriverVersion);
    lib.nvmlSystemGetCudaDriverVersion_v2 = Ok(nvmlSystemGetCudaDriverVersion_v2);
    lib.nvmlDeviceGetCount_v2 = Ok(nvmlDeviceGetCount_v2);
    lib.nvmlDeviceGetHandleByIndex_v2 = Ok(nvmlDeviceGetHandleByIndex_v2);
    lib.nvmlDeviceGetIndex = Ok(nvmlDeviceGetIndex);
    lib.nvmlDeviceGetUUID = Ok(nvmlDeviceGetUUID);
    lib.nvmlDeviceGetName = Ok(nvmlDeviceGetName);
    lib.nvmlDeviceGetSerial = Ok(nvmlDeviceGetSerial);
    lib.nvmlDeviceGetPciInfo_v3 = Ok(nvmlDeviceGetPciInfo_v3);
    lib.nvmlDeviceGetMemoryInfo = Ok(nvmlDeviceGetMemoryInfo);
    lib.nvmlDeviceGetMemoryInfo_v2 = Ok(nvmlDeviceGetMemoryInfo_v2);
    lib.nvmlDeviceGetPowerManagementLimitConstraints =
        Ok(nvmlDeviceGetPowerManagementLimitConstraints);
    lib.nvmlDeviceGetPowerManagementDefaultLimit = Ok(nvmlDeviceGetPowerManagementDefaultLimit);
    lib.nvmlDeviceGetPowerManagementLimit = Ok(nvmlDeviceGetPowerManagementLimit);
    lib.nvmlDeviceGetEnforcedPowerLimit = Ok(nvmlDeviceGetEnforcedPowerLimit);
    lib.nvmlDeviceGetPowerUsage = Ok(nvmlDeviceGetPowerUsage);
    lib.nvmlDeviceGetTotalEnergyConsumption = Ok(nvmlDeviceGetTotalEnergyConsumption);
    lib.nvmlDeviceGetFieldValues = Ok(nvmlDeviceGetFieldValues);
    lib.nvmlDeviceGetMaxPcieLinkGeneration = Ok(nvmlDeviceGetMaxPcieLinkGeneration);
    lib.nvmlDeviceGetMaxPcieLinkWidth = Ok(nvmlDeviceGetMaxPcieLinkWidth);
    lib.nvmlDeviceGetCurrPcieLinkGeneration = Ok(nvmlDeviceGetCurrPcieLinkGeneration);
    lib.nvmlDeviceGetCurrPcieLinkWidth = Ok(nvmlDeviceGetCurrPcieLinkWidth);
    lib.nvmlDeviceGetPcieReplayCounter = Ok(nvmlDeviceGetPcieReplayCounter);
    lib.nvmlDeviceGetNvLinkErrorCounter = Ok(nvmlDeviceGetNvLinkErrorCounter);
    lib.nvmlDeviceGetPersistenceMode = Ok(nvmlDeviceGetPersistenceMode);
    lib.nvmlDeviceGetNvLinkState = Ok(nvmlDeviceGetNvLinkState);
    lib.nvmlDeviceGetNumFans = Ok(nvmlDeviceGetNumFans);
    lib.nvmlDeviceGetFanSpeed = Ok(nvmlDeviceGetFanSpeed);
    lib.nvmlDeviceGetFanSpeed_v2 = Ok(nvmlDeviceGetFanSpeed_v2);
    lib.nvmlDeviceGetTemperature = Ok(nvmlDeviceGetTemperature);
    lib.nvmlDeviceGetTemperatureThreshold = Ok(nvmlDeviceGetTemperatureThreshold);
    lib.nvmlDeviceGetMarginTemperature = Ok(nvmlDeviceGetMarginTemperature);
    lib.nvmlDeviceGetMaxClockInfo = Ok(nvmlDeviceGetMaxClockInfo);
    lib.nvmlDeviceGetClockInfo = Ok(nvmlDeviceGetClockInfo);
    lib.nvmlDeviceGetUtilizationRates = Ok(nvmlDeviceGetUtilizationRates);
    lib.nvmlDeviceGetCurrentClocksEventReasons = Ok(nvmlDeviceGetCurrentClocksEventReasons);
    lib.nvmlDeviceGetCurrentClocksThrottleReasons = Ok(nvmlDeviceGetCurrentClocksThrottleReasons);
    lib.nvmlDeviceGetEccMode = Ok(nvmlDeviceGetEccMode);
    lib.nvmlDeviceGetTotalEccErrors = Ok(nvmlDeviceGetTotalEccErrors);
    lib.nvmlDeviceGetRetiredPages = Ok(nvmlDeviceGetRetiredPages);
    lib.nvmlDeviceGetRetiredPages_v2 = Ok(nvmlDeviceGetRetiredPages_v2);
    lib.nvmlDeviceGetRetiredPagesPendingStatus = Ok(nvmlDeviceGetRetiredPagesPendingStatus);
    lib.nvmlDeviceGetRemappedRows = Ok(nvmlDeviceGetRemappedRows);
    lib.nvmlDeviceGetComputeRunningProcesses_v3 = Ok(nvmlDeviceGetComputeRunningProcesses_v3);
    lib.nvmlDeviceSetPowerManagementLimit = Ok(nvmlDeviceSetPowerManagementLimit);
    lib.nvmlDeviceSetGpuLockedClocks = Ok(nvmlDeviceSetGpuLockedClocks);
    lib.nvmlDeviceResetGpuLockedClocks = Ok(nvmlDeviceResetGpuLockedClocks);
    lib.nvmlDeviceSetFanSpeed_v2 = Ok(nvmlDeviceSetFanSpeed_v2);
    lib.nvmlDeviceSetDefaultFanSpeed_v2 = Ok(nvmlDeviceSetDefaultFanSpeed_v2);
    lib.nvmlDeviceGetSupportedEventTypes = Ok(nvmlDeviceGetSupportedEventTypes);
    lib.nvmlDeviceRegisterEvents = Ok(nvmlDeviceRegisterEvents);
    lib.nvmlEventSetCreate = Ok(nvmlEventSetCreate);
    lib.nvmlEventSetWait_v2 = Ok(nvmlEventSetWait_v2);
    lib.nvmlEventSetFree = Ok(nvmlEventSetFree);
}

// Referencing the function makes the compiler type-check it without a dead-code warning.
const _: fn(&mut b::NvmlLib) = signatures_match_bindings;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_versions_match_nvml_h() {
        assert_eq!(MARGIN_TEMPERATURE_V1, 0x0100_0008);
        assert_eq!(MEMORY_V2, 0x0200_0028);
    }

    #[test]
    fn cuda_version_as_nvml_integer() {
        assert_eq!(cuda_version_int("13.0"), Some(13_000));
        assert_eq!(cuda_version_int("12.4"), Some(12_040));
        assert_eq!(cuda_version_int("x"), None);
    }

    #[test]
    fn error_strings_are_never_empty() {
        for code in 0..=30 {
            assert!(!error_string(code).to_bytes().is_empty());
        }
        assert_eq!(error_string(rc::GPU_IS_LOST), c"GPU is lost");
        assert_eq!(error_string(rc::UNKNOWN), c"Unknown Error");
    }

    #[test]
    fn pci_legacy_and_full_ids() {
        let mut a = [0 as c_char; 16];
        fill_array(&mut a, "0000:10:00.0");
        let s: Vec<u8> = a.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        assert_eq!(s, b"0000:10:00.0");
        let mut short = [1 as c_char; 4];
        fill_array(&mut short, "abcdef");
        assert_eq!(short, [b'a' as c_char, b'b' as c_char, b'c' as c_char, 0]);
    }

    #[test]
    fn exported_symbols_are_listed_once() {
        let mut v = EXPORTED_SYMBOLS.to_vec();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), EXPORTED_SYMBOLS.len());
    }
}
