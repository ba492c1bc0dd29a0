//! The NBD wire protocol, newstyle fixed handshake and simple replies (the subset QEMU's client
//! needs): constants, and pure parsers and encoders for every message the server reads or
//! writes. Nothing here does I/O, so the parsers are fuzzed directly (`fuzz/fuzz_targets/nbd_proto.rs`).
//!
//! Reference: the NBD protocol document (`doc/proto.md` of NetworkBlockDevice/nbd).

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the start of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle understood.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: the flags field is valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the server handles `NBD_CMD_FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server honours `NBD_CMD_FLAG_FUA`.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the server handles `NBD_CMD_TRIM`.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server handles `NBD_CMD_WRITE_ZEROES`.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command flag: force unit access (this write is durable when acknowledged).
pub const CMD_FLAG_FUA: u16 = 1 << 0;

/// `EIO`.
pub const EIO: u32 = 5;
/// `EINVAL`.
pub const EINVAL: u32 = 22;
/// `ENOSPC`: a request past the end of the export.
pub const ENOSPC: u32 = 28;
/// `ENOTSUP`.
pub const ENOTSUP: u32 = 95;

/// The largest option payload accepted (an export name and info requests fit easily).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// The largest read or write payload accepted (QEMU's client sends at most 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Why bytes from the client are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A message started with the wrong magic number.
    #[error("bad {what} magic {found:#x}")]
    Magic {
        /// Which message.
        what: &'static str,
        /// The magic read.
        found: u64,
    },
    /// A message is shorter than its fixed part or its declared length.
    #[error("{what} truncated: {len} bytes, need {need}")]
    Short {
        /// Which message.
        what: &'static str,
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A declared length is over the limit.
    #[error("{what} length {len} over the limit {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The length declared.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The client did not accept fixed newstyle.
    #[error("client flags {0:#x} lack fixed newstyle")]
    NotFixedNewstyle(u32),
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), ProtoError> {
    if b.len() < n { Err(ProtoError::Short { what, len: b.len(), need: n }) } else { Ok(()) }
}

/// The server's greeting: `NBDMAGIC IHAVEOPT` and the handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// The client's flags (4 bytes); fixed newstyle is required.
pub fn parse_client_flags(b: &[u8]) -> Result<u32, ProtoError> {
    need("client flags", b, 4)?;
    let flags = be_u32(b, 0);
    if flags & CLIENT_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::NotFixedNewstyle(flags));
    }
    Ok(flags)
}

/// An option request's fixed part: the option and its payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `NBD_OPT_*`.
    pub option: u32,
    /// Payload bytes that follow.
    pub len: u32,
}

/// Parse an option header (16 bytes: `IHAVEOPT`, option, length); the length is bounded by
/// [`MAX_OPTION_LEN`].
pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, ProtoError> {
    need("option header", b, 16)?;
    let magic = be_u64(b, 0);
    if magic != IHAVEOPT {
        return Err(ProtoError::Magic { what: "option", found: magic });
    }
    let option = be_u32(b, 8);
    let len = be_u32(b, 12);
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::TooLong {
            what: "option",
            len: len.into(),
            max: MAX_OPTION_LEN.into(),
        });
    }
    Ok(OptionHeader { option, len })
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`: the export name and the information requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    /// The export name (bytes as sent).
    pub name: Vec<u8>,
    /// `NBD_INFO_*` items the client asked for.
    pub info: Vec<u16>,
}

/// Parse an `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
pub fn parse_go(b: &[u8]) -> Result<GoRequest, ProtoError> {
    need("go request", b, 4)?;
    let name_len = be_u32(b, 0) as usize;
    let need_len = 4usize.saturating_add(name_len).saturating_add(2);
    need("go request", b, need_len)?;
    let name = b[4..4 + name_len].to_vec();
    let n = be_u16(b, 4 + name_len) as usize;
    let start = 6 + name_len;
    need("go request", b, start + 2 * n)?;
    let info = (0..n).map(|i| be_u16(b, start + 2 * i)).collect();
    Ok(GoRequest { name, info })
}

/// An option reply: magic, option, reply type, payload.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The `NBD_INFO_EXPORT` payload: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// The `NBD_INFO_BLOCK_SIZE` payload: minimum, preferred and maximum block sizes.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE` (payload follows the request).
    Write,
    /// `NBD_CMD_DISC`: the client disconnects (no reply).
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else: answered with `ENOTSUP` (its payload, if any, is not known; the server
    /// only accepts unknown commands that declare no write payload).
    Other(u16),
}

