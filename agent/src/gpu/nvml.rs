//! The `nvml` backend: nvml-wrapper over `libnvidia-ml.so.1` (a real driver, or the fake library
//! in `hw-tests/fake-nvml`).
//!
//! - Units are NVML's and pass through unchanged: mW, mJ, °C, MHz, bytes.
//! - An optional field of [`GpuInventory`] / [`GpuSample`] that the device does not support
//!   (`NVML_ERROR_NOT_SUPPORTED`, or a symbol the loaded library lacks) becomes `None` or an
//!   empty list, never an error. A required field that cannot be read is an error of the call.
//! - Calls nvml-wrapper 0.13 does not wrap go through the raw `NvmlLib` (`Nvml::lib`), each
//!   guarded on its symbol being present: `nvmlDeviceGetRemappedRows`,
//!   `nvmlDeviceGetMarginTemperature`, `nvmlDeviceGetCurrentClocksEventReasons` (falling back to
//!   the wrapped, older `...ThrottleReasons` call) and the event-set functions.
//! - Average power is `nvmlDeviceGetPowerUsage` (a 1 s average from Ampere on), instant power
//!   and HBM temperature come from `nvmlDeviceGetFieldValues` (`NVML_FI_DEV_POWER_INSTANT` = 186,
//!   `NVML_FI_DEV_MEMORY_TEMP` = 82).
//!
//! Design note: `docs/0001-gpu-layer.md`.

use std::os::raw::{c_uint, c_ulonglong};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_proto::gpu::{
    ComputeProcess, DriverInfo, EccCounters, GpuEvent, GpuEventKind, GpuInventory, GpuSample,
    NvlinkErrorCounters, PcieLink, RemappedRows, RetiredPages,
};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, RetirementCause, TemperatureSensor, TemperatureThreshold,
};
use nvml_wrapper::enum_wrappers::nv_link::ErrorCounter;
use nvml_wrapper::enums::device::{GpuLockedClocksSetting, SampleValue, UsedGpuMemory};
use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper::struct_wrappers::device::FieldValueSample;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::{Device, Nvml};
use nvml_wrapper_sys::bindings::field_id::{NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_POWER_INSTANT};
use nvml_wrapper_sys::bindings::{
    NVML_NVLINK_MAX_LINKS, nvmlDevice_t, nvmlEventData_t, nvmlEventSet_t,
    nvmlEventTypeDoubleBitEccError, nvmlEventTypeSingleBitEccError, nvmlEventTypeXidCriticalError,
    nvmlMarginTemperature_t, nvmlReturn_t,
};
use tracing::{debug, warn};

use super::{EventSource, GpuBackend, GpuError};

/// Index used in errors of driver-wide calls.
const DRIVER_WIDE: u32 = u32::MAX;

/// `nvmlMarginTemperature_v1` = `NVML_STRUCT_VERSION(MarginTemperature, 1)` = size | 1 << 24.
const MARGIN_TEMPERATURE_V1: c_uint = (size_of::<nvmlMarginTemperature_t>() as c_uint) | (1 << 24);

/// The events Hearth listens to.
const WANTED_EVENTS: EventTypes = EventTypes::CRITICAL_XID_ERROR
    .union(EventTypes::SINGLE_BIT_ECC_ERROR)
    .union(EventTypes::DOUBLE_BIT_ECC_ERROR);

/// Real GPUs through NVML. Cheap to share: one initialised library behind an [`Arc`].
#[derive(Debug)]
pub struct NvmlBackend {
    nvml: Arc<Nvml>,
    /// The library path or name it was opened from (for messages).
    path: String,
}

/// Map an error of a per-GPU call.
fn map(gpu: u32, op: &'static str, e: NvmlError) -> GpuError {
    match e {
        NvmlError::GpuLost => GpuError::GpuLost { gpu },
        NvmlError::NoPermission => GpuError::NoPermission { gpu, op },
        NvmlError::InvalidArg => GpuError::InvalidArgument {
            gpu,
            op,
            message: "NVML rejected an argument (NVML_ERROR_INVALID_ARGUMENT)".into(),
        },
        NvmlError::NotSupported => GpuError::NotSupported { gpu, op },
        other => GpuError::Call { gpu, op, source: Box::new(other) },
    }
}

