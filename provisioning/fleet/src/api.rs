//! The HTTPS + JSON API under `/v1`: enrollment and renewal for nodes, and what `hearthctl` uses.
//!
//! Authorisation comes from the TLS client certificate ([`Peer`]): enrollment needs none (the
//! token is the credential), renewal a node certificate, reads a viewer or admin operator
//! certificate, changes an admin one. Bodies over `max_body_bytes`, malformed JSON, unknown fields
//! and bad CSRs are refused with a JSON `{"error": …}` naming the problem, before anything is
//! written. Endpoints: `docs/protocol.md`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hearth_fleet_client::seed::{Seed, SeedFleet};
use hearth_proto::control::{Command, ControlMessage};
use hearth_proto::fleet::{
    ChannelRequest, CommandRequest, CommandView, DrainRequest, EnrollRequest, EnrollResponse,
    EventView, FleetError, NodeView, PowerBudgetRequest, RenewRequest, TokenCreateRequest,
    TokenCreated, TokenView,
};
use rcgen::CertificateSigningRequestParams;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::ca::{Peer, Role};
use crate::registry::{CertRecord, Enrollment, NewToken, Refusal, RegistryError};
use crate::server::Fleet;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(FleetError { error: self.message })).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Refused(r) => {
                let status = match r {
                    Refusal::UnknownToken
                    | Refusal::ExpiredToken { .. }
                    | Refusal::RevokedToken { .. }
                    | Refusal::UsedUpToken { .. }
                    | Refusal::RevokedHardware { .. } => StatusCode::FORBIDDEN,
                    Refusal::UnknownNode { .. } | Refusal::NoSuchToken { .. } => {
                        StatusCode::NOT_FOUND
                    }
                    Refusal::Signing(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    Refusal::Rollout(ref e) => crate::rollout::status_of(e),
                };
                ApiError::new(status, r.to_string())
            }
            other => {
                tracing::error!(error = %format!("{other:#}"), "registry failure");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("registry unavailable: {other}"),
                )
            }
        }
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Build the router.
pub fn router(fleet: Arc<Fleet>) -> Router {
    let limit = fleet.config.max_body_bytes;
    let router = Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/v1/renew", post(renew))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}/revoke", post(revoke_token))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(show_node))
        .route("/v1/nodes/{id}/drain", post(drain))
        .route("/v1/nodes/{id}/power-budget", post(power_budget))
        .route("/v1/nodes/{id}/channel", post(channel))
        .route("/v1/nodes/{id}/commands", get(list_commands).post(command))
        .route("/v1/nodes/{id}/revoke", post(revoke_node))
        .route("/v1/events", get(events))
        .route("/v1/nodes/{id}/expose", post(crate::expose::create))
        .route("/v1/exposures", get(crate::expose::list))
        .route("/v1/exposures/{port}/remove", post(crate::expose::remove))
        .route("/metrics", get(crate::metrics::fleet_metrics))
        .route("/v1/sd", get(crate::metrics::sd))
        .route("/v1/nodes/{id}/metrics", get(crate::metrics::node_metrics));
    crate::rollout_api::routes(router)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(fleet)
}

pub(crate) fn parse<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds the {limit}-byte limit"),
            )
        } else {
            ApiError::new(e.status(), format!("cannot read the request body: {e}"))
        }
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let where_ = if path == "." { String::new() } else { format!(" at {path}") };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("malformed JSON body{where_}: {}", e.inner()),
        )
    })
}

pub(crate) fn need(peer: &Peer, role: Role) -> Result<(), ApiError> {
    match peer {
        Peer::Operator { role: Role::Admin, .. } => Ok(()),
        Peer::Operator { role: Role::Viewer, .. } if role == Role::Viewer => Ok(()),
        Peer::Operator { name, .. } => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("operator {name} has role viewer; this needs admin"),
        )),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "an operator certificate is required (hearth-fleet operator-cert)",
        )),
    }
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_len(what: &str, v: &str, max: usize) -> Result<(), ApiError> {
    if v.trim().is_empty() || v.len() > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{what} must be 1..={max} bytes"),
        ));
    }
    Ok(())
}

fn parse_csr(pem: &str) -> Result<CertificateSigningRequestParams, ApiError> {
    CertificateSigningRequestParams::from_pem(pem).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => ApiError::new(
            StatusCode::BAD_REQUEST,
            "CSR signature does not verify with the CSR's public key (key mismatch)",
        ),
        other => ApiError::new(StatusCode::BAD_REQUEST, format!("malformed CSR: {other}")),
    })
}

