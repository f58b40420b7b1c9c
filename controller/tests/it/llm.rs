//! Model calls accounted in `model_usage` on both backends: through the store sink (agents
//! inside the controller) and through `POST /api/v1/model-usage` (agents elsewhere, on the
//! runtime), against an OpenAI-compatible fake server; and proposals rendered by the agents'
//! building blocks checked by the real `agentops validate`.

use crate::common;

// The agents' fake model API; the agents' tests use all of it, these only the completions.
#[path = "../../../agents/tests/it/common/fake_llm.rs"]
#[allow(dead_code)]
mod fake_llm;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use agentops::api::ApiState;
use agentops::dispatch::{DispatchConfig, Dispatcher};
use agentops::store::queue::Queue;
use agentops::store::usage::{StoreUsageSink, UsageLog};
use agentops_agents::drafts::{AgentNeed, ToolNeed};
use agentops_agents::llm::{
    Caller, Format, LlmClient, LlmConfig, MemoryRateLimiter, Message, NoUsage,
};
use agentops_agents::plan::RepoFile;
use agentops_agents::provider::{AnyProvider, PlanRequest, Provider};
use agentops_agents::runtime::{Agent, AgentConfig, Assignment, Outcome, TaskContext};
use common::*;
use fake_llm::{FakeLlm, KEY, Reply, answer};
use serde_json::json;
use tokio_util::sync::CancellationToken;

both_backends!(
    the_store_sink_writes_a_row_per_call,
    a_remote_agent_posts_its_usage_to_the_controller,
    an_offline_proposal_syncs_into_chained_tasks
);

const A: &str = "meta-llama/llama-3.3-70b-instruct";
const B: &str = "openai/gpt-4o-mini";

fn llm(fake: &FakeLlm) -> LlmClient {
    let config = LlmConfig {
        base_url: fake.base_url.clone(),
        models: vec![A.to_owned(), B.to_owned()],
        backoff: Duration::from_millis(10),
        ..LlmConfig::new(KEY)
    };
    LlmClient::new(config, Arc::new(MemoryRateLimiter::default())).unwrap()
}

