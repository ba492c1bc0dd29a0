//! The tunnel driver: runs a [`Mux`] over one connection (the node's mTLS session, either end)
//! with two tasks, and hands out each data stream as a [`TunnelStream`] (`AsyncRead` +
//! `AsyncWrite`). Design: `docs/0006-tunnel.md`.
//!
//! - The **reader task** reads the connection into a buffer, feeds whole frames to the mux and
//!   wakes the streams the events name; streams the peer opens arrive on [`Tunnel::incoming`],
//!   control messages on [`Tunnel::control`].
//! - The **writer task** drains the mux ([`Mux::poll_transmit`]) into one buffer of up to
//!   [`COALESCE`] bytes per write, so rustls seals full 16 KiB records and the kernel sees few,
//!   large writes.
//! - **Liveness**: a ping every [`PING_INTERVAL`]; a session with nothing received for
//!   [`DEAD_AFTER`] is dead, and every stream on it fails with `ConnectionAborted`.
//!
//! The mux sits behind a mutex that is never held across an `.await`; a stream's reads and
//! writes lock it briefly, so there is no per-stream task and no per-stream buffer beyond the
//! mux's own (an idle stream costs a few hundred bytes).
//!
//! **No worker thread sleeps on a lock.** A stream's poll, and the reader and writer, take the
//! mux with `Shared::poll_lock` (a `split::PollMutex`): a task that finds it held waits as
//! `Pending` and is woken when it is released. The connection's read and write halves
//! ([`split`]) share the TLS stream through the same kind of lock; their polls (sealing or
//! opening records, a system call) are the longest. With `std` locks and `tokio::io::split`, a
//! worker slept on a futex while another held the lock, and the tasks queued on it waited too
//! (`docs/0006-tunnel.md`, "Blocking").

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hearth_proto::mux::{
    Event, Mux, MuxConfig, MuxError, Side, StreamId, TUNNEL_ALPN, TUNNEL_SESSION_ALPN, Target,
    reset,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Notify, mpsc, watch};

use crate::https::{ClientError, Endpoint, connect_tls};
use crate::tls::{ClientIdentity, client_config_alpns};
use split::{PollGuard, PollMutex};

/// A ping is sent this often.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Nothing received for this long: the session is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(15);

/// Bytes the writer gathers into one write (four full TLS records).
pub const COALESCE: usize = 64 * 1024;

/// TCP_NOTSENT_LOWAT: the socket takes more only when fewer bytes than this wait unsent, so the
/// fair scheduler, not a deep kernel queue, decides what goes next (a shell's keystroke waits
/// behind at most this much bulk data in the kernel).
pub const NOTSENT_LOWAT: u32 = 64 * 1024;

/// A tunnel's reader and writer tasks, and a relay direction, give their worker thread up after
/// moving this many bytes while more is ready: a bulk transfer on one connection then delays a
/// task woken on the same worker (another node's ping, a shell's keystroke, a small stream's
/// reply) by one slice of this size (tens of microseconds), not by tokio's whole cooperative
/// budget of reads (128 reads of up to 64 KiB, milliseconds of decryption and copying). 128 KiB:
/// at 64 KiB the yields themselves cost throughput, at 256 KiB the round-trip tail under bulk
/// grew toward 1 ms (`docs/0006-tunnel.md`, "Batch sizes").
pub const YIELD_AFTER: usize = 128 * 1024;

/// Bytes a loop moved since it last yielded its worker ([`YIELD_AFTER`]).
#[derive(Debug, Default)]
struct Fair(usize);

impl Fair {
    /// Count `n` bytes moved; yield the worker once [`YIELD_AFTER`] have gone by.
    async fn moved(&mut self, n: usize) {
        self.0 += n;
        if self.0 >= YIELD_AFTER {
            self.0 = 0;
            tokio::task::yield_now().await;
        }
    }
}

/// TCP keepalive: idle time before the first probe, and the probe interval.
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// TCP_USER_TIMEOUT: unacknowledged data older than this kills the connection (Linux).
pub const USER_TIMEOUT: Duration = Duration::from_secs(15);

/// Connect a tunnel to the gateway at `ep` with a node's or an operator's certificate: TLS 1.3
/// with the pinned CA, ALPN [`TUNNEL_ALPN`], TCP keepalive every [`KEEPALIVE`] and
/// TCP_USER_TIMEOUT [`USER_TIMEOUT`] so a dead path is noticed even while data is queued.
pub async fn connect(
    ep: &Endpoint,
    pin: &str,
    identity: &ClientIdentity,
    config: TunnelConfig,
) -> Result<Tunnel, ClientError> {
    Ok(connect_offering(ep, pin, identity, config, &[TUNNEL_ALPN]).await?.0)
}

