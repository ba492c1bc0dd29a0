use super::*;

type R = Result<(), MuxError>;

fn pair() -> (Mux, Mux) {
    (Mux::new(Side::Gateway, MuxConfig::default()), Mux::new(Side::Node, MuxConfig::default()))
}

/// Move everything `from` has to send into `to`; returns the bytes moved.
fn pump(from: &mut Mux, to: &mut Mux) -> Result<usize, MuxError> {
    let mut buf = Vec::new();
    while from.poll_transmit(&mut buf, 1 << 20) {}
    let used = to.receive(&buf)?;
    assert_eq!(used, buf.len(), "whole frames only");
    Ok(buf.len())
}

fn events(m: &mut Mux) -> Vec<Event> {
    std::iter::from_fn(|| m.poll_event()).collect()
}

/// Move `id`'s queued bytes from `gw` to `node`, the node reading them and credit going back,
/// until `gw` reports `Writable` for it (its queue drained below half the send buffer); returns
/// whether it did within 64 turns, and the bytes the node read.
fn drain_until_writable(
    gw: &mut Mux,
    node: &mut Mux,
    id: StreamId,
    now: Instant,
) -> Result<(bool, Vec<u8>), MuxError> {
    let mut got = Vec::new();
    for _ in 0..64 {
        pump(gw, node)?;
        if events(gw).contains(&Event::Writable(id)) {
            return Ok((true, got));
        }
        got.extend(read_all(node, id, now)?);
        pump(node, gw)?;
    }
    Ok((false, got))
}

fn read_all(m: &mut Mux, id: StreamId, now: Instant) -> Result<Vec<u8>, MuxError> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = m.read(id, &mut buf, now)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn raw(kind: FrameType, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    frame::encode_into(&mut v, kind, flags, stream, payload).expect("valid frame");
    v
}

#[test]
fn open_send_finish_close_both_ways() -> R {
    let (mut gw, mut node) = pair();
    let now = Instant::now();
    let id = gw.open(&Target::Exec { argv: vec!["uname".into(), "-a".into()] })?;
    assert_eq!(id % 2, 0, "the gateway opens even ids");
    gw.write(id, b"stdin bytes")?;
    gw.finish(id)?;
    pump(&mut gw, &mut node)?;
    assert_eq!(
        events(&mut node),
        vec![
            Event::Opened { id, target: Target::Exec { argv: vec!["uname".into(), "-a".into()] } },
            Event::Readable(id),
            Event::Finished(id),
        ]
    );
    assert_eq!(read_all(&mut node, id, now)?, b"stdin bytes");
    node.write(id, b"Linux")?;
    node.finish(id)?;
    pump(&mut node, &mut gw)?;
    assert_eq!(events(&mut node), vec![Event::Closed(id)]);
    assert_eq!(node.stream_count(), 0);
    assert_eq!(events(&mut gw), vec![Event::Readable(id), Event::Finished(id)]);
    assert_eq!(read_all(&mut gw, id, now)?, b"Linux");
    assert_eq!(events(&mut gw), vec![Event::Closed(id)]);
    assert_eq!(gw.stream_count(), 0);
    // Both directions are done: writing again is an error, not a silent drop.
    assert_eq!(gw.write(id, b"x"), Err(MuxError::UnknownStream(id)));
    Ok(())
}

