//! The operator → node direction of a `Shell` stream (`docs/0006-tunnel.md`, "Shells").
//!
//! A PTY needs two things from the operator's side: keystrokes and window sizes. The stream from
//! the node back is the terminal's raw output; the stream to the node carries messages, each a
//! 1-byte type, a 2-byte big-endian length and that many bytes:
//!
//! | type | payload |
//! |---|---|
//! | `0x00` input | bytes for the PTY (1..=65535) |
//! | `0x01` resize | rows u16 BE, cols u16 BE (each 1..=4096) |
//!
//! [`encode_input`] and [`encode_resize`] write them; [`Decoder`] reads them from a byte stream in
//! any pieces. Every rule is checked from the 3-byte header before the payload is buffered, so a
//! peer can make the decoder hold at most one message (64 KiB).

/// Header: type, length.
pub const HEADER: usize = 3;
/// Type of an input message.
pub const INPUT: u8 = 0x00;
/// Type of a resize message.
pub const RESIZE: u8 = 0x01;
/// Largest terminal dimension accepted.
pub const MAX_DIM: u16 = 4096;

/// A message to the node's PTY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellMsg {
    /// Keystrokes (or pasted bytes).
    Input(Vec<u8>),
    /// The operator's window changed size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
}

/// A malformed message: the stream is ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    /// An unknown type byte.
    #[error("unknown shell message type {0:#04x}")]
    UnknownType(u8),
    /// Input without bytes.
    #[error("empty shell input message")]
    EmptyInput,
    /// A resize whose payload is not 4 bytes.
    #[error("shell resize with a {0}-byte payload (4 expected)")]
    ResizeLength(usize),
    /// A dimension of 0 or over [`MAX_DIM`].
    #[error("terminal size {rows}x{cols} out of range (1..={MAX_DIM} each)")]
    ResizeRange {
        /// Rows given.
        rows: u16,
        /// Columns given.
        cols: u16,
    },
}

/// Append input messages carrying `bytes` (split into 65535-byte pieces) to `out`.
pub fn encode_input(bytes: &[u8], out: &mut Vec<u8>) {
    for chunk in bytes.chunks(usize::from(u16::MAX)) {
        out.push(INPUT);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
}

/// Append a resize message to `out`.
pub fn encode_resize(rows: u16, cols: u16, out: &mut Vec<u8>) {
    out.push(RESIZE);
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&rows.to_be_bytes());
    out.extend_from_slice(&cols.to_be_bytes());
}

/// Whether a terminal size is acceptable.
pub fn valid_size(rows: u16, cols: u16) -> bool {
    (1..=MAX_DIM).contains(&rows) && (1..=MAX_DIM).contains(&cols)
}

/// Reads [`ShellMsg`]s from bytes arriving in any pieces.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Add received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held (at most one message plus what came after it).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, `Ok(None)` if more bytes are needed, or why the input is bad.
    pub fn next_msg(&mut self) -> Result<Option<ShellMsg>, ShellError> {
        let Some(head) = self.buf.get(..HEADER) else { return Ok(None) };
        let (kind, len) = (head[0], usize::from(u16::from_be_bytes([head[1], head[2]])));
        match kind {
            INPUT if len == 0 => return Err(ShellError::EmptyInput),
            INPUT => {}
            RESIZE if len != 4 => return Err(ShellError::ResizeLength(len)),
            RESIZE => {}
            other => return Err(ShellError::UnknownType(other)),
        }
        let Some(payload) = self.buf.get(HEADER..HEADER + len) else { return Ok(None) };
        let msg = if kind == INPUT {
            ShellMsg::Input(payload.to_vec())
        } else {
            let rows = u16::from_be_bytes([payload[0], payload[1]]);
            let cols = u16::from_be_bytes([payload[2], payload[3]]);
            if !valid_size(rows, cols) {
                return Err(ShellError::ResizeRange { rows, cols });
            }
            ShellMsg::Resize { rows, cols }
        };
        self.buf.drain(..HEADER + len);
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(d: &mut Decoder) -> Result<Vec<ShellMsg>, ShellError> {
        let mut v = Vec::new();
        while let Some(m) = d.next_msg()? {
            v.push(m);
        }
        Ok(v)
    }

    #[test]
    fn messages_round_trip_in_any_pieces() -> Result<(), ShellError> {
        let mut wire = Vec::new();
        encode_resize(50, 132, &mut wire);
        encode_input(b"echo hi\n", &mut wire);
        let big = vec![7u8; 70_000];
        encode_input(&big, &mut wire);
        let mut d = Decoder::default();
        let mut got = Vec::new();
        for piece in wire.chunks(5) {
            d.push(piece);
            got.extend(all(&mut d)?);
        }
        assert_eq!(got[0], ShellMsg::Resize { rows: 50, cols: 132 });
        assert_eq!(got[1], ShellMsg::Input(b"echo hi\n".to_vec()));
        let joined: Vec<u8> = got[2..]
            .iter()
            .flat_map(|m| match m {
                ShellMsg::Input(b) => b.clone(),
                ShellMsg::Resize { .. } => Vec::new(),
            })
            .collect();
        assert_eq!(joined, big);
        assert_eq!(got.len(), 4, "70,000 bytes go in two messages");
        assert_eq!(d.buffered(), 0);
        Ok(())
    }

    #[test]
    fn bad_messages_are_named_from_the_header() {
        let mut d = Decoder::default();
        d.push(&[0x07, 0, 1]);
        assert_eq!(d.next_msg(), Err(ShellError::UnknownType(7)));
        let mut d = Decoder::default();
        d.push(&[INPUT, 0, 0]);
        assert_eq!(d.next_msg(), Err(ShellError::EmptyInput));
        let mut d = Decoder::default();
        d.push(&[RESIZE, 0, 5]);
        assert_eq!(d.next_msg(), Err(ShellError::ResizeLength(5)));
        let mut d = Decoder::default();
        let mut wire = Vec::new();
        encode_resize(0, 80, &mut wire);
        d.push(&wire);
        assert_eq!(d.next_msg(), Err(ShellError::ResizeRange { rows: 0, cols: 80 }));
        // A partial message waits.
        let mut d = Decoder::default();
        d.push(&[INPUT, 0, 4, b'a']);
        assert_eq!(d.next_msg(), Ok(None));
    }
}
