//! The session frame: a 12-byte header (type, flags, stream id, length) followed by the payload.
//!
//! ```text
//!  0        1        2        4                 8                12
//!  +--------+--------+--------+-----------------+-----------------+---------
//!  | type   | flags  | rsvd=0 |  stream id (BE) |  length (BE)    | payload…
//!  +--------+--------+--------+-----------------+-----------------+---------
//! ```
//!
//! Stream 0 carries the control session ([`FrameType::Control`], one
//! [`crate::control::ControlMessage`] per frame) and the session's liveness pings
//! ([`FrameType::Ping`]). The tunnel's data streams (stream ids > 0) use [`FrameType::Open`],
//! [`FrameType::Data`], [`FrameType::Window`] and [`FrameType::Reset`]; their state machine is
//! [`crate::mux`] (`docs/0006-tunnel.md`). A decoder refuses types it does not know, flag bits the
//! type does not define, non-zero reserved bytes, session frames off stream 0, stream frames on
//! stream 0 and payloads over [`MAX_PAYLOAD`] before reading the payload, so a peer cannot make it
//! allocate more than that. The wire format: `docs/protocol.md`.

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;

/// Largest payload a frame may carry (256 KiB).
pub const MAX_PAYLOAD: u32 = 256 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// A control message (stream 0 only).
    Control = 0x01,
    /// Open a data stream; the payload names the target ([`crate::mux::Target`], postcard).
    Open = 0x02,
    /// Stream bytes; [`FLAG_FIN`] ends the sender's direction after them.
    Data = 0x03,
    /// Flow-control credit: the payload is a 4-byte big-endian increment of the receive window.
    Window = 0x04,
    /// Abort a stream (or refuse an Open): 4-byte big-endian code, then a UTF-8 reason.
    Reset = 0x05,
    /// Liveness probe on stream 0 with 8 opaque bytes; [`FLAG_ACK`] marks the answer.
    Ping = 0x06,
}

impl FrameType {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0x01 => Some(Self::Control),
            0x02 => Some(Self::Open),
            0x03 => Some(Self::Data),
            0x04 => Some(Self::Window),
            0x05 => Some(Self::Reset),
            0x06 => Some(Self::Ping),
            _ => None,
        }
    }

    /// Frames of this type belong to the session (stream 0), not to a data stream.
    pub fn is_session(self) -> bool {
        matches!(self, Self::Control | Self::Ping)
    }

    /// The flag bits this type may carry.
    pub fn allowed_flags(self) -> u8 {
        match self {
            Self::Data => FLAG_FIN,
            Self::Ping => FLAG_ACK,
            _ => 0,
        }
    }
}

/// On [`FrameType::Data`]: the sender's last bytes on this stream.
pub const FLAG_FIN: u8 = 0x01;
/// On [`FrameType::Ping`]: an answer to a ping (same payload).
pub const FLAG_ACK: u8 = 0x02;

/// Flag bits this version understands (on some frame type).
pub const KNOWN_FLAGS: u8 = FLAG_FIN | FLAG_ACK;

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the payload is.
    pub kind: FrameType,
    /// Flag bits (a subset of [`KNOWN_FLAGS`]).
    pub flags: u8,
    /// The stream (0: control).
    pub stream: u32,
    /// Payload length in bytes (at most [`MAX_PAYLOAD`]).
    pub len: u32,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The type byte names no frame type this version knows.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// A flag bit this version does not know is set.
    #[error("unknown frame flags 0x{0:02x}")]
    UnknownFlags(u8),
    /// The reserved byte is not zero.
    #[error("reserved header byte is 0x{0:02x}, not 0")]
    Reserved(u8),
    /// A control frame on a stream other than 0.
    #[error("control frame on stream {0} (control is stream 0)")]
    ControlOffStream0(u32),
    /// A flag bit defined, but not for this frame type.
    #[error("flags 0x{flags:02x} not allowed on a {kind:?} frame")]
    FlagsNotAllowed {
        /// The frame type.
        kind: FrameType,
        /// The flags.
        flags: u8,
    },
    /// A data-stream frame on stream 0 (or a session frame off it).
    #[error("{kind:?} frame on stream {stream}")]
    WrongStream {
        /// The frame type.
        kind: FrameType,
        /// The stream.
        stream: u32,
    },
    /// The announced payload is larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
}

impl Header {
    /// A control-frame header for a payload of `len` bytes.
    pub fn control(len: u32) -> Self {
        Self { kind: FrameType::Control, flags: 0, stream: 0, len }
    }

    /// Parse and check a header.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let kind = FrameType::from_u8(b[0]).ok_or(FrameError::UnknownType(b[0]))?;
        let flags = b[1];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        if b[2] != 0 || b[3] != 0 {
            return Err(FrameError::Reserved(if b[2] != 0 { b[2] } else { b[3] }));
        }
        let stream = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        let len = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        check(kind, flags, stream)?;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge { len, max: MAX_PAYLOAD });
        }
        Ok(Self { kind, flags, stream, len })
    }

    /// The header's bytes.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.stream.to_be_bytes());
        b[8..12].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// The rules a header's type, flags and stream must follow together.
