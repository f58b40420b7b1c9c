//! The HTTP interface: health, metrics, the agent protocol under `/api/v1`
//! (`agents/PROTOCOL.md` is its contract), and the GitHub webhook.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::dispatch::Dispatcher;
use crate::store::StoreError;
use crate::store::queue::{AgentIdentity, Artifact, Completion, Lease, Queue, Refusal};
use crate::store::usage::{UsageLog, UsageRow};
use crate::writeback::paths::OutputFile;
use crate::writeback::{ResultError, Results};

pub mod enroll;
mod hooks;

pub use enroll::Enrollment;
pub use hooks::Hooks;

pub struct ApiState<Q> {
    pub dispatcher: Arc<Dispatcher<Q>>,
    pub registry: Registry,
    /// Set once the first sync has reached the store.
    pub ready: AtomicBool,
    /// Commits the files a completion carries; without it such completions are refused.
    pub results: Option<Arc<dyn Results>>,
    /// The webhook's secret and whom it nudges; without it `/hooks/github` answers 404.
    pub hooks: Option<Hooks>,
    /// Who may register as an agent.
    pub enrollment: Enrollment,
}

impl<Q: Queue> ApiState<Q> {
    pub fn new(dispatcher: Arc<Dispatcher<Q>>) -> Arc<ApiState<Q>> {
        ApiState::with_writeback(dispatcher, None, None)
    }

    pub fn with_writeback(
        dispatcher: Arc<Dispatcher<Q>>,
        results: Option<Arc<dyn Results>>,
        hooks: Option<Hooks>,
    ) -> Arc<ApiState<Q>> {
        ApiState::build(dispatcher, results, hooks, Enrollment::default())
    }

    pub fn build(
        dispatcher: Arc<Dispatcher<Q>>,
        results: Option<Arc<dyn Results>>,
        hooks: Option<Hooks>,
        enrollment: Enrollment,
    ) -> Arc<ApiState<Q>> {
        let mut registry = Registry::default();
        dispatcher.metrics.register(&mut registry);
        crate::telemetry::telemetry().register(&mut registry);
        Arc::new(ApiState {
            dispatcher,
            registry,
            ready: AtomicBool::new(false),
            results,
            hooks,
            enrollment,
        })
    }
}

/// Serve the API, telling handlers each request's peer address (registration depends on it),
/// until `shutdown` resolves; requests in flight are answered first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// The peer's address, when the server was started with [`serve`].
struct Peer(Option<std::net::SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0),
        ))
    }
}

fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Output files make completions large; the rest of the protocol stays at axum's 2 MB.
const COMPLETE_BODY_LIMIT: usize = 64 << 20;

pub fn router<Q: Queue + UsageLog>(state: Arc<ApiState<Q>>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz::<Q>))
        .route("/metrics", get(metrics::<Q>))
        .route("/api/v1/agents/register", post(register::<Q>))
        .route("/api/v1/claim", post(claim::<Q>))
        .route("/api/v1/heartbeat", post(heartbeat::<Q>))
        .route(
            "/api/v1/complete",
            post(complete_many::<Q>).layer(DefaultBodyLimit::max(COMPLETE_BODY_LIMIT)),
        )
        .route("/api/v1/tasks/{id}/progress", post(progress::<Q>))
        .route(
            "/api/v1/tasks/{id}/complete",
            post(complete_one::<Q>).layer(DefaultBodyLimit::max(COMPLETE_BODY_LIMIT)),
        )
        .route("/api/v1/tasks/{id}/fail", post(fail::<Q>))
        .route("/api/v1/tasks/{id}/question", post(question::<Q>))
        .route("/api/v1/tasks/{id}/release", post(release::<Q>))
        .route("/api/v1/model-usage", post(model_usage::<Q>))
        .route("/hooks/github", post(hooks::github::<Q>))
        .with_state(state)
}

/// What a standby controller serves while another leads: it is alive, not ready, and its
/// process metrics can be scraped.
pub fn standby_router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "standing by: another controller leads",
                )
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                let mut registry = prometheus_client::registry::Registry::default();
                crate::telemetry::telemetry().register(&mut registry);
                openmetrics(&registry)
            }),
        )
        .fallback(|| async {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "standing by: another controller leads; retry",
            )
        })
}

fn openmetrics(registry: &prometheus_client::registry::Registry) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Errors as the protocol answers them.
#[derive(Debug)]
pub enum ApiError {
    Unauthorized,
    Refused(Refusal),
    Store(StoreError),
    /// The request is wrong in a way the message explains (400).
    BadRequest(String),
    /// Git or the forge failed; the same request may succeed later (503).
    Unavailable(String),
}

