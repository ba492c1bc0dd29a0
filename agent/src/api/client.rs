//! A client of the local API over its Unix socket (used by every `hearth-agent` subcommand).

use std::path::{Path, PathBuf};

use hearth_proto::api::ApiError;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("cannot reach the agent at {socket} (is hearth-agent running? see --socket)")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("{method} {path}: HTTP exchange with the agent failed")]
    Http {
        /// Method.
        method: Method,
        /// Path.
        path: String,
        /// Why.
        #[source]
        source: hyper::Error,
    },
    /// The agent refused the request.
    #[error("{method} {path}: the agent answered {status}: {message}")]
    Refused {
        /// Method.
        method: Method,
        /// Path.
        path: String,
        /// HTTP status.
        status: StatusCode,
        /// The agent's error message.
        message: String,
    },
    /// The answer is not the JSON expected.
    #[error("{method} {path}: unexpected answer from the agent")]
    Decode {
        /// Method.
        method: Method,
        /// Path.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Client of one agent socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the agent listening on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self { socket: socket.to_path_buf() }
    }

    /// `GET path`, decoded as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, Bytes::new()).await
    }

    /// `POST path` with a JSON body, decoded as `T`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|source| ClientError::Decode {
            method: Method::POST,
            path: path.to_string(),
            source,
        })?;
        self.call(Method::POST, path, Bytes::from(bytes)).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
        let http = |source| ClientError::Http { method: method.clone(), path: path.into(), source };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect { socket: self.socket.clone(), source })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, "hearth-agent");
        if !body.is_empty() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body)).map_err(|e| ClientError::Refused {
            method: method.clone(),
            path: path.into(),
            status: StatusCode::BAD_REQUEST,
            message: e.to_string(),
        })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
        conn.abort();
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Refused { method, path: path.into(), status, message });
        }
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            method,
            path: path.into(),
            source,
        })
    }
}
