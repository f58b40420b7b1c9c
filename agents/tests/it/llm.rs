//! The LLM client and the model-backed provider against an OpenAI-compatible fake server
//! (`common/fake_llm.rs`): the request on the wire, fallback to the next model on 429, 5xx,
//! timeouts and garbage, final refusals, usage records, the shared rate limiter (in memory and
//! in the real Redis), and plans and drafts checked against the specs and sent back once when
//! invalid.

#[path = "common/fake_llm.rs"]
mod fake_llm;

use std::sync::Arc;
use std::time::Duration;

use agentops_agents::drafts::{AgentNeed, ToolNeed};
use agentops_agents::llm::{
    Caller, Format, LlmClient, LlmConfig, LlmError, MemoryRateLimiter, MemoryUsage, Message,
    RateLimit, RateLimiter, RedisRateLimiter, UsageRecord,
};
use agentops_agents::plan::check_files;
use agentops_agents::prompt::{PromptError, PromptWork, execute};
use agentops_agents::provider::{AnyProvider, LlmProvider, PlanRequest, Provider, ProviderError};
use fake_llm::{FakeLlm, KEY, Reply, answer};
use serde_json::json;
use tokio::time::Instant;

const A: &str = "meta-llama/llama-3.3-70b-instruct";
const B: &str = "openai/gpt-4o-mini";
const C: &str = "anthropic/claude-3.5-sonnet";

fn config(fake: &FakeLlm) -> LlmConfig {
    LlmConfig {
        base_url: fake.base_url.clone(),
        backoff: Duration::from_millis(20),
        timeout: Duration::from_secs(5),
        ..LlmConfig::new(KEY)
    }
}

fn client(config: LlmConfig) -> LlmClient {
    LlmClient::new(config, Arc::new(MemoryRateLimiter::default())).unwrap()
}

fn caller(usage: &MemoryUsage) -> Caller<'_> {
    Caller {
        agent: "cos",
        task_id: Some("5b1e0000-0000-4000-8000-000000000001"),
        usage,
    }
}

fn messages() -> Vec<Message> {
    vec![
        Message::system("You plan."),
        Message::user("Plan a website."),
    ]
}

#[tokio::test]
async fn a_call_sends_an_openai_request_and_records_its_usage() {
    let fake = FakeLlm::start(vec![
        answer("hello"),
        Reply::Answer {
            content: "priced".to_owned(),
            prompt_tokens: 100,
            completion_tokens: 10,
            cost: Some(0.0042),
        },
    ])
    .await;
    let llm = client(config(&fake));
    let usage = MemoryUsage::default();

    let reply = llm
        .chat(&caller(&usage), &messages(), Format::Json)
        .await
        .unwrap();
    assert_eq!(reply.content, "hello");
    assert_eq!(reply.model, A, "the first model is tried first");
    assert_eq!(
        (reply.prompt_tokens, reply.completion_tokens),
        (Some(12), Some(34))
    );

    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].model, A);
    assert_eq!(
        seen[0].messages,
        [
            ("system".to_owned(), "You plan.".to_owned()),
            ("user".to_owned(), "Plan a website.".to_owned())
        ]
    );
    assert_eq!(
        seen[0].body["response_format"],
        json!({"type": "json_object"})
    );
    assert_eq!(seen[0].body["temperature"], json!(0.0));

    let records = usage.records();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(
        (
            record.agent.as_str(),
            record.model.as_str(),
            record.provider.as_str()
        ),
        ("cos", A, "meta-llama")
    );
    assert_eq!(record.task_id.as_deref(), caller(&usage).task_id);
    assert_eq!(
        (
            record.prompt_tokens,
            record.completion_tokens,
            record.total_tokens
        ),
        (Some(12), Some(34), Some(46))
    );
    let expected = (12.0 * 0.59 + 34.0 * 0.79) / 1_000_000.0;
    assert!(
        (record.estimated_cost_usd.unwrap() - expected).abs() < 1e-12,
        "{record:?}"
    );
    assert!(record.success);
    assert_eq!(record.error, None);

    // A text request has no response_format, and a cost the provider reports wins.
    let reply = llm
        .chat(&caller(&usage), &messages(), Format::Text)
        .await
        .unwrap();
    assert_eq!(reply.content, "priced");
    assert!(fake.seen()[1].body.get("response_format").is_none());
    assert_eq!(usage.records()[1].estimated_cost_usd, Some(0.0042));
}

