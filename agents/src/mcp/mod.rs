//! The MCP server: any MCP client (Claude Code, Cursor, …) joins agentops as an agent.
//!
//! Each MCP session registers as one agent of the protocol (`agents/PROTOCOL.md`) under the
//! same enrollment as any other, heartbeats while it lives, and its tools are protocol
//! operations on the tasks it claimed: `list_tasks`, `claim_task`, `report_progress`,
//! `complete_task` (with files the controller commits), `fail_task`, `ask_question`, and
//! `propose_project` (spec files the controller checks, commits and puts up for review). The
//! controller checks leases and fencing tokens as for every agent; the session keeps the
//! tokens, so the model names a task and never handles one.
//!
//! Two transports serve the same [`McpAgent`]: stdio ([`serve_stdio`], the `agentops mcp`
//! command, a process of its own that reaches the controller over HTTP) and streamable HTTP
//! ([`http_service`], which the controller mounts at `/mcp` and which reaches the controller
//! over loopback HTTP).

mod join;
mod session;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, InitializeRequestParams, InitializeResult,
    ProtocolVersion, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::protocol::{Assignment, FailOutcome, OutputFile, ProposalKind, ProposalRequest};
pub use join::McpConfig;
use join::{HttpRequest, Joining};
use session::{Session, TaskError};

/// How long `claim_task` waits for a task when the model does not say.
const DEFAULT_CLAIM_WAIT: Duration = Duration::from_secs(10);

/// A completion's files may be large; the rest of MCP stays small.
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

/// An HTTP session closes after this long without a request.
const HTTP_SESSION_IDLE: Duration = Duration::from_secs(30 * 60);

const INSTRUCTIONS: &str = "You are an agent of agentops. Call claim_task to take a task (it \
    waits for one), do what its action and description ask, and end it with exactly one of \
    complete_task (with the files it produced, inside the task's output.paths), fail_task, or \
    ask_question (when a person must decide). report_progress records a note meanwhile. The \
    lease on a claimed task is kept alive for you while this session lasts; list_tasks shows \
    what you hold. propose_project puts a new project up for a person's review.";

#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("the MCP session over stdio failed to start")]
    Start(#[source] Box<rmcp::service::ServerInitializeError>),
    #[error("the MCP session over stdio ended with an error")]
    Serve(#[source] tokio::task::JoinError),
}

/// The MCP server of one session.
pub struct McpAgent {
    config: Arc<McpConfig>,
    /// Served over HTTP: the query and bearer token of the request that opened the session
    /// decide the registration, and later requests must present the same bearer.
    http: bool,
    session: OnceLock<Arc<Session>>,
    bearer: OnceLock<Option<String>>,
    tool_router: ToolRouter<McpAgent>,
}

impl McpAgent {
    fn new(config: Arc<McpConfig>, http: bool) -> McpAgent {
        McpAgent {
            config,
            http,
            session: OnceLock::new(),
            bearer: OnceLock::new(),
            tool_router: McpAgent::tool_router(),
        }
    }

    /// The session's agent, once `initialize` registered it; over HTTP only for the bearer
    /// that opened the session.
    fn session(&self, context: &RequestContext<RoleServer>) -> Result<&Arc<Session>, ErrorData> {
        let session = self
            .session
            .get()
            .ok_or_else(|| ErrorData::invalid_request("the session is not initialized", None))?;
        if self.http && self.bearer.get() != Some(&http_request(context).bearer) {
            return Err(ErrorData::invalid_request(
                "this request's bearer token is not the one that opened the session",
                None,
            ));
        }
        Ok(session)
    }
}

impl Drop for McpAgent {
    /// An HTTP session's server is dropped when the session ends: its tasks go back.
    fn drop(&mut self) {
        if let Some(session) = self.session.get().cloned()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move { session.close().await });
        }
    }
}

fn http_request(context: &RequestContext<RoleServer>) -> HttpRequest {
    match context.extensions.get::<http::request::Parts>() {
        Some(parts) => HttpRequest {
            query: parts.uri.query().map(str::to_owned),
            bearer: join::bearer(
                parts
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok()),
            ),
        },
        None => HttpRequest::default(),
    }
}

