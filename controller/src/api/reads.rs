//! What agents read besides their tasks: a tool's command (`GET /api/v1/tools/{name}`), the
//! projects at the followed branch's head (`GET /api/v1/projects`), and an `Agent` spec to run
//! (`GET /api/v1/agents/{name}/spec`, with the enrollment secret, before registering), and,
//! for the Seed, the work no agent can take (`GET /api/v1/specialists/gaps`).

use std::sync::Arc;

use agentops_agents::protocol::{AgentSpecAnswer, ProjectsAnswer, SpecialistGaps, ToolAnswer};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;

use crate::store::StoreError;
use crate::store::queue::Queue;
use crate::store::tools::ToolRegistry;

use super::{ApiError, ApiState, Authenticated, Peer, bearer};

/// The tools table and the work no agent can take, as the API serves them.
pub trait Tools: Send + Sync + 'static {
    /// The command of the live tool `name`, counting a use.
    fn use_tool(&self, name: String)
    -> BoxFuture<'static, Result<Option<Vec<String>>, StoreError>>;

    /// Pending specialist work no registered agent has the capabilities for.
    fn specialist_gaps(&self) -> BoxFuture<'static, Result<SpecialistGaps, StoreError>>;
}

impl<S: ToolRegistry + Clone> Tools for S {
    fn use_tool(
        &self,
        name: String,
    ) -> BoxFuture<'static, Result<Option<Vec<String>>, StoreError>> {
        let store = self.clone();
        Box::pin(async move { ToolRegistry::use_tool(&store, &name).await })
    }

    fn specialist_gaps(&self) -> BoxFuture<'static, Result<SpecialistGaps, StoreError>> {
        let store = self.clone();
        Box::pin(async move {
            let (tasks, agents) = store.capability_needs().await?;
            Ok(crate::embedded::specialist_gaps(&tasks, &agents))
        })
    }
}

fn not_found(message: String) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(agentops_agents::protocol::ErrorBody { error: message }),
    )
        .into_response()
}

pub(super) async fn tool<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(_agent): Authenticated,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let Some(tools) = &state.tools else {
        return Ok(not_found("this controller keeps no tools".to_owned()));
    };
    match tools.use_tool(name.clone()).await? {
        Some(command) => Ok(Json(ToolAnswer { name, command }).into_response()),
        None => Ok(not_found(format!("no tool `{name}`"))),
    }
}

/// The Seed's look for work no agent can take, which it drafts specialists for. Only a
/// `seed` agent asks: what others could learn from it (every agent's name) is not theirs.
pub(super) async fn specialist_gaps<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(agent): Authenticated,
) -> Result<Response, ApiError> {
    if agent.agent_type != "seed" {
        return Err(ApiError::Forbidden {
            agent: agent.name,
            message: format!(
                "only a seed agent drafts specialists; this agent is a {}",
                agent.agent_type
            ),
        });
    }
    let Some(tools) = &state.tools else {
        return Ok(Json(SpecialistGaps::default()).into_response());
    };
    Ok(Json(tools.specialist_gaps().await?).into_response())
}

pub(super) async fn projects<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(_agent): Authenticated,
) -> Result<Response, ApiError> {
    let Some(proposer) = &state.proposer else {
        return Err(ApiError::Unavailable(
            "this controller does not read Git".to_owned(),
        ));
    };
    let source = proposer.source.clone();
    let projects = tokio::task::spawn_blocking(move || crate::embedded::taken_projects(&source))
        .await
        .map_err(|e| super::proposals::unavailable("reading the projects", &e))?
        .map_err(|e| super::proposals::unavailable("reading the projects", &e))?;
    Ok(Json(ProjectsAnswer { projects }).into_response())
}

/// An `Agent` spec, to whoever may register under its name and type.
pub(super) async fn agent_spec<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let Some(proposer) = &state.proposer else {
        return Err(ApiError::Unavailable(
            "this controller does not read Git".to_owned(),
        ));
    };
    let source = proposer.source.clone();
    let found = tokio::task::spawn_blocking(move || crate::embedded::specialists(&source))
        .await
        .map_err(|e| super::proposals::unavailable("reading the agent specs", &e))?
        .map_err(|e| super::proposals::unavailable("reading the agent specs", &e))?;
    let Some(spec) = found.into_iter().find(|s| s.config.name == name) else {
        return Ok(not_found(format!(
            "no Agent spec `{name}` at the followed branch's head"
        )));
    };
    let agent_type = spec.config.agent_type;
    if let Err(refused) = state
        .enrollment
        .check(peer, bearer(&headers), &name, agent_type.as_str())
    {
        return Ok(super::registration_refused(refused));
    }
    Ok(Json(AgentSpecAnswer {
        name,
        agent_type,
        capabilities: spec.config.capabilities,
        concurrency: u32::try_from(spec.config.concurrency).unwrap_or(1),
        models: spec.models,
        instructions: spec.instructions,
    })
    .into_response())
}
