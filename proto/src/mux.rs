//! The tunnel's stream multiplexer: data streams on the node's control session, as a pure state
//! machine ([`Mux`]) that an async driver feeds with received bytes ([`Mux::receive`]) and drains
//! into the connection ([`Mux::poll_transmit`]). Design: `docs/0006-tunnel.md`.
//!
//! - **Streams.** Either side opens a stream with an [`FrameType::Open`] frame naming a
//!   [`Target`]; the node (the TLS client) uses odd ids, the gateway even ones, each rising, so an
//!   id is never reused within a session. [`FrameType::Data`] with [`FLAG_FIN`] half-closes;
//!   [`FrameType::Reset`] aborts (or refuses an Open, with a [`reset`] code).
//! - **Credit-based flow control.** A receiver grants credit ([`FrameType::Window`]); a sender never
//!   has more than that in flight, and data beyond the credit ends the session
//!   ([`MuxError::FlowControl`]), so a peer can make this side buffer at most one window per
//!   stream. Each stream starts at [`INITIAL_WINDOW`]; when the application drains a whole window
//!   within two round trips the window doubles (up to [`MuxConfig::max_window`]), so it grows to the
//!   bandwidth-delay product without a memory cost for idle streams; a window that takes more than
//!   [`SHRINK_AFTER_RTTS`] round trips to drain halves again (not below [`INITIAL_WINDOW`]). The
//!   round trip is the minimum of recent pings ([`Mux::observe_rtt`]), not the latest: a ping that
//!   waited behind bulk data measures the queue, and windows grown to a queue's delay would let
//!   that queue grow further, with every other stream's bytes waiting behind it.
//! - **Fair scheduler.** Session frames (control messages, pings) and stream bookkeeping (opens,
//!   credit, resets) leave first; stream data leaves by deficit round robin with a
//!   [`MuxConfig::quantum`] per turn, so a bulk stream cannot starve a shell: the shell's bytes wait
//!   at most one quantum per other busy stream.
//! - **Coalescing.** [`Mux::poll_transmit`] appends whole frames to one buffer up to a byte budget,
//!   so the driver hands rustls large writes that become full TLS records.
//! - **Buffers change hands.** A relay queues the buffer it read as a chunk of the stream's send
//!   queue ([`Mux::write_vec`]) and takes a stream's receive queue whole ([`Mux::read_vec`]), so
//!   bulk bytes are not copied through the multiplexer on either side.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::frame::{self, FLAG_ACK, FLAG_FIN, FrameError, FrameType, HEADER_LEN, Header};

/// A stream's id (0 is the session itself).
pub type StreamId = u32;

/// Every stream's receive window when it opens (both sides assume it).
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// A round-trip sample holds the minimum ([`Mux::observe_rtt`]) this long; a lower sample
/// replaces it at once.
pub const RTT_MIN_WINDOW: Duration = Duration::from_secs(60);

/// A receive window whose half took longer than this many round trips to drain is larger than the
/// stream needs: it halves (see the module docs).
pub const SHRINK_AFTER_RTTS: u32 = 16;

/// The smallest round trip window growth assumes.
const RTT_FLOOR: Duration = Duration::from_micros(50);

/// What a stream connects to on the side that accepts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// The node's local HTTP API (`docs/api.md`), including its metrics.
    LocalApi,
    /// Run a command without a terminal: stdout and stderr come back on the stream.
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
    },
    /// An interactive login shell on a PTY.
    Shell {
        /// Terminal rows.
        rows: u16,
        /// Terminal columns.
        cols: u16,
        /// `TERM`.
        term: String,
    },
    /// A TCP port on the node's loopback (workload ingress), if the node's policy allows it.
    Port(u16),
    /// Diagnostics: the accepting side sends every byte back (tunnel health and benchmarks).
    Echo,
    /// Operator → gateway: relay to `target` on node `node` (the gateway checks the operator's
    /// role and opens `target` on that node's tunnel; nodes refuse it).
    Via {
        /// The node id.
        node: String,
        /// What to reach there.
        target: Box<Target>,
    },
    /// Node → gateway, first on a [`TUNNEL_SESSION_ALPN`] tunnel: the node's control session
    /// (`hearth/1` frames in the stream's bytes). The gateway takes one per tunnel and refuses
    /// it on any other connection; nodes refuse it.
    Session,
}

