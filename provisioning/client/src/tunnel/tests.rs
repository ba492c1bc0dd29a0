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

/// A stream its owner finished and dropped still takes what the peer sends (read and discarded),
/// so the peer's credit keeps coming back: the peer writes four windows and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_and_dropped_stream_still_takes_the_peers_bytes() -> io::Result<()> {
    let (a, b) = tokio::io::duplex(1 << 16);
    let gw = Tunnel::spawn(a, Side::Gateway, TunnelConfig::default());
    let mut node = Tunnel::spawn(b, Side::Node, TunnelConfig::default());
    let mut s = gw.handle.open(&Target::Exec { argv: vec!["true".into()] })?;
    s.shutdown().await?;
    drop(s);
    let sent = tokio::spawn(async move {
        let inc = node.incoming.recv().await.ok_or(ErrorKind::UnexpectedEof)?;
        let mut st = inc.stream;
        st.write_all(&pattern(3, 4 * hearth_proto::mux::INITIAL_WINDOW as usize)).await?;
        st.shutdown().await?;
        Ok::<_, io::Error>(node)
    });
    let done = tokio::time::timeout(Duration::from_secs(10), sent).await;
    let node =
        done.map_err(|_| io::Error::other("the peer's writes stalled: no credit came back"))?;
    node.map_err(io::Error::other)??;
    Ok(())
}

/// A gateway and a node tunnel over an in-memory connection, with no one serving the node's
/// streams: the test takes them from `incoming` itself.
fn bare_pair() -> (Tunnel, Tunnel) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let gw = Tunnel::spawn(a, Side::Gateway, TunnelConfig::default());
    let node = Tunnel::spawn(b, Side::Node, TunnelConfig::default());
    (gw, node)
}

/// A stream opened by the gateway, relayed to a local in-memory connection; returns the relay's
/// task, the local connection's far end and the node's end of the stream.
async fn relayed_stream(
    local_capacity: usize,
) -> io::Result<(
    tokio::task::JoinHandle<io::Result<(u64, u64)>>,
    tokio::io::DuplexStream,
    TunnelStream,
    (Tunnel, Tunnel),
)> {
    let (gw, mut node) = bare_pair();
    let stream = gw.handle.open(&Target::Echo)?;
    let far = node.incoming.recv().await.ok_or_else(|| io::Error::other("no incoming stream"))?;
    let (local, a) = tokio::io::duplex(local_capacity);
    let relayed = tokio::spawn(async move { relay(&stream, a).await });
    Ok((relayed, local, far.stream, (gw, node)))
}

/// `relay` copies both ways, intact and in order, through several quiet periods (each gives the
/// big buffer back), and an end of stream on one side reaches the other as an end of stream
/// while the other direction keeps flowing.
#[tokio::test]
async fn relay_copies_both_ways_across_quiet_periods_and_half_closes() -> io::Result<()> {
    let (relayed, local, mut far, _tunnels) = relayed_stream(4096).await?;
    let (mut c_rd, mut c_wr) = tokio::io::split(local);

    let up: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let down: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    let up2 = up.clone();
    let writer_up = tokio::spawn(async move {
        for (k, chunk) in up2.chunks(70_000).enumerate() {
            c_wr.write_all(chunk).await?;
            if k % 2 == 0 {
                // Longer than RELAY_QUIET: the direction goes idle and comes back.
                tokio::time::sleep(RELAY_QUIET + Duration::from_millis(100)).await;
            }
        }
        c_wr.shutdown().await
    });
    // The local side reads all along (the pipe holds 4 KiB: a writer nobody reads would stall).
    let reader_down = tokio::spawn(async move {
        let mut got = Vec::new();
        c_rd.read_to_end(&mut got).await.map(|_| got)
    });
    let mut got_up = Vec::new();
    far.read_to_end(&mut got_up).await?;
    writer_up.await.map_err(io::Error::other)??;
    assert!(got_up == up, "local → stream intact, then end of stream ({} bytes)", got_up.len());

    // The other direction still flows after the first one ended.
    far.write_all(&down).await?;
    tokio::time::sleep(RELAY_QUIET + Duration::from_millis(100)).await;
    far.write_all(b"tail").await?;
    far.shutdown().await?;
    let got_down = reader_down.await.map_err(io::Error::other)??;
    assert_eq!(got_down.len(), down.len() + 4);
    assert!(got_down[..down.len()] == down[..], "stream → local intact");
    assert_eq!(&got_down[down.len()..], b"tail");

    let (n_down, n_up) = relayed.await.map_err(io::Error::other)??;
    assert_eq!((n_down, n_up), (down.len() as u64 + 4, up.len() as u64));
    Ok(())
}