/// Connect a node's tunnel that can carry its control session: offers [`TUNNEL_SESSION_ALPN`]
/// first, then [`TUNNEL_ALPN`]; like [`connect`] otherwise. The flag tells whether the gateway
/// took the session (the node then opens a [`Target::Session`] stream on it,
/// `crate::session::Session::on_tunnel`); if not, the node needs a separate `hearth/1` session.
pub async fn connect_node(
    ep: &Endpoint,
    pin: &str,
    identity: &ClientIdentity,
    config: TunnelConfig,
) -> Result<(Tunnel, bool), ClientError> {
    let offer = [TUNNEL_SESSION_ALPN, TUNNEL_ALPN];
    let (tunnel, alpn) = connect_offering(ep, pin, identity, config, &offer).await?;
    Ok((tunnel, alpn.as_deref() == Some(TUNNEL_SESSION_ALPN)))
}

/// A tunnel offering `alpns` (most preferred first), and the one the gateway picked.
async fn connect_offering(
    ep: &Endpoint,
    pin: &str,
    identity: &ClientIdentity,
    config: TunnelConfig,
    alpns: &[&[u8]],
) -> Result<(Tunnel, Option<Vec<u8>>), ClientError> {
    let tls = connect_tls(ep, client_config_alpns(pin, Some(identity), alpns)?).await?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    tune_tcp(tls.get_ref().0);
    Ok((Tunnel::spawn(tls, Side::Node, config), alpn))
}

/// Keepalive, user timeout and a shallow send queue on a tunnel's TCP connection (either end;
/// best effort: logged if refused).
pub fn tune_tcp(tcp: &tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let ka = socket2::TcpKeepalive::new().with_time(KEEPALIVE).with_interval(KEEPALIVE);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = sock.set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!(error = %e, "cannot set TCP_NOTSENT_LOWAT");
    }
    let _ = tcp.set_nodelay(true);
}

/// The congestion control a loopback connection gets instead of one that paces
/// ([`connect_loopback`]): Linux's default.
pub const LOOPBACK_CONGESTION: &str = "cubic";

/// What a connection to a service on this host's loopback should use instead of congestion
/// control `current`: `None` to keep it. BBR (any version) paces its sends with a kernel timer
/// when no `fq` qdisc does it; a loopback connection has no bottleneck to pace for, so the
/// pacing only costs timer interrupts (`docs/0006-tunnel.md`, "Pacing").
pub fn loopback_congestion(current: &str) -> Option<&'static str> {
    current.starts_with("bbr").then_some(LOOPBACK_CONGESTION)
}

/// Connect to a service on this host's loopback (the node's connection to an exposed port)
/// without kernel pacing: when the system's congestion control is BBR, the socket gets
/// [`LOOPBACK_CONGESTION`] before it connects, so BBR never runs on it (best effort: logged if
/// refused). Any other congestion control is kept.
pub async fn connect_loopback(port: u16) -> io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    #[cfg(target_os = "linux")]
    {
        let sock = socket2::SockRef::from(&socket);
        match congestion_of(&sock) {
            Ok(current) => {
                if let Some(to) = loopback_congestion(&current)
                    && let Err(e) = sock.set_tcp_congestion(to.as_bytes())
                {
                    tracing::debug!(error = %e, from = %current, to, "cannot set TCP_CONGESTION");
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read TCP_CONGESTION"),
        }
    }
    socket.connect((std::net::Ipv4Addr::LOCALHOST, port).into()).await
}

/// A socket's congestion control by name, without the kernel's NUL padding.
#[cfg(target_os = "linux")]
fn congestion_of(sock: &socket2::SockRef<'_>) -> io::Result<String> {
    let name = sock.tcp_congestion()?;
    Ok(String::from_utf8_lossy(&name).trim_end_matches('\0').to_owned())
}

/// Streams the peer opened that are not yet taken from [`Tunnel::incoming`].
const INCOMING_QUEUE: usize = 256;

/// Why the tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    /// The peer broke the protocol.
    #[error("peer broke the tunnel protocol")]
    Protocol(#[from] MuxError),
    /// Reading or writing the connection failed.
    #[error("tunnel connection failed: {0}")]
    Io(String),
    /// The peer closed the connection.
    #[error("peer closed the tunnel connection")]
    Eof,
    /// Nothing came for [`DEAD_AFTER`].
    #[error("nothing received for {0:?}: the session is dead")]
    Dead(Duration),
    /// [`TunnelHandle::close`] was called.
    #[error("tunnel closed by this side")]
    Closed,
}

/// Tuning of one tunnel (the defaults are the protocol's).
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// The multiplexer's limits.
    pub mux: MuxConfig,
    /// Ping period.
    pub ping_interval: Duration,
    /// Silence after which the session is dead.
    pub dead_after: Duration,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self { mux: MuxConfig::default(), ping_interval: PING_INTERVAL, dead_after: DEAD_AFTER }
    }
}

