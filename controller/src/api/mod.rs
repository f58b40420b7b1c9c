//! The HTTP interface: health, metrics, the agent protocol under `/api/v1`
//! (`agents/PROTOCOL.md` is its contract), MCP at `/mcp` ([`mcp`]), and the GitHub webhook.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentops_agents::protocol::{
    Ack, ClaimRequest, ClaimResponse, CompleteAnswer, CompleteManyRequest, CompleteManyResponse,
    CompleteRequest, ErrorBody, FailRequest, FailResponse, HeartbeatRequest, HeartbeatResponse,
    OutputFile, ProgressRequest, QuestionRequest, RegisterRequest, RegisterResponse,
    ReleaseRequest, UsageRecord,
};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use uuid::Uuid;

use crate::dispatch::Dispatcher;
use crate::store::StoreError;
use crate::store::queue::{AgentIdentity, Completion, Lease, Queue, Refusal};
use crate::store::usage::{UsageLog, UsageRow};
use crate::writeback::{ResultError, Results};

pub mod enroll;
mod hooks;
pub mod limits;
pub mod mcp;
pub mod proposals;
pub mod reads;
mod wire;

pub use enroll::Enrollment;
pub use hooks::Hooks;
pub use limits::Limits;

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
    /// Body sizes, rates, the number of agents.
    pub limits: Limits,
    /// Commits proposals and reads the followed branch; without it both answer 503.
    pub proposer: Option<crate::embedded::Proposer>,
    /// Tools' commands for agents that run them.
    pub tools: Option<Arc<dyn reads::Tools>>,
    /// With `--kube`: checks the ServiceAccount tokens agents may register with.
    pub token_reviewer: Option<enroll::TokenReviewer>,
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
        ApiState::build(ApiParts {
            results,
            hooks,
            ..ApiParts::new(dispatcher)
        })
    }

    pub fn build(parts: ApiParts<Q>) -> Arc<ApiState<Q>> {
        let ApiParts {
            dispatcher,
            results,
            hooks,
            enrollment,
            limits,
            proposer,
            tools,
            token_reviewer,
        } = parts;
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
            limits,
            proposer,
            tools,
            token_reviewer,
        })
    }
}

/// What an [`ApiState`] is built from.
pub struct ApiParts<Q> {
    pub dispatcher: Arc<Dispatcher<Q>>,
    pub results: Option<Arc<dyn Results>>,
    pub hooks: Option<Hooks>,
    pub enrollment: Enrollment,
    pub limits: Limits,
    pub proposer: Option<crate::embedded::Proposer>,
    pub tools: Option<Arc<dyn reads::Tools>>,
    pub token_reviewer: Option<enroll::TokenReviewer>,
}