/// Bulk data both ways at once through `relay`, with the far end reading and writing in uneven
/// pieces: the buffers the relay swaps with the stream's queues never lose, repeat or reorder a
/// byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_swaps_buffers_without_losing_a_byte_under_load() -> io::Result<()> {
    let (relayed, local, far, _tunnels) = relayed_stream(256 * 1024).await?;
    let (mut l_rd, mut l_wr) = tokio::io::split(local);
    let (mut f_rd, mut f_wr) = tokio::io::split(far);
    let up = pattern(3, 24 << 20);
    let down = pattern(7, 24 << 20);
    let (up2, down2) = (up.clone(), down.clone());
    let push_up = tokio::spawn(async move {
        for chunk in up2.chunks(100_003) {
            l_wr.write_all(chunk).await?;
        }
        l_wr.shutdown().await
    });
    let push_down = tokio::spawn(async move {
        for chunk in down2.chunks(33_333) {
            f_wr.write_all(chunk).await?;
        }
        f_wr.shutdown().await
    });
    let mut got_up = Vec::new();
    let mut got_down = Vec::new();
    let (a, b) = tokio::join!(f_rd.read_to_end(&mut got_up), l_rd.read_to_end(&mut got_down));
    a?;
    b?;
    push_up.await.map_err(io::Error::other)??;
    push_down.await.map_err(io::Error::other)??;
    assert!(got_up == up, "local → stream: {} of {} bytes, or reordered", got_up.len(), up.len());
    assert!(
        got_down == down,
        "stream → local: {} of {} bytes, or reordered",
        got_down.len(),
        down.len()
    );
    let moved = relayed.await.map_err(io::Error::other)??;
    assert_eq!(moved, (down.len() as u64, up.len() as u64));
    Ok(())
}