/// `{"wait_seconds": 10}`
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct ClaimArgs {
    /// How long to wait for a task when none is ready, in seconds: 0 to 60, 10 when left out.
    #[serde(default)]
    pub wait_seconds: Option<f64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ProgressArgs {
    /// The task: its id, or `project/name`.
    pub task: String,
    /// What was done so far.
    pub message: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CompleteArgs {
    /// The task: its id, or `project/name`.
    pub task: String,
    /// One line on what was done; stored in the task's result.
    #[serde(default)]
    pub summary: Option<String>,
    /// More of the result, as a JSON object.
    #[serde(default)]
    pub result: Option<serde_json::Map<String, serde_json::Value>>,
    /// The files the task produced, which the controller commits to Git (on the task's
    /// result branch for review, or on the followed branch with `output.mode: commit`).
    /// Paths are relative to the repository root and must lie within the task's
    /// `output.paths`.
    #[serde(default)]
    pub files: Vec<FileArg>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileArg {
    /// Relative to the repository root, e.g. `site/copy.md`.
    pub path: String,
    /// The content as text…
    #[serde(default)]
    pub content: Option<String>,
    /// …or as base64, for bytes that are not text.
    #[serde(default)]
    pub content_base64: Option<String>,
    /// Commit it executable.
    #[serde(default)]
    pub executable: bool,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct FailArgs {
    /// The task: its id, or `project/name`.
    pub task: String,
    /// What went wrong.
    pub error: String,
    /// Whether another attempt may succeed: the task is then retried (until its retries are
    /// spent); otherwise it fails.
    #[serde(default)]
    pub retryable: bool,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct QuestionArgs {
    /// The task: its id, or `project/name`.
    pub task: String,
    /// The question for a person; the task waits (blocked) for the answer.
    pub question: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ProposeProjectArgs {
    /// The project's name, a DNS label (`web-launch`); its files go in `projects/<name>/`.
    pub name: String,
    /// The pull request's title.
    pub title: String,
    /// Why the project: the pull request's description.
    #[serde(default)]
    pub body: String,
    /// The project's spec files, relative to the specs' root: `projects/<name>/project.yaml`
    /// (kind `Project`) and its tasks (`projects/<name>/tasks/*.yaml`, kind `Task`).
    pub files: Vec<FileArg>,
}

/// The files of `complete_task` as the protocol takes them; each needs exactly one of
/// `content` and `content_base64`.
fn output_files(files: Vec<FileArg>) -> Result<Vec<OutputFile>, String> {
    files
        .into_iter()
        .map(|file| {
            let mut out = match (file.content, file.content_base64) {
                (Some(text), None) => OutputFile::text(file.path, text),
                (None, Some(base64)) => OutputFile {
                    path: file.path,
                    content: None,
                    content_base64: Some(base64),
                    mode: None,
                },
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "file {}: give content or content_base64, not both",
                        file.path
                    ));
                }
                (None, None) => {
                    return Err(format!(
                        "file {}: content or content_base64 is missing",
                        file.path
                    ));
                }
            };
            if file.executable {
                out = out.executable();
            }
            Ok(out)
        })
        .collect()
}

/// The task's `result`: the object given, with `summary` in it when there is one.
fn completion_result(
    summary: Option<String>,
    result: Option<serde_json::Map<String, serde_json::Value>>,
) -> serde_json::Value {
    let mut result = result.unwrap_or_default();
    if let Some(summary) = summary {
        result.insert("summary".to_owned(), summary.into());
    }
    serde_json::Value::Object(result)
}

/// A task as the model sees it: the claim's answer without the fencing token, which the
/// session keeps.
fn task_view(task: &Assignment) -> serde_json::Value {
    let mut view = serde_json::to_value(task).unwrap_or_default();
    if let Some(fields) = view.as_object_mut() {
        fields.remove("run_lease");
    }
    view
}

fn refused(error: &TaskError) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(crate::error_chain(error))])
}