#[derive(Debug, Default)]
struct Waiters {
    read: Option<Waker>,
    write: Option<Waker>,
    finished: bool,
    reset: Option<(u32, String)>,
    /// The [`TunnelStream`] is gone; the stream lives on until its queued bytes are sent.
    dropped: bool,
}

#[derive(Debug)]
struct State {
    mux: Mux,
    waiters: HashMap<StreamId, Waiters>,
    dead: Option<TunnelError>,
    last_rx: Instant,
    rtt: Option<Duration>,
    ping_sent: Option<Instant>,
    control: mpsc::UnboundedSender<Vec<u8>>,
}

#[derive(Debug)]
struct Shared {
    state: PollMutex<State>,
    /// Something was queued for the writer.
    tx_ready: Notify,
    ended: watch::Sender<Option<TunnelError>>,
}

impl Shared {
    fn lock(&self) -> PollGuard<'_, State> {
        self.state.lock()
    }

    /// The state, or `Pending` (woken when it is released) while another task holds it: a
    /// stream's poll, or the reader or writer, never puts its worker thread to sleep on the
    /// lock while the holder copies a frame batch (see "Blocking" in `docs/0006-tunnel.md`).
    fn poll_lock(&self, cx: &mut Context<'_>) -> Poll<PollGuard<'_, State>> {
        self.state.poll_lock(cx)
    }

    fn end(&self, why: TunnelError) {
        let mut st = self.lock();
        if st.dead.is_none() {
            st.dead = Some(why.clone());
            for w in st.waiters.values_mut() {
                wake(&mut w.read);
                wake(&mut w.write);
            }
            drop(st);
            self.ended.send_replace(Some(why));
            self.tx_ready.notify_one();
        }
    }
}

/// A stream the peer opened.
#[derive(Debug)]
pub struct Incoming {
    /// What it wants to reach.
    pub target: Target,
    /// The stream (refuse it with [`TunnelStream::refuse`]).
    pub stream: TunnelStream,
}

/// One end of a running tunnel.
#[derive(Debug)]
pub struct Tunnel {
    /// Opens streams, sends control messages.
    pub handle: TunnelHandle,
    /// Streams the peer opens.
    pub incoming: mpsc::Receiver<Incoming>,
    /// Control-message payloads from the peer (stream 0).
    pub control: mpsc::UnboundedReceiver<Vec<u8>>,
}

/// Opens streams on a tunnel; cheap to clone.
#[derive(Debug, Clone)]
pub struct TunnelHandle {
    shared: Arc<Shared>,
}

impl Tunnel {
    /// Run a tunnel over `io` (an established session connection) as `side`. The tasks end when
    /// the connection fails, the peer breaks the protocol, the session goes silent or
    /// [`TunnelHandle::close`] is called; [`TunnelHandle::ended`] tells why.
    pub fn spawn<S>(io: S, side: Side, config: TunnelConfig) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (reader, writer) = split::split(io);
        let (in_tx, incoming) = mpsc::channel(INCOMING_QUEUE);
        let (ctl_tx, control) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            state: PollMutex::new(State {
                mux: Mux::new(side, config.mux.clone()),
                waiters: HashMap::new(),
                dead: None,
                last_rx: Instant::now(),
                rtt: None,
                ping_sent: None,
                control: ctl_tx,
            }),
            tx_ready: Notify::new(),
            ended: watch::channel(None).0,
        });
        let s = shared.clone();
        tokio::spawn(async move {
            let why = read_loop(&s, reader, in_tx).await;
            s.end(why);
        });
        let s = shared.clone();
        tokio::spawn(async move {
            if let Err(why) = write_loop(&s, writer).await {
                s.end(why);
            }
        });
        let s = shared.clone();
        tokio::spawn(async move { liveness(&s, config.ping_interval, config.dead_after).await });
        Self { handle: TunnelHandle { shared }, incoming, control }
    }
}

