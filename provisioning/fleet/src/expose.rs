//! Customer ingress through the gateway: `hearthctl expose NODE PORT`.
//!
//! An admin asks the fleet (`POST /v1/nodes/{id}/expose`) to expose a port of a node. The fleet
//! takes the lowest free port of its `expose_ports` range, binds it on `expose_bind`, stores the
//! exposure in the registry (table `exposures`, an `expose-created` event) and forwards every
//! connection accepted there over that node's tunnel to the port on the node's loopback
//! ([`Target::Port`]), relaying both directions until either side closes. The listeners are
//! bound again at every fleet start ([`restore`]), so exposures survive a restart.
//!
//! Who may reach what: only admins create or remove exposures (viewers list them); the node's own
//! policy decides which ports it serves (`tunnel.expose_ports`) and refuses the rest on every
//! stream; when the node is connected at creation, a probe stream asks it first, so a port its
//! policy refuses is refused to the operator at once, with the node's reason, and nothing is
//! stored. A connection only ever reaches the one node named in the exposure, and nodes cannot open
//! streams through the gateway ([`crate::tunnel`]), so no node reaches another. Connections the
//! node refuses, or that arrive while it has no tunnel, are closed and logged; a refusal is
//! recorded as an `expose-refused` event (at most one a minute per exposure).
//!
//! With several gateway processes (`gateway_id`), an exposure's port is bound by the process that
//! holds its node's tunnel, so every connection lands where it can be forwarded:
//! [`sync_listeners`] matches a process's listeners to the registry and its tunnels when a tunnel
//! registers or leaves (a port the previous process still holds is retried until it lets it go),
//! when another process tells it of an exposure created or removed there (the registry's outbox,
//! within a second, [`crate::server::deliver_notifications`]), and every [`RECONCILE`], for a
//! notice that reached the node's previous gateway while its tunnel moved.
//!
//! Design: `docs/0006-tunnel.md`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use hearth_fleet_client::tunnel::{StreamReset, TunnelHandle};
use hearth_proto::fleet::{ExposeRequest, ExposeView};
use hearth_proto::mux::{Target, reset};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::api::{ApiError, need, parse};
use crate::ca::{Peer, Role};
use crate::registry::expose::Exposure;
use crate::server::Fleet;

/// One exposure's listener in this process (bound, or waiting for its port).
#[derive(Debug, Clone)]
struct Listener {
    node: String,
    cancel: CancellationToken,
    bound: Arc<std::sync::atomic::AtomicBool>,
}

/// How often a gateway that took a node's tunnel tries again to bind an exposure's port that the
/// node's previous gateway still holds.
const CLAIM_RETRY: Duration = Duration::from_millis(250);

/// How often a gateway process matches all its exposure listeners to the registry and the
/// tunnels it holds (several gateway processes).
pub const RECONCILE: Duration = Duration::from_secs(5);

