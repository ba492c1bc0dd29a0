//! The local API: HTTP/1.1 + JSON under `/v1` on a Unix socket (`docs/api.md`).
//!
//! [`server`] serves it (the `api` subsystem); [`client`] is what every `hearth-agent`
//! subcommand uses. The tunnel carries the same router later.

pub mod client;
pub mod server;

use hearth_sim::{Fault, Workload};
use serde::{Deserialize, Serialize};

/// `POST /v1/sim/inject`: inject a fault into a simulated GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimInjectRequest {
    /// GPU index.
    pub gpu: u32,
    /// The fault (`{"fault": "xid", "xid": 79}`).
    pub fault: Fault,
}

/// `POST /v1/sim/workload`: change what a simulated GPU runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimWorkloadRequest {
    /// GPU index.
    pub gpu: u32,
    /// The workload.
    pub workload: Workload,
}

/// `GET /v1/sim`: the simulated node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimInfo {
    /// Simulated seconds since start.
    pub sim_time_s: f64,
    /// Simulated seconds per wall-clock second (`None`: manual clock).
    pub time_scale: Option<f64>,
    /// Number of GPUs.
    pub gpus: u32,
}

/// Answer of a successful action (`POST`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// What was done, in words.
    pub done: String,
}