impl TunnelHandle {
    /// Open a stream to `target` on the peer. The peer may still refuse it: the first read or
    /// write then fails with `ConnectionRefused` (and the reason).
    pub fn open(&self, target: &Target) -> io::Result<TunnelStream> {
        let mut st = self.shared.lock();
        if let Some(why) = &st.dead {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, why.to_string()));
        }
        let id = st.mux.open(target).map_err(|e| io::Error::other(e.to_string()))?;
        st.waiters.insert(id, Waiters::default());
        drop(st);
        self.shared.tx_ready.notify_one();
        Ok(TunnelStream::new(id, self.shared.clone()))
    }

    /// Send a control message's payload (ahead of all stream data).
    pub fn send_control(&self, payload: &[u8]) -> Result<(), TunnelError> {
        let mut st = self.shared.lock();
        if let Some(why) = &st.dead {
            return Err(why.clone());
        }
        st.mux.send_control(payload)?;
        drop(st);
        self.shared.tx_ready.notify_one();
        Ok(())
    }

    /// Whether the tunnel has ended.
    pub fn is_ended(&self) -> bool {
        self.shared.lock().dead.is_some()
    }

    /// Wait until everything queued has been handed to the connection (or the tunnel ended),
    /// at most `limit`: last bytes go out before [`Self::close`].
    pub async fn drained(&self, limit: Duration) {
        let wait = async {
            loop {
                {
                    let st = self.shared.lock();
                    if st.dead.is_some() || st.mux.is_idle() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }

    /// The last measured round trip (from pings).
    pub fn rtt(&self) -> Option<Duration> {
        self.shared.lock().rtt
    }

    /// Streams open now.
    pub fn stream_count(&self) -> usize {
        self.shared.lock().mux.stream_count()
    }

    /// End the tunnel now.
    pub fn close(&self) {
        self.shared.end(TunnelError::Closed);
    }

    /// Wait until the tunnel ends; returns why.
    pub async fn ended(&self) -> TunnelError {
        let mut rx = self.shared.ended.subscribe();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                return TunnelError::Closed;
            }
        }
    }
}

/// One data stream of a tunnel. Dropping it without [`AsyncWriteExt::shutdown`] resets it.
#[derive(Debug)]
pub struct TunnelStream {
    id: StreamId,
    shared: Arc<Shared>,
    /// Finished (or refused) by this side: dropping it no longer resets it.
    shut: AtomicBool,
}

impl TunnelStream {
    fn new(id: StreamId, shared: Arc<Shared>) -> Self {
        Self { id, shared, shut: AtomicBool::new(false) }
    }

    /// The stream's id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Refuse (or abort) the stream with a [`reset`] code; the opener sees the reason.
    pub fn refuse(self, code: u32, reason: &str) {
        let mut st = self.shared.lock();
        let _ = st.mux.reset(self.id, code, reason);
        st.waiters.remove(&self.id);
        drop(st);
        self.shut.store(true, Ordering::Relaxed);
        self.shared.tx_ready.notify_one();
    }

    /// No more bytes from this side (after those queued); what [`AsyncWriteExt::shutdown`]
    /// does, through a shared reference.
    pub fn finish(&self) {
        if !self.shut.swap(true, Ordering::Relaxed) {
            // Already gone (reset, or both sides done): nothing to finish.
            let _ = self.shared.lock().mux.finish(self.id);
            self.shared.tx_ready.notify_one();
        }
    }

    /// Read up to `max` bytes into `buf` ([`Mux::read_vec`]: into an empty `buf` a queue of at
    /// most `max` is handed over without a copy). `Ok(0)`: the end of the stream.
    pub fn poll_read_vec(
        &self,
        cx: &mut Context<'_>,
        buf: &mut Vec<u8>,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        self.poll_read_with(cx, |mux, id| mux.read_vec(id, buf, max, Instant::now()))
    }

    /// Queue `buf`'s bytes; what is taken leaves `buf` ([`Mux::write_vec`]: a buffer that fits is
    /// queued whole, without a copy, and `buf` gets an empty allocation back).
    pub fn poll_write_vec(
        &self,
        cx: &mut Context<'_>,
        buf: &mut Vec<u8>,
    ) -> Poll<io::Result<usize>> {
        let want = !buf.is_empty();
        self.poll_write_with(cx, want, |mux, id| mux.write_vec(id, buf))
    }

