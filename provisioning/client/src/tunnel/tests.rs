use std::io::ErrorKind;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A gateway and a node tunnel over an in-memory connection; the node serves `Echo` streams and
/// refuses everything else.
fn pair(config: TunnelConfig) -> (Tunnel, TunnelHandle) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let gw = Tunnel::spawn(a, Side::Gateway, config.clone());
    let mut node = Tunnel::spawn(b, Side::Node, config);
    let handle = node.handle.clone();
    tokio::spawn(async move {
        while let Some(inc) = node.incoming.recv().await {
            match inc.target {
                Target::Echo => {
                    tokio::spawn(async move {
                        let mut s = inc.stream;
                        let mut buf = vec![0u8; 32 * 1024];
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                        let _ = s.shutdown().await;
                    });
                }
                other => {
                    inc.stream.refuse(reset::REFUSED, &format!("{other:?} is not served here"))
                }
            }
        }
    });
    (gw, handle)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

async fn echo(h: &TunnelHandle, data: Vec<u8>) -> io::Result<Vec<u8>> {
    let s = h.open(&Target::Echo)?;
    let (mut r, mut w) = tokio::io::split(s);
    let send = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await?;
        Ok::<_, io::Error>(w)
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await?;
    send.await.map_err(io::Error::other)??;
    Ok(back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_streams_carry_their_bytes_intact() -> io::Result<()> {
    let (gw, _node) = pair(TunnelConfig::default());
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let h = gw.handle.clone();
        let data = pattern(i, 1_500_000 + usize::from(i) * 1000);
        tasks.push(tokio::spawn(async move {
            let back = echo(&h, data.clone()).await?;
            assert_eq!(back.len(), data.len(), "stream {i}");
            assert!(back == data, "stream {i} corrupted");
            Ok::<_, io::Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(io::Error::other)??;
    }
    // Every stream is gone on both sides once both directions finished.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(gw.handle.stream_count(), 0);
    Ok(())
}

#[tokio::test]
async fn a_refused_stream_fails_with_the_peers_reason() -> io::Result<()> {
    let (gw, _node) = pair(TunnelConfig::default());
    let mut s = gw.handle.open(&Target::Port(22))?;
    let mut buf = [0u8; 8];
    let err = s.read(&mut buf).await.err().ok_or_else(|| io::Error::other("read succeeded"))?;
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    assert!(err.to_string().contains("Port(22) is not served here"), "{err}");
    Ok(())
}

#[tokio::test]
async fn control_messages_pass_both_ways() -> Result<(), Box<dyn std::error::Error>> {
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut gw = Tunnel::spawn(a, Side::Gateway, TunnelConfig::default());
    let mut node = Tunnel::spawn(b, Side::Node, TunnelConfig::default());
    for i in 0..100u32 {
        node.handle.send_control(&i.to_be_bytes())?;
    }
    for i in 0..100u32 {
        assert_eq!(gw.control.recv().await, Some(i.to_be_bytes().to_vec()), "in order");
    }
    gw.handle.send_control(b"desired")?;
    assert_eq!(node.control.recv().await.as_deref(), Some(&b"desired"[..]));
    Ok(())
}

#[tokio::test]
async fn pings_measure_the_round_trip() -> io::Result<()> {
    let config =
        TunnelConfig { ping_interval: Duration::from_millis(20), ..TunnelConfig::default() };
    let (gw, _node) = pair(config);
    tokio::time::sleep(Duration::from_millis(120)).await;
    let rtt = gw.handle.rtt().ok_or_else(|| io::Error::other("no pong"))?;
    assert!(rtt < Duration::from_secs(1), "{rtt:?}");
    Ok(())
}

#[tokio::test]
async fn a_silent_peer_is_declared_dead_and_streams_fail() -> io::Result<()> {
    // The far end of the connection is held open but nothing ever answers.
    let (a, _silent) = tokio::io::duplex(1 << 20);
    let config = TunnelConfig {
        ping_interval: Duration::from_millis(20),
        dead_after: Duration::from_millis(150),
        ..TunnelConfig::default()
    };
    let gw = Tunnel::spawn(a, Side::Gateway, config);
    let mut s = gw.handle.open(&Target::Echo)?;
    let why = tokio::time::timeout(Duration::from_secs(5), gw.handle.ended())
        .await
        .map_err(io::Error::other)?;
    assert!(matches!(why, TunnelError::Dead(d) if d >= Duration::from_millis(150)), "{why:?}");
    let mut buf = [0u8; 4];
    let err = s.read(&mut buf).await.err().ok_or_else(|| io::Error::other("read succeeded"))?;
    assert_eq!(err.kind(), ErrorKind::ConnectionAborted);
    assert!(gw.handle.open(&Target::Echo).is_err());
    Ok(())
}

#[tokio::test]
async fn a_peer_breaking_the_protocol_ends_the_tunnel() -> io::Result<()> {
    let (a, mut raw) = tokio::io::duplex(1 << 20);
    let gw = Tunnel::spawn(a, Side::Gateway, TunnelConfig::default());
    // Data on a stream that was never opened.
    let mut f = Vec::new();
    hearth_proto::frame::encode_into(&mut f, hearth_proto::frame::FrameType::Data, 0, 7, b"x")
        .map_err(io::Error::other)?;
    raw.write_all(&f).await?;
    let why = tokio::time::timeout(Duration::from_secs(5), gw.handle.ended())
        .await
        .map_err(io::Error::other)?;
    assert!(
        matches!(why, TunnelError::Protocol(MuxError::NeverOpened { stream: 7, .. })),
        "{why:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_closed_connection_ends_the_tunnel() -> io::Result<()> {
    let (a, raw) = tokio::io::duplex(1 << 20);
    let gw = Tunnel::spawn(a, Side::Gateway, TunnelConfig::default());
    drop(raw);
    let why = tokio::time::timeout(Duration::from_secs(5), gw.handle.ended())
        .await
        .map_err(io::Error::other)?;
    assert!(matches!(why, TunnelError::Eof | TunnelError::Io(_)), "{why:?}");
    Ok(())
}

#[tokio::test]
async fn bytes_written_before_shutdown_and_drop_still_arrive() -> io::Result<()> {
    let (a, b) = tokio::io::duplex(1 << 16);
    let gw = Tunnel::spawn(a, Side::Gateway, TunnelConfig::default());
    let mut node = Tunnel::spawn(b, Side::Node, TunnelConfig::default());
    let mut s = gw.handle.open(&Target::Exec { argv: vec!["true".into()] })?;
    let out = pattern(9, 700_000);
    let expect = out.clone();
    tokio::spawn(async move {
        if let Some(inc) = node.incoming.recv().await {
            let mut st = inc.stream;
            let _ = st.write_all(&out).await;
            let _ = st.shutdown().await;
            // Dropped at once: the queued output must still be delivered.
        }
        node
    });
    let mut got = Vec::new();
    s.shutdown().await?;
    s.read_to_end(&mut got).await?;
    assert!(got == expect, "{} bytes of {}", got.len(), expect.len());
    Ok(())
}