#[test]
fn a_sender_never_exceeds_the_receivers_credit() -> R {
    let (mut gw, mut node) = pair();
    let now = Instant::now();
    let id = gw.open(&Target::Echo)?;
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut written = 0;
    let mut received = Vec::new();
    let mut rounds = 0;
    while received.len() < payload.len() {
        rounds += 1;
        assert!(rounds < 10_000, "no progress");
        written += gw.write(id, &payload[written..])?;
        pump(&mut gw, &mut node)?;
        let st = node.stats(id).ok_or(MuxError::UnknownStream(id))?;
        // The receiver's invariant: buffered + still allowed never exceeds its window.
        assert!(st.recv_buffered as u64 + st.recv_allowed <= st.recv_window);
        // What arrived fits the window, however far it grew (the send buffer, 1 MiB, holds more
        // than the first window: only credit holds the sender back).
        assert!(st.recv_buffered as u64 <= st.recv_window);
        assert!(st.recv_window <= u64::from(MuxConfig::default().max_window));
        // Without a read nothing more can arrive: the sender is out of credit.
        pump(&mut gw, &mut node)?;
        assert_eq!(node.stats(id).map(|s| s.recv_buffered), Some(st.recv_buffered));
        received.extend(read_all(&mut node, id, now)?);
        pump(&mut node, &mut gw)?; // credit goes back
    }
    assert_eq!(received, payload);
    Ok(())
}

#[test]
fn data_beyond_credit_ends_the_session() -> R {
    let (mut gw, mut node) = pair();
    let id = gw.open(&Target::Echo)?;
    pump(&mut gw, &mut node)?;
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..4 {
        node.receive(&raw(FrameType::Data, 0, id, &chunk))?;
    }
    // The window (256 KiB) is used up: one more byte is a protocol violation.
    assert_eq!(
        node.receive(&raw(FrameType::Data, 0, id, b"x")),
        Err(MuxError::FlowControl { stream: id, len: 1, allowed: 0 })
    );
    Ok(())
}

#[test]
fn a_bulk_stream_does_not_starve_a_shell_or_control() -> R {
    let (mut gw, mut node) = pair();
    let bulk = gw.open(&Target::Port(8080))?;
    let shell = gw.open(&Target::Shell { rows: 24, cols: 80, term: "xterm".into() })?;
    pump(&mut gw, &mut node)?;
    gw.write(bulk, &vec![7u8; 256 * 1024])?;
    gw.write(shell, b"ls\n")?;
    gw.send_control(b"control message")?;
    let mut out = Vec::new();
    gw.poll_transmit(&mut out, 1 << 20);
    let mut order = Vec::new();
    let mut at = 0;
    while let Some((h, _, n)) = frame::decode(&out[at..])? {
        order.push((h.kind, h.stream, at));
        at += n;
    }
    // Control first, then at most one quantum of bulk before the shell's bytes.
    assert_eq!(order[0].0, FrameType::Control);
    let shell_at = order
        .iter()
        .find(|(k, s, _)| *k == FrameType::Data && *s == shell)
        .map(|(_, _, at)| *at)
        .ok_or(MuxError::UnknownStream(shell))?;
    assert!(
        shell_at <= MuxConfig::default().quantum + 3 * HEADER_LEN + 32,
        "shell data at byte {shell_at}"
    );
    // Control queued while bulk data is pending still leaves before further data.
    gw.write(bulk, &vec![7u8; 64 * 1024])?;
    let mut out = Vec::new();
    gw.poll_transmit(&mut out, 32 * 1024);
    gw.send_control(b"late")?;
    let mut next = Vec::new();
    gw.poll_transmit(&mut next, 1);
    let (h, p, _) = frame::decode(&next)?.ok_or(MuxError::UnknownStream(0))?;
    assert_eq!((h.kind, p), (FrameType::Control, &b"late"[..]));
    Ok(())
}