    fn poll_read_with(
        &self,
        cx: &mut Context<'_>,
        read: impl FnOnce(&mut Mux, StreamId) -> Result<usize, MuxError>,
    ) -> Poll<io::Result<usize>> {
        let id = self.id;
        let mut st = std::task::ready!(self.shared.poll_lock(cx));
        let n = read(&mut st.mux, id).unwrap_or_default();
        if n > 0 {
            drop(st);
            // Reading may have queued credit for the peer.
            self.shared.tx_ready.notify_one();
            return Poll::Ready(Ok(n));
        }
        if let Some(e) = Self::aborted(&st, id) {
            return Poll::Ready(Err(e));
        }
        let gone = st.mux.stats(id).is_none();
        match st.waiters.get_mut(&id) {
            Some(w) if !w.finished && !gone => {
                w.read = Some(cx.waker().clone());
                Poll::Pending
            }
            // Finished by the peer (or closed): end of stream.
            _ => Poll::Ready(Ok(0)),
        }
    }

    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        want: bool,
        write: impl FnOnce(&mut Mux, StreamId) -> Result<usize, MuxError>,
    ) -> Poll<io::Result<usize>> {
        let id = self.id;
        let mut st = std::task::ready!(self.shared.poll_lock(cx));
        if let Some(e) = Self::aborted(&st, id) {
            return Poll::Ready(Err(e));
        }
        match write(&mut st.mux, id) {
            Ok(0) if want => {
                if let Some(w) = st.waiters.get_mut(&id) {
                    w.write = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Ok(n) => {
                drop(st);
                self.shared.tx_ready.notify_one();
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))),
        }
    }

    /// A handle that can reset this stream while its halves are in use elsewhere.
    pub fn control(&self) -> StreamControl {
        StreamControl { id: self.id, shared: self.shared.clone() }
    }

    /// Wait until every byte written so far has left for the peer (not that it arrived).
    pub async fn flushed(&self) {
        loop {
            let queued = {
                let st = self.shared.lock();
                st.dead.is_some() || st.mux.stats(self.id).is_none_or(|s| s.send_queued == 0)
            };
            if queued {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn aborted(st: &State, id: StreamId) -> Option<io::Error> {
        if let Some((code, reason)) = st.waiters.get(&id).and_then(|w| w.reset.as_ref()) {
            let kind = if *code == reset::CANCEL {
                io::ErrorKind::ConnectionReset
            } else {
                io::ErrorKind::ConnectionRefused
            };
            return Some(io::Error::new(kind, StreamReset { code: *code, reason: reason.clone() }));
        }
        st.dead
            .as_ref()
            .map(|why| io::Error::new(io::ErrorKind::ConnectionAborted, why.to_string()))
    }
}

/// The peer reset a stream: the error inside the `io::Error` a read or write returns
/// (`ConnectionRefused`, or `ConnectionReset` for [`reset::CANCEL`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream reset by peer (code {code}): {reason}")]
pub struct StreamReset {
    /// A [`reset`] code.
    pub code: u32,
    /// The peer's reason.
    pub reason: String,
}

impl StreamReset {
    /// The reset inside an I/O error, if it is one.
    pub fn of(e: &io::Error) -> Option<&Self> {
        e.get_ref().and_then(|i| i.downcast_ref::<Self>())
    }
}

/// Resets one stream (see [`TunnelStream::control`]).
#[derive(Debug, Clone)]
pub struct StreamControl {
    id: StreamId,
    shared: Arc<Shared>,
}

impl StreamControl {
    /// Wait until every byte written so far has left for the peer (or the stream is gone).
    pub async fn flushed(&self) {
        while self.queued() > 0 && self.shared.lock().dead.is_none() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Bytes written to the stream and not yet handed to the connection.
    pub fn queued(&self) -> usize {
        self.shared.lock().mux.stats(self.id).map_or(0, |s| s.send_queued)
    }
    /// Reset the stream with a [`reset`] code; a stream already gone is left alone.
    pub fn reset(&self, code: u32, reason: &str) {
        let mut st = self.shared.lock();
        if st.mux.reset(self.id, code, reason).is_ok() {
            if let Some(w) = st.waiters.get_mut(&self.id) {
                w.reset = Some((code, reason.to_string()));
                wake(&mut w.read);
                wake(&mut w.write);
            }
            drop(st);
            self.shared.tx_ready.notify_one();
        }
    }
}

/// Relay two streams both ways until both directions end; a reset on one side resets the other
/// with the same code (so an exit status or a refusal reaches the far end). Returns the bytes
/// moved `a → b` and `b → a`.
pub async fn splice(a: TunnelStream, b: TunnelStream) -> (u64, u64) {
    let (ca, cb) = (a.control(), b.control());
    let (ar, aw) = split::split(a);
    let (br, bw) = split::split(b);
    tokio::join!(pipe(ar, bw, &cb), pipe(br, aw, &ca))
}

async fn pipe<R, W>(mut from: R, mut to: W, to_ctl: &StreamControl) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let mut moved = 0u64;
    let mut fair = Fair::default();
    loop {
        match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return moved;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return moved;
                }
                moved += n as u64;
                fair.moved(n).await;
            }
            Err(e) => {
                // What was relayed before the reset goes first (a reset overtakes queued data),
                // unless the far side stops taking it.
                let _ = tokio::time::timeout(Duration::from_secs(30), to_ctl.flushed()).await;
                match StreamReset::of(&e) {
                    Some(r) => to_ctl.reset(r.code, &r.reason),
                    None => to_ctl.reset(reset::CANCEL, &e.to_string()),
                }
                return moved;
            }
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (into, now) = (buf.initialize_unfilled(), Instant::now());
        let n = std::task::ready!(self.poll_read_with(cx, |mux, id| mux.read(id, into, now)))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, !data.is_empty(), |mux, id| mux.write(id, data))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish();
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let shut = *self.shut.get_mut();
        let mut st = self.shared.lock();
        if !shut {
            let _ = st.mux.reset(self.id, reset::CANCEL, "closed by the application");
        }
        // A finished stream lives on until its queued bytes are sent and the peer finishes too;
        // then its waiters go with it (see `dispatch`).
        if !shut || st.mux.stats(self.id).is_none() {
            st.waiters.remove(&self.id);
        } else if let Some(w) = st.waiters.get_mut(&self.id) {
            w.dropped = true;
            discard(&mut st.mux, self.id);
        }
        drop(st);
        self.shared.tx_ready.notify_one();
    }
}

