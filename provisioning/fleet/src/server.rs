//! The fleet server: one TLS 1.3 listener. After the handshake the ALPN decides: `hearth/1` →
//! a node's control session ([`crate::session`]); anything else → HTTP/1.1 + JSON under `/v1`
//! ([`crate::api`]). Client certificates are optional at the TLS layer (enrollment has none) and,
//! when present, must chain to the fleet CA and be within their validity; who may do what is
//! decided per request from the certificate's URI SAN ([`crate::ca::peer_of`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hearth_proto::control::{self, ControlMessage, Heartbeat};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::ca::{Ca, peer_of};
use crate::config::FleetConfig;
use crate::registry::{NewEvent, Registry, RegistryError, Seen};

/// Time allowed for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A node with a session now or recently.
#[derive(Debug)]
pub struct Live {
    /// Session number (a newer session replaces an older one).
    pub session: u64,
    /// Last heartbeat (or session start), ms since the Unix epoch.
    pub last_seen_ms: u64,
    /// The last heartbeat.
    pub heartbeat: Option<Heartbeat>,
    /// Protocol version of the session.
    pub protocol_version: u16,
    /// To the session's writer (None once it ended).
    pub tx: Option<mpsc::Sender<ControlMessage>>,
    /// Changed since the last flush.
    pub dirty: bool,
    /// Shown online.
    pub online: bool,
    /// Cancelled to end the session now (revocation, replacement by a newer session).
    pub kill: CancellationToken,
}

/// The fleet's shared state.
#[derive(Debug)]
pub struct Fleet {
    /// Configuration.
    pub config: FleetConfig,
    /// The CA.
    pub ca: Ca,
    /// The registry.
    pub registry: Arc<Registry>,
    /// Live nodes.
    pub live: Mutex<HashMap<String, Live>>,
    /// Node tunnels ([`crate::tunnel`]).
    pub gateway: crate::tunnel::Gateway,
    /// Customer ingress listeners ([`crate::expose`]).
    pub exposer: crate::expose::Exposer,
    /// Tunnels to the other gateway processes of this machine ([`crate::peer`]).
    pub peers: crate::peer::Peers,
    /// Enrollments, committed in groups ([`crate::enroll`]).
    pub enroller: crate::enroll::EnrollQueue,
    /// Liveness batches, written below the sessions' priority ([`crate::liveness`]).
    pub liveness: crate::liveness::LivenessWriter,
    /// Session events (`online`, `offline`) waiting for the sweep's next write.
    pub pending_events: Mutex<Vec<NewEvent>>,
    sessions: std::sync::atomic::AtomicU64,
    /// Pushes that found no session for their node ([`Fleet::push`]): a session that opens
    /// compares it before and after it registers, to catch a desired state changed in between
    /// ([`Fleet::missed_pushes`]).
    missed_pushes: std::sync::atomic::AtomicU64,
    /// The clock of rollouts and maintenance windows ([`crate::rollout::Clock`]).
    clock: std::sync::RwLock<Arc<dyn crate::rollout::Clock>>,
}

