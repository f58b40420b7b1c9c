//! Agents' proposals and checkouts: what an agent off the controller does with Git through
//! the controller, which keeps the credentials.
//!
//! `POST /api/v1/proposals` takes the spec files of a project, a tool or a specialist, checks
//! them ([`check_proposal`]: paths inside the kind's own folder, no `..`, absolute paths,
//! `.git/`, `.agentops/` or symlinks, specs valid as `agentops validate` would find them) and
//! commits them on the kind's proposal branch and opens the pull request, as the embedded
//! agents' proposer does. A refused proposal is a 400 naming each problem as
//! `path:line:column: message`, and nothing reaches Git.
//!
//! `GET /api/v1/tasks/{id}/checkout?run_lease=N` answers the tree the task works on as a tar
//! archive, to the agent holding it under that lease only.

use std::sync::Arc;

use agentops_agents::plan::RepoFile;
use agentops_agents::protocol::{
    CHECKOUT_COMMIT_HEADER, CheckoutQuery, ProposalKind, ProposalRefused, ProposalRequest,
    ProposalResponse,
};
use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use crate::embedded::ProposeError;
use crate::store::queue::Queue;
use crate::telemetry::{ApiRefused, InternalEvent};
use crate::writeback::paths::{PathError, check_path};

use super::{ApiError, ApiState, Authenticated, Limited, wire};

/// The folder of the specs' root a proposal of `kind` and `name` may write.
pub fn area(kind: ProposalKind, name: &str) -> String {
    match kind {
        ProposalKind::Project => format!("projects/{name}"),
        ProposalKind::Tool => "tools".to_owned(),
        ProposalKind::Agent => "agents".to_owned(),
    }
}

/// The spec file a proposal of `kind` and `name` must have.
fn main_file(kind: ProposalKind, name: &str) -> String {
    match kind {
        ProposalKind::Project => format!("projects/{name}/project.yaml"),
        ProposalKind::Tool => format!("tools/{name}.yaml"),
        ProposalKind::Agent => format!("agents/{name}.yaml"),
    }
}