#[tokio::test]
async fn falls_over_to_the_next_model_on_429_and_on_500_with_backoff() {
    let fake = FakeLlm::start(vec![
        Reply::Status(429, "rate limited upstream"),
        Reply::Status(500, "internal error"),
        answer("from the third"),
    ])
    .await;
    let llm = client(config(&fake));
    let usage = MemoryUsage::default();
    let started = Instant::now();
    let reply = llm
        .chat(&caller(&usage), &messages(), Format::Text)
        .await
        .unwrap();
    assert_eq!(reply.content, "from the third");
    assert_eq!(reply.model, C);
    assert_eq!(fake.models(), [A, B, C]);
    // 20 ms before the second model, 40 ms before the third.
    assert!(
        started.elapsed() >= Duration::from_millis(60),
        "{:?}",
        started.elapsed()
    );

    let records = usage.records();
    let outcome: Vec<(&str, bool)> = records
        .iter()
        .map(|r| (r.model.as_str(), r.success))
        .collect();
    assert_eq!(outcome, [(A, false), (B, false), (C, true)]);
    assert!(
        records[0].error.as_deref().unwrap().contains("429"),
        "{records:?}"
    );
    assert!(
        records[0]
            .error
            .as_deref()
            .unwrap()
            .contains("rate limited upstream")
    );
    assert!(records[1].error.as_deref().unwrap().contains("500"));
    assert_eq!(records[0].prompt_tokens, None);
}

#[tokio::test]
async fn a_timeout_or_a_garbled_answer_falls_over_too() {
    let fake = FakeLlm::start(vec![
        Reply::Slow(Duration::from_secs(3)),
        Reply::Garbage,
        answer("finally"),
    ])
    .await;
    let llm = client(LlmConfig {
        timeout: Duration::from_millis(300),
        ..config(&fake)
    });
    let usage = MemoryUsage::default();
    let reply = llm
        .chat(&caller(&usage), &messages(), Format::Text)
        .await
        .unwrap();
    assert_eq!(
        (reply.content.as_str(), reply.model.as_str()),
        ("finally", C)
    );
    let errors: Vec<String> = usage
        .records()
        .iter()
        .filter_map(|r| r.error.clone())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("no answer within 300ms"), "{errors:?}");
    assert!(errors[1].contains("not a chat completion"), "{errors:?}");
}

#[tokio::test]
async fn a_refusal_other_than_429_or_5xx_is_final() {
    let fake = FakeLlm::start(vec![Reply::Status(401, "invalid key")]).await;
    let llm = client(config(&fake));
    let usage = MemoryUsage::default();
    let error = llm
        .chat(&caller(&usage), &messages(), Format::Text)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, LlmError::Refused { status: 401, model, .. } if model == A),
        "{error}"
    );
    assert!(error.to_string().contains("invalid key"), "{error}");
    assert!(!error.is_transient());
    assert_eq!(
        fake.models(),
        [A],
        "the next model would be refused the same"
    );
    assert_eq!(usage.records().len(), 1);
}

#[tokio::test]
async fn when_every_model_fails_the_error_names_each() {
    let fake = FakeLlm::start(vec![
        Reply::Status(503, "down"),
        Reply::Status(502, "bad gateway"),
    ])
    .await;
    let llm = client(LlmConfig {
        models: vec![A.to_owned(), B.to_owned()],
        ..config(&fake)
    });
    let usage = MemoryUsage::default();
    let error = llm
        .chat(&caller(&usage), &messages(), Format::Text)
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(text.contains(&format!("{A}: HTTP 503: down")), "{text}");
    assert!(
        text.contains(&format!("{B}: HTTP 502: bad gateway")),
        "{text}"
    );
    assert!(error.is_transient());
}

#[tokio::test]
async fn the_rate_limit_is_shared_and_counted_per_provider() {
    let fake = FakeLlm::start(vec![answer("one"), answer("two"), answer("three")]).await;
    let limiter: Arc<dyn RateLimiter> = Arc::new(MemoryRateLimiter::default());
    let limited = |rate_wait| LlmConfig {
        models: vec![A.to_owned(), B.to_owned()],
        rate_limit: Some(RateLimit {
            requests: 1,
            per: Duration::from_millis(400),
        }),
        rate_wait,
        ..config(&fake)
    };
    // Two agents' clients, one limiter.
    let first = LlmClient::new(limited(Duration::from_secs(5)), limiter.clone()).unwrap();
    let second = LlmClient::new(limited(Duration::from_secs(5)), limiter.clone()).unwrap();
    let usage = MemoryUsage::default();
    let started = Instant::now();
    first
        .chat(&caller(&usage), &messages(), Format::Text)
        .await
        .unwrap();
    let reply = second
        .chat(&caller(&usage), &messages(), Format::Text)
        .await
        .unwrap();
    assert_eq!(reply.model, A, "waited for the provider's next window");
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "{:?}",
        started.elapsed()
    );

    // A call that cannot wait for A's provider goes to B's, which has its own budget.
    let impatient = LlmClient::new(limited(Duration::from_millis(50)), limiter).unwrap();
    let reply = impatient
        .chat(&caller(&usage), &messages(), Format::Text)
        .await
        .unwrap();
    assert_eq!(reply.model, B);
    assert_eq!(fake.models(), [A, A, B]);
}