fn done(task: &Assignment, fields: serde_json::Value) -> CallToolResult {
    let mut answer =
        serde_json::json!({"task": task.id, "project": task.project, "name": task.name});
    if let (Some(answer), serde_json::Value::Object(fields)) = (answer.as_object_mut(), fields) {
        answer.extend(fields);
    }
    CallToolResult::structured(answer)
}

#[tool_router]
impl McpAgent {
    #[tool(
        description = "The tasks this session holds (claimed and not yet ended), with \
        their action, description, output paths and acceptance criteria."
    )]
    async fn list_tasks(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let session = self.session(&context)?;
        Ok(match session.held().await {
            Ok(tasks) => CallToolResult::structured(serde_json::json!({
                "agent": session.name,
                "tasks": tasks.iter().map(task_view).collect::<Vec<_>>(),
            })),
            Err(e) => refused(&e.into()),
        })
    }

    #[tool(description = "Claim the next task this agent may run, waiting up to \
        wait_seconds (default 10) for one. The task is yours until you complete, fail or ask \
        about it; its lease is renewed for you meanwhile.")]
    async fn claim_task(
        &self,
        Parameters(args): Parameters<ClaimArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let session = self.session(&context)?;
        let wait = match args.wait_seconds {
            None => DEFAULT_CLAIM_WAIT,
            Some(s) => Duration::try_from_secs_f64(s.clamp(0.0, 60.0)).unwrap_or_default(),
        };
        Ok(match session.claim(wait).await {
            Ok(Some(task)) => {
                CallToolResult::structured(serde_json::json!({"task": task_view(&task)}))
            }
            Ok(None) => CallToolResult::structured(serde_json::json!({
                "task": null,
                "message": format!("no task was ready within {wait:?}; claim again later"),
            })),
            Err(e) => refused(&e.into()),
        })
    }

    #[tool(description = "Record a progress note on a task you hold.")]
    async fn report_progress(
        &self,
        Parameters(args): Parameters<ProgressArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let session = self.session(&context)?;
        Ok(match session.progress(&args.task, args.message).await {
            Ok(task) => done(&task, serde_json::json!({"recorded": true})),
            Err(e) => refused(&e),
        })
    }

    #[tool(
        description = "Complete a task you hold, with the files it produced. The \
        controller commits the files (on the task's result branch for review, or on the \
        followed branch when the task's output.mode is commit); their paths must lie within \
        the task's output.paths."
    )]
    async fn complete_task(
        &self,
        Parameters(args): Parameters<CompleteArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let session = self.session(&context)?;
        let files = match output_files(args.files) {
            Ok(files) => files,
            Err(message) => return Ok(CallToolResult::error(vec![ContentBlock::text(message)])),
        };
        let count = files.len();
        let result = completion_result(args.summary, args.result);
        Ok(match session.complete(&args.task, result, files).await {
            Ok(task) => done(
                &task,
                serde_json::json!({"completed": true, "files": count}),
            ),
            Err(e) => refused(&e),
        })
    }

    #[tool(
        description = "Fail a task you hold. With retryable, it is retried later (until \
        its retries are spent); otherwise it fails for good."
    )]
    async fn fail_task(
        &self,
        Parameters(args): Parameters<FailArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let session = self.session(&context)?;
        Ok(
            match session.fail(&args.task, args.error, args.retryable).await {
                Ok((task, outcome)) => {
                    let outcome = match outcome {
                        FailOutcome::Retry => "retry",
                        FailOutcome::Failed => "failed",
                    };
                    done(&task, serde_json::json!({"outcome": outcome}))
                }
                Err(e) => refused(&e),
            },
        )
    }

    #[tool(
        description = "Propose a new project for a person to review: its spec files \
        (projects/<name>/project.yaml and its tasks) are checked as `agentops validate` \
        would, committed on the branch agentops/proposals/<name>, and put up as a pull \
        request. Nothing runs until it is merged. A refusal lists each problem as \
        path:line:column."
    )]
    async fn propose_project(
        &self,
        Parameters(args): Parameters<ProposeProjectArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let session = self.session(&context)?;
        let files = match output_files(args.files) {
            Ok(files) => files,
            Err(message) => return Ok(CallToolResult::error(vec![ContentBlock::text(message)])),
        };
        let request = ProposalRequest {
            kind: ProposalKind::Project,
            name: args.name,
            title: args.title,
            body: args.body,
            files,
        };
        Ok(match session.propose(&request).await {
            Ok(proposed) => CallToolResult::structured(serde_json::json!({
                "project": request.name,
                "branch": proposed.branch,
                "commit": proposed.commit,
                "pull_request": proposed.pull_request,
            })),
            Err(e) => CallToolResult::error(vec![ContentBlock::text(crate::error_chain(&e))]),
        })
    }

    #[tool(
        description = "Ask a person a question about a task you hold. The task waits \
        (blocked) until they answer, and is then dispatched again; this session no longer \
        holds it."
    )]
    async fn ask_question(
        &self,
        Parameters(args): Parameters<QuestionArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let session = self.session(&context)?;
        Ok(match session.question(&args.task, args.question).await {
            Ok(task) => done(&task, serde_json::json!({"blocked": true})),
            Err(e) => refused(&e),
        })
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for McpAgent {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("agentops", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    /// Sessions hold tasks between calls, so only the protocol versions that have sessions.
    fn supported_protocol_versions(&self) -> std::borrow::Cow<'static, [ProtocolVersion]> {
        std::borrow::Cow::Borrowed(ProtocolVersion::known_up_to(
            &ProtocolVersion::LATEST_WITH_INITIALIZE,
        ))
    }

    /// Registers the session's agent; a refusal (a wrong enrollment secret, say) fails the
    /// initialization with the controller's answer.
    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        if self.session.get().is_some() {
            return Err(ErrorData::invalid_request(
                "the session is initialized already",
                None,
            ));
        }
        let http = self.http.then(|| http_request(&context));
        let suffix = if self.http {
            random_suffix()
        } else {
            host_name()
        };
        let joining: Joining = join::joining(
            &self.config,
            &request.client_info.name,
            http.as_ref(),
            &suffix,
        )
        .map_err(|message| ErrorData::invalid_params(message, None))?;
        let name = joining.name.clone();
        let session = Session::join(&self.config.api, joining).await.map_err(|e| {
            tracing::warn!(agent = %name, error = %crate::error_chain(&e), "MCP session refused");
            ErrorData::invalid_request(
                format!("agentops refused to register `{name}`: {}", crate::error_chain(&e)),
                None,
            )
        })?;
        tracing::info!(agent = %name, client = %request.client_info.name, "MCP session joined");
        let _ = self.bearer.set(http.and_then(|h| h.bearer));
        if self.session.set(session).is_err() {
            return Err(ErrorData::invalid_request(
                "the session is initialized already",
                None,
            ));
        }
        context.peer.set_peer_info(request.clone());
        self.negotiate_initialize(&request)
    }
}

