//! The conformance suite on the `sim` backend, in process: each case on a fresh [`SimHost`]
//! (manual clock) built from the case's scenario, the host itself as the control. No global
//! state, so these run as threads of one process under plain `cargo test` too.

use std::sync::Arc;

use hearth_agent::gpu::sim::SimBackend;
use hearth_hw_tests::conformance::{self, SimControl};
use hearth_sim::{SimClock, SimHost};

fn run(name: &str) -> anyhow::Result<()> {
    let case = conformance::case(name)?;
    let host = Arc::new(SimHost::new(&case.scenario()?, SimClock::Manual));
    let backend = SimBackend::new(host.clone());
    (case.run)(&backend, host.as_ref())
}

hearth_hw_tests::conformance_tests!(run);

/// Two sim backends on the same scenario agree at every checkpoint (the determinism the
/// sim-versus-NVML equality test builds on).
#[test]
fn equality_sim_vs_sim() -> anyhow::Result<()> {
    let scenario = conformance::equality_scenario()?;
    let a = Arc::new(SimHost::new(&scenario, SimClock::Manual));
    let b = Arc::new(SimHost::new(&scenario, SimClock::Manual));
    let (ba, bb) = (SimBackend::new(a.clone()), SimBackend::new(b.clone()));
    conformance::equality((&ba, a.as_ref() as &dyn SimControl), (&bb, b.as_ref()))
}
