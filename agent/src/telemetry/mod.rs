//! Telemetry: the node's `/metrics` and the offline summaries (`docs/0007-telemetry.md`).
//!
//! - [`node::render`] builds the node's exposition from the agent's current state: GPU series
//!   under dcgm-exporter's names, types and labels (`gpu`, `UUID`, `pci_bus_id`, `device`,
//!   `modelName`, `Hostname`), and `hearth_*` series (XID history, health verdicts, power budget
//!   and caps, control session and tunnel, agent self-metrics). Encoded by
//!   [`hearth_proto::exposition`] in OpenMetrics or the Prometheus text format.
//! - [`server::MetricsServer`] (the `metrics` subsystem) serves it on `[metrics] listen`
//!   (127.0.0.1:9400 by default, like dcgm-exporter); the local API serves the same at
//!   `/metrics`, so the fleet reaches it through the tunnel.
//! - [`LinkStats`]: counters the control session and the tunnel bump (bytes, streams,
//!   reconnects), read at each scrape.
//! - [`process`]: the agent's own RSS and CPU time (`/proc/self`, behind a trait).
//! - [`offline`]: 10 s summaries kept in a bounded ring and an append-only checksummed file
//!   while the node is disconnected, uploaded on reconnect.

pub mod node;
pub mod offline;
pub mod process;
pub mod server;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters of the control session and the tunnel, bumped where the bytes move and read at each
/// scrape. Shared through the [`crate::agent::Agent`].
#[derive(Debug, Default)]
pub struct LinkStats {
    /// The control session is open.
    pub session_up: AtomicBool,
    /// Control sessions opened since start (the first and every reconnection).
    pub session_opens: AtomicU64,
    /// Control frame bytes sent (header and payload).
    pub session_bytes_sent: AtomicU64,
    /// Control frame bytes received.
    pub session_bytes_received: AtomicU64,
    /// Heartbeats sent.
    pub heartbeats_sent: AtomicU64,
    /// The tunnel connection is up.
    pub tunnel_up: AtomicBool,
    /// Tunnel connections made since start.
    pub tunnel_connects: AtomicU64,
    /// Tunnel streams the fleet opened.
    pub tunnel_streams: AtomicU64,
    /// Tunnel streams open now.
    pub tunnel_streams_active: AtomicU64,
    /// Bytes relayed from the fleet to the node's targets (counted as each stream ends).
    pub tunnel_bytes_in: AtomicU64,
    /// Bytes relayed from the node's targets to the fleet (counted as each stream ends).
    pub tunnel_bytes_out: AtomicU64,
}

impl LinkStats {
    /// Add to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The bytes of one control message as framed on the wire.
    pub fn frame_len(msg: &hearth_proto::control::ControlMessage) -> u64 {
        msg.encode().map_or(0, |b| (b.len() + hearth_proto::frame::HEADER_LEN) as u64)
    }
}

/// Why `promtool check metrics` could not vouch for an exposition.
#[derive(Debug, thiserror::Error)]
pub enum PromtoolError {
    /// promtool is not installed (Debian package `prometheus`).
    #[error("promtool is not installed (apt-get install prometheus)")]
    Missing,
    /// promtool could not parse the exposition.
    #[error("promtool cannot parse the exposition: {output}")]
    Parse {
        /// What it said.
        output: String,
    },
    /// Running it failed.
    #[error("cannot run promtool")]
    Io(#[source] std::io::Error),
}

/// Run `promtool check metrics` on an exposition (0.0.4 text). Returns its lint findings, one a
/// line (empty: clean); a parse error is an error.
pub fn promtool_check(text: &str) -> Result<Vec<String>, PromtoolError> {
    use std::io::Write as _;
    let mut child = match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(PromtoolError::Missing),
        Err(e) => return Err(PromtoolError::Io(e)),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).map_err(PromtoolError::Io)?;
    }
    let out = child.wait_with_output().map_err(PromtoolError::Io)?;
    let output =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if output.contains("error while linting") || output.contains("parsing error") {
        return Err(PromtoolError::Parse { output });
    }
    Ok(output.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect())
}