impl From<ResultError> for ApiError {
    fn from(e: ResultError) -> Self {
        match e {
            ResultError::Refused(r) => ApiError::Refused(r),
            ResultError::Path(e) => ApiError::BadRequest(e.to_string()),
            ResultError::Writeback(e) => {
                let id = error_id();
                tracing::error!(error_id = %id, reason = e.metric_label(), error = %crate::error_chain(&e), "committing a result failed");
                ApiError::Unavailable(format!(
                    "committing the result failed; retry later (error id {id})"
                ))
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "missing or unknown agent token".to_owned(),
            ),
            ApiError::Refused(Refusal::NoTask) => {
                (StatusCode::NOT_FOUND, Refusal::NoTask.to_string())
            }
            ApiError::Refused(r @ Refusal::NotHeld) => (StatusCode::CONFLICT, r.to_string()),
            ApiError::Store(e) => {
                // The chain names tables, queries and hosts: it goes to the log, and the agent
                // gets an id to find it there.
                let id = error_id();
                tracing::error!(error_id = %id, reason = e.metric_label(), error = %crate::error_chain(&e), "api request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("internal error (error id {id})"),
                )
            }
            ApiError::BadRequest(message) => (StatusCode::BAD_REQUEST, message),
            ApiError::Unavailable(message) => (StatusCode::SERVICE_UNAVAILABLE, message),
        };
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}

/// An opaque id that ties an internal error's answer to its log line.
fn error_id() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// The agent a request's bearer token belongs to.
pub struct Authenticated(pub AgentIdentity);

impl<Q: Queue> FromRequestParts<Arc<ApiState<Q>>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState<Q>>,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        match state.dispatcher.authenticate(token).await? {
            Some(agent) => Ok(Authenticated(agent)),
            None => Err(ApiError::Unauthorized),
        }
    }
}

async fn readyz<Q: Queue>(State(state): State<Arc<ApiState<Q>>>) -> StatusCode {
    if state.ready.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn metrics<Q: Queue>(State(state): State<Arc<ApiState<Q>>>) -> Response {
    openmetrics(&state.registry)
}

#[derive(Deserialize)]
pub struct RegisterRequest {
    pub name: String,
    #[serde(rename = "type")]
    pub agent_type: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default = "one")]
    pub concurrency: u32,
}

fn one() -> u32 {
    1
}

#[derive(Serialize)]
pub struct RegisterResponse {
    pub agent: String,
    pub token: String,
    /// Seconds, with fractions: `--lease 2500ms` is 2.5, not 2, and `--heartbeat 500ms` is
    /// 0.5, not 0 (which would have agents heartbeat as fast as they can).
    pub lease_seconds: f64,
    pub heartbeat_seconds: f64,
}

const AGENT_TYPES: [&str; 4] = ["cos", "seed", "specialist", "meta"];

async fn register<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Peer(peer): Peer,
    headers: axum::http::HeaderMap,
    Json(req): Json<RegisterRequest>,
) -> Result<Response, ApiError> {
    if let Err(why) = agentops_specs::names::check_dns_label(&req.name) {
        return Ok(bad_request(format!(
            "invalid agent name `{}`: {why}",
            req.name
        )));
    }
    if !AGENT_TYPES.contains(&req.agent_type.as_str()) {
        return Ok(bad_request(format!(
            "invalid agent type `{}`: expected one of {}",
            req.agent_type,
            AGENT_TYPES.join(", ")
        )));
    }
    if let Err(refused) = state
        .enrollment
        .check(peer, bearer(&headers), &req.name, &req.agent_type)
    {
        use crate::telemetry::InternalEvent;
        crate::telemetry::RegistrationRefused {
            refused,
            name: &req.name,
            peer,
        }
        .emit();
        let status = match refused {
            enroll::Refused::NoSecret | enroll::Refused::WrongSecret => StatusCode::UNAUTHORIZED,
            enroll::Refused::NotLoopback | enroll::Refused::TypeNotAllowed => StatusCode::FORBIDDEN,
        };
        return Ok((
            status,
            Json(
                serde_json::json!({ "error": refused.message(), "reason": refused.metric_label() }),
            ),
        )
            .into_response());
    }
    let agent = AgentIdentity {
        name: req.name,
        agent_type: req.agent_type,
        capabilities: req.capabilities,
        concurrency: req.concurrency.max(1),
    };
    let name = agent.name.clone();
    let token = state.dispatcher.register(agent).await?;
    let config = state.dispatcher.config();
    Ok(Json(RegisterResponse {
        agent: name,
        token,
        lease_seconds: config.policy.lease.as_secs_f64(),
        heartbeat_seconds: config.heartbeat.as_secs_f64(),
    })
    .into_response())
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct ClaimRequest {
    #[serde(default = "one")]
    max: u32,
    #[serde(default)]
    wait_ms: u64,
}

async fn claim<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(agent): Authenticated,
    Json(req): Json<ClaimRequest>,
) -> Result<Response, ApiError> {
    let max = req.max.clamp(1, 1_000);
    let tasks = state
        .dispatcher
        .claim(&agent, max, Duration::from_millis(req.wait_ms))
        .await?;
    Ok(Json(serde_json::json!({ "tasks": tasks })).into_response())
}