#[test]
fn a_nodes_session_stream_opens_and_waits_at_most_a_quantum_behind_bulk() -> R {
    let (mut gw, mut node) = pair();
    let session = node.open(&Target::Session)?;
    let mut out = Vec::new();
    node.poll_transmit(&mut out, 1 << 20);
    gw.receive(&out)?;
    let mut opened = None;
    while let Some(e) = gw.poll_event() {
        if let Event::Opened { id, target } = e {
            opened = Some((id, target));
        }
    }
    assert_eq!(opened, Some((session, Target::Session)));
    assert_eq!(Target::Session.label(), "session");
    // The gateway's bulk stream and the session's next message: the message leaves within one
    // quantum of bulk bytes (the fair scheduler), like a shell's.
    let bulk = gw.open(&Target::Port(8080))?;
    pump(&mut gw, &mut node)?;
    gw.write(bulk, &vec![7u8; 256 * 1024])?;
    gw.write(session, b"welcome")?;
    let mut out = Vec::new();
    gw.poll_transmit(&mut out, 1 << 20);
    let mut at = 0;
    let mut session_at = None;
    while let Some((h, _, n)) = frame::decode(&out[at..])? {
        if h.kind == FrameType::Data && h.stream == session {
            session_at = Some(at);
        }
        at += n;
    }
    let session_at = session_at.ok_or(MuxError::UnknownStream(session))?;
    assert!(
        session_at <= MuxConfig::default().quantum + 2 * HEADER_LEN,
        "session data at byte {session_at}"
    );
    Ok(())
}

#[test]
fn equal_streams_get_equal_shares() -> R {
    let (mut gw, mut node) = pair();
    let ids: Vec<_> = (0..8).map(|_| gw.open(&Target::Echo)).collect::<Result<_, _>>()?;
    pump(&mut gw, &mut node)?;
    for id in &ids {
        gw.write(*id, &vec![1u8; 200 * 1024])?;
    }
    let mut out = Vec::new();
    gw.poll_transmit(&mut out, 8 * 64 * 1024);
    let mut per = BTreeMap::<u32, usize>::new();
    let mut at = 0;
    while let Some((h, p, n)) = frame::decode(&out[at..])? {
        *per.entry(h.stream).or_default() += p.len();
        at += n;
    }
    let (min, max) = (per.values().min().copied(), per.values().max().copied());
    assert_eq!(per.len(), 8);
    // Within one quantum of each other.
    assert!(max.unwrap_or(0) - min.unwrap_or(0) <= MuxConfig::default().quantum, "{per:?}");
    Ok(())
}

#[test]
fn the_window_grows_only_when_it_limits_the_stream() -> R {
    let (mut gw, mut node) = pair();
    node.observe_rtt(Duration::from_millis(10), Instant::now());
    let id = gw.open(&Target::Echo)?;
    pump(&mut gw, &mut node)?;
    let t0 = Instant::now();
    let mut t = t0;
    let payload = vec![3u8; 256 * 1024];
    // A fast reader (a window drained every 1 ms, rtt 10 ms): the window doubles each time.
    for _ in 0..6 {
        let mut sent = 0;
        while sent < payload.len() {
            sent += gw.write(id, &payload[sent..])?;
            pump(&mut gw, &mut node)?;
            read_all(&mut node, id, t)?;
            pump(&mut node, &mut gw)?;
        }
        t += Duration::from_millis(1);
    }
    let grown = node.stats(id).map(|s| s.recv_window).unwrap_or(0);
    assert!(grown >= 4 * u64::from(INITIAL_WINDOW), "window {grown}");
    assert!(grown <= u64::from(MuxConfig::default().max_window));

    // A slow reader (16 KiB every 5 ms, 3.2 MB/s: a bandwidth-delay product of 32 KiB at 10 ms):
    // the reader, not the window, limits the stream, so it stays at the initial window.
    let slow = gw.open(&Target::Echo)?;
    pump(&mut gw, &mut node)?;
    let mut t = t0;
    let mut buf = vec![0u8; 16 * 1024];
    for _ in 0..6 {
        let mut sent = 0;
        while sent < payload.len() {
            sent += gw.write(slow, &payload[sent..])?;
            pump(&mut gw, &mut node)?;
            while node.read(slow, &mut buf, t)? > 0 {
                t += Duration::from_millis(5);
            }
            pump(&mut node, &mut gw)?;
        }
    }
    assert_eq!(node.stats(slow).map(|s| s.recv_window), Some(u64::from(INITIAL_WINDOW)));
    Ok(())
}

