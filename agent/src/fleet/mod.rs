//! The `fleet` subsystem: joins the fleet named by the seed and keeps one control session.
//!
//! It finds the seed ([`seed`]), generates the node key at first boot (`state.dir/fleet/node.key`,
//! 0600, never sent), enrolls with the token, a CSR and the hardware identity ([`hardware`]),
//! retrying with full-jitter exponential backoff, and persists its [`state::Membership`]. Then it
//! holds one outbound mTLS session (the CA pinned by SHA-256, the fleet name from the seed), on
//! the node's tunnel when it is on and the gateway carries sessions (ALPN `hearth-tunnel/2`: one
//! connection, `docs/0006-tunnel.md`, "One connection"), else on its own (ALPN `hearth/1`): a
//! heartbeat every 10 s, desired state published on the agent's `desired` watch
//! channel, commands acked (reboot through [`reboot::Rebooter`]; drain and diagnostics are acked
//! "not supported yet"); a desired state naming `update_version` (a staged rollout) starts the
//! update client in-process (`docs/0009-updates.md`). It renews the certificate at half-life;
//! revoked, it stops and says so. READY never waits for it. The seed may name several gateways:
//! after a failure the next one is tried, and a network change ([`netwatch`]) cuts the retry wait
//! short; a session silent through an outage starts over when its tunnel reconnects
//! ([`stalled_behind_tunnel`]; `docs/0006-tunnel.md`, "Liveness"). Design: `docs/0005-fleet.md`.

pub mod commands;
pub mod hardware;
pub mod netwatch;
pub mod reboot;
pub mod seed;
pub mod state;
pub mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use hearth_fleet_client::https::Endpoint;
use hearth_fleet_client::seed::Seed;
use hearth_fleet_client::session::{Session, SessionError, read_message};
use hearth_fleet_client::tls::ClientIdentity;
use hearth_fleet_client::tunnel::TunnelConfig;
use hearth_proto::api::{FleetStatus, GpuVerdict};
use hearth_proto::control::{
    CommandAck, CommandKind, CommandOutcome, ControlMessage, DesiredState, HealthSummary,
    Heartbeat, NodeEvent, PowerSummary, Versions,
};
use hearth_proto::fleet::{EnrollRequest, HardwareIdentity};

use crate::agent::{Agent, now_ms};
use crate::persist::{self, Store};
use crate::supervisor::{BoxRun, RunCtx, Subsystem};
use state::Membership;

/// Backoff of enrollment and renewal: 1 s doubling to 5 min, full jitter.
pub const BACKOFF_BASE_MS: u64 = 1000;
/// See [`BACKOFF_BASE_MS`].
pub const BACKOFF_CAP_MS: u64 = 300_000;
/// Reconnection after a session (and the tunnel carrying it) ended: 1 s doubling to 60 s, full
/// jitter, from 1 s again after a session that lasted a minute or a network change
/// (`docs/0006-tunnel.md`, "Liveness").
pub const RECONNECT_CAP_MS: u64 = 60_000;
/// How long enrollment waits for the GPU layer's first inventory.
pub const INVENTORY_WAIT: Duration = Duration::from_secs(30);

/// How often the session reads the update state file for progress saved by another process
/// (the boot check unit, `update apply` by hand); the in-process updater's saves are reported
/// as they happen (`Updater::saved`).
pub const UPDATE_REPORT_POLL: Duration = Duration::from_secs(1);

/// How often to look for a seed when there is none.
pub const SEED_POLL: Duration = Duration::from_secs(30);

/// Whether a session that has heard nothing from the fleet for `silent` should start over now
/// that its tunnel (to the same gateway) has just reconnected, with heartbeats every `interval`.
///
/// The fleet answers every heartbeat, so a healthy session hears something at least once an
/// interval. The tunnel reconnects only after its connection failed (15 s of silence, a reset),
/// so a session silent for one and a half intervals rode out the same outage on its own TCP
/// connection, whose retransmission timer has backed off meanwhile: after a 30 s outage it
/// resent 9–18 s after the path returned (`docs/0006-tunnel.md`, "Liveness"). The tunnel's
/// reconnection proves the path works, so a new connection gets the session back at once.
pub fn stalled_behind_tunnel(silent: Duration, interval: Duration) -> bool {
    silent > interval + interval / 2
}

