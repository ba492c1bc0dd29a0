//! Bodies of the fleet's HTTPS + JSON API under `/v1` (enrollment, renewal, and what `hearthctl`
//! uses). The endpoints: `docs/protocol.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::control::{CommandKind, CommandOutcome, DesiredState, Heartbeat};
use crate::gpu::GpuInventory;

/// What identifies a machine, whoever asks (read from DMI on real hardware).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareIdentity {
    /// DMI product UUID (`/sys/class/dmi/id/product_uuid`).
    pub dmi_uuid: String,
    /// Board serial (`/sys/class/dmi/id/board_serial`).
    pub board_serial: String,
    /// UUIDs of the GPUs.
    pub gpu_uuids: Vec<String>,
}

/// `POST /v1/enroll`: a node asks to join with a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The enrollment token from the seed.
    pub token: String,
    /// PEM CSR for the key the node generated (the key never leaves the node).
    pub csr_pem: String,
    /// Hardware identity.
    pub hardware: HardwareIdentity,
    /// Host name.
    pub hostname: String,
    /// GPU inventory.
    pub gpus: Vec<GpuInventory>,
    /// hearth-agent version.
    pub agent_version: String,
}

/// The answer to an enrollment or a renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    /// The node's id (also the certificate's URI SAN `urn:hearth:node:ID`).
    pub node_id: String,
    /// The node's certificate (PEM).
    pub cert_pem: String,
    /// The fleet CA (PEM); its SHA-256 is the seed's pin.
    pub ca_pem: String,
    /// Certificate validity start, ms since the Unix epoch.
    pub not_before_ms: u64,
    /// Certificate expiry, ms since the Unix epoch.
    pub not_after_ms: u64,
}

/// `POST /v1/renew` (with the node's current certificate): a fresh certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// PEM CSR for the node's key.
    pub csr_pem: String,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreateRequest {
    /// Labels given to the nodes that enroll with it (site, rack, …).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Seconds until it expires.
    pub ttl_s: u64,
    /// How many enrollments it allows (1: single use).
    pub max_uses: u32,
    /// The update channel of the nodes that enroll with it (`[a-z0-9-]{1,32}`); `stable` when
    /// absent. A node that re-enrolls known hardware keeps its channel, like its labels.
    #[serde(default)]
    pub channel: Option<String>,
}

/// A created token: the secret is shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token's public id.
    pub id: String,
    /// The secret (only its hash is stored).
    pub token: String,
    /// Expiry, ms since the Unix epoch.
    pub expires_ms: u64,
    /// A ready seed (TOML) for nodes.
    pub seed: String,
}

/// A token as listed (no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    /// Public id.
    pub id: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation, ms since the Unix epoch.
    pub created_ms: u64,
    /// Expiry, ms since the Unix epoch.
    pub expires_ms: u64,
    /// Allowed enrollments.
    pub max_uses: u32,
    /// Enrollments so far.
    pub uses: u32,
    /// Revoked by an operator.
    pub revoked: bool,
    /// The update channel given to the nodes that enroll with it.
    #[serde(default = "default_channel")]
    pub channel: String,
}

/// The update channel of a node whose token names none, and of every token made before tokens
/// named one.
pub const DEFAULT_CHANNEL: &str = "stable";

fn default_channel() -> String {
    DEFAULT_CHANNEL.into()
}

/// A node as the registry shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Host name at enrollment.
    pub hostname: String,
    /// Hardware identity.
    pub hardware: HardwareIdentity,
    /// GPU inventory at enrollment.
    pub gpus: Vec<GpuInventory>,
    /// Labels (from the token, then the desired state).
    pub labels: BTreeMap<String, String>,
    /// A heartbeat arrived in the last 30 s (3 × 10 s).
    pub online: bool,
    /// Last heartbeat, ms since the Unix epoch.
    pub last_seen_ms: Option<u64>,
    /// Enrollment time, ms since the Unix epoch.
    pub enrolled_ms: u64,
    /// Current certificate's expiry.
    pub cert_not_after_ms: u64,
    /// The last heartbeat's content.
    pub heartbeat: Option<Heartbeat>,
    /// Protocol version of the current or last session.
    pub protocol_version: Option<u16>,
    /// What the fleet wants of it.
    pub desired: DesiredState,
    /// Revoked: its certificate is refused.
    pub revoked: bool,
}

/// `POST /v1/nodes/{id}/drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Drain (true) or undrain (false).
    pub drain: bool,
}

/// `POST /v1/nodes/{id}/power-budget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerBudgetRequest {
    /// Node budget in watts; `null` clears it.
    pub watts: Option<u32>,
}

/// `POST /v1/nodes/{id}/channel`: the update channel whose staged rollouts reach the node, and
/// from which the node installs what the fleet asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRequest {
    /// The channel, `[a-z0-9-]{1,32}`.
    pub channel: String,
}

/// `POST /v1/nodes/{id}/commands`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    /// What to do.
    pub kind: CommandKind,
}

/// A command and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandView {
    /// Id.
    pub id: u64,
    /// The node.
    pub node_id: String,
    /// What.
    pub kind: CommandKind,
    /// When queued, ms since the Unix epoch.
    pub created_ms: u64,
    /// Sent to the node over a session.
    pub sent: bool,
    /// The node's answer, once it came.
    pub outcome: Option<CommandOutcome>,
}

/// A registry event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    /// Rising id.
    pub id: u64,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// The node it concerns, if any.
    pub node_id: Option<String>,
    /// Kind (`enrolled`, `online`, `offline`, `drain`, …).
    pub kind: String,
    /// Details.
    pub message: String,
}

/// Every error answer of the fleet API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetError {
    /// What went wrong, naming the cause.
    pub error: String,
}

/// `POST /v1/nodes/{id}/expose`: forward a gateway port to this port on the node (customer
/// ingress; the node's `tunnel.expose_ports` must list it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposeRequest {
    /// The port on the node (its loopback).
    pub port: u16,
}

/// An exposure: a gateway listener forwarding each connection to a port on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposeView {
    /// The port the gateway listens on (from the fleet's `expose_ports` range).
    pub gateway_port: u16,
    /// Where customers connect: the fleet's `expose_bind` address and `gateway_port`.
    pub address: String,
    /// The node.
    pub node_id: String,
    /// The port on the node.
    pub node_port: u16,
    /// The operator who created it.
    pub created_by: String,
    /// When, ms since the Unix epoch.
    pub created_ms: u64,
}
