//! `hearth-fleet`: the fleet server.
//!
//! Entry point: [`server::start`] (what `hearth-fleet serve` calls) opens the [`server::Fleet`]
//! (its [`ca::Ca`], created on first start, and the [`registry::Registry`] on SQLite or
//! PostgreSQL) and starts two tasks: the accept loop (one TLS 1.3 listener; ALPN `hearth/1` goes
//! to [`session`], `hearth-tunnel/1` to the tunnel gateway [`tunnel`], everything else to the HTTPS + JSON [`api`] under `/v1`) and the sweep task
//! (marks nodes offline after 3 missed heartbeats, writes liveness to the registry in batches and,
//! when the fleet runs as several gateway processes, delivers changes made through the others),
//! plus two threads: one commits enrollments in groups ([`enroll`]), one writes the liveness
//! batches below the sessions' CPU priority ([`liveness`]).
//! `hearth-fleet operator-cert` issues operator certificates ([`ca::Ca::operator_cert`]).
//! Customer ingress ([`expose`]): gateway ports forwarding to node ports over the node's tunnel,
//! bound again at every start (`docs/0006-tunnel.md`). With several gateway processes, each
//! listens on a Unix socket so an operator's stream reaches a node whose tunnel another holds
//! ([`peer`]).
//! Telemetry ([`metrics`]): the fleet's `/metrics`, Prometheus HTTP SD at `/v1/sd` and the scrape
//! proxy `/v1/nodes/{id}/metrics` through each node's tunnel (`docs/0007-telemetry.md`).
//! Staged rollouts of OS releases ([`rollout`], driven by the sweep and by node update reports;
//! endpoints in [`rollout_api`]): `docs/0009-updates.md`.
//! Design: `docs/0005-fleet.md`; wire format: `docs/protocol.md`.

pub mod api;
pub mod ca;
pub mod cli;
pub mod config;
pub mod enroll;
pub mod expose;
pub mod liveness;
pub mod metrics;
pub mod os;
pub mod peer;
pub mod registry;
pub mod rollout;
pub mod rollout_api;
pub mod server;
pub mod session;
pub mod tunnel;
pub mod updates;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
