//! Fetching: the TUF metadata transport for `tough` and the resumable, size-bounded, hashed
//! download of release files. Both read `file://` URLs (a repository directory) and `http(s)://`
//! URLs (ureq, blocking, on tokio's blocking pool for the metadata).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tough::{FilesystemTransport, Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

/// Largest metadata file read over HTTP (the TUF limits are checked again by `tough`).
pub const MAX_METADATA_BYTES: u64 = 16 << 20;

/// Why a download failed. Each names the URL or the file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server or the file could not be read.
    #[error("fetch {url}: {detail}")]
    Fetch {
        /// The URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// More bytes arrived than the signed length allows.
    #[error("{url}: more than the signed {limit} bytes (endless data refused)")]
    TooLong {
        /// The URL.
        url: String,
        /// The signed length.
        limit: u64,
    },
    /// The downloaded bytes do not have the signed hash.
    #[error("{url}: SHA-256 {got} is not the signed {want}")]
    HashMismatch {
        /// The URL.
        url: String,
        /// The signed hash.
        want: String,
        /// What arrived.
        got: String,
    },
    /// A local file could not be written or read.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// HTTP(S) and file access with one ureq agent.
#[derive(Debug, Clone)]
pub struct Fetcher {
    agent: ureq::Agent,
}

impl Fetcher {
    /// A fetcher trusting `ca_pem` (the fleet CA) when given, else the platform's roots; each
    /// request bounded by `timeout`.
    pub fn new(ca_pem: Option<&[u8]>, timeout: Duration) -> Result<Self, FetchError> {
        let mut cfg =
            ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false);
        if let Some(pem) = ca_pem {
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(pem)
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(FetchError::Fetch {
                    url: "update.ca".into(),
                    detail: "no certificate in the CA file".into(),
                });
            }
            let tls = ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                .build();
            cfg = cfg.tls_config(tls);
        }
        Ok(Self { agent: cfg.build().into() })
    }

    /// Open `url` from byte `offset`. Returns the reader and whether the server honoured the
    /// offset (false: the body starts at byte 0).
    fn open(&self, url: &Url, offset: u64) -> Result<(Box<dyn Read + Send>, bool), FetchError> {
        let err = |detail: String| FetchError::Fetch { url: url.to_string(), detail };
        match url.scheme() {
            "file" => {
                let path = url.to_file_path().map_err(|()| err("not a local path".into()))?;
                let mut f = std::fs::File::open(&path).map_err(|e| err(e.to_string()))?;
                f.seek(SeekFrom::Start(offset)).map_err(|e| err(e.to_string()))?;
                Ok((Box::new(f), true))
            }
            "http" | "https" => {
                let mut req = self.agent.get(url.as_str());
                if offset > 0 {
                    req = req.header("Range", format!("bytes={offset}-"));
                }
                let resp = req.call().map_err(|e| err(e.to_string()))?;
                let status = resp.status().as_u16();
                let ranged = match status {
                    206 => true,
                    200 => false,
                    404 => return Err(err("not found (404)".into())),
                    s => return Err(err(format!("HTTP status {s}"))),
                };
                Ok((Box::new(resp.into_body().into_reader()), ranged || offset == 0))
            }
            s => Err(err(format!("unsupported scheme {s}"))),
        }
    }

    /// Read a whole small file (metadata), at most `limit` bytes.
    pub fn read_small(&self, url: &Url, limit: u64) -> Result<Vec<u8>, FetchError> {
        let (r, _) = self.open(url, 0)?;
        let mut out = Vec::new();
        r.take(limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| FetchError::Fetch { url: url.to_string(), detail: e.to_string() })?;
        if out.len() as u64 > limit {
            return Err(FetchError::TooLong { url: url.to_string(), limit });
        }
        Ok(out)
    }

    /// Download `url` into `dest`, resuming from what `dest` already holds, never accepting more
    /// than `length` bytes, and check the SHA-256 (hex) of the whole file as it streams. On a
    /// hash mismatch `dest` is removed. `progress` gets the bytes held so far.
    pub fn download(
        &self,
        url: &Url,
        dest: &Path,
        length: u64,
        sha256_hex: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), FetchError> {
        let io = |op: &'static str| {
            let path = dest.to_path_buf();
            move |source| FetchError::Io { op, path, source }
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dest)
            .map_err(io("open"))?;
        let mut have = file.metadata().map_err(io("stat"))?.len();
        if have > length {
            file.set_len(0).map_err(io("truncate"))?;
            have = 0;
        }
        // Re-hash what is already there (resume).
        let mut hasher = Sha256::new();
        file.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = have;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = file.read(&mut buf[..want]).map_err(io("read"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        progress(have);
        if have < length {
            let (mut body, ranged) = self.open(url, have)?;
            if !ranged {
                have = 0;
                hasher = Sha256::new();
                file.set_len(0).map_err(io("truncate"))?;
            }
            file.seek(SeekFrom::Start(have)).map_err(io("seek"))?;
            let mut since_sync = 0u64;
            loop {
                let n = body.read(&mut buf).map_err(|e| FetchError::Fetch {
                    url: url.to_string(),
                    detail: e.to_string(),
                })?;
                if n == 0 {
                    break;
                }
                if have + n as u64 > length {
                    return Err(FetchError::TooLong { url: url.to_string(), limit: length });
                }
                file.write_all(&buf[..n]).map_err(io("write"))?;
                hasher.update(&buf[..n]);
                have += n as u64;
                since_sync += n as u64;
                if since_sync >= 64 << 20 {
                    file.sync_data().map_err(io("fsync"))?;
                    since_sync = 0;
                }
                progress(have);
            }
            file.sync_all().map_err(io("fsync"))?;
            if have < length {
                return Err(FetchError::Fetch {
                    url: url.to_string(),
                    detail: format!("ended after {have} of {length} bytes (resumable)"),
                });
            }
        }
        let got = hex::encode(hasher.finalize());
        if !got.eq_ignore_ascii_case(sha256_hex) {
            drop(file);
            let _ = std::fs::remove_file(dest);
            return Err(FetchError::HashMismatch {
                url: url.to_string(),
                want: sha256_hex.to_string(),
                got,
            });
        }
        Ok(())
    }
}

/// `tough`'s transport: `file://` through `tough`'s own, `http(s)://` through [`Fetcher`].
#[derive(Debug, Clone)]
pub struct UpdateTransport {
    fetcher: Fetcher,
}

impl UpdateTransport {
    /// Over `fetcher`.
    pub fn new(fetcher: Fetcher) -> Self {
        Self { fetcher }
    }
}

#[tough::async_trait]
impl Transport for UpdateTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        if url.scheme() == "file" {
            return FilesystemTransport.fetch(url).await;
        }
        let fetcher = self.fetcher.clone();
        let u = url.clone();
        let res = tokio::task::spawn_blocking(move || fetcher.read_small(&u, MAX_METADATA_BYTES))
            .await
            .map_err(|e| {
                TransportError::new_with_cause(TransportErrorKind::Other, url.clone(), e)
            })?;
        match res {
            Ok(bytes) => {
                let item: Result<tough::Bytes, TransportError> = Ok(tough::Bytes::from(bytes));
                Ok(Box::pin(futures_util::stream::once(std::future::ready(item))))
            }
            Err(FetchError::Fetch { detail, .. }) if detail.contains("404") => {
                Err(TransportError::new(TransportErrorKind::FileNotFound, url))
            }
            Err(e) => Err(TransportError::new_with_cause(TransportErrorKind::Other, url, e)),
        }
    }
}
