//! The fake driver's process-global state: the simulated host, the init reference count, device
//! and event-set handles.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use hearth_proto::gpu::{GpuEvent, GpuEventKind, GpuInventory, GpuSample};
use hearth_sim::{GpuProfile, Scenario, SimClock, SimError, SimHost, SimNode, Workload};
use nvml_wrapper_sys::bindings::{
    nvmlDevice_st, nvmlDevice_t, nvmlEventSet_st, nvmlEventSet_t, nvmlEventTypeDoubleBitEccError,
    nvmlEventTypeSingleBitEccError, nvmlEventTypeXidCriticalError,
};

use crate::{ENV_CLOCK, ENV_CONTROL, ENV_DRIVER, ENV_SCENARIO};

/// NVML return codes, by their short names.
pub(crate) mod rc {
    pub(crate) use b::nvmlReturn_t as Code;
    use nvml_wrapper_sys::bindings as b;

    pub(crate) const SUCCESS: Code = b::nvmlReturn_enum_NVML_SUCCESS;
    pub(crate) const UNINITIALIZED: Code = b::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED;
    pub(crate) const INVALID_ARGUMENT: Code = b::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
    pub(crate) const NOT_SUPPORTED: Code = b::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
    pub(crate) const INSUFFICIENT_SIZE: Code = b::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
    pub(crate) const DRIVER_NOT_LOADED: Code = b::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED;
    pub(crate) const TIMEOUT: Code = b::nvmlReturn_enum_NVML_ERROR_TIMEOUT;
    pub(crate) const GPU_IS_LOST: Code = b::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST;
    pub(crate) const ARGUMENT_VERSION_MISMATCH: Code =
        b::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    pub(crate) const UNKNOWN: Code = b::nvmlReturn_enum_NVML_ERROR_UNKNOWN;
}

use rc::Code;

/// The most GPUs a scenario can have (`hearth_sim::Scenario::validate`).
pub(crate) const MAX_GPUS: usize = 64;

/// Event types the fake can deliver (the simulator logs XIDs and ECC errors).
pub(crate) const XID: u64 = nvmlEventTypeXidCriticalError as u64;
pub(crate) const SBE: u64 = nvmlEventTypeSingleBitEccError as u64;
pub(crate) const DBE: u64 = nvmlEventTypeDoubleBitEccError as u64;

/// Map a simulator error onto NVML's return code.
pub(crate) fn code(e: SimError) -> Code {
    match e {
        SimError::NoSuchGpu { .. } | SimError::InvalidArgument { .. } => rc::INVALID_ARGUMENT,
        SimError::GpuLost { .. } => rc::GPU_IS_LOST,
        SimError::NotSupported { .. } => rc::NOT_SUPPORTED,
    }
}

/// The loaded "driver": the simulated host and what the fake needs beside it.
#[derive(Debug)]
pub(crate) struct Driver {
    pub(crate) host: Arc<SimHost>,
    /// Board profile of each GPU, in index order (ECC support, PCI ids).
    pub(crate) profiles: Vec<GpuProfile>,
    /// Open event sets by handle value.
    pub(crate) event_sets: Mutex<BTreeMap<usize, EventSet>>,
}

/// Why the driver cannot be loaded.
#[derive(Debug)]
pub(crate) enum LoadError {
    /// `HEARTH_FAKE_NVML_DRIVER=unloaded`.
    Unloaded,
    /// A bad configuration; the message went to stderr.
    Config,
}

static DRIVER: OnceLock<Result<Driver, LoadError>> = OnceLock::new();
/// `nvmlInit` calls not yet matched by `nvmlShutdown`.
static INIT_REFS: Mutex<u32> = Mutex::new(0);

fn refs() -> MutexGuard<'static, u32> {
    INIT_REFS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `nvmlInit*`: load the driver on first use (once per process), then count a reference.
pub(crate) fn init() -> Code {
    match DRIVER.get_or_init(load) {
        Ok(_) => {
            let mut n = refs();
            *n = n.saturating_add(1);
            rc::SUCCESS
        }
        Err(LoadError::Unloaded) => rc::DRIVER_NOT_LOADED,
        Err(LoadError::Config) => rc::UNKNOWN,
    }
}

