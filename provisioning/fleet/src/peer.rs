//! Relays between the gateway processes of one machine (several `gateway_id`s on one registry,
//! usually one address with `SO_REUSEPORT`, `docs/0005-fleet.md`).
//!
//! An operator's tunnel lands on whichever process the kernel picks, and the node's tunnel may be
//! on another. Each process listens on a Unix socket in the fleet's state directory
//! (`state_dir/gateways/ID.sock`, the directory 0700 beside the CA key: whoever can connect can
//! read the key). When a [`Target::Via`] stream names a node whose tunnel is not here, the
//! process that took the operator's stream checks the role and records the events as always, then
//! asks the registry which process holds the node's session, which rides its tunnel
//! (`node_liveness.gateway`), and opens the same `Via` stream on a tunnel to that process over
//! its socket ([`open_via`]); that process opens the inner target on the node's tunnel and
//! relays ([`serve_peer`]). One tunnel per peer process is kept and reused.
//!
//! Design: `docs/0006-tunnel.md`, "Several gateway processes".

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use hearth_fleet_client::tunnel::{Incoming, Tunnel, TunnelConfig, TunnelHandle, TunnelStream};
use hearth_proto::mux::{Side, Target, reset};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::server::Fleet;

/// Tunnels to the other gateway processes, by gateway id.
#[derive(Debug, Default)]
pub struct Peers {
    tunnels: Mutex<HashMap<String, TunnelHandle>>,
}

/// Why a stream could not be relayed to another gateway process.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The registry could not say where the node's session is.
    #[error("registry unavailable")]
    Registry(#[source] crate::registry::RegistryError),
    /// The holding process's socket did not answer.
    #[error("gateway {gateway} unreachable at {path}")]
    Connect {
        /// Its gateway id.
        gateway: String,
        /// Its socket.
        path: PathBuf,
        /// What connecting said.
        #[source]
        source: std::io::Error,
    },
    /// The tunnel to it refused the stream.
    #[error("gateway {gateway} took no stream")]
    Open {
        /// Its gateway id.
        gateway: String,
        /// What opening said.
        #[source]
        source: std::io::Error,
    },
}

/// The Unix socket of gateway process `gateway` of this fleet.
pub fn socket_path(fleet: &Fleet, gateway: &str) -> PathBuf {
    fleet.config.state_dir.join("gateways").join(format!("{gateway}.sock"))
}

/// Listen on this process's socket (several gateway processes only; `None` otherwise) until
/// `cancel`. A socket file left by an earlier run of the same gateway id is replaced.
pub fn listen(
    fleet: &Arc<Fleet>,
    cancel: &CancellationToken,
) -> std::io::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(id) = fleet.config.gateway_id.clone() else { return Ok(None) };
    let path = socket_path(fleet, &id);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    let (fleet, cancel) = (fleet.clone(), cancel.clone());
    Ok(Some(tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                () = cancel.cancelled() => break,
                r = listener.accept() => r,
            };
            match conn {
                Ok((stream, _)) => {
                    tokio::spawn(serve_peer(fleet.clone(), stream, cancel.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gateway socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    })))
}

/// Serve another gateway process's tunnel: each `Via` stream is opened on the named node's tunnel
/// here and relayed (the other process checked the operator's role and records the events);
/// anything else is refused.
async fn serve_peer(fleet: Arc<Fleet>, stream: UnixStream, cancel: CancellationToken) {
    let mut tunnel = Tunnel::spawn(stream, Side::Gateway, TunnelConfig::default());
    while let Some(Incoming { target, stream }) =
        crate::tunnel::next_stream(&mut tunnel, &cancel).await
    {
        let Target::Via { node, target: inner } = target else {
            stream.refuse(reset::REFUSED, "a gateway relays Via streams only");
            continue;
        };
        let Some(handle) = fleet.gateway.route(&node, &inner) else {
            stream.refuse(
                reset::UNREACHABLE,
                &format!("node {node} has no tunnel on this gateway any more"),
            );
            continue;
        };
        match handle.open(&inner) {
            Ok(far) => {
                tokio::spawn(hearth_fleet_client::tunnel::splice(stream, far));
            }
            Err(e) => {
                stream.refuse(reset::UNREACHABLE, &format!("cannot open a stream to {node}: {e}"))
            }
        }
    }
    tunnel.handle.close();
}

/// Open `Via { node, target }` on the gateway process that holds `node`'s session (and tunnel),
/// when that is another process of this fleet; `None` when no other process holds it.
pub async fn open_via(
    fleet: &Arc<Fleet>,
    node: &str,
    target: &Target,
) -> Result<Option<TunnelStream>, PeerError> {
    let Some(me) = fleet.config.gateway_id.clone() else { return Ok(None) };
    let id = node.to_string();
    let holder = fleet.db(move |r| r.session_gateway(&id)).await.map_err(PeerError::Registry)?;
    let Some(gateway) = holder.filter(|g| *g != me) else { return Ok(None) };
    let via = Target::Via { node: node.to_string(), target: Box::new(target.clone()) };
    let cached = lock(&fleet.peers.tunnels).get(&gateway).filter(|h| !h.is_ended()).cloned();
    let handle =
        match cached {
            Some(h) => h,
            None => {
                let path = socket_path(fleet, &gateway);
                let stream = UnixStream::connect(&path).await.map_err(|source| {
                    PeerError::Connect { gateway: gateway.clone(), path, source }
                })?;
                let tunnel = Tunnel::spawn(stream, Side::Node, TunnelConfig::default());
                lock(&fleet.peers.tunnels).insert(gateway.clone(), tunnel.handle.clone());
                tunnel.handle
            }
        };
    let stream = handle.open(&via).map_err(|source| PeerError::Open { gateway, source })?;
    Ok(Some(stream))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
