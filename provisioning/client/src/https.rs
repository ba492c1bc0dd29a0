//! One JSON request to the fleet over HTTPS (HTTP/1.1 over TLS 1.3), optionally through an HTTPS
//! proxy (HTTP `CONNECT`). Used for enrollment, renewal and by `hearthctl`.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::tls::{TlsError, server_name};

/// Time allowed for TCP connect plus TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for one request and its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer body read (4 MiB).
pub const MAX_RESPONSE: usize = 4 << 20;

/// Why a request to the fleet failed. Each names the fleet address.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `https://HOST:PORT`.
    #[error("fleet URL {url:?} is not https://HOST[:PORT]")]
    BadUrl {
        /// The URL as given.
        url: String,
    },
    /// TCP or the proxy failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// host:port.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The proxy refused the tunnel.
    #[error("proxy {proxy} refused CONNECT {addr}: {status_line}")]
    Proxy {
        /// The proxy.
        proxy: String,
        /// The target.
        addr: String,
        /// Its answer.
        status_line: String,
    },
    /// The TLS handshake failed (wrong CA pin, wrong name, refused certificate…).
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        /// host:port.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// HTTP failed.
    #[error("HTTP exchange with {addr} failed")]
    Http {
        /// host:port.
        addr: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The fleet answered an error.
    #[error("fleet answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The fleet's `error` field (or the body).
        message: String,
    },
    /// The fleet's answer is not the expected JSON.
    #[error("unexpected answer from {addr}")]
    BadAnswer {
        /// host:port.
        addr: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Timed out.
    #[error("{what} with {addr} timed out")]
    Timeout {
        /// What.
        what: &'static str,
        /// host:port.
        addr: String,
    },
}

/// Where the fleet is and what name its certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host (name or address).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The name the fleet's certificate must carry (from the seed); may differ from `host`.
    pub server_name: String,
    /// `host:port` of an HTTPS proxy to tunnel through, if any.
    pub proxy: Option<String>,
}

fn strip_scheme<'a>(url: &'a str, scheme: &str) -> Option<&'a str> {
    url.strip_prefix(scheme).map(|r| r.trim_end_matches('/'))
}

fn split_host_port(hostport: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None if !hostport.is_empty() => Some((hostport.to_string(), default_port)),
        None => None,
    }
}

impl Endpoint {
    /// Parse `https://HOST[:PORT]` (port 443 if absent), with the certificate name `server_name`.
    pub fn from_url(url: &str, server_name: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::BadUrl { url: url.to_string() };
        let rest = strip_scheme(url, "https://").ok_or_else(bad)?;
        if rest.contains('/') {
            return Err(bad());
        }
        let (host, port) = split_host_port(rest, 443).ok_or_else(bad)?;
        Ok(Self { host, port, server_name: server_name.to_string(), proxy: None })
    }

    /// With an HTTPS proxy given as `http://HOST:PORT` or `HOST:PORT`.
    pub fn with_proxy(mut self, proxy: Option<&str>) -> Result<Self, ClientError> {
        self.proxy = match proxy {
            None => None,
            Some(p) => {
                let rest = strip_scheme(p, "http://").unwrap_or(p);
                let (h, port) = split_host_port(rest, 3128)
                    .ok_or_else(|| ClientError::BadUrl { url: p.to_string() })?;
                Some(format!("{h}:{port}"))
            }
        };
        Ok(self)
    }

