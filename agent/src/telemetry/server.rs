//! The `metrics` subsystem: serves the node's exposition over HTTP on `[metrics] listen`
//! (127.0.0.1:9400 by default, dcgm-exporter's port), and the handler the local API mounts at
//! `/metrics` (so the fleet scrapes a node through the tunnel).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hearth_proto::exposition::Format;

use crate::agent::Agent;
use crate::supervisor::{BoxRun, RunCtx, Subsystem};
use crate::telemetry::process::{ProcSelf, SelfUsage};

/// Why the metrics listener cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address cannot be bound (in use, not local, no permission).
    #[error("cannot listen on {addr} (metrics.listen)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving metrics on {addr} failed")]
    Serve {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// `GET /metrics`: the exposition in the format the `Accept` header asks for (OpenMetrics, or
/// the Prometheus text format by default).
pub async fn metrics(State(agent): State<Arc<Agent>>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let body = crate::telemetry::node::render(&agent, &ProcSelf as &dyn SelfUsage).encode(format);
    (StatusCode::OK, [(header::CONTENT_TYPE, format.content_type())], body).into_response()
}

/// The metrics listener's router: `/metrics` only.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(agent)
}

/// Serves `/metrics` on `[metrics] listen`.
#[derive(Debug)]
pub struct MetricsServer {
    agent: Arc<Agent>,
}

impl MetricsServer {
    /// The listener over `agent`.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

impl Subsystem for MetricsServer {
    fn name(&self) -> &'static str {
        "metrics"
    }

    fn run(self: Arc<Self>, ctx: RunCtx) -> BoxRun {
        Box::pin(async move {
            let addr = self.agent.config.metrics.listen;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| MetricsError::Bind { addr, source })?;
            let bound = listener.local_addr().unwrap_or(addr);
            tracing::info!(addr = %bound, "metrics listening");
            ctx.ready();
            let cancel = ctx.cancel.clone();
            axum::serve(listener, router(self.agent.clone()))
                .with_graceful_shutdown(async move { cancel.cancelled().await })
                .await
                .map_err(|source| MetricsError::Serve { addr, source })?;
            Ok(())
        })
    }
}
