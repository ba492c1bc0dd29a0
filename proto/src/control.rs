//! The control session's messages: one versioned enum, [`ControlMessage`], carried one per
//! [`crate::frame::FrameType::Control`] frame on stream 0 and encoded with `postcard`.
//!
//! postcard is a compact, documented, stable serde format (varint integers, no field names, no
//! self-description), so a heartbeat is a few dozen bytes, and its decoder never allocates more
//! than the input allows. New variants and fields are added only at the end, with a protocol
//! version bump; [`negotiate`] lets the fleet accept nodes one version older so a rollout can mix
//! versions. The sequence (Hello → Welcome, then heartbeats, desired state and commands):
//! `docs/protocol.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::NodeState;

/// The control protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// The ALPN protocol id of the node session on the fleet's TLS port.
pub const ALPN: &[u8] = b"hearth/1";

/// Seconds between two heartbeats.
pub const HEARTBEAT_INTERVAL_S: u32 = 10;

/// Heartbeats a node may miss before the fleet shows it offline.
pub const MISSED_HEARTBEATS_OFFLINE: u32 = 3;

/// Why a peer's protocol version is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// The node is more than one version older than the fleet.
    #[error("protocol version {node} is too old (this fleet speaks {fleet} and accepts {oldest})")]
    TooOld {
        /// The node's version.
        node: u16,
        /// The fleet's version.
        fleet: u16,
        /// The oldest it accepts.
        oldest: u16,
    },
    /// The node is newer than the fleet (fleets are upgraded first).
    #[error("protocol version {node} is newer than this fleet's {fleet}: upgrade the fleet first")]
    TooNew {
        /// The node's version.
        node: u16,
        /// The fleet's version.
        fleet: u16,
    },
}

/// The version a fleet speaking `fleet` uses with a node speaking `node`: the node's own, if it is
/// the fleet's or one older.
pub fn negotiate(fleet: u16, node: u16) -> Result<u16, VersionError> {
    let oldest = fleet.saturating_sub(1).max(1);
    if node > fleet {
        Err(VersionError::TooNew { node, fleet })
    } else if node < oldest {
        Err(VersionError::TooOld { node, fleet, oldest })
    } else {
        Ok(node)
    }
}

/// Every message of the control session. Append-only: a variant's index is its wire tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// Node → fleet, first message.
    Hello(Hello),
    /// Fleet → node: session accepted.
    Welcome(Welcome),
    /// Fleet → node: session refused (then the fleet closes the connection).
    Refused(Refusal),
    /// Node → fleet, every [`HEARTBEAT_INTERVAL_S`].
    Heartbeat(Heartbeat),
    /// Fleet → node: heartbeat `seq` recorded.
    HeartbeatAck {
        /// The heartbeat's sequence number.
        seq: u64,
    },
    /// Fleet → node: the desired state changed (or, after Welcome, is this).
    Desired(DesiredState),
    /// Fleet → node: do something once.
    Command(Command),
    /// Node → fleet: what became of a command.
    CommandAck(CommandAck),
    /// Node → fleet: something to record in the fleet's event log (a health verdict change, a
    /// reboot request). Added at the end of the enum so older messages keep their encoding.
    Event(NodeEvent),
    /// Node → fleet: 10 s summaries recorded while the node was disconnected, oldest first
    /// (`docs/0007-telemetry.md`). Appended at the end of the enum.
    Summaries(Vec<Summary>),
    /// Fleet → node: every summary up to `seq` is stored; the node may forget them.
    SummariesAck {
        /// The highest summary sequence number stored.
        seq: u64,
    },
    /// Node → fleet: the update's phase or progress changed (`docs/0009-updates.md`). Added at
    /// the end of the enum (after the summaries) so older messages keep their encoding.
    Update(UpdateReport),
}

/// One GPU over one summary interval.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSummary {
    /// NVML index.
    pub index: u32,
    /// Samples taken in the interval.
    pub samples: u32,
    /// Mean core temperature, °C.
    pub temp_avg_c: u32,
    /// Highest core temperature, °C.
    pub temp_max_c: u32,
    /// Mean power draw, W.
    pub power_avg_w: u32,
    /// Highest power draw, W.
    pub power_max_w: u32,
    /// Mean utilisation, %.
    pub util_avg_pct: u32,
}