async fn read_loop<R: AsyncRead>(
    shared: &Arc<Shared>,
    reader: R,
    incoming: mpsc::Sender<Incoming>,
) -> TunnelError {
    tokio::pin!(reader);
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut ended = shared.ended.subscribe();
    let mut fair = Fair::default();
    loop {
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        let n = tokio::select! {
            r = reader.read_buf(&mut buf) => match r {
                Ok(0) => return TunnelError::Eof,
                Ok(n) => n,
                Err(e) => return TunnelError::Io(e.to_string()),
            },
            _ = ended.changed() => return TunnelError::Closed,
        };
        let mut opened = Vec::new();
        {
            let mut st = std::future::poll_fn(|cx| shared.poll_lock(cx)).await;
            st.last_rx = Instant::now();
            let used = match st.mux.receive(&buf) {
                Ok(used) => used,
                Err(e) => return TunnelError::Protocol(e),
            };
            buf.drain(..used);
            dispatch(&mut st, &mut opened);
        }
        shared.tx_ready.notify_one();
        for (id, target) in opened {
            let stream = TunnelStream::new(id, shared.clone());
            if let Err(mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i)) =
                incoming.try_send(Incoming { target, stream })
            {
                tracing::warn!(stream = id, "no one takes incoming streams: refusing");
                i.stream.refuse(reset::LIMIT, "the peer is not accepting streams");
            }
        }
        fair.moved(n).await;
    }
}