fn redis_url() -> String {
    std::env::var("AGENTOPS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

#[tokio::test]
async fn the_redis_rate_limiter_shares_one_window_across_clients() {
    let key = format!("llm:test-{}", rand_suffix());
    let limit = RateLimit {
        requests: 3,
        per: Duration::from_millis(700),
    };
    // Two connections stand for two agent processes.
    let one = RedisRateLimiter::connect(&redis_url(), Duration::from_secs(2)).unwrap();
    let two = RedisRateLimiter::connect(&redis_url(), Duration::from_secs(2)).unwrap();
    let mut taken = Vec::new();
    for limiter in [&one, &two, &one, &two, &one] {
        taken.push(limiter.try_acquire(&key, limit).await.unwrap());
    }
    assert_eq!(taken, [true, true, true, false, false]);
    let other = format!("{key}-other");
    assert!(
        two.try_acquire(&other, limit).await.unwrap(),
        "keys are apart"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(two.try_acquire(&key, limit).await.unwrap(), "a new window");

    // An unreachable Redis is an error the client can carry on from, not a hang.
    let gone =
        RedisRateLimiter::connect("redis://127.0.0.1:1", Duration::from_millis(300)).unwrap();
    let started = Instant::now();
    assert!(gone.try_acquire(&key, limit).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(3));
}

fn rand_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn provider(fake: &FakeLlm) -> LlmProvider {
    LlmProvider::new(client(config(fake)))
}

fn plan_json(task_name: &str, depends_on: &str) -> String {
    json!({
        "project": {"name": "website", "title": "Launch the website", "priority": "high"},
        "tasks": [
            {"name": "draft-copy", "title": "Draft the copy", "instructions": "Write site/copy.md",
             "outputPaths": ["site/"], "acceptanceCriteria": ["site/copy.md exists"]},
            {"name": task_name, "title": "Build the page", "instructions": "Build site/index.html",
             "dependsOn": [depends_on], "outputPaths": ["site/"]}
        ]
    })
    .to_string()
}

fn request() -> PlanRequest {
    PlanRequest {
        request: "Launch a website with copy and a page.".to_owned(),
        project: None,
        taken: vec!["existing".to_owned()],
    }
}

#[tokio::test]
async fn an_invalid_plan_is_sent_back_once_with_its_problems() {
    let invalid = plan_json("Build Page", "missing-task");
    let fake = FakeLlm::start(vec![
        answer(invalid.clone()),
        answer(format!(
            "```json\n{}\n```",
            plan_json("build-page", "draft-copy")
        )),
    ])
    .await;
    let usage = MemoryUsage::default();
    let proposal = provider(&fake)
        .plan(&caller(&usage), &request())
        .await
        .unwrap();
    assert_eq!(proposal.name(), "website");
    assert_eq!(proposal.title(), "Launch the website");
    let paths: Vec<&str> = proposal.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "projects/website/project.yaml",
            "projects/website/tasks/draft-copy.yaml",
            "projects/website/tasks/build-page.yaml"
        ]
    );
    assert!(check_files(&proposal.files).is_empty());
    assert_eq!(proposal.plan.tasks[1].spec.depends_on, ["draft-copy"]);

    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[0].messages[1]
            .1
            .contains("Launch a website with copy and a page.")
    );
    assert!(seen[0].messages[1].1.contains("taken: existing"));
    // The correction carries the model's answer and the validator's own words.
    let correction = &seen[1].messages;
    assert_eq!(correction.len(), 4);
    assert_eq!(correction[2], ("assistant".to_owned(), invalid));
    assert_eq!(correction[3].0, "user");
    assert!(
        correction[3].1.contains("Build Page"),
        "{}",
        correction[3].1
    );
    assert!(
        correction[3].1.contains("projects/website/tasks/"),
        "{}",
        correction[3].1
    );
    assert_eq!(usage.records().len(), 2, "both calls are accounted");
}

