//! A Kubernetes API server for the four agentops kinds, in process, for `agentops bench kube`
//! and the integration tests: list and watch (JSON lines, from a `resourceVersion`, `410 Gone`
//! for one that is too old), status by server-side apply, finalizers by merge patch (deleting
//! a resource with finalizers only marks it), and Events. It records every request it gets and
//! refuses the ones the real server would refuse for agentops's writes: a status patch that is
//! not an apply patch of field manager `agentops`, a finalizer patch on a stale version.
//! It also keeps `coordination.k8s.io/v1` Leases (get, create, replace at the version read),
//! so that `up --kube` can lead.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use agentops_specs::{API_VERSION, Kind};
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;

/// One request as the server got it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    /// `Null` when bodies are not kept.
    pub body: Value,
    pub status: u16,
    pub at: chrono::DateTime<chrono::Utc>,
}

impl Recorded {
    /// `PATCH …/<plural>/<name>/status`.
    pub fn is_status_patch(&self) -> bool {
        self.method == "PATCH" && self.path.ends_with("/status")
    }
}

/// Where a watch event goes.
struct Logged {
    rv: u64,
    plural: &'static str,
    namespace: String,
    line: Arc<str>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// By (plural, namespace, name): the object as JSON text.
    objects: BTreeMap<(&'static str, String, String), String>,
    /// Watch events, oldest first; older ones are compacted away.
    log: std::collections::VecDeque<Logged>,
    /// A watch from a version below this is answered `410 Gone`.
    expired_below: u64,
    requests: Vec<Recorded>,
    events: Vec<Value>,
    /// By (namespace, name): the Lease, its `resourceVersion` set.
    leases: BTreeMap<(String, String), Value>,
    /// The bearer tokens a TokenReview authenticates, and their users.
    tokens: BTreeMap<String, String>,
    keep_bodies: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Bumped on every change: watches wake up.
    changed: watch::Sender<u64>,
    /// Bumped to end every open watch.
    epoch: watch::Sender<u64>,
    max_log: usize,
}

/// A running fake API server; dropping it stops it.
pub struct FakeKube {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn plural(kind: Kind) -> &'static str {
    kind.plural()
}

fn kind_of_plural(plural: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.plural() == plural)
}

impl FakeKube {
    /// Listen on a free loopback port. `keep_bodies`: record request bodies too.
    pub async fn start(keep_bodies: bool) -> std::io::Result<FakeKube> {
        FakeKube::start_with(keep_bodies, 50_000).await
    }