async fn enroll(
    State(fleet): State<Arc<Fleet>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<EnrollResponse> {
    let req: EnrollRequest = parse(body, fleet.config.max_body_bytes)?;
    check_len("token", &req.token, 256)?;
    check_len("hardware.dmi_uuid", &req.hardware.dmi_uuid, 128)?;
    check_len("hardware.board_serial", &req.hardware.board_serial, 128)?;
    check_len("hostname", &req.hostname, 255)?;
    if req.gpus.len() > 64 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "more than 64 GPUs"));
    }
    let csr = parse_csr(&req.csr_pem)?;
    let e = Enrollment {
        token_hash: hearth_fleet_client::tls::sha256_hex(req.token.as_bytes()),
        hardware: req.hardware,
        hostname: req.hostname,
        gpus: req.gpus,
        agent_version: req.agent_version,
        new_id: format!("n-{}", random_hex(6)),
    };
    let f = fleet.clone();
    let slot: Arc<std::sync::Mutex<Option<crate::ca::Issued>>> = Arc::default();
    let out = slot.clone();
    let validity = Duration::from_secs(u64::from(f.config.cert_validity_days) * 86_400);
    let sign: crate::enroll::Signer = Box::new(move |id| {
        let i = f.ca.sign_node(&csr, id, validity, Duration::ZERO).map_err(|e| format!("{e:#}"))?;
        let rec = CertRecord { serial: i.serial.clone(), not_after_ms: i.not_after_ms };
        *out.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(i);
        Ok(rec)
    });
    let (node_id, _new) = fleet
        .enroller
        .enroll(e, sign)
        .await
        .map_err(|q| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, q.to_string()))??;
    let issued = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    let issued = issued
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no certificate issued"))?;
    tracing::info!(node = %node_id, "node enrolled");
    Ok(Json(EnrollResponse {
        node_id,
        cert_pem: issued.cert_pem,
        ca_pem: fleet.ca.cert_pem().to_string(),
        not_before_ms: issued.not_before_ms,
        not_after_ms: issued.not_after_ms,
    }))
}

async fn renew(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<EnrollResponse> {
    let Peer::Node(node) = peer else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "renewal needs the node's current certificate",
        ));
    };
    let req: RenewRequest = parse(body, fleet.config.max_body_bytes)?;
    let csr = parse_csr(&req.csr_pem)?;
    let f = fleet.clone();
    let id = node.clone();
    let issued = fleet
        .db(move |r| {
            let mut issued = None;
            let validity = Duration::from_secs(u64::from(f.config.cert_validity_days) * 86_400);
            r.renew(&id, crate::now_ms(), &mut |id| {
                let i =
                    f.ca.sign_node(&csr, id, validity, Duration::ZERO)
                        .map_err(|e| format!("{e:#}"))?;
                let rec = CertRecord { serial: i.serial.clone(), not_after_ms: i.not_after_ms };
                issued = Some(i);
                Ok(rec)
            })?;
            Ok(issued)
        })
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no certificate issued"))?;
    Ok(Json(EnrollResponse {
        node_id: node,
        cert_pem: issued.cert_pem,
        ca_pem: fleet.ca.cert_pem().to_string(),
        not_before_ms: issued.not_before_ms,
        not_after_ms: issued.not_after_ms,
    }))
}

async fn list_tokens(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<Vec<TokenView>> {
    need(&peer, Role::Viewer)?;
    Ok(Json(fleet.db(|r| r.tokens()).await?))
}

async fn create_token(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<TokenCreated> {
    need(&peer, Role::Admin)?;
    let req: TokenCreateRequest = parse(body, fleet.config.max_body_bytes)?;
    if req.max_uses == 0 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "max_uses must be at least 1"));
    }
    if req.ttl_s == 0 || req.ttl_s > 365 * 86_400 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "ttl_s must be in 1..=31536000"));
    }
    let update_channel = req.channel.unwrap_or_else(|| hearth_proto::fleet::DEFAULT_CHANNEL.into());
    hearth_fleet_client::release::check_channel(&update_channel)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let secret = {
        use base64::Engine as _;
        let mut b = [0u8; 32];
        let _ = getrandom::fill(&mut b);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let now = crate::now_ms();
    let t = NewToken {
        id: format!("t-{}", random_hex(4)),
        hash: hearth_fleet_client::tls::sha256_hex(secret.as_bytes()),
        labels: req.labels,
        created_ms: now,
        expires_ms: now + req.ttl_s * 1000,
        max_uses: req.max_uses,
        update_channel,
    };
    let (id, expires_ms) = (t.id.clone(), t.expires_ms);
    fleet.db(move |r| r.create_token(&t)).await?;
    let seed = Seed {
        fleet: SeedFleet {
            url: fleet.config.public_url(),
            name: fleet.config.name.clone(),
            ca_sha256: fleet.ca.pin(),
            token: secret.clone(),
            https_proxy: None,
            fallback_urls: fleet.config.fallback_urls.clone(),
        },
        network: None,
    };
    Ok(Json(TokenCreated { id, token: secret, expires_ms, seed: seed.to_toml() }))
}