    /// `host:port`.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

async fn tcp(ep: &Endpoint) -> Result<TcpStream, ClientError> {
    let addr = ep.addr();
    let Some(proxy) = &ep.proxy else {
        let s = TcpStream::connect(&addr)
            .await
            .map_err(|source| ClientError::Connect { addr: addr.clone(), source })?;
        let _ = s.set_nodelay(true);
        return Ok(s);
    };
    let mut s = TcpStream::connect(proxy)
        .await
        .map_err(|source| ClientError::Connect { addr: proxy.clone(), source })?;
    let req = format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|source| ClientError::Connect { addr: proxy.clone(), source })?;
    // Read the proxy's answer byte by byte up to the blank line, so no TLS byte is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err(ClientError::Proxy {
                proxy: proxy.clone(),
                addr,
                status_line: "answer header too long".into(),
            });
        }
        let b = s
            .read_u8()
            .await
            .map_err(|source| ClientError::Connect { addr: proxy.clone(), source })?;
        head.push(b);
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or_default().to_string();
    let ok = status_line.split_whitespace().nth(1).is_some_and(|code| code.starts_with('2'));
    if !ok {
        return Err(ClientError::Proxy { proxy: proxy.clone(), addr, status_line });
    }
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Open a TLS connection to the fleet with `config` (connect timeout included).
pub async fn connect_tls(
    ep: &Endpoint,
    config: Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, ClientError> {
    let name = server_name(&ep.server_name)?;
    let addr = ep.addr();
    let fut = async {
        let tcp = tcp(ep).await?;
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| ClientError::Handshake { addr: addr.clone(), source })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut)
        .await
        .map_err(|_| ClientError::Timeout { what: "connect", addr: ep.addr() })?
}

/// A raw answer.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
}

/// Send one request; any status is returned as is.
pub async fn request(
    ep: &Endpoint,
    config: Arc<ClientConfig>,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<RawResponse, ClientError> {
    let addr = ep.addr();
    let http = |source: Box<dyn std::error::Error + Send + Sync>| ClientError::Http {
        addr: addr.clone(),
        source,
    };
    let fut = async {
        let tls = connect_tls(ep, config).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http(e.into()))?;
        let driver = tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, ep.server_name.as_str());
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http(e.into()))?;
        let resp = sender.send_request(req).await.map_err(|e| http(e.into()))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(http)?
            .to_bytes()
            .to_vec();
        driver.abort();
        Ok(RawResponse { status, body })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .map_err(|_| ClientError::Timeout { what: "request", addr: ep.addr() })?
}

/// Send a JSON request and decode a JSON answer; a non-2xx status becomes
/// [`ClientError::Status`] with the fleet's message.
pub async fn json<Req: Serialize, Resp: DeserializeOwned>(
    ep: &Endpoint,
    config: Arc<ClientConfig>,
    method: &str,
    path: &str,
    body: Option<&Req>,
) -> Result<Resp, ClientError> {
    let body = match body {
        Some(b) => Some(
            serde_json::to_vec(b)
                .map_err(|source| ClientError::BadAnswer { addr: ep.addr(), source })?,
        ),
        None => None,
    };
    let resp = request(ep, config, method, path, body).await?;
    if !(200..300).contains(&resp.status) {
        let message = serde_json::from_slice::<hearth_proto::fleet::FleetError>(&resp.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&resp.body).into_owned());
        return Err(ClientError::Status { status: resp.status, message });
    }
    serde_json::from_slice(&resp.body)
        .map_err(|source| ClientError::BadAnswer { addr: ep.addr(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_and_without_port() -> Result<(), ClientError> {
        let e = Endpoint::from_url("https://10.0.2.2:7443", "fleet.example")?;
        assert_eq!((e.host.as_str(), e.port, e.addr()), ("10.0.2.2", 7443, "10.0.2.2:7443".into()));
        let e = Endpoint::from_url("https://fleet.example/", "fleet.example")?;
        assert_eq!(e.port, 443);
        let e = Endpoint::from_url("https://[::1]:9", "x")?;
        assert_eq!(e.addr(), "[::1]:9");
        for bad in ["http://x:1", "https://", "https://x:notaport", "https://x:1/v1"] {
            assert!(Endpoint::from_url(bad, "x").is_err(), "{bad}");
        }
        let p = Endpoint::from_url("https://x:1", "x")?.with_proxy(Some("http://proxy:8080"))?;
        assert_eq!(p.proxy.as_deref(), Some("proxy:8080"));
        Ok(())
    }
}