impl Target {
    /// Opening it needs the admin role (a shell, a command, a port, a relay of those).
    pub fn needs_admin(&self) -> bool {
        match self {
            Self::LocalApi => false,
            Self::Via { target, .. } => target.needs_admin(),
            Self::Exec { .. } | Self::Shell { .. } | Self::Port(_) | Self::Echo | Self::Session => {
                true
            }
        }
    }

    /// A short name for logs and events (`exec`, `shell`, `port 8080`, …); never the argv.
    pub fn label(&self) -> String {
        match self {
            Self::LocalApi => "api".into(),
            Self::Exec { argv } => format!("exec {}", argv.first().map_or("", String::as_str)),
            Self::Shell { .. } => "shell".into(),
            Self::Port(p) => format!("port {p}"),
            Self::Echo => "echo".into(),
            Self::Via { node, target } => format!("{} on {node}", target.label()),
            Self::Session => "session".into(),
        }
    }
}

/// The ALPN id of tunnel connections to the gateway (the fleet's TLS port): a node's tunnel
/// (node certificate) or an operator's (operator certificate, streams opened with
/// [`Target::Via`]).
pub const TUNNEL_ALPN: &[u8] = b"hearth-tunnel/1";

/// The ALPN id of a node's tunnel that also carries its control session: the node opens a
/// [`Target::Session`] stream first and speaks `hearth/1` on it (the same frames, Hello first),
/// so a node keeps one connection to the fleet (plus lanes) and the session has a stream's
/// credit and its turn in the scheduler. A node offers it before [`TUNNEL_ALPN`]; a gateway that
/// picks [`TUNNEL_ALPN`] needs a separate `hearth/1` session.
pub const TUNNEL_SESSION_ALPN: &[u8] = b"hearth-tunnel/2";

/// Reset codes (the first 4 bytes of a [`FrameType::Reset`] payload).
pub mod reset {
    /// The opener or the application gave up on the stream.
    pub const CANCEL: u32 = 0;
    /// Not allowed (role, port policy).
    pub const REFUSED: u32 = 1;
    /// The target does not exist or cannot be reached.
    pub const UNREACHABLE: u32 = 2;
    /// Too many streams.
    pub const LIMIT: u32 = 3;
    /// The Open frame's target could not be decoded.
    pub const BAD_TARGET: u32 = 4;
    /// The accepting side failed.
    pub const INTERNAL: u32 = 5;
    /// Exec: the command exited with a non-zero status `code - EXIT` (after all its output).
    pub const EXIT: u32 = 0x100;
    /// Exec: killed by a signal `code - SIGNAL`.
    pub const SIGNAL: u32 = 0x200;
}

/// Which end of the session this is (decides the parity of the ids it opens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The node (TLS client): odd stream ids.
    Node,
    /// The gateway (TLS server, the fleet): even stream ids.
    Gateway,
}

impl Side {
    fn first_id(self) -> StreamId {
        match self {
            Self::Node => 1,
            Self::Gateway => 2,
        }
    }

    fn owns(self, id: StreamId) -> bool {
        (id % 2 == 1) == (self == Self::Node)
    }
}

/// Limits and tuning of one multiplexer.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// Largest receive window a stream grows to (bytes).
    pub max_window: u32,
    /// Open streams allowed at once (both directions); more Opens are refused with
    /// [`reset::LIMIT`].
    pub max_streams: usize,
    /// Bytes [`Mux::write`] queues per stream before it pushes back. Several times a relay's
    /// read (the default, 1 MiB, holds four 256 KiB reads), so a bulk relay is not stopped after
    /// each read to wait for room (`docs/0006-tunnel.md`, "Batch sizes").
    pub send_buffer: usize,
    /// Bytes a stream may send per scheduler turn.
    pub quantum: usize,
    /// Largest data frame payload.
    pub max_frame: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        Self {
            max_window: 16 * 1024 * 1024,
            max_streams: 4096,
            send_buffer: 1024 * 1024,
            quantum: 16 * 1024,
            max_frame: 64 * 1024,
        }
    }
}

