//! `hearth-fleet-client`: what a node, `hearthctl` or a light load-generating client needs to talk
//! to `hearth-fleet`.
//!
//! - [`tls`]: rustls client configs that trust only the fleet CA pinned by SHA-256 (from the seed)
//!   and check the fleet *name* from the seed, so a fleet reached at a bare IP address works.
//! - [`https`]: one JSON request over HTTPS (HTTP/1.1), optionally through an HTTPS proxy.
//! - [`session`]: the `hearth/1` control session: frame I/O shared with the fleet, and
//!   [`session::Session`], control messages on an mTLS connection of its own or in a stream of
//!   the node's tunnel ([`session::Session::on_tunnel`]).
//! - [`tunnel`]: data streams multiplexed on the session (`hearth_proto::mux` driven by two tasks,
//!   each stream an `AsyncRead + AsyncWrite`), with pings and dead-session detection;
//!   [`backoff`]: the reconnect schedule. Design: `docs/0006-tunnel.md`.
//! - [`identity`]: key pairs and CSRs; [`enroll`] exchanges a token and a CSR for a certificate.
//! - [`seed`]: the seed file a node is provisioned with.
//! - [`release`]: signed releases, the TUF repository nodes update from (`docs/0009-updates.md`).
//!
//! The design: `docs/0005-fleet.md`; the wire format: `docs/protocol.md`.

pub mod backoff;
pub mod enroll;
pub mod https;
pub mod identity;
pub mod release;
pub mod seed;
pub mod session;
pub mod tls;
pub mod tunnel;

/// The URI SAN prefix of node certificates: `urn:hearth:node:ID`.
pub const NODE_URI_PREFIX: &str = "urn:hearth:node:";
/// The URI SAN prefix of operator certificates: `urn:hearth:operator:ROLE:NAME`.
pub const OPERATOR_URI_PREFIX: &str = "urn:hearth:operator:";