#[derive(Deserialize)]
struct HeartbeatRequest {
    #[serde(default)]
    tasks: Vec<LeaseBody>,
}

#[derive(Deserialize)]
struct LeaseBody {
    id: Uuid,
    run_lease: i64,
}

async fn heartbeat<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(agent): Authenticated,
    Json(req): Json<HeartbeatRequest>,
) -> Result<Response, ApiError> {
    let leases: Vec<Lease> = req
        .tasks
        .iter()
        .map(|t| Lease {
            id: t.id,
            run_lease: t.run_lease,
        })
        .collect();
    let states = state.dispatcher.heartbeat(&agent, &leases).await?;
    Ok(Json(serde_json::json!({ "tasks": states })).into_response())
}

#[derive(Deserialize)]
struct RunLeaseBody {
    run_lease: i64,
}

#[derive(Deserialize)]
struct ProgressBody {
    run_lease: i64,
    message: String,
}

#[derive(Deserialize)]
struct CompleteBody {
    run_lease: i64,
    #[serde(default)]
    result: serde_json::Value,
    #[serde(default)]
    artifacts: Vec<Artifact>,
    #[serde(default)]
    files: Vec<FileBody>,
}

/// An output file: its content as text or as base64, and how Git should hold it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBody {
    pub path: String,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub content_base64: Option<String>,
    /// `file` (the default), `executable`, or `symlink` (always refused).
    #[serde(default)]
    pub mode: Option<String>,
}

impl FileBody {
    fn into_output(self) -> Result<OutputFile, String> {
        use base64::Engine as _;
        let content = match (self.content, self.content_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| {
                    format!(
                        "output file `{}`: content_base64 is not base64: {e}",
                        self.path
                    )
                })?,
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "output file `{}`: give content or content_base64, not both",
                    self.path
                ));
            }
        };
        let (executable, symlink) = match self.mode.as_deref() {
            None | Some("file") => (false, false),
            Some("executable") => (true, false),
            Some("symlink") => (false, true),
            Some(other) => {
                return Err(format!(
                    "output file `{}`: mode `{other}` is not one of file, executable, symlink",
                    self.path
                ));
            }
        };
        Ok(OutputFile {
            path: self.path,
            content,
            executable,
            symlink,
        })
    }
}

/// Commit a completion's files (if any) and fold where they went into its result.
async fn commit_files<Q: Queue>(
    state: &ApiState<Q>,
    agent: &AgentIdentity,
    completion: &mut Completion,
    files: Vec<FileBody>,
) -> Result<(), ApiError> {
    if files.is_empty() {
        return Ok(());
    }
    let files = files
        .into_iter()
        .map(FileBody::into_output)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::BadRequest)?;
    let Some(results) = &state.results else {
        return Err(ApiError::BadRequest(
            "this controller does not write output files to Git".to_owned(),
        ));
    };
    let committed = results
        .commit(
            agent.name.clone(),
            completion.lease.id,
            completion.lease.run_lease,
            files,
        )
        .await?;
    completion.review = committed.review;
    let result = std::mem::take(&mut completion.result);
    completion.result = match result {
        serde_json::Value::Object(mut map) => {
            map.insert("output".to_owned(), committed.output);
            serde_json::Value::Object(map)
        }
        serde_json::Value::Null => serde_json::json!({ "output": committed.output }),
        other => serde_json::json!({ "value": other, "output": committed.output }),
    };
    Ok(())
}

#[derive(Deserialize)]
struct FailBody {
    run_lease: i64,
    error: String,
    #[serde(default)]
    retryable: bool,
}

#[derive(Deserialize)]
struct QuestionBody {
    run_lease: i64,
    question: String,
}

fn ok() -> Response {
    Json(serde_json::json!({ "ok": true })).into_response()
}

fn answer(result: Result<(), Refusal>) -> Result<Response, ApiError> {
    result.map(|()| ok()).map_err(ApiError::Refused)
}

async fn progress<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(agent): Authenticated,
    Path(id): Path<Uuid>,
    Json(body): Json<ProgressBody>,
) -> Result<Response, ApiError> {
    let lease = Lease {
        id,
        run_lease: body.run_lease,
    };
    answer(
        state
            .dispatcher
            .progress(&agent, lease, &body.message)
            .await?,
    )
}

