//! The fleet as tunnel gateway: connections with ALPN `hearth-tunnel/1` on the fleet's TLS port.
//!
//! - A **node** (node certificate, not revoked) keeps one tunnel here, registered in the
//!   [`Gateway`] under its id; a newer tunnel of the same node replaces the older one. The gateway
//!   opens streams on it; it refuses every stream a node opens, so no node can reach the gateway's
//!   other nodes through it.
//! - An **operator** (operator certificate) opens streams with [`Target::Via`]: the gateway checks
//!   the role (admin for exec, shell, ports; viewer or admin for the node's local API), opens the
//!   inner target on that node's tunnel and relays the two streams, passing a reset (a refusal, an
//!   exit status) back. Every stream is recorded as registry events (`tunnel-open` with operator,
//!   node and target; `tunnel-close` with bytes and duration); every refusal is logged and recorded
//!   as `tunnel-refused`.
//!
//! Design: `docs/0006-tunnel.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use hearth_fleet_client::tunnel::{Incoming, Tunnel, TunnelConfig, TunnelHandle, splice};
use hearth_proto::mux::{Side, Target, reset};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::ca::{Peer, Role};
use crate::server::Fleet;

/// The node tunnels connected to this fleet.
#[derive(Debug, Default)]
pub struct Gateway {
    nodes: Mutex<HashMap<String, (u64, TunnelHandle)>>,
    next: AtomicU64,
}

impl Gateway {
    /// The tunnel of node `id`, if it has one.
    pub fn node(&self, id: &str) -> Option<TunnelHandle> {
        self.lock().get(id).map(|(_, h)| h.clone())
    }

    /// Ids of the nodes with a tunnel.
    pub fn connected(&self) -> Vec<String> {
        let mut v: Vec<_> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// End a node's tunnel now (revocation).
    pub fn disconnect(&self, id: &str) {
        if let Some((_, h)) = self.lock().remove(id) {
            h.close();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, TunnelHandle)>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Serve one tunnel connection until it ends or the fleet stops.
pub async fn serve<S>(fleet: Arc<Fleet>, stream: S, peer: Peer, cancel: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    match peer {
        Peer::Node(node) => serve_node(fleet, stream, node, cancel).await,
        Peer::Operator { name, role } => serve_operator(fleet, stream, name, role, cancel).await,
        Peer::Anonymous | Peer::Unknown => {
            tracing::info!("tunnel connection without a node or operator certificate: closed");
        }
    }
}

async fn serve_node<S>(fleet: Arc<Fleet>, stream: S, node: String, cancel: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let id = node.clone();
    match fleet.db(move |r| r.node(&id)).await {
        Ok(Some(n)) if !n.revoked => {}
        Ok(_) => {
            tracing::info!(%node, "tunnel refused: node revoked or unknown");
            return;
        }
        Err(e) => {
            tracing::warn!(%node, error = %format!("{e:#}"), "tunnel refused: registry unavailable");
            return;
        }
    }
    let mut tunnel = Tunnel::spawn(stream, Side::Gateway, TunnelConfig::default());
    let generation = fleet.gateway.next.fetch_add(1, Ordering::Relaxed);
    if let Some((_, old)) =
        fleet.gateway.lock().insert(node.clone(), (generation, tunnel.handle.clone()))
    {
        old.close();
    }
    tracing::info!(%node, "node tunnel up");
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            why = tunnel.handle.ended() => {
                tracing::info!(%node, reason = %why, "node tunnel down");
                break;
            }
            inc = tunnel.incoming.recv() => match inc {
                Some(Incoming { target, stream }) => {
                    tracing::warn!(%node, target = %target.label(), "node opened a stream: refused");
                    stream.refuse(reset::REFUSED, "the gateway accepts no streams from nodes");
                }
                None => break,
            },
        }
    }
    tunnel.handle.close();
    let mut nodes = fleet.gateway.lock();
    if nodes.get(&node).is_some_and(|(g, _)| *g == generation) {
        nodes.remove(&node);
    }
}

async fn serve_operator<S>(
    fleet: Arc<Fleet>,
    stream: S,
    operator: String,
    role: Role,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut tunnel = Tunnel::spawn(stream, Side::Gateway, TunnelConfig::default());
    loop {
        let inc = tokio::select! {
            () = cancel.cancelled() => break,
            _ = tunnel.handle.ended() => break,
            inc = tunnel.incoming.recv() => match inc {
                Some(inc) => inc,
                None => break,
            },
        };
        relay(&fleet, &operator, role, inc).await;
    }
    tunnel.handle.close();
}

async fn record(fleet: &Fleet, node: Option<String>, kind: &'static str, msg: String) {
    let now = crate::now_ms();
    if let Err(e) = fleet.db(move |r| r.event(node.as_deref(), kind, &msg, now)).await {
        tracing::warn!(error = %format!("{e:#}"), kind, "cannot record a tunnel event");
    }
}

async fn relay(fleet: &Arc<Fleet>, operator: &str, role: Role, inc: Incoming) {
    let Incoming { target, stream } = inc;
    let Target::Via { node, target: inner } = target else {
        let why = format!("{} is not a relay: open Via {{ node, target }}", target.label());
        tracing::warn!(operator, %why, "tunnel stream refused");
        record(fleet, None, "tunnel-refused", format!("operator {operator}: {why}")).await;
        stream.refuse(reset::REFUSED, &why);
        return;
    };
    let label = inner.label();
    let refusal = if matches!(*inner, Target::Via { .. }) {
        Some((reset::REFUSED, "a relay cannot name another relay".to_string()))
    } else if inner.needs_admin() && role != Role::Admin {
        Some((
            reset::REFUSED,
            format!("{label} needs the admin role (operator {operator} is a viewer)"),
        ))
    } else {
        None
    };
    if let Some((code, why)) = refusal {
        tracing::warn!(operator, %node, target = %label, %why, "tunnel stream refused");
        record(fleet, Some(node), "tunnel-refused", format!("operator {operator}: {why}")).await;
        stream.refuse(code, &why);
        return;
    }
    let Some(handle) = fleet.gateway.node(&node) else {
        let why = format!("node {node} has no tunnel (offline, or not in this fleet)");
        tracing::info!(operator, %node, target = %label, "tunnel stream refused: node not connected");
        record(fleet, Some(node), "tunnel-refused", format!("operator {operator}: {why}")).await;
        stream.refuse(reset::UNREACHABLE, &why);
        return;
    };
    let far = match handle.open(&inner) {
        Ok(s) => s,
        Err(e) => {
            stream.refuse(reset::UNREACHABLE, &format!("cannot open a stream to {node}: {e}"));
            return;
        }
    };
    tracing::info!(operator, %node, target = %label, "tunnel stream open");
    record(fleet, Some(node.clone()), "tunnel-open", format!("operator {operator}: {label}")).await;
    let fleet = fleet.clone();
    let operator = operator.to_string();
    tokio::spawn(async move {
        let started = Instant::now();
        let (up, down) = splice(stream, far).await;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(%operator, %node, target = %label, up, down, secs, "tunnel stream closed");
        let msg = format!(
            "operator {operator}: {label} ended after {secs:.1} s ({up} B in, {down} B out)"
        );
        record(&fleet, Some(node), "tunnel-close", msg).await;
    });
}