/// Act on the mux's events: wake the streams they name, pass control messages on, collect the
/// streams the peer opened.
fn dispatch(st: &mut State, opened: &mut Vec<(StreamId, Target)>) {
    while let Some(ev) = st.mux.poll_event() {
        match ev {
            Event::Opened { id, target } => {
                st.waiters.insert(id, Waiters::default());
                opened.push((id, target));
            }
            Event::Readable(id) => {
                if let Some(w) = st.waiters.get_mut(&id) {
                    wake(&mut w.read);
                    if w.dropped {
                        // No one reads it any more: discard, so the peer's credit keeps flowing.
                        discard(&mut st.mux, id);
                    }
                }
            }
            Event::Finished(id) => {
                if let Some(w) = st.waiters.get_mut(&id) {
                    w.finished = true;
                    wake(&mut w.read);
                }
            }
            Event::Writable(id) => {
                if let Some(w) = st.waiters.get_mut(&id) {
                    wake(&mut w.write);
                }
            }
            Event::Reset { id, code, reason } => {
                if let Some(w) = st.waiters.get_mut(&id) {
                    w.reset = Some((code, reason));
                    wake(&mut w.read);
                    wake(&mut w.write);
                }
            }
            Event::Closed(id) => {
                let dropped = st.waiters.get_mut(&id).is_some_and(|w| {
                    w.finished = true;
                    wake(&mut w.read);
                    wake(&mut w.write);
                    w.dropped
                });
                if dropped {
                    st.waiters.remove(&id);
                }
            }
            Event::Control(payload) => {
                let _ = st.control.send(payload);
            }
            Event::Pong(bytes) => {
                if let Some(sent) = st.ping_sent.take()
                    && bytes == ping_payload(sent)
                {
                    let rtt = sent.elapsed();
                    st.rtt = Some(rtt);
                    st.mux.observe_rtt(rtt, Instant::now());
                }
            }
        }
    }
}

async fn write_loop<W: AsyncWrite>(shared: &Arc<Shared>, writer: W) -> Result<(), TunnelError> {
    tokio::pin!(writer);
    let mut out = Vec::with_capacity(COALESCE + 64 * 1024);
    let mut fair = Fair::default();
    loop {
        shared.tx_ready.notified().await;
        loop {
            out.clear();
            let (dead, more) = {
                let mut st = std::future::poll_fn(|cx| shared.poll_lock(cx)).await;
                if st.dead.is_some() {
                    (true, false)
                } else {
                    let more = st.mux.poll_transmit(&mut out, COALESCE);
                    // Wake writers whose room came back (opens only come from received frames).
                    let mut opened = Vec::new();
                    dispatch(&mut st, &mut opened);
                    (false, more)
                }
            };
            if dead {
                let _ = writer.shutdown().await;
                return Ok(());
            }
            if !more {
                break;
            }
            writer.write_all(&out).await.map_err(|e| TunnelError::Io(e.to_string()))?;
            fair.moved(out.len()).await;
        }
        writer.flush().await.map_err(|e| TunnelError::Io(e.to_string()))?;
    }
}

/// Read and drop what `id` holds, so the peer's credit keeps flowing for a stream no one reads.
/// The scratch buffer lives only here: `dispatch` runs on every read and write of the tunnel,
/// and zeroing a buffer there each time cost about 1 % of the tunnel's CPU.
fn discard(mux: &mut Mux, id: StreamId) {
    let mut scratch = [0u8; 16 * 1024];
    while mux.read(id, &mut scratch, Instant::now()).unwrap_or(0) > 0 {}
}

fn wake(w: &mut Option<Waker>) {
    if let Some(w) = w.take() {
        w.wake();
    }
}

fn ping_payload(sent: Instant) -> [u8; 8] {
    // Opaque to the peer; only compared with the answer.
    let anchor = *ANCHOR.get_or_init(Instant::now);
    let nanos = sent.saturating_duration_since(anchor).as_nanos();
    u64::try_from(nanos).unwrap_or(u64::MAX).to_be_bytes()
}

static ANCHOR: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

async fn liveness(shared: &Arc<Shared>, every: Duration, dead_after: Duration) {
    let mut ended = shared.ended.subscribe();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ended.changed() => return,
        }
        let silent = {
            let mut st = shared.lock();
            if st.dead.is_some() {
                return;
            }
            let silent = st.last_rx.elapsed();
            if silent < dead_after {
                let now = Instant::now();
                st.ping_sent = Some(now);
                st.mux.ping(ping_payload(now));
            }
            silent
        };
        if silent >= dead_after {
            tracing::info!(silent_ms = silent.as_millis() as u64, "tunnel session silent: dead");
            shared.end(TunnelError::Dead(silent));
            return;
        }
        shared.tx_ready.notify_one();
    }
}

/// Read size of one relay direction while data flows (and the slice the stream → local direction
/// writes). A quarter of the stream's send buffer ([`MuxConfig::send_buffer`]), so several reads
/// queue before the relay waits for room (`docs/0006-tunnel.md`, "Batch sizes").
pub const RELAY_BUF: usize = 256 * 1024;

