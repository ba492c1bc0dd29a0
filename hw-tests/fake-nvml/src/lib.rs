//! `hearth-fake-nvml`: a fake `libnvidia-ml.so` backed by [`hearth_sim`].
//!
//! Built as a `cdylib` (`libhearth_fake_nvml.so`), it exports, with NVML's C ABI, every NVML
//! function Hearth's `nvml` backend calls (through nvml-wrapper) plus the ones nvml-wrapper's
//! init path needs: point the backend (or any NVML client) at the `.so` and it sees simulated
//! GPUs. The list is in [`EXPORTED_SYMBOLS`]; struct layouts and return codes come from
//! `nvml-wrapper-sys`'s bindings, and every export is checked at compile time against the
//! binding's function-pointer type (`exports::signatures_match_bindings`).
//!
//! # Configuration (environment, read once, at the first `nvmlInit`)
//!
//! | variable | meaning |
//! |---|---|
//! | [`ENV_SCENARIO`] | scenario TOML path; unset: 8× H100 SXM running training |
//! | [`ENV_CLOCK`] | `manual` (default: only `advance` moves time) or a scale (`1`, `10`) of real time |
//! | [`ENV_CONTROL`] | Unix socket path the library binds for control requests ([`control`]) |
//! | [`ENV_DRIVER`] | `unloaded` makes `nvmlInit` answer `NVML_ERROR_DRIVER_NOT_LOADED` |
//!
//! A bad value (unreadable or invalid scenario, bad clock, socket that cannot be bound) makes
//! every `nvmlInit` answer `NVML_ERROR_UNKNOWN`; the reason goes to stderr once.
//!
//! # Semantics
//!
//! NVML's units: mW, mJ (energy since "driver load", i.e. since the simulation started), °C,
//! MHz, bytes. Return codes follow NVML's documentation: `NVML_ERROR_UNINITIALIZED` before
//! `nvmlInit` (reference-counted like NVML's), `NVML_ERROR_INVALID_ARGUMENT` for a null pointer,
//! an unknown handle or index, `NVML_ERROR_INSUFFICIENT_SIZE` for a short buffer,
//! `NVML_ERROR_GPU_IS_LOST` for a GPU that fell off the bus (including
//! `nvmlDeviceGetHandleByIndex_v2`, as a real driver answers for a lost GPU),
//! `NVML_ERROR_NOT_SUPPORTED` for what the board lacks (fan speed on SXM boards, ECC, row
//! remapping and ECC events on the GeForce profile, NVLink on PCIe cards, memory temperature
//! where the profile has none, page retirement everywhere: the simulated boards remap rows).
//! `NVML_ERROR_NO_PERMISSION` is never returned: the fake runs as any user and every setter
//! works without root. Panics never cross the C boundary: they become `NVML_ERROR_UNKNOWN`.
//!
//! The simulation is process-global, like a driver: each test that needs its own scenario runs in
//! its own process. The rlib side holds the control client ([`control::ControlClient`]) and
//! [`locate::library`], which tests use to find the built `.so`.

pub mod control;
mod driver;
mod exports;
pub mod locate;

pub use exports::EXPORTED_SYMBOLS;

/// Scenario file (TOML, `hearth_sim::Scenario`); unset: 8× `h100-sxm` running training.
pub const ENV_SCENARIO: &str = "HEARTH_FAKE_NVML_SCENARIO";
/// `manual` (default) or a positive scale of real time such as `1` or `10`.
pub const ENV_CLOCK: &str = "HEARTH_FAKE_NVML_CLOCK";
/// Path of the Unix stream socket the library binds at init for control requests.
pub const ENV_CONTROL: &str = "HEARTH_FAKE_NVML_CONTROL";
/// `loaded` (default) or `unloaded` (then `nvmlInit` fails with `DRIVER_NOT_LOADED`).
pub const ENV_DRIVER: &str = "HEARTH_FAKE_NVML_DRIVER";
/// Overrides where tests look for the built library ([`locate::library`]).
pub const ENV_LIBRARY: &str = "HEARTH_FAKE_NVML_LIB";
/// File name of the built library.
pub const LIBRARY_FILE_NAME: &str = "libhearth_fake_nvml.so";
