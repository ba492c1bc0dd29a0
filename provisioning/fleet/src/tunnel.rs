//! The fleet as tunnel gateway: connections with ALPN `hearth-tunnel/1` on the fleet's TLS port.
//!
//! - A **node** (node certificate, not revoked) keeps one tunnel here, registered in the
//!   [`Gateway`] under its id; a newer tunnel of the same node replaces the older one. The gateway
//!   opens streams on it; it refuses every stream a node opens, so no node can reach the gateway's
//!   other nodes through it. A tunnel with ALPN `hearth-tunnel/2` also carries the node's control
//!   session: the first [`Target::Session`] stream the node opens, served by
//!   [`crate::session::serve`]; the tunnel and the session end together, and a revoked or unknown
//!   node is told so on it before it closes.
//! - An **operator** (operator certificate) opens streams with [`Target::Via`]: the gateway checks
//!   the role (admin for exec, shell, ports; viewer or admin for the node's local API), opens the
//!   inner target on that node's tunnel and relays the two streams, passing a reset (a refusal, an
//!   exit status) back. Every stream is recorded as registry events (`tunnel-open` with operator,
//!   node and target; `tunnel-close` with bytes and duration); every refusal is logged and recorded
//!   as `tunnel-refused`.
//! - **Lanes** (ALPN `hearth-lane/1`): the gateway offers each node tunnel [`LANES`] extra
//!   connections; a lane presenting the offer's token joins that tunnel and carries its `Port`
//!   streams ([`Gateway::route`]), so bulk transfers do not queue ahead of the rest.
//!
//! Design: `docs/0006-tunnel.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hearth_fleet_client::tunnel::{Incoming, Tunnel, TunnelConfig, TunnelHandle, splice};
use hearth_proto::lane::{LaneMsg, TOKEN_LEN};
use hearth_proto::mux::{Side, Target, reset};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::ca::{Peer, Role};
use crate::server::Fleet;

/// Lanes the gateway offers each node tunnel (`hearth_proto::lane`): extra connections that carry
/// the node's `Port` streams, so bulk transfers do not queue ahead of the tunnel's control
/// messages, pings, shells and commands.
pub const LANES: u8 = 2;

/// How long a lane connection may take to present its token.
pub const LANE_JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a tunnel whose control session ended may take to send the session's last messages
/// (a refusal) before it closes.
pub const SESSION_DRAIN: Duration = Duration::from_secs(2);

/// One node's tunnel: the primary connection and its lanes.
#[derive(Debug)]
struct NodeTunnel {
    generation: u64,
    primary: TunnelHandle,
    /// What the node's lanes present (sent on `primary` only).
    token: [u8; TOKEN_LEN],
    lanes: Vec<(u64, TunnelHandle)>,
    /// It carries the node's control session (ALPN `hearth-tunnel/2`).
    session: bool,
}

impl NodeTunnel {
    fn close(&self) {
        self.primary.close();
        for (_, lane) in &self.lanes {
            lane.close();
        }
    }
}

/// The node tunnels connected to this fleet.
#[derive(Debug, Default)]
pub struct Gateway {
    nodes: Mutex<HashMap<String, NodeTunnel>>,
    next: AtomicU64,
}

impl Gateway {
    /// The primary tunnel of node `id`, if it has one (control messages, shells, commands, the
    /// node's API).
    pub fn node(&self, id: &str) -> Option<TunnelHandle> {
        self.lock().get(id).map(|t| t.primary.clone())
    }

    /// The connection of node `id` that a new stream to `target` should use: a `Port` stream
    /// (workload ingress, forwards; possibly bulk) goes on the lane with the fewest open streams,
    /// everything else on the primary; the primary when the node has no lanes.
    pub fn route(&self, id: &str, target: &Target) -> Option<TunnelHandle> {
        let nodes = self.lock();
        let t = nodes.get(id)?;
        if matches!(target, Target::Port(_))
            && let Some((_, lane)) = t.lanes.iter().min_by_key(|(_, l)| l.stream_count())
        {
            return Some(lane.clone());
        }
        Some(t.primary.clone())
    }