/// The fleet subsystem.
#[derive(Debug)]
pub struct Fleet {
    agent: Arc<Agent>,
    sources: Vec<Box<dyn seed::SeedSource>>,
    dmi: Box<dyn hardware::Dmi>,
    rebooter: Arc<dyn reboot::Rebooter>,
    /// Network changes cut a reconnect wait short ([`netwatch`]).
    netwatch: Arc<dyn netwatch::NetWatch>,
    /// What has been reported to the fleet: the last verdict-change `seq` and the last reboot
    /// request (advanced only after the fleet's connection took the message).
    reported: std::sync::Mutex<(u64, Option<String>)>,
    /// Commands started (exactly once across reconnects) and the log's save generation.
    commands: std::sync::Mutex<(u64, commands::CommandLog)>,
    /// The save generation of the update state last reported, and its phase and progress
    /// (`crate::update::report`): a state older than that generation is never reported.
    update_reported: std::sync::Mutex<(u64, Option<crate::update::report::Marker>)>,
    /// The updater that installs the release a rollout names in the desired state (None when
    /// `[update]` is off), and whether an install it started is running.
    updater: Option<Arc<crate::update::Updater>>,
    updating: Arc<std::sync::atomic::AtomicBool>,
}

impl Fleet {
    /// The fleet subsystem with the real (or, for the sim backend, simulated) touchpoints.
    pub fn new(agent: Arc<Agent>) -> Self {
        let cfg = &agent.config;
        let sources = seed::sources(cfg.fleet.seed.as_deref(), &cfg.state.dir);
        let (dmi, rebooter): (Box<dyn hardware::Dmi>, Arc<dyn reboot::Rebooter>) =
            match cfg.gpu.backend {
                crate::config::BackendKind::Sim => {
                    (Box::new(hardware::SimDmi { seed: cfg.sim.seed }), Arc::new(reboot::SimReboot))
                }
                crate::config::BackendKind::Nvml => {
                    (Box::new(hardware::SysfsDmi::default()), Arc::new(reboot::SystemctlReboot))
                }
            };
        let updater = match crate::update::system::updater(cfg) {
            Ok(u) => Some(Arc::new(u)),
            Err(e) => {
                tracing::info!(reason = %format!("{:#}", anyhow::Error::new(e)), "fleet-driven updates off");
                None
            }
        };
        let mut fleet = Self::with(agent, sources, dmi, rebooter)
            .with_netwatch(Arc::new(netwatch::Netlink::default()));
        fleet.updater = updater;
        fleet
    }

    /// Install releases named by the fleet's desired state with `updater` (tests give one on
    /// fake disks, ESP and boot loader).
    pub fn with_updater(mut self, updater: Arc<crate::update::Updater>) -> Self {
        self.updater = Some(updater);
        self
    }

    /// With a network change watch (the default of [`Fleet::with`] never reports a change).
    pub fn with_netwatch(mut self, netwatch: Arc<dyn netwatch::NetWatch>) -> Self {
        self.netwatch = netwatch;
        self
    }

