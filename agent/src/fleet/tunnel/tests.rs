//! The node's targets, served over an in-memory tunnel pair (the gateway end opens streams).

use std::io;

use hearth_fleet_client::tunnel::{StreamReset, Tunnel, TunnelHandle};
use hearth_proto::mux::Side;

use super::*;

fn node(policy: Policy, api_socket: PathBuf) -> TunnelHandle {
    let (a, b) = tokio::io::duplex(1 << 20);
    let gw = Tunnel::spawn(a, Side::Gateway, TunnelConfig::default());
    let mut node = Tunnel::spawn(b, Side::Node, TunnelConfig::default());
    let targets = Arc::new(Targets { api_socket, policy });
    tokio::spawn(async move {
        while let Some(inc) = node.incoming.recv().await {
            tokio::spawn(serve(targets.clone(), inc));
        }
    });
    gw.handle
}

fn policy(exec: bool, ports: &[u16]) -> Policy {
    Policy { enabled: true, exec, expose_ports: ports.to_vec(), ..Policy::default() }
}

/// Read a stream to its end: the bytes, and the reset that ended it, if any.
async fn drain(s: &mut TunnelStream) -> (Vec<u8>, Option<StreamReset>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, StreamReset::of(&e).cloned()),
        }
    }
}

fn argv(a: &[&str]) -> Target {
    Target::Exec { argv: a.iter().map(|s| s.to_string()).collect() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_returns_output_then_the_exit_status() -> io::Result<()> {
    let gw = node(policy(true, &[]), "/nonexistent".into());
    let mut s = gw.open(&argv(&["sh", "-c", "echo out; echo err >&2; exit 3"]))?;
    let (out, end) = drain(&mut s).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("out\n") && text.contains("err\n"), "{text:?}");
    assert_eq!(end.map(|r| r.code), Some(reset::EXIT + 3));

    // stdin reaches the command; a zero exit ends the stream cleanly.
    let mut s = gw.open(&argv(&["cat"]))?;
    let input: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    s.write_all(&input).await?;
    s.shutdown().await?;
    let (out, end) = drain(&mut s).await;
    assert_eq!(end, None);
    assert!(out == input, "{} of {} bytes", out.len(), input.len());

    let mut s = gw.open(&argv(&["/nonexistent/program"]))?;
    let (_, end) = drain(&mut s).await;
    let end = end.ok_or_else(|| io::Error::other("no reset"))?;
    assert_eq!(end.code, reset::UNREACHABLE);
    assert!(end.reason.contains("cannot run /nonexistent/program"), "{}", end.reason);
    Ok(())
}

#[tokio::test]
async fn the_nodes_policy_refuses_exec_shell_and_unlisted_ports() -> io::Result<()> {
    let gw = node(policy(false, &[]), "/nonexistent".into());
    for target in [argv(&["id"]), Target::Shell { rows: 24, cols: 80, term: "xterm".into() }] {
        let mut s = gw.open(&target)?;
        let (_, end) = drain(&mut s).await;
        assert_eq!(end.map(|r| r.code), Some(reset::REFUSED), "{target:?}");
    }
    let mut s = gw.open(&Target::Port(5432))?;
    let (_, end) = drain(&mut s).await;
    let end = end.ok_or_else(|| io::Error::other("no reset"))?;
    assert_eq!(end.code, reset::REFUSED);
    assert!(end.reason.contains("port 5432 is not in this node's tunnel.expose_ports"));
    let mut s = gw.open(&Target::Via { node: "n-2".into(), target: Box::new(Target::Echo) })?;
    assert_eq!(drain(&mut s).await.1.map(|r| r.code), Some(reset::REFUSED));
    Ok(())
}

#[tokio::test]
async fn listed_ports_and_the_local_api_are_relayed() -> io::Result<()> {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = tcp.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = w.write_all(b"workload: ").await;
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("api.sock");
    let api = tokio::net::UnixListener::bind(&sock)?;
    tokio::spawn(async move {
        while let Ok((mut c, _)) = api.accept().await {
            let mut req = [0u8; 1024];
            let _ = c.read(&mut req).await;
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await;
        }
    });
    let gw = node(policy(true, &[port]), sock);
    let mut s = gw.open(&Target::Port(port))?;
    s.write_all(b"hello").await?;
    s.shutdown().await?;
    let (out, end) = drain(&mut s).await;
    assert_eq!((out.as_slice(), end), (&b"workload: hello"[..], None));

    let mut s = gw.open(&Target::LocalApi)?;
    s.write_all(b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n").await?;
    let (out, _) = drain(&mut s).await;
    assert!(out.starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&out));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_runs_on_a_pty_with_the_window_size_and_ends_with_its_status() -> io::Result<()> {
    use hearth_proto::shell::{encode_input, encode_resize};
    let gw = node(policy(true, &[]), "/nonexistent".into());
    let mut s = gw.open(&Target::Shell { rows: 30, cols: 100, term: "vt100".into() })?;
    let mut msg = Vec::new();
    encode_input(b"stty size; echo term=$TERM tty=$(test -t 0 && echo yes)\n", &mut msg);
    s.write_all(&msg).await?;
    let mut first = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&first).contains("tty=yes") {
        let n = s.read(&mut buf).await?;
        assert!(n > 0, "the shell ended early: {:?}", String::from_utf8_lossy(&first));
        first.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&first);
    assert!(text.contains("30 100"), "the initial window size: {text:?}");
    assert!(text.contains("term=vt100 tty=yes"), "TERM and a terminal on stdin: {text:?}");
    // A resize reaches the PTY; then the shell exits with a status.
    let mut msg = Vec::new();
    encode_resize(50, 132, &mut msg);
    encode_input(b"stty size; echo sum=$((40+2)); exit 5\n", &mut msg);
    s.write_all(&msg).await?;
    let (out, end) = drain(&mut s).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("50 132"), "the resized window: {text:?}");
    assert!(text.contains("sum=42"), "{text:?}");
    assert_eq!(end.map(|r| r.code), Some(reset::EXIT + 5));

    // Malformed input ends the shell; an out-of-range size is refused before it starts.
    let mut s = gw.open(&Target::Shell { rows: 24, cols: 80, term: "xterm".into() })?;
    s.write_all(&[0x09, 0, 1, 0]).await?;
    let (_, end) = drain(&mut s).await;
    assert_eq!(end.map(|r| r.code), Some(reset::CANCEL));
    let mut s = gw.open(&Target::Shell { rows: 0, cols: 80, term: "xterm".into() })?;
    let (_, end) = drain(&mut s).await;
    assert_eq!(end.map(|r| r.code), Some(reset::BAD_TARGET));
    Ok(())
}