    /// Whether node `id`'s tunnel carries its control session (one connection per node).
    pub fn carries_session(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|t| t.session)
    }

    /// Node tunnels that carry their node's control session.
    pub fn session_total(&self) -> usize {
        self.lock().values().filter(|t| t.session).count()
    }

    /// Lanes node `id` has open now.
    pub fn lanes(&self, id: &str) -> usize {
        self.lock().get(id).map_or(0, |t| t.lanes.len())
    }

    /// Lanes open on all node tunnels.
    pub fn lane_total(&self) -> usize {
        self.lock().values().map(|t| t.lanes.len()).sum()
    }

    /// Ids of the nodes with a tunnel.
    pub fn connected(&self) -> Vec<String> {
        let mut v: Vec<_> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// End a node's tunnel and its lanes now (revocation).
    pub fn disconnect(&self, id: &str) {
        if let Some(t) = self.lock().remove(id) {
            t.close();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeTunnel>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Serve one tunnel connection until it ends or the fleet stops; a node's `with_session`
/// (ALPN `hearth-tunnel/2`) carries its control session too.
pub async fn serve<S>(
    fleet: Arc<Fleet>,
    stream: S,
    peer: Peer,
    with_session: bool,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match peer {
        Peer::Node(node) => serve_node(fleet, stream, node, with_session, cancel).await,
        Peer::Operator { name, role } => serve_operator(fleet, stream, name, role, cancel).await,
        Peer::Anonymous | Peer::Unknown => {
            tracing::info!("tunnel connection without a node or operator certificate: closed");
        }
    }
}

async fn serve_node<S>(
    fleet: Arc<Fleet>,
    stream: S,
    node: String,
    with_session: bool,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = node.clone();
    let allowed = match fleet.db(move |r| r.node(&id)).await {
        Ok(Some(n)) if !n.revoked => true,
        Ok(_) => {
            tracing::info!(%node, "tunnel refused: node revoked or unknown");
            false
        }
        Err(e) => {
            tracing::warn!(%node, error = %format!("{e:#}"), "tunnel refused: registry unavailable");
            false
        }
    };
    if !allowed && !with_session {
        return;
    }
    let mut tunnel = Tunnel::spawn(stream, Side::Gateway, TunnelConfig::default());
    if !allowed {
        // The session refuses the Hello with the reason (a revoked node stops for good), then
        // the tunnel closes; nothing else is served, and a node that opens no session is not
        // held.
        let on = Some(&fleet);
        let _ = tokio::time::timeout(
            crate::session::HELLO_TIMEOUT * 2,
            hold(&node, &mut tunnel, on, &cancel, "node tunnel down"),
        )
        .await;
        tunnel.handle.close();
        return;
    }
    let generation = fleet.gateway.next.fetch_add(1, Ordering::Relaxed);
    let mut token = [0u8; TOKEN_LEN];
    let lanes = if getrandom::fill(&mut token).is_ok() {
        LANES
    } else {
        tracing::warn!(%node, "no OS randomness for a lane token: tunnel without lanes");
        0
    };
    let entry = NodeTunnel {
        generation,
        primary: tunnel.handle.clone(),
        token,
        lanes: Vec::new(),
        session: with_session,
    };
    if let Some(old) = fleet.gateway.lock().insert(node.clone(), entry) {
        old.close();
    }
    if lanes > 0 {
        // A node that does not know lanes ignores the offer.
        let _ = tunnel.handle.send_control(&LaneMsg::Offer { count: lanes, token }.encode());
    }
    tracing::info!(%node, session = with_session, "node tunnel up");
    // With several gateway processes, the node's exposures are bound where its tunnel is.
    let f = fleet.clone();
    tokio::spawn(async move { crate::expose::sync_listeners(&f).await });
    let on = with_session.then_some(&fleet);
    hold(&node, &mut tunnel, on, &cancel, "node tunnel down").await;
    let gone = {
        let mut nodes = fleet.gateway.lock();
        match nodes.get(&node) {
            Some(t) if t.generation == generation => {
                if let Some(t) = nodes.remove(&node) {
                    t.close();
                }
                true
            }
            // Replaced by a newer tunnel of the node here: its exposures stay.
            Some(_) => false,
            None => true,
        }
    };
    if gone && !cancel.is_cancelled() {
        crate::expose::sync_listeners(&fleet).await;
    }
}

/// Hold a node's tunnel or lane until it ends, the control session it carries ends (after its
/// last bytes are sent) or the fleet stops, refusing every stream the node opens (no node
/// reaches anything through the gateway) but, with `takes_session` (a `hearth-tunnel/2` tunnel),
/// the first [`Target::Session`], which that fleet serves as the node's control session; then
/// close it.
async fn hold(
    node: &str,
    tunnel: &mut Tunnel,
    mut takes_session: Option<&Arc<Fleet>>,
    cancel: &CancellationToken,
    down: &'static str,
) {
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(_) = sessions.join_next() => {
                tracing::info!(%node, "control session on the tunnel ended: tunnel closed");
                tunnel.handle.drained(SESSION_DRAIN).await;
                break;
            }
            why = tunnel.handle.ended() => {
                tracing::info!(%node, reason = %why, "{down}");
                break;
            }
            Some(_) = tunnel.control.recv() => {
                // Nodes send the gateway no control message after a lane's join.
                tracing::debug!(%node, "control message from a node: ignored");
            }
            inc = tunnel.incoming.recv() => match inc {
                Some(Incoming { target: Target::Session, stream }) if takes_session.is_some() => {
                    if let Some(fleet) = takes_session.take() {
                        let peer = Peer::Node(node.to_string());
                        sessions.spawn(crate::session::serve(fleet.clone(), stream, peer, cancel.clone()));
                    }
                }
                Some(Incoming { target, stream }) => {
                    tracing::warn!(%node, target = %target.label(), "node opened a stream: refused");
                    stream.refuse(reset::REFUSED, "the gateway accepts no streams from nodes");
                }
                None => break,
            },
        }
    }
    // A session still running ends on its own once the tunnel is closed (its stream fails),
    // through its own cleanup: not aborted here.
    sessions.detach_all();
    tunnel.handle.close();
}

/// Serve one lane connection (ALPN `hearth-lane/1`): it must come with a node certificate and
/// present, within [`LANE_JOIN_TIMEOUT`], the token that node's current tunnel was offered; it
/// then carries streams the gateway routes to it ([`Gateway::route`]) until it ends, its tunnel
/// ends (or is replaced) or the fleet stops.
pub async fn serve_lane<S>(fleet: Arc<Fleet>, stream: S, peer: Peer, cancel: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Peer::Node(node) = peer else {
        tracing::info!("lane connection without a node certificate: closed");
        return;
    };
    let mut lane = Tunnel::spawn(stream, Side::Gateway, TunnelConfig::default());
    let join = tokio::select! {
        () = cancel.cancelled() => None,
        r = tokio::time::timeout(LANE_JOIN_TIMEOUT, lane.control.recv()) => match r {
            Ok(Some(payload)) => Some(LaneMsg::decode(&payload)),
            Ok(None) | Err(_) => None,
        },
    };
    let token = match join {
        Some(Ok(LaneMsg::Join { token })) => token,
        Some(Ok(LaneMsg::Offer { .. })) => {
            tracing::warn!(%node, "lane refused: it sent an offer instead of a join");
            lane.handle.close();
            return;
        }
        Some(Err(e)) => {
            tracing::warn!(%node, error = %e, "lane refused: bad join message");
            lane.handle.close();
            return;
        }
        None => {
            tracing::info!(%node, "lane refused: no join within {LANE_JOIN_TIMEOUT:?}");
            lane.handle.close();
            return;
        }
    };
    let lane_id = fleet.gateway.next.fetch_add(1, Ordering::Relaxed);
    let attached = {
        let mut nodes = fleet.gateway.lock();
        match nodes.get_mut(&node) {
            Some(t) if t.token == token && t.lanes.len() < usize::from(LANES) => {
                t.lanes.push((lane_id, lane.handle.clone()));
                Some(t.lanes.len())
            }
            _ => None,
        }
    };
    let Some(n) = attached else {
        tracing::info!(%node, "lane refused: its token matches no current tunnel of the node, or the node has all its lanes");
        lane.handle.close();
        return;
    };
    tracing::info!(%node, lanes = n, "node tunnel lane up");
    hold(&node, &mut lane, None, &cancel, "node tunnel lane down").await;
    if let Some(t) = fleet.gateway.lock().get_mut(&node) {
        t.lanes.retain(|(id, _)| *id != lane_id);
    }
}

async fn serve_operator<S>(
    fleet: Arc<Fleet>,
    stream: S,
    operator: String,
    role: Role,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut tunnel = Tunnel::spawn(stream, Side::Gateway, TunnelConfig::default());
    while let Some(inc) = next_stream(&mut tunnel, &cancel).await {
        relay(&fleet, &operator, role, inc).await;
    }
    tunnel.handle.close();
}

/// The next stream the peer of a relaying tunnel (an operator, another gateway process) opens;
/// `None` once the tunnel ends or the fleet stops. Its control messages (it sends none the
/// gateway uses) are read and dropped, not held.
pub(crate) async fn next_stream(
    tunnel: &mut Tunnel,
    cancel: &CancellationToken,
) -> Option<Incoming> {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return None,
            _ = tunnel.handle.ended() => return None,
            Some(_) = tunnel.control.recv() => {}
            inc = tunnel.incoming.recv() => return inc,
        }
    }
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
    } else if matches!(*inner, Target::Session) {
        Some((reset::REFUSED, "a node's control session is not reachable by relay".to_string()))
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
    // The node's tunnel here, or on another gateway process of this machine (`crate::peer`).
    let far = match fleet.gateway.route(&node, &inner) {
        Some(handle) => handle.open(&inner),
        None => match crate::peer::open_via(fleet, &node, &inner).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => {
                let why = format!("node {node} has no tunnel (offline, or not in this fleet)");
                tracing::info!(operator, %node, target = %label, "tunnel stream refused: node not connected");
                record(fleet, Some(node), "tunnel-refused", format!("operator {operator}: {why}"))
                    .await;
                stream.refuse(reset::UNREACHABLE, &why);
                return;
            }
            Err(e) => Err(std::io::Error::other(format!("{:#}", anyhow::Error::new(e)))),
        },
    };
    let far = match far {
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
