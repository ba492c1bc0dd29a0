//! Faults the simulator can inject, and workload profiles.

use serde::{Deserialize, Serialize};

/// What a GPU is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Nothing: idle power, GPU_IDLE reason, clocks down.
    #[default]
    Idle,
    /// Compute-bound training: full utilisation, power rises with clock (work ∝ clock).
    Training,
    /// Memory-bound inference: high memory utilisation, moderate power; work barely falls with clock.
    Inference,
}

/// A fault injected into one GPU (scenario file or `hearth-agent sim inject`).
///
/// JSON/TOML shape: `{ "fault": "xid", "xid": 79 }`, `{ "fault": "cooling_failure", "ambient_rise_c": 15.0 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "fault", deny_unknown_fields)]
pub enum Fault {
    /// An XID error with this number (an event; 79 also drops the GPU off the bus, 48 also counts a DBE).
    Xid {
        /// XID number.
        xid: u64,
    },
    /// One double-bit (uncorrected) ECC error: event, counters, XID 48 and a pending row remap.
    DoubleBitEcc,
    /// A storm of single-bit ECC errors: `per_second` corrected errors for `duration_s` seconds.
    SingleBitEccStorm {
        /// Corrected errors per simulated second.
        per_second: u32,
        /// How long the storm lasts, simulated seconds.
        duration_s: f64,
    },
    /// A burst of PCIe replays: `per_second` for `duration_s` seconds (a marginal link).
    PcieReplayStorm {
        /// Replays per simulated second.
        per_second: u32,
        /// How long the burst lasts, simulated seconds.
        duration_s: f64,
    },
    /// A burst of NVLink replay errors on one link: `per_second` for `duration_s` seconds.
    NvlinkErrors {
        /// Link index.
        link: u32,
        /// Errors per simulated second.
        per_second: u32,
        /// How long the burst lasts, simulated seconds.
        duration_s: f64,
    },
    /// A row remap waits for a GPU reset.
    RowRemapPending,
    /// A row remap failed (no spare rows): XID 64.
    RowRemapFailure,
    /// The PCIe link trains down to this generation and width.
    PcieDowntrain {
        /// Link generation after the downtrain.
        generation: u32,
        /// Link width after the downtrain.
        width: u32,
    },
    /// One NVLink link goes inactive: XID 74.
    NvlinkDown {
        /// Link index.
        link: u32,
    },
    /// The GPU falls off the bus: XID 79, then every read answers GPU_IS_LOST.
    FallenOffBus,
    /// Cooling fails: the inlet (ambient) temperature rises by this much over ~30 s.
    CoolingFailure {
        /// Inlet temperature rise, °C.
        ambient_rise_c: f64,
    },
    /// A BMC enforces a power limit below the requested one.
    BmcPowerLimit {
        /// The BMC's limit in watts.
        watts: u32,
    },
    /// Remove every active fault from the GPU except a lost GPU: cooling failure (the inlet
    /// ramps back), BMC limit, PCIe downtrain, NVLink down, ECC, PCIe-replay and NVLink-error
    /// bursts, pending and failed row remaps. Counters and settings (power limit, clock lock, fans, workload) stay.
    Clear,
}
