//! The NBD server: a Unix socket, one connection at a time, newstyle fixed handshake, simple
//! replies, over a [`PowerCutDisk`].
//!
//! [`NbdServer::start`] binds the socket and runs the accept loop on a thread; the returned
//! handle cuts the power ([`NbdServer::power_cut`]: drop the unflushed writes and the
//! connection), reports [`DiskStats`], and stops the server on drop. A connection that ends in
//! any way (QEMU killed, the guest powered off, a protocol error) is a power cut too: the disk
//! keeps only what was flushed. QEMU flushes before it closes a drive cleanly, so a clean
//! shutdown loses nothing.

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::disk::{DiskError, DiskStats, PowerCutDisk, SECTOR};
use crate::proto::{self, Command, ProtoError};

/// The one export's name in `NBD_OPT_LIST` (any name is accepted).
pub const EXPORT_NAME: &str = "hearth";

/// Why the server could not start, or a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be bound or configured.
    #[error("bind {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The client broke the protocol.
    #[error("protocol")]
    Proto(#[from] ProtoError),
    /// The connection failed.
    #[error("connection")]
    Io(#[from] std::io::Error),
    /// The disk failed.
    #[error("disk")]
    Disk(#[from] DiskError),
}

#[derive(Debug)]
struct Shared {
    disk: Mutex<PowerCutDisk>,
    stop: AtomicBool,
    conn: Mutex<Option<UnixStream>>,
    connections: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the disk as consistent as a power cut would.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running server; stopped (and its socket removed) on drop.
#[derive(Debug)]
pub struct NbdServer {
    shared: Arc<Shared>,
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Serve `disk` on a Unix socket at `path` (replaced if it exists).
    pub fn start(path: &Path, disk: PowerCutDisk) -> Result<NbdServer, ServerError> {
        let bind = |source| ServerError::Bind { path: path.to_path_buf(), source };
        if path.exists() {
            std::fs::remove_file(path).map_err(bind)?;
        }
        let listener = UnixListener::bind(path).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        let shared = Arc::new(Shared {
            disk: Mutex::new(disk),
            stop: AtomicBool::new(false),
            conn: Mutex::new(None),
            connections: Mutex::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("nbd-server".into())
            .spawn(move || accept_loop(&listener, &s))
            .map_err(bind)?;
        Ok(NbdServer { shared, path: path.to_path_buf(), thread: Some(thread) })
    }

    /// The socket path (`nbd:unix:PATH` for QEMU).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cut the power: close the current connection and drop every unflushed write. Returns the
    /// sectors lost.
    pub fn power_cut(&self) -> Result<u64, DiskError> {
        // The disk stays locked from before the connection closes until the cut is done: the
        // server's own thread, seeing its connection end, cuts the power too (nothing left to
        // lose by then), and must not drop these writes first.
        let mut disk = lock(&self.shared.disk);
        if let Some(c) = lock(&self.shared.conn).take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let lost = disk.power_cut()?;
        drop(disk);
        tracing::info!(lost_sectors = lost, "power cut");
        Ok(lost)
    }

    /// What happened to the disk so far.
    pub fn stats(&self) -> DiskStats {
        lock(&self.shared.disk).stats()
    }

    /// Sectors of `[offset, offset + len)` written but not yet durable.
    pub fn dirty_in(&self, offset: u64, len: u64) -> u64 {
        lock(&self.shared.disk).dirty_in(offset, len)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        *lock(&self.shared.connections)
    }

    /// Read from the disk as the guest would see it now.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        lock(&self.shared.disk).read(offset, buf)
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(c) = lock(&self.shared.conn).take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, shared: &Shared) {
    while !shared.stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        *lock(&shared.connections) += 1;
        if let Ok(c) = stream.try_clone() {
            *lock(&shared.conn) = Some(c);
        }
        let result = stream
            .set_nonblocking(false)
            .map_err(ServerError::from)
            .and_then(|()| serve(stream, shared));
        match result {
            Ok(()) => tracing::debug!("client disconnected"),
            Err(e) => {
                tracing::info!(error = %format!("{:#}", anyhow_chain(&e)), "connection ended")
            }
        }
        lock(&shared.conn).take();
        // However the connection ended, what was not flushed is gone.
        match lock(&shared.disk).power_cut() {
            Ok(lost) => {
                tracing::info!(lost_sectors = lost, "connection closed: unflushed writes dropped")
            }
            Err(e) => tracing::warn!(error = %e, "dropping the overlay failed"),
        }
    }
}

/// The error and its sources, `: `-separated.
fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn transmission_flags() -> u16 {
    proto::TFLAG_HAS_FLAGS
        | proto::TFLAG_SEND_FLUSH
        | proto::TFLAG_SEND_FUA
        | proto::TFLAG_SEND_TRIM
        | proto::TFLAG_SEND_WRITE_ZEROES
}

fn serve(stream: UnixStream, shared: &Shared) -> Result<(), ServerError> {
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = BufWriter::new(stream);
    let size = lock(&shared.disk).size();
    w.write_all(&proto::greeting())?;
    w.flush()?;
    let mut flags = [0u8; 4];
    r.read_exact(&mut flags)?;
    let client_flags = proto::parse_client_flags(&flags)?;
    // Option haggling until the client picks the export.
    loop {
        let mut h = [0u8; 16];
        r.read_exact(&mut h)?;
        let header = proto::parse_option_header(&h)?;
        let mut data = vec![0u8; header.len as usize];
        r.read_exact(&mut data)?;
        match header.option {
            proto::OPT_EXPORT_NAME => {
                w.write_all(&size.to_be_bytes())?;
                w.write_all(&transmission_flags().to_be_bytes())?;
                if client_flags & proto::CLIENT_FLAG_NO_ZEROES == 0 {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                break;
            }
            proto::OPT_ABORT => {
                w.write_all(&proto::option_reply(header.option, proto::REP_ACK, &[]))?;
                w.flush()?;
                return Ok(());
            }
            proto::OPT_LIST => {
                let mut d = (EXPORT_NAME.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(EXPORT_NAME.as_bytes());
                w.write_all(&proto::option_reply(header.option, proto::REP_SERVER, &d))?;
                w.write_all(&proto::option_reply(header.option, proto::REP_ACK, &[]))?;
                w.flush()?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let go = match proto::parse_go(&data) {
                    Ok(go) => go,
                    Err(e) => {
                        tracing::info!(error = %e, "bad NBD_OPT_GO");
                        w.write_all(&proto::option_reply(
                            header.option,
                            proto::REP_ERR_INVALID,
                            &[],
                        ))?;
                        w.flush()?;
                        continue;
                    }
                };
                let export = proto::info_export(size, transmission_flags());
                w.write_all(&proto::option_reply(header.option, proto::REP_INFO, &export))?;
                if go.info.contains(&proto::INFO_BLOCK_SIZE) {
                    let bs = proto::info_block_size(1, SECTOR as u32 * 8, proto::MAX_PAYLOAD);
                    w.write_all(&proto::option_reply(header.option, proto::REP_INFO, &bs))?;
                }
                w.write_all(&proto::option_reply(header.option, proto::REP_ACK, &[]))?;
                w.flush()?;
                if header.option == proto::OPT_GO {
                    break;
                }
            }
            other => {
                // Structured replies, meta contexts, TLS, extended headers: not offered; the
                // client falls back to simple replies.
                tracing::debug!(option = other, "unsupported option");
                w.write_all(&proto::option_reply(other, proto::REP_ERR_UNSUP, &[]))?;
                w.flush()?;
            }
        }
    }
    transmission(&mut r, &mut w, shared)
}

fn transmission(r: &mut impl Read, w: &mut impl Write, shared: &Shared) -> Result<(), ServerError> {
    let mut buf = Vec::new();
    loop {
        let mut h = [0u8; proto::REQUEST_LEN];
        r.read_exact(&mut h)?;
        let req = proto::parse_request(&h)?;
        let errno = |e: &DiskError| match e {
            DiskError::OutOfRange { .. } if req.command == Command::Read => proto::EINVAL,
            DiskError::OutOfRange { .. } => proto::ENOSPC,
            _ => proto::EIO,
        };
        match req.command {
            Command::Read => {
                buf.resize(req.len as usize, 0);
                let result = lock(&shared.disk).read(req.offset, &mut buf);
                match result {
                    Ok(()) => {
                        w.write_all(&proto::simple_reply(0, req.handle))?;
                        w.write_all(&buf)?;
                    }
                    Err(e) => w.write_all(&proto::simple_reply(errno(&e), req.handle))?,
                }
            }
            Command::Write => {
                buf.resize(req.len as usize, 0);
                r.read_exact(&mut buf)?;
                let result = lock(&shared.disk).write(req.offset, &buf, req.fua());
                let e = result.as_ref().err().map_or(0, errno);
                w.write_all(&proto::simple_reply(e, req.handle))?;
            }
            Command::Trim | Command::WriteZeroes => {
                let result = lock(&shared.disk).zero(req.offset, req.len.into(), req.fua());
                let e = result.as_ref().err().map_or(0, errno);
                w.write_all(&proto::simple_reply(e, req.handle))?;
            }
            Command::Flush => {
                let result = lock(&shared.disk).flush();
                let e = result.as_ref().err().map_or(0, errno);
                w.write_all(&proto::simple_reply(e, req.handle))?;
            }
            Command::Disc => return Ok(()),
            Command::Other(_) => w.write_all(&proto::simple_reply(proto::ENOTSUP, req.handle))?,
        }
        w.flush()?;
    }
}