/// Eight random hex digits, which tell the HTTP sessions of one client name apart.
fn random_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// This machine's name, which tells the stdio servers of one client name apart.
fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length, which is what we pass.
    let rc = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if rc != 0 {
        return random_suffix();
    }
    let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

/// Serves one MCP session on stdin and stdout until the client closes it or `shutdown`
/// fires, then hands back the tasks still held.
pub async fn serve_stdio(config: McpConfig, shutdown: CancellationToken) -> Result<(), McpError> {
    let agent = McpAgent::new(Arc::new(config), false);
    let running = agent
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| McpError::Start(Box::new(e)))?;
    let session = running.service().session.get().cloned();
    let stop = running.cancellation_token();
    let mut waiting = std::pin::pin!(running.waiting());
    let ended = tokio::select! {
        ended = &mut waiting => ended,
        () = shutdown.cancelled() => {
            stop.cancel();
            waiting.await
        }
    };
    if let Some(session) = session {
        session.close().await;
    }
    ended.map(drop).map_err(McpError::Serve)
}

/// The streamable HTTP service of `/mcp`, each session an agent that reaches the controller
/// at `api`. `hosts_checked`: answer only requests whose `Host` is a loopback name, which
/// keeps web pages from reaching it through DNS rebinding while registration is open to this
/// machine without a secret. Every session ends when `shutdown` fires.
pub fn http_service(
    config: McpConfig,
    hosts_checked: bool,
    shutdown: CancellationToken,
) -> rmcp::transport::StreamableHttpService<
    McpAgent,
    rmcp::transport::streamable_http_server::session::local::LocalSessionManager,