async fn complete_one<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(agent): Authenticated,
    Path(id): Path<Uuid>,
    Json(body): Json<CompleteBody>,
) -> Result<Response, ApiError> {
    let mut completion = Completion {
        lease: Lease {
            id,
            run_lease: body.run_lease,
        },
        result: body.result,
        artifacts: body.artifacts,
        review: false,
    };
    commit_files(&state, &agent, &mut completion, body.files).await?;
    let mut answers = state.dispatcher.complete(&agent, &[completion]).await?;
    answer(answers.pop().unwrap_or(Err(Refusal::NoTask)))
}

#[derive(Deserialize)]
struct CompleteManyBody {
    tasks: Vec<CompleteManyItem>,
}

#[derive(Deserialize)]
struct CompleteManyItem {
    id: Uuid,
    run_lease: i64,
    #[serde(default)]
    result: serde_json::Value,
    #[serde(default)]
    artifacts: Vec<Artifact>,
    #[serde(default)]
    files: Vec<FileBody>,
}

async fn complete_many<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(agent): Authenticated,
    Json(body): Json<CompleteManyBody>,
) -> Result<Response, ApiError> {
    // Files are committed first, one completion at a time; a completion whose files cannot
    // be committed is answered on its own and left out of the batch.
    let mut answers: Vec<(Uuid, Option<Result<(), String>>)> = Vec::new();
    let mut completions: Vec<Completion> = Vec::new();
    for t in body.tasks {
        let mut completion = Completion {
            lease: Lease {
                id: t.id,
                run_lease: t.run_lease,
            },
            result: t.result,
            artifacts: t.artifacts,
            review: false,
        };
        match commit_files(&state, &agent, &mut completion, t.files).await {
            Ok(()) => {
                answers.push((t.id, None));
                completions.push(completion);
            }
            Err(ApiError::Store(e)) => return Err(ApiError::Store(e)),
            Err(e) => answers.push((t.id, Some(Err(refusal_text(e))))),
        }
    }
    let mut batch = state
        .dispatcher
        .complete(&agent, &completions)
        .await?
        .into_iter();
    let tasks: Vec<serde_json::Value> = answers
        .into_iter()
        .map(|(id, answer)| {
            let answer = answer.unwrap_or_else(|| match batch.next() {
                Some(Ok(())) => Ok(()),
                Some(Err(r)) => Err(r.to_string()),
                None => Err(Refusal::NoTask.to_string()),
            });
            match answer {
                Ok(()) => serde_json::json!({"id": id, "ok": true}),
                Err(error) => serde_json::json!({"id": id, "ok": false, "error": error}),
            }
        })
        .collect();
    Ok(Json(serde_json::json!({ "tasks": tasks })).into_response())
}

fn refusal_text(e: ApiError) -> String {
    match e {
        ApiError::Unauthorized => "unauthorized".to_owned(),
        ApiError::Refused(r) => r.to_string(),
        ApiError::Store(e) => crate::error_chain(&e),
        ApiError::BadRequest(m) | ApiError::Unavailable(m) => m,
    }
}

async fn fail<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(agent): Authenticated,
    Path(id): Path<Uuid>,
    Json(body): Json<FailBody>,
) -> Result<Response, ApiError> {
    let lease = Lease {
        id,
        run_lease: body.run_lease,
    };
    let outcome = state
        .dispatcher
        .fail(&agent, lease, &body.error, body.retryable)
        .await?
        .map_err(ApiError::Refused)?;
    Ok(Json(serde_json::json!({ "ok": true, "outcome": outcome })).into_response())
}

async fn question<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(agent): Authenticated,
    Path(id): Path<Uuid>,
    Json(body): Json<QuestionBody>,
) -> Result<Response, ApiError> {
    let lease = Lease {
        id,
        run_lease: body.run_lease,
    };
    answer(
        state
            .dispatcher
            .question(&agent, lease, &body.question)
            .await?,
    )
}

async fn release<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(agent): Authenticated,
    Path(id): Path<Uuid>,
    Json(body): Json<RunLeaseBody>,
) -> Result<Response, ApiError> {
    let lease = Lease {
        id,
        run_lease: body.run_lease,
    };
    answer(state.dispatcher.release(&agent, lease).await?)
}

/// One model call of the authenticated agent: a `model_usage` row under its name.
async fn model_usage<Q: Queue + UsageLog>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(agent): Authenticated,
    Json(record): Json<agentops_agents::llm::UsageRecord>,
) -> Result<Response, ApiError> {
    let row = match UsageRow::new(&agent.name, &record) {
        Ok(row) => row,
        Err(why) => return Ok(bad_request(format!("invalid model usage: {why}"))),
    };
    state.dispatcher.queue().record_usage(&row).await?;
    Ok(ok())
}