/// Why the fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The CA.
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    /// The registry.
    #[error("cannot open the registry {url}")]
    Registry {
        /// Its URL (without password).
        url: String,
        /// Why.
        #[source]
        source: RegistryError,
    },
    /// TLS setup.
    #[error("TLS setup failed")]
    Tls(#[from] rustls::Error),
    /// TLS setup.
    #[error("TLS client verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// TLS setup.
    #[error(transparent)]
    Pem(#[from] hearth_fleet_client::tls::TlsError),
    /// The enrollment or liveness writer thread.
    #[error("cannot start a registry writer thread")]
    Thread(#[source] std::io::Error),
    /// The gateway process's Unix socket ([`crate::peer`]).
    #[error("cannot listen on the gateway socket {path}")]
    Socket {
        /// The socket's path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Binding.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

impl Fleet {
    /// Load (or create) the CA and open the registry.
    pub fn open(config: FleetConfig) -> Result<Arc<Self>, StartError> {
        let ca = Ca::load_or_create(&config.state_dir, &config.name)?;
        let url = config.registry_url();
        let registry = Registry::open_url(&url)
            .map_err(|source| StartError::Registry { url: redact(&url), source })?;
        let registry = Arc::new(registry);
        let enroller =
            crate::enroll::EnrollQueue::start(registry.clone()).map_err(StartError::Thread)?;
        let liveness =
            crate::liveness::LivenessWriter::start(registry.clone()).map_err(StartError::Thread)?;
        Ok(Arc::new(Self {
            config,
            ca,
            enroller,
            liveness,
            pending_events: Mutex::new(Vec::new()),
            registry,
            live: Mutex::new(HashMap::new()),
            gateway: crate::tunnel::Gateway::default(),
            exposer: crate::expose::Exposer::default(),
            peers: crate::peer::Peers::default(),
            sessions: std::sync::atomic::AtomicU64::new(0),
            missed_pushes: std::sync::atomic::AtomicU64::new(0),
            clock: std::sync::RwLock::new(Arc::new(crate::rollout::SystemClock)),
        }))
    }

    /// Run a registry call on a blocking thread.
    pub async fn db<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> Result<R, RegistryError> + Send + 'static,
    ) -> Result<R, RegistryError> {
        let reg = self.registry.clone();
        match tokio::task::spawn_blocking(move || f(&reg)).await {
            Ok(r) => r,
            Err(e) => Err(RegistryError::Db(crate::registry::DbError {
                backend: "registry",
                what: "blocking task failed".into(),
                source: Box::new(e),
            })),
        }
    }

    /// The clock of rollouts and maintenance windows.
    pub fn clock(&self) -> Arc<dyn crate::rollout::Clock> {
        self.clock.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replace the clock of rollouts (tests move through maintenance windows with it).
    pub fn set_clock(&self, clock: Arc<dyn crate::rollout::Clock>) {
        *self.clock.write().unwrap_or_else(PoisonError::into_inner) = clock;
    }

    /// The live-node table.
    pub fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new session number.
    pub fn next_session(&self) -> u64 {
        self.sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    /// Send a message to a node's session if it has one; whether it was queued.
    pub fn push(&self, node: &str, msg: ControlMessage) -> bool {
        let tx = {
            let live = self.live();
            let tx = live.get(node).and_then(|l| l.tx.clone());
            if tx.is_none() {
                // Counted while the map is locked: a session registering after this lock sees
                // the count raised (see `missed_pushes`).
                self.missed_pushes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            tx
        };
        tx.is_some_and(|tx| tx.try_send(msg).is_ok())
    }

    /// How many pushes found no session so far. A session reads it before it reads its node's
    /// row and again once it is registered in [`Fleet::live`]: when it moved, a desired state
    /// may have been committed and pushed in between (and been missed), so the session reads the
    /// row again before it sends the desired state.
    pub fn missed_pushes(&self) -> u64 {
        self.missed_pushes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Send a node its desired state and pending commands again (after an operator changed
    /// them): at once when its session is in this process; through the registry's outbox when
    /// the fleet runs as several gateway processes and another one may hold it (that gateway
    /// picks it up within a second, [`deliver_notifications`]). Without a session anywhere,
    /// nothing to do: a session gets both when it opens.
    pub async fn notify(self: &Arc<Self>, node: &str, msg: ControlMessage) -> bool {
        if self.push(node, msg) {
            return true;
        }
        if self.config.gateway_id.is_some() {
            let id = node.to_string();
            if let Err(e) = self.db(move |r| r.notify_gateway(&id, crate::now_ms())).await {
                tracing::warn!(%node, error = %format!("{e:#}"), "cannot notify the node's gateway");
            }
        }
        false
    }

    /// Record an event with the sweep's next write (within a second).
    pub fn later_event(&self, node: &str, kind: &str, message: String, at_ms: u64) {
        self.pending_events.lock().unwrap_or_else(PoisonError::into_inner).push(NewEvent {
            at_ms,
            node: Some(node.to_string()),
            kind: kind.to_string(),
            message,
        });
    }

    /// Whether a node is online (a heartbeat within 3 intervals).
    pub fn online(&self, node: &str, now_ms: u64) -> Option<(bool, u64)> {
        self.live().get(node).map(|l| (is_fresh(l.last_seen_ms, now_ms), l.last_seen_ms))
    }

    fn tls_config(&self) -> Result<Arc<rustls::ServerConfig>, StartError> {
        let provider = hearth_fleet_client::tls::provider();
        let mut roots = RootCertStore::empty();
        for c in hearth_fleet_client::tls::certs_from_pem(self.ca.cert_pem(), "CA")? {
            roots.add(c)?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()?;
        let (issued, key_pem) = self.ca.server_cert(&self.config.name)?;
        let mut chain = hearth_fleet_client::tls::certs_from_pem(&issued.cert_pem, "server")?;
        chain.extend(hearth_fleet_client::tls::certs_from_pem(self.ca.cert_pem(), "CA")?);
        let key = hearth_fleet_client::tls::key_from_pem(&key_pem, "server")?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        // The server's order decides: a node offering both tunnel ids gets the one that carries
        // its session, unless `tunnel_sessions` is off.
        config.alpn_protocols = vec![control::ALPN.to_vec()];
        if self.config.tunnel_sessions {
            config.alpn_protocols.push(hearth_proto::mux::TUNNEL_SESSION_ALPN.to_vec());
        }
        config.alpn_protocols.extend([
            hearth_proto::mux::TUNNEL_ALPN.to_vec(),
            hearth_proto::lane::LANE_ALPN.to_vec(),
            b"http/1.1".to_vec(),
        ]);
        Ok(Arc::new(config))
    }
}

/// A heartbeat at `last` is recent enough at `now` (fewer than 3 intervals missed).
pub fn is_fresh(last_ms: u64, now_ms: u64) -> bool {
    let window =
        u64::from(control::HEARTBEAT_INTERVAL_S * control::MISSED_HEARTBEATS_OFFLINE) * 1000;
    now_ms.saturating_sub(last_ms) < window
}

/// A started fleet server.
#[derive(Debug)]
pub struct RunningFleet {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its state.
    pub fleet: Arc<Fleet>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningFleet {
    /// Stop accepting, flush liveness, stop.
    pub async fn stop(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// Open the fleet and start serving on `config.listen`.
pub async fn start(config: FleetConfig) -> Result<RunningFleet, StartError> {
    let addr = config.listen;
    let fleet = tokio::task::spawn_blocking(move || Fleet::open(config))
        .await
        .map_err(|e| StartError::Bind { addr, source: std::io::Error::other(e) })??;
    let tls = fleet.tls_config()?;
    let listener = listen(addr, fleet.config.reuse_port)
        .map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
    let cancel = CancellationToken::new();
    let router = crate::api::router(fleet.clone());
    let accept = tokio::spawn(accept_loop(
        fleet.clone(),
        listener,
        TlsAcceptor::from(tls),
        router,
        cancel.clone(),
    ));
    let sweep = tokio::spawn(sweep_loop(fleet.clone(), cancel.clone()));
    let mut tasks = vec![accept, sweep];
    match crate::peer::listen(&fleet, &cancel) {
        Ok(peer) => tasks.extend(peer),
        Err(source) => {
            cancel.cancel();
            let id = fleet.config.gateway_id.clone().unwrap_or_default();
            return Err(StartError::Socket { path: crate::peer::socket_path(&fleet, &id), source });
        }
    }
    crate::expose::restore(&fleet, &cancel).await;
    tracing::info!(%addr, name = %fleet.config.name, registry = fleet.registry.kind(), "fleet listening");
    Ok(RunningFleet { addr, fleet, cancel, tasks })
}

/// The listening socket (`SO_REUSEPORT` when several gateway processes share the address).
fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    if reuse_port {
        sock.set_reuseport(true)?;
    }
    sock.bind(addr)?;
    sock.listen(4096)
}

async fn accept_loop(
    fleet: Arc<Fleet>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: axum::Router,
    cancel: CancellationToken,
) {
    loop {
        let (tcp, from) = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let fleet = fleet.clone();
        let acceptor = acceptor.clone();
        let router = router.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%from, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%from, "TLS handshake timed out");
                    return;
                }
            };
            let (_, conn) = tls.get_ref();
            let is_session = conn.alpn_protocol() == Some(control::ALPN);
            let peer =
                peer_of(conn.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref()));
            if is_session {
                crate::session::serve(fleet, tls, peer, cancel).await;
            } else if conn.alpn_protocol() == Some(hearth_proto::mux::TUNNEL_ALPN) {
                hearth_fleet_client::tunnel::tune_tcp(tls.get_ref().0);
                crate::tunnel::serve(fleet, tls, peer, false, cancel).await;
            } else if conn.alpn_protocol() == Some(hearth_proto::mux::TUNNEL_SESSION_ALPN) {
                hearth_fleet_client::tunnel::tune_tcp(tls.get_ref().0);
                crate::tunnel::serve(fleet, tls, peer, true, cancel).await;
            } else if conn.alpn_protocol() == Some(hearth_proto::lane::LANE_ALPN) {
                hearth_fleet_client::tunnel::tune_tcp(tls.get_ref().0);
                crate::tunnel::serve_lane(fleet, tls, peer, cancel).await;
            } else {
                let svc = hyper_util::service::TowerToHyperService::new(
                    router.layer(axum::Extension(peer)),
                );
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
                tokio::select! {
                    r = conn => if let Err(e) = r { tracing::debug!(%from, error = %e, "HTTP connection ended"); },
                    () = cancel.cancelled() => {}
                }
            }
        });
    }
}

/// Every second: mark silent nodes offline (with an event); every `flush_interval_ms`: write
/// liveness to the registry in one batch. A last flush at shutdown.
async fn sweep_loop(fleet: Arc<Fleet>, cancel: CancellationToken) {
    let flush_every = Duration::from_millis(fleet.config.flush_interval_ms);
    let mut tick = tokio::time::interval(flush_every.min(Duration::from_secs(1)));
    let mut last_flush = tokio::time::Instant::now();
    let mut last_reconcile = tokio::time::Instant::now();
    loop {
        let stopping = tokio::select! {
            () = cancel.cancelled() => true,
            _ = tick.tick() => false,
        };
        let now = crate::now_ms();
        let went_offline: Vec<String> = {
            let mut live = fleet.live();
            live.iter_mut()
                .filter(|(_, l)| l.online && !is_fresh(l.last_seen_ms, now))
                .map(|(id, l)| {
                    l.online = false;
                    id.clone()
                })
                .collect()
        };
        for id in went_offline {
            tracing::info!(node = %id, "node offline (3 heartbeats missed)");
            fleet.later_event(&id, "offline", "3 heartbeats missed".into(), now);
        }
        let events = std::mem::take(
            &mut *fleet.pending_events.lock().unwrap_or_else(PoisonError::into_inner),
        );
        if !events.is_empty() {
            let n = events.len();
            if let Err(e) = fleet.db(move |r| r.events_batch(&events)).await {
                tracing::warn!(error = %format!("{e:#}"), events = n, "cannot record session events");
            }
        }
        if stopping || last_flush.elapsed() >= flush_every {
            last_flush = tokio::time::Instant::now();
            let batch: Vec<Seen> = {
                let mut live = fleet.live();
                live.iter_mut()
                    .filter(|(_, l)| l.dirty)
                    .map(|(id, l)| {
                        l.dirty = false;
                        Seen {
                            node_id: id.clone(),
                            last_seen_ms: l.last_seen_ms,
                            heartbeat: l.heartbeat.clone(),
                            protocol_version: l.protocol_version,
                            gateway: fleet.config.gateway_id.clone(),
                        }
                    })
                    .collect()
            };
            let n = batch.len();
            let started = std::time::Instant::now();
            match fleet.liveness.write(batch).await {
                Ok(()) if n > 0 => {
                    let elapsed_ms = started.elapsed().as_millis() as u64;
                    tracing::debug!(nodes = n, elapsed_ms, "liveness written");
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "liveness flush failed")
                }
            }
        }
        if let Some(gw) = &fleet.config.gateway_id
            && !stopping
        {
            deliver_notifications(&fleet, gw).await;
            if last_reconcile.elapsed() >= crate::expose::RECONCILE {
                last_reconcile = tokio::time::Instant::now();
                crate::expose::sync_listeners(&fleet).await;
            }
        }
        if !stopping {
            crate::rollout::drive(&fleet).await;
        }
        if stopping {
            return;
        }
    }
}

/// Outbox entries older than this are dropped (the node's session moved or ended; a session
/// gets its state when it opens).
const NOTIFY_EXPIRY_MS: u64 = 60_000;

/// Deliver what other gateway processes left in the outbox for nodes whose session this one
/// holds: the desired state and pending commands again (both idempotent on the node: the
/// desired state has a generation, commands an id), the node's exposures bound or released
/// ([`crate::expose::sync_listeners`]), or the end of the session if the node was revoked.
pub async fn deliver_notifications(fleet: &Arc<Fleet>, gateway: &str) {
    let gw = gateway.to_string();
    let now = crate::now_ms();
    let nodes = match fleet
        .db(move |r| r.take_notifications(&gw, now.saturating_sub(NOTIFY_EXPIRY_MS)))
        .await
    {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot read the gateway outbox");
            return;
        }
    };
    let any = !nodes.is_empty();
    for node in nodes {
        let id = node.clone();
        let row = fleet.db(move |r| r.node(&id)).await;
        let Ok(Some(row)) = row else { continue };
        if row.revoked {
            if let Some(l) = fleet.live().get_mut(&node) {
                l.tx = None;
                l.kill.cancel();
            }
            fleet.gateway.disconnect(&node);
            continue;
        }
        if !fleet.push(&node, ControlMessage::Desired(row.desired)) {
            continue;
        }
        let id = node.clone();
        // A pushed command only wakes the session's writer, which sends every unacked command
        // above the last it sent, in id order (`session.rs`).
        let pending = fleet.db(move |r| r.unacked_commands(&id, 0)).await.unwrap_or_default();
        for (cid, kind) in pending {
            if fleet.push(&node, ControlMessage::Command(control::Command { id: cid, kind })) {
                let _ = fleet.db(move |r| r.command_sent(cid)).await;
            }
        }
        tracing::debug!(%node, "delivered a change made through another gateway");
    }
    if any {
        // An exposure created or removed through another gateway, a revoked node's released.
        crate::expose::sync_listeners(fleet).await;
    }
}