/// The gateway's exposure listeners.
#[derive(Debug, Default)]
pub struct Exposer {
    /// Each exposure's listener here, by gateway port.
    listeners: Mutex<HashMap<u16, Listener>>,
    /// The fleet's own cancellation (set by [`restore`]); listeners are its children.
    root: Mutex<Option<CancellationToken>>,
    /// One creation at a time in this process (port choice and binding).
    creating: tokio::sync::Mutex<()>,
    /// When each exposure last recorded an `expose-refused` event.
    refused: Mutex<HashMap<u16, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Exposer {
    /// Gateway ports with a bound listener.
    pub fn listening(&self) -> Vec<u16> {
        let mut v: Vec<u16> = lock(&self.listeners)
            .iter()
            .filter(|(_, l)| l.bound.load(std::sync::atomic::Ordering::SeqCst))
            .map(|(p, _)| *p)
            .collect();
        v.sort_unstable();
        v
    }

    fn child_token(&self) -> CancellationToken {
        lock(&self.root).get_or_insert_with(CancellationToken::new).child_token()
    }

    fn stop(&self, port: u16) {
        if let Some(l) = lock(&self.listeners).remove(&port) {
            l.cancel.cancel();
        }
    }

    /// A new listener entry for `port`, unless one exists.
    fn claim(&self, port: u16, node: &str) -> Option<Listener> {
        let mut listeners = lock(&self.listeners);
        if listeners.contains_key(&port) {
            return None;
        }
        let l =
            Listener { node: node.to_string(), cancel: self.child_token(), bound: Arc::default() };
        listeners.insert(port, l.clone());
        Some(l)
    }
}

/// Whether exposures follow their node's tunnel (several gateway processes) rather than being
/// bound by this process at start.
fn follows_tunnels(fleet: &Fleet) -> bool {
    fleet.config.gateway_id.is_some()
}

fn view(fleet: &Fleet, e: &Exposure) -> ExposeView {
    ExposeView {
        gateway_port: e.gateway_port,
        address: SocketAddr::new(fleet.config.expose_bind, e.gateway_port).to_string(),
        node_id: e.node_id.clone(),
        node_port: e.node_port,
        created_by: e.created_by.clone(),
        created_ms: e.created_ms,
    }
}

fn bind(ip: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let addr = SocketAddr::new(ip, port);
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// Bind the listener of every stored exposure (at fleet start; `cancel` stops them with the
/// fleet). A port that cannot be bound within 3 s is logged and recorded as an
/// `expose-unavailable` event; the others run.
pub async fn restore(fleet: &Arc<Fleet>, cancel: &CancellationToken) {
    *lock(&fleet.exposer.root) = Some(cancel.clone());
    if follows_tunnels(fleet) {
        // Bound as the nodes' tunnels arrive (`sync_listeners`).
        return;
    }
    let rows = match fleet.db(|r| r.exposures()).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot read exposures: none restored");
            return;
        }
    };
    for e in rows {
        let deadline = Instant::now() + Duration::from_secs(3);
        let listener = loop {
            match bind(fleet.config.expose_bind, e.gateway_port) {
                Ok(l) => break Ok(l),
                Err(err) if Instant::now() < deadline => {
                    tracing::debug!(port = e.gateway_port, error = %err, "exposure port busy; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => break Err(err),
            }
        };
        match listener {
            Ok(l) => start(fleet, l, e),
            Err(err) => {
                let msg = format!(
                    "gateway port {} (→ port {}) cannot be bound: {err}",
                    e.gateway_port, e.node_port
                );
                tracing::error!(node = %e.node_id, port = e.gateway_port, error = %err, "exposure not restored");
                record(fleet, &e.node_id, "expose-unavailable", msg).await;
            }
        }
    }
}

fn start(fleet: &Arc<Fleet>, listener: TcpListener, e: Exposure) {
    let Some(l) = fleet.exposer.claim(e.gateway_port, &e.node_id) else { return };
    l.bound.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!(node = %e.node_id, gateway_port = e.gateway_port, node_port = e.node_port, "exposure listening");
    tokio::spawn(accept_loop(fleet.clone(), listener, e, l.cancel));
}

/// Match this process's exposure listeners to the registry and to the tunnels it holds (several
/// gateway processes): bind every exposure whose node's tunnel is here, waiting for a port the
/// previous gateway still holds, and release the others (the tunnel left, the exposure is gone).
/// Nothing to do in a single fleet process, which binds every exposure at start.
pub async fn sync_listeners(fleet: &Arc<Fleet>) {
    if !follows_tunnels(fleet) {
        return;
    }
    let rows = match fleet.db(|r| r.exposures()).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot read exposures");
            return;
        }
    };
    let wanted: Vec<Exposure> =
        rows.into_iter().filter(|e| fleet.gateway.node(&e.node_id).is_some()).collect();
    let gone: Vec<(u16, String)> = lock(&fleet.exposer.listeners)
        .iter()
        .filter(|(p, _)| !wanted.iter().any(|e| e.gateway_port == **p))
        .map(|(p, l)| (*p, l.node.clone()))
        .collect();
    for (port, node) in gone {
        tracing::info!(%node, gateway_port = port, "exposure released (the node's tunnel left, or the exposure was removed)");
        fleet.exposer.stop(port);
    }
    for e in wanted {
        let Some(l) = fleet.exposer.claim(e.gateway_port, &e.node_id) else { continue };
        tokio::spawn(bind_when_free(fleet.clone(), e, l));
    }
}

