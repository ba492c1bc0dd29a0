//! The fleet's telemetry endpoints (`docs/0007-telemetry.md`), so one Prometheus scrapes a whole
//! fleet through the fleet's TLS port:
//!
//! - `GET /metrics`: the fleet's own exposition (nodes by state, GPUs by health, fleet power draw,
//!   limits and budget, sessions and tunnels), from the registry and the live sessions.
//! - `GET /v1/sd`: Prometheus HTTP service discovery: one target group per non-revoked node,
//!   whose target is this fleet and whose `__metrics_path__` is the node's scrape proxy.
//! - `GET /v1/nodes/{id}/metrics`: the scrape proxy: opens the node's local API over its tunnel
//!   (the gateway's own stream, no operator relay) and returns the node's `/metrics` in the
//!   format the scraper asked for. An offline node answers 502, so its series go stale.
//!
//! All three need an operator certificate with the viewer (or admin) role: Prometheus presents
//! one through `tls_config` (`hearth-fleet operator-cert --role viewer`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use hearth_proto::api::NodeState;
use hearth_proto::exposition::{Exposition, Format, Kind, Labels, Sample};
use hearth_proto::fleet::NodeView;
use hearth_proto::mux::Target;
use http_body_util::BodyExt as _;
use serde::Serialize;

use crate::api::{ApiError, need, with_liveness};
use crate::ca::{Peer, Role};
use crate::server::Fleet;

/// How long the scrape proxy waits for a node's answer.
pub const PROXY_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest node exposition the proxy relays.
pub const PROXY_MAX_BYTES: usize = 8 << 20;

/// Figures the fleet holds outside the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveFigures {
    /// Nodes with an open control session.
    pub sessions: u64,
    /// Nodes with a tunnel.
    pub tunnels: u64,
    /// Lanes of those tunnels (extra connections carrying port streams).
    pub lanes: u64,
    /// Tunnels that carry their node's control session (one connection per node).
    pub sessions_on_tunnel: u64,
}