async fn revoke_token(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<TokenView> {
    need(&peer, Role::Admin)?;
    let i = id.clone();
    fleet.db(move |r| r.revoke_token(&i, crate::now_ms())).await?;
    let tokens = fleet.db(|r| r.tokens()).await?;
    tokens
        .into_iter()
        .find(|t| t.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no token {id}")))
}

pub(crate) fn with_liveness(fleet: &Fleet, mut n: NodeView, now: u64) -> NodeView {
    if let Some(l) = fleet.live().get(&n.id) {
        n.last_seen_ms = Some(l.last_seen_ms);
        if l.heartbeat.is_some() {
            n.heartbeat = l.heartbeat.clone();
        }
        n.protocol_version = Some(l.protocol_version);
    }
    n.online = !n.revoked && n.last_seen_ms.is_some_and(|t| crate::server::is_fresh(t, now));
    n
}

async fn list_nodes(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<Vec<NodeView>> {
    need(&peer, Role::Viewer)?;
    let nodes = fleet.db(|r| r.nodes()).await?;
    let now = crate::now_ms();
    Ok(Json(nodes.into_iter().map(|n| with_liveness(&fleet, n, now)).collect()))
}

async fn node_or_404(fleet: &Arc<Fleet>, id: String) -> Result<NodeView, ApiError> {
    let i = id.clone();
    let n = fleet.db(move |r| r.node(&i)).await?;
    let n = n.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no node {id}")))?;
    Ok(with_liveness(fleet, n, crate::now_ms()))
}

async fn show_node(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<NodeView> {
    need(&peer, Role::Viewer)?;
    Ok(Json(node_or_404(&fleet, id).await?))
}

async fn change_desired(
    fleet: &Arc<Fleet>,
    id: String,
    what: String,
    change: impl Fn(&mut hearth_proto::control::DesiredState) + Send + 'static,
) -> ApiResult<NodeView> {
    let i = id.clone();
    let desired = fleet.db(move |r| r.update_desired(&i, crate::now_ms(), &what, &change)).await?;
    fleet.notify(&id, ControlMessage::Desired(desired)).await;
    Ok(Json(node_or_404(fleet, id).await?))
}

async fn drain(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<NodeView> {
    need(&peer, Role::Admin)?;
    let req: DrainRequest = parse(body, fleet.config.max_body_bytes)?;
    let what = if req.drain { "drain" } else { "undrain" }.to_string();
    change_desired(&fleet, id, what, move |d| d.drain = req.drain).await
}

async fn power_budget(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<NodeView> {
    need(&peer, Role::Admin)?;
    let req: PowerBudgetRequest = parse(body, fleet.config.max_body_bytes)?;
    if req.watts.is_some_and(|w| !(100..=100_000).contains(&w)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "watts must be in 100..=100000 (or null)",
        ));
    }
    let what = match req.watts {
        Some(w) => format!("power budget {w} W"),
        None => "power budget cleared".into(),
    };
    change_desired(&fleet, id, what, move |d| d.power_budget_w = req.watts).await
}

/// Move a node to another update channel. A rollout of the old channel counts it as left; one of
/// the new channel takes it in while running or paused (`docs/0009-updates.md`). The old
/// channel's `update_version` is cleared with the move, so a node that had not started it yet
/// never looks for it on the new channel; an install already under way on the node goes on
/// (the fleet does not cancel it).
async fn channel(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<NodeView> {
    need(&peer, Role::Admin)?;
    let req: ChannelRequest = parse(body, fleet.config.max_body_bytes)?;
    hearth_fleet_client::release::check_channel(&req.channel)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let what = format!("update channel {}", req.channel);
    change_desired(&fleet, id, what, move |d| {
        if d.update_channel != req.channel {
            d.update_channel.clone_from(&req.channel);
            d.update_version = None;
        }
    })
    .await
}

async fn command(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<CommandView> {
    need(&peer, Role::Admin)?;
    let req: CommandRequest = parse(body, fleet.config.max_body_bytes)?;
    let i = id.clone();
    let now = crate::now_ms();
    let cid = fleet.db(move |r| r.add_command(&i, req.kind, now)).await?;
    if fleet.notify(&id, ControlMessage::Command(Command { id: cid, kind: req.kind })).await {
        fleet.db(move |r| r.command_sent(cid)).await?;
    }
    let i = id.clone();
    let cmds = fleet.db(move |r| r.commands(Some(&i))).await?;
    cmds.into_iter()
        .find(|c| c.id == cid)
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "command vanished"))
}

async fn list_commands(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<Vec<CommandView>> {
    need(&peer, Role::Viewer)?;
    Ok(Json(fleet.db(move |r| r.commands(Some(&id))).await?))
}

async fn revoke_node(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<NodeView> {
    need(&peer, Role::Admin)?;
    let i = id.clone();
    fleet.db(move |r| r.revoke_node(&i, crate::now_ms())).await?;
    // Close its session: the next connection is refused as revoked.
    if let Some(l) = fleet.live().get_mut(&id) {
        l.tx = None;
        l.kill.cancel();
    }
    fleet.gateway.disconnect(&id);
    if fleet.config.gateway_id.is_some() {
        // Another gateway process may hold its session: it ends it within a second.
        let i = id.clone();
        fleet.db(move |r| r.notify_gateway(&i, crate::now_ms())).await?;
    }
    Ok(Json(node_or_404(&fleet, id).await?))
}

/// `GET /v1/events?limit=N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    limit: Option<u32>,
}

async fn events(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Vec<EventView>> {
    need(&peer, Role::Viewer)?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    Ok(Json(fleet.db(move |r| r.events(limit)).await?))
}