/// Bytes of `bulk`'s data that leave before `small`'s first data frame, across calls of
/// `poll_transmit` with `budget` (the driver's loop), the small stream becoming ready after
/// `ready_after` bytes have left.
fn bulk_bytes_before_small(budget: usize, ready_after: usize) -> Result<usize, MuxError> {
    let (mut gw, mut node) = pair();
    let bulk = gw.open(&Target::Port(8080))?;
    let small = gw.open(&Target::Echo)?;
    pump(&mut gw, &mut node)?;
    // A bulk stream with 16 MiB of credit and a full send buffer.
    gw.handle(
        Header { kind: FrameType::Window, flags: 0, stream: bulk, len: 4 },
        &(16u32 << 20).to_be_bytes(),
    )?;
    gw.write(bulk, &vec![7u8; MuxConfig::default().send_buffer])?;
    let mut sent = 0;
    while sent < ready_after {
        let mut out = Vec::new();
        if !gw.poll_transmit(&mut out, budget) {
            break;
        }
        sent += out.len();
        // Keep the bulk stream's buffer full, as a writer that is never short of data does.
        let queued = gw.stats(bulk).map_or(0, |s| s.send_queued);
        gw.write(bulk, &vec![7u8; MuxConfig::default().send_buffer - queued])?;
    }
    gw.write(small, &[1u8; 64])?;
    let mut before = 0;
    for _ in 0..64 {
        let mut out = Vec::new();
        if !gw.poll_transmit(&mut out, budget) {
            break;
        }
        let mut at = 0;
        while let Some((h, p, n)) = frame::decode(&out[at..])? {
            if h.stream == small {
                assert_eq!(p, &[1u8; 64][..]);
                return Ok(before);
            }
            before += p.len();
            at += n;
        }
        let queued = gw.stats(bulk).map_or(0, |s| s.send_queued);
        gw.write(bulk, &vec![7u8; MuxConfig::default().send_buffer - queued])?;
    }
    Err(MuxError::UnknownStream(small))
}

#[test]
fn a_small_stream_that_becomes_ready_waits_at_most_one_quantum_of_bulk() -> R {
    let quantum = MuxConfig::default().quantum;
    // Budgets smaller, equal to and larger than a quantum, the small stream ready at the start
    // of a bulk turn, in its middle, and after many turns.
    for budget in [4 * 1024, 10 * 1024, quantum, 64 * 1024, 1 << 20] {
        for ready_after in [0, 1, 5_000, quantum, 3 * quantum + 100, 1 << 20] {
            let before = bulk_bytes_before_small(budget, ready_after)?;
            assert!(
                before <= quantum,
                "budget {budget}, ready after {ready_after} B: {before} bulk bytes went first"
            );
        }
    }
    Ok(())
}

#[test]
fn window_growth_uses_the_minimum_recent_round_trip() {
    let mut m = Mux::new(Side::Node, MuxConfig::default());
    let t0 = Instant::now();
    m.observe_rtt(Duration::from_micros(200), t0);
    // A ping that waited behind bulk data measures the queue: it does not raise the estimate.
    m.observe_rtt(Duration::from_millis(25), t0 + Duration::from_secs(5));
    assert_eq!(m.rtt(), Duration::from_micros(200));
    m.observe_rtt(Duration::from_micros(150), t0 + Duration::from_secs(10));
    assert_eq!(m.rtt(), Duration::from_micros(150));
    // The minimum expires after RTT_MIN_WINDOW (a path that really got slower).
    let later = t0 + Duration::from_secs(10) + RTT_MIN_WINDOW;
    m.observe_rtt(Duration::from_millis(3), later);
    assert_eq!(m.rtt(), Duration::from_millis(3));
    m.observe_rtt(Duration::from_millis(4), later + Duration::from_secs(1));
    assert_eq!(m.rtt(), Duration::from_millis(3));
}

