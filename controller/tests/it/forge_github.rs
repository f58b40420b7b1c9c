//! The GitHub forge against a fake GitHub API served inside the test: every request is
//! recorded (method, path and query, `Authorization`, JSON body) and checked, and answered
//! from a script. Covers opening and reusing pull requests, merged and closed-with-comments
//! pull requests, 422, rate limits (403 and 429), 401, and the review loop on a real store.

use crate::common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentops::forge::github::{GitHub, GitHubConfig};
use agentops::forge::{Forge, ForgeError, Proposal, ReviewRef, ReviewState};
use agentops::store::queue::{AgentIdentity, Completion, Lease, LeasePolicy, Queue};
use agentops::store::writeback::Writeback;
use agentops::writeback::Reviews;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "test-token";
const REPO: &str = "/repos/acme/specs";

#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    auth: Option<String>,
    body: Value,
}

/// One scripted answer: the request it expects (method and path with query) and what to say.
struct Answer {
    method: Method,
    path: String,
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Value,
}

fn answer(method: Method, path: &str, status: u16, body: Value) -> Answer {
    Answer {
        method,
        path: path.to_owned(),
        status,
        headers: Vec::new(),
        body,
    }
}

#[derive(Default)]
struct Script {
    answers: VecDeque<Answer>,
    calls: Vec<Call>,
}

struct Fake {
    url: String,
    script: Arc<Mutex<Script>>,
}

impl Fake {
    async fn start() -> Fake {
        let script = Arc::new(Mutex::new(Script::default()));
        let shared = script.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let script = shared.clone();
                async move { serve(&script, method, uri, headers, body) }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Fake { url, script }
    }

    fn expect(&self, answers: Vec<Answer>) {
        self.script.lock().unwrap().answers.extend(answers);
    }

    fn calls(&self) -> Vec<Call> {
        self.script.lock().unwrap().calls.clone()
    }

    /// Every scripted answer was asked for, each request carried the token, and they came in
    /// this order (method and path).
    fn assert_calls(&self, expected: &[(&str, &str)]) -> Vec<Call> {
        let calls = self.calls();
        let seen: Vec<(String, String)> = calls
            .iter()
            .map(|c| (c.method.to_string(), c.path.clone()))
            .collect();
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        assert_eq!(seen, expected);
        for c in &calls {
            assert_eq!(c.auth.as_deref(), Some("Bearer test-token"), "{c:?}");
        }
        assert!(
            self.script.lock().unwrap().answers.is_empty(),
            "answers left over"
        );
        calls
    }

    fn forge(&self) -> GitHub {
        let mut config = GitHubConfig::new(&self.url, TOKEN, "acme", "specs");
        config.attempts = 3;
        config.max_wait = Duration::from_secs(5);
        config.backoff = Duration::from_millis(10);
        GitHub::new(config).unwrap()
    }
}

fn serve(
    script: &Mutex<Script>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let call = Call {
        method: method.clone(),
        path: path.clone(),
        auth: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let mut script = script.lock().unwrap();
    script.calls.push(call.clone());
    if call.auth.as_deref() != Some("Bearer test-token") {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"message": "Bad credentials"})),
        )
            .into_response();
    }
    let Some(next) = script.answers.pop_front() else {
        return (
            StatusCode::NOT_IMPLEMENTED,
            format!("unexpected {method} {path}"),
        )
            .into_response();
    };
    if next.method != method || next.path != path {
        return (
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "expected {} {}, got {method} {path}",
                next.method, next.path
            ),
        )
            .into_response();
    }
    let mut response = (
        StatusCode::from_u16(next.status).unwrap(),
        axum::Json(next.body),
    )
        .into_response();
    for (name, value) in next.headers {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_str(&value).unwrap());
    }
    response
}

fn proposal() -> Proposal {
    Proposal {
        branch: "agentops/web/draft".to_owned(),
        base: "main".to_owned(),
        title: "web/draft: Draft the copy".to_owned(),
        body: "Output of web/draft.".to_owned(),
    }
}

