//! MCP with real processes: `agentops up --no-agents` on Postgres with the example
//! repository and an enrollment secret, and rmcp's own client joining over both transports:
//! stdio (an `agentops mcp` child process) and streamable HTTP (`/mcp` on the controller).
//! The client lists the tools, claims a task, reports progress, completes it with a file, and
//! the file is on the task's result branch in the real Git repository. A wrong secret is
//! refused on both transports and registers nothing. A proposed project lands on its proposal
//! branch; an invalid one is refused with its file, line and column, and reaches no branch.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::*;
use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use serde_json::{Value, json};

const SECRET: &str = "mcp-test-enrollment-secret";
/// Short, so that the test outlives a lease the session must keep alive by heartbeats.
const LEASE: &str = "2s";
const LEASE_TIME: Duration = Duration::from_secs(2);

/// The task the client gets: the only one of the examples that is ready at once for a
/// specialist named `researcher` with the capability `research`.
const PROJECT: &str = "competitor-research";
const TASK: &str = "list-competitors";
const FILE: &str = "research/competitors.md";

type Client = RunningService<rmcp::RoleClient, ClientConfig>;

/// The example repository in a Git repository, a database, and a controller on them with an
/// enrollment secret, ready.
struct Setup {
    controller: Controller,
    db: TestDb,
    repo: GitRepo,
    dir: Option<tempfile::TempDir>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.controller.kill();
        let keep = std::thread::panicking() || std::env::var_os("AGENTOPS_TEST_KEEP").is_some();
        if let Some(dir) = self.dir.take().filter(|_| keep) {
            eprintln!("logs kept in {}", dir.keep().display());
        }
    }
}

impl Setup {
    async fn new() -> Setup {
        let db = TestDb::new(Backend::Postgres).await;
        let repo = GitRepo::new();
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut files = Vec::new();
        for entry in walkdir::WalkDir::new(&examples) {
            let entry = entry.unwrap();
            if entry.file_type().is_file() {
                let path = entry.path().strip_prefix(&examples).unwrap();
                let text = std::fs::read_to_string(entry.path()).unwrap();
                files.push((path.to_str().unwrap().to_owned(), text));
            }
        }
        let changes: Vec<(&str, Option<&str>)> = files
            .iter()
            .map(|(path, text)| (path.as_str(), Some(text.as_str())))
            .collect();
        repo.commit("the examples", &changes);
        let dir = tempfile::Builder::new()
            .prefix("agentops-mcp-")
            .tempdir()
            .unwrap();
        let mut controller = Controller::start_with(
            &db.url,
            repo.path(),
            dir.path(),
            LEASE,
            "500ms",
            &["--agent-secret", SECRET, "--no-status"],
        );
        controller.wait_ready(Duration::from_secs(60)).await;
        Setup {
            controller,
            db,
            repo,
            dir: Some(dir),
        }
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().expect("the test's directory").path()
    }

    /// `agentops mcp` as the client's child process, its log in the test's directory.
    async fn stdio(&self, name: &str, secret: &str) -> Result<Client, String> {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_agentops"));
        clean_env(&mut command);
        command
            .args(["mcp", "--api", &self.controller.url, "--name", name])
            .args(["--type", "specialist", "--capabilities", "research"])
            .env("AGENTOPS_AGENT_SECRET", secret)
            .env("AGENTOPS_LOG", "info");
        let log = std::fs::File::create(self.path().join(format!("{name}.log"))).unwrap();
        let (transport, _) = TokioChildProcess::builder(tokio::process::Command::from(command))
            .stderr(log)
            .spawn()
            .unwrap();
        client_info()
            .serve(transport)
            .await
            .map_err(|e| format!("{e:#}"))
    }

    /// A session on the controller's `/mcp`, the secret as its bearer token.
    async fn http(&self, name: &str, secret: &str) -> Result<Client, String> {
        let url = format!(
            "{}/mcp?name={name}&type=specialist&capabilities=research",
            self.controller.url
        );
        let transport = StreamableHttpClientTransport::from_config(
            StreamableHttpClientTransportConfig::with_uri(url).auth_header(secret),
        );
        client_info()
            .serve(transport)
            .await
            .map_err(|e| format!("{e:#}"))
    }

    async fn lease_owner(&self) -> Option<String> {
        self.db
            .text(&format!(
                "SELECT lease_owner FROM tasks WHERE name = '{TASK}'"
            ))
            .await
    }

