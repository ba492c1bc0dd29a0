//! The `api` subsystem: binds the Unix socket (owner-only) and serves the `/v1` router.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_proto::api::{
    ApiError, DiagReport, DiagRequest, PowerBudgetRequest, PowerLimitRequest, PowerSettings,
    ReleaseRequest,
};
use hearth_sim::SimClock;

use super::{Done, SimInfo, SimInjectRequest, SimWorkloadRequest};
use crate::agent::Agent;
use crate::gpu::GpuError;
use crate::supervisor::{BoxRun, RunCtx, Subsystem};

/// Why the socket cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process serves the socket.
    #[error("another process is already listening on {path} (is hearth-agent running?)")]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// Something that is not a socket sits at the path.
    #[error("{path} exists and is not a socket; refusing to remove it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// An I/O step failed.
    #[error("cannot {step} {path}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BindError + use<> {
    let path = path.to_path_buf();
    move |source| BindError::Io { step, path, source }
}

/// Bind the API socket: create its directory (0700) if missing, replace a stale socket, refuse
/// to steal a live one, and make the socket owner-only (0600).
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, BindError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create directory", dir))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse { path: path.to_path_buf() });
            }
            std::fs::remove_file(path).map_err(io("remove stale socket", path))?;
        }
        Ok(_) => return Err(BindError::NotASocket { path: path.to_path_buf() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", path)(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("set permissions on", path))?;
    Ok(listener)
}

/// An error answer: status code and message.
#[derive(Debug)]
pub struct ApiFailure(StatusCode, String);

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<JsonRejection> for ApiFailure {
    fn from(r: JsonRejection) -> Self {
        Self(StatusCode::BAD_REQUEST, format!("bad request body: {}", r.body_text()))
    }
}

fn gpu_failure(e: GpuError) -> ApiFailure {
    let code = match &e {
        GpuError::NoSuchGpu { .. } | GpuError::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
        GpuError::NotSupported { .. } => StatusCode::NOT_IMPLEMENTED,
        GpuError::NoPermission { .. } => StatusCode::FORBIDDEN,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiFailure(code, format!("{:#}", anyhow::Error::from(e)))
}

/// The `/v1` router over `agent`.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/status", get(|State(a): State<Arc<Agent>>| async move { Json(a.status()) }))
        .route("/v1/health", get(|State(a): State<Arc<Agent>>| async move { Json(a.health()) }))
        .route(
            "/v1/power",
            get(|State(a): State<Arc<Agent>>| async move { Json(a.power()) })
                .post(set_power_settings),
        )
        .route("/v1/power/limit", post(set_power_limit))
        .route("/v1/health/drain", post(health_drain))
        .route("/v1/health/undrain", post(health_undrain))
        .route("/v1/health/release", post(health_release))
        .route("/v1/health/diag", post(health_diag))
        .route("/v1/power/budget", post(set_power_budget))
        .route("/v1/update", get(update_state))
        .route("/metrics", get(crate::telemetry::server::metrics))
        .route("/v1/sim", get(sim_info))
        .route("/v1/sim/inject", post(sim_inject))
        .route("/v1/sim/workload", post(sim_workload))
        .fallback(|uri: axum::http::Uri| async move {
            ApiFailure(StatusCode::NOT_FOUND, format!("no such endpoint: {uri}"))
        })
        .with_state(agent)
}

async fn set_power_limit(
    State(agent): State<Arc<Agent>>,
    body: Result<Json<PowerLimitRequest>, JsonRejection>,
) -> Result<Json<Done>, ApiFailure> {
    let Json(req) = body?;
    let backend = agent.backend().ok_or_else(|| {
        ApiFailure(StatusCode::SERVICE_UNAVAILABLE, "the GPU backend is not open yet".into())
    })?;
    let done = tokio::task::spawn_blocking(move || -> Result<String, GpuError> {
        match req.watts {
            Some(w) => {
                let mw = w.checked_mul(1000).ok_or(GpuError::InvalidArgument {
                    gpu: req.gpu,
                    op: "set power limit",
                    message: format!("{w} W is out of range"),
                })?;
                backend.set_power_limit(req.gpu, mw)?;
                Ok(format!("GPU {} power limit set to {w} W", req.gpu))
            }
            None => {
                backend.restore_power_limit(req.gpu)?;
                Ok(format!("GPU {} power limit restored to its default", req.gpu))
            }
        }
    })
    .await
    .map_err(|e| ApiFailure(StatusCode::INTERNAL_SERVER_ERROR, format!("GPU call failed: {e}")))?
    .map_err(gpu_failure)?;
    tracing::info!(action = %done, "power limit changed through the API");
    Ok(Json(Done { done }))
}

/// `POST /v1/power`: new budget, targets and priorities (validated; a bad value changes
/// nothing). The `power` subsystem applies them at once and persists them.
async fn set_power_settings(
    State(agent): State<Arc<Agent>>,
    body: Result<Json<PowerSettings>, JsonRejection>,
) -> Result<Json<Done>, ApiFailure> {
    let Json(settings) = body?;
    crate::power::validate_settings(&settings, "gpus")
        .map_err(|e| ApiFailure(StatusCode::BAD_REQUEST, format!("power settings: {e}")))?;
    let done = match settings.budget_w {
        Some(b) => format!("power budget set to {b} W"),
        None => "power budget removed (vendor limits)".to_string(),
    };
    tracing::info!(budget_w = ?settings.budget_w, core_target_c = ?settings.core_target_c,
        memory_target_c = ?settings.memory_target_c, "power settings changed through the API");
    agent.set_power_settings(settings);
    Ok(Json(Done { done }))
}

/// `POST /v1/power/budget`: only the budget; targets and priorities stay.
async fn set_power_budget(
    State(agent): State<Arc<Agent>>,
    body: Result<Json<PowerBudgetRequest>, JsonRejection>,
) -> Result<Json<Done>, ApiFailure> {
    let Json(req) = body?;
    let mut settings = agent.power_settings().borrow().settings.clone();
    settings.budget_w = req.budget_w;
    crate::power::validate_settings(&settings, "gpus")
        .map_err(|e| ApiFailure(StatusCode::BAD_REQUEST, format!("power settings: {e}")))?;
    tracing::info!(budget_w = ?req.budget_w, "power budget changed through the API");
    agent.set_power_budget(req.budget_w);
    Ok(Json(Done {
        done: match req.budget_w {
            Some(b) => format!("power budget set to {b} W"),
            None => "power budget removed (vendor limits)".to_string(),
        },
    }))
}

async fn update_state(
    State(agent): State<Arc<Agent>>,
) -> Result<Json<crate::update::state::UpdateState>, ApiFailure> {
    crate::update::report::read_state(&agent.config.state.dir).map(Json).map_err(|e| {
        ApiFailure(StatusCode::INTERNAL_SERVER_ERROR, format!("{:#}", anyhow::Error::from(e)))
    })
}

fn sim_host(agent: &Agent) -> Result<&Arc<hearth_sim::SimHost>, ApiFailure> {
    agent.sim.as_ref().ok_or_else(|| {
        ApiFailure(
            StatusCode::CONFLICT,
            "this node runs on real GPUs (gpu.backend = \"nvml\"); simulator endpoints need \
             gpu.backend = \"sim\""
                .into(),
        )
    })
}

async fn sim_info(State(agent): State<Arc<Agent>>) -> Result<Json<SimInfo>, ApiFailure> {
    let host = sim_host(&agent)?;
    let node = host.lock();
    Ok(Json(SimInfo {
        sim_time_s: node.now().as_secs_f64(),
        time_scale: match host.clock() {
            SimClock::Real { scale } => Some(scale),
            SimClock::Manual => None,
        },
        gpus: node.gpu_count(),
    }))
}

async fn sim_inject(
    State(agent): State<Arc<Agent>>,
    body: Result<Json<SimInjectRequest>, JsonRejection>,
) -> Result<Json<Done>, ApiFailure> {
    let Json(req) = body?;
    let host = sim_host(&agent)?;
    host.lock()
        .inject(req.gpu, req.fault.clone())
        .map_err(|e| ApiFailure(StatusCode::BAD_REQUEST, e.to_string()))?;
    tracing::warn!(gpu = req.gpu, fault = ?req.fault, "simulated fault injected");
    Ok(Json(Done { done: format!("injected {:?} into GPU {}", req.fault, req.gpu) }))
}

async fn sim_workload(
    State(agent): State<Arc<Agent>>,
    body: Result<Json<SimWorkloadRequest>, JsonRejection>,
) -> Result<Json<Done>, ApiFailure> {
    let Json(req) = body?;
    let host = sim_host(&agent)?;
    host.lock()
        .set_workload(req.gpu, req.workload)
        .map_err(|e| ApiFailure(StatusCode::BAD_REQUEST, e.to_string()))?;
    tracing::info!(gpu = req.gpu, workload = ?req.workload, "simulated workload changed");
    Ok(Json(Done { done: format!("GPU {} now runs {:?}", req.gpu, req.workload) }))
}

// Health (docs/0003-health.md).

fn monitor(agent: &Agent) -> Result<Arc<std::sync::Mutex<crate::health::Monitor>>, ApiFailure> {
    agent.monitor().ok_or_else(|| {
        ApiFailure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the health subsystem is not running yet".into(),
        )
    })
}