/// What happened, for the driver to act on ([`Mux::poll_event`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer opened a stream: connect it to its target, or [`Mux::reset`] it.
    Opened {
        /// The stream.
        id: StreamId,
        /// What it wants.
        target: Target,
    },
    /// Bytes arrived: [`Mux::read`] them.
    Readable(StreamId),
    /// The peer will send no more on this stream (after the bytes already readable).
    Finished(StreamId),
    /// Room in the send buffer again after [`Mux::write`] took less than asked.
    Writable(StreamId),
    /// The stream was aborted by the peer (or refused).
    Reset {
        /// The stream.
        id: StreamId,
        /// A [`reset`] code.
        code: u32,
        /// Why, in words.
        reason: String,
    },
    /// The stream is gone (both directions finished, or reset): forget it.
    Closed(StreamId),
    /// A control message's payload (stream 0).
    Control(Vec<u8>),
    /// The answer to one of our pings.
    Pong([u8; 8]),
}

/// Why the multiplexer refused a frame (the session must end) or a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// Bad frame header.
    #[error("bad frame")]
    Frame(#[from] FrameError),
    /// The peer sent more than the credit it had.
    #[error("stream {stream}: {len} bytes sent with only {allowed} bytes of credit")]
    FlowControl {
        /// The stream.
        stream: StreamId,
        /// Bytes in the frame.
        len: usize,
        /// Credit left.
        allowed: u64,
    },
    /// The peer opened a stream id it may not use (wrong parity, not rising).
    #[error("stream {stream}: bad Open ({reason})")]
    BadOpen {
        /// The stream.
        stream: StreamId,
        /// What is wrong.
        reason: &'static str,
    },
    /// A frame for a stream that was never opened.
    #[error("{kind:?} frame for stream {stream}, which was never opened")]
    NeverOpened {
        /// The frame type.
        kind: FrameType,
        /// The stream.
        stream: StreamId,
    },
    /// Data after the peer's FIN.
    #[error("stream {0}: data after FIN")]
    DataAfterFin(StreamId),
    /// A payload of the wrong size for its frame type.
    #[error("{kind:?} frame on stream {stream} with a {len}-byte payload")]
    BadPayload {
        /// The frame type.
        kind: FrameType,
        /// The stream.
        stream: StreamId,
        /// Its length.
        len: usize,
    },
    /// Credit beyond 2^31 bytes outstanding.
    #[error("stream {0}: window grown past 2 GiB")]
    WindowOverflow(StreamId),
    /// A local call named a stream that is not open.
    #[error("stream {0} is not open")]
    UnknownStream(StreamId),
    /// A local write after [`Mux::finish`].
    #[error("stream {0} is finished for sending")]
    SendClosed(StreamId),
    /// A local open with every stream slot taken.
    #[error("{max} streams are open: no more")]
    TooManyStreams {
        /// The limit.
        max: usize,
    },
    /// A control payload larger than a frame.
    #[error("control payload of {0} bytes is larger than a frame")]
    ControlTooLarge(usize),
}

/// A stream's send queue: chunks of bytes, in order. A buffer handed over whole
/// ([`Mux::write_vec`]) is queued as it is; borrowed bytes ([`Mux::write`]) are copied into the
/// last chunk's spare room or a new chunk. Framing copies from the front ([`Self::take_into`]),
/// and a chunk sent in full is kept as the spare allocation for the next one.
#[derive(Debug, Default)]
struct SendQueue {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the front chunk already framed.
    head: usize,
    /// Bytes queued.
    len: usize,
    /// An empty allocation, for the next chunk.
    spare: Vec<u8>,
}

impl SendQueue {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push_slice(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match self.chunks.back_mut() {
            Some(back) if back.capacity() - back.len() >= data.len() => {
                back.extend_from_slice(data);
            }
            _ => {
                // Sized to the write: an idle stream keeps no more than its last message.
                let mut chunk = std::mem::take(&mut self.spare);
                chunk.reserve_exact(data.len());
                chunk.extend_from_slice(data);
                self.chunks.push_back(chunk);
            }
        }
        self.len += data.len();
    }

    /// Queue `data` as a chunk; `data` gets the spare allocation (or none) back.
    fn push_vec(&mut self, data: &mut Vec<u8>) {
        if data.is_empty() {
            return;
        }
        self.len += data.len();
        let spare = std::mem::take(&mut self.spare);
        self.chunks.push_back(std::mem::replace(data, spare));
    }

    /// Move the first `n` queued bytes onto `out`.
    fn take_into(&mut self, out: &mut Vec<u8>, n: usize) {
        let mut n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front() else { break };
            let k = (front.len() - self.head).min(n);
            out.extend_from_slice(&front[self.head..self.head + k]);
            self.head += k;
            n -= k;
            if self.head == front.len() {
                self.head = 0;
                if let Some(mut sent) = self.chunks.pop_front()
                    && sent.capacity() > self.spare.capacity()
                {
                    sent.clear();
                    self.spare = sent;
                }
            }
        }
    }

    fn clear(&mut self) {
        self.chunks.clear();
        self.head = 0;
        self.len = 0;
    }
}

