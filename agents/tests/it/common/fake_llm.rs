//! An OpenAI-compatible chat completions server inside the test. It checks every request the
//! way the real API would need it (method, path under the base URL, bearer key, JSON body
//! with a model and messages), records it, and answers from a script: a completion, an error
//! status, a reply slower than the client's timeout, or a body that is not JSON.
//!
//! Shared by the agents' and the controller's tests (`#[path]`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

/// The API key the fake expects.
pub const KEY: &str = "sk-test-agentops";
/// The path prefix of the fake's base URL, as OpenRouter's `/api/v1`.
pub const PREFIX: &str = "/api/v1";

#[derive(Debug, Clone)]
pub enum Reply {
    Answer {
        content: String,
        prompt_tokens: u32,
        completion_tokens: u32,
        /// OpenRouter's reported cost, when given.
        cost: Option<f64>,
    },
    /// An error status with an OpenAI-style error body.
    Status(u16, &'static str),
    /// Answers, but only after this long.
    Slow(Duration),
    /// 200 with a body that is not JSON.
    Garbage,
}

/// A completion with 12 prompt and 34 completion tokens.
pub fn answer(content: impl Into<String>) -> Reply {
    Reply::Answer {
        content: content.into(),
        prompt_tokens: 12,
        completion_tokens: 34,
        cost: None,
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub model: String,
    /// `(role, content)` in order.
    pub messages: Vec<(String, String)>,
    pub body: serde_json::Value,
}

#[derive(Default)]
struct Fake {
    replies: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
    /// Requests that were not what the API needs.
    problems: Mutex<Vec<String>>,
}

pub struct FakeLlm {
    /// What the client is configured with: `http://127.0.0.1:PORT/api/v1`.
    pub base_url: String,
    fake: Arc<Fake>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeLlm {
    pub async fn start(replies: Vec<Reply>) -> FakeLlm {
        let fake = Arc::new(Fake {
            replies: Mutex::new(replies.into()),
            ..Fake::default()
        });
        let app = Router::new().fallback(any(handle)).with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}{PREFIX}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeLlm {
            base_url,
            fake,
            server,
        }
    }

    /// Every request so far, after checking that each was well formed and expected.
    pub fn seen(&self) -> Vec<Seen> {
        let problems = self.fake.problems.lock().unwrap().clone();
        assert!(problems.is_empty(), "bad requests: {problems:#?}");
        self.fake.seen.lock().unwrap().clone()
    }

    pub fn models(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.model).collect()
    }

    /// Replies not used yet.
    pub fn left(&self) -> usize {
        self.fake.replies.lock().unwrap().len()
    }
}

async fn handle(
    State(fake): State<Arc<Fake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut problems = Vec::new();
    if method != Method::POST {
        problems.push(format!("method {method}, expected POST"));
    }
    let expected_path = format!("{PREFIX}/chat/completions");
    if uri.path() != expected_path {
        problems.push(format!("path {}, expected {expected_path}", uri.path()));
    }
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {KEY}") {
        problems.push(format!("Authorization `{auth}`, expected the bearer key"));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/json") {
        problems.push(format!("Content-Type `{content_type}`"));
    }
    let parsed: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => {
            problems.push(format!("body is not JSON: {e}"));
            serde_json::Value::Null
        }
    };
    let model = parsed["model"].as_str().unwrap_or("").to_owned();
    if model.is_empty() {
        problems.push("body has no model".to_owned());
    }
    let mut messages = Vec::new();
    match parsed["messages"].as_array() {
        Some(list) if !list.is_empty() => {
            for m in list {
                let role = m["role"].as_str().unwrap_or("");
                if !["system", "user", "assistant"].contains(&role) {
                    problems.push(format!("message role `{role}`"));
                }
                match m["content"].as_str() {
                    Some(content) => messages.push((role.to_owned(), content.to_owned())),
                    None => problems.push("message content is not a string".to_owned()),
                }
            }
        }
        _ => problems.push("body has no messages".to_owned()),
    }
    if !problems.is_empty() {
        fake.problems.lock().unwrap().extend(problems.clone());
        return (StatusCode::BAD_REQUEST, problems.join("; ")).into_response();
    }
    fake.seen.lock().unwrap().push(Seen {
        model: model.clone(),
        messages,
        body: parsed,
    });
    let reply = fake.replies.lock().unwrap().pop_front();
    match reply {
        None => {
            fake.problems
                .lock()
                .unwrap()
                .push(format!("unexpected request for {model}: no reply scripted"));
            (StatusCode::IM_A_TEAPOT, "no reply scripted").into_response()
        }
        Some(Reply::Answer {
            content,
            prompt_tokens,
            completion_tokens,
            cost,
        }) => completion(&model, &content, prompt_tokens, completion_tokens, cost),
        Some(Reply::Status(status, message)) => (
            StatusCode::from_u16(status).unwrap(),
            axum::Json(serde_json::json!({"error": {"message": message, "code": status}})),
        )
            .into_response(),
        Some(Reply::Slow(delay)) => {
            tokio::time::sleep(delay).await;
            completion(&model, "too late", 1, 1, None)
        }
        Some(Reply::Garbage) => (StatusCode::OK, "<html>gateway</html>").into_response(),
    }
}

fn completion(
    model: &str,
    content: &str,
    prompt_tokens: u32,
    completion_tokens: u32,
    cost: Option<f64>,
) -> Response {
    let mut usage = serde_json::json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    if let Some(cost) = cost {
        usage["cost"] = serde_json::json!(cost);
    }
    axum::Json(serde_json::json!({
        "id": "gen-test",
        "object": "chat.completion",
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"
        }],
        "usage": usage,
    }))
    .into_response()
}