fn one(labels: Vec<(&'static str, String)>, value: f64) -> Sample {
    Sample { labels: Labels::own(labels), value }
}

/// The fleet's exposition from the node views (liveness applied) and live figures.
pub fn render(nodes: &[NodeView], live: LiveFigures) -> Exposition {
    let mut e = Exposition::default();
    let count = |f: &dyn Fn(&NodeView) -> bool| nodes.iter().filter(|n| f(n)).count() as f64;
    e.family("hearth_fleet_nodes", "Enrolled nodes by membership state.", Kind::Gauge).samples = vec![
        one(vec![("state", "online".into())], count(&|n| n.online)),
        one(vec![("state", "offline".into())], count(&|n| !n.online && !n.revoked)),
        one(vec![("state", "revoked".into())], count(&|n| n.revoked)),
    ];
    let states = [
        NodeState::Starting,
        NodeState::Ready,
        NodeState::Degraded,
        NodeState::Draining,
        NodeState::Quarantined,
    ];
    let online: Vec<&NodeView> = nodes.iter().filter(|n| n.online).collect();
    e.family(
        "hearth_fleet_nodes_by_node_state",
        "Online nodes by the state their last heartbeat reported.",
        Kind::Gauge,
    )
    .samples = states
        .iter()
        .map(|s| {
            let n = online.iter().filter(|n| n.heartbeat.as_ref().is_some_and(|h| h.state == *s));
            let name = serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            one(vec![("state", name)], n.count() as f64)
        })
        .collect();
    let hb = || online.iter().filter_map(|n| n.heartbeat.as_ref());
    let sum = |f: &dyn Fn(&hearth_proto::control::Heartbeat) -> u32| {
        hb().map(|h| f64::from(f(h))).sum::<f64>()
    };
    e.family("hearth_fleet_gpus", "GPUs of online nodes by health verdict.", Kind::Gauge).samples = vec![
        one(vec![("health", "healthy".into())], sum(&|h| h.health.healthy)),
        one(vec![("health", "degraded".into())], sum(&|h| h.health.degraded)),
        one(vec![("health", "failed".into())], sum(&|h| h.health.failed)),
    ];
    e.family(
        "hearth_fleet_power_draw_watts",
        "GPU power draw of the online nodes, from their last heartbeats (W).",
        Kind::Gauge,
    )
    .samples = vec![one(vec![], sum(&|h| h.power.draw_w))];
    e.family(
        "hearth_fleet_power_limit_watts",
        "Sum of the online nodes' GPU power limits (W).",
        Kind::Gauge,
    )
    .samples = vec![one(vec![], sum(&|h| h.power.limit_w))];
    let budgets: Vec<u32> = nodes.iter().filter_map(|n| n.desired.power_budget_w).collect();
    e.family(
        "hearth_fleet_power_budget_watts",
        "Sum of the power budgets the fleet set on nodes (W).",
        Kind::Gauge,
    )
    .samples = vec![one(vec![], budgets.iter().map(|b| f64::from(*b)).sum())];
    e.family(
        "hearth_fleet_nodes_with_budget",
        "Nodes the fleet set a power budget on.",
        Kind::Gauge,
    )
    .samples = vec![one(vec![], budgets.len() as f64)];
    e.family("hearth_fleet_sessions", "Nodes with an open control session.", Kind::Gauge).samples =
        vec![one(vec![], live.sessions as f64)];
    e.family("hearth_fleet_tunnels", "Nodes with a tunnel to this fleet.", Kind::Gauge).samples =
        vec![one(vec![], live.tunnels as f64)];
    e.family(
        "hearth_fleet_tunnel_lanes",
        "Lanes open on the node tunnels of this fleet (docs/0006-tunnel.md).",
        Kind::Gauge,
    )
    .samples = vec![one(vec![], live.lanes as f64)];
    e.family(
        "hearth_fleet_tunnel_sessions",
        "Node tunnels that carry their node's control session (docs/0006-tunnel.md).",
        Kind::Gauge,
    )
    .samples = vec![one(vec![], live.sessions_on_tunnel as f64)];
    e.family("hearth_fleet_build_info", "The fleet's version (value 1).", Kind::Gauge).samples =
        vec![one(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1.0)];
    e
}

async fn views(fleet: &Arc<Fleet>) -> Result<Vec<NodeView>, ApiError> {
    let nodes = fleet.db(|r| r.nodes()).await?;
    let now = crate::now_ms();
    Ok(nodes.into_iter().map(|n| with_liveness(fleet, n, now)).collect())
}

fn live_figures(fleet: &Fleet) -> LiveFigures {
    let sessions = fleet.live().values().filter(|l| l.tx.is_some()).count() as u64;
    LiveFigures {
        sessions,
        tunnels: fleet.gateway.connected().len() as u64,
        lanes: fleet.gateway.lane_total() as u64,
        sessions_on_tunnel: fleet.gateway.session_total() as u64,
    }
}

fn format_of(headers: &HeaderMap) -> Format {
    Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()))
}

/// `GET /metrics`.
pub async fn fleet_metrics(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    need(&peer, Role::Viewer)?;
    let nodes = views(&fleet).await?;
    let format = format_of(&headers);
    let body = render(&nodes, live_figures(&fleet)).encode(format);
    Ok(([(header::CONTENT_TYPE, format.content_type())], body).into_response())
}

/// One Prometheus HTTP SD target group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetGroup {
    /// `host:port` to scrape: this fleet.
    pub targets: Vec<String>,
    /// Labels: `__metrics_path__` (the node's scrape proxy), `instance` and `node` (its id),
    /// `hostname`, and the node's labels as `label_KEY`.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The target groups for `nodes` (revoked ones left out), scraped through `fleet_addr`.