fn with_monitor<T>(
    agent: &Agent,
    f: impl FnOnce(&mut crate::health::Monitor) -> T,
) -> Result<T, ApiFailure> {
    let m = monitor(agent)?;
    let mut guard = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = f(&mut guard);
    agent.publish_health(guard.view());
    Ok(out)
}

async fn health_drain(State(agent): State<Arc<Agent>>) -> Result<Json<Done>, ApiFailure> {
    with_monitor(&agent, |m| m.set_drained(true, crate::agent::now_ms()))?;
    tracing::warn!("node drain requested through the API");
    Ok(Json(Done { done: "node draining: no new work; running work continues".into() }))
}

async fn health_undrain(State(agent): State<Arc<Agent>>) -> Result<Json<Done>, ApiFailure> {
    with_monitor(&agent, |m| m.set_drained(false, crate::agent::now_ms()))?;
    tracing::info!("node drain lifted through the API");
    Ok(Json(Done { done: "node serving again".into() }))
}

async fn health_release(
    State(agent): State<Arc<Agent>>,
    body: Result<Json<ReleaseRequest>, JsonRejection>,
) -> Result<Json<Done>, ApiFailure> {
    let Json(req) = body?;
    if !with_monitor(&agent, |m| m.release(req.gpu, crate::agent::now_ms()))? {
        return Err(ApiFailure(
            StatusCode::BAD_REQUEST,
            format!("no GPU {} has been checked", req.gpu),
        ));
    }
    tracing::warn!(gpu = req.gpu, "GPU returned to service by the operator");
    Ok(Json(Done { done: format!("GPU {} returned to service", req.gpu) }))
}

