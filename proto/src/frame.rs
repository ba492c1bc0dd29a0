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
//! [`crate::control::ControlMessage`] per frame). The tunnel adds frame types for data streams
//! (stream ids > 0); a decoder refuses types it does not know, unknown flag bits, non-zero reserved
//! bytes, control frames off stream 0 and payloads over [`MAX_PAYLOAD`] before reading the payload,
//! so a peer cannot make it allocate more than that. The wire format: `docs/protocol.md`.

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
}

impl FrameType {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0x01 => Some(Self::Control),
            _ => None,
        }
    }
}

/// Flag bits this version understands (none are defined yet: the tunnel will add some).
pub const KNOWN_FLAGS: u8 = 0;

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
        if kind == FrameType::Control && stream != 0 {
            return Err(FrameError::ControlOffStream0(stream));
        }
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

/// Encode one frame (header + payload) into a new buffer.
pub fn encode(kind: FrameType, stream: u32, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or(FrameError::TooLarge { len: u32::MAX, max: MAX_PAYLOAD })?;
    if kind == FrameType::Control && stream != 0 {
        return Err(FrameError::ControlOffStream0(stream));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&Header { kind, flags: 0, stream, len }.to_bytes());
    out.extend_from_slice(payload);
    Ok(out)
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
}