/// `nvmlShutdown`: drop a reference. The simulation keeps running (a driver stays loaded when its
/// clients shut NVML down); a later `nvmlInit` sees the same GPUs.
pub(crate) fn shutdown() -> Code {
    let mut n = refs();
    if *n == 0 {
        return rc::UNINITIALIZED;
    }
    *n -= 1;
    rc::SUCCESS
}

/// The driver, if NVML is initialised.
pub(crate) fn driver() -> Result<&'static Driver, Code> {
    if *refs() == 0 {
        return Err(rc::UNINITIALIZED);
    }
    match DRIVER.get() {
        Some(Ok(d)) => Ok(d),
        _ => Err(rc::UNINITIALIZED),
    }
}

fn load() -> Result<Driver, LoadError> {
    match std::env::var(ENV_DRIVER).as_deref() {
        Err(_) | Ok("") | Ok("loaded") => {}
        Ok("unloaded") => return Err(LoadError::Unloaded),
        Ok(other) => {
            report(&format!("{ENV_DRIVER}={other:?}: expected `loaded` or `unloaded`"));
            return Err(LoadError::Config);
        }
    }
    load_config().map_err(|message| {
        report(&message);
        LoadError::Config
    })
}

/// The one line a bad configuration prints (library code has no logger of its own to use).
fn report(message: &str) {
    let _ = writeln!(std::io::stderr(), "hearth-fake-nvml: nvmlInit fails: {message}");
}

fn load_config() -> Result<Driver, String> {
    let scenario = match std::env::var_os(ENV_SCENARIO) {
        Some(path) if !path.is_empty() => {
            let path = PathBuf::from(path);
            Scenario::load(&path).map_err(|e| format!("{ENV_SCENARIO}: {}", error_chain(&e)))?
        }
        _ => Scenario::uniform("h100-sxm", 8, Workload::Training),
    };
    let clock = parse_clock(std::env::var(ENV_CLOCK).ok().as_deref())?;
    let profiles: Vec<GpuProfile> = scenario.expanded().into_iter().map(|(p, _)| p).collect();
    if profiles.is_empty() || profiles.len() > MAX_GPUS {
        return Err(format!("{ENV_SCENARIO}: {} GPUs; expected 1..={MAX_GPUS}", profiles.len()));
    }
    let host = Arc::new(SimHost::new(&scenario, clock));
    if let Some(path) = std::env::var_os(ENV_CONTROL).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        crate::control::serve(&path, host.clone())
            .map_err(|e| format!("{ENV_CONTROL}: cannot bind {}: {e}", path.display()))?;
    }
    Ok(Driver { host, profiles, event_sets: Mutex::new(BTreeMap::new()) })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Parse `HEARTH_FAKE_NVML_CLOCK`.
pub(crate) fn parse_clock(value: Option<&str>) -> Result<SimClock, String> {
    match value.map(str::trim) {
        None | Some("") | Some("manual") => Ok(SimClock::Manual),
        Some(v) => match v.parse::<f64>() {
            Ok(scale) if scale.is_finite() && scale > 0.0 => Ok(SimClock::Real { scale }),
            _ => Err(format!("{ENV_CLOCK}={v:?}: expected `manual` or a positive scale such as 1")),
        },
    }
}

impl Driver {
    /// Lock the simulated node (advancing it on a real clock).
    pub(crate) fn node(&self) -> MutexGuard<'_, SimNode> {
        self.host.lock()
    }

    pub(crate) fn count(&self) -> u32 {
        u32::try_from(self.profiles.len()).unwrap_or(u32::MAX)
    }

    /// The GPU behind a device handle.
    pub(crate) fn index_of(&self, device: nvmlDevice_t) -> Result<u32, Code> {
        device_index(device).filter(|&i| i < self.count()).ok_or(rc::INVALID_ARGUMENT)
    }

    pub(crate) fn profile(&self, gpu: u32) -> Result<&GpuProfile, Code> {
        self.profiles.get(gpu as usize).ok_or(rc::INVALID_ARGUMENT)
    }

    pub(crate) fn inventory(&self, gpu: u32) -> Result<GpuInventory, Code> {
        self.node().inventory(gpu).map_err(code)
    }

    pub(crate) fn sample(&self, gpu: u32) -> Result<GpuSample, Code> {
        self.node().sample(gpu).map_err(code)
    }

    /// Event types a GPU can deliver: XIDs, and ECC errors on ECC boards.
    pub(crate) fn supported_events(&self, gpu: u32) -> Result<u64, Code> {
        Ok(if self.profile(gpu)?.ecc { XID | SBE | DBE } else { XID })
    }

    pub(crate) fn event_sets(&self) -> MutexGuard<'_, BTreeMap<usize, EventSet>> {
        self.event_sets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Addresses that serve as device handles: handle `i` points at byte `i`. Never dereferenced.