/// What the node saw over one summary interval (10 s) while disconnected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Rises by one per summary, across restarts (it is persisted with the summaries).
    pub seq: u64,
    /// Start of the interval, ms since the Unix epoch.
    pub start_ms: u64,
    /// Length of the interval, ms.
    pub duration_ms: u32,
    /// Node state at the end of the interval.
    pub state: Option<NodeState>,
    /// Per GPU.
    pub gpus: Vec<GpuSummary>,
}

/// Where a node's update is, for the fleet: sent when the phase changes and at every tenth of
/// the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReport {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// `downloading`, `writing`, `installed`, `rebooting`, `trial`, `check_failed`, `blessed`,
    /// `rolled_back`, `failed`.
    pub phase: String,
    /// The release being installed.
    pub version: Option<String>,
    /// The version it replaces.
    pub from_version: Option<String>,
    /// Bytes done in this phase.
    pub bytes_done: u64,
    /// Bytes of this phase in all.
    pub bytes_total: u64,
    /// Why it failed, was refused or rolled back.
    pub reason: Option<String>,
}

/// An event the node reports for the fleet's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEvent {
    /// When it happened on the node, ms since the Unix epoch.
    pub at_ms: u64,
    /// What kind: `health` (a verdict change) or `reboot_requested`.
    pub kind: String,
    /// One line for operators.
    pub message: String,
}

/// The node introduces itself (its identity is its client certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The node's [`PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The agent's version string.
    pub agent_version: String,
}

/// The fleet accepts the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version used on this session (see [`negotiate`]).
    pub protocol_version: u16,
    /// The node id the fleet knows this node by.
    pub node_id: String,
    /// Seconds between heartbeats.
    pub heartbeat_interval_s: u32,
}

/// The fleet refuses the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Why, in words.
    pub reason: String,
    /// The node's certificate is revoked: it must stop serving.
    pub revoked: bool,
}

/// GPU health in a few numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSummary {
    /// GPUs seen.
    pub gpus: u32,
    /// GPUs healthy.
    pub healthy: u32,
    /// GPUs degraded.
    pub degraded: u32,
    /// GPUs failed.
    pub failed: u32,
}

/// Power in a few numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerSummary {
    /// Total GPU draw, watts.
    pub draw_w: u32,
    /// Sum of the GPUs' power limits, watts.
    pub limit_w: u32,
}

/// Software versions on the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    /// hearth-agent.
    pub agent: String,
    /// The GPU driver, when known.
    pub driver: Option<String>,
    /// The OS image, when known.
    pub os: Option<String>,
}

/// The node's state, every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Rises by one per heartbeat on a session.
    pub seq: u64,
    /// Node time, ms since the Unix epoch.
    pub at_ms: u64,
    /// Overall state.
    pub state: NodeState,
    /// GPU health.
    pub health: HealthSummary,
    /// GPU power.
    pub power: PowerSummary,
    /// Versions.
    pub versions: Versions,
    /// The desired-state generation the node has applied.
    pub desired_generation: u64,
}

/// What the fleet wants the node to be. Each change raises `generation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Rises by one on every change; a node ignores an older one.
    pub generation: u64,
    /// Take no new work.
    pub drain: bool,
    /// Node power budget in watts, if any.
    pub power_budget_w: Option<u32>,
    /// Operator labels (site, rack, …).
    pub labels: BTreeMap<String, String>,
    /// OS update channel.
    pub update_channel: String,
    /// The release the node should install (`hearth-agent update apply --version V --reboot`
    /// in-process): set by a staged rollout when the node's wave and maintenance window open
    /// (`docs/0009-updates.md`). Appended at the end (postcard is positional).
    #[serde(default)]
    pub update_version: Option<String>,
}

/// A one-shot command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Fleet-assigned id, echoed in the ack.
    pub id: u64,
    /// What to do.
    pub kind: CommandKind,
}

/// Commands a node can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandKind {
    /// Reboot the node.
    Reboot,
    /// Drain now (stop taking work).
    Drain,
    /// Run GPU diagnostics.
    RunDiagnostics,
}