#[derive(Debug)]
struct Stream {
    /// Bytes queued by [`Mux::write`] and [`Mux::write_vec`], not yet framed.
    send_buf: SendQueue,
    /// Bytes we may still send (the peer's window as we know it).
    send_credit: u64,
    /// Local FIN asked for.
    fin_queued: bool,
    /// Local FIN framed.
    fin_sent: bool,
    /// A write was cut short: tell the application when there is room.
    want_writable: bool,
    /// Scheduler deficit (bytes it may still send this turn).
    deficit: usize,
    /// In the scheduler's ring.
    active: bool,
    /// Bytes received, not yet read.
    recv_buf: VecDeque<u8>,
    /// Bytes the peer may still send before more credit.
    recv_allowed: u64,
    /// Read, not yet credited back.
    recv_consumed: u64,
    /// The receive window (`recv_buf + recv_allowed + recv_consumed`).
    recv_window: u64,
    /// When credit was last granted.
    last_credit: Option<Instant>,
    /// The peer's FIN arrived.
    remote_fin: bool,
    /// The peer reset the stream while bytes were still unread: readable until drained.
    peer_reset: bool,
}

impl Stream {
    fn new() -> Self {
        Self {
            send_buf: SendQueue::default(),
            send_credit: u64::from(INITIAL_WINDOW),
            fin_queued: false,
            fin_sent: false,
            want_writable: false,
            deficit: 0,
            active: false,
            recv_buf: VecDeque::new(),
            recv_allowed: u64::from(INITIAL_WINDOW),
            recv_consumed: 0,
            recv_window: u64::from(INITIAL_WINDOW),
            last_credit: None,
            remote_fin: false,
            peer_reset: false,
        }
    }

    fn has_sendable(&self) -> bool {
        (!self.send_buf.is_empty() && self.send_credit > 0)
            || (self.fin_queued && !self.fin_sent && self.send_buf.is_empty())
    }

    fn done(&self) -> bool {
        (self.fin_sent && self.remote_fin || self.peer_reset) && self.recv_buf.is_empty()
    }
}

/// A stream's counters, for tests, metrics and the fuzz target's invariants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes queued to send.
    pub send_queued: usize,
    /// Send credit left.
    pub send_credit: u64,
    /// Bytes received, not read.
    pub recv_buffered: usize,
    /// Bytes the peer may still send.
    pub recv_allowed: u64,
    /// Current receive window.
    pub recv_window: u64,
}

/// The multiplexer of one session (see the module docs).
#[derive(Debug)]
pub struct Mux {
    side: Side,
    config: MuxConfig,
    streams: BTreeMap<StreamId, Stream>,
    next_local: StreamId,
    /// Highest id the peer opened (0: none).
    last_remote: StreamId,
    /// Encoded session and bookkeeping frames, sent before any data.
    urgent: VecDeque<Vec<u8>>,
    /// Streams with data to send, in round-robin order.
    ring: VecDeque<StreamId>,
    events: VecDeque<Event>,
    /// The minimum recent round trip (window growth).
    rtt: Duration,
    /// When `rtt` was measured (`None`: the default, before any sample).
    rtt_at: Option<Instant>,
}

impl Mux {
    /// A multiplexer for one end of a session.
    pub fn new(side: Side, config: MuxConfig) -> Self {
        Self {
            side,
            config,
            streams: BTreeMap::new(),
            next_local: side.first_id(),
            last_remote: 0,
            urgent: VecDeque::new(),
            ring: VecDeque::new(),
            events: VecDeque::new(),
            rtt: Duration::from_millis(1),
            rtt_at: None,
        }
    }

    /// A round-trip sample (the driver's pings). Window growth uses the minimum of the samples of
    /// the last [`RTT_MIN_WINDOW`]: the path's own delay, without the queueing a ping may have
    /// waited through.
    pub fn observe_rtt(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.max(RTT_FLOOR);
        let expired =
            self.rtt_at.is_none_or(|at| now.saturating_duration_since(at) >= RTT_MIN_WINDOW);
        if expired || rtt <= self.rtt {
            self.rtt = rtt;
            self.rtt_at = Some(now);
        }
    }