static DEVICE_HANDLES: [u8; MAX_GPUS] = [0; MAX_GPUS];

/// The handle of GPU `gpu`.
pub(crate) fn device_handle(gpu: u32) -> nvmlDevice_t {
    DEVICE_HANDLES.as_ptr().wrapping_add(gpu as usize).cast_mut().cast::<nvmlDevice_st>()
}

/// The index behind a handle, if it is one of ours.
pub(crate) fn device_index(device: nvmlDevice_t) -> Option<u32> {
    let offset = device.addr().wrapping_sub(DEVICE_HANDLES.as_ptr().addr());
    (offset < MAX_GPUS).then(|| u32::try_from(offset).ok()).flatten()
}

/// Base of event-set handle values (a recognisable, never dereferenced address).
const EVENT_SET_BASE: usize = 0x4e56_0000;
static NEXT_EVENT_SET: AtomicUsize = AtomicUsize::new(1);

/// A fresh event-set handle value.
pub(crate) fn new_event_set_handle() -> nvmlEventSet_t {
    let id = NEXT_EVENT_SET.fetch_add(1, Ordering::Relaxed);
    std::ptr::without_provenance_mut::<nvmlEventSet_st>(EVENT_SET_BASE + id * 16)
}

/// One event set: the GPUs registered with it and its cursor in the simulator's event log.
#[derive(Debug)]
pub(crate) struct EventSet {
    /// Registered event-type mask per GPU.
    pub(crate) masks: BTreeMap<u32, u64>,
    /// Last event sequence number looked at.
    pub(crate) cursor: u64,
    /// Events read from the log and not yet delivered: GPU, NVML event type, event data.
    pub(crate) pending: VecDeque<(u32, u64, u64)>,
}

impl EventSet {
    /// A set that sees only events logged from now on.
    pub(crate) fn new(node: &SimNode) -> Self {
        let (_, newest) = node.events_since(u64::MAX);
        Self { masks: BTreeMap::new(), cursor: newest, pending: VecDeque::new() }
    }

    /// Move the events logged since the cursor into `pending`, keeping those registered for.
    pub(crate) fn drain(&mut self, node: &SimNode) {
        let (events, newest) = node.events_since(self.cursor);
        self.cursor = newest;
        for GpuEvent { gpu, kind, .. } in events {
            let (kind, data) = match kind {
                GpuEventKind::Xid(xid) => (XID, xid),
                GpuEventKind::SingleBitEcc => (SBE, 0),
                GpuEventKind::DoubleBitEcc => (DBE, 0),
            };
            if self.masks.get(&gpu).is_some_and(|m| m & kind != 0) {
                self.pending.push_back((gpu, kind, data));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_values() {
        assert_eq!(parse_clock(None), Ok(SimClock::Manual));
        assert_eq!(parse_clock(Some("manual")), Ok(SimClock::Manual));
        assert_eq!(parse_clock(Some(" 10 ")), Ok(SimClock::Real { scale: 10.0 }));
        assert!(parse_clock(Some("0")).is_err());
        assert!(parse_clock(Some("-1")).is_err());
        assert!(parse_clock(Some("fast")).is_err());
        assert!(parse_clock(Some("inf")).is_err());
    }

    #[test]
    fn device_handles_round_trip() {
        for i in [0, 1, 7, 63] {
            assert_eq!(device_index(device_handle(i)), Some(i));
        }
        assert_eq!(device_index(std::ptr::null_mut()), None);
        assert_eq!(device_index(device_handle(64)), None);
        assert_eq!(device_index(std::ptr::without_provenance_mut(0x10)), None);
    }

    #[test]
    fn event_set_handles_are_distinct_and_non_null() {
        let a = new_event_set_handle();
        let b = new_event_set_handle();
        assert!(!a.is_null());
        assert_ne!(a, b);
    }
}