pub fn target_groups(nodes: &[NodeView], fleet_addr: &str) -> Vec<TargetGroup> {
    nodes
        .iter()
        .filter(|n| !n.revoked)
        .map(|n| {
            let mut labels = std::collections::BTreeMap::new();
            labels.insert("__metrics_path__".into(), format!("/v1/nodes/{}/metrics", n.id));
            labels.insert("instance".into(), n.id.clone());
            labels.insert("node".into(), n.id.clone());
            labels.insert("hostname".into(), n.hostname.clone());
            for (k, v) in &n.labels {
                let key: String = k
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
                    .collect();
                labels.insert(format!("label_{key}"), v.clone());
            }
            TargetGroup { targets: vec![fleet_addr.to_string()], labels }
        })
        .collect()
}

/// `GET /v1/sd`: Prometheus HTTP service discovery. The target is the address the caller used
/// to reach this fleet (its `Host` header), else the configured listen address.
pub async fn sd(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Result<Json<Vec<TargetGroup>>, ApiError> {
    need(&peer, Role::Viewer)?;
    let nodes = views(&fleet).await?;
    let addr = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
        .map_or_else(|| fleet.config.listen.to_string(), str::to_string);
    Ok(Json(target_groups(&nodes, &addr)))
}

/// `GET /v1/nodes/{id}/metrics`: the node's `/metrics`, fetched through its tunnel.
pub async fn node_metrics(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    need(&peer, Role::Viewer)?;
    let handle = fleet.gateway.node(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("node {id} has no tunnel (offline, or not in this fleet)"),
        )
    })?;
    let accept = headers.get(header::ACCEPT).cloned();
    let fetched = tokio::time::timeout(PROXY_TIMEOUT, fetch(handle, accept)).await;
    match fetched {
        Ok(Ok((content_type, body))) => {
            Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
        }
        Ok(Err(why)) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("node {id}: cannot fetch /metrics: {why}"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!("node {id}: no /metrics answer within {} s", PROXY_TIMEOUT.as_secs()),
        )),
    }
}