/// What became of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandAck {
    /// The command's id.
    pub id: u64,
    /// The outcome.
    pub outcome: CommandOutcome,
}

/// Outcome of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    /// Accepted and under way (a reboot acks before it happens).
    Accepted,
    /// Done.
    Done,
    /// This node cannot do that (yet): the reason says why.
    NotSupported(String),
    /// Tried and failed.
    Failed(String),
}

/// Why bytes are not a control message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// postcard refused them.
    #[error("malformed control message")]
    Malformed(#[source] postcard::Error),
    /// The message decoded but bytes were left over.
    #[error("{0} trailing bytes after the control message")]
    Trailing(usize),
}

impl ControlMessage {
    /// Encode for a control frame's payload.
    pub fn encode(&self) -> Result<Vec<u8>, ControlError> {
        postcard::to_stdvec(self).map_err(ControlError::Malformed)
    }

    /// Decode a control frame's payload (all of it).
    pub fn decode(bytes: &[u8]) -> Result<Self, ControlError> {
        let (msg, rest) = postcard::take_from_bytes(bytes).map_err(ControlError::Malformed)?;
        if !rest.is_empty() {
            return Err(ControlError::Trailing(rest.len()));
        }
        Ok(msg)
    }

    /// Encode as one whole frame (header + payload).
    pub fn to_frame(&self) -> Result<Vec<u8>, FrameEncodeError> {
        let payload = self.encode()?;
        Ok(crate::frame::encode(crate::frame::FrameType::Control, 0, &payload)?)
    }
}

/// Why a message could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameEncodeError {
    /// Encoding failed.
    #[error("cannot encode the control message")]
    Control(#[from] ControlError),
    /// Framing failed.
    #[error("cannot frame the control message")]
    Frame(#[from] crate::frame::FrameError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat() -> ControlMessage {
        ControlMessage::Heartbeat(Heartbeat {
            seq: 7,
            at_ms: 1_790_000_000_000,
            state: NodeState::Ready,
            health: HealthSummary { gpus: 8, healthy: 7, degraded: 1, failed: 0 },
            power: PowerSummary { draw_w: 5200, limit_w: 5600 },
            versions: Versions { agent: "0.1.0".into(), driver: Some("580.65".into()), os: None },
            desired_generation: 3,
        })
    }

    #[test]
    fn messages_round_trip_compactly() -> Result<(), ControlError> {
        let hb = heartbeat();
        let bytes = hb.encode()?;
        assert!(bytes.len() < 48, "heartbeat is {} bytes", bytes.len());
        assert_eq!(ControlMessage::decode(&bytes)?, hb);
        let d = ControlMessage::Desired(DesiredState {
            generation: 2,
            drain: true,
            power_budget_w: Some(4000),
            labels: [("rack".to_string(), "r12".to_string())].into(),
            update_channel: "stable".into(),
            update_version: Some("2.1".into()),
        });
        assert_eq!(ControlMessage::decode(&d.encode()?)?, d);
        Ok(())
    }

    #[test]
    fn garbage_and_trailing_bytes_are_refused() -> Result<(), ControlError> {
        assert!(matches!(ControlMessage::decode(&[0xff, 0xff]), Err(ControlError::Malformed(_))));
        assert!(matches!(ControlMessage::decode(&[]), Err(ControlError::Malformed(_))));
        let mut bytes = heartbeat().encode()?;
        bytes.push(0);
        assert_eq!(ControlMessage::decode(&bytes), Err(ControlError::Trailing(1)));
        // A string length far beyond the input does not allocate or panic.
        assert!(ControlMessage::decode(&[0, 1, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        Ok(())
    }

    #[test]
    fn fleet_accepts_its_version_and_one_older() {
        assert_eq!(negotiate(1, 1), Ok(1));
        assert_eq!(negotiate(3, 3), Ok(3));
        assert_eq!(negotiate(3, 2), Ok(2));
        assert_eq!(negotiate(3, 1), Err(VersionError::TooOld { node: 1, fleet: 3, oldest: 2 }));
        assert_eq!(negotiate(1, 2), Err(VersionError::TooNew { node: 2, fleet: 1 }));
        assert!(negotiate(1, 0).is_err());
    }
}
