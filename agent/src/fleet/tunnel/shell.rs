//! Interactive shells over the tunnel: a login shell on a new PTY (`nix::pty::openpty`), its own
//! session with the PTY as controlling terminal, `TERM` and the window size from the
//! [`Target::Shell`](hearth_proto::mux::Target::Shell) request. The terminal's output goes back
//! raw; the operator's side sends keystrokes and window sizes as [`hearth_proto::shell`]
//! messages. The shell's exit status ends the stream like an exec's. Design:
//! `docs/0006-tunnel.md` ("Shells").

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use hearth_fleet_client::tunnel::TunnelStream;
use hearth_proto::mux::reset;
use hearth_proto::shell::{Decoder, ShellMsg, valid_size};
use nix::pty::{Winsize, openpty};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The login shell: bash where installed, else `/bin/sh`.
pub fn login_shell() -> &'static str {
    if std::path::Path::new("/bin/bash").exists() { "/bin/bash" } else { "/bin/sh" }
}

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 }
}

fn set_size(master: &OwnedFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, which points at `ws`, alive
    // for the call; the fd is the PTY master we own.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &raw const ws) };
    if rc == -1 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Serve one shell stream until the shell exits or the operator goes.
pub async fn serve(s: TunnelStream, rows: u16, cols: u16, term: String) {
    if !valid_size(rows, cols) {
        s.refuse(reset::BAD_TARGET, &format!("terminal size {rows}x{cols} out of range"));
        return;
    }
    let term = if term.is_empty() || term.len() > 64 || !term.bytes().all(|b| b.is_ascii_graphic())
    {
        "xterm".to_string()
    } else {
        term
    };
    let pty = match openpty(Some(&winsize(rows, cols)), None) {
        Ok(p) => p,
        Err(e) => {
            s.refuse(reset::INTERNAL, &format!("cannot open a PTY: {e}"));
            return;
        }
    };
    let shell = login_shell();
    let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
    let (i, o, e) = match (stdio(&pty.slave), stdio(&pty.slave), stdio(&pty.slave)) {
        (Ok(i), Ok(o), Ok(e)) => (i, o, e),
        _ => {
            s.refuse(reset::INTERNAL, "cannot duplicate the PTY");
            return;
        }
    };
    let mut cmd = tokio::process::Command::new(shell);
    cmd.arg("-l").env("TERM", &term).stdin(i).stdout(o).stderr(e).kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only makes two system calls
    // (setsid, ioctl TIOCSCTTY on fd 0, the PTY slave), both async-signal-safe; it allocates
    // nothing and touches no state shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // TIOCSCTTY takes an int argument, no pointer; fd 0 is the PTY slave.
            if libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    // The parent keeps no slave descriptor, so reading the master ends (EIO) once the shell and
    // everything it started have closed the terminal.
    drop(cmd);
    drop(pty.slave);
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            s.refuse(reset::UNREACHABLE, &format!("cannot start {shell}: {e}"));
            return;
        }
    };
    let master = pty.master;
    let (reader, writer) = match (master.try_clone(), master.try_clone()) {
        (Ok(r), Ok(w)) => (
            tokio::fs::File::from(std::fs::File::from(r)),
            tokio::fs::File::from(std::fs::File::from(w)),
        ),
        _ => {
            s.refuse(reset::INTERNAL, "cannot duplicate the PTY master");
            return;
        }
    };
    tracing::info!(shell, rows, cols, %term, pid = child.id(), "shell started");
    let ctl = s.control();
    let (mut rx, mut tx) = tokio::io::split(s);

    // Operator → PTY: keystrokes and window sizes.
    let input_ctl = ctl.clone();
    let mut input = tokio::spawn(async move {
        let mut writer = writer;
        let mut dec = Decoder::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            dec.push(&buf[..n]);
            loop {
                match dec.next_msg() {
                    Ok(Some(ShellMsg::Input(b))) => {
                        if writer.write_all(&b).await.is_err() || writer.flush().await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(ShellMsg::Resize { rows, cols })) => {
                        if let Err(e) = set_size(&master, rows, cols) {
                            tracing::warn!(error = %e, "cannot resize the shell's terminal");
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "bad shell input: ending the shell");
                        input_ctl.reset(reset::CANCEL, &e.to_string());
                        return;
                    }
                }
            }
        }
    });
    // PTY → operator: the terminal's output until EIO (the terminal closed).
    let output = tokio::spawn(async move {
        let mut reader = reader;
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = reader.read(&mut buf).await {
            if n == 0 || tx.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        tx
    });
    let status = tokio::select! {
        st = child.wait() => st,
        _ = &mut input => {
            // The operator went (or sent bad input): end the shell.
            let _ = child.start_kill();
            child.wait().await
        }
    };
    input.abort();
    // What the shell wrote before it exited still goes out (bounded: a background job may keep
    // the terminal open).
    let tx = tokio::time::timeout(Duration::from_secs(2), output).await;
    let Ok(Ok(mut tx)) = tx else {
        ctl.reset(reset::CANCEL, "the shell's terminal stayed open after it exited");
        return;
    };
    tracing::info!(?status, "shell ended");
    super::end_with_status(&mut tx, &ctl, status).await;
}
