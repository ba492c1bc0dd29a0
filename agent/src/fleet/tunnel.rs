//! The node's end of the secure tunnel: while the node is enrolled it keeps one outbound tunnel
//! connection to the fleet (the node certificate, the pinned CA, TCP keepalive and user timeout)
//! and serves the streams the gateway opens on it ([`serve_tunnel`]). Nothing listens on the
//! node: every stream arrives over the connection the node made. The control session connects it
//! (`hearth_fleet_client::tunnel::connect_node`) and rides it when the gateway takes ALPN
//! `hearth-tunnel/2`; with an older gateway, [`run`] keeps a `hearth-tunnel/1` tunnel of its own
//! beside the session.
//!
//! Targets ([`Target`]): the local API (relayed to the API's Unix socket), `exec` (a process with
//! stdin, stdout and stderr on the stream; a non-zero exit comes back as the reset code
//! [`reset::EXIT`]` + status` after all output), loopback ports in `tunnel.expose_ports`, and
//! `echo` (diagnostics), and interactive login shells on a PTY ([`shell`]). A lost connection is
//! retried with full-jitter backoff (1 s .. 60 s, reset after a minute up). When the gateway
//! offers lanes, up to `tunnel.lanes` extra connections carry its port streams
//! ([`Lanes`]). Design: `docs/0006-tunnel.md`.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use hearth_fleet_client::backoff::{Backoff, os_random};
use hearth_fleet_client::https::Endpoint;
use hearth_fleet_client::tls::ClientIdentity;
use hearth_fleet_client::tunnel::lanes::{Lanes, Serve};
use hearth_fleet_client::tunnel::{
    Incoming, Tunnel, TunnelConfig, TunnelStream, connect, connect_loopback,
};
use hearth_proto::mux::{Target, reset};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use std::sync::atomic::Ordering;

use crate::config::TunnelConfig as Policy;
use crate::telemetry::LinkStats;

/// What the node serves over its tunnel.
#[derive(Debug, Clone)]
pub struct Targets {
    /// The local API's Unix socket.
    pub api_socket: PathBuf,
    /// The `[tunnel]` policy.
    pub policy: Policy,
}

/// Keep a tunnel to the fleet until `cancel`: connect, serve, and on loss retry with backoff, at
/// once when `net` reports a network change. `up` counts the connections made (the control
/// session learns from a reconnection that the path works again).
#[allow(clippy::too_many_arguments)] // one call site, each argument a different part of the node
pub async fn run(
    ep: Endpoint,
    pin: String,
    identity: ClientIdentity,
    targets: Arc<Targets>,
    cancel: CancellationToken,
    stats: Arc<LinkStats>,
    mut net: tokio::sync::watch::Receiver<u64>,
    up: tokio::sync::watch::Sender<u64>,
) {
    let mut backoff = Backoff::default();
    loop {
        let started = tokio::time::Instant::now();
        let outcome = tokio::select! {
            () = cancel.cancelled() => return,
            r = connect(&ep, &pin, &identity, TunnelConfig::default()) => r,
        };
        match outcome {
            Ok(mut tunnel) => {
                up.send_modify(|n| *n += 1);
                let cancelled =
                    serve_tunnel(&mut tunnel, &ep, &pin, &identity, &targets, &stats, &cancel)
                        .await;
                tunnel.handle.close();
                if cancelled {
                    return;
                }
                backoff.session_ended(started.elapsed());
            }
            Err(e) => {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::new(e)), "tunnel connect failed");
            }
        }
        let wait = backoff.next_delay(os_random());
        tracing::info!(retry_in_ms = wait.as_millis() as u64, "tunnel reconnect scheduled");
        match super::netwatch::wait_retry(&cancel, wait, &mut net).await {
            super::netwatch::Retry::Cancelled => return,
            super::netwatch::Retry::NetworkChanged => backoff.network_changed(),
            super::netwatch::Retry::Waited => {}
        }
    }
}

/// Serve the streams the gateway opens on one connected tunnel, and the lanes it offers (they
/// close with it), until the tunnel ends (false) or `cancel` (true). The caller closes it.
pub async fn serve_tunnel(
    tunnel: &mut Tunnel,
    ep: &Endpoint,
    pin: &str,
    identity: &ClientIdentity,
    targets: &Arc<Targets>,
    stats: &Arc<LinkStats>,
    cancel: &CancellationToken,
) -> bool {
    tracing::info!(gateway = %ep.addr(), "tunnel up");
    LinkStats::add(&stats.tunnel_connects, 1);
    stats.tunnel_up.store(true, Ordering::Relaxed);
    let serve: Serve = {
        let (targets, stats) = (targets.clone(), stats.clone());
        Arc::new(move |inc| {
            tokio::spawn(serve_counted(targets.clone(), inc, stats.clone()));
        })
    };
    let mut lanes =
        Lanes::new(ep.clone(), pin.to_string(), identity.clone(), targets.policy.lanes, serve);
    let cancelled = loop {
        tokio::select! {
            () = cancel.cancelled() => break true,
            why = tunnel.handle.ended() => {
                tracing::warn!(reason = %why, "tunnel down");
                break false;
            }
            inc = tunnel.incoming.recv() => match inc {
                Some(inc) => { tokio::spawn(serve_counted(targets.clone(), inc, stats.clone())); }
                None => break false,
            },
            Some(msg) = tunnel.control.recv() => {
                lanes.on_control(&msg);
            }
        }
    };
    drop(lanes);
    stats.tunnel_up.store(false, Ordering::Relaxed);
    cancelled
}

/// Serve one stream the gateway opened.
pub async fn serve(targets: Arc<Targets>, inc: Incoming) {
    serve_counted(targets, inc, Arc::default()).await;
}