async fn fetch(
    handle: hearth_fleet_client::tunnel::TunnelHandle,
    accept: Option<HeaderValue>,
) -> Result<(HeaderValue, axum::body::Bytes), String> {
    let stream = handle.open(&Target::LocalApi).map_err(|e| format!("open stream: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::get("/metrics").header(header::HOST, "node");
    if let Some(a) = accept {
        req = req.header(header::ACCEPT, a);
    }
    let req = req
        .body(http_body_util::Empty::<axum::body::Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    if resp.status() != StatusCode::OK {
        conn.abort();
        return Err(format!("the node answered {}", resp.status()));
    }
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static(hearth_proto::exposition::TEXT_CONTENT_TYPE));
    let body = http_body_util::Limited::new(resp.into_body(), PROXY_MAX_BYTES)
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    conn.abort();
    Ok((content_type, body))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hearth_proto::control::{DesiredState, HealthSummary, Heartbeat, PowerSummary, Versions};
    use hearth_proto::exposition::parse_text;
    use hearth_proto::fleet::HardwareIdentity;

    use super::*;

    fn node(
        id: &str,
        online: bool,
        revoked: bool,
        state: NodeState,
        budget: Option<u32>,
    ) -> NodeView {
        NodeView {
            id: id.into(),
            hostname: format!("host-{id}"),
            hardware: HardwareIdentity {
                dmi_uuid: id.into(),
                board_serial: String::new(),
                gpu_uuids: vec![],
            },
            gpus: vec![],
            labels: [("site".to_string(), "fra-1".to_string())].into(),
            online,
            last_seen_ms: Some(1),
            enrolled_ms: 0,
            cert_not_after_ms: 0,
            heartbeat: Some(Heartbeat {
                seq: 1,
                at_ms: 1,
                state,
                health: HealthSummary { gpus: 4, healthy: 3, degraded: 1, failed: 0 },
                power: PowerSummary { draw_w: 2000, limit_w: 2800 },
                versions: Versions::default(),
                desired_generation: 0,
            }),
            protocol_version: Some(1),
            desired: DesiredState { power_budget_w: budget, ..Default::default() },
            revoked,
        }
    }

    #[test]
    fn fleet_series_count_nodes_gpus_and_power_of_online_nodes() {
        let nodes = vec![
            node("a", true, false, NodeState::Ready, Some(2500)),
            node("b", true, false, NodeState::Draining, None),
            node("c", false, false, NodeState::Ready, Some(1000)),
            node("d", false, true, NodeState::Ready, None),
        ];
        let text = render(
            &nodes,
            LiveFigures { sessions: 2, tunnels: 1, lanes: 2, sessions_on_tunnel: 1 },
        )
        .text();
        let parsed = parse_text(&text).expect("parses");
        let v = |name: &str, label: Option<(&str, &str)>| {
            parsed
                .iter()
                .find(|(n, l, _)| {
                    n == name
                        && label.is_none_or(|(k, val)| l.iter().any(|(a, b)| a == k && b == val))
                })
                .map(|p| p.2)
        };
        assert_eq!(v("hearth_fleet_nodes", Some(("state", "online"))), Some(2.0));
        assert_eq!(v("hearth_fleet_nodes", Some(("state", "offline"))), Some(1.0));
        assert_eq!(v("hearth_fleet_nodes", Some(("state", "revoked"))), Some(1.0));
        assert_eq!(v("hearth_fleet_nodes_by_node_state", Some(("state", "ready"))), Some(1.0));
        assert_eq!(v("hearth_fleet_nodes_by_node_state", Some(("state", "draining"))), Some(1.0));
        assert_eq!(v("hearth_fleet_gpus", Some(("health", "healthy"))), Some(6.0));
        assert_eq!(v("hearth_fleet_gpus", Some(("health", "degraded"))), Some(2.0));
        assert_eq!(v("hearth_fleet_power_draw_watts", None), Some(4000.0));
        assert_eq!(v("hearth_fleet_power_limit_watts", None), Some(5600.0));
        assert_eq!(v("hearth_fleet_power_budget_watts", None), Some(3500.0));
        assert_eq!(v("hearth_fleet_sessions", None), Some(2.0));
        assert_eq!(v("hearth_fleet_tunnels", None), Some(1.0));
        assert_eq!(v("hearth_fleet_tunnel_sessions", None), Some(1.0));
        assert_eq!(v("hearth_fleet_tunnel_lanes", None), Some(2.0));
    }

    #[test]
    fn sd_lists_non_revoked_nodes_behind_the_scrape_proxy() {
        let nodes = vec![
            node("a", true, false, NodeState::Ready, None),
            node("d", false, true, NodeState::Ready, None),
        ];
        let groups = target_groups(&nodes, "fleet.example:7443");
        assert_eq!(groups.len(), 1);
        let json = serde_json::to_value(&groups).expect("json");
        assert_eq!(json[0]["targets"][0], "fleet.example:7443");
        let labels: BTreeMap<String, String> =
            serde_json::from_value(json[0]["labels"].clone()).expect("labels");
        assert_eq!(labels["__metrics_path__"], "/v1/nodes/a/metrics");
        assert_eq!(labels["instance"], "a");
        assert_eq!(labels["label_site"], "fra-1");
        assert_eq!(labels["hostname"], "host-a");
    }

    #[test]
    #[allow(clippy::print_stderr)] // a skipped check says so
    fn promtool_finds_nothing_in_the_fleet_exposition() {
        let nodes = vec![node("a", true, false, NodeState::Ready, Some(2500))];
        let text = render(&nodes, LiveFigures::default()).text();
        let out = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child = match out {
            Ok(c) => c,
            Err(_) if std::env::var_os("CI").is_none() => {
                eprintln!("promtool not installed: skipped (scripts/test installs it)");
                return;
            }
            Err(e) => panic!("promtool is required under CI (apt-get install prometheus): {e}"),
        };
        use std::io::Write as _;
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
        let out = child.wait_with_output().expect("promtool ran");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool: {said}");
        assert!(said.trim().is_empty(), "promtool findings: {said}");
    }
}