#[tokio::test]
async fn an_answer_that_is_not_json_is_sent_back_too() {
    let fake = FakeLlm::start(vec![
        answer("Sure! Here is a plan: first research, then build."),
        answer(plan_json("build-page", "draft-copy")),
    ])
    .await;
    let usage = MemoryUsage::default();
    let proposal = provider(&fake)
        .plan(&caller(&usage), &request())
        .await
        .unwrap();
    assert_eq!(proposal.plan.tasks.len(), 2);
    assert!(fake.seen()[1].messages[3].1.contains("not the JSON object"));
}

#[tokio::test]
async fn a_plan_still_invalid_after_the_correction_fails_with_the_problems() {
    let fake = FakeLlm::start(vec![
        answer(plan_json("build-page", "missing-task")),
        answer(plan_json("build-page", "still-missing")),
    ])
    .await;
    let usage = MemoryUsage::default();
    let error = provider(&fake)
        .plan(&caller(&usage), &request())
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.starts_with("the model's plan is still invalid after one correction"),
        "{text}"
    );
    assert!(
        text.contains("projects/website/tasks/build-page.yaml:")
            && text.contains("`still-missing`"),
        "{text}"
    );
    assert!(!error.is_retryable());
    assert_eq!(fake.seen().len(), 2, "asked exactly once more");
}

#[tokio::test]
async fn the_persons_project_name_wins_and_a_taken_one_is_refused_before_asking() {
    let fake = FakeLlm::start(vec![answer(plan_json("build-page", "draft-copy"))]).await;
    let usage = MemoryUsage::default();
    let mut named = request();
    named.project = Some("my-site".to_owned());
    let proposal = provider(&fake).plan(&caller(&usage), &named).await.unwrap();
    assert_eq!(proposal.name(), "my-site");
    assert!(
        proposal.files[1]
            .path
            .starts_with("projects/my-site/tasks/")
    );
    assert!(fake.seen()[0].messages[1].1.contains("`my-site`"));

    named.project = Some("existing".to_owned());
    let error = provider(&fake)
        .plan(&caller(&usage), &named)
        .await
        .unwrap_err();
    assert!(matches!(error, ProviderError::Taken(_)), "{error}");
    assert_eq!(fake.seen().len(), 1);
}

fn work() -> PromptWork {
    PromptWork {
        project: "website".to_owned(),
        task: "draft-copy".to_owned(),
        title: "Draft the copy".to_owned(),
        description: "Friendly tone.".to_owned(),
        prompt: "Write the landing page copy into site/copy.md".to_owned(),
        acceptance_criteria: vec!["site/copy.md exists".to_owned()],
        output_paths: vec!["site/".to_owned()],
        instructions: Some("You are a copywriter for small businesses.".to_owned()),
        review_comments: Some("Too long; keep it under 300 words.".to_owned()),
    }
}