const LIST: &str = "/repos/acme/specs/pulls?state=open&head=acme:agentops/web/draft";

fn pull(number: u64, state: &str, merged: bool) -> Value {
    json!({"number": number, "state": state, "merged": merged,
        "html_url": format!("https://github.example/acme/specs/pull/{number}")})
}

#[tokio::test]
async fn opens_a_pull_request_when_none_is_open() {
    let fake = Fake::start().await;
    fake.expect(vec![
        answer(Method::GET, LIST, 200, json!([])),
        answer(
            Method::POST,
            &format!("{REPO}/pulls"),
            201,
            pull(12, "open", false),
        ),
    ]);
    let pr = fake.forge().open_pull_request(&proposal()).await.unwrap();
    assert_eq!(pr.number, 12);
    assert_eq!(pr.url, "https://github.example/acme/specs/pull/12");
    let calls = fake.assert_calls(&[("GET", LIST), ("POST", "/repos/acme/specs/pulls")]);
    assert_eq!(
        calls[1].body,
        json!({"title": "web/draft: Draft the copy", "head": "agentops/web/draft",
            "base": "main", "body": "Output of web/draft."})
    );
}

#[tokio::test]
async fn reuses_the_open_pull_request_of_the_branch() {
    let fake = Fake::start().await;
    fake.expect(vec![answer(
        Method::GET,
        LIST,
        200,
        json!([pull(7, "open", false)]),
    )]);
    let pr = fake.forge().propose(&proposal()).await.unwrap().unwrap();
    assert_eq!(pr.number, 7);
    fake.assert_calls(&[("GET", LIST)]);
}

#[tokio::test]
async fn a_422_for_an_existing_pull_request_reuses_it() {
    let fake = Fake::start().await;
    fake.expect(vec![
        answer(Method::GET, LIST, 200, json!([])),
        answer(
            Method::POST,
            &format!("{REPO}/pulls"),
            422,
            json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest",
                "code": "custom", "message": "A pull request already exists for acme:agentops/web/draft."}]}),
        ),
        answer(Method::GET, LIST, 200, json!([pull(9, "open", false)])),
    ]);
    let pr = fake.forge().open_pull_request(&proposal()).await.unwrap();
    assert_eq!(pr.number, 9);
    fake.assert_calls(&[
        ("GET", LIST),
        ("POST", "/repos/acme/specs/pulls"),
        ("GET", LIST),
    ]);
}

