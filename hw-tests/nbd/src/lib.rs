//! `hearth-nbd`: an NBD server whose disk loses what a power cut would lose.
//!
//! The QEMU power-cut tests of Hearth's A/B updates run the guest on this server (QEMU's
//! `-drive file=nbd:unix:PATH,cache=writeback`): it acknowledges writes at once but persists
//! only flushed ones (and FUA writes), so killing QEMU — or telling the server "power cut" —
//! leaves the disk as a real power cut would, which killing QEMU over a plain file would not
//! (the host's page cache keeps everything).
//!
//! Entry point: [`NbdServer::start`] over a [`PowerCutDisk`]. Modules:
//! - [`proto`]: the wire protocol (newstyle fixed handshake, `READ`/`WRITE`/`FLUSH`/`TRIM`/
//!   `WRITE_ZEROES`/`DISC`, FUA, simple replies), pure parsers (fuzzed: `fuzz/fuzz_targets/nbd_proto.rs`);
//! - [`disk`]: base file + volatile overlay + dirty-sector bitmap;
//! - [`server`]: the socket, the handshake and the transmission loop on a thread.
//!
//! Design: `docs/0008-image.md` ("Power cuts"); code tour: `hw-tests/README.md`.

pub mod disk;
pub mod proto;
pub mod server;

pub use disk::{DiskError, DiskStats, PowerCutDisk};
pub use server::{NbdServer, ServerError};