/// Most bytes a relay direction takes from a stream at once: what it may hold, besides the
/// stream's window, while its local side is slow to take them.
pub const RELAY_TAKE: usize = 1024 * 1024;

/// A relay direction quiet this long gives its [`RELAY_BUF`] buffer back.
pub const RELAY_QUIET: Duration = Duration::from_millis(500);

/// What a quiet relay direction reads into.
const RELAY_IDLE_BUF: usize = 512;

/// Relays a tunnel stream and a local connection (a customer's TCP connection on the gateway, a
/// service's socket on the node) both ways until both directions end; an end of stream on one
/// side shuts down the other side's writing half. Returns the bytes copied stream → local and
/// local → stream.
///
/// Like `tokio::io::copy_bidirectional`, except:
/// - **No copy through the tunnel's queues** while data flows: a buffer read from the local side
///   is queued on the stream as it is (a chunk of its send queue; an allocation the stream has
///   sent from comes back), and the stream's receive queue (up to [`RELAY_TAKE`]) becomes the
///   buffer written to the local side ([`Mux::write_vec`], [`Mux::read_vec`]): buffers change
///   hands, bytes are not copied. The bytes taken count as read, so a stream whose local side is
///   slow holds up to [`RELAY_TAKE`] in the relay besides its window.
/// - **A quiet direction holds no big buffer**: it reads into `RELAY_IDLE_BUF` (512) bytes, reads
///   [`RELAY_BUF`] at a time only once such a read comes back full (bulk data), and gives its
///   buffer back after [`RELAY_QUIET`]. So 1,000 idle forwarded connections cost about 1 MiB of
///   buffers instead of 512 MiB.
pub async fn relay<L>(stream: &TunnelStream, local: L) -> io::Result<(u64, u64)>
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = split::split(local);
    tokio::try_join!(stream_to_local(stream, &mut wr), local_to_stream(&mut rd, stream))
}

/// The stream → local direction of [`relay`].
async fn stream_to_local<W>(stream: &TunnelStream, to: &mut W) -> io::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    let mut buf = Vec::new();
    let mut fair = Fair::default();
    loop {
        let big = buf.capacity() > RELAY_IDLE_BUF;
        let read = std::future::poll_fn(|cx| stream.poll_read_vec(cx, &mut buf, RELAY_TAKE));
        let n = if big {
            // Holding a bulk-sized buffer: give it back once the direction goes quiet (a read
            // that timed out has taken nothing).
            match tokio::time::timeout(RELAY_QUIET, read).await {
                Ok(r) => r?,
                Err(_) => {
                    buf = Vec::new();
                    continue;
                }
            }
        } else {
            read.await?
        };
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        // The queue may hold a whole window (megabytes): written in slices, so a bulk stream
        // gives its worker up as often as before (`Fair`).
        for slice in buf.chunks(RELAY_BUF) {
            to.write_all(slice).await?;
            to.flush().await?;
            fair.moved(slice.len()).await;
        }
        buf.clear();
        total += n as u64;
    }
}

/// The local → stream direction of [`relay`].
async fn local_to_stream<R>(from: &mut R, stream: &TunnelStream) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
{
    let mut total = 0u64;
    let mut buf = Vec::new();
    let mut flowing = false;
    let mut fair = Fair::default();
    loop {
        // `buf` is empty here, with whatever allocation the last hand-over gave back.
        let want = if flowing { RELAY_BUF } else { RELAY_IDLE_BUF };
        if buf.capacity() < want {
            buf.reserve_exact(want);
        }
        // At most `want` per read whatever the allocation given back holds, so the scheduler's
        // turns, not the size of a buffer, decide how much bulk data queues at once.
        let mut limited = (&mut *from).take(want as u64);
        let n = if flowing {
            match tokio::time::timeout(RELAY_QUIET, limited.read_buf(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => {
                    flowing = false;
                    buf = Vec::new();
                    continue;
                }
            }
        } else {
            limited.read_buf(&mut buf).await?
        };
        if n == 0 {
            stream.finish();
            return Ok(total);
        }
        // A full small read: data is flowing (a keystroke or a request takes no big buffer).
        flowing |= n >= want;
        while !buf.is_empty() {
            std::future::poll_fn(|cx| stream.poll_write_vec(cx, &mut buf)).await?;
        }
        total += n as u64;
        fair.moved(n).await;
    }
}

pub mod lanes;
pub mod split;

#[cfg(test)]
mod tests;
