//! Subcommands that open tunnel streams to a node through the fleet gateway (ALPN
//! `hearth-tunnel/1`, the operator certificate; the gateway checks the role): `exec`, `shell`, `api` and
//! `forward`. Design: `docs/0006-tunnel.md`.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use hearth_fleet_client::https::Endpoint;
use hearth_fleet_client::tls::ClientIdentity;
use hearth_fleet_client::tunnel::{StreamReset, Tunnel, TunnelConfig, TunnelStream, connect};
use hearth_proto::mux::{Target, reset};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::CtlConfig;

async fn tunnel(c: &CtlConfig) -> anyhow::Result<Tunnel> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let id = ClientIdentity { cert_pem: read(&c.cert)?, key_pem: read(&c.key)? };
    let ep = Endpoint::from_url(&c.url, &c.name)?;
    Ok(connect(&ep, &c.ca_sha256, &id, TunnelConfig::default()).await?)
}

fn via(node: &str, target: Target) -> Target {
    Target::Via { node: node.to_string(), target: Box::new(target) }
}

/// What ended a stream, as an exit code: 0 at a clean end, the command's status for an exec
/// reset, else an error naming the peer's reason.
pub fn exit_code(end: std::io::Result<()>) -> anyhow::Result<u8> {
    match end {
        Ok(()) => Ok(0),
        Err(e) => match StreamReset::of(&e) {
            Some(r) if (reset::EXIT..reset::EXIT + 256).contains(&r.code) => {
                Ok(u8::try_from(r.code - reset::EXIT).unwrap_or(1).max(1))
            }
            Some(r) if (reset::SIGNAL..reset::SIGNAL + 256).contains(&r.code) => {
                Ok(128u8.saturating_add(u8::try_from(r.code - reset::SIGNAL).unwrap_or(0)))
            }
            Some(r) => bail!("{}", r.reason),
            None => Err(anyhow::Error::new(e).context("tunnel stream failed")),
        },
    }
}

/// Copy a stream to `out` until its end.
async fn copy_out(
    s: &mut tokio::io::ReadHalf<TunnelStream>,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
}

/// `hearthctl exec NODE -- CMD…`: run a command on the node, stdin and stdout through the tunnel;
/// the exit code is the command's.
pub async fn exec(c: &CtlConfig, node: &str, argv: Vec<String>) -> anyhow::Result<u8> {
    let t = tunnel(c).await?;
    let s = t.handle.open(&via(node, Target::Exec { argv }))?;
    let (mut r, mut w) = tokio::io::split(s);
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let _ = tokio::io::copy(&mut stdin, &mut w).await;
        let _ = w.shutdown().await;
        w
    });
    let end = copy_out(&mut r, &mut std::io::stdout().lock()).await;
    input.abort();
    exit_code(end)
}

/// `hearthctl api NODE [PATH]`: one GET on the node's local API through the tunnel; the body.
pub async fn api(c: &CtlConfig, node: &str, path: &str) -> anyhow::Result<String> {
    if !path.starts_with('/') || path.contains(char::is_whitespace) {
        bail!("API path {path:?} must start with / and contain no spaces");
    }
    let t = tunnel(c).await?;
    let mut s = t.handle.open(&via(node, Target::LocalApi))?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: hearth-agent\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    if let Err(e) = s.read_to_end(&mut resp).await {
        exit_code(Err(e))?;
    }
    let text = String::from_utf8_lossy(&resp);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("the node's API answered without an HTTP header: {text:?}");
    };
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("the node's API answered {status}: {body}");
    }
    Ok(format!("{}\n", body.trim_end()))
}

/// `hearthctl forward NODE PORT`: listen on a local address; each connection reaches loopback
/// `PORT` on the node (if the node's `tunnel.expose_ports` allows it).
pub async fn forward(c: &CtlConfig, node: &str, port: u16, listen: &str) -> anyhow::Result<()> {
    let t = tunnel(c).await?;
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(listen = %l.local_addr()?, node, port, "forwarding");
    let mut err = std::io::stderr();
    let _ = writeln!(err, "forwarding {} to port {port} on {node}", l.local_addr()?);
    loop {
        let (mut tcp, from) = tokio::select! {
            r = l.accept() => r?,
            why = t.handle.ended() => bail!("tunnel ended: {why}"),
        };
        let s = t.handle.open(&via(node, Target::Port(port)))?;
        tokio::spawn(async move {
            let mut s = s;
            if let Err(e) = tokio::io::copy_bidirectional(&mut tcp, &mut s).await {
                tracing::info!(%from, error = %e, "forwarded connection ended");
            }
            let _ = s.shutdown().await;
        });
    }
}

/// The operator's terminal in raw mode (no line editing, no echo, no signals from keys: every
/// keystroke goes to the node's shell) until dropped.
#[derive(Debug)]
pub struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    /// Put stdin's terminal in raw mode.
    pub fn enter() -> anyhow::Result<Self> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("cannot read the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("cannot set the terminal to raw mode")?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}

/// The size of the terminal on stdout, if it is one.
pub fn window_size() -> Option<(u16, u16)> {
    use std::os::fd::AsRawFd as _;
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` through the pointer, which points at `ws`,
    // alive and writable for the call.
    let rc = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &raw mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// `hearthctl shell NODE`: an interactive login shell on the node (admin; the node's
/// `tunnel.exec` must allow it). On a terminal: raw mode, the window size sent at start and on
/// every change; otherwise stdin is fed to the shell as typed input (24x80). Exits with the
/// shell's status.
pub async fn shell(c: &CtlConfig, node: &str) -> anyhow::Result<u8> {
    use std::io::IsTerminal as _;
    use tokio::signal::unix::{SignalKind, signal};
    let tty = std::io::stdin().is_terminal();
    let (rows, cols) = window_size().unwrap_or((24, 80));
    let term =
        std::env::var("TERM").ok().filter(|t| !t.is_empty()).unwrap_or_else(|| "xterm".into());
    let t = tunnel(c).await?;
    let s = t.handle.open(&via(node, Target::Shell { rows, cols, term }))?;
    let raw = if tty { Some(RawMode::enter()?) } else { None };
    let (mut r, mut w) = tokio::io::split(s);
    let input = tokio::spawn(async move {
        let mut winch = signal(SignalKind::window_change()).ok();
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        let mut open = true;
        loop {
            let mut msg = Vec::new();
            tokio::select! {
                n = stdin.read(&mut buf), if open => match n {
                    Ok(n) if n > 0 => hearth_proto::shell::encode_input(&buf[..n], &mut msg),
                    // A terminal has no end of input: the shell ends when it exits.
                    _ => open = false,
                },
                Some(()) = async { match winch.as_mut() { Some(s) => s.recv().await, None => None } } => {
                    if let Some((rows, cols)) = window_size() {
                        hearth_proto::shell::encode_resize(rows, cols, &mut msg);
                    }
                }
                else => return w,
            }
            if !msg.is_empty() && w.write_all(&msg).await.is_err() {
                return w;
            }
        }
    });
    let end = copy_out(&mut r, &mut std::io::stdout().lock()).await;
    input.abort();
    drop(raw);
    exit_code(end)
}
