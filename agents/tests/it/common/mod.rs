//! A fake controller: the endpoints of `agents/PROTOCOL.md` over an in-memory queue, recording
//! what agents send and every way in which they break the protocol.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::Notify;

/// A task as the claim answer carries it, before the fake leases it.
pub fn task(name: &str, action: Value) -> Value {
    json!({
        "id": format!("id-{name}"),
        "project": "demo",
        "name": name,
        "title": format!("Task {name}"),
        "description": "",
        "action": action,
        "output": {"mode": "none"},
        "acceptance_criteria": [],
        "timeout_seconds": 30,
        "revision": "main@sha1:0000",
    })
}

pub fn id(name: &str) -> String {
    format!("id-{name}")
}

#[derive(Default)]
pub struct Ledger {
    /// What the register answer tells the agent.
    pub lease_seconds: f64,
    pub heartbeat_seconds: f64,

    // Knobs a test turns.
    /// Tasks whose next heartbeat answers `held: false`.
    pub lose: HashSet<String>,
    /// Tasks cancelled: every heartbeat about them answers `held: true, cancel: true`.
    pub cancel: HashSet<String>,
    /// Answer this many `/api/v1/complete` requests with 409, forgetting their tasks.
    pub refuse_completions: usize,
    /// Answer this many `/api/v1/complete` requests with 503.
    pub fail_completions: usize,
    /// Hold every 401 until this many requests were refused, so they are answered together.
    pub gather_refusals: usize,

    // What the agent did.
    pub registrations: Vec<Value>,
    /// `max` of every claim.
    pub claims: Vec<usize>,
    pub heartbeats: usize,
    /// Size of every `/api/v1/complete` request, whatever its answer.
    pub complete_requests: Vec<usize>,
    pub completed: Vec<(String, Value)>,
    /// The `files` of each accepted completion that carried any.
    pub completed_files: Vec<(String, Value)>,
    pub failed: Vec<(String, String, bool)>,
    pub questions: Vec<(String, String)>,
    pub progress: Vec<(String, String)>,
    pub released: Vec<String>,
    /// Requests refused for a missing or stale token.
    pub unauthorized: usize,
    /// Protocol breaches: a report without the current lease, a claim for more than the free
    /// slots, a malformed body.
    pub violations: Vec<String>,

    token: Option<String>,
    concurrency: usize,
    ready: VecDeque<Value>,
    /// Task id → run_lease of the tasks the agent holds.
    held: HashMap<String, i64>,
    next_lease: i64,
}

impl Ledger {
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Forgets the agent's token, as a restarted controller would.
    pub fn revoke_token(&mut self) {
        self.token = None;
    }

    pub fn completed_ids(&self) -> Vec<&str> {
        self.completed.iter().map(|(id, _)| id.as_str()).collect()
    }

    fn authorized(&mut self, headers: &HeaderMap) -> bool {
        let expected = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let sent = headers.get("authorization").and_then(|v| v.to_str().ok());
        expected.is_some() && sent == expected.as_deref()
    }

    /// Ends the lease `(id, run_lease)` if the agent holds it; a violation otherwise.
    fn end_lease(&mut self, what: &str, id: &str, body: &Value) -> bool {
        let run_lease = body["run_lease"].as_i64();
        if run_lease.is_some() && self.held.get(id) == run_lease.as_ref() {
            self.held.remove(id);
            true
        } else {
            self.violations.push(format!(
                "{what} of {id} with run_lease {:?}, held: {:?}",
                body["run_lease"],
                self.held.get(id)
            ));
            false
        }
    }
}

#[derive(Clone)]
pub struct Fake {
    pub url: String,
    state: Arc<Mutex<Ledger>>,
    work: Arc<Notify>,
}