> {
    use rmcp::transport::streamable_http_server::StreamableHttpServerConfig;
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    let config = Arc::new(config);
    let mut server = StreamableHttpServerConfig::default()
        .with_cancellation_token(shutdown)
        .with_max_request_body_bytes(MAX_REQUEST_BYTES);
    if !hosts_checked {
        server = server.disable_allowed_hosts();
    }
    let mut sessions = LocalSessionManager::default();
    sessions.session_config.keep_alive = Some(HTTP_SESSION_IDLE);
    rmcp::transport::StreamableHttpService::new(
        move || Ok(McpAgent::new(config.clone(), true)),
        Arc::new(sessions),
        server,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: Option<&str>, base64: Option<&str>, executable: bool) -> FileArg {
        FileArg {
            path: path.into(),
            content: content.map(str::to_owned),
            content_base64: base64.map(str::to_owned),
            executable,
        }
    }

    #[test]
    fn files_are_text_or_base64_never_both_or_neither() {
        let files = output_files(vec![
            file("site/a.md", Some("# A\n"), None, false),
            file("site/b.bin", None, Some("/wA="), false),
            file("site/run.sh", Some("#!/bin/sh\n"), None, true),
        ])
        .unwrap();
        assert_eq!(
            serde_json::to_value(&files).unwrap(),
            serde_json::json!([
                {"path": "site/a.md", "content": "# A\n"},
                {"path": "site/b.bin", "content_base64": "/wA="},
                {"path": "site/run.sh", "content": "#!/bin/sh\n", "mode": "executable"},
            ])
        );
        let both = output_files(vec![file("site/c", Some("x"), Some("eA=="), false)]).unwrap_err();
        assert!(
            both.contains("site/c") && both.contains("not both"),
            "{both}"
        );
        let neither = output_files(vec![file("site/d", None, None, false)]).unwrap_err();
        assert!(
            neither.contains("site/d") && neither.contains("missing"),
            "{neither}"
        );
    }

    #[test]
    fn the_result_carries_the_summary() {
        let mut more = serde_json::Map::new();
        more.insert("words".into(), 120.into());
        assert_eq!(
            completion_result(Some("wrote it".into()), Some(more)),
            serde_json::json!({"words": 120, "summary": "wrote it"})
        );
        assert_eq!(completion_result(None, None), serde_json::json!({}));
    }

    #[test]
    fn the_model_never_sees_the_fencing_token() {
        let task: Assignment = serde_json::from_value(serde_json::json!({
            "id": "5b1e", "run_lease": 7, "project": "p", "name": "t",
            "action": {"prompt": "write"}, "output": {"paths": ["site/"]}
        }))
        .unwrap();
        let view = task_view(&task);
        assert_eq!(view["id"], "5b1e");
        assert_eq!(view["output"]["paths"][0], "site/");
        assert!(view.get("run_lease").is_none(), "{view}");
    }

    #[test]
    fn every_tool_is_listed() {
        let agent = McpAgent::new(Arc::new(McpConfig::new("http://127.0.0.1:1")), false);
        let mut names: Vec<String> = agent
            .tool_router
            .list_all()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "ask_question",
                "claim_task",
                "complete_task",
                "fail_task",
                "list_tasks",
                "propose_project",
                "report_progress"
            ]
        );
    }
}