#[tokio::test]
async fn other_422s_are_clear_errors() {
    let fake = Fake::start().await;
    fake.expect(vec![
        answer(Method::GET, LIST, 200, json!([])),
        answer(
            Method::POST,
            &format!("{REPO}/pulls"),
            422,
            json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest",
                "code": "custom", "message": "No commits between main and agentops/web/draft"}]}),
        ),
    ]);
    let error = fake
        .forge()
        .open_pull_request(&proposal())
        .await
        .unwrap_err();
    assert!(
        matches!(error, ForgeError::Unprocessable { .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(text.contains("422"), "{text}");
    assert!(
        text.contains("No commits between main and agentops/web/draft"),
        "{text}"
    );
    assert!(
        text.contains("opening a pull request for agentops/web/draft"),
        "{text}"
    );
    fake.assert_calls(&[("GET", LIST), ("POST", "/repos/acme/specs/pulls")]);
}

#[tokio::test]
async fn a_merged_pull_request_is_merged() {
    let fake = Fake::start().await;
    fake.expect(vec![answer(
        Method::GET,
        &format!("{REPO}/pulls/7"),
        200,
        pull(7, "closed", true),
    )]);
    let review = ReviewRef {
        branch: "agentops/web/draft".to_owned(),
        commit: None,
        pull_request: Some(7),
    };
    assert_eq!(
        fake.forge().review_state(&review).await.unwrap(),
        ReviewState::Merged {
            how: "https://github.example/acme/specs/pull/7".to_owned()
        }
    );
    fake.assert_calls(&[("GET", "/repos/acme/specs/pulls/7")]);
}

fn closed_with_comments(number: u64) -> Vec<Answer> {
    vec![
        answer(
            Method::GET,
            &format!("{REPO}/pulls/{number}"),
            200,
            pull(number, "closed", false),
        ),
        answer(
            Method::GET,
            &format!("{REPO}/pulls/{number}/reviews"),
            200,
            json!([{"user": {"login": "ria"}, "body": "Too long; keep it under 300 words.",
                "state": "CHANGES_REQUESTED"},
                {"user": {"login": "bo"}, "body": "", "state": "COMMENTED"}]),
        ),
        answer(
            Method::GET,
            &format!("{REPO}/pulls/{number}/comments"),
            200,
            json!([{"user": {"login": "ria"}, "body": "Typo here.", "path": "site/copy.md"}]),
        ),
        answer(
            Method::GET,
            &format!("{REPO}/issues/{number}/comments"),
            200,
            json!([{"user": {"login": "bo"}, "body": "Closing, see above."}]),
        ),
    ]
}

#[tokio::test]
async fn a_closed_pull_request_brings_its_review_comments() {
    let fake = Fake::start().await;
    fake.expect(closed_with_comments(8));
    let review = ReviewRef {
        branch: "agentops/web/draft".to_owned(),
        commit: None,
        pull_request: Some(8),
    };
    let ReviewState::Closed { comments } = fake.forge().review_state(&review).await.unwrap() else {
        panic!("not closed");
    };
    assert_eq!(
        comments,
        "ria (changes requested): Too long; keep it under 300 words.\n\
         ria on site/copy.md: Typo here.\n\
         bo: Closing, see above."
    );
    fake.assert_calls(&[
        ("GET", "/repos/acme/specs/pulls/8"),
        ("GET", "/repos/acme/specs/pulls/8/reviews"),
        ("GET", "/repos/acme/specs/pulls/8/comments"),
        ("GET", "/repos/acme/specs/issues/8/comments"),
    ]);
}

#[tokio::test]
async fn a_rate_limit_is_waited_out_and_retried() {
    let fake = Fake::start().await;
    let mut limited = answer(
        Method::GET,
        LIST,
        403,
        json!({"message": "API rate limit exceeded for user ID 1."}),
    );
    limited.headers = vec![
        ("x-ratelimit-remaining", "0".to_owned()),
        ("retry-after", "1".to_owned()),
    ];
    fake.expect(vec![
        limited,
        answer(Method::GET, LIST, 200, json!([pull(3, "open", false)])),
    ]);
    let started = Instant::now();
    let pr = fake.forge().open_pull_request(&proposal()).await.unwrap();
    assert_eq!(pr.number, 3);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "did not wait for retry-after"
    );
    fake.assert_calls(&[("GET", LIST), ("GET", LIST)]);
}

#[tokio::test]
async fn a_lasting_rate_limit_is_an_error() {
    let fake = Fake::start().await;
    let limited = || {
        let mut a = answer(
            Method::GET,
            LIST,
            429,
            json!({"message": "secondary rate limit"}),
        );
        a.headers = vec![("retry-after", "0".to_owned())];
        a
    };
    fake.expect(vec![limited(), limited(), limited()]);
    let error = fake
        .forge()
        .open_pull_request(&proposal())
        .await
        .unwrap_err();
    assert!(
        matches!(error, ForgeError::RateLimited { attempts: 3, .. }),
        "{error:?}"
    );
    fake.assert_calls(&[("GET", LIST), ("GET", LIST), ("GET", LIST)]);

    // A wait longer than the forge will wait fails at once.
    let mut long = answer(Method::GET, LIST, 403, json!({"message": "rate limited"}));
    long.headers = vec![("retry-after", "3600".to_owned())];
    fake.expect(vec![long]);
    let error = fake
        .forge()
        .open_pull_request(&proposal())
        .await
        .unwrap_err();
    assert!(
        matches!(error, ForgeError::RateLimited { attempts: 1, retry_after, .. } if retry_after == Duration::from_secs(3600)),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_401_and_a_plain_403_are_clear_errors() {
    let fake = Fake::start().await;
    // The fake refuses any other token with 401, as GitHub does.
    let mut config = GitHubConfig::new(&fake.url, "wrong-token", "acme", "specs");
    config.attempts = 3;
    let error = GitHub::new(config)
        .unwrap()
        .open_pull_request(&proposal())
        .await
        .unwrap_err();
    assert!(
        matches!(error, ForgeError::Unauthorized { .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.contains("401") && text.contains("--github-token") && text.contains("Bad credentials"),
        "{text}"
    );
    let calls = fake.calls();
    assert_eq!(calls.len(), 1, "a 401 is not retried");
    assert_eq!(calls[0].auth.as_deref(), Some("Bearer wrong-token"));

    fake.expect(vec![answer(
        Method::GET,
        &format!("{REPO}/pulls/5"),
        403,
        json!({"message": "Resource not accessible by integration"}),
    )]);
    let error = fake.forge().pull_request_state(5).await.unwrap_err();
    assert!(matches!(error, ForgeError::Forbidden { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("Resource not accessible by integration")
    );
}

// ---------------------------------------------------------------------------------------------
// The review loop on a real store
// ---------------------------------------------------------------------------------------------

/// Put the named tasks in review, as completions with result branches do.
async fn in_review<S: TestStore + Queue>(store: &S, names: &[&str]) -> Vec<uuid::Uuid> {
    let agent = AgentIdentity {
        name: "writer".to_owned(),
        agent_type: "seed".to_owned(),
        capabilities: Vec::new(),
        concurrency: 10,
    };
    store.register(&agent, "hash").await.unwrap();
    let claimed = store
        .claim_for(&agent, 10, &LeasePolicy::default())
        .await
        .unwrap();
    let mut ids = Vec::new();
    let completions: Vec<Completion> = names
        .iter()
        .map(|name| {
            let task = claimed.iter().find(|t| t.name == *name).unwrap();
            ids.push(task.id);
            Completion {
                lease: Lease {
                    id: task.id,
                    run_lease: task.run_lease,
                },
                result: json!({"summary": "done", "output": {
                    "mode": "pull-request", "branch": format!("agentops/web/{name}"),
                    "commit": "0123456789abcdef0123456789abcdef01234567"}}),
                artifacts: Vec::new(),
                review: true,
            }
        })
        .collect();
    let answers = store.complete_as("writer", &completions).await.unwrap();
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    ids
}

async fn review_loop_follows_pull_requests<S: TestStore + Queue + Writeback + Clone>() {
    let mut env = Env::<S>::new().await;
    let (p, d, l) = (
        project("web", "Web"),
        task("draft", "Draft"),
        task("logo", "Logo"),
    );
    env.commit(
        "specs",
        &[
            ("projects/web/project.yaml", Some(p.as_str())),
            ("projects/web/tasks/draft.yaml", Some(d.as_str())),
            ("projects/web/tasks/logo.yaml", Some(l.as_str())),
        ],
    );
    env.sync().await;
    let store = S::open(&env.db.url).await;
    let ids = in_review(&store, &["draft", "logo"]).await;
    let fake = Fake::start().await;
    let reviews = Reviews {
        store: store.clone(),
        forge: Arc::new(fake.forge()),
        base: "main".to_owned(),
        policy: LeasePolicy {
            backoff_base: Duration::ZERO,
            ..LeasePolicy::default()
        },
    };
    let list = |name: &str| format!("{REPO}/pulls?state=open&head=acme:agentops/web/{name}");
    // First pass: a pull request for each (one opened, one found open), both still open.
    fake.expect(vec![
        answer(Method::GET, &list("draft"), 200, json!([])),
        answer(
            Method::POST,
            &format!("{REPO}/pulls"),
            201,
            pull(21, "open", false),
        ),
        answer(
            Method::GET,
            &format!("{REPO}/pulls/21"),
            200,
            pull(21, "open", false),
        ),
        answer(
            Method::GET,
            &list("logo"),
            200,
            json!([pull(22, "open", false)]),
        ),
        answer(
            Method::GET,
            &format!("{REPO}/pulls/22"),
            200,
            pull(22, "open", false),
        ),
    ]);
    let report = reviews.check().await.unwrap();
    assert_eq!(report.proposed, 2, "{report:?}");
    let calls = fake.calls();
    assert_eq!(calls[1].body["head"], "agentops/web/draft");
    assert_eq!(calls[1].body["base"], "main");
    assert!(
        calls[1].body["title"]
            .as_str()
            .unwrap()
            .starts_with("web/draft")
    );
    let listed = store.tasks_in_review().await.unwrap();
    let prs: Vec<Option<u64>> = listed.iter().map(|t| t.pull_request).collect();
    assert_eq!(prs, [Some(21), Some(22)]);
    assert_eq!(env.db.events_of("task.pull_request").await.len(), 2);

    // Second pass: #21 merged, #22 closed with comments.
    let mut script = vec![answer(
        Method::GET,
        &format!("{REPO}/pulls/21"),
        200,
        pull(21, "closed", true),
    )];
    script.extend(closed_with_comments(22));
    fake.expect(script);
    let report = reviews.check().await.unwrap();
    assert_eq!(
        (report.merged, report.retried, report.errors),
        (1, 1, 0),
        "{report:?}"
    );
    let draft = env.db.task("web", "draft").await;
    assert_eq!(draft.status, "completed");
    let logo = env.db.task("web", "logo").await;
    assert_eq!((logo.status.as_str(), logo.attempt), ("pending", 1));
    let updates: Vec<(String, String)> = env
        .db
        .rows(&format!(
            "SELECT update_type, message FROM task_updates WHERE CAST(task_id AS text) = '{}' \
             AND update_type = 'info'",
            ids[1]
        ))
        .await;
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert!(
        updates[0].1.contains("ria on site/copy.md: Typo here."),
        "{updates:?}"
    );
    assert!(
        updates[0].1.contains("Too long; keep it under 300 words."),
        "{updates:?}"
    );
    let merged = env.db.events_of("task.completed").await;
    assert!(
        merged
            .iter()
            .any(|e| e["merged"] == "https://github.example/acme/specs/pull/21"),
        "{merged:?}"
    );
    assert_eq!(env.db.events_of("task.rejected").await.len(), 1);
    assert!(store.tasks_in_review().await.unwrap().is_empty());

    // The retry's assignment carries the review that rejected the first attempt, also in the
    // JSON an agent receives.
    let agent = AgentIdentity {
        name: "writer".to_owned(),
        agent_type: "seed".to_owned(),
        capabilities: Vec::new(),
        concurrency: 10,
    };
    let retried = store
        .claim_for(&agent, 10, &LeasePolicy::default())
        .await
        .unwrap();
    assert_eq!(
        retried.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["logo"]
    );
    assert_eq!(retried[0].attempt, 1);
    let comments = retried[0].review_comments.as_deref().unwrap_or_default();
    assert!(
        comments.contains("ria on site/copy.md: Typo here.")
            && comments.contains("Too long; keep it under 300 words."),
        "{comments:?}"
    );
    let sent = serde_json::to_value(agentops_agents::protocol::Assignment::from(
        retried[0].clone(),
    ))
    .unwrap();
    assert_eq!(sent["review_comments"], json!(comments));
}

both_backends!(review_loop_follows_pull_requests);