/// An error on either side ends the relay with that error: the local side vanishing, or the
/// stream's far end resetting it.
#[tokio::test]
async fn relay_reports_a_broken_side() -> io::Result<()> {
    let (relayed, local, mut far, _tunnels) = relayed_stream(1024).await?;
    drop(local); // the local side vanishes: writing to it fails
    far.write_all(b"hello").await?;
    let r = relayed.await.map_err(io::Error::other)?;
    assert!(r.is_err(), "a relay whose local side is gone must fail, got {r:?}");

    let (relayed, _local, far, _tunnels) = relayed_stream(1024).await?;
    far.control().reset(reset::CANCEL, "far end gave up");
    let r = relayed.await.map_err(io::Error::other)?;
    let reason = r.as_ref().err().and_then(StreamReset::of).map(|r| r.reason.clone());
    assert_eq!(reason.as_deref(), Some("far end gave up"), "got {r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_consumer_does_not_hold_up_other_streams() -> io::Result<()> {
    let (gw, _node) = pair(TunnelConfig::default());
    // A stream whose echo no one reads: its window fills on both sides and it stalls there.
    let stalled = gw.handle.open(&Target::Echo)?;
    let (_stalled_r, mut stalled_w) = tokio::io::split(stalled);
    let filler = tokio::spawn(async move {
        let chunk = vec![9u8; 64 * 1024];
        loop {
            if stalled_w.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    // Wait until it is stuck on credit: bytes queued, none allowed (the node's receive window and
    // its echo's send buffer are full, and our receive window too).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stuck = {
            let st = gw.handle.shared.lock();
            st.mux
                .stream_ids()
                .filter_map(|id| st.mux.stats(id))
                .any(|s| s.send_credit == 0 && s.send_queued > 0 && s.recv_allowed == 0)
        };
        if stuck {
            break;
        }
        assert!(Instant::now() < deadline, "the stalled stream never ran out of credit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The reader goes on delivering other streams' frames: round trips still complete.
    for i in 0..20u8 {
        let data = pattern(i, 64);
        let back = tokio::time::timeout(Duration::from_secs(5), echo(&gw.handle, data.clone()))
            .await
            .map_err(|_| io::Error::other("a round trip waited behind the stalled stream"))??;
        assert_eq!(back, data);
    }
    assert!(!filler.is_finished(), "the stalled stream is still open and blocked");
    filler.abort();
    Ok(())
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn tuned_sockets_keep_a_shallow_send_queue() -> io::Result<()> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let c = tokio::net::TcpStream::connect(l.local_addr()?).await?;
    let sock = socket2::SockRef::from(&c);
    let before = sock.tcp_notsent_lowat()?;
    tune_tcp(&c);
    assert_eq!(sock.tcp_notsent_lowat()?, NOTSENT_LOWAT, "was {before}");
    assert!(sock.keepalive()?);
    assert_eq!(sock.tcp_user_timeout()?, Some(USER_TIMEOUT));
    assert!(c.nodelay()?);
    Ok(())
}

#[test]
fn only_pacing_congestion_controls_are_replaced_on_loopback() {
    assert_eq!(loopback_congestion("bbr"), Some(LOOPBACK_CONGESTION));
    assert_eq!(loopback_congestion("bbr2"), Some(LOOPBACK_CONGESTION));
    assert_eq!(loopback_congestion("cubic"), None);
    assert_eq!(loopback_congestion("reno"), None);
    assert_eq!(loopback_congestion(""), None);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_loopback_connection_is_not_paced_by_bbr() -> io::Result<()> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    let c = connect_loopback(port).await?;
    let (_accepted, from) = l.accept().await?;
    assert_eq!(Some(from), c.local_addr().ok(), "connected to the listener");
    // New sockets start with the system's default; only a pacing one is replaced.
    let default = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")?;
    let default = default.trim();
    let expected = loopback_congestion(default).unwrap_or(default);
    assert_eq!(congestion_of(&socket2::SockRef::from(&c))?, expected, "system default {default}");
    Ok(())
}

/// Counts its wake-ups.
#[derive(Default)]
struct Wakes(std::sync::atomic::AtomicUsize);

impl std::task::Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_stream_waits_for_the_locked_tunnel_without_blocking_and_is_woken_on_release()
-> io::Result<()> {
    let (gw, _node) = pair(TunnelConfig::default());
    let s = gw.handle.open(&Target::Echo)?;
    let wakes = Arc::new(Wakes::default());
    let waker = Waker::from(wakes.clone());
    let mut cx = Context::from_waker(&waker);
    let mut buf = Vec::new();
    let mut data = b"ping".to_vec();
    // The reader or writer holds the state (on this thread, so a blocking lock would deadlock).
    let held = gw.handle.shared.lock();
    assert!(s.poll_read_vec(&mut cx, &mut buf, 1024).is_pending(), "a read waits");
    assert!(s.poll_write_vec(&mut cx, &mut data).is_pending(), "a write waits");
    assert_eq!(data, b"ping", "and took nothing");
    assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
    drop(held);
    assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "one wake-up for the task, on release");
    assert!(matches!(s.poll_write_vec(&mut cx, &mut data), Poll::Ready(Ok(4))));
    // Released without waiters: nothing to wake.
    drop(gw.handle.shared.lock());
    assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    let mut back = Vec::new();
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        std::future::poll_fn(|cx| s.poll_read_vec(cx, &mut back, 1024)),
    )
    .await
    .map_err(|_| io::Error::other("the echo never came back"))??;
    assert_eq!(&back[..n], b"ping");
    Ok(())
}

/// A bulk relay's reads ([`RELAY_BUF`]) are queued on its stream whole, without a copy, four at a
/// time before it waits for room: with a send buffer under twice a read, each read was copied in
/// piecewise and the relay stopped after every one (`docs/0006-tunnel.md`, "Batch sizes").
#[test]
fn a_stream_takes_four_relay_reads_whole_before_it_pushes_back() -> Result<(), MuxError> {
    let mut mux = Mux::new(Side::Gateway, MuxConfig::default());
    let id = mux.open(&Target::Echo)?;
    for read in 0..4 {
        let mut buf = vec![read as u8; RELAY_BUF];
        let ptr = buf.as_ptr();
        assert_eq!(mux.write_vec(id, &mut buf)?, RELAY_BUF, "read {read} taken whole");
        assert!(buf.is_empty(), "read {read}: the buffer itself was queued");
        assert_ne!(buf.as_ptr(), ptr, "read {read}: the caller got another allocation back");
    }
    let mut fifth = vec![4u8; RELAY_BUF];
    assert_eq!(mux.write_vec(id, &mut fifth)?, 0, "the fifth read waits for room");
    assert_eq!(fifth.len(), RELAY_BUF, "and is left as it was");
    assert_eq!(mux.stats(id).map(|s| s.send_queued), Some(4 * RELAY_BUF));
    Ok(())
}