/// A repository with one project and one task, synced.
async fn env_with_a_task<S: TestStore>() -> (Env<S>, String) {
    let mut env = Env::<S>::new().await;
    env.commit(
        "a task",
        &[
            ("projects/site/project.yaml", Some(&project("site", "Site"))),
            ("projects/site/tasks/copy.yaml", Some(&task("copy", "Copy"))),
        ],
    );
    env.sync().await;
    let id = env
        .db
        .text("SELECT CAST(id AS text) FROM tasks WHERE name = 'copy'")
        .await
        .expect("the task's id");
    (env, id)
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct UsageRow {
    agent_name: String,
    model_name: String,
    provider: String,
    task_id: Option<String>,
    prompt_tokens: Option<i32>,
    completion_tokens: Option<i32>,
    total_tokens: Option<i32>,
    /// Millionths of a dollar.
    cost_micros: Option<i64>,
    success: Option<String>,
    error: Option<String>,
}

async fn usage_rows(db: &TestDb) -> Vec<UsageRow> {
    let (success, error) = match db.backend {
        Backend::Postgres => ("metadata->>'success'", "metadata->>'error'"),
        Backend::Sqlite => (
            "CASE json_extract(metadata, '$.success') WHEN 1 THEN 'true' WHEN 0 THEN 'false' END",
            "json_extract(metadata, '$.error')",
        ),
    };
    db.rows(&format!(
        "SELECT agent_name, model_name, provider, CAST(task_id AS text) AS task_id, \
         prompt_tokens, completion_tokens, total_tokens, \
         CAST(round(estimated_cost_usd * 1000000) AS bigint) AS cost_micros, \
         {success} AS success, {error} AS error \
         FROM model_usage ORDER BY created_at, model_name"
    ))
    .await
}

async fn the_store_sink_writes_a_row_per_call<S: TestStore + UsageLog + Clone>() {
    let (env, task_id) = env_with_a_task::<S>().await;
    let fake = FakeLlm::start(vec![
        Reply::Status(429, "slow down"),
        answer("hello"),
        Reply::Answer {
            content: "again".to_owned(),
            prompt_tokens: 5,
            completion_tokens: 6,
            cost: Some(0.001234),
        },
    ])
    .await;
    let sink = StoreUsageSink::new(env.syncer.store().clone());
    let client = llm(&fake);
    let messages = [Message::user("Say hello.")];
    let on_task = Caller {
        agent: "seed",
        task_id: Some(&task_id),
        usage: &sink,
    };
    let reply = client
        .chat(&on_task, &messages, Format::Text)
        .await
        .unwrap();
    assert_eq!(reply.content, "hello");
    // A task id that names no task is kept as NULL, not refused.
    let unknown = Caller {
        agent: "cos",
        task_id: Some("00000000-0000-4000-8000-000000000000"),
        usage: &sink,
    };
    client
        .chat(&unknown, &messages, Format::Text)
        .await
        .unwrap();
    assert_eq!(fake.models(), [A, B, A]);

    // Two calls may land in the same millisecond: compare in a fixed order.
    let mut rows = usage_rows(&env.db).await;
    rows.sort_by(|a, b| (&a.agent_name, &a.model_name).cmp(&(&b.agent_name, &b.model_name)));
    // gpt-4o-mini at $0.15 / $0.60 per million: 12 in, 34 out = $0.0000222.
    assert_eq!(
        rows,
        [
            UsageRow {
                agent_name: "cos".to_owned(),
                model_name: A.to_owned(),
                provider: "meta-llama".to_owned(),
                task_id: None,
                prompt_tokens: Some(5),
                completion_tokens: Some(6),
                total_tokens: Some(11),
                cost_micros: Some(1234),
                success: Some("true".to_owned()),
                error: None,
            },
            UsageRow {
                agent_name: "seed".to_owned(),
                model_name: A.to_owned(),
                provider: "meta-llama".to_owned(),
                task_id: Some(task_id.clone()),
                prompt_tokens: None,
                completion_tokens: None,
                total_tokens: None,
                cost_micros: None,
                success: Some("false".to_owned()),
                error: Some("HTTP 429: slow down".to_owned()),
            },
            UsageRow {
                agent_name: "seed".to_owned(),
                model_name: B.to_owned(),
                provider: "openai".to_owned(),
                task_id: Some(task_id.clone()),
                prompt_tokens: Some(12),
                completion_tokens: Some(34),
                total_tokens: Some(46),
                cost_micros: Some(22),
                success: Some("true".to_owned()),
                error: None,
            },
        ]
    );
}

async fn a_remote_agent_posts_its_usage_to_the_controller<
    S: TestStore + Queue + UsageLog + Clone,
>() {
    let (env, task_id) = env_with_a_task::<S>().await;
    let dispatcher = Dispatcher::new(env.syncer.store().clone(), DispatchConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    let state = ApiState::new(dispatcher.clone());
    let server = tokio::spawn(async move {
        agentops::api::serve(
            listener,
            agentops::api::router(state),
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    let _loops = dispatcher.start();
    dispatcher.wake();

    // An agent on the runtime whose handler asks a model, accounting through its context.
    let fake = FakeLlm::start(vec![
        Reply::Status(503, "overloaded"),
        answer("copy written"),
    ])
    .await;
    let client = Arc::new(llm(&fake));
    let handler = move |task: Assignment, ctx: TaskContext| {
        let client = client.clone();
        async move {
            let caller = Caller {
                agent: "writer",
                task_id: Some(&task.id),
                usage: &ctx,
            };
            match client
                .chat(&caller, &[Message::user("Write the copy.")], Format::Text)
                .await
            {
                Ok(reply) => Outcome::complete(json!({"summary": reply.content})),
                Err(e) => Outcome::fail(e.to_string(), false),
            }
        }
    };
    let stop = CancellationToken::new();
    let config = AgentConfig {
        claim_wait: Duration::from_secs(2),
        ..AgentConfig::new(&api, "writer")
    };
    let agent = tokio::spawn(Agent::new(config, handler).run(stop.clone()));
    eventually("the task is completed", Duration::from_secs(20), || async {
        (env.db.task("site", "copy").await.status == "completed").then_some(())
    })
    .await;
    stop.cancel();
    agent.await.unwrap().unwrap();

    let rows = usage_rows(&env.db).await;
    let seen: Vec<(&str, &str, Option<&str>, Option<&str>)> = rows
        .iter()
        .map(|r| {
            (
                r.agent_name.as_str(),
                r.model_name.as_str(),
                r.task_id.as_deref(),
                r.success.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("writer", A, Some(task_id.as_str()), Some("false")),
            ("writer", B, Some(task_id.as_str()), Some("true")),
        ]
    );
    assert_eq!(rows[1].total_tokens, Some(46));

    // The endpoint's own refusals: no token, a bad body, a forged agent name is ignored.
    let http = reqwest::Client::new();
    let url = format!("{api}/api/v1/model-usage");
    let body = json!({"model": B, "provider": "openai", "latency_ms": 5, "success": true});
    let anonymous = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let token = http
        .post(format!("{api}/api/v1/agents/register"))
        .json(&json!({"name": "poster", "type": "seed"}))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let bad = http
        .post(&url)
        .bearer_auth(&token)
        .json(
            &json!({"model": B, "provider": "openai", "latency_ms": 5, "success": true,
                      "task_id": "not-a-uuid"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let message = bad.text().await.unwrap();
    assert!(message.contains("task_id `not-a-uuid`"), "{message}");
    let mut forged = body.clone();
    forged["agent"] = json!("someone-else");
    let good = http
        .post(&url)
        .bearer_auth(&token)
        .json(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), 200);
    assert_eq!(
        env.db
            .scalar("SELECT count(*) FROM model_usage WHERE agent_name = 'poster'")
            .await,
        1
    );
    server.abort();
}

/// Writes `files` under a new directory and runs the real `agentops validate` on it.
fn validate_with_the_binary(files: &[RepoFile]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    for file in files {
        let path = dir.path().join(&file.path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &file.content).unwrap();
    }
    validate_dir(dir.path())
}

fn validate_dir(dir: &Path) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_agentops"))
        .args(["validate", "."])
        .current_dir(dir)
        .env_remove("AGENTOPS_DATABASE_URL")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap(), text)
}

#[tokio::test]
async fn proposals_and_drafts_pass_the_real_validate() {
    let offline = AnyProvider::new(None, Arc::new(MemoryRateLimiter::default())).unwrap();
    let caller = Caller {
        agent: "cos",
        task_id: None,
        usage: &NoUsage,
    };
    let proposal = offline
        .plan(
            &caller,
            &PlanRequest {
                request: "# Launch the website\n- Research competitors\n- Draft the copy: \
                          headline, pitch, \"features\"\n- Build the page"
                    .to_owned(),
                project: None,
                taken: vec![],
            },
        )
        .await
        .unwrap();
    let tool = offline
        .draft_tool(
            &caller,
            &ToolNeed {
                name: "web-scrape".to_owned(),
                arguments: vec!["url".to_owned()],
                task_title: "Collect pricing".to_owned(),
                task_description: String::new(),
                created_by: "seed".to_owned(),
            },
        )
        .await
        .unwrap();
    let agent = offline
        .draft_agent(
            &caller,
            &AgentNeed {
                capabilities: vec!["legal".to_owned()],
                task_title: "Review the terms".to_owned(),
                task_description: String::new(),
                taken: vec![],
                models: vec![],
            },
        )
        .await
        .unwrap();
    let mut files = proposal.files.clone();
    files.extend(tool.files.clone());
    files.extend(agent.files.clone());
    let (code, output) = validate_with_the_binary(&files);
    assert_eq!(code, 0, "{output}");

    // The same check fails on a broken file, so the passing run above means something.
    let mut broken = files.clone();
    let second = broken
        .iter_mut()
        .find(|f| f.content.contains("dependsOn"))
        .expect("a task with a dependency");
    second.content = second.content.replace("dependsOn", "dependsOnn");
    let path = second.path.clone();
    let (code, output) = validate_with_the_binary(&broken);
    assert_eq!(code, 1, "{output}");
    assert!(output.contains(&path), "{output}");
}

async fn an_offline_proposal_syncs_into_chained_tasks<S: TestStore>() {
    let mut env = Env::<S>::new().await;
    env.commit(
        "an existing project",
        &[(
            "projects/launch-website/project.yaml",
            Some(&project("launch-website", "Old")),
        )],
    );
    env.sync().await;
    let offline = AnyProvider::new(None, Arc::new(MemoryRateLimiter::default())).unwrap();
    let caller = Caller {
        agent: "cos",
        task_id: None,
        usage: &NoUsage,
    };
    let request = PlanRequest {
        request: "Launch website. Research competitors. Draft the copy. Build the page.".to_owned(),
        project: None,
        taken: env
            .db
            .projects()
            .await
            .into_iter()
            .map(|p| p.name)
            .collect(),
    };
    let proposal = offline.plan(&caller, &request).await.unwrap();
    assert_eq!(
        proposal.name(),
        "launch-website-2",
        "the taken name is avoided"
    );
    let changes: Vec<(&str, Option<&str>)> = proposal
        .files
        .iter()
        .map(|f| (f.path.as_str(), Some(f.content.as_str())))
        .collect();
    env.commit("the proposal, merged", &changes);
    let report = env.sync().await;
    assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
    let tasks: Vec<(String, String, String)> = env
        .db
        .tasks()
        .await
        .into_iter()
        .filter(|t| t.project == "launch-website-2")
        .map(|t| (t.name, t.status, t.depends_on))
        .collect();
    let names: Vec<&str> = tasks.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        names,
        ["build-the-page", "draft-the-copy", "research-competitors"]
    );
    assert!(tasks.iter().all(|t| t.1 == "pending"), "{tasks:?}");
    assert!(tasks[0].2.contains("draft-the-copy"), "{tasks:?}");
    assert!(tasks[1].2.contains("research-competitors"), "{tasks:?}");
    assert!(!tasks[2].2.contains("draft"), "{tasks:?}");
}