    /// With given touchpoints (tests use fakes).
    pub fn with(
        agent: Arc<Agent>,
        sources: Vec<Box<dyn seed::SeedSource>>,
        dmi: Box<dyn hardware::Dmi>,
        rebooter: Arc<dyn reboot::Rebooter>,
    ) -> Self {
        Self {
            agent,
            sources,
            dmi,
            rebooter,
            netwatch: Arc::new(netwatch::Never::default()),
            reported: std::sync::Mutex::new((0, None)),
            commands: std::sync::Mutex::new((0, commands::CommandLog::default())),
            update_reported: std::sync::Mutex::new((0, None)),
            updater: None,
            updating: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// Start installing `version` (named by the desired state) in the background, unless an
    /// install is running or the node already tried it ([`crate::update::fleet_wants`]). The
    /// outcome is persisted in the update state and reported like any update.
    fn start_update(&self, channel: &str, version: &str) {
        let Some(updater) = self.updater.clone() else {
            tracing::warn!(
                version,
                "the fleet asks for an update but updates are off here ([update] metadata_url)"
            );
            return;
        };
        if self.updating.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let flag = self.updating.clone();
        let health = crate::update::system::snapshot(&self.agent.status());
        let version = version.to_string();
        let channel = channel.to_string();
        tokio::spawn(async move {
            match updater.apply_for_fleet(&channel, &version, health).await {
                Ok(Some(state)) => {
                    tracing::info!(%version, phase = state.phase.as_str(), "fleet-requested update")
                }
                Ok(None) => tracing::debug!(%version, "fleet-requested update already handled"),
                Err(e) => {
                    tracing::warn!(%version, error = %format!("{:#}", anyhow::Error::new(e)), "fleet-requested update failed")
                }
            }
            flag.store(false, std::sync::atomic::Ordering::SeqCst);
        });
    }

    /// Report `saved` (a state the in-process updater saved, with its generation), or else the
    /// state file's, when the update moved since the last report. A state older than the one
    /// last reported (the file was read after a later save) is not reported.
    async fn report_update<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        writer: &mut W,
        saved: Option<(u64, crate::update::state::UpdateState)>,
    ) -> Result<(), SessionError> {
        let saved = match saved {
            Some(s) => s,
            None => match crate::update::report::read_saved(&self.agent.config.state.dir) {
                Ok(s) => s,
                Err(_) => return Ok(()), // being replaced; the next save or poll has it
            },
        };
        let (generation, state) = saved;
        let (last_gen, last) =
            *self.update_reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if generation < last_gen {
            return Ok(());
        }
        let Some((report, marker)) = crate::update::report::due(&state, last.as_ref(), now_ms())
        else {
            return Ok(());
        };
        self.send(writer, &ControlMessage::Update(report)).await?;
        *self.update_reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            (generation, Some(marker));
        Ok(())
    }

    /// Health events not yet reported to the fleet, and the marker to record once they are sent.
    fn pending_events(&self) -> (Vec<ControlMessage>, (u64, Option<String>)) {
        let health = self.agent.health_watch().borrow().clone();
        let (last_seq, last_reboot) =
            self.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let mut out: Vec<ControlMessage> = health
            .history
            .iter()
            .filter(|c| c.seq > last_seq)
            .map(|c| {
                let mut message = format!("{}: {:?} -> {:?}", c.subject, c.from, c.to);
                if let Some(service) = &c.service {
                    message.push_str(&format!(", {service:?}"));
                }
                message.push_str(&format!(", action {:?}", c.action));
                if !c.reasons.is_empty() {
                    message.push_str(&format!(": {}", c.reasons.join("; ")));
                }
                ControlMessage::Event(NodeEvent { at_ms: c.at_ms, kind: "health".into(), message })
            })
            .collect();
        let seq = health.history.last().map_or(last_seq, |c| c.seq.max(last_seq));
        if health.reboot_requested != last_reboot
            && let Some(reason) = &health.reboot_requested
        {
            out.push(ControlMessage::Event(NodeEvent {
                at_ms: now_ms(),
                kind: "reboot_requested".into(),
                message: reason.clone(),
            }));
        }
        (out, (seq, health.reboot_requested))
    }

    /// Apply a newer desired state to the node: the power budget and the drain flag, each only
    /// when the fleet changed it (so a fleet that never set a budget leaves the local one).
    fn apply_desired(&self, prev: Option<&DesiredState>, d: &DesiredState) {
        let prev_budget = prev.and_then(|p| p.power_budget_w);
        if d.power_budget_w != prev_budget {
            tracing::info!(budget_w = ?d.power_budget_w, "power budget from the fleet");
            self.agent.set_power_budget(d.power_budget_w);
        }
        if d.drain != prev.is_some_and(|p| p.drain) {
            self.set_drained(d.drain);
        }
    }

    fn set_drained(&self, drained: bool) -> bool {
        match self.agent.monitor() {
            Some(m) => {
                m.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .set_drained(drained, now_ms());
                tracing::warn!(drained, "node drain set by the fleet");
                true
            }
            None => {
                tracing::warn!(
                    drained,
                    "node drain from the fleet: the health subsystem is not running"
                );
                false
            }
        }
    }

    fn publish(&self, f: impl FnOnce(&mut FleetStatus)) {
        self.agent.fleet_status().send_modify(f);
    }

    fn key_pem(&self) -> anyhow::Result<String> {
        let dir = self.agent.config.state.dir.join("fleet");
        persist::ensure_dir(&dir)?;
        let path = dir.join("node.key");
        match std::fs::read_to_string(&path) {
            Ok(k) => Ok(k),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = hearth_fleet_client::identity::generate_key_pem()?;
                persist::write_atomic(&path, k.as_bytes())?;
                tracing::info!(path = %path.display(), "generated the node identity key");
                Ok(k)
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot read {}", path.display()))),
        }
    }

    fn enroll_request(&self, seed: &Seed, key: &str) -> anyhow::Result<EnrollRequest> {
        let (dmi_uuid, board_serial) = self.dmi.identity()?;
        let snap = self.agent.gpus().borrow().clone();
        let gpus: Vec<_> = snap.gpus.iter().map(|g| g.inventory.clone()).collect();
        Ok(EnrollRequest {
            token: seed.fleet.token.clone(),
            csr_pem: hearth_fleet_client::identity::csr_pem(key, &self.agent.hostname)?,
            hardware: HardwareIdentity {
                dmi_uuid,
                board_serial,
                gpu_uuids: gpus.iter().map(|g| g.uuid.clone()).collect(),
            },
            hostname: self.agent.hostname.clone(),
            gpus,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    fn heartbeat(&self, seq: u64, desired_generation: u64) -> ControlMessage {
        let status = self.agent.status();
        let power = self.agent.power();
        let count = |v| status.gpus.iter().filter(|g| g.health.verdict == v).count() as u32;
        ControlMessage::Heartbeat(Heartbeat {
            seq,
            at_ms: now_ms(),
            state: status.state,
            health: HealthSummary {
                gpus: status.gpus.len() as u32,
                healthy: count(GpuVerdict::Healthy),
                degraded: count(GpuVerdict::Degraded),
                failed: count(GpuVerdict::Failed),
            },
            power: PowerSummary {
                draw_w: (power.total_draw_mw / 1000) as u32,
                limit_w: (power.gpus.iter().filter_map(|g| g.limit_mw).map(u64::from).sum::<u64>()
                    / 1000) as u32,
            },
            versions: Versions {
                agent: status.agent_version,
                driver: status.driver.map(|d| d.driver_version),
                // The booted slot's version: a rollout does not tell a node already on it.
                os: self.updater.as_ref().and_then(|u| u.running_version()),
            },
            desired_generation,
        })
    }

    async fn sleep_or_cancel(ctx: &RunCtx, d: Duration) -> bool {
        tokio::select! {
            () = ctx.cancel.cancelled() => true,
            () = tokio::time::sleep(d) => false,
        }
    }

    async fn run_inner(self: Arc<Self>, ctx: RunCtx) -> anyhow::Result<()> {
        let store = Store::new(self.agent.config.state.dir.join("fleet.json"));
        persist::ensure_dir(&self.agent.config.state.dir)?;
        let mut attempt = 0u32;
        // Which of the seed's gateways is in use: the next one after a failure.
        let mut gateway = 0usize;
        let mut net = self.netwatch.subscribe();
        let backoff = |attempt: u32| {
            Duration::from_millis(state::backoff_ms(
                attempt,
                BACKOFF_BASE_MS,
                BACKOFF_CAP_MS,
                rand_unit(),
            ))
        };
        loop {
            let loaded = store.load::<Membership>()?;
            let (generation, membership) =
                loaded.map_or((0, Membership::Unenrolled), |l| (l.generation, l.state));
            let found = seed::discover(&self.sources);
            let (seed, origin) = match found {
                Ok(Some(s)) => s,
                Ok(None) => {
                    self.publish(|s| {
                        s.state = "no-seed".into();
                        s.last_error = Some("no seed found (see docs/operations.md)".into());
                    });
                    if Self::sleep_or_cancel(&ctx, SEED_POLL).await {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => {
                    let msg = format!("{:#}", anyhow::Error::new(e));
                    tracing::error!(error = %msg, "seed unusable");
                    self.publish(|s| {
                        s.state = "bad-seed".into();
                        s.last_error = Some(msg);
                    });
                    if Self::sleep_or_cancel(&ctx, SEED_POLL).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            let endpoints = seed.endpoints()?;
            let pick = gateway % endpoints.len();
            let ep = endpoints.get(pick).cloned().context("the seed names no gateway")?;
            let url = std::iter::once(&seed.fleet.url).chain(&seed.fleet.fallback_urls).nth(pick);
            let pin = seed.fleet.ca_sha256.clone();
            self.publish(|s| s.fleet_url = url.cloned());
            let key = self.key_pem()?;
            match membership {
                Membership::Revoked { node_id, reason } => {
                    tracing::error!(node = %node_id, %reason, "this node was revoked by the fleet: not serving the fleet");
                    self.publish(|s| {
                        s.state = "revoked".into();
                        s.node_id = Some(node_id.clone());
                        s.last_error = Some(reason.clone());
                    });
                    ctx.cancel.cancelled().await;
                    return Ok(());
                }
                Membership::Unenrolled => {
                    self.publish(|s| s.state = "enrolling".into());
                    // The registry records the inventory sent at enrollment: give the GPU layer
                    // its first sampling round (bounded: a node without a working driver
                    // enrolls with no GPUs and says why in its heartbeats).
                    let mut gpus_rx = self.agent.gpus().subscribe();
                    tokio::select! {
                        () = ctx.cancel.cancelled() => return Ok(()),
                        _ = tokio::time::timeout(INVENTORY_WAIT, gpus_rx.wait_for(|s| s.rounds > 0)) => {}
                    }
                    let req = self.enroll_request(&seed, &key)?;
                    match hearth_fleet_client::enroll::enroll(&ep, &pin, &req).await {
                        Ok(resp) => {
                            tracing::info!(node = %resp.node_id, seed = %origin, "enrolled");
                            store.save(generation + 1, &Membership::certified(resp))?;
                            attempt = 0;
                        }
                        Err(e) => {
                            let msg = format!("{:#}", anyhow::Error::new(e));
                            let wait = backoff(attempt);
                            attempt = attempt.saturating_add(1);
                            gateway = gateway.wrapping_add(1);
                            tracing::warn!(error = %msg, retry_in_ms = wait.as_millis() as u64, "enrollment failed");
                            self.publish(|s| s.last_error = Some(format!("enrollment: {msg}")));
                            match netwatch::wait_retry(&ctx.cancel, wait, &mut net).await {
                                netwatch::Retry::Cancelled => return Ok(()),
                                netwatch::Retry::NetworkChanged => attempt = 0,
                                netwatch::Retry::Waited => {}
                            }
                        }
                    }
                }
                Membership::Enrolled(e) => {
                    let identity =
                        ClientIdentity { cert_pem: e.cert_pem.clone(), key_pem: key.clone() };
                    self.publish(|s| {
                        s.node_id = Some(e.node_id.clone());
                        s.cert_not_after_ms = Some(e.not_after_ms);
                    });
                    if now_ms() >= e.renew_at_ms() {
                        let csr =
                            hearth_fleet_client::identity::csr_pem(&key, &self.agent.hostname)?;
                        match hearth_fleet_client::enroll::renew(&ep, &pin, &identity, &csr).await {
                            Ok(resp) => {
                                tracing::info!(node = %resp.node_id, "certificate renewed");
                                store.save(generation + 1, &Membership::certified(resp))?;
                                attempt = 0;
                                continue;
                            }
                            Err(err) => {
                                let msg = format!("{:#}", anyhow::Error::new(err));
                                tracing::warn!(error = %msg, "certificate renewal failed");
                                self.publish(|s| s.last_error = Some(format!("renewal: {msg}")));
                                if now_ms() >= e.not_after_ms {
                                    let wait = backoff(attempt);
                                    attempt = attempt.saturating_add(1);
                                    if Self::sleep_or_cancel(&ctx, wait).await {
                                        return Ok(());
                                    }
                                    continue;
                                }
                            }
                        }
                    }
                    let started = tokio::time::Instant::now();
                    match self.session(&ctx, &ep, &pin, &identity, e.renew_at_ms()).await {
                        Ok(()) => return Ok(()),
                        Err(SessionError::Refused { reason, revoked: true }) => {
                            let next = Membership::Enrolled(e).revoked(&reason);
                            store.save(generation + 1, &next)?;
                            continue;
                        }
                        Err(err) => {
                            if started.elapsed() > Duration::from_secs(60) {
                                attempt = 0;
                            }
                            // A stalled session's gateway is reachable (its tunnel just
                            // reconnected): the next try goes to it again; after any other
                            // failure, to the seed's next gateway (docs/0006-tunnel.md).
                            if !matches!(err, SessionError::Stalled { .. }) {
                                gateway = gateway.wrapping_add(1);
                            }
                            let msg = format!("{:#}", anyhow::Error::new(err));
                            let wait = Duration::from_millis(state::backoff_ms(
                                attempt,
                                BACKOFF_BASE_MS,
                                RECONNECT_CAP_MS,
                                rand_unit(),
                            ));
                            attempt = attempt.saturating_add(1);
                            tracing::warn!(error = %msg, retry_in_ms = wait.as_millis() as u64, gateways = endpoints.len(), "fleet session ended");
                            self.publish(|s| {
                                s.state = "disconnected".into();
                                s.last_error = Some(msg);
                            });
                            match netwatch::wait_retry(&ctx.cancel, wait, &mut net).await {
                                netwatch::Retry::Cancelled => return Ok(()),
                                netwatch::Retry::NetworkChanged => attempt = 0,
                                netwatch::Retry::Waited => {}
                            }
                        }
                    }
                }
            }
        }
    }

    /// One session until cancelled (Ok), renewal is due (Err Protocol "renewal due"), or failure.
    async fn session(
        &self,
        ctx: &RunCtx,
        ep: &Endpoint,
        pin: &str,
        identity: &ClientIdentity,
        renew_at_ms: u64,
    ) -> Result<(), SessionError> {
        let version = env!("CARGO_PKG_VERSION");
        let targets = Arc::new(tunnel::Targets {
            api_socket: self.agent.config.api.socket.clone(),
            policy: self.agent.config.tunnel.clone(),
        });
        // With the tunnel on, the session rides it when the gateway can (one connection, and the
        // tunnel's pings and reconnection are the session's); an older gateway needs a separate
        // `hearth/1` session (docs/0006-tunnel.md, "One connection").
        let mut carried = None;
        if self.agent.config.tunnel.enabled {
            let (t, with_session) = hearth_fleet_client::tunnel::connect_node(
                ep,
                pin,
                identity,
                TunnelConfig::default(),
            )
            .await?;
            if with_session {
                match Session::on_tunnel(&t.handle, version).await {
                    Ok(s) => carried = Some((s, t)),
                    Err(e) => {
                        t.handle.close();
                        return Err(e);
                    }
                }
            } else {
                tracing::info!(gateway = %ep.addr(), "the gateway does not carry the session on the tunnel: a separate session");
                t.handle.close();
            }
        }
        // The tunnel lives as long as this session (docs/0006-tunnel.md). A separate tunnel
        // counts its connections on `tunnel_up` (a reconnection can tell this session it is
        // stalled); one that carries the session ends it when it ends.
        let (tunnel_up_tx, mut tunnel_up) = tokio::sync::watch::channel(0u64);
        let stop = ctx.cancel.child_token();
        let (s, tunnel_task) = match carried {
            Some((s, mut t)) => {
                let (ep, pin, identity) = (ep.clone(), pin.to_string(), identity.clone());
                let (stats, stop) = (self.agent.link_stats.clone(), stop.clone());
                let task = tokio::spawn(async move {
                    tunnel::serve_tunnel(&mut t, &ep, &pin, &identity, &targets, &stats, &stop)
                        .await;
                    t.handle.close();
                });
                (s, Some(task))
            }
            None => {
                let s = Session::open(ep, pin, identity, version).await?;
                let task = self.agent.config.tunnel.enabled.then(|| {
                    tokio::spawn(tunnel::run(
                        ep.clone(),
                        pin.to_string(),
                        identity.clone(),
                        targets,
                        stop.clone(),
                        self.agent.link_stats.clone(),
                        self.netwatch.subscribe(),
                        tunnel_up_tx.clone(),
                    ))
                });
                (s, task)
            }
        };
        let Session { mut reader, mut writer, welcome } = s;
        tracing::info!(node = %welcome.node_id, version = welcome.protocol_version, "fleet session open");
        self.load_commands(&welcome.node_id);
        self.publish(|st| {
            st.state = "connected".into();
            st.last_error = None;
        });
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let stats = self.agent.link_stats.clone();
        crate::telemetry::LinkStats::add(&stats.session_opens, 1);
        stats.session_up.store(true, std::sync::atomic::Ordering::Relaxed);
        let reader_stats = stats.clone();
        let reader_task = tokio::spawn(async move {
            loop {
                let m = read_message(&mut reader).await;
                if let Ok(m) = &m {
                    let n = crate::telemetry::LinkStats::frame_len(m);
                    crate::telemetry::LinkStats::add(&reader_stats.session_bytes_received, n);
                }
                let end = m.is_err();
                if tx.send(m).await.is_err() || end {
                    return;
                }
            }
        });
        let interval = Duration::from_secs(u64::from(welcome.heartbeat_interval_s.max(1)));
        let mut tick = tokio::time::interval(interval);
        // Update progress goes out as each state is saved (`Updater::saved`; a rollout waits on
        // it), and within a second for saves by another process (the state file's poll).
        let mut update_tick = tokio::time::interval(UPDATE_REPORT_POLL);
        let mut saved_rx = self.updater.as_ref().map(|u| u.saved());
        let silence = interval * hearth_proto::control::MISSED_HEARTBEATS_OFFLINE + interval / 2;
        let mut heard = tokio::time::Instant::now();
        let mut seq = 0u64;
        let mut health_rx = self.agent.health_watch();
        health_rx.mark_changed();
        let renew_in = Duration::from_millis(renew_at_ms.saturating_sub(now_ms()));
        let renew = tokio::time::sleep(renew_in);
        tokio::pin!(renew);
        let result = loop {
            tokio::select! {
                () = ctx.cancel.cancelled() => break Ok(()),
                () = &mut renew => break Err(SessionError::Protocol("certificate renewal due".into())),
                _ = tick.tick() => {
                    // The fleet acks every heartbeat: silence means a dead path (TCP may keep
                    // retransmitting into it for many minutes).
                    if heard.elapsed() > silence {
                        break Err(SessionError::Protocol(format!("nothing from the fleet for {} s", silence.as_secs())));
                    }
                    if let Err(e) = self.upload_summaries(&mut writer).await {
                        break Err(e);
                    }
                    seq += 1;
                    let gen_ = self.agent.desired().borrow().as_ref().map_or(0, |d| d.generation);
                    if let Err(e) = self.send(&mut writer, &self.heartbeat(seq, gen_)).await {
                        break Err(e);
                    }
                }
                _ = update_tick.tick() => {
                    // The in-process updater's saves first, in order; then the file, for saves
                    // by another process (the boot check unit, `update apply` by hand).
                    let mut failed = None;
                    while let Some(Ok(s)) = saved_rx.as_mut().map(|r| r.try_recv()) {
                        if let Err(e) = self.report_update(&mut writer, Some(s)).await {
                            failed = Some(e);
                            break;
                        }
                    }
                    if let Some(e) = failed {
                        break Err(e);
                    }
                    if let Err(e) = self.report_update(&mut writer, None).await {
                        break Err(e);
                    }
                }
                saved = next_saved(&mut saved_rx) => {
                    // Every phase, however short, as soon as it is saved.
                    if let Err(e) = self.report_update(&mut writer, saved).await {
                        break Err(e);
                    }
                }
                Ok(()) = health_rx.changed() => {
                    let (events, marker) = self.pending_events();
                    let mut failed = None;
                    for e in &events {
                        if let Err(err) = self.send(&mut writer, e).await {
                            failed = Some(err);
                            break;
                        }
                    }
                    if let Some(e) = failed {
                        break Err(e);
                    }
                    *self.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = marker;
                }
                Ok(()) = tunnel_up.changed() => {
                    let silent = heard.elapsed();
                    if stalled_behind_tunnel(silent, interval) {
                        break Err(SessionError::Stalled { silent_s: silent.as_secs() });
                    }
                }
                m = rx.recv() => {
                    let m = match m {
                        Some(Ok(m)) => {
                            heard = tokio::time::Instant::now();
                            m
                        }
                        Some(Err(e)) => break Err(e),
                        None => break Err(SessionError::Protocol("reader ended".into())),
                    };
                    if let Some(reply) = self.handle(m)
                        && let Err(e) = self.send(&mut writer, &reply).await
                    {
                        break Err(e);
                    }
                }
            }
        };
        reader_task.abort();
        stats.session_up.store(false, std::sync::atomic::Ordering::Relaxed);
        stop.cancel();
        if let Some(task) = tunnel_task {
            let _ = task.await;
        }
        result
    }

    /// Write one control message, counting its bytes (and heartbeats) for `/metrics`.
    async fn send<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        writer: &mut W,
        msg: &ControlMessage,
    ) -> Result<(), SessionError> {
        hearth_fleet_client::session::write_message(writer, msg).await?;
        let stats = &self.agent.link_stats;
        crate::telemetry::LinkStats::add(
            &stats.session_bytes_sent,
            crate::telemetry::LinkStats::frame_len(msg),
        );
        if matches!(msg, ControlMessage::Heartbeat(_)) {
            crate::telemetry::LinkStats::add(&stats.heartbeats_sent, 1);
        }
        Ok(())
    }

    /// Send the next batch of offline summaries, if any are pending.
    async fn upload_summaries<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        writer: &mut W,
    ) -> Result<(), SessionError> {
        let Some(spool) = self.agent.offline_spool() else { return Ok(()) };
        let batch = spool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pending(crate::telemetry::offline::BATCH);
        if batch.is_empty() {
            return Ok(());
        }
        tracing::info!(summaries = batch.len(), "uploading offline summaries");
        self.send(writer, &ControlMessage::Summaries(batch)).await
    }

    fn commands_store(&self) -> Store {
        Store::new(self.agent.config.state.dir.join("commands.json"))
    }

    /// Load the command log of `node_id` (a missing or unreadable file starts an empty one; an
    /// unreadable one is logged: commands it covered could run again).
    fn load_commands(&self, node_id: &str) {
        let loaded = match self.commands_store().load::<commands::CommandLog>() {
            Ok(l) => l.map(|l| (l.generation, l.state)),
            Err(e) => {
                tracing::error!(error = %format!("{:#}", anyhow::Error::new(e)), "command log unreadable: starting a new one");
                None
            }
        };
        let mut log = self.commands.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if log.1.node_id == node_id {
            return;
        }
        let (generation, prev) = loaded.map_or((0, None), |(g, l)| (g, Some(l)));
        *log = (generation, commands::CommandLog::for_node(node_id, prev));
    }

    fn handle(&self, m: ControlMessage) -> Option<ControlMessage> {
        match m {
            ControlMessage::SummariesAck { seq } => {
                let spool = self.agent.offline_spool()?;
                let mut spool = spool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Err(e) = spool.ack(seq) {
                    tracing::warn!(error = %format!("{:#}", anyhow::Error::new(e)), "cannot forget acked summaries (they are sent again)");
                }
                // The next batch right away.
                let batch = spool.pending(crate::telemetry::offline::BATCH);
                (!batch.is_empty()).then_some(ControlMessage::Summaries(batch))
            }
            ControlMessage::Desired(d) => {
                let newer = self
                    .agent
                    .desired()
                    .borrow()
                    .as_ref()
                    .is_none_or(|c| d.generation >= c.generation);
                if newer {
                    let prev = self.agent.desired().borrow().clone();
                    self.apply_desired(prev.as_ref(), &d);
                    tracing::info!(generation = d.generation, drain = d.drain, power_budget_w = ?d.power_budget_w, "desired state");
                    self.publish(|s| s.desired_generation = Some(d.generation));
                    if let Some(v) = &d.update_version {
                        self.start_update(&d.update_channel, v);
                    }
                    self.agent.desired().send_replace(Some(d));
                }
                None
            }
            ControlMessage::Command(c) => {
                let mut log =
                    self.commands.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match log.1.arrival(c.id) {
                    commands::Arrival::Repeat(outcome) => {
                        tracing::info!(id = c.id, kind = ?c.kind, ?outcome, "fleet command repeated: acked again, not run");
                        return Some(ControlMessage::CommandAck(CommandAck { id: c.id, outcome }));
                    }
                    commands::Arrival::New => {
                        let mut next = log.1.clone();
                        next.begin(c.id);
                        if let Err(e) = self.commands_store().save(log.0 + 1, &next) {
                            let msg = format!("{:#}", anyhow::Error::new(e));
                            tracing::error!(id = c.id, error = %msg, "cannot record a fleet command: not run");
                            let outcome = CommandOutcome::Failed(format!("not run: {msg}"));
                            return Some(ControlMessage::CommandAck(CommandAck {
                                id: c.id,
                                outcome,
                            }));
                        }
                        *log = (log.0 + 1, next);
                    }
                }
                let outcome = match c.kind {
                    CommandKind::Reboot => match self.rebooter.reboot() {
                        Ok(()) => CommandOutcome::Accepted,
                        Err(e) => CommandOutcome::Failed(e.to_string()),
                    },
                    CommandKind::Drain => {
                        if self.set_drained(true) {
                            CommandOutcome::Accepted
                        } else {
                            CommandOutcome::Failed("the health subsystem is not running".into())
                        }
                    }
                    CommandKind::RunDiagnostics => CommandOutcome::NotSupported(
                        "diagnostics run on one quarantined, idle GPU named on the node \
                         (`hearth-agent health diag --gpu N`); this command names none"
                            .into(),
                    ),
                };
                tracing::info!(id = c.id, kind = ?c.kind, ?outcome, "fleet command");
                log.1.finish(c.id, outcome.clone());
                Some(ControlMessage::CommandAck(CommandAck { id: c.id, outcome }))
            }
            ControlMessage::HeartbeatAck { .. } => None,
            other => {
                tracing::debug!(?other, "unexpected message from the fleet: ignored");
                None
            }
        }
    }
}

fn rand_unit() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

impl Subsystem for Fleet {
    fn name(&self) -> &'static str {
        "fleet"
    }

    fn run(self: Arc<Self>, ctx: RunCtx) -> BoxRun {
        Box::pin(async move {
            // READY never waits for the fleet.
            ctx.ready();
            self.run_inner(ctx).await
        })
    }
}

/// The next state the in-process updater saved, with its generation; `None` when this
/// receiver fell behind (the caller reads the state file instead). Never ready without an
/// updater.
async fn next_saved(
    rx: &mut Option<tokio::sync::broadcast::Receiver<(u64, crate::update::state::UpdateState)>>,
) -> Option<(u64, crate::update::state::UpdateState)> {
    use tokio::sync::broadcast::error::RecvError;
    let Some(rx) = rx else { return std::future::pending().await };
    match rx.recv().await {
        Ok(s) => Some(s),
        Err(RecvError::Lagged(_)) => None,
        Err(RecvError::Closed) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_restarts_on_a_tunnel_reconnection_only_after_missing_heartbeat_answers() {
        let every = Duration::from_secs(10);
        // Heard within the last interval, or a little late: a healthy session whose tunnel alone
        // reconnected (a gateway's tunnel restarted) keeps its connection.
        assert!(!stalled_behind_tunnel(Duration::ZERO, every));
        assert!(!stalled_behind_tunnel(Duration::from_secs(12), every));
        assert!(!stalled_behind_tunnel(Duration::from_secs(15), every));
        // Silent through an outage the tunnel needed 15 s to notice: start over.
        assert!(stalled_behind_tunnel(Duration::from_millis(15_001), every));
        assert!(stalled_behind_tunnel(Duration::from_secs(31), every));
        // The threshold follows the interval the fleet sets.
        assert!(!stalled_behind_tunnel(Duration::from_secs(40), Duration::from_secs(30)));
        assert!(stalled_behind_tunnel(Duration::from_secs(46), Duration::from_secs(30)));
    }
}