/// `Ok(None)` where the device or the loaded library lacks the feature.
fn optional<T>(r: Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(NvmlError::NotSupported | NvmlError::FunctionNotFound)
        | Err(NvmlError::FailedToLoadSymbol(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A raw NVML function of the loaded library, `None` if the library does not export it.
macro_rules! raw {
    ($nvml:expr, $name:ident) => {
        $nvml.lib().$name.as_ref().ok().copied()
    };
}

impl NvmlBackend {
    /// Load the NVML library at `library` (a path or a soname such as `libnvidia-ml.so.1`) and
    /// initialise it.
    ///
    /// Errors: [`GpuError::LibraryNotFound`] when the library cannot be loaded (or is not NVML),
    /// [`GpuError::DriverNotLoaded`] when it loads but the kernel driver is not running.
    pub fn open(library: &Path) -> Result<Self, GpuError> {
        let path = library.display().to_string();
        let nvml = Nvml::builder().lib_path(library.as_os_str()).init().map_err(|e| match e {
            NvmlError::LibloadingError(source) => {
                GpuError::LibraryNotFound { path: path.clone(), source: Box::new(source) }
            }
            NvmlError::FailedToLoadSymbol(symbol) => GpuError::LibraryNotFound {
                path: path.clone(),
                source: format!("not an NVML library: {symbol}").into(),
            },
            NvmlError::LibraryNotFound => GpuError::LibraryNotFound {
                path: path.clone(),
                source: Box::new(NvmlError::LibraryNotFound),
            },
            NvmlError::DriverNotLoaded => GpuError::DriverNotLoaded { path: path.clone() },
            NvmlError::NoPermission => GpuError::NoPermission { gpu: DRIVER_WIDE, op: "nvmlInit" },
            other => GpuError::Call { gpu: DRIVER_WIDE, op: "nvmlInit", source: Box::new(other) },
        })?;
        debug!(library = %path, "NVML initialised");
        Ok(Self { nvml: Arc::new(nvml), path })
    }

    /// The library this backend was opened from.
    pub fn library(&self) -> &str {
        &self.path
    }

    /// GPU `gpu`'s device handle (`NoSuchGpu` for an index NVML does not know).
    fn device(&self, gpu: u32) -> Result<Device<'_>, GpuError> {
        self.nvml.device_by_index(gpu).map_err(|e| match e {
            NvmlError::InvalidArg | NvmlError::NotFound => GpuError::NoSuchGpu { gpu },
            other => map(gpu, "get device handle", other),
        })
    }

    /// Thermal margin through the raw `nvmlDeviceGetMarginTemperature` (versioned struct).
    fn thermal_margin(&self, d: &Device<'_>) -> Result<Option<i32>, NvmlError> {
        let Some(f) = raw!(self.nvml, nvmlDeviceGetMarginTemperature) else { return Ok(None) };
        let mut m =
            nvmlMarginTemperature_t { version: MARGIN_TEMPERATURE_V1, marginTemperature: 0 };
        // SAFETY: `f` is the library's own `nvmlDeviceGetMarginTemperature`; the handle comes from
        // this initialised `Nvml` (kept alive by `self`), and `m` is a valid, versioned struct
        // for the call to fill.
        let code = unsafe { f(d.handle(), &mut m) };
        Ok(optional(nvml_try(code))?.map(|()| m.marginTemperature))
    }

    /// Row remapping through the raw `nvmlDeviceGetRemappedRows`.
    fn remapped_rows(&self, d: &Device<'_>) -> Result<Option<RemappedRows>, NvmlError> {
        let Some(f) = raw!(self.nvml, nvmlDeviceGetRemappedRows) else { return Ok(None) };
        let (mut corr, mut unc, mut pending, mut failed): (c_uint, c_uint, c_uint, c_uint) =
            (0, 0, 0, 0);
        // SAFETY: `f` is the library's own `nvmlDeviceGetRemappedRows`; the handle comes from this
        // initialised `Nvml`, and the four out-pointers are valid locals.
        let code = unsafe { f(d.handle(), &mut corr, &mut unc, &mut pending, &mut failed) };
        Ok(optional(nvml_try(code))?.map(|()| RemappedRows {
            correctable: corr,
            uncorrectable: unc,
            pending: pending != 0,
            failed: failed != 0,
        }))
    }

    /// Clock-event reasons through the raw `nvmlDeviceGetCurrentClocksEventReasons` (all bits
    /// kept); the wrapped, deprecated throttle-reasons call where the library lacks it.
    fn clock_event_reasons(&self, d: &Device<'_>) -> Result<u64, NvmlError> {
        if let Some(f) = raw!(self.nvml, nvmlDeviceGetCurrentClocksEventReasons) {
            let mut reasons: c_ulonglong = 0;
            // SAFETY: `f` is the library's own `nvmlDeviceGetCurrentClocksEventReasons`; the
            // handle comes from this initialised `Nvml`, and `reasons` is a valid local.
            let code = unsafe { f(d.handle(), &mut reasons) };
            if let Some(()) = optional(nvml_try(code))? {
                return Ok(reasons);
            }
        }
        Ok(d.current_throttle_reasons()?.bits())
    }
}

/// The state of each NVLink link, in link order, up to the first link the GPU does not have.
fn nvlink_states(d: &Device<'_>) -> Result<Vec<bool>, NvmlError> {
    let mut links = Vec::new();
    for link in 0..NVML_NVLINK_MAX_LINKS {
        match d.link_wrapper_for(link).is_active() {
            Ok(active) => links.push(active),
            Err(NvmlError::GpuLost) => return Err(NvmlError::GpuLost),
            Err(_) => break,
        }
    }
    Ok(links)
}

/// Fan speeds in percent; empty where the board has no fans of its own.
fn fan_speeds(d: &Device<'_>) -> Result<Vec<u32>, NvmlError> {
    let fans = optional(d.num_fans())?.unwrap_or(0);
    let mut speeds = Vec::new();
    for fan in 0..fans {
        match optional(d.fan_speed(fan))? {
            Some(pct) => speeds.push(pct),
            None => return Ok(Vec::new()),
        }
    }
    Ok(speeds)
}

/// One integer field of an `nvmlDeviceGetFieldValues` answer; `None` where unsupported.
fn field_u32(
    fields: Option<&[Result<FieldValueSample, NvmlError>]>,
    index: usize,
) -> Result<Option<u32>, NvmlError> {
    let Some(Ok(sample)) = fields.and_then(|f| f.get(index)) else { return Ok(None) };
    match &sample.value {
        Ok(SampleValue::U32(v)) => Ok(Some(*v)),
        Ok(SampleValue::U64(v)) => Ok(u32::try_from(*v).ok()),
        Ok(SampleValue::I64(v)) => Ok(u32::try_from(*v).ok()),
        Ok(SampleValue::F64(v)) if v.is_finite() && *v >= 0.0 => Ok(Some(v.round() as u32)),
        Ok(SampleValue::F64(_)) => Ok(None),
        Err(NvmlError::GpuLost) => Err(NvmlError::GpuLost),
        Err(_) => Ok(None),
    }
}

/// ECC counters, `None` where ECC is off or unsupported.
fn ecc_counters(d: &Device<'_>) -> Result<Option<EccCounters>, NvmlError> {
    match optional(d.is_ecc_enabled())? {
        Some(mode) if mode.currently_enabled => {}
        _ => return Ok(None),
    }
    let read = |e: MemoryError, c: EccCounter| optional(d.total_ecc_errors(e, c));
    let counters = (
        read(MemoryError::Corrected, EccCounter::Volatile)?,
        read(MemoryError::Uncorrected, EccCounter::Volatile)?,
        read(MemoryError::Corrected, EccCounter::Aggregate)?,
        read(MemoryError::Uncorrected, EccCounter::Aggregate)?,
    );
    Ok(match counters {
        (Some(vc), Some(vu), Some(ac), Some(au)) => Some(EccCounters {
            volatile_corrected: vc,
            volatile_uncorrected: vu,
            aggregate_corrected: ac,
            aggregate_uncorrected: au,
        }),
        _ => None,
    })
}

/// Retired pages, `None` where the GPU does not retire pages (Ampere and later remap rows).
fn retired_pages(d: &Device<'_>) -> Result<Option<RetiredPages>, NvmlError> {
    let count = |pages: Vec<_>| u32::try_from(pages.len()).unwrap_or(u32::MAX);
    let Some(single) = optional(d.retired_pages(RetirementCause::MultipleSingleBitEccErrors))?
    else {
        return Ok(None);
    };
    let Some(double) = optional(d.retired_pages(RetirementCause::DoubleBitEccError))? else {
        return Ok(None);
    };
    let Some(pending) = optional(d.are_pages_pending_retired())? else { return Ok(None) };
    Ok(Some(RetiredPages { single_bit: count(single), double_bit: count(double), pending }))
}

impl GpuBackend for NvmlBackend {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn driver(&self) -> Result<DriverInfo, GpuError> {
        let call = |op: &'static str| move |e| map(DRIVER_WIDE, op, e);
        let driver_version = self.nvml.sys_driver_version().map_err(call("driver version"))?;
        let nvml_version = self.nvml.sys_nvml_version().map_err(call("NVML version"))?;
        let cuda = self.nvml.sys_cuda_driver_version().map_err(call("CUDA version"))?;
        let cuda_version = format!(
            "{}.{}",
            nvml_wrapper::cuda_driver_version_major(cuda),
            nvml_wrapper::cuda_driver_version_minor(cuda)
        );
        Ok(DriverInfo { driver_version, cuda_version, nvml_version })
    }

    fn gpu_count(&self) -> Result<u32, GpuError> {
        self.nvml.device_count().map_err(|e| map(DRIVER_WIDE, "device count", e))
    }

    fn inventory(&self, gpu: u32) -> Result<GpuInventory, GpuError> {
        let d = self.device(gpu)?;
        let e = |e| map(gpu, "inventory", e);
        let threshold = |t| optional(d.temperature_threshold(t)).map_err(e);
        let constraints = d.power_management_limit_constraints().map_err(e)?;
        Ok(GpuInventory {
            index: d.index().map_err(e)?,
            uuid: d.uuid().map_err(e)?,
            name: d.name().map_err(e)?,
            serial: optional(d.serial()).map_err(e)?,
            pci_bus_id: d.pci_info().map_err(e)?.bus_id,
            memory_total_bytes: d.memory_info().map_err(e)?.total,
            power_limit_min_mw: constraints.min_limit,
            power_limit_max_mw: constraints.max_limit,
            power_limit_default_mw: d.power_management_limit_default().map_err(e)?,
            max_pcie_gen: d.max_pcie_link_gen().map_err(e)?,
            max_pcie_width: d.max_pcie_link_width().map_err(e)?,
            nvlink_count: u32::try_from(nvlink_states(&d).map_err(e)?.len()).unwrap_or(0),
            fan_count: optional(d.num_fans()).map_err(e)?.unwrap_or(0),
            slowdown_temp_c: threshold(TemperatureThreshold::Slowdown)?,
            shutdown_temp_c: threshold(TemperatureThreshold::Shutdown)?,
            max_operating_temp_c: threshold(TemperatureThreshold::GpuMax)?,
            max_memory_temp_c: threshold(TemperatureThreshold::MemoryMax)?,
            max_sm_clock_mhz: d.max_clock_info(Clock::SM).map_err(e)?,
            max_mem_clock_mhz: d.max_clock_info(Clock::Memory).map_err(e)?,
        })
    }

    fn sample(&self, gpu: u32) -> Result<GpuSample, GpuError> {
        let d = self.device(gpu)?;
        let e = |e| map(gpu, "sample", e);
        let fields = optional(d.field_values_for(&[
            FieldId(NVML_FI_DEV_POWER_INSTANT),
            FieldId(NVML_FI_DEV_MEMORY_TEMP),
        ]))
        .map_err(e)?;
        let memory = d.memory_info().map_err(e)?;
        let util = d.utilization_rates().map_err(e)?;
        Ok(GpuSample {
            temp_core_c: d.temperature(TemperatureSensor::Gpu).map_err(e)?,
            temp_memory_c: field_u32(fields.as_deref(), 1).map_err(e)?,
            thermal_margin_c: self.thermal_margin(&d).map_err(e)?,
            power_avg_mw: d.power_usage().map_err(e)?,
            power_instant_mw: field_u32(fields.as_deref(), 0).map_err(e)?,
            energy_mj: d.total_energy_consumption().map_err(e)?,
            power_limit_mw: d.power_management_limit().map_err(e)?,
            enforced_power_limit_mw: d.enforced_power_limit().map_err(e)?,
            util_gpu_pct: util.gpu,
            util_mem_pct: util.memory,
            sm_clock_mhz: d.clock_info(Clock::SM).map_err(e)?,
            mem_clock_mhz: d.clock_info(Clock::Memory).map_err(e)?,
            throttle: hearth_proto::gpu::ThrottleReasons(self.clock_event_reasons(&d).map_err(e)?),
            ecc: ecc_counters(&d).map_err(e)?,
            retired_pages: retired_pages(&d).map_err(e)?,
            remapped_rows: self.remapped_rows(&d).map_err(e)?,
            pcie: PcieLink {
                generation: d.current_pcie_link_gen().map_err(e)?,
                width: d.current_pcie_link_width().map_err(e)?,
                replay_counter: u64::from(
                    optional(d.pcie_replay_counter()).map_err(e)?.unwrap_or(0),
                ),
            },
            nvlink_active: nvlink_states(&d).map_err(e)?,
            fan_speed_pct: fan_speeds(&d).map_err(e)?,
            memory_used_bytes: memory.used,
            compute_processes: d.running_compute_processes_count().map_err(e)?,
        })
    }

    fn set_power_limit(&self, gpu: u32, mw: u32) -> Result<(), GpuError> {
        let op = "set power limit";
        let mut d = self.device(gpu)?;
        let c = d.power_management_limit_constraints().map_err(|e| map(gpu, op, e))?;
        if !(c.min_limit..=c.max_limit).contains(&mw) {
            return Err(GpuError::InvalidArgument {
                gpu,
                op,
                message: format!(
                    "power limit {mw} mW is outside the board's range: min {} mW, max {} mW",
                    c.min_limit, c.max_limit
                ),
            });
        }
        d.set_power_management_limit(mw).map_err(|e| map(gpu, op, e))
    }

    fn lock_clocks(&self, gpu: u32, min_mhz: u32, max_mhz: u32) -> Result<(), GpuError> {
        let op = "lock clocks";
        if min_mhz > max_mhz {
            return Err(GpuError::InvalidArgument {
                gpu,
                op,
                message: format!("clock range {min_mhz}..={max_mhz} MHz is not ordered"),
            });
        }
        let mut d = self.device(gpu)?;
        d.set_gpu_locked_clocks(GpuLockedClocksSetting::Numeric {
            min_clock_mhz: min_mhz,
            max_clock_mhz: max_mhz,
        })
        .map_err(|e| map(gpu, op, e))
    }

    fn reset_clocks(&self, gpu: u32) -> Result<(), GpuError> {
        let mut d = self.device(gpu)?;
        d.reset_gpu_locked_clocks().map_err(|e| map(gpu, "reset clocks", e))
    }

    fn set_fan_speed(&self, gpu: u32, fan: u32, pct: u32) -> Result<(), GpuError> {
        let op = "set fan speed";
        if pct > 100 {
            return Err(GpuError::InvalidArgument {
                gpu,
                op,
                message: format!("fan speed {pct} % is above 100 %"),
            });
        }
        let mut d = self.device(gpu)?;
        d.set_fan_speed(fan, pct).map_err(|e| map(gpu, op, e))
    }

    fn reset_fan_speed(&self, gpu: u32, fan: u32) -> Result<(), GpuError> {
        let mut d = self.device(gpu)?;
        d.set_default_fan_speed(fan).map_err(|e| map(gpu, "reset fan speed", e))
    }

    fn events(&self) -> Result<Box<dyn EventSource>, GpuError> {
        let unsupported = GpuError::NotSupported { gpu: DRIVER_WIDE, op: "event sets" };
        let (Some(create), Some(register), Some(wait), Some(free)) = (
            raw!(self.nvml, nvmlEventSetCreate),
            raw!(self.nvml, nvmlDeviceRegisterEvents),
            raw!(self.nvml, nvmlEventSetWait_v2),
            raw!(self.nvml, nvmlEventSetFree),
        ) else {
            return Err(unsupported);
        };
        let mut set: nvmlEventSet_t = std::ptr::null_mut();
        // SAFETY: `create` is the library's own `nvmlEventSetCreate`, NVML is initialised (the
        // `Nvml` lives in `self`), and `set` is a valid out-pointer.
        let code = unsafe { create(&mut set) };
        nvml_try(code).map_err(|e| map(DRIVER_WIDE, "create event set", e))?;
        // From here on, dropping `source` frees the set.
        let mut source = NvmlEvents {
            set,
            wait,
            free,
            get_index: raw!(self.nvml, nvmlDeviceGetIndex),
            devices: Vec::new(),
            _nvml: self.nvml.clone(),
        };
        for gpu in 0..self.gpu_count()? {
            let d = match self.device(gpu) {
                Ok(d) => d,
                Err(GpuError::GpuLost { .. }) => {
                    warn!(gpu, "GPU is lost; no events from it");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let wanted = match optional(d.supported_event_types()) {
                Ok(Some(supported)) => WANTED_EVENTS & supported,
                Ok(None) => EventTypes::empty(),
                Err(NvmlError::GpuLost) => {
                    warn!(gpu, "GPU is lost; no events from it");
                    continue;
                }
                Err(e) => return Err(map(gpu, "supported event types", e)),
            };
            if wanted.is_empty() {
                debug!(gpu, "GPU supports none of the XID and ECC events");
                continue;
            }
            let uuid = d.uuid().map_err(|e| map(gpu, "register events", e))?;
            // SAFETY: the raw handle of a device of this initialised `Nvml`; NVML handles stay
            // valid while the library is initialised, which `source._nvml` guarantees.
            let handle = unsafe { d.handle() };
            // SAFETY: `register` is the library's own `nvmlDeviceRegisterEvents`; `handle` and
            // `set` come from this library instance and the set is not freed yet.
            let code = unsafe { register(handle, wanted.bits(), set) };
            match nvml_try(code) {
                Ok(()) => {
                    debug!(gpu, events = ?wanted, "registered for events");
                    source.devices.push(Registered { handle, gpu, uuid });
                }
                Err(NvmlError::GpuLost) => warn!(gpu, "GPU is lost; no events from it"),
                Err(NvmlError::NotSupported) => debug!(gpu, "event registration not supported"),
                Err(e) => return Err(map(gpu, "register events", e)),
            }
        }
        Ok(Box::new(source))
    }

    fn compute_processes(&self, gpu: u32) -> Result<Vec<ComputeProcess>, GpuError> {
        let d = self.device(gpu)?;
        let list = d.running_compute_processes().map_err(|e| map(gpu, "compute processes", e))?;
        Ok(list
            .into_iter()
            .map(|p| ComputeProcess {
                pid: p.pid,
                used_memory_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => b,
                    UsedGpuMemory::Unavailable => 0,
                },
            })
            .collect())
    }

    fn nvlink_errors(&self, gpu: u32) -> Result<Vec<NvlinkErrorCounters>, GpuError> {
        let d = self.device(gpu)?;
        let e = |err| map(gpu, "NVLink error counters", err);
        let links = nvlink_states(&d).map_err(e)?.len();
        let mut out = Vec::with_capacity(links);
        for link in 0..u32::try_from(links).unwrap_or(0) {
            let w = d.link_wrapper_for(link);
            let read = |c| optional(w.error_counter(c)).map(Option::unwrap_or_default);
            out.push(NvlinkErrorCounters {
                replay: read(ErrorCounter::DlReplay).map_err(e)?,
                recovery: read(ErrorCounter::DlRecovery).map_err(e)?,
                crc_flit: read(ErrorCounter::DlCrcFlit).map_err(e)?,
                crc_data: read(ErrorCounter::DlCrcData).map_err(e)?,
            });
        }
        Ok(out)
    }

    fn persistence_mode(&self, gpu: u32) -> Result<Option<bool>, GpuError> {
        let d = self.device(gpu)?;
        optional(d.is_in_persistent_mode()).map_err(|e| map(gpu, "persistence mode", e))
    }
}

type WaitFn = unsafe extern "C" fn(nvmlEventSet_t, *mut nvmlEventData_t, c_uint) -> nvmlReturn_t;
type FreeFn = unsafe extern "C" fn(nvmlEventSet_t) -> nvmlReturn_t;
type IndexFn = unsafe extern "C" fn(nvmlDevice_t, *mut c_uint) -> nvmlReturn_t;

/// A GPU registered with the event set.
#[derive(Debug)]
struct Registered {
    handle: nvmlDevice_t,
    gpu: u32,
    uuid: String,
}

/// An NVML event set, driven through the raw API.
///
/// nvml-wrapper's `EventSet<'nvml>` borrows the `Nvml`, which a `Box<dyn EventSource>` cannot
/// carry; this owns an `Arc<Nvml>` instead, so the library stays loaded and initialised for as
/// long as the set exists, and frees the set in `Drop` before that `Arc` is released.
#[derive(Debug)]
struct NvmlEvents {
    set: nvmlEventSet_t,
    wait: WaitFn,
    free: FreeFn,
    get_index: Option<IndexFn>,
    devices: Vec<Registered>,
    /// Keeps NVML initialised while the set lives (a field: dropped after `Drop::drop` ran).
    _nvml: Arc<Nvml>,
}

// SAFETY: the raw pointers are opaque NVML handles (the event set and device handles), not
// memory this struct dereferences; NVML documents itself thread-safe, so using them from
// whichever thread owns the source is sound. The set is used through `&mut self` only, so no two
// threads use it at once (NVML: operations on one set are not thread-safe), and it stays valid
// because `self._nvml` keeps the library initialised until after `Drop` freed the set.
unsafe impl Send for NvmlEvents {}

impl NvmlEvents {
    /// The index and UUID behind an event's device handle.
    fn identify(&self, handle: nvmlDevice_t) -> (u32, String) {
        if let Some(r) = self.devices.iter().find(|r| r.handle == handle) {
            return (r.gpu, r.uuid.clone());
        }
        let mut index: c_uint = DRIVER_WIDE;
        if let Some(f) = self.get_index {
            // SAFETY: `f` is the library's own `nvmlDeviceGetIndex`; `handle` came from the
            // library's event data and `index` is a valid local.
            let code = unsafe { f(handle, &mut index) };
            if code != 0 {
                index = DRIVER_WIDE;
            }
        }
        let uuid = self
            .devices
            .iter()
            .find(|r| r.gpu == index)
            .map(|r| r.uuid.clone())
            .unwrap_or_default();
        (index, uuid)
    }
}

impl EventSource for NvmlEvents {
    fn wait(&mut self, timeout: Duration) -> Result<Option<GpuEvent>, GpuError> {
        if self.devices.is_empty() {
            // No GPU to hear from: behave like a set on which nothing happens.
            std::thread::sleep(timeout);
            return Ok(None);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Round up: never wake before the deadline.
            let ms = c_uint::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(c_uint::MAX);
            let mut data = nvmlEventData_t {
                device: std::ptr::null_mut(),
                eventType: 0,
                eventData: 0,
                gpuInstanceId: 0,
                computeInstanceId: 0,
            };
            // SAFETY: `self.wait` is the library's own `nvmlEventSetWait_v2`; `self.set` is a live
            // set of that library (freed only in `Drop`), NVML is initialised (`self._nvml`), and
            // `data` is a valid out-struct.
            let code = unsafe { (self.wait)(self.set, &mut data, ms) };
            match nvml_try(code) {
                Ok(()) => {}
                // NVML may also time out early ("when an interrupt arrives"): wait on.
                Err(NvmlError::Timeout) if Instant::now() < deadline => continue,
                Err(NvmlError::Timeout) => return Ok(None),
                Err(NvmlError::GpuLost) => {
                    return Err(GpuError::GpuLost { gpu: self.identify(data.device).0 });
                }
                Err(e) => {
                    return Err(GpuError::Call {
                        gpu: DRIVER_WIDE,
                        op: "wait for events",
                        source: Box::new(e),
                    });
                }
            }
            let kind = match data.eventType {
                t if t == u64::from(nvmlEventTypeXidCriticalError) => {
                    GpuEventKind::Xid(data.eventData)
                }
                t if t == u64::from(nvmlEventTypeSingleBitEccError) => GpuEventKind::SingleBitEcc,
                t if t == u64::from(nvmlEventTypeDoubleBitEccError) => GpuEventKind::DoubleBitEcc,
                other => {
                    debug!(event_type = other, "ignoring an event type not registered for");
                    if left.is_zero() {
                        return Ok(None);
                    }
                    continue;
                }
            };
            let (gpu, uuid) = self.identify(data.device);
            return Ok(Some(GpuEvent { gpu, uuid, kind }));
        }
    }
}

impl Drop for NvmlEvents {
    fn drop(&mut self) {
        // SAFETY: `self.free` is the library's own `nvmlEventSetFree`; the set was created by
        // that library, is freed only here, and NVML is still initialised: `self._nvml` is
        // released after this body returns.
        let code = unsafe { (self.free)(self.set) };
        if let Err(e) = nvml_try(code) {
            debug!(error = %e, "freeing the NVML event set failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_struct_version_is_nvml_h_s() {
        // nvml.h: nvmlMarginTemperature_v1 = NVML_STRUCT_VERSION(MarginTemperature, 1) = 0x1000008.
        assert_eq!(MARGIN_TEMPERATURE_V1, 0x0100_0008);
    }

    #[test]
    fn field_ids_are_nvml_h_s() {
        assert_eq!(NVML_FI_DEV_POWER_INSTANT, 186);
        assert_eq!(NVML_FI_DEV_MEMORY_TEMP, 82);
    }

    #[test]
    fn errors_map_to_gpu_errors() {
        assert!(matches!(map(3, "x", NvmlError::GpuLost), GpuError::GpuLost { gpu: 3 }));
        assert!(matches!(
            map(3, "x", NvmlError::NoPermission),
            GpuError::NoPermission { gpu: 3, op: "x" }
        ));
        assert!(matches!(map(3, "x", NvmlError::InvalidArg), GpuError::InvalidArgument { .. }));
        assert!(matches!(map(3, "x", NvmlError::NotSupported), GpuError::NotSupported { .. }));
        assert!(matches!(map(3, "x", NvmlError::Unknown), GpuError::Call { gpu: 3, .. }));
    }

    #[test]
    fn unsupported_and_missing_symbols_are_absent_values() {
        assert_eq!(optional::<u32>(Err(NvmlError::NotSupported)).ok(), Some(None));
        assert_eq!(optional::<u32>(Err(NvmlError::FunctionNotFound)).ok(), Some(None));
        assert_eq!(
            optional::<u32>(Err(NvmlError::FailedToLoadSymbol("nvmlX".into()))).ok(),
            Some(None)
        );
        assert!(matches!(optional::<u32>(Err(NvmlError::GpuLost)), Err(NvmlError::GpuLost)));
        assert_eq!(optional(Ok(5u32)).ok(), Some(Some(5)));
    }

    #[test]
    fn a_missing_library_is_library_not_found() {
        let e = NvmlBackend::open(Path::new("/nonexistent/libnvidia-ml.so.1"));
        assert!(
            matches!(&e, Err(GpuError::LibraryNotFound { path, .. }) if path.contains("nonexistent")),
            "{e:?}"
        );
    }
}