#[test]
fn a_window_larger_than_the_stream_needs_shrinks_back() -> R {
    let (mut gw, mut node) = pair();
    let t0 = Instant::now();
    node.observe_rtt(Duration::from_millis(10), t0);
    let id = gw.open(&Target::Echo)?;
    pump(&mut gw, &mut node)?;
    let payload = vec![3u8; 256 * 1024];
    let mut t = t0;
    // Fast: grown past the initial window.
    for _ in 0..6 {
        let mut sent = 0;
        while sent < payload.len() {
            sent += gw.write(id, &payload[sent..])?;
            pump(&mut gw, &mut node)?;
            read_all(&mut node, id, t)?;
            pump(&mut node, &mut gw)?;
        }
        t += Duration::from_millis(1);
    }
    let grown = node.stats(id).map_or(0, |s| s.recv_window);
    assert!(grown >= 4 * u64::from(INITIAL_WINDOW), "window {grown}");
    // Now the reader takes 16 KiB every 100 ms (10 round trips): half a window takes far more
    // than SHRINK_AFTER_RTTS round trips, so the window halves down to the initial one.
    let mut windows = vec![grown];
    let mut buf = vec![0u8; 16 * 1024];
    for _ in 0..40 {
        let mut sent = 0;
        while sent < payload.len() {
            sent += gw.write(id, &payload[sent..])?;
            pump(&mut gw, &mut node)?;
            loop {
                t += Duration::from_millis(100);
                if node.read(id, &mut buf, t)? == 0 {
                    break;
                }
            }
            pump(&mut node, &mut gw)?;
        }
        windows.push(node.stats(id).map_or(0, |s| s.recv_window));
    }
    assert_eq!(windows.last().copied(), Some(u64::from(INITIAL_WINDOW)), "{windows:?}");
    assert!(windows.windows(2).all(|w| w[1] <= w[0]), "only shrinks: {windows:?}");
    // The sender's credit followed: it never has more than the window in flight.
    let s = node.stats(id).ok_or(MuxError::UnknownStream(id))?;
    assert!(s.recv_buffered as u64 + s.recv_allowed <= s.recv_window);
    let credit = gw.stats(id).map_or(0, |s| s.send_credit);
    assert!(credit <= u64::from(INITIAL_WINDOW), "sender credit {credit}");
    Ok(())
}

#[test]
fn writes_push_back_and_report_writable() -> R {
    let (mut gw, mut node) = pair();
    let id = gw.open(&Target::Echo)?;
    pump(&mut gw, &mut node)?;
    let limit = MuxConfig::default().send_buffer;
    let big = vec![0u8; 2 * limit];
    let took = gw.write(id, &big)?;
    assert_eq!(took, limit);
    assert_eq!(gw.write(id, &big)?, 0);
    // `Writable` once the queue has drained below half the send buffer (more than the first
    // window): the peer reads, credit comes back, more leaves.
    let (writable, _) = drain_until_writable(&mut gw, &mut node, id, Instant::now())?;
    assert!(writable, "Writable once the queue drained");
    Ok(())
}