/// Bind `e`'s port as soon as it is free (the node's previous gateway releases it when the
/// tunnel leaves there), then serve it until cancelled.
async fn bind_when_free(fleet: Arc<Fleet>, e: Exposure, l: Listener) {
    let waiting = Instant::now();
    let mut warned = false;
    let listener = loop {
        match bind(fleet.config.expose_bind, e.gateway_port) {
            Ok(listener) => break listener,
            Err(err) => {
                if !warned && waiting.elapsed() > Duration::from_secs(20) {
                    warned = true;
                    tracing::warn!(node = %e.node_id, port = e.gateway_port, error = %err, "exposure port still busy: retrying");
                }
                tokio::select! {
                    () = l.cancel.cancelled() => return,
                    () = tokio::time::sleep(CLAIM_RETRY) => {}
                }
            }
        }
    };
    l.bound.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!(node = %e.node_id, gateway_port = e.gateway_port, node_port = e.node_port, waited_ms = waiting.elapsed().as_millis() as u64, "exposure listening");
    accept_loop(fleet, listener, e, l.cancel).await;
}

async fn accept_loop(
    fleet: Arc<Fleet>,
    listener: TcpListener,
    e: Exposure,
    cancel: CancellationToken,
) {
    loop {
        let (tcp, from) = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(err) => {
                    tracing::warn!(port = e.gateway_port, error = %err, "exposure accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (fleet, e, cancel) = (fleet.clone(), e.clone(), cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = forward(&fleet, tcp, from, &e) => {}
            }
        });
    }
}

async fn record(fleet: &Fleet, node: &str, kind: &'static str, msg: String) {
    let (node, now) = (node.to_string(), crate::now_ms());
    if let Err(err) = fleet.db(move |r| r.event(Some(&node), kind, &msg, now)).await {
        tracing::warn!(error = %format!("{err:#}"), kind, "cannot record an exposure event");
    }
}

/// Relay one customer connection to the node's port.
async fn forward(fleet: &Fleet, mut tcp: TcpStream, from: SocketAddr, e: &Exposure) {
    let Some(handle) = fleet.gateway.route(&e.node_id, &Target::Port(e.node_port)) else {
        tracing::info!(node = %e.node_id, port = e.gateway_port, %from, "exposed node has no tunnel: connection closed");
        return;
    };
    let stream = match handle.open(&Target::Port(e.node_port)) {
        Ok(s) => s,
        Err(err) => {
            tracing::info!(node = %e.node_id, port = e.gateway_port, %from, error = %err, "cannot open a stream to the exposed node");
            return;
        }
    };
    let started = Instant::now();
    // 64 KiB buffers while data flows, none while the connection is idle (`relay`).
    match hearth_fleet_client::tunnel::relay(&stream, &mut tcp).await {
        Ok((down, up)) => tracing::debug!(
            node = %e.node_id, port = e.gateway_port, %from, up, down,
            secs = started.elapsed().as_secs_f64(), "exposure connection closed"
        ),
        Err(err) => match StreamReset::of(&err) {
            Some(r) if r.code == reset::REFUSED => {
                tracing::warn!(node = %e.node_id, port = e.gateway_port, %from, reason = %r.reason, "node refused an exposed connection");
                let due = {
                    let mut last = lock(&fleet.exposer.refused);
                    let due = last
                        .get(&e.gateway_port)
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                    if due {
                        last.insert(e.gateway_port, Instant::now());
                    }
                    due
                };
                if due {
                    let msg = format!("gateway port {}: {}", e.gateway_port, r.reason);
                    record(fleet, &e.node_id, "expose-refused", msg).await;
                }
            }
            _ => {
                tracing::debug!(node = %e.node_id, port = e.gateway_port, %from, error = %err, "exposure connection ended")
            }
        },
    }
}

/// Ask the node whether its policy serves `port`: a refusal (reset `REFUSED`) comes back within a
/// round trip; a port it serves connects (or is unreachable while its service is down).
async fn probe(handle: &TunnelHandle, node: &str, port: u16) -> Result<(), ApiError> {
    let mut s = handle.open(&Target::Port(port)).map_err(|e| {
        ApiError::new(StatusCode::BAD_GATEWAY, format!("cannot open a stream to node {node}: {e}"))
    })?;
    let wait = handle
        .rtt()
        .map_or(Duration::from_millis(500), |r| (r * 4).max(Duration::from_millis(200)));
    let mut b = [0u8; 1];
    if let Ok(Err(e)) = tokio::time::timeout(wait, s.read(&mut b)).await
        && let Some(r) = StreamReset::of(&e)
        && r.code == reset::REFUSED
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("node {node} refuses port {port}: {}", r.reason),
        ));
    }
    Ok(())
}