#[tokio::test]
async fn a_prompt_task_writes_only_within_its_output_paths() {
    let outside = json!({"summary": "done", "files": [
        {"path": "site/copy.md", "content": "Hi"},
        {"path": ".github/workflows/x.yml", "content": "evil"}
    ]});
    let inside = json!({"summary": "Wrote the copy.", "files": [
        {"path": "site/copy.md", "content": "# Welcome\n"}
    ]});
    let fake = FakeLlm::start(vec![
        answer(outside.to_string()),
        answer(inside.to_string()),
    ])
    .await;
    let usage = MemoryUsage::default();
    let worktree = tempfile::tempdir().unwrap();
    let result = execute(&provider(&fake), &caller(&usage), &work(), worktree.path())
        .await
        .unwrap();
    assert_eq!(result.paths, ["site/copy.md"]);
    assert_eq!(result.summary, "Wrote the copy.");
    assert_eq!(
        std::fs::read_to_string(worktree.path().join("site/copy.md")).unwrap(),
        "# Welcome\n"
    );
    assert!(!worktree.path().join(".github").exists());
    let seen = fake.seen();
    assert!(seen[0].messages[1].1.contains("Output paths: site/"));
    // The specialist's instructions are part of the system prompt, and the review that
    // rejected the last attempt part of the request.
    assert!(
        seen[0].messages[0]
            .1
            .ends_with("Your own instructions:\nYou are a copywriter for small businesses."),
        "{:?}",
        seen[0].messages[0]
    );
    assert!(
        seen[0].messages[1].1.contains(
            "rejected it. Address their review this time:\nToo long; keep it under 300 words."
        ),
        "{:?}",
        seen[0].messages[1]
    );
    assert!(seen[1].messages[3].1.contains(".github/workflows/x.yml"));

    // Twice outside: nothing is written, and the error says where and what was allowed.
    let fake = FakeLlm::start(vec![
        answer(outside.to_string()),
        answer(outside.to_string()),
    ])
    .await;
    let worktree = tempfile::tempdir().unwrap();
    let error = execute(&provider(&fake), &caller(&usage), &work(), worktree.path())
        .await
        .unwrap_err();
    assert!(
        matches!(error, PromptError::Provider(ProviderError::Invalid { .. })),
        "{error}"
    );
    assert!(
        error.to_string().contains(".github/workflows/x.yml"),
        "{error}"
    );
    assert_eq!(std::fs::read_dir(worktree.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn without_a_key_the_same_calls_work_offline() {
    let offline = AnyProvider::new(None, Arc::new(MemoryRateLimiter::default())).unwrap();
    assert!(offline.describe().starts_with("offline"));
    let usage = MemoryUsage::default();
    let worktree = tempfile::tempdir().unwrap();
    let result = execute(&offline, &caller(&usage), &work(), worktree.path())
        .await
        .unwrap();
    assert_eq!(result.paths, ["site/copy.md"]);
    let text = std::fs::read_to_string(worktree.path().join("site/copy.md")).unwrap();
    assert!(text.contains("produced offline"), "{text}");
    assert!(text.contains("- [ ] site/copy.md exists"), "{text}");

    let proposal = offline.plan(&caller(&usage), &request()).await.unwrap();
    assert!(check_files(&proposal.files).is_empty());
    assert!(usage.records().is_empty(), "no model was called");

    let online = AnyProvider::new(
        Some(LlmConfig::new(KEY)),
        Arc::new(MemoryRateLimiter::default()),
    )
    .unwrap();
    assert!(
        online.describe().contains("openrouter.ai"),
        "{}",
        online.describe()
    );
}

#[tokio::test]
async fn drafted_tools_and_specialists_validate_or_are_sent_back() {
    let fake = FakeLlm::start(vec![
        answer(
            json!({"description": "Fetch a page", "interpreter": "python3",
                      "script": "import sys\nprint(sys.argv[1])"})
            .to_string(),
        ),
        answer(json!({"name": "copywriter", "instructions": "Write copy."}).to_string()),
        answer(json!({"name": "legal-writer", "instructions": "Write contracts."}).to_string()),
    ])
    .await;
    let usage = MemoryUsage::default();
    let llm = provider(&fake);
    let tool = llm
        .draft_tool(
            &caller(&usage),
            &ToolNeed {
                name: "web-scrape".to_owned(),
                arguments: vec!["url".to_owned()],
                task_title: "Collect pricing".to_owned(),
                task_description: "Fetch the pricing pages.".to_owned(),
                created_by: "seed".to_owned(),
            },
        )
        .await
        .unwrap();
    assert_eq!(tool.files[0].path, "tools/web-scrape.yaml");
    assert!(tool.files[0].content.contains("tools/web-scrape.py"));
    assert_eq!(tool.files[1].content, "import sys\nprint(sys.argv[1])\n");
    assert!(check_files(&tool.files).is_empty());
    assert!(
        fake.seen()[0].messages[1]
            .1
            .contains("Arguments, in order: url")
    );

    let agent = llm
        .draft_agent(
            &caller(&usage),
            &AgentNeed {
                capabilities: vec!["legal".to_owned(), "writing".to_owned()],
                task_title: "Draft the contract".to_owned(),
                task_description: String::new(),
                taken: vec!["copywriter".to_owned()],
                models: vec![B.to_owned()],
            },
        )
        .await
        .unwrap();
    assert_eq!(agent.name, "legal-writer");
    assert!(agent.files[0].content.contains("legal"));
    assert!(agent.files[0].content.contains(B));
    assert!(fake.seen()[2].messages[3].1.contains("already exists"));
    assert_eq!(fake.left(), 0);
}

#[test]
fn usage_records_round_trip_as_the_endpoint_reads_them() {
    let record = UsageRecord {
        agent: "seed".to_owned(),
        model: B.to_owned(),
        provider: "openai".to_owned(),
        task_id: None,
        prompt_tokens: Some(1),
        completion_tokens: Some(2),
        total_tokens: Some(3),
        estimated_cost_usd: Some(0.5),
        latency_ms: 7,
        success: true,
        error: None,
    };
    let text = serde_json::to_string(&record).unwrap();
    assert!(
        !text.contains("task_id") && !text.contains("error"),
        "{text}"
    );
    assert_eq!(serde_json::from_str::<UsageRecord>(&text).unwrap(), record);
}