impl Command {
    fn from_wire(t: u16) -> Command {
        match t {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            t => Command::Other(t),
        }
    }

    /// The wire value.
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
            Command::Other(t) => t,
        }
    }
}

/// A transmission request (28 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (the payload length of a write).
    pub len: u32,
}

/// Bytes in a request.
pub const REQUEST_LEN: usize = 28;

impl Request {
    /// Whether force-unit-access is set.
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    /// Encode (what a client sends; the tests' client uses it).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Parse a transmission request. Read and write lengths are bounded by [`MAX_PAYLOAD`].
pub fn parse_request(b: &[u8]) -> Result<Request, ProtoError> {
    need("request", b, REQUEST_LEN)?;
    let magic = be_u32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::Magic { what: "request", found: magic.into() });
    }
    let req = Request {
        flags: be_u16(b, 4),
        command: Command::from_wire(be_u16(b, 6)),
        handle: be_u64(b, 8),
        offset: be_u64(b, 16),
        len: be_u32(b, 24),
    };
    if matches!(req.command, Command::Read | Command::Write) && req.len > MAX_PAYLOAD {
        return Err(ProtoError::TooLong {
            what: "payload",
            len: req.len.into(),
            max: MAX_PAYLOAD.into(),
        });
    }
    Ok(req)
}

/// A simple reply header (16 bytes): error and the request's handle.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&handle.to_be_bytes());
    b
}

/// Parse a simple reply header: `(error, handle)`.
pub fn parse_simple_reply(b: &[u8]) -> Result<(u32, u64), ProtoError> {
    need("reply", b, 16)?;
    let magic = be_u32(b, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ProtoError::Magic { what: "reply", found: magic.into() });
    }
    Ok((be_u32(b, 4), be_u64(b, 8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            handle: 0xdead_beef,
            offset: 4096,
            len: 512,
        };
        assert_eq!(parse_request(&r.encode()), Ok(r));
        assert!(r.fua());
    }

    #[test]
    fn bad_magic_and_short_input_are_errors() {
        let mut b =
            Request { flags: 0, command: Command::Read, handle: 1, offset: 0, len: 1 }.encode();
        b[0] ^= 1;
        assert!(matches!(parse_request(&b), Err(ProtoError::Magic { what: "request", .. })));
        assert!(matches!(parse_request(&b[..10]), Err(ProtoError::Short { .. })));
        assert!(matches!(parse_option_header(&[0u8; 16]), Err(ProtoError::Magic { .. })));
        assert_eq!(parse_client_flags(&[0, 0, 0, 2]), Err(ProtoError::NotFixedNewstyle(2)));
    }

    #[test]
    fn oversized_lengths_are_refused() {
        let mut h = Vec::new();
        h.extend_from_slice(&IHAVEOPT.to_be_bytes());
        h.extend_from_slice(&OPT_GO.to_be_bytes());
        h.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(parse_option_header(&h), Err(ProtoError::TooLong { .. })));
        let r = Request {
            flags: 0,
            command: Command::Write,
            handle: 1,
            offset: 0,
            len: MAX_PAYLOAD + 1,
        };
        assert!(matches!(parse_request(&r.encode()), Err(ProtoError::TooLong { .. })));
        // A trim may cover more than one payload's worth: it carries no data.
        let t = Request { command: Command::Trim, ..r };
        assert_eq!(parse_request(&t.encode()), Ok(t));
    }

    #[test]
    fn go_request_parses_name_and_info_and_rejects_lies() {
        let mut b = Vec::new();
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_go(&b),
            Ok(GoRequest { name: b"abc".to_vec(), info: vec![INFO_EXPORT, INFO_BLOCK_SIZE] })
        );
        // A name length past the end, an info count past the end.
        let mut lie = b.clone();
        lie[3] = 200;
        assert!(matches!(parse_go(&lie), Err(ProtoError::Short { .. })));
        let mut lie = b.clone();
        lie[8] = 9;
        assert!(matches!(parse_go(&lie), Err(ProtoError::Short { .. })));
        let mut huge = b;
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse_go(&huge), Err(ProtoError::Short { .. })));
    }
}