impl Fake {
    /// Heartbeats every 50 ms, leases of 2 s.
    pub async fn start() -> Fake {
        let state = Ledger {
            lease_seconds: 2.0,
            heartbeat_seconds: 0.05,
            next_lease: 100,
            ..Ledger::default()
        };
        let fake = Fake {
            url: String::new(),
            state: Arc::new(Mutex::new(state)),
            work: Arc::new(Notify::new()),
        };
        let app = Router::new()
            .route("/api/v1/agents/register", post(register))
            .route("/api/v1/claim", post(claim))
            .route("/api/v1/heartbeat", post(heartbeat))
            .route("/api/v1/complete", post(complete_many))
            .route("/api/v1/tasks/{id}/{verb}", post(report))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Fake { url, ..fake }
    }

    pub fn push(&self, task: Value) {
        self.with(|s| s.ready.push_back(task));
        self.work.notify_waiters();
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// Waits until `condition` holds, failing the test after 5 s.
    pub async fn wait_until(&self, what: &str, condition: impl Fn(&Ledger) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.with(|s| condition(s)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether the request carries the current token; the 401 to send when it does not.
    async fn authorize(&self, headers: &HeaderMap) -> Result<(), Response> {
        let gather = self.with(|s| {
            let ok = s.authorized(headers);
            s.unauthorized += usize::from(!ok);
            (!ok).then_some(s.gather_refusals)
        });
        let Some(gather) = gather else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.with(|s| s.unauthorized < gather) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Err(refuse(StatusCode::UNAUTHORIZED))
    }

    /// No protocol breach, no request with a wrong token.
    pub fn assert_clean(&self) {
        self.with(|s| {
            assert!(s.violations.is_empty(), "violations: {:#?}", s.violations);
            assert_eq!(s.unauthorized, 0, "requests with a missing or wrong token");
        });
    }
}

fn refuse(status: StatusCode) -> Response {
    (status, Json(json!({"error": status.to_string()}))).into_response()
}

fn ok() -> Response {
    Json(json!({"ok": true})).into_response()
}

async fn register(State(fake): State<Fake>, Json(body): Json<Value>) -> Response {
    fake.with(|s| {
        let valid_type =
            ["cos", "seed", "specialist", "meta"].contains(&body["type"].as_str().unwrap_or(""));
        let concurrency = body["concurrency"].as_u64().unwrap_or(0) as usize;
        if body["name"].as_str().is_none_or(str::is_empty) || !valid_type || concurrency == 0 {
            s.violations.push(format!("bad registration {body}"));
            return refuse(StatusCode::BAD_REQUEST);
        }
        s.registrations.push(body);
        s.concurrency = concurrency;
        let token = format!("token-{}", s.registrations.len());
        s.token = Some(token.clone());
        Json(json!({
            "agent": s.registrations.last().unwrap()["name"],
            "token": token,
            "lease_seconds": s.lease_seconds,
            "heartbeat_seconds": s.heartbeat_seconds,
        }))
        .into_response()
    })
}

async fn claim(State(fake): State<Fake>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let max = body["max"].as_u64().unwrap_or(0) as usize;
    let wait = Duration::from_millis(body["wait_ms"].as_u64().unwrap_or(0).min(60_000));
    if let Err(refused) = fake.authorize(&headers).await {
        return refused;
    }
    let refused = fake.with(|s| {
        s.claims.push(max);
        let free = s.concurrency.saturating_sub(s.held.len());
        if max == 0 || max > free {
            s.violations
                .push(format!("claim for {max} tasks with {free} slots free"));
            return Some(refuse(StatusCode::BAD_REQUEST));
        }
        None
    });
    if let Some(refused) = refused {
        return refused;
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before looking, so a push in between is not missed.
        let pushed = fake.work.notified();
        let tasks: Vec<Value> = fake.with(|s| {
            let n = max.min(s.ready.len());
            let lease_expires_at = chrono::Utc::now()
                + chrono::Duration::milliseconds((s.lease_seconds * 1000.0) as i64);
            (0..n)
                .map(|_| {
                    let mut task = s.ready.pop_front().unwrap();
                    s.next_lease += 1;
                    let id = task["id"].as_str().unwrap().to_owned();
                    s.held.insert(id, s.next_lease);
                    task["run_lease"] = json!(s.next_lease);
                    task["attempt"] = json!(0);
                    task["lease_expires_at"] = json!(lease_expires_at.to_rfc3339());
                    task
                })
                .collect()
        });
        if !tasks.is_empty() || tokio::time::timeout_at(deadline, pushed).await.is_err() {
            return Json(json!({ "tasks": tasks })).into_response();
        }
    }
}

async fn heartbeat(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(refused) = fake.authorize(&headers).await {
        return refused;
    }
    fake.with(|s| {
        s.heartbeats += 1;
        let Some(tasks) = body["tasks"].as_array() else {
            s.violations
                .push(format!("heartbeat without tasks: {body}"));
            return refuse(StatusCode::BAD_REQUEST);
        };
        let answers: Vec<Value> = tasks
            .iter()
            .map(|t| {
                let id = t["id"].as_str().unwrap_or_default().to_owned();
                if s.cancel.contains(&id) {
                    s.held.remove(&id);
                    return json!({"id": id, "held": true, "cancel": true});
                }
                let held =
                    s.held.get(&id) == t["run_lease"].as_i64().as_ref() && !s.lose.remove(&id);
                if !held {
                    s.held.remove(&id);
                }
                json!({"id": id, "held": held, "cancel": false})
            })
            .collect();
        Json(json!({ "tasks": answers })).into_response()
    })
}

async fn complete_many(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(refused) = fake.authorize(&headers).await {
        return refused;
    }
    fake.with(|s| {
        let items = body["tasks"].as_array().cloned().unwrap_or_default();
        s.complete_requests.push(items.len());
        if items.is_empty() || items.len() > 64 {
            s.violations
                .push(format!("a batch of {} completions", items.len()));
        }
        if s.fail_completions > 0 {
            s.fail_completions -= 1;
            return refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
        if s.refuse_completions > 0 {
            s.refuse_completions -= 1;
            for item in &items {
                s.held.remove(item["id"].as_str().unwrap_or_default());
            }
            return refuse(StatusCode::CONFLICT);
        }
        let answers: Vec<Value> = items
            .iter()
            .map(|item| {
                let id = item["id"].as_str().unwrap_or_default().to_owned();
                let ok = s.end_lease("completion", &id, item);
                if ok {
                    s.completed.push((id.clone(), item["result"].clone()));
                    if let Some(files) = item.get("files") {
                        s.completed_files.push((id.clone(), files.clone()));
                    }
                }
                json!({"id": id, "ok": ok})
            })
            .collect();
        Json(json!({ "tasks": answers })).into_response()
    })
}

async fn report(
    State(fake): State<Fake>,
    Path((id, verb)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(refused) = fake.authorize(&headers).await {
        return refused;
    }
    fake.with(|s| {
        if verb == "progress" {
            if s.held.get(&id) != body["run_lease"].as_i64().as_ref() {
                s.violations
                    .push(format!("progress of {id} without its lease"));
                return refuse(StatusCode::CONFLICT);
            }
            let message = body["message"].as_str().unwrap_or_default().to_owned();
            s.progress.push((id, message));
            return ok();
        }
        if !s.end_lease(&verb, &id, &body) {
            return refuse(StatusCode::CONFLICT);
        }
        let text = |key: &str| body[key].as_str().unwrap_or_default().to_owned();
        match verb.as_str() {
            "fail" => {
                let retryable = body["retryable"].as_bool().unwrap_or(false);
                s.failed.push((id, text("error"), retryable));
            }
            "question" => s.questions.push((id, text("question"))),
            "release" => s.released.push(id),
            "complete" => s.completed.push((id, body["result"].clone())),
            _ => {
                s.violations.push(format!("unknown report {verb}"));
                return refuse(StatusCode::NOT_FOUND);
            }
        }
        ok()
    })
}