    /// [`FakeKube::start`], keeping the last `history` watch events: a watch from further
    /// back is answered `410 Gone`, as after etcd's compaction.
    pub async fn start_with(keep_bodies: bool, history: usize) -> std::io::Result<FakeKube> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                keep_bodies,
                ..Inner::default()
            }),
            changed: watch::channel(0).0,
            epoch: watch::channel(0).0,
            max_log: history,
        });
        let state = shared.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move { handle(&state, method, uri, headers, body) }
            },
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeKube {
            shared,
            addr,
            server,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server, written to `dir/kubeconfig`.
    pub fn kubeconfig(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
                 current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
                self.url()
            ),
        )?;
        Ok(path)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A TokenReview of `token` authenticates it as `username` from now on; any other token
    /// is not authenticated.
    pub fn authenticate(&self, token: &str, username: &str) {
        self.lock()
            .tokens
            .insert(token.to_owned(), username.to_owned());
    }

    /// Create the resource or change its spec (a new generation when the spec differs).
    pub fn apply(&self, kind: Kind, namespace: &str, name: &str, spec: Value) {
        let mut inner = self.lock();
        let key = (plural(kind), namespace.to_owned(), name.to_owned());
        let (object, event) = match inner.objects.get(&key) {
            Some(text) => {
                let mut object: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                if object["spec"] != spec {
                    let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
                    object["metadata"]["generation"] = json!(generation + 1);
                }
                object["spec"] = spec;
                (object, "MODIFIED")
            }
            None => {
                let uid = format!("uid-{}-{namespace}-{name}", plural(kind));
                let object = json!({
                    "apiVersion": API_VERSION,
                    "kind": kind.as_str(),
                    "metadata": {"name": name, "namespace": namespace, "uid": uid,
                        "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"},
                    "spec": spec,
                });
                (object, "ADDED")
            }
        };
        self.shared.store(&mut inner, key, object, event);
    }

    /// Delete the resource: with finalizers it is only marked (`deletionTimestamp`).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut inner = self.lock();
        let key = (plural(kind), namespace.to_owned(), name.to_owned());
        self.shared.delete(&mut inner, key);
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let inner = self.lock();
        let key = (plural(kind), namespace.to_owned(), name.to_owned());
        inner
            .objects
            .get(&key)
            .and_then(|t| serde_json::from_str(t).ok())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    pub fn status_patches(&self) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.is_status_patch())
            .count()
    }

    /// Events created (`events.k8s.io/v1`).
    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// End every open watch, as a load balancer dropping connections would.
    pub fn drop_watches(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Forget the history: watches from any version seen so far get `410 Gone`, and open
    /// watches end, so clients must list again.
    pub fn expire_history(&self) {
        {
            let mut inner = self.lock();
            inner.expired_below = inner.rv + 1;
            inner.log.clear();
        }
        self.drop_watches();
    }
}

impl Shared {
    fn bump(&self, inner: &mut Inner) -> u64 {
        inner.rv += 1;
        inner.rv
    }