impl<Q> ApiParts<Q> {
    /// Dispatch alone: no Git, loopback enrollment, no limits.
    pub fn new(dispatcher: Arc<Dispatcher<Q>>) -> ApiParts<Q> {
        ApiParts {
            dispatcher,
            results: None,
            hooks: None,
            enrollment: Enrollment::default(),
            limits: Limits::none(),
            proposer: None,
            tools: None,
            token_reviewer: None,
        }
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

pub fn router<Q: Queue + UsageLog>(state: Arc<ApiState<Q>>) -> Router {
    use limits::{COMPLETE_BODY, HEARTBEAT_BODY, REGISTER_BODY, SMALL_BODY, body_limit as max};
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz::<Q>))
        .route("/metrics", get(metrics::<Q>))
        .route(
            "/api/v1/agents/register",
            max(post(register::<Q>), REGISTER_BODY),
        )
        .route("/api/v1/claim", max(post(claim::<Q>), SMALL_BODY))
        .route(
            "/api/v1/heartbeat",
            max(post(heartbeat::<Q>), HEARTBEAT_BODY),
        )
        .route(
            "/api/v1/complete",
            max(post(complete_many::<Q>), COMPLETE_BODY),
        )
        .route(
            "/api/v1/tasks/{id}/progress",
            max(post(progress::<Q>), SMALL_BODY),
        )
        .route(
            "/api/v1/tasks/{id}/complete",
            max(post(complete_one::<Q>), COMPLETE_BODY),
        )
        .route("/api/v1/tasks/{id}/fail", max(post(fail::<Q>), SMALL_BODY))
        .route(
            "/api/v1/tasks/{id}/question",
            max(post(question::<Q>), SMALL_BODY),
        )
        .route(
            "/api/v1/tasks/{id}/release",
            max(post(release::<Q>), SMALL_BODY),
        )
        .route(
            "/api/v1/model-usage",
            max(post(model_usage::<Q>), SMALL_BODY),
        )
        .route(
            "/api/v1/proposals",
            max(post(proposals::propose::<Q>), limits::PROPOSAL_BODY),
        )
        .route("/api/v1/tasks/{id}/checkout", get(proposals::checkout::<Q>))
        .route("/api/v1/tools/{name}", get(reads::tool::<Q>))
        .route("/api/v1/projects", get(reads::projects::<Q>))
        .route("/api/v1/specialists/gaps", get(reads::specialist_gaps::<Q>))
        .route("/api/v1/agents/{name}/spec", get(reads::agent_spec::<Q>))
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
    /// The agent may not do this whatever it sends (403).
    Forbidden {
        agent: String,
        message: String,
    },
    /// The agent is over its rate of claims and reports (429).
    RateLimited {
        agent: String,
        wait: Duration,
    },
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
            ResultError::Checkout(e) => {
                let id = error_id();
                tracing::error!(error_id = %id, error = %crate::error_chain(&e), "a checkout failed");
                ApiError::Unavailable(format!(
                    "checking out the task failed; retry later (error id {id})"
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
        use crate::telemetry::{ApiRefused, InternalEvent};
        let refused = |reason, detail| {
            ApiRefused {
                reason,
                agent: None,
                detail,
            }
            .emit()
        };
        let (status, message) = match self {
            ApiError::Unauthorized => {
                refused("unauthorized", "missing or unknown agent token");
                (
                    StatusCode::UNAUTHORIZED,
                    "missing or unknown agent token".to_owned(),
                )
            }
            ApiError::RateLimited { agent, wait } => return limits::rate_limited(&agent, wait),
            ApiError::Refused(Refusal::NoTask) => {
                (StatusCode::NOT_FOUND, Refusal::NoTask.to_string())
            }
            ApiError::Refused(r @ Refusal::NotHeld) => {
                refused("not_held", "a task the agent does not hold");
                (StatusCode::CONFLICT, r.to_string())
            }
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
            ApiError::Forbidden { agent, message } => {
                ApiRefused {
                    reason: "forbidden",
                    agent: Some(&agent),
                    detail: &message,
                }
                .emit();
                (StatusCode::FORBIDDEN, message)
            }
            ApiError::BadRequest(message) => (StatusCode::BAD_REQUEST, message),
            ApiError::Unavailable(message) => (StatusCode::SERVICE_UNAVAILABLE, message),
        };
        (status, Json(ErrorBody { error: message })).into_response()
    }
}

/// An opaque id that ties an internal error's answer to its log line.
fn error_id() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// The agent a request's bearer token belongs to.
pub struct Authenticated(pub AgentIdentity);

/// An authenticated claim or report: one of the agent's rate.
pub struct Limited(pub AgentIdentity);

impl<Q: Queue> FromRequestParts<Arc<ApiState<Q>>> for Limited {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState<Q>>,
    ) -> Result<Self, Self::Rejection> {
        let Authenticated(agent) = Authenticated::from_request_parts(parts, state).await?;
        match state.limits.take(&agent.name) {
            Ok(()) => Ok(Limited(agent)),
            Err(wait) => Err(ApiError::RateLimited {
                agent: agent.name,
                wait,
            }),
        }
    }
}

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

async fn register<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Peer(peer): Peer,
    headers: axum::http::HeaderMap,
    body: Result<Json<RegisterRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    // An unknown agent type is the likely mistake here, and the decoder's message names it.
    let req = match body {
        Ok(Json(req)) => req,
        Err(JsonRejection::JsonDataError(e)) => {
            return Ok(bad_request(format!(
                "invalid registration: {}",
                e.body_text()
            )));
        }
        Err(rejection) => return Ok(rejection.into_response()),
    };
    if let Err(why) = agentops_specs::names::check_dns_label(&req.name) {
        return Ok(bad_request(format!(
            "invalid agent name `{}`: {why}",
            req.name
        )));
    }
    let mut verdict =
        state
            .enrollment
            .check(peer, bearer(&headers), &req.name, req.agent_type.as_str());
    // A bearer that is no secret may be a ServiceAccount's token: the API server says.
    if verdict == Err(enroll::Refused::WrongSecret)
        && state.enrollment.reviews_tokens()
        && let (Some(reviewer), Some(token)) = (&state.token_reviewer, bearer(&headers))
    {
        verdict = match reviewer.review(token).await {
            Ok(reviewed) => state.enrollment.admit_reviewed(&reviewed),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), name = %req.name, "a TokenReview failed");
                Err(enroll::Refused::ReviewFailed)
            }
        };
    }
    if let Err(refused) = verdict {
        use crate::telemetry::InternalEvent;
        crate::telemetry::RegistrationRefused {
            refused,
            name: &req.name,
            peer,
        }
        .emit();
        return Ok(registration_refused(refused));
    }
    let secret = bearer(&headers);
    // A live agent's name is given only to the holder of its token, or back to the
    // controller's own agents.
    let holder = match &req.token {
        Some(token) => state.dispatcher.holds(token, &req.name).await?,
        None => false,
    };
    if !holder
        && !state.enrollment.is_internal(secret)
        && let Some(seen) = state.dispatcher.holder_seen(&req.name).await?
    {
        use crate::telemetry::InternalEvent;
        let refused = enroll::Refused::NameHeld;
        crate::telemetry::RegistrationRefused {
            refused,
            name: &req.name,
            peer,
        }
        .emit();
        let ttl = chrono::Duration::from_std(state.dispatcher.presence_ttl()).unwrap_or_default();
        let free_after = (seen + ttl - chrono::Utc::now())
            .to_std()
            .unwrap_or_default();
        return Ok((
            StatusCode::CONFLICT,
            Json(agentops_agents::protocol::NameHeld {
                error: format!(
                    "{} (last heartbeat {})",
                    refused.message(),
                    seen.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                ),
                agent: req.name.clone(),
                last_heartbeat: seen,
                free_after_seconds: free_after.as_secs_f64(),
            }),
        )
            .into_response());
    }
    if let Some(max) = state.limits.max_agents
        && state.dispatcher.registered_agents(&req.name).await? >= max
    {
        use crate::telemetry::InternalEvent;
        crate::telemetry::RegistrationRefused {
            refused: enroll::Refused::TooManyAgents,
            name: &req.name,
            peer,
        }
        .emit();
        return Ok(registration_refused(enroll::Refused::TooManyAgents));
    }
    let agent = AgentIdentity {
        name: req.name,
        agent_type: req.agent_type.as_str().to_owned(),
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

fn registration_refused(refused: enroll::Refused) -> Response {
    use enroll::Refused;
    let status = match refused {
        Refused::NoSecret | Refused::WrongSecret => StatusCode::UNAUTHORIZED,
        Refused::NotLoopback | Refused::TypeNotAllowed | Refused::AccountNotAllowed => {
            StatusCode::FORBIDDEN
        }
        Refused::ReviewFailed => StatusCode::SERVICE_UNAVAILABLE,
        Refused::NameHeld => StatusCode::CONFLICT,
        Refused::TooManyAgents => StatusCode::TOO_MANY_REQUESTS,
    };
    let mut body =
        serde_json::json!({ "error": refused.message(), "reason": refused.metric_label() });
    if refused == Refused::TooManyAgents {
        body["limit"] = serde_json::json!("agents");
    }
    (status, Json(body)).into_response()
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(ErrorBody { error: message })).into_response()
}

