//! The rollout endpoints (`docs/api.md`): `GET/POST /v1/rollouts`, `GET /v1/rollouts/{id}`,
//! `POST /v1/rollouts/{id}/pause|resume`. Reads need a viewer certificate, changes an admin one;
//! a malformed or refused request names its cause and changes nothing.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Router};
use hearth_proto::rollout::{Rollout, RolloutCreate};

use crate::api::{ApiError, need, parse};
use crate::ca::{Peer, Role};
use crate::rollout::{Channel, RolloutError, Step};
use crate::server::Fleet;

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The rollout routes.
pub fn routes(router: Router<Arc<Fleet>>) -> Router<Arc<Fleet>> {
    use axum::routing::{get, post};
    router
        .route("/v1/rollouts", get(list).post(create))
        .route("/v1/rollouts/{id}", get(show))
        .route("/v1/rollouts/{id}/pause", post(pause))
        .route("/v1/rollouts/{id}/resume", post(resume))
}

fn id_of(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("rollout id {raw:?} is not a number"))
    })
}

async fn list(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<Vec<Rollout>> {
    need(&peer, Role::Viewer)?;
    Ok(Json(fleet.db(|r| r.rollouts()).await?))
}

async fn show(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<Rollout> {
    need(&peer, Role::Viewer)?;
    let id = id_of(&id)?;
    Ok(Json(fleet.db(move |r| r.rollout(id)).await?))
}

async fn create(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Rollout> {
    need(&peer, Role::Admin)?;
    let req: RolloutCreate = parse(body, fleet.config.max_body_bytes)?;
    let now = fleet.clock().now_ms();
    let created = fleet.db(move |r| r.create_rollout(&req, now)).await?;
    tracing::info!(rollout = created.id, channel = %created.channel, version = %created.version, nodes = created.nodes.len(), "rollout created");
    // Tell the canary wave at once rather than at the next sweep.
    let id = created.id;
    let (r, told) = fleet
        .db(move |reg| {
            reg.change_rollout(id, now, &mut |r, ch| {
                let step = crate::rollout::tick(r, now, ch);
                Ok((!step.is_empty()).then_some(step))
            })
        })
        .await?;
    crate::rollout::deliver(&fleet, told).await;
    Ok(Json(r))
}

async fn change(
    fleet: &Arc<Fleet>,
    peer: &Peer,
    raw: &str,
    f: fn(&mut Rollout, u64, &Channel) -> Result<Step, RolloutError>,
) -> ApiResult<Rollout> {
    need(peer, Role::Admin)?;
    let id = id_of(raw)?;
    let now = fleet.clock().now_ms();
    let (r, told) = fleet
        .db(move |reg| reg.change_rollout(id, now, &mut |r, ch| f(r, now, ch).map(Some)))
        .await?;
    crate::rollout::deliver(fleet, told).await;
    Ok(Json(r))
}

async fn pause(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<Rollout> {
    change(&fleet, &peer, &id, |r, now, _| crate::rollout::pause(r, now)).await
}

async fn resume(
    State(fleet): State<Arc<Fleet>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<Rollout> {
    change(&fleet, &peer, &id, crate::rollout::resume).await
}