async fn health_diag(
    State(agent): State<Arc<Agent>>,
    body: Result<Json<DiagRequest>, JsonRejection>,
) -> Result<Json<DiagReport>, ApiFailure> {
    let Json(req) = body?;
    let m = monitor(&agent)?;
    let policy = {
        let guard = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.may_diagnose(req.gpu).map_err(|e| ApiFailure(StatusCode::CONFLICT, e))?;
        guard.policy().diag.clone()
    };
    // Check the process list once more right before running.
    if let Some(b) = agent.backend() {
        let gpu = req.gpu;
        let procs = tokio::task::spawn_blocking(move || b.compute_processes(gpu))
            .await
            .map_err(|e| {
                ApiFailure(StatusCode::INTERNAL_SERVER_ERROR, format!("GPU call failed: {e}"))
            })?
            .map_err(gpu_failure)?;
        if !procs.is_empty() {
            return Err(ApiFailure(
                StatusCode::CONFLICT,
                format!(
                    "GPU {gpu} has {} compute processes; diagnostics wait until idle",
                    procs.len()
                ),
            ));
        }
    }
    let report = tokio::task::spawn_blocking(move || {
        crate::health::diag::run(&crate::command::SystemRunner, &policy, req.gpu, req.level)
    })
    .await
    .map_err(|e| {
        ApiFailure(StatusCode::INTERNAL_SERVER_ERROR, format!("diagnostic thread failed: {e}"))
    })?
    .map_err(|e| {
        let code = match e {
            crate::health::diag::DiagError::Level { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiFailure(code, format!("{:#}", anyhow::Error::from(e)))
    })?;
    tracing::info!(gpu = report.gpu, passed = report.passed, command = %report.command, "diagnostic done");
    Ok(Json(report))
}

/// Serves the API.
#[derive(Debug)]
pub struct ApiServer {
    agent: Arc<Agent>,
}

impl ApiServer {
    /// The API over `agent`.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

impl Subsystem for ApiServer {
    fn name(&self) -> &'static str {
        "api"
    }

    fn run(self: Arc<Self>, ctx: RunCtx) -> BoxRun {
        Box::pin(async move {
            let path = self.agent.config.api.socket.clone();
            let listener = bind(&path)?;
            tracing::info!(socket = %path.display(), "local API listening");
            ctx.ready();
            let cancel = ctx.cancel.clone();
            let served = axum::serve(listener, router(self.agent.clone()))
                .with_graceful_shutdown(async move { cancel.cancelled().await })
                .await;
            let _ = std::fs::remove_file(&path);
            served.map_err(|source| BindError::Io { step: "serve", path, source })?;
            Ok(())
        })
    }
}