async fn claim<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Limited(agent): Limited,
    Json(req): Json<ClaimRequest>,
) -> Result<Response, ApiError> {
    let max = req.max.clamp(1, 1_000);
    let tasks = state
        .dispatcher
        .claim(&agent, max, Duration::from_millis(req.wait_ms))
        .await?;
    let tasks = tasks.into_iter().map(Into::into).collect();
    Ok(Json(ClaimResponse { tasks }).into_response())
}

async fn heartbeat<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(agent): Authenticated,
    Json(req): Json<HeartbeatRequest>,
) -> Result<Response, ApiError> {
    let leases = req
        .tasks
        .iter()
        .map(|t| {
            Ok(Lease {
                id: wire::task_id(&t.id)?,
                run_lease: t.run_lease,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let states = state.dispatcher.heartbeat(&agent, &leases).await?;
    let tasks = states.into_iter().map(Into::into).collect();
    Ok(Json(HeartbeatResponse { tasks }).into_response())
}

/// Commit a completion's files (if any) and fold where they went into its result.
async fn commit_files<Q: Queue>(
    state: &ApiState<Q>,
    agent: &AgentIdentity,
    completion: &mut Completion,
    files: Vec<OutputFile>,
) -> Result<(), ApiError> {
    if files.is_empty() {
        return Ok(());
    }
    let files = files
        .into_iter()
        .map(wire::output_file)
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

fn ok() -> Response {
    Json(Ack::OK).into_response()
}

fn answer(result: Result<(), Refusal>) -> Result<Response, ApiError> {
    result.map(|()| ok()).map_err(ApiError::Refused)
}

async fn progress<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Limited(agent): Limited,
    Path(id): Path<Uuid>,
    Json(body): Json<ProgressRequest>,
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
    Limited(agent): Limited,
    Path(id): Path<Uuid>,
    Json(body): Json<CompleteRequest>,
) -> Result<Response, ApiError> {
    let mut completion = Completion {
        lease: Lease {
            id,
            run_lease: body.run_lease,
        },
        result: body.result,
        artifacts: body.artifacts.into_iter().map(Into::into).collect(),
        review: false,
    };
    commit_files(&state, &agent, &mut completion, body.files).await?;
    let mut answers = state.dispatcher.complete(&agent, &[completion]).await?;
    answer(answers.pop().unwrap_or(Err(Refusal::NoTask)))
}

async fn complete_many<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Limited(agent): Limited,
    Json(body): Json<CompleteManyRequest>,
) -> Result<Response, ApiError> {
    // Files are committed first, one completion at a time; a completion whose files cannot
    // be committed is answered on its own and left out of the batch.
    let mut answers: Vec<(Uuid, Option<Result<(), String>>)> = Vec::new();
    let mut completions: Vec<Completion> = Vec::new();
    let ids = body
        .tasks
        .iter()
        .map(|t| wire::task_id(&t.id))
        .collect::<Result<Vec<_>, _>>()?;
    for (t, id) in body.tasks.into_iter().zip(ids) {
        let mut completion = Completion {
            lease: Lease {
                id,
                run_lease: t.run_lease,
            },
            result: t.result,
            artifacts: t.artifacts.into_iter().map(Into::into).collect(),
            review: false,
        };
        match commit_files(&state, &agent, &mut completion, t.files).await {
            Ok(()) => {
                answers.push((id, None));
                completions.push(completion);
            }
            Err(ApiError::Store(e)) => return Err(ApiError::Store(e)),
            Err(e) => answers.push((id, Some(Err(refusal_text(e))))),
        }
    }
    let mut batch = state
        .dispatcher
        .complete(&agent, &completions)
        .await?
        .into_iter();
    let tasks = answers
        .into_iter()
        .map(|(id, answer)| {
            let answer = answer.unwrap_or_else(|| match batch.next() {
                Some(Ok(())) => Ok(()),
                Some(Err(r)) => Err(r.to_string()),
                None => Err(Refusal::NoTask.to_string()),
            });
            CompleteAnswer {
                id: id.to_string(),
                ok: answer.is_ok(),
                error: answer.err(),
            }
        })
        .collect();
    Ok(Json(CompleteManyResponse { tasks }).into_response())
}

fn refusal_text(e: ApiError) -> String {
    match e {
        ApiError::Unauthorized => "unauthorized".to_owned(),
        ApiError::Refused(r) => r.to_string(),
        ApiError::Store(e) => {
            // As for a whole request's 500: the chain goes to the log, the agent gets its id.
            let id = error_id();
            tracing::error!(error_id = %id, reason = e.metric_label(), error = %crate::error_chain(&e), "a completion in a batch failed");
            format!("internal error (error id {id})")
        }
        ApiError::BadRequest(m) | ApiError::Unavailable(m) => m,
        ApiError::Forbidden { message, .. } => message,
        ApiError::RateLimited { .. } => "over the agent's rate".to_owned(),
    }
}

async fn fail<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Limited(agent): Limited,
    Path(id): Path<Uuid>,
    Json(body): Json<FailRequest>,
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
    Ok(Json(FailResponse {
        ok: true,
        outcome: outcome.into(),
    })
    .into_response())
}

async fn question<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Limited(agent): Limited,
    Path(id): Path<Uuid>,
    Json(body): Json<QuestionRequest>,
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
    Limited(agent): Limited,
    Path(id): Path<Uuid>,
    Json(body): Json<ReleaseRequest>,
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
    Json(record): Json<UsageRecord>,
) -> Result<Response, ApiError> {
    let row = match UsageRow::new(&agent.name, &record) {
        Ok(row) => row,
        Err(why) => return Ok(bad_request(format!("invalid model usage: {why}"))),
    };
    state.dispatcher.queue().record_usage(&row).await?;
    Ok(ok())
}
