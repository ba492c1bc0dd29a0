//! [`FileServer`]: a plain HTTP/1.1 file server for one directory, on the host's loopback, for
//! the update tests: the guest downloads a signed TUF repository from it (TUF's guarantees do
//! not depend on the transport). `GET` and `HEAD` only, `Range: bytes=N-` (the updater's resume),
//! one thread per connection, `Connection: close`. It counts the bytes it served per file, so a
//! test can tell from the host how far a download got (the power-cut tests' download phase).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::QemuError;

/// What the server has sent so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServedStats {
    /// Requests answered (any status).
    pub requests: u64,
    /// Body bytes sent per path (relative to the root, e.g. `targets/hearth_2.root.raw`).
    pub bytes: BTreeMap<String, u64>,
    /// Requests with a `Range` header (resumed downloads).
    pub ranges: u64,
}

#[derive(Debug)]
struct Shared {
    root: PathBuf,
    stats: Mutex<ServedStats>,
    stop: AtomicBool,
}

/// A running file server; it stops on drop.
#[derive(Debug)]
pub struct FileServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FileServer {
    /// Serve `root` on `addr` (e.g. `127.0.0.1:7480`, what the ci image's `[update]
    /// metadata_url` names through user-mode networking).
    pub fn start(root: &Path, addr: &str) -> Result<FileServer, QemuError> {
        let listener = TcpListener::bind(addr).map_err(|e| QemuError::Command {
            command: format!("bind {addr}"),
            detail: format!("{e} (is another update test or server using the port?)"),
        })?;
        let addr = listener.local_addr().map_err(|e| QemuError::Command {
            command: "local_addr".into(),
            detail: e.to_string(),
        })?;
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            stats: Mutex::new(ServedStats::default()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(conn) = conn {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        if let Err(e) = serve(&s, conn) {
                            tracing::debug!(error = %e, "file server connection");
                        }
                    });
                }
            }
        });
        Ok(FileServer { addr, shared })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it has served so far.
    pub fn stats(&self) -> ServedStats {
        self.shared.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// The file under `root` a request path names, or `None` for anything that leaves it.
fn resolve(root: &Path, target: &str) -> Option<(PathBuf, String)> {
    let path = target.split(['?', '#']).next()?.trim_start_matches('/');
    let rel = Path::new(path);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    Some((root.join(rel), path.to_string()))
}

fn serve(s: &Shared, conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut range_start: Option<u64> = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range:") {
            range_start = v
                .trim()
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse().ok());
        }
    }
    let mut words = request.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let count = |path: Option<&str>, n: u64, ranged: bool| {
        if let Ok(mut st) = s.stats.lock() {
            st.requests += 1;
            if ranged {
                st.ranges += 1;
            }
            if let Some(p) = path {
                *st.bytes.entry(p.to_string()).or_default() += n;
            }
        }
    };
    if method != "GET" && method != "HEAD" {
        count(None, 0, false);
        return out.write_all(
            b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    let Some((file, rel)) = resolve(&s.root, target) else {
        count(None, 0, false);
        return out.write_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let mut f = match std::fs::File::open(&file) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => f,
        _ => {
            count(None, 0, false);
            return out.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    };
    let len = f.metadata()?.len();
    let (status, start) = match range_start {
        Some(n) if n < len => ("206 Partial Content", n),
        Some(_) => {
            count(None, 0, true);
            let head = format!(
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return out.write_all(head.as_bytes());
        }
        None => ("200 OK", 0),
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nAccept-Ranges: bytes\r\nConnection: close\r\n",
        len - start
    );
    if start > 0 || range_start.is_some() {
        head.push_str(&format!("Content-Range: bytes {start}-{}/{len}\r\n", len.saturating_sub(1)));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if method == "HEAD" {
        count(Some(&rel), 0, range_start.is_some());
        return Ok(());
    }
    f.seek(SeekFrom::Start(start))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    let result = loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        if let Err(e) = out.write_all(&buf[..n]) {
            break Err(e);
        }
        sent += n as u64;
    };
    count(Some(&rel), sent, range_start.is_some());
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str, range: Option<u64>) -> (String, Vec<u8>) {
        let mut c = TcpStream::connect(addr).expect("connect");
        let range = range.map(|n| format!("Range: bytes={n}-\r\n")).unwrap_or_default();
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n{range}\r\n").expect("write");
        let mut all = Vec::new();
        c.read_to_end(&mut all).expect("read");
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("header end");
        (String::from_utf8_lossy(&all[..split]).into_owned(), all[split + 4..].to_vec())
    }

    #[test]
    fn serves_files_ranges_and_counts_bytes() {
        let dir = std::env::temp_dir().join(format!("hearth-files-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("targets")).expect("mkdir");
        std::fs::write(dir.join("targets/a.raw"), b"0123456789").expect("write");
        let server = FileServer::start(&dir, "127.0.0.1:0").expect("start");
        let (head, body) = get(server.addr(), "/targets/a.raw", None);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"0123456789");
        let (head, body) = get(server.addr(), "/targets/a.raw", Some(4));
        assert!(head.starts_with("HTTP/1.1 206"), "{head}");
        assert!(head.contains("Content-Range: bytes 4-9/10"), "{head}");
        assert_eq!(body, b"456789");
        let (head, _) = get(server.addr(), "/targets/a.raw", Some(10));
        assert!(head.starts_with("HTTP/1.1 416"), "{head}");
        let (head, _) = get(server.addr(), "/../etc/passwd", None);
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        let (head, _) = get(server.addr(), "/missing.json", None);
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        let stats = server.stats();
        assert_eq!(stats.requests, 5);
        assert_eq!(stats.ranges, 2);
        assert_eq!(stats.bytes.get("targets/a.raw"), Some(&16));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