/// `write_vec` takes a relay's buffer whole (queued as it is) or, when the queue lacks room, not
/// at all until `Writable`; a vector larger than half the send buffer goes piecewise. The bytes
/// arrive in order either way.
#[test]
fn owned_buffers_are_queued_whole_or_not_at_all() -> R {
    let (mut gw, mut node) = pair();
    let now = Instant::now();
    let limit = MuxConfig::default().send_buffer;
    let id = gw.open(&Target::Echo)?;
    pump(&mut gw, &mut node)?;
    let data: Vec<u8> = (0..limit * 2).map(|i| (i % 253) as u8).collect();
    let chunk = 60 * 1024;
    let mut sent = 0;
    // Into an empty queue, then appended, until the queue has no room for a whole chunk.
    loop {
        let mut v = data[sent..sent + chunk].to_vec();
        let took = gw.write_vec(id, &mut v)?;
        if took == 0 {
            assert_eq!(v.len(), chunk, "a refused vector is left as it was");
            break;
        }
        assert_eq!((took, v.len()), (chunk, 0), "taken whole");
        sent += took;
    }
    assert_eq!(sent, limit / chunk * chunk, "as many whole chunks as fit");
    // Room comes back (`Writable`) once the queue has drained below half the send buffer: the
    // peer reads, so credit returns and more leaves.
    let (writable, mut got) = drain_until_writable(&mut gw, &mut node, id, now)?;
    assert!(writable, "Writable once the queue drained below half the send buffer");
    let mut v = data[sent..sent + chunk].to_vec();
    assert_eq!(gw.write_vec(id, &mut v)?, chunk, "room came back with Writable");
    sent += chunk;
    // Larger than half the send buffer: piecewise, the rest left in the vector.
    let mut big = data[sent..].to_vec();
    let took = gw.write_vec(id, &mut big)?;
    assert!(took > 0 && took < data.len() - sent, "took {took}");
    assert!(big[..] == data[sent + took..], "the remainder is what was not taken");
    sent += took;
    while got.len() < sent {
        pump(&mut gw, &mut node)?;
        let mut into = Vec::new();
        node.read_vec(id, &mut into, usize::MAX, now)?;
        got.extend_from_slice(&into);
        pump(&mut node, &mut gw)?;
    }
    assert!(got[..] == data[..sent], "every byte in order ({} of {sent})", got.len());
    Ok(())
}

/// `read_vec` hands the whole receive queue over (into an empty vector) or appends it, and the
/// bytes it takes count as read: credit flows back and the sender finishes.
#[test]
fn read_vec_takes_the_queue_and_grants_credit() -> R {
    let (mut gw, mut node) = pair();
    let now = Instant::now();
    let id = gw.open(&Target::Echo)?;
    pump(&mut gw, &mut node)?;
    let data: Vec<u8> = (0..INITIAL_WINDOW as usize * 3).map(|i| (i % 249) as u8).collect();
    let mut at = 0;
    let mut got = Vec::new();
    let mut rounds = 0;
    while got.len() < data.len() {
        at += gw.write(id, &data[at..])?;
        pump(&mut gw, &mut node)?;
        let before = got.len();
        // Alternately into an empty vector (handed over) and onto what was read (appended).
        if rounds % 2 == 0 {
            let mut into = Vec::new();
            node.read_vec(id, &mut into, usize::MAX, now)?;
            got.extend_from_slice(&into);
        } else {
            node.read_vec(id, &mut got, usize::MAX, now)?;
        }
        assert!(got.len() > before, "round {rounds}: nothing arrived: credit did not flow back");
        pump(&mut node, &mut gw)?;
        rounds += 1;
        assert!(rounds < 100, "stuck at {} of {} bytes", got.len(), data.len());
    }
    assert!(got == data, "intact and in order");
    gw.finish(id)?;
    pump(&mut gw, &mut node)?;
    let mut end = Vec::new();
    assert_eq!(node.read_vec(id, &mut end, usize::MAX, now)?, 0);
    assert!(events(&mut node).contains(&Event::Finished(id)));
    Ok(())
}