    fn log(
        &self,
        inner: &mut Inner,
        plural: &'static str,
        namespace: &str,
        event: &str,
        object: &Value,
    ) {
        let line: Arc<str> = format!("{}\n", json!({"type": event, "object": object})).into();
        let rv = inner.rv;
        inner.log.push_back(Logged {
            rv,
            plural,
            namespace: namespace.to_owned(),
            line,
        });
        while inner.log.len() > self.max_log {
            if let Some(old) = inner.log.pop_front() {
                inner.expired_below = old.rv + 1;
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn store(
        &self,
        inner: &mut Inner,
        key: (&'static str, String, String),
        mut object: Value,
        event: &str,
    ) {
        let rv = self.bump(inner);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.log(inner, key.0, &key.1.clone(), event, &object);
        inner.objects.insert(key, object.to_string());
    }

    fn delete(&self, inner: &mut Inner, key: (&'static str, String, String)) {
        let Some(text) = inner.objects.get(&key) else {
            return;
        };
        let mut object: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let held = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if held {
            if object["metadata"]["deletionTimestamp"].is_null() {
                object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:01Z");
                self.store(inner, key, object, "MODIFIED");
            }
        } else {
            inner.objects.remove(&key);
            let rv = self.bump(inner);
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            self.log(inner, key.0, &key.1, "DELETED", &object);
        }
    }
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn json_response(code: StatusCode, body: String) -> Response {
    (code, [("content-type", "application/json")], body).into_response()
}

fn handle(
    shared: &Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: BTreeMap<String, String> = uri
        .query()
        .map(|q| {
            q.split('&')
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (decode(k), decode(v))
                })
                .collect()
        })
        .unwrap_or_default();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let response = route(
        shared,
        &method,
        uri.path(),
        &query,
        content_type.as_deref(),
        &parsed,
    );
    let mut inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
    let keep = inner.keep_bodies;
    inner.requests.push(Recorded {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query,
        content_type,
        body: if keep { parsed } else { Value::Null },
        status: response.status().as_u16(),
        at: chrono::Utc::now(),
    });
    response
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&text[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &BTreeMap<String, String>,
    content_type: Option<&str>,
    body: &Value,
) -> Response {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["apis", "agentops.dev", "v1alpha1", plural] if method == Method::GET => {
            collection(shared, plural, None, query)
        }
        ["apis", "agentops.dev", "v1alpha1", "namespaces", ns, plural] if method == Method::GET => {
            collection(shared, plural, Some(ns), query)
        }
        [
            "apis",
            "agentops.dev",
            "v1alpha1",
            "namespaces",
            ns,
            plural,
            name,
            "status",
        ] if method == Method::PATCH => {
            patch_status(shared, ns, plural, name, query, content_type, body)
        }
        [
            "apis",
            "agentops.dev",
            "v1alpha1",
            "namespaces",
            ns,
            plural,
            name,
        ] if method == Method::PATCH => {
            patch_metadata(shared, ns, plural, name, content_type, body)
        }
        ["apis", "events.k8s.io", "v1", "namespaces", _, "events"] if method == Method::POST => {
            let mut inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
            inner.events.push(body.clone());
            json_response(StatusCode::CREATED, body.to_string())
        }
        ["apis", "events.k8s.io", "v1", "namespaces", _, "events", _]
            if method == Method::PATCH =>
        {
            json_response(StatusCode::OK, body.to_string())
        }
        [
            "apis",
            "coordination.k8s.io",
            "v1",
            "namespaces",
            ns,
            "leases",
            rest @ ..,
        ] => lease(shared, method, ns, rest.first().copied(), body),
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] if method == Method::POST => {
            token_review(shared, body)
        }
        _ => status_response(StatusCode::NOT_FOUND, "NotFound", "no such path"),
    }
}

/// A TokenReview: the body's `spec.token`, authenticated when [`FakeKube::authenticate`]
/// named it, as the API server answers (`201` with the review and its `status`).
fn token_review(shared: &Arc<Shared>, body: &Value) -> Response {
    let Some(token) = body.pointer("/spec/token").and_then(Value::as_str) else {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "spec.token is required",
        );
    };
    let inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
    let status = match inner.tokens.get(token) {
        Some(user) => json!({"authenticated": true, "user": {"username": user}}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    let mut review = body.clone();
    review["status"] = status;
    json_response(StatusCode::CREATED, review.to_string())
}

/// A Lease's get, create or replace; a replace must carry the version it read.
fn lease(
    shared: &Arc<Shared>,
    method: &Method,
    namespace: &str,
    name: Option<&str>,
    body: &Value,
) -> Response {
    let mut inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
    let key = |name: &str| (namespace.to_owned(), name.to_owned());
    let name = name.or_else(|| body.pointer("/metadata/name").and_then(Value::as_str));
    let Some(name) = name else {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "a lease needs a name",
        );
    };
    let stored = inner.leases.get(&key(name)).cloned();
    let stored_version = stored
        .as_ref()
        .and_then(|l| l.pointer("/metadata/resourceVersion").cloned());
    match *method {
        Method::GET => match stored {
            Some(lease) => json_response(StatusCode::OK, lease.to_string()),
            None => status_response(StatusCode::NOT_FOUND, "NotFound", "no such lease"),
        },
        Method::POST if stored.is_some() => {
            status_response(StatusCode::CONFLICT, "AlreadyExists", "the lease exists")
        }
        Method::PUT if stored.is_none() => {
            status_response(StatusCode::NOT_FOUND, "NotFound", "no such lease")
        }
        Method::PUT if body.pointer("/metadata/resourceVersion") != stored_version.as_ref() => {
            status_response(
                StatusCode::CONFLICT,
                "Conflict",
                "the lease has been modified",
            )
        }
        Method::POST | Method::PUT => {
            inner.rv += 1;
            let mut lease = body.clone();
            lease["metadata"]["resourceVersion"] = Value::String(inner.rv.to_string());
            lease["metadata"]["namespace"] = Value::String(namespace.to_owned());
            inner.leases.insert(key(name), lease.clone());
            let code = match *method {
                Method::POST => StatusCode::CREATED,
                _ => StatusCode::OK,
            };
            json_response(code, lease.to_string())
        }
        _ => status_response(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "leases"),
    }
}

fn collection(
    shared: &Arc<Shared>,
    plural: &str,
    namespace: Option<&str>,
    query: &BTreeMap<String, String>,
) -> Response {
    let Some(kind) = kind_of_plural(plural) else {
        return status_response(StatusCode::NOT_FOUND, "NotFound", "no such resource");
    };
    let plural = kind.plural();
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return watch_stream(shared, plural, namespace.map(str::to_owned), query);
    }
    let inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
    // Pages: `limit`, and a `continue` token of `<resourceVersion>:<offset>`.
    let (rv, offset) = query
        .get("continue")
        .and_then(|c| c.split_once(':'))
        .and_then(|(rv, at)| Some((rv.parse().ok()?, at.parse().ok()?)))
        .unwrap_or((inner.rv, 0usize));
    let limit = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|&l: &usize| l > 0)
        .unwrap_or(usize::MAX);
    let mut items = inner
        .objects
        .iter()
        .filter(|((p, ns, _), _)| *p == plural && namespace.is_none_or(|n| n == ns))
        .skip(offset);
    let mut body = String::new();
    for (n, (_, text)) in items.by_ref().take(limit).enumerate() {
        if n > 0 {
            body.push(',');
        }
        body.push_str(text);
    }
    let more = items.next().is_some();
    let next = if more {
        format!(",\"continue\":\"{rv}:{}\"", offset.saturating_add(limit))
    } else {
        String::new()
    };
    let body = format!(
        "{{\"apiVersion\":\"{API_VERSION}\",\"kind\":\"{}List\",\"metadata\":{{\"resourceVersion\":\"{rv}\"{next}}},\"items\":[{body}]}}",
        kind.as_str(),
    );
    json_response(StatusCode::OK, body)
}

fn watch_stream(
    shared: &Arc<Shared>,
    plural: &'static str,
    namespace: Option<String>,
    query: &BTreeMap<String, String>,
) -> Response {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let expired = {
        let inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        from < inner.expired_below
    };
    if expired {
        let line = format!(
            "{}\n",
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from}")}})
        );
        return (StatusCode::OK, [("content-type", "application/json")], line).into_response();
    }
    let state = (
        shared.clone(),
        from,
        shared.changed.subscribe(),
        shared.epoch.subscribe(),
    );
    let stream =
        futures::stream::unfold(state, move |(shared, mut last, mut changed, mut epoch)| {
            let namespace = namespace.clone();
            async move {
                loop {
                    // A dropped watch delivers nothing more, even what arrived with the drop.
                    if epoch.has_changed().unwrap_or(true) {
                        return None;
                    }
                    let found: Option<(u64, Arc<str>)> = {
                        let inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
                        if last + 1 < inner.expired_below {
                            // Compacted past this watch: it must list again.
                            let line = json!({"type": "ERROR", "object": {"kind": "Status",
                            "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "reason": "Expired", "code": 410,
                            "message": format!("too old resource version: {last}")}});
                            drop(inner);
                            return Some((
                                Ok::<_, Infallible>(Bytes::from(format!("{line}\n"))),
                                (shared, u64::MAX - 1, changed, epoch),
                            ));
                        }
                        if last == u64::MAX - 1 {
                            return None;
                        }
                        let start = inner.log.partition_point(|l| l.rv <= last);
                        inner
                            .log
                            .range(start..)
                            .find(|l| {
                                l.plural == plural
                                    && namespace.as_deref().is_none_or(|n| n == l.namespace)
                            })
                            .map(|l| (l.rv, l.line.clone()))
                            .or_else(|| {
                                // Nothing of ours: skip past what was looked at.
                                inner.log.back().map(|l| (l.rv, Arc::from("")))
                            })
                    };
                    match found {
                        Some((rv, line)) if !line.is_empty() => {
                            last = rv;
                            return Some((
                                Ok::<_, Infallible>(Bytes::copy_from_slice(line.as_bytes())),
                                (shared, last, changed, epoch),
                            ));
                        }
                        Some((rv, _)) if rv > last => last = rv,
                        _ => {}
                    }
                    tokio::select! {
                        r = changed.changed() => if r.is_err() { return None },
                        _ = epoch.changed() => return None,
                    }
                }
            }
        });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| {
            status_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "response",
            )
        })
}

