//! The control socket: drive the fake's simulation from outside the process that loaded it.
//!
//! When `HEARTH_FAKE_NVML_CONTROL` names a path, the first `nvmlInit` binds a Unix stream socket
//! there and serves it from a plain thread (one more thread per connection). The protocol is
//! line-delimited JSON, one response line per request line:
//!
//! ```text
//! {"op":"advance","ms":1500}                                -> {"ok":true}
//! {"op":"inject","gpu":2,"fault":{"fault":"xid","xid":79}}  -> {"ok":true}
//! {"op":"workload","gpu":0,"workload":"idle"}               -> {"ok":true}
//! {"op":"reset","gpu":1}                                    -> {"ok":true}
//! {"op":"ping"}                                             -> {"ok":true}
//! {"op":"inject","gpu":99,"fault":{"fault":"clear"}}        -> {"ok":false,"error":"no GPU 99 (the node has 8)"}
//! ```
//!
//! `fault` has the serde shape of [`hearth_sim::Fault`]; `advance` moves simulated time on either
//! clock. [`ControlClient`] speaks the protocol.

use std::io::{self, BufRead, BufReader, Read as _, Write};
use std::os::unix::fs::FileTypeExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hearth_sim::{Fault, SimHost, Workload};
use serde::{Deserialize, Serialize};

/// The longest request line the server reads.
const MAX_LINE: u64 = 64 * 1024;

/// One request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Move simulated time forward.
    Advance {
        /// Milliseconds.
        ms: u64,
    },
    /// Inject a fault into a GPU.
    Inject {
        /// GPU index.
        gpu: u32,
        /// The fault.
        fault: Fault,
    },
    /// Change what a GPU runs.
    Workload {
        /// GPU index.
        gpu: u32,
        /// The new workload.
        workload: Workload,
    },
    /// Reset a GPU (`nvidia-smi -r`).
    Reset {
        /// GPU index.
        gpu: u32,
    },
    /// Check the connection.
    Ping,
}

/// One response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn ok() -> Self {
        Self { ok: true, error: None }
    }

    fn err(message: impl Into<String>) -> Self {
        Self { ok: false, error: Some(message.into()) }
    }
}

/// Carry out one request line against `host`.
pub fn handle_line(host: &SimHost, line: &str) -> Response {
    let request: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return Response::err(format!("bad request: {e}")),
    };
    let result = match request {
        Request::Advance { ms } => {
            host.advance(Duration::from_millis(ms));
            Ok(())
        }
        Request::Inject { gpu, fault } => host.lock().inject(gpu, fault),
        Request::Workload { gpu, workload } => host.lock().set_workload(gpu, workload),
        Request::Reset { gpu } => host.lock().reset_gpu(gpu),
        Request::Ping => Ok(()),
    };
    match result {
        Ok(()) => Response::ok(),
        Err(e) => Response::err(e.to_string()),
    }
}

/// Bind `path` (replacing a stale socket left there) and serve it from a thread.
pub(crate) fn serve(path: &Path, host: Arc<SimHost>) -> io::Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new().name("fake-nvml-control".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let host = host.clone();
            let _ = std::thread::Builder::new()
                .name("fake-nvml-conn".into())
                .spawn(move || serve_connection(stream, &host));
        }
    })?;
    Ok(())
}

fn serve_connection(stream: UnixStream, host: &SimHost) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.by_ref().take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
            let _ = write_response(&mut writer, &Response::err("request line too long"));
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let response = handle_line(host, line.trim());
        if write_response(&mut writer, &response).is_err() {
            return;
        }
    }
}

fn write_response(w: &mut UnixStream, r: &Response) -> io::Result<()> {
    let mut s = serde_json::to_string(r).map_err(io::Error::other)?;
    s.push('\n');
    w.write_all(s.as_bytes())
}

/// A client of the control socket. Requests are serialised: `&self` methods may be called from
/// several threads.
#[derive(Debug)]
pub struct ControlClient {
    conn: Mutex<(BufReader<UnixStream>, UnixStream)>,
}