/// Serve one stream, counting it and the bytes relayed in `stats` (`/metrics`).
pub async fn serve_counted(targets: Arc<Targets>, inc: Incoming, stats: Arc<LinkStats>) {
    LinkStats::add(&stats.tunnel_streams, 1);
    LinkStats::add(&stats.tunnel_streams_active, 1);
    serve_stream(&targets, inc, &stats).await;
    stats.tunnel_streams_active.fetch_sub(1, Ordering::Relaxed);
}

async fn serve_stream(targets: &Targets, inc: Incoming, stats: &LinkStats) {
    let Incoming { target, stream } = inc;
    let label = target.label();
    tracing::info!(stream = stream.id(), target = %label, "tunnel stream");
    match target {
        Target::Echo => echo(stream).await,
        Target::LocalApi => match tokio::net::UnixStream::connect(&targets.api_socket).await {
            Ok(mut api) => relay(stream, &mut api, stats).await,
            Err(e) => stream.refuse(
                reset::UNREACHABLE,
                &format!("local API at {} unreachable: {e}", targets.api_socket.display()),
            ),
        },
        Target::Port(port) if targets.policy.expose_ports.contains(&port) => {
            match connect_loopback(port).await {
                Ok(mut tcp) => relay(stream, &mut tcp, stats).await,
                Err(e) => stream.refuse(reset::UNREACHABLE, &format!("127.0.0.1:{port}: {e}")),
            }
        }
        Target::Port(port) => {
            tracing::warn!(port, "tunnel stream refused by the expose policy");
            stream.refuse(
                reset::REFUSED,
                &format!("port {port} is not in this node's tunnel.expose_ports"),
            );
        }
        Target::Exec { .. } | Target::Shell { .. } if !targets.policy.exec => {
            tracing::warn!(target = %label, "tunnel stream refused: tunnel.exec is false");
            stream.refuse(reset::REFUSED, "this node does not allow exec or shell (tunnel.exec)");
        }
        Target::Exec { argv } => exec(stream, argv).await,
        Target::Shell { rows, cols, term } => shell::serve(stream, rows, cols, term).await,
        Target::Via { .. } => stream.refuse(reset::REFUSED, "a node relays nothing"),
        Target::Session => stream.refuse(reset::REFUSED, "the node opens its session itself"),
    }
}

async fn echo(mut s: TunnelStream) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = s.shutdown().await;
}

async fn relay<T>(mut s: TunnelStream, local: &mut T, stats: &LinkStats)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match hearth_fleet_client::tunnel::relay(&s, &mut *local).await {
        Ok((to_node, to_fleet)) => {
            LinkStats::add(&stats.tunnel_bytes_in, to_node);
            LinkStats::add(&stats.tunnel_bytes_out, to_fleet);
            let _ = s.shutdown().await;
            s.flushed().await;
        }
        Err(e) => {
            // What the local side answered still goes first (a reset overtakes queued data).
            s.flushed().await;
            s.control().reset(reset::CANCEL, &e.to_string());
        }
    }
}

async fn exec(s: TunnelStream, argv: Vec<String>) {
    let Some((program, args)) = argv.split_first() else {
        s.refuse(reset::UNREACHABLE, "exec needs a command");
        return;
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            s.refuse(reset::UNREACHABLE, &format!("cannot run {program}: {e}"));
            return;
        }
    };
    let ctl = s.control();
    let (mut rx, mut tx) = tokio::io::split(s);
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        ctl.reset(reset::INTERNAL, "child pipes missing");
        return;
    };
    let input = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut rx, &mut stdin).await;
        drop(stdin);
        rx
    });
    // stdout and stderr interleaved onto the stream as they come.
    let (mut ob, mut eb) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        let chunk = tokio::select! {
            r = stdout.read(&mut ob), if out_open => match r {
                Ok(n) if n > 0 => &ob[..n],
                _ => { out_open = false; continue; }
            },
            r = stderr.read(&mut eb), if err_open => match r {
                Ok(n) if n > 0 => &eb[..n],
                _ => { err_open = false; continue; }
            },
        };
        if tx.write_all(chunk).await.is_err() {
            let _ = child.start_kill();
            break;
        }
    }
    let status = child.wait().await;
    input.abort();
    let _ = input.await;
    end_with_status(&mut tx, &ctl, status).await;
}

/// End a stream with a process's exit: a clean end for status 0, else the reset
/// [`reset::EXIT`]` + status` (or [`reset::SIGNAL`]` + signal`) once the output has left.
async fn end_with_status(
    tx: &mut tokio::io::WriteHalf<TunnelStream>,
    ctl: &hearth_fleet_client::tunnel::StreamControl,
    status: std::io::Result<std::process::ExitStatus>,
) {
    // Give the output time to leave before a reset (resets overtake queued data).
    let flushed = tokio::time::timeout(Duration::from_secs(30), async {
        let _ = tx.flush().await;
        while ctl.queued() > 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let _ = flushed.await;
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(st) if st.success() => {
            let _ = tx.shutdown().await;
        }
        Ok(st) => match (st.code(), st.signal()) {
            (Some(code), _) => {
                let code = u32::try_from(code).unwrap_or(255) & 0xff;
                ctl.reset(reset::EXIT + code, &format!("exit status {code}"));
            }
            (None, Some(sig)) => {
                let sig = u32::try_from(sig).unwrap_or(0) & 0xff;
                ctl.reset(reset::SIGNAL + sig, &format!("killed by signal {sig}"));
            }
            (None, None) => ctl.reset(reset::INTERNAL, "exit status unknown"),
        },
        Err(e) => ctl.reset(reset::INTERNAL, &format!("wait failed: {e}")),
    }
}

pub mod shell;

#[cfg(test)]
mod tests;