fn patch_status(
    shared: &Arc<Shared>,
    namespace: &str,
    plural: &str,
    name: &str,
    query: &BTreeMap<String, String>,
    content_type: Option<&str>,
    body: &Value,
) -> Response {
    if content_type != Some("application/apply-patch+yaml") {
        return status_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "status is written by server-side apply only",
        );
    }
    if query.get("fieldManager").map(String::as_str) != Some("agentops")
        || query.get("force").map(String::as_str) != Some("true")
    {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "expected fieldManager=agentops&force=true",
        );
    }
    let Some(kind) = kind_of_plural(plural) else {
        return status_response(StatusCode::NOT_FOUND, "NotFound", "no such resource");
    };
    if body["kind"] != kind.as_str() || body["apiVersion"] != API_VERSION {
        return status_response(StatusCode::BAD_REQUEST, "BadRequest", "apiVersion and kind");
    }
    let mut inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
    let key = (kind.plural(), namespace.to_owned(), name.to_owned());
    let Some(text) = inner.objects.get(&key) else {
        return status_response(StatusCode::NOT_FOUND, "NotFound", "no such object");
    };
    let mut object: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    object["status"] = body["status"].clone();
    shared.store(&mut inner, key, object.clone(), "MODIFIED");
    let text = inner
        .objects
        .get(&(kind.plural(), namespace.to_owned(), name.to_owned()))
        .cloned()
        .unwrap_or_default();
    json_response(StatusCode::OK, text)
}