/// The files to commit, or every problem of the proposal. `taken` are the projects at the
/// followed branch's head, which a project proposal may not reuse.
pub fn check_proposal(
    request: &ProposalRequest,
    taken: &[String],
) -> Result<Vec<RepoFile>, Vec<String>> {
    let mut problems = Vec::new();
    if let Err(why) = agentops_specs::names::check_dns_label(&request.name) {
        problems.push(format!("name `{}`: {why}", request.name));
        return Err(problems);
    }
    if request.title.trim().is_empty() {
        problems.push("title: give the proposal a title".to_owned());
    }
    let main = main_file(request.kind, &request.name);
    if request.kind == ProposalKind::Project && taken.contains(&request.name) {
        problems.push(format!(
            "{main}:1:1: project `{}` already exists; choose another name",
            request.name
        ));
    }
    let allowed = [area(request.kind, &request.name)];
    let mut files: Vec<RepoFile> = Vec::new();
    for (index, file) in request.files.iter().enumerate() {
        let file = match wire::output_file(file.clone()) {
            Ok(file) => file,
            Err(why) => {
                problems.push(why);
                continue;
            }
        };
        let refused = if let Err(e) = check_path(index, &file.path, &allowed) {
            Some(e)
        } else if file.symlink {
            Some(PathError::Symlink {
                path: file.path.clone(),
            })
        } else if files.iter().any(|f| f.path == file.path) {
            Some(PathError::Duplicate {
                path: file.path.clone(),
            })
        } else {
            None
        };
        if let Some(e) = refused {
            problems.push(e.to_string());
            continue;
        }
        match String::from_utf8(file.content) {
            Ok(content) => files.push(RepoFile {
                path: file.path,
                content,
            }),
            Err(_) => problems.push(format!("{}: a proposal's files are UTF-8 text", file.path)),
        }
    }
    if !files.iter().any(|f| f.path == main) {
        problems.push(format!(
            "{main}: missing; a {} proposal of `{}` needs it",
            request.kind.as_str(),
            request.name
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let diagnostics = agentops_agents::plan::check_files(&files);
    if !diagnostics.is_empty() {
        return Err(diagnostics.iter().map(ToString::to_string).collect());
    }
    Ok(files)
}

fn refused(agent: &str, error: String, problems: Vec<String>) -> Response {
    ApiRefused {
        reason: "proposal_invalid",
        agent: Some(agent),
        detail: &problems.join("; "),
    }
    .emit();
    (
        StatusCode::BAD_REQUEST,
        Json(ProposalRefused { error, problems }),
    )
        .into_response()
}

fn no_git() -> ApiError {
    ApiError::Unavailable("this controller does not write to Git".to_owned())
}

pub(super) async fn propose<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Limited(agent): Limited,
    body: Result<Json<ProposalRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = match body {
        Ok(Json(request)) => request,
        Err(JsonRejection::JsonDataError(e)) => {
            let why = e.body_text();
            return Ok(refused(
                &agent.name,
                "invalid proposal".to_owned(),
                vec![why],
            ));
        }
        Err(rejection) => return Ok(rejection.into_response()),
    };
    let Some(proposer) = &state.proposer else {
        return Err(no_git());
    };
    let proposed = match proposer.propose_checked(&request).await {
        Ok(proposed) => proposed,
        Err(ProposeError::Refused(problems)) => {
            let error = format!(
                "the {} proposal `{}` was refused; nothing was committed",
                request.kind.as_str(),
                request.name
            );
            return Ok(refused(&agent.name, error, problems));
        }
        Err(ProposeError::Agent(e)) => return Err(unavailable("committing the proposal", &e)),
    };
    tracing::info!(agent = %agent.name, branch = %proposed.branch, "proposal put up: {}", proposed.describe());
    Ok(Json(ProposalResponse {
        branch: proposed.branch,
        commit: proposed.commit,
        pull_request: proposed.pull_request.map(|pr| pr.url),
    })
    .into_response())
}

pub(super) fn unavailable(doing: &str, error: &(dyn std::error::Error + 'static)) -> ApiError {
    let id = super::error_id();
    tracing::error!(error_id = %id, error = %crate::error_chain(error), "{doing} failed");
    ApiError::Unavailable(format!("{doing} failed; retry later (error id {id})"))
}

pub(super) async fn checkout<Q: Queue>(
    State(state): State<Arc<ApiState<Q>>>,
    Authenticated(agent): Authenticated,
    Path(id): Path<Uuid>,
    query: Result<Query<CheckoutQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::BadRequest(format!("checkout: {}", e.body_text())))?;
    let Some(results) = &state.results else {
        return Err(no_git());
    };
    let (commit, archive) = results
        .checkout(agent.name.clone(), id, query.run_lease)
        .await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_owned()),
            (
                header::HeaderName::from_static(CHECKOUT_COMMIT_HEADER),
                commit,
            ),
        ],
        archive,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentops_agents::protocol::OutputFile;

    const PROJECT: &str = "apiVersion: agentops.dev/v1alpha1\nkind: Project\nmetadata:\n  name: web\nspec:\n  title: Web\n";

    fn request(kind: ProposalKind, name: &str, files: Vec<OutputFile>) -> ProposalRequest {
        ProposalRequest {
            kind,
            name: name.to_owned(),
            title: "New".to_owned(),
            body: String::new(),
            files,
        }
    }

    fn problems(request: &ProposalRequest) -> String {
        check_proposal(request, &["taken".to_owned()])
            .expect_err("refused")
            .join("\n")
    }

    #[test]
    fn a_valid_project_passes_and_paths_outside_its_folder_do_not() {
        let good = request(
            ProposalKind::Project,
            "web",
            vec![OutputFile::text("projects/web/project.yaml", PROJECT)],
        );
        let files = check_proposal(&good, &[]).expect("valid");
        assert_eq!(files[0].path, "projects/web/project.yaml");
        let cases = [
            ("projects/web/../../x.yaml", "`..` is refused"),
            ("/etc/passwd", "absolute paths are refused"),
            ("projects/web/.git/config", "inside `.git`"),
            ("tools/x.yaml", "outside the task's output.paths"),
            ("projects/other/project.yaml", "outside"),
        ];
        for (path, expected) in cases {
            let mut bad = good.clone();
            bad.files.push(OutputFile::text(path, "x"));
            let found = problems(&bad);
            assert!(found.contains(expected), "{path}: {found}");
        }
        let mut link = good.clone();
        link.files.push(OutputFile {
            mode: Some("symlink".to_owned()),
            ..OutputFile::text("projects/web/l", "/etc")
        });
        assert!(problems(&link).contains("symlinks are refused"));
    }

    #[test]
    fn the_controllers_folder_is_refused_and_so_are_invalid_specs() {
        let dot = request(
            ProposalKind::Tool,
            "t",
            vec![OutputFile::text(".agentops/status.yaml", "x")],
        );
        assert!(problems(&dot).contains("`.agentops/` belongs to the controller"));
        let invalid = request(
            ProposalKind::Project,
            "web",
            vec![OutputFile::text(
                "projects/web/project.yaml",
                "apiVersion: agentops.dev/v1alpha1\nkind: Project\nmetadata:\n  name: web\nspec:\n  colour: red\n",
            )],
        );
        let found = problems(&invalid);
        assert!(
            found.starts_with("projects/web/project.yaml:") && found.contains(":6:"),
            "path:line:column: {found}"
        );
        let taken = request(
            ProposalKind::Project,
            "taken",
            vec![OutputFile::text(
                "projects/taken/project.yaml",
                PROJECT.replace("web", "taken"),
            )],
        );
        assert!(problems(&taken).contains("already exists"));
        let missing = request(
            ProposalKind::Agent,
            "lawyer",
            vec![OutputFile::text("agents/other.yaml", "x")],
        );
        assert!(problems(&missing).contains("agents/lawyer.yaml: missing"));
        let bad_name = request(ProposalKind::Tool, "../x", vec![]);
        assert!(problems(&bad_name).starts_with("name `../x`"));
    }
}