    /// The round trip window growth uses now.
    pub fn rtt(&self) -> Duration {
        self.rtt
    }

    /// Open streams.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// A stream's counters.
    pub fn stats(&self, id: StreamId) -> Option<StreamStats> {
        self.streams.get(&id).map(|s| StreamStats {
            send_queued: s.send_buf.len(),
            send_credit: s.send_credit,
            recv_buffered: s.recv_buf.len(),
            recv_allowed: s.recv_allowed,
            recv_window: s.recv_window,
        })
    }

    /// Ids of the open streams.
    pub fn stream_ids(&self) -> impl Iterator<Item = StreamId> + '_ {
        self.streams.keys().copied()
    }

    /// Open a stream to `target` on the peer.
    pub fn open(&mut self, target: &Target) -> Result<StreamId, MuxError> {
        if self.streams.len() >= self.config.max_streams {
            return Err(MuxError::TooManyStreams { max: self.config.max_streams });
        }
        let id = self.next_local;
        self.next_local = self.next_local.wrapping_add(2);
        // Serializing a Target into a Vec cannot fail (no maps, no unsupported types).
        let payload = postcard::to_stdvec(target).unwrap_or_default();
        self.push_urgent(FrameType::Open, 0, id, &payload);
        self.streams.insert(id, Stream::new());
        Ok(id)
    }

    /// Queue a control message's payload (sent before any stream data).
    pub fn send_control(&mut self, payload: &[u8]) -> Result<(), MuxError> {
        if payload.len() > frame::MAX_PAYLOAD as usize {
            return Err(MuxError::ControlTooLarge(payload.len()));
        }
        self.push_urgent(FrameType::Control, 0, 0, payload);
        Ok(())
    }

    /// Queue a ping; the answer comes back as [`Event::Pong`] with the same bytes.
    pub fn ping(&mut self, payload: [u8; 8]) {
        self.push_urgent(FrameType::Ping, 0, 0, &payload);
    }

    /// Queue bytes on a stream; returns how many were taken (fewer when its send buffer is full:
    /// wait for [`Event::Writable`]).
    pub fn write(&mut self, id: StreamId, data: &[u8]) -> Result<usize, MuxError> {
        let limit = self.config.send_buffer;
        let s = self.streams.get_mut(&id).ok_or(MuxError::UnknownStream(id))?;
        if s.fin_queued {
            return Err(MuxError::SendClosed(id));
        }
        let n = data.len().min(limit.saturating_sub(s.send_buf.len()));
        s.send_buf.push_slice(&data[..n]);
        if n < data.len() {
            s.want_writable = true;
        }
        self.activate(id);
        Ok(n)
    }

    /// [`Mux::write`] for bytes the caller owns: what is taken leaves `data`, and a vector of at
    /// most half the send buffer is taken whole or not at all (0: wait for [`Event::Writable`],
    /// which comes with room for it), so the caller never shifts a remainder. A vector taken
    /// whole is queued as it is, and `data` gets an empty allocation back (one the stream has
    /// sent from, when it has one): a relay's buffers go round without a copy or an allocation.
    pub fn write_vec(&mut self, id: StreamId, data: &mut Vec<u8>) -> Result<usize, MuxError> {
        let limit = self.config.send_buffer;
        let s = self.streams.get_mut(&id).ok_or(MuxError::UnknownStream(id))?;
        if s.fin_queued {
            return Err(MuxError::SendClosed(id));
        }
        let n = data.len();
        if n == 0 {
            return Ok(0);
        }
        if n > limit / 2 {
            // Larger than the room a Writable event promises: taken piecewise.
            let n = self.write(id, data)?;
            data.drain(..n);
            return Ok(n);
        }
        if n > limit.saturating_sub(s.send_buf.len()) {
            s.want_writable = true;
            return Ok(0);
        }
        s.send_buf.push_vec(data);
        self.activate(id);
        Ok(n)
    }

    /// No more bytes from this side on `id` (after those queued).
    pub fn finish(&mut self, id: StreamId) -> Result<(), MuxError> {
        let s = self.streams.get_mut(&id).ok_or(MuxError::UnknownStream(id))?;
        s.fin_queued = true;
        self.activate(id);
        Ok(())
    }

    /// Abort a stream (or refuse the peer's Open) with a [`reset`] code and a reason.
    pub fn reset(&mut self, id: StreamId, code: u32, reason: &str) -> Result<(), MuxError> {
        if self.streams.remove(&id).is_none() {
            return Err(MuxError::UnknownStream(id));
        }
        let mut payload = code.to_be_bytes().to_vec();
        let reason = reason.as_bytes();
        payload.extend_from_slice(&reason[..reason.len().min(1024)]);
        self.push_urgent(FrameType::Reset, 0, id, &payload);
        Ok(())
    }

    /// Take up to `buf.len()` received bytes from a stream; `now` drives window growth. 0 bytes
    /// with [`Event::Finished`] seen: the end of the stream.
    pub fn read(&mut self, id: StreamId, buf: &mut [u8], now: Instant) -> Result<usize, MuxError> {
        // A stream that closed after its last bytes were read reads as the end.
        let Some(s) = self.live_stream_local(id)? else { return Ok(0) };
        let n = buf.len().min(s.recv_buf.len());
        let (a, b) = s.recv_buf.as_slices();
        let from_a = n.min(a.len());
        buf[..from_a].copy_from_slice(&a[..from_a]);
        buf[from_a..n].copy_from_slice(&b[..n - from_a]);
        s.recv_buf.drain(..n);
        self.consumed(id, n, now);
        Ok(n)
    }

    /// [`Mux::read`] of up to `max` bytes, appended to `buf`. When `buf` is empty and the stream
    /// holds no more than `max`, its receive queue itself is handed over and the stream keeps
    /// `buf`'s allocation: a relay takes bulk data without a copy.
    pub fn read_vec(
        &mut self,
        id: StreamId,
        buf: &mut Vec<u8>,
        max: usize,
        now: Instant,
    ) -> Result<usize, MuxError> {
        let Some(s) = self.live_stream_local(id)? else { return Ok(0) };
        let n = s.recv_buf.len().min(max);
        if buf.is_empty() && n == s.recv_buf.len() {
            let spare = VecDeque::from(std::mem::take(buf));
            // Moves nothing unless the queue wraps around its allocation.
            *buf = Vec::from(std::mem::replace(&mut s.recv_buf, spare));
        } else {
            let (a, b) = s.recv_buf.as_slices();
            let from_a = n.min(a.len());
            buf.extend_from_slice(&a[..from_a]);
            buf.extend_from_slice(&b[..n - from_a]);
            s.recv_buf.drain(..n);
        }
        self.consumed(id, n, now);
        Ok(n)
    }

    /// `n` bytes of `id` were read: grant credit back once half the window went by (growing or
    /// shrinking the window), and close the stream when nothing is left on it.
    fn consumed(&mut self, id: StreamId, n: usize, now: Instant) {
        let max_window = u64::from(self.config.max_window);
        let rtt = self.rtt;
        let Some(s) = self.streams.get_mut(&id) else { return };
        s.recv_consumed += n as u64;
        let mut credit = None;
        if s.recv_consumed > 0
            && s.recv_consumed >= s.recv_window / 2
            && !s.remote_fin
            && !s.peer_reset
        {
            // Half the window went by within two round trips: the window is what limits the
            // stream, so double it (bandwidth-delay product growth). Half of it took many round
            // trips: the window is larger than the stream needs, and only lets a queue build on
            // the connection (ahead of every other stream's bytes), so halve it.
            let since = s.last_credit.map(|t| now.saturating_duration_since(t));
            let fast = since.is_some_and(|d| d < rtt * 2);
            let slow = since.is_some_and(|d| d > rtt * SHRINK_AFTER_RTTS);
            let initial = u64::from(INITIAL_WINDOW);
            let (grow, shrink) = if fast && s.recv_window < max_window {
                ((s.recv_window * 2).min(max_window) - s.recv_window, 0)
            } else if slow && s.recv_window > initial {
                // consumed >= window / 2 >= shrink: the increment stays >= 0.
                (0, s.recv_window - (s.recv_window / 2).max(initial))
            } else {
                (0, 0)
            };
            s.recv_window = s.recv_window + grow - shrink;
            let inc = s.recv_consumed + grow - shrink;
            s.recv_allowed += inc;
            s.recv_consumed = 0;
            s.last_credit = Some(now);
            credit = (inc > 0).then_some(inc);
        }
        let closed = s.done();
        if let Some(inc) = credit {
            // inc <= max_window (a u32), so the conversion holds.
            let inc = u32::try_from(inc).unwrap_or(u32::MAX);
            self.push_urgent(FrameType::Window, 0, id, &inc.to_be_bytes());
        }
        if closed {
            self.close(id);
        }
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Decode and handle every whole frame at the start of `buf`; returns the bytes used (keep
    /// the rest for the next call). An error means the peer broke the protocol: end the session.
    pub fn receive(&mut self, buf: &[u8]) -> Result<usize, MuxError> {
        let mut used = 0;
        while let Some((header, payload, n)) = frame::decode(&buf[used..])? {
            self.handle(header, payload)?;
            used += n;
        }
        Ok(used)
    }

    /// Handle one received frame.
    pub fn handle(&mut self, h: Header, payload: &[u8]) -> Result<(), MuxError> {
        let id = h.stream;
        match h.kind {
            FrameType::Control => self.events.push_back(Event::Control(payload.to_vec())),
            FrameType::Ping => {
                let bytes: [u8; 8] = payload.try_into().map_err(|_| MuxError::BadPayload {
                    kind: h.kind,
                    stream: id,
                    len: payload.len(),
                })?;
                if h.flags & FLAG_ACK != 0 {
                    self.events.push_back(Event::Pong(bytes));
                } else {
                    self.push_urgent(FrameType::Ping, FLAG_ACK, 0, &bytes);
                }
            }
            FrameType::Open => self.on_open(id, payload)?,
            FrameType::Data => self.on_data(id, h.flags & FLAG_FIN != 0, payload)?,
            FrameType::Window => {
                let inc: [u8; 4] = payload.try_into().map_err(|_| MuxError::BadPayload {
                    kind: h.kind,
                    stream: id,
                    len: payload.len(),
                })?;
                let inc = u64::from(u32::from_be_bytes(inc));
                let Some(s) = self.live_stream(FrameType::Window, id)? else { return Ok(()) };
                s.send_credit += inc;
                if s.send_credit > 1 << 31 {
                    return Err(MuxError::WindowOverflow(id));
                }
                self.activate(id);
            }
            FrameType::Reset => {
                let Some(code) = payload.first_chunk::<4>() else {
                    return Err(MuxError::BadPayload {
                        kind: h.kind,
                        stream: id,
                        len: payload.len(),
                    });
                };
                let code = u32::from_be_bytes(*code);
                let reason = String::from_utf8_lossy(&payload[4..]).into_owned();
                if let Some(s) = self.live_stream(FrameType::Reset, id)? {
                    // Bytes that arrived before the reset stay readable (an exec's output before
                    // its exit status); the stream closes once they are read.
                    let keep = !s.recv_buf.is_empty();
                    if keep {
                        s.peer_reset = true;
                        s.send_buf.clear();
                        s.fin_queued = true;
                        s.fin_sent = true;
                    } else {
                        self.streams.remove(&id);
                    }
                    self.events.push_back(Event::Reset { id, code, reason });
                    if !keep {
                        self.events.push_back(Event::Closed(id));
                    }
                }
            }
        }
        Ok(())
    }

    /// Append frames to `out` until it holds at least `budget` bytes or nothing is left to send:
    /// session and bookkeeping frames first, then stream data by deficit round robin. Returns
    /// whether anything was appended.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>, budget: usize) -> bool {
        let start = out.len();
        while out.len() < budget {
            if let Some(f) = self.urgent.pop_front() {
                out.extend_from_slice(&f);
                continue;
            }
            let Some(id) = self.ring.pop_front() else { break };
            let quantum = self.config.quantum;
            let max_frame = self.config.max_frame;
            let half = self.config.send_buffer / 2;
            let Some(s) = self.streams.get_mut(&id) else { continue };
            if !s.has_sendable() {
                s.active = false;
                s.deficit = 0;
                continue;
            }
            if s.deficit == 0 {
                s.deficit = quantum;
            }
            let mut room = budget.saturating_sub(out.len());
            while s.has_sendable() && s.deficit > 0 && room > HEADER_LEN {
                let credit = usize::try_from(s.send_credit).unwrap_or(usize::MAX);
                let n = s
                    .send_buf
                    .len()
                    .min(credit)
                    .min(s.deficit)
                    .min(max_frame)
                    .min(room - HEADER_LEN);
                let fin = s.fin_queued && n == s.send_buf.len();
                let len = u32::try_from(n).unwrap_or(frame::MAX_PAYLOAD);
                let flags = if fin { FLAG_FIN } else { 0 };
                out.extend_from_slice(
                    &Header { kind: FrameType::Data, flags, stream: id, len }.to_bytes(),
                );
                s.send_buf.take_into(out, n);
                s.send_credit -= n as u64;
                s.deficit = s.deficit.saturating_sub(n.max(1));
                if fin {
                    s.fin_sent = true;
                }
                room = budget.saturating_sub(out.len());
            }
            if s.want_writable && s.send_buf.len() <= half && !s.fin_queued {
                s.want_writable = false;
                self.events.push_back(Event::Writable(id));
            }
            if s.done() {
                self.close(id);
            } else if s.has_sendable() {
                if s.deficit == 0 {
                    self.ring.push_back(id);
                } else {
                    // Out of budget mid-turn: keep its place and what is left of its turn.
                    self.ring.push_front(id);
                    break;
                }
            } else {
                s.active = false;
                s.deficit = 0;
            }
        }
        out.len() > start
    }

    /// Nothing waits to be sent.
    pub fn is_idle(&self) -> bool {
        self.urgent.is_empty() && self.ring.is_empty()
    }

    fn on_open(&mut self, id: StreamId, payload: &[u8]) -> Result<(), MuxError> {
        if self.side.owns(id) {
            return Err(MuxError::BadOpen { stream: id, reason: "id of this side's parity" });
        }
        if id <= self.last_remote {
            return Err(MuxError::BadOpen { stream: id, reason: "id not above the last one" });
        }
        self.last_remote = id;
        if self.streams.len() >= self.config.max_streams {
            let mut p = reset::LIMIT.to_be_bytes().to_vec();
            p.extend_from_slice(b"too many streams");
            self.push_urgent(FrameType::Reset, 0, id, &p);
            return Ok(());
        }
        self.streams.insert(id, Stream::new());
        match postcard::from_bytes::<Target>(payload) {
            Ok(target) => self.events.push_back(Event::Opened { id, target }),
            Err(e) => {
                let _ = self.reset(id, reset::BAD_TARGET, &format!("bad target: {e}"));
            }
        }
        Ok(())
    }

    fn on_data(&mut self, id: StreamId, fin: bool, payload: &[u8]) -> Result<(), MuxError> {
        let Some(s) = self.live_stream(FrameType::Data, id)? else { return Ok(()) };
        if s.peer_reset {
            return Ok(());
        }
        if s.remote_fin {
            return Err(MuxError::DataAfterFin(id));
        }
        let len = payload.len();
        if len as u64 > s.recv_allowed {
            return Err(MuxError::FlowControl { stream: id, len, allowed: s.recv_allowed });
        }
        s.recv_allowed -= len as u64;
        s.recv_buf.extend(payload);
        if fin {
            s.remote_fin = true;
        }
        let closed = s.done();
        if len > 0 {
            self.events.push_back(Event::Readable(id));
        }
        if fin {
            self.events.push_back(Event::Finished(id));
        }
        if closed {
            self.close(id);
        }
        Ok(())
    }

    /// The stream for a frame: `None` when it was open once and is gone (frames in flight when it
    /// closed), an error when it never was.
    fn live_stream(
        &mut self,
        kind: FrameType,
        id: StreamId,
    ) -> Result<Option<&mut Stream>, MuxError> {
        let opened_before =
            if self.side.owns(id) { id < self.next_local } else { id <= self.last_remote };
        match self.streams.get_mut(&id) {
            Some(s) => Ok(Some(s)),
            None if opened_before => Ok(None),
            None => Err(MuxError::NeverOpened { kind, stream: id }),
        }
    }

    fn live_stream_local(&mut self, id: StreamId) -> Result<Option<&mut Stream>, MuxError> {
        self.live_stream(FrameType::Data, id).map_err(|_| MuxError::UnknownStream(id))
    }

    fn activate(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get_mut(&id)
            && !s.active
            && s.has_sendable()
        {
            s.active = true;
            self.ring.push_back(id);
        }
    }

    fn close(&mut self, id: StreamId) {
        if self.streams.remove(&id).is_some() {
            self.events.push_back(Event::Closed(id));
        }
    }

    fn push_urgent(&mut self, kind: FrameType, flags: u8, id: StreamId, payload: &[u8]) {
        let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
        // Callers bound every payload by MAX_PAYLOAD and keep to the stream rules.
        if frame::encode_into(&mut f, kind, flags, id, payload).is_ok() {
            self.urgent.push_back(f);
        }
    }
}

#[cfg(test)]
mod tests;