/// Tell the gateway process holding `node`'s tunnel to match its listeners to the registry
/// (through the outbox, [`crate::server::deliver_notifications`] → [`sync_listeners`]).
async fn notify_holder(fleet: &Arc<Fleet>, node: &str) {
    let id = node.to_string();
    if let Err(e) = fleet.db(move |r| r.notify_gateway(&id, crate::now_ms())).await {
        tracing::warn!(%node, error = %format!("{e:#}"), "cannot tell the node's gateway about its exposures");
    }
}

fn operator_name(peer: &Peer) -> String {
    match peer {
        Peer::Operator { name, .. } => name.clone(),
        _ => String::new(),
    }
}

/// `POST /v1/nodes/{id}/expose` (admin): expose a port of the node; an existing exposure of the
/// same port is returned as it is.
pub async fn create(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(node): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ExposeView>, ApiError> {
    need(&peer, Role::Admin)?;
    let req: ExposeRequest = parse(body, fleet.config.max_body_bytes)?;
    if req.port == 0 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "port must be in 1..=65535"));
    }
    let _one = fleet.exposer.creating.lock().await;
    let id = node.clone();
    match fleet.db(move |r| r.node(&id)).await? {
        Some(n) if !n.revoked => {}
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown or revoked node {node}"),
            ));
        }
    }
    let (id, port) = (node.clone(), req.port);
    if let Some(e) = fleet.db(move |r| r.exposure_of(&id, port)).await? {
        return Ok(Json(view(&fleet, &e)));
    }
    if let Some(handle) = fleet.gateway.node(&node) {
        probe(&handle, &node, req.port).await?;
    }
    let used: HashSet<u16> =
        fleet.db(|r| r.exposures()).await?.iter().map(|e| e.gateway_port).collect();
    let [first, last] = fleet.config.expose_ports;
    let Some((gateway_port, listener)) = (first..=last)
        .filter(|p| !used.contains(p))
        .find_map(|p| bind(fleet.config.expose_bind, p).ok().map(|l| (p, l)))
    else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no free gateway port in expose_ports {first}-{last} on {}",
                fleet.config.expose_bind
            ),
        ));
    };
    let e = Exposure {
        gateway_port,
        node_id: node,
        node_port: req.port,
        created_by: operator_name(&peer),
        created_ms: crate::now_ms(),
    };
    let row = e.clone();
    let stored = fleet.db(move |r| r.add_exposure(&row)).await?;
    if follows_tunnels(&fleet) && fleet.gateway.node(&stored.node_id).is_none() {
        // The process holding the node's tunnel binds it (told through the outbox), or the
        // one that takes the tunnel next.
        drop(listener);
        notify_holder(&fleet, &stored.node_id).await;
    } else if stored.gateway_port == gateway_port {
        start(&fleet, listener, stored.clone());
    }
    tracing::info!(operator = %e.created_by, node = %e.node_id, gateway_port, node_port = e.node_port, "exposure created");
    Ok(Json(view(&fleet, &stored)))
}

/// `GET /v1/exposures` (viewer or admin): every exposure.
pub async fn list(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Vec<ExposeView>>, ApiError> {
    need(&peer, Role::Viewer)?;
    let rows = fleet.db(|r| r.exposures()).await?;
    Ok(Json(rows.iter().map(|e| view(&fleet, e)).collect()))
}

/// `POST /v1/exposures/{gateway_port}/remove` (admin): stop the listener and forget it.
pub async fn remove(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(port): Path<u16>,
) -> Result<Json<ExposeView>, ApiError> {
    need(&peer, Role::Admin)?;
    let (operator, now) = (operator_name(&peer), crate::now_ms());
    let removed = fleet.db(move |r| r.remove_exposure(port, &operator, now)).await?;
    let Some(e) = removed else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no exposure on gateway port {port}"),
        ));
    };
    fleet.exposer.stop(port);
    if follows_tunnels(&fleet) {
        notify_holder(&fleet, &e.node_id).await;
    }
    tracing::info!(node = %e.node_id, gateway_port = port, "exposure removed");
    Ok(Json(view(&fleet, &e)))
}