    /// The file as committed on `branch` of the controller's repository.
    fn file_on(&self, branch: &str, path: &str) -> Option<String> {
        let repo = git2::Repository::open(self.repo.path()).unwrap();
        let reference = repo.find_reference(&format!("refs/heads/{branch}")).ok()?;
        let tree = reference.peel_to_commit().unwrap().tree().unwrap();
        let entry = tree.get_path(Path::new(path)).ok()?;
        let blob = entry.to_object(&repo).unwrap().peel_to_blob().unwrap();
        Some(String::from_utf8(blob.content().to_vec()).unwrap())
    }

    async fn refusals(&self, reason: &str) -> f64 {
        let body = reqwest::get(format!("{}/metrics", self.controller.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let prefix = format!("agentops_registrations_refused_total{{reason=\"{reason}\"}} ");
        body.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

fn client_info() -> ClientConfig {
    ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("agentops-test", "1.0.0"),
    )
}

/// Calls `tool`; its structured answer, and whether the tool said it failed.
async fn call(client: &Client, tool: &str, arguments: Value) -> (Value, bool) {
    let arguments = arguments.as_object().cloned().unwrap_or_default();
    let result = client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments))
        .await
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let failed = result.is_error == Some(true);
    let answer = match result.structured_content {
        Some(value) => value,
        None => Value::String(
            result
                .content
                .iter()
                .filter_map(|c| c.as_text().map(|t| t.text.clone()))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    };
    (answer, failed)
}

/// What both transports must do: list, claim, keep the lease past its length, progress,
/// complete with a file that lands on the result branch, and refuse a second completion.
async fn claim_and_complete(setup: &Setup, client: &Client, agent: &str) {
    let mut tools: Vec<String> = client
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    tools.sort();
    assert_eq!(
        tools,
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

    let (claimed, failed) = call(client, "claim_task", json!({"wait_seconds": 30})).await;
    assert!(!failed, "{claimed}");
    let task = &claimed["task"];
    assert_eq!(
        (task["project"].as_str(), task["name"].as_str()),
        (Some(PROJECT), Some(TASK)),
        "{claimed}"
    );
    assert_eq!(task["output"]["paths"], json!(["research/"]), "{claimed}");
    assert!(task.get("run_lease").is_none(), "{claimed}");
    let id = task["id"].as_str().unwrap().to_owned();
    assert_eq!(setup.lease_owner().await.as_deref(), Some(agent));
    let run_lease = setup
        .db
        .scalar(&format!(
            "SELECT run_lease FROM tasks WHERE name = '{TASK}'"
        ))
        .await;

    // Twice the lease: only the session's heartbeats keep the task ours meanwhile.
    tokio::time::sleep(LEASE_TIME * 2).await;
    assert_eq!(setup.lease_owner().await.as_deref(), Some(agent));
    assert_eq!(
        setup
            .db
            .scalar(&format!(
                "SELECT run_lease FROM tasks WHERE name = '{TASK}'"
            ))
            .await,
        run_lease,
        "the lease was not given to anyone else"
    );
    let (listed, _) = call(client, "list_tasks", json!({})).await;
    assert_eq!(listed["tasks"][0]["id"], id.as_str(), "{listed}");

    let (progress, failed) = call(
        client,
        "report_progress",
        json!({"task": format!("{PROJECT}/{TASK}"), "message": "found three"}),
    )
    .await;
    assert!(!failed, "{progress}");
    let notes = setup
        .db
        .scalar(&format!(
            "SELECT count(*) FROM task_updates WHERE update_type = 'progress' \
             AND agent_name = '{agent}' AND message = 'found three'"
        ))
        .await;
    assert_eq!(notes, 1);

    let content = format!("# Competitors\n\nFound by {agent}.\n");
    let (completed, failed) = call(
        client,
        "complete_task",
        json!({"task": id, "summary": "listed three",
               "files": [{"path": FILE, "content": content}]}),
    )
    .await;
    assert!(!failed, "{completed}");
    assert_eq!(completed["files"], 1, "{completed}");

    let branch = format!("agentops/{PROJECT}/{TASK}");
    assert_eq!(setup.file_on(&branch, FILE), Some(content));
    assert_eq!(
        setup.file_on(BRANCH, FILE),
        None,
        "not on main before review"
    );
    let status = setup
        .db
        .text(&format!("SELECT status FROM tasks WHERE name = '{TASK}'"))
        .await;
    assert_eq!(status.as_deref(), Some("review"));

    // The session no longer holds it: a second completion is refused by the tool.
    let (again, failed) = call(
        client,
        "complete_task",
        json!({"task": id, "files": [{"path": FILE, "content": "again"}]}),
    )
    .await;
    assert!(failed, "{again}");
    assert!(again.to_string().contains("holds no task"), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_client_claims_and_completes_a_task_with_a_file() {
    let setup = Setup::new().await;
    let client = setup.stdio("researcher", SECRET).await.unwrap();
    claim_and_complete(&setup, &client, "researcher").await;
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_claims_and_completes_a_task_with_a_file() {
    let setup = Setup::new().await;
    let client = setup.http("researcher", SECRET).await.unwrap();
    claim_and_complete(&setup, &client, "researcher").await;
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_enrollment_secret_is_refused_and_registers_nothing() {
    let setup = Setup::new().await;
    let before = setup.refusals("wrong_secret").await;

    let Err(error) = setup.stdio("intruder-stdio", "not-the-secret").await else {
        panic!("the stdio session was not refused");
    };
    assert!(error.contains("enrollment secret"), "{error}");
    let Err(error) = setup.http("intruder-http", "not-the-secret").await else {
        panic!("the HTTP session was not refused");
    };
    assert!(error.contains("enrollment secret"), "{error}");

    let registered = setup
        .db
        .scalar("SELECT count(*) FROM agents WHERE name LIKE 'intruder%'")
        .await;
    assert_eq!(registered, 0, "nothing was registered");
    assert_eq!(setup.refusals("wrong_secret").await, before + 2.0);
    assert_eq!(setup.lease_owner().await, None, "no task was leased");

    // The right secret still works after the refusals.
    let client = setup.http("researcher", SECRET).await.unwrap();
    let (claimed, failed) = call(&client, "claim_task", json!({"wait_seconds": 30})).await;
    assert!(!failed, "{claimed}");
    assert_eq!(claimed["task"]["name"], TASK, "{claimed}");
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_proposes_a_project_and_an_invalid_one_reaches_no_branch() {
    let setup = Setup::new().await;
    let client = setup.http("planner", SECRET).await.unwrap();
    let project = "apiVersion: agentops.dev/v1alpha1\nkind: Project\nmetadata:\n  name: mcp-launch\nspec:\n  title: Launch from MCP\n";
    let task = "apiVersion: agentops.dev/v1alpha1\nkind: Task\nmetadata:\n  name: draft\nspec:\n  title: Draft the post\n  action:\n    prompt: Write the post into posts/launch.md\n  output: {paths: [posts/]}\n";
    let (proposed, failed) = call(
        &client,
        "propose_project",
        json!({"name": "mcp-launch", "title": "New project: Launch from MCP",
               "body": "Asked for in chat.",
               "files": [{"path": "projects/mcp-launch/project.yaml", "content": project},
                         {"path": "projects/mcp-launch/tasks/draft.yaml", "content": task}]}),
    )
    .await;
    assert!(!failed, "{proposed}");
    assert_eq!(
        proposed["branch"], "agentops/proposals/mcp-launch",
        "{proposed}"
    );
    let branch = "agentops/proposals/mcp-launch";
    assert_eq!(
        setup
            .file_on(branch, "projects/mcp-launch/project.yaml")
            .as_deref(),
        Some(project)
    );
    assert_eq!(
        setup
            .file_on(branch, "projects/mcp-launch/tasks/draft.yaml")
            .as_deref(),
        Some(task)
    );
    assert_eq!(
        setup.file_on(BRANCH, "projects/mcp-launch/project.yaml"),
        None,
        "not on main before review"
    );

    // A misspelt field and a path outside the project: both named, nothing committed.
    let bad = project.replace("  title:", "  titel:");
    let (refused, failed) = call(
        &client,
        "propose_project",
        json!({"name": "mcp-broken", "title": "Broken",
               "files": [{"path": "projects/mcp-broken/project.yaml",
                          "content": bad.replace("mcp-launch", "mcp-broken")},
                         {"path": "tools/sneaky.yaml", "content": "x"}]}),
    )
    .await;
    assert!(failed, "{refused}");
    let refused = refused.to_string();
    assert!(refused.contains("tools/sneaky.yaml"), "{refused}");
    let repo = git2::Repository::open(setup.repo.path()).unwrap();
    assert!(
        repo.find_reference("refs/heads/agentops/proposals/mcp-broken")
            .is_err(),
        "a refused proposal made a branch"
    );

    // The path problem refused it before the specs were read; alone, the typo is named with
    // its line and column.
    let (refused, failed) = call(
        &client,
        "propose_project",
        json!({"name": "mcp-broken", "title": "Broken",
               "files": [{"path": "projects/mcp-broken/project.yaml",
                          "content": bad.replace("mcp-launch", "mcp-broken")}]}),
    )
    .await;
    assert!(failed, "{refused}");
    let refused = refused.to_string();
    assert!(
        refused.contains("projects/mcp-broken/project.yaml:6:"),
        "{refused}"
    );
    assert!(
        repo.find_reference("refs/heads/agentops/proposals/mcp-broken")
            .is_err(),
        "a refused proposal made a branch"
    );
    client.cancel().await.unwrap();
}