/// The chunked send queue against a plain byte queue, under a pseudo-random mix of borrowed
/// writes, handed-over buffers and framing cuts: the same bytes come out, in the same order, and
/// the allocation handed back is always empty.
#[test]
fn the_send_queue_keeps_order_under_any_mix_of_writes_and_cuts() {
    let mut q = SendQueue::default();
    let mut model: VecDeque<u8> = VecDeque::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |m: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % m as u64) as usize
    };
    let mut byte = 0u8;
    let mut fill = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                byte = byte.wrapping_add(1);
                byte
            })
            .collect()
    };
    for step in 0..3_000 {
        match next(3) {
            0 => {
                let data = fill(next(40_000));
                q.push_slice(&data);
                model.extend(&data);
            }
            1 => {
                let mut data = fill(next(70_000));
                data.reserve(next(10_000));
                model.extend(&data);
                q.push_vec(&mut data);
                assert!(data.is_empty(), "step {step}: the allocation handed back holds bytes");
            }
            _ => {
                let n = next(q.len() + 1);
                let mut out = vec![0xAA];
                q.take_into(&mut out, n);
                let want: Vec<u8> = model.drain(..n).collect();
                assert!(out[1..] == want[..], "step {step}: {n} bytes out of order");
            }
        }
        assert_eq!(q.len(), model.len(), "step {step}");
        assert_eq!(q.is_empty(), model.is_empty());
    }
}

#[test]
fn pings_are_answered_with_the_same_bytes() -> R {
    let (mut gw, mut node) = pair();
    node.ping(*b"12345678");
    pump(&mut node, &mut gw)?;
    assert!(events(&mut gw).is_empty(), "the ping is answered inside the mux");
    pump(&mut gw, &mut node)?;
    assert_eq!(events(&mut node), vec![Event::Pong(*b"12345678")]);
    assert!(matches!(
        node.receive(&raw(FrameType::Ping, 0, 0, b"short")),
        Err(MuxError::BadPayload { kind: FrameType::Ping, len: 5, .. })
    ));
    Ok(())
}

#[test]
fn protocol_violations_are_named() -> R {
    let (_, mut node) = pair();
    let open = postcard::to_stdvec(&Target::Echo).unwrap_or_default();
    // The node opens odd ids: the gateway may not.
    assert_eq!(
        node.receive(&raw(FrameType::Open, 0, 3, &open)),
        Err(MuxError::BadOpen { stream: 3, reason: "id of this side's parity" })
    );
    node.receive(&raw(FrameType::Open, 0, 4, &open))?;
    assert_eq!(
        node.receive(&raw(FrameType::Open, 0, 4, &open)),
        Err(MuxError::BadOpen { stream: 4, reason: "id not above the last one" })
    );
    assert_eq!(
        node.receive(&raw(FrameType::Data, 0, 8, b"x")),
        Err(MuxError::NeverOpened { kind: FrameType::Data, stream: 8 })
    );
    assert!(matches!(
        node.receive(&raw(FrameType::Window, 0, 4, b"abc")),
        Err(MuxError::BadPayload { kind: FrameType::Window, len: 3, .. })
    ));
    node.receive(&raw(FrameType::Data, FLAG_FIN, 4, b"end"))?;
    assert_eq!(node.receive(&raw(FrameType::Data, 0, 4, b"more")), Err(MuxError::DataAfterFin(4)));
    node.receive(&raw(FrameType::Open, 0, 6, &open))?;
    node.receive(&raw(FrameType::Window, 0, 6, &(1u32 << 30).to_be_bytes()))?;
    assert_eq!(
        node.receive(&raw(FrameType::Window, 0, 6, &u32::MAX.to_be_bytes())),
        Err(MuxError::WindowOverflow(6))
    );
    Ok(())
}

#[test]
fn refusals_reach_the_opener() -> R {
    let (mut gw, mut node) = pair();
    let id = gw.open(&Target::Port(22))?;
    pump(&mut gw, &mut node)?;
    assert!(matches!(events(&mut node)[..], [Event::Opened { target: Target::Port(22), .. }]));
    node.reset(id, reset::REFUSED, "port 22 is not in this node's expose policy")?;
    pump(&mut node, &mut gw)?;
    assert_eq!(
        events(&mut gw),
        vec![
            Event::Reset {
                id,
                code: reset::REFUSED,
                reason: "port 22 is not in this node's expose policy".into()
            },
            Event::Closed(id)
        ]
    );
    assert_eq!(gw.stream_count(), 0);
    // Frames still in flight for the reset stream are dropped, not errors.
    gw.receive(&raw(FrameType::Data, 0, id, b"late"))?;

    // An undecodable target is refused with BAD_TARGET.
    node.receive(&raw(FrameType::Open, 0, id + 2, b"\xff\xff"))?;
    assert!(events(&mut node).is_empty(), "no Opened for a bad target");
    let mut out = Vec::new();
    node.poll_transmit(&mut out, 1 << 20);
    let (h, p, _) = frame::decode(&out)?.ok_or(MuxError::UnknownStream(0))?;
    assert_eq!((h.kind, h.stream), (FrameType::Reset, id + 2));
    assert_eq!(p[..4], reset::BAD_TARGET.to_be_bytes());
    Ok(())
}