fn check(kind: FrameType, flags: u8, stream: u32) -> Result<(), FrameError> {
    if kind == FrameType::Control && stream != 0 {
        return Err(FrameError::ControlOffStream0(stream));
    }
    if kind.is_session() != (stream == 0) {
        return Err(FrameError::WrongStream { kind, stream });
    }
    if flags & !kind.allowed_flags() != 0 {
        return Err(FrameError::FlagsNotAllowed { kind, flags });
    }
    Ok(())
}

/// Encode one frame (header + payload) into a new buffer.
pub fn encode(kind: FrameType, stream: u32, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    encode_flags(kind, 0, stream, payload)
}

/// Encode one frame with flag bits.
pub fn encode_flags(
    kind: FrameType,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    encode_into(&mut out, kind, flags, stream, payload)?;
    Ok(out)
}

/// Append one frame to `out` (the tunnel coalesces many frames into one buffer this way).
pub fn encode_into(
    out: &mut Vec<u8>,
    kind: FrameType,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or(FrameError::TooLarge { len: u32::MAX, max: MAX_PAYLOAD })?;
    check(kind, flags, stream)?;
    out.extend_from_slice(&Header { kind, flags, stream, len }.to_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// A decoded frame: its header, its payload and the bytes consumed.
pub type Decoded<'a> = (Header, &'a [u8], usize);

/// Decode the first frame in `buf`: `Ok(None)` when more bytes are needed, else the header, the
/// payload and the number of bytes consumed.
pub fn decode(buf: &[u8]) -> Result<Option<Decoded<'_>>, FrameError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = Header::parse(head)?;
    let end = HEADER_LEN + header.len as usize;
    match buf.get(HEADER_LEN..end) {
        Some(payload) => Ok(Some((header, payload, end))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial_input() -> Result<(), FrameError> {
        let bytes = encode(FrameType::Control, 0, b"hello")?;
        assert_eq!(bytes.len(), HEADER_LEN + 5);
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut])?, None, "cut at {cut}");
        }
        let (h, p, used) = decode(&bytes)?.ok_or(FrameError::UnknownType(0))?;
        assert_eq!(h, Header::control(5));
        assert_eq!(p, b"hello");
        assert_eq!(used, bytes.len());
        Ok(())
    }

    #[test]
    fn bad_headers_are_refused_before_the_payload() {
        let good = Header::control(3).to_bytes();
        let mut t = good;
        t[0] = 0x7f;
        assert_eq!(Header::parse(&t), Err(FrameError::UnknownType(0x7f)));
        let mut f = good;
        f[1] = 0x80;
        assert_eq!(Header::parse(&f), Err(FrameError::UnknownFlags(0x80)));
        let mut r = good;
        r[3] = 1;
        assert_eq!(Header::parse(&r), Err(FrameError::Reserved(1)));
        let mut s = good;
        s[7] = 9;
        assert_eq!(Header::parse(&s), Err(FrameError::ControlOffStream0(9)));
        let big = Header { len: MAX_PAYLOAD + 1, ..Header::control(0) }.to_bytes();
        assert_eq!(
            decode(&big),
            Err(FrameError::TooLarge { len: MAX_PAYLOAD + 1, max: MAX_PAYLOAD })
        );
        assert!(encode(FrameType::Control, 2, b"x").is_err());
    }

    #[test]
    fn stream_frames_keep_to_their_streams_and_flags() -> Result<(), FrameError> {
        let data = encode_flags(FrameType::Data, FLAG_FIN, 7, b"abc")?;
        let (h, p, _) = decode(&data)?.ok_or(FrameError::UnknownType(0))?;
        assert_eq!((h.kind, h.flags, h.stream, p), (FrameType::Data, FLAG_FIN, 7, &b"abc"[..]));
        assert_eq!(
            encode(FrameType::Data, 0, b"x"),
            Err(FrameError::WrongStream { kind: FrameType::Data, stream: 0 })
        );
        assert_eq!(
            encode(FrameType::Ping, 3, &[0; 8]),
            Err(FrameError::WrongStream { kind: FrameType::Ping, stream: 3 })
        );
        // FIN is defined, but not on a Window frame: refused on the way in as well as out.
        let mut w = Header { kind: FrameType::Window, flags: 0, stream: 5, len: 4 }.to_bytes();
        w[1] = FLAG_FIN;
        assert_eq!(
            Header::parse(&w),
            Err(FrameError::FlagsNotAllowed { kind: FrameType::Window, flags: FLAG_FIN })
        );
        assert!(encode_flags(FrameType::Ping, FLAG_FIN, 0, &[0; 8]).is_err());
        let ping = encode_flags(FrameType::Ping, FLAG_ACK, 0, &[1; 8])?;
        assert_eq!(decode(&ping)?.map(|(h, _, _)| h.flags), Some(FLAG_ACK));
        Ok(())
    }
}