fn patch_metadata(
    shared: &Arc<Shared>,
    namespace: &str,
    plural: &str,
    name: &str,
    content_type: Option<&str>,
    body: &Value,
) -> Response {
    if content_type != Some("application/merge-patch+json") {
        return status_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "expected a merge patch",
        );
    }
    let Some(kind) = kind_of_plural(plural) else {
        return status_response(StatusCode::NOT_FOUND, "NotFound", "no such resource");
    };
    let patch = &body["metadata"];
    let allowed = body
        .as_object()
        .is_some_and(|o| o.keys().all(|k| k == "metadata"))
        && patch.as_object().is_some_and(|o| {
            o.keys()
                .all(|k| k == "finalizers" || k == "resourceVersion")
        });
    if !allowed {
        return status_response(StatusCode::BAD_REQUEST, "BadRequest", "only finalizers");
    }
    let mut inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
    let key = (kind.plural(), namespace.to_owned(), name.to_owned());
    let Some(text) = inner.objects.get(&key) else {
        return status_response(StatusCode::NOT_FOUND, "NotFound", "no such object");
    };
    let mut object: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    if let Some(rv) = patch.get("resourceVersion")
        && *rv != object["metadata"]["resourceVersion"]
    {
        return status_response(
            StatusCode::CONFLICT,
            "Conflict",
            "the object has been modified",
        );
    }
    object["metadata"]["finalizers"] = patch["finalizers"].clone();
    let released = object["metadata"]["finalizers"]
        .as_array()
        .is_none_or(|f| f.is_empty());
    if released && !object["metadata"]["deletionTimestamp"].is_null() {
        inner.objects.insert(key.clone(), object.to_string());
        shared.delete(&mut inner, key);
        return json_response(StatusCode::OK, object.to_string());
    }
    shared.store(&mut inner, key.clone(), object, "MODIFIED");
    let text = inner.objects.get(&key).cloned().unwrap_or_default();
    json_response(StatusCode::OK, text)
}