#[test]
fn opens_over_the_limit_are_refused() -> R {
    let config = MuxConfig { max_streams: 2, ..MuxConfig::default() };
    let mut gw = Mux::new(Side::Gateway, MuxConfig::default());
    let mut node = Mux::new(Side::Node, config);
    let ids: Vec<_> = (0..3).map(|_| gw.open(&Target::Echo)).collect::<Result<_, _>>()?;
    pump(&mut gw, &mut node)?;
    assert_eq!(node.stream_count(), 2);
    pump(&mut node, &mut gw)?;
    let ev = events(&mut gw);
    assert!(matches!(ev[..], [Event::Reset { code: reset::LIMIT, .. }, Event::Closed(_)]));
    assert_eq!(ev.last(), Some(&Event::Closed(ids[2])));
    assert_eq!(node.open(&Target::Echo), Err(MuxError::TooManyStreams { max: 2 }));
    Ok(())
}

#[test]
fn partial_input_waits_for_the_rest() -> R {
    let (mut gw, mut node) = pair();
    let id = gw.open(&Target::Echo)?;
    gw.write(id, b"hello")?;
    let mut out = Vec::new();
    gw.poll_transmit(&mut out, 1 << 20);
    let cut = out.len() - 2;
    let used = node.receive(&out[..cut])?;
    assert!(used < cut);
    let used2 = node.receive(&out[used..])?;
    assert_eq!(used + used2, out.len());
    assert_eq!(read_all(&mut node, id, Instant::now())?, b"hello");
    Ok(())
}

#[test]
fn a_thousand_idle_streams_cost_little() -> R {
    let (mut gw, mut node) = pair();
    for _ in 0..1000 {
        gw.open(&Target::Echo)?;
    }
    let bytes = pump(&mut gw, &mut node)?;
    assert_eq!(node.stream_count(), 1000);
    // One small Open frame each; no buffers are held for idle streams.
    assert!(bytes < 1000 * (HEADER_LEN + 4), "{bytes} bytes");
    assert!(node.stream_ids().all(|id| node.stats(id).is_some_and(|s| s.recv_buffered == 0)));
    Ok(())
}

#[test]
fn bytes_before_a_reset_stay_readable() -> R {
    let (mut gw, mut node) = pair();
    let id = gw.open(&Target::Exec { argv: vec!["false".into()] })?;
    pump(&mut gw, &mut node)?;
    node.write(id, b"output")?;
    let mut out = Vec::new();
    node.poll_transmit(&mut out, 1 << 20);
    node.reset(id, reset::EXIT + 1, "exit status 1")?;
    node.poll_transmit(&mut out, 1 << 20);
    // Data and reset arrive in one read.
    gw.receive(&out)?;
    assert_eq!(
        events(&mut gw),
        vec![
            Event::Readable(id),
            Event::Reset { id, code: reset::EXIT + 1, reason: "exit status 1".into() }
        ]
    );
    assert_eq!(read_all(&mut gw, id, Instant::now())?, b"output");
    assert_eq!(events(&mut gw), vec![Event::Closed(id)]);
    assert_eq!(gw.stream_count(), 0);
    Ok(())
}
