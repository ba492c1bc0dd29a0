//! `hearth-hw-tests`: tests of Hearth's GPU layer against simulated, fake and real GPUs.
//!
//! - [`conformance`]: one suite of GPU-backend cases, generic over `&dyn GpuBackend` plus a
//!   [`conformance::SimControl`] that moves simulated time and injects faults. It runs on the
//!   `sim` backend in process (`tests/conformance_sim.rs`) and on the `nvml` backend over the fake
//!   `libnvidia-ml.so` (`fake-nvml/tests/conformance_fake.rs`), and its strongest case checks that
//!   both backends return identical inventories and samples for the same scenario.
//! - [`isolate`]: run one test in a fresh process (NVML, and so the fake library, is
//!   process-global), correct under both `cargo nextest` and plain `cargo test`.
//! - `tests/real_gpu.rs`: the read-only suite for a machine with an NVIDIA driver.
//!
//! Code tour and commands: `hw-tests/README.md`.

pub mod conformance;
pub mod isolate;
