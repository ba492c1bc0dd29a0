//! The node's side of bulk lanes (`hearth_proto::lane`, `docs/0006-tunnel.md`, "Lanes"): when the
//! gateway offers lanes on the node's primary tunnel, [`Lanes::on_control`] opens up to that many
//! extra tunnel connections ([`connect_lane`]), each presenting the offer's token, serves the
//! streams the gateway opens on them like those of the primary, and reconnects a lane that drops
//! (full-jitter backoff, as the primary). Dropping [`Lanes`] (the primary tunnel ended) closes
//! them all.

use std::sync::Arc;

use hearth_proto::lane::{LANE_ALPN, LaneMsg, MAX_LANES, TOKEN_LEN};
use hearth_proto::mux::Side;
use tokio::sync::watch;

use super::{Incoming, Tunnel, TunnelConfig, TunnelError, tune_tcp};
use crate::backoff::{Backoff, os_random};
use crate::https::{ClientError, Endpoint, connect_tls};
use crate::tls::{ClientIdentity, client_config};

/// Connect one lane of the node's tunnel: TLS 1.3 with the pinned CA and the node's certificate,
/// ALPN [`LANE_ALPN`], the same TCP tuning as the primary; then the offer's `token` as the first
/// control message. The gateway closes a lane whose token matches none of its tunnels.
pub async fn connect_lane(
    ep: &Endpoint,
    pin: &str,
    identity: &ClientIdentity,
    token: [u8; TOKEN_LEN],
    config: TunnelConfig,
) -> Result<Tunnel, ClientError> {
    let tls_config = client_config(pin, Some(identity), LANE_ALPN)?;
    let tls = connect_tls(ep, tls_config).await?;
    tune_tcp(tls.get_ref().0);
    let tunnel = Tunnel::spawn(tls, Side::Node, config);
    tunnel.handle.send_control(&LaneMsg::Join { token }.encode()).map_err(|e| {
        ClientError::Connect { addr: ep.addr(), source: std::io::Error::other(e.to_string()) }
    })?;
    Ok(tunnel)
}

/// What serves a stream the gateway opened on a lane.
pub type Serve = Arc<dyn Fn(Incoming) + Send + Sync>;

/// The lanes of one primary tunnel (none until the gateway offers them). Dropping it closes them.
pub struct Lanes {
    ep: Endpoint,
    pin: String,
    identity: ClientIdentity,
    max: u8,
    serve: Serve,
    stop: Option<watch::Sender<bool>>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes").field("max", &self.max).field("open", &self.stop.is_some()).finish()
    }
}

impl Lanes {
    /// Lanes for the primary tunnel connected to `ep` with `identity`: at most `max` (capped at
    /// [`MAX_LANES`]; 0 ignores every offer). `serve` takes each stream the gateway opens on them.
    pub fn new(ep: Endpoint, pin: String, identity: ClientIdentity, max: u8, serve: Serve) -> Self {
        Self { ep, pin, identity, max: max.min(MAX_LANES), serve, stop: None }
    }

    /// A control message from the primary tunnel: an offer (re)starts the lanes; anything else is
    /// logged and ignored. Returns the lanes started.
    pub fn on_control(&mut self, payload: &[u8]) -> u8 {
        let (count, token) = match LaneMsg::decode(payload) {
            Ok(LaneMsg::Offer { count, token }) => (count, token),
            Ok(LaneMsg::Join { .. }) => {
                tracing::warn!("the gateway sent a lane join on the tunnel: ignored");
                return 0;
            }
            Err(e) => {
                tracing::warn!(error = %e, "unknown tunnel control message: ignored");
                return 0;
            }
        };
        let n = count.min(self.max);
        // A new offer replaces the lanes of an earlier one.
        drop(self.stop.take());
        if n == 0 {
            tracing::info!(offered = count, "lanes offered; none opened (tunnel.lanes = 0)");
            return 0;
        }
        let (stop, rx) = watch::channel(false);
        for lane in 0..n {
            tokio::spawn(keep_lane(
                self.ep.clone(),
                self.pin.clone(),
                self.identity.clone(),
                token,
                lane,
                self.serve.clone(),
                rx.clone(),
            ));
        }
        tracing::info!(lanes = n, offered = count, "tunnel lanes starting");
        self.stop = Some(stop);
        n
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}

/// Keep lane `lane` connected until `stop`: connect, serve, and on loss retry with backoff.
async fn keep_lane(
    ep: Endpoint,
    pin: String,
    identity: ClientIdentity,
    token: [u8; TOKEN_LEN],
    lane: u8,
    serve: Serve,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::default();
    loop {
        let started = tokio::time::Instant::now();
        let outcome = tokio::select! {
            _ = stop.changed() => return,
            r = connect_lane(&ep, &pin, &identity, token, TunnelConfig::default()) => r,
        };
        match outcome {
            Ok(mut tunnel) => {
                tracing::debug!(lane, gateway = %ep.addr(), "tunnel lane up");
                let why = loop {
                    tokio::select! {
                        _ = stop.changed() => {
                            tunnel.handle.close();
                            return;
                        }
                        why = tunnel.handle.ended() => break why,
                        inc = tunnel.incoming.recv() => match inc {
                            Some(inc) => serve(inc),
                            None => break TunnelError::Closed,
                        },
                    }
                };
                tracing::info!(lane, reason = %why, "tunnel lane down");
                backoff.session_ended(started.elapsed());
            }
            Err(e) => {
                // Recorded as an error, its sources are logged too.
                tracing::warn!(
                    lane,
                    error = &e as &dyn std::error::Error,
                    "tunnel lane connect failed"
                );
            }
        }
        let wait = backoff.next_delay(os_random());
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