impl ControlClient {
    /// Connect to the socket at `path` (bound by the library's `nvmlInit`).
    pub fn connect(path: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(path).map_err(|e| {
            io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        Ok(Self { conn: Mutex::new((BufReader::new(stream), writer)) })
    }

    /// Send one request; an `{"ok":false}` answer becomes an error with its message.
    pub fn request(&self, request: &Request) -> io::Result<()> {
        let mut line = serde_json::to_string(request).map_err(io::Error::other)?;
        line.push('\n');
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let (reader, writer) = &mut *conn;
        writer.write_all(line.as_bytes())?;
        let mut answer = String::new();
        if reader.read_line(&mut answer)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "control socket closed"));
        }
        let response: Response = serde_json::from_str(answer.trim()).map_err(io::Error::other)?;
        if response.ok {
            Ok(())
        } else {
            Err(io::Error::other(response.error.unwrap_or_else(|| "request failed".into())))
        }
    }

    /// Move simulated time forward by `ms`.
    pub fn advance(&self, ms: u64) -> io::Result<()> {
        self.request(&Request::Advance { ms })
    }

    /// Inject `fault` into GPU `gpu`.
    pub fn inject(&self, gpu: u32, fault: Fault) -> io::Result<()> {
        self.request(&Request::Inject { gpu, fault })
    }

    /// Change GPU `gpu`'s workload.
    pub fn set_workload(&self, gpu: u32, workload: Workload) -> io::Result<()> {
        self.request(&Request::Workload { gpu, workload })
    }

    /// Reset GPU `gpu`.
    pub fn reset(&self, gpu: u32) -> io::Result<()> {
        self.request(&Request::Reset { gpu })
    }

    /// Round-trip a no-op.
    pub fn ping(&self) -> io::Result<()> {
        self.request(&Request::Ping)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use hearth_sim::{Scenario, SimClock};

    use super::*;

    fn host() -> SimHost {
        SimHost::new(&Scenario::uniform("h100-sxm", 2, Workload::Training), SimClock::Manual)
    }

    #[test]
    fn request_json_shapes_match_the_documented_protocol() {
        let cases = [
            (r#"{"op":"advance","ms":1500}"#, Request::Advance { ms: 1500 }),
            (
                r#"{"op":"inject","gpu":2,"fault":{"fault":"xid","xid":79}}"#,
                Request::Inject { gpu: 2, fault: Fault::Xid { xid: 79 } },
            ),
            (
                r#"{"op":"workload","gpu":0,"workload":"idle"}"#,
                Request::Workload { gpu: 0, workload: Workload::Idle },
            ),
            (r#"{"op":"reset","gpu":1}"#, Request::Reset { gpu: 1 }),
            (r#"{"op":"ping"}"#, Request::Ping),
        ];
        for (json, request) in cases {
            assert_eq!(serde_json::from_str::<Request>(json).unwrap(), request, "{json}");
            assert_eq!(serde_json::to_string(&request).unwrap(), json);
        }
        assert_eq!(serde_json::to_string(&Response::ok()).unwrap(), r#"{"ok":true}"#);
        assert_eq!(
            serde_json::to_string(&Response::err("x")).unwrap(),
            r#"{"ok":false,"error":"x"}"#
        );
    }

    #[test]
    fn handle_line_applies_and_reports() {
        let h = host();
        assert_eq!(handle_line(&h, r#"{"op":"advance","ms":1500}"#), Response::ok());
        assert_eq!(h.lock().now(), Duration::from_millis(1500));
        assert!(handle_line(&h, r#"{"op":"workload","gpu":1,"workload":"idle"}"#).ok);
        assert_eq!(h.lock().workload(1).unwrap(), Workload::Idle);
        let r = handle_line(&h, r#"{"op":"inject","gpu":9,"fault":{"fault":"clear"}}"#);
        assert!(!r.ok && r.error.as_deref().unwrap().contains("no GPU 9"), "{r:?}");
        let r = handle_line(&h, r#"{"op":"jump"}"#);
        assert!(!r.ok && r.error.as_deref().unwrap().starts_with("bad request"), "{r:?}");
        let r = handle_line(&h, r#"{"op":"advance","ms":1,"extra":true}"#);
        assert!(!r.ok, "{r:?}");
    }

    #[test]
    fn client_and_server_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let h = Arc::new(host());
        serve(&path, h.clone()).unwrap();
        let c = ControlClient::connect(&path).unwrap();
        c.ping().unwrap();
        c.advance(250).unwrap();
        c.inject(0, Fault::Xid { xid: 13 }).unwrap();
        let e = c.inject(5, Fault::Clear).unwrap_err();
        assert!(e.to_string().contains("no GPU 5"), "{e}");
        c.reset(1).unwrap();
        c.set_workload(1, Workload::Inference).unwrap();
        assert_eq!(h.lock().now(), Duration::from_millis(250));
        assert_eq!(h.lock().events_since(0).0.len(), 1);
        // A stale socket file is replaced by a new server.
        drop(c);
        serve(&path, h).unwrap();
        ControlClient::connect(&path).unwrap().ping().unwrap();
    }
}
