//! Leader election through a `coordination.k8s.io/v1` Lease: real `agentops up --kube`
//! controllers on Postgres, against a fake Kubernetes API server inside the test that keeps
//! the lease with real resourceVersion semantics (a write at a stale version gets 409) and
//! checks every request it gets: the namespace, the name, the token, the body, and that no
//! write takes a lease its holder still holds.

use crate::common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use common::{Backend, BareRemote, GitRepo, Proc, TestDb, eventually, free_port};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};

const BIN: &str = env!("CARGO_BIN_EXE_agentops");
const NAMESPACE: &str = "team";
const LEASE: &str = "agentops-controller";
const TOKEN: &str = "lease-test-token";
const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces";

/// One request the fake API server answered.
#[derive(Debug, Clone)]
struct Request {
    at: Instant,
    /// `get`, `create`, `renew`, `acquire`, `take-over`, `release`, `conflict`, `exists`.
    what: &'static str,
    status: u16,
    /// The lease as stored after the request (for a write that was refused: as sent).
    lease: Option<Lease>,
}

#[derive(Default)]
struct Cluster {
    lease: Option<Lease>,
    version: u64,
    requests: Vec<Request>,
    /// Everything a request got wrong; the test fails unless this stays empty.
    problems: Vec<String>,
}

type Shared = Arc<Mutex<Cluster>>;

fn spec(lease: &Lease) -> LeaseSpec {
    lease.spec.clone().unwrap_or_default()
}

fn holder(lease: &Lease) -> Option<String> {
    spec(lease).holder_identity.filter(|h| !h.is_empty())
}

fn renewed(lease: &Lease) -> Option<k8s_openapi::jiff::Timestamp> {
    spec(lease).renew_time.map(|t| t.0)
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}

impl Cluster {
    fn record(&mut self, what: &'static str, code: StatusCode, lease: Option<Lease>) {
        self.requests.push(Request {
            at: Instant::now(),
            what,
            status: code.as_u16(),
            lease,
        });
    }

    fn stored(&self) -> Response {
        match &self.lease {
            Some(lease) => (StatusCode::OK, axum::Json(lease.clone())).into_response(),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("leases.coordination.k8s.io \"{LEASE}\" not found"),
            ),
        }
    }

    /// A Lease body as the API server reads it, or what is wrong with it.
    fn body(&mut self, body: &Bytes) -> Option<Lease> {
        let value: serde_json::Value = match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(e) => {
                self.problems.push(format!("a body that is not JSON: {e}"));
                return None;
            }
        };
        if value["apiVersion"] != "coordination.k8s.io/v1" || value["kind"] != "Lease" {
            self.problems
                .push(format!("a body that is not a v1 Lease: {value}"));
            return None;
        }
        let lease: Lease = match serde_json::from_value(value) {
            Ok(lease) => lease,
            Err(e) => {
                self.problems
                    .push(format!("a Lease that does not parse: {e}"));
                return None;
            }
        };
        if lease.metadata.name.as_deref() != Some(LEASE) {
            self.problems
                .push(format!("a Lease named {:?}", lease.metadata.name));
        }
        Some(lease)
    }

    /// What a write does to the lease, checked against the lease it replaces.
    fn judge(&mut self, before: Option<&Lease>, after: &Lease) -> &'static str {
        let next = spec(after);
        let mut wrong = |what: String| self.problems.push(what);
        let Some(identity) = holder(after) else {
            if next.renew_time.is_some() || next.acquire_time.is_some() {
                wrong(format!("a release that keeps its times: {next:?}"));
            }
            if before.and_then(holder).is_none() {
                wrong("a release of a lease nobody held".into());
            }
            return "release";
        };
        if next.lease_duration_seconds != Some(15) {
            wrong(format!(
                "leaseDurationSeconds {:?}",
                next.lease_duration_seconds
            ));
        }
        let Some(renew) = next.renew_time.as_ref().map(|t| t.0) else {
            wrong(format!("a held lease without renewTime: {next:?}"));
            return "invalid";
        };
        let Some(before) = before else {
            if next.lease_transitions != Some(0) || next.acquire_time != next.renew_time {
                wrong(format!("a new lease: {next:?}"));
            }
            return "create";
        };
        let previous = spec(before);
        let transitions = previous.lease_transitions.unwrap_or(0);
        match holder(before) {
            Some(current) if current == identity => {
                if next.lease_transitions != previous.lease_transitions
                    || next.acquire_time != previous.acquire_time
                    || renewed(before).is_some_and(|was| renew < was)
                {
                    wrong(format!("a renewal of {previous:?} as {next:?}"));
                }
                "renew"
            }
            current => {
                if next.lease_transitions != Some(transitions + 1)
                    || next.acquire_time != next.renew_time
                {
                    wrong(format!("a new holder of {previous:?} as {next:?}"));
                }
                if current.is_none() {
                    return "acquire";
                }
                // Two never lead: a lease is taken over only once its holder's time is up.
                let until = renewed(before).map(|at| {
                    at + k8s_openapi::jiff::SignedDuration::from_secs(i64::from(
                        previous.lease_duration_seconds.unwrap_or(0),
                    ))
                });
                if until.is_some_and(|until| renew < until) {
                    wrong(format!(
                        "{identity} took over at {renew} a lease held until {until:?}"
                    ));
                }
                "take-over"
            }
        }
    }

    fn answer(
        &mut self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Response {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if bearer != Some(&format!("Bearer {TOKEN}")) {
            self.problems
                .push(format!("{method} {uri} with authorization {bearer:?}"));
        }
        let collection = format!("{LEASE_PATH}/{NAMESPACE}/leases");
        let object = format!("{collection}/{LEASE}");
        let path = uri.path();
        if *method == Method::GET && path.starts_with("/apis/agentops.dev/") {
            // `up --kube` also lists and watches the agentops kinds: this cluster has none,
            // and a watch stays open with nothing to tell.
            let watching = uri
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
            if watching {
                let nothing = futures::stream::pending::<Result<Bytes, std::io::Error>>();
                return Response::new(axum::body::Body::from_stream(nothing));
            }
            let empty = serde_json::json!({
                "apiVersion": "agentops.dev/v1alpha1",
                "kind": "List",
                "metadata": {"resourceVersion": "1"},
                "items": [],
            });
            return (StatusCode::OK, axum::Json(empty)).into_response();
        }
        if *method == Method::GET && path == object {
            let answer = self.stored();
            self.record("get", answer.status(), self.lease.clone());
            return answer;
        }
        if *method == Method::POST && path == collection {
            let Some(mut lease) = self.body(body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "bad body".into());
            };
            if self.lease.is_some() {
                self.record("exists", StatusCode::CONFLICT, Some(lease));
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("leases.coordination.k8s.io \"{LEASE}\" already exists"),
                );
            }
            if lease.metadata.resource_version.is_some() {
                self.problems.push("a create with a resourceVersion".into());
            }
            let what = self.judge(None, &lease);
            self.version += 1;
            lease.metadata.resource_version = Some(self.version.to_string());
            lease.metadata.namespace = Some(NAMESPACE.into());
            self.lease = Some(lease.clone());
            self.record(what, StatusCode::CREATED, Some(lease.clone()));
            return (StatusCode::CREATED, axum::Json(lease)).into_response();
        }
        if *method == Method::PUT && path == object {
            let Some(mut lease) = self.body(body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "bad body".into());
            };
            let Some(before) = self.lease.clone() else {
                self.problems
                    .push("a replace of a lease that does not exist".into());
                return self.stored();
            };
            let Some(sent) = lease.metadata.resource_version.clone() else {
                self.problems
                    .push("a replace without a resourceVersion".into());
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.resourceVersion: must be specified for an update".into(),
                );
            };
            if sent != self.version.to_string() {
                self.record("conflict", StatusCode::CONFLICT, Some(lease));
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on leases.coordination.k8s.io \"{LEASE}\": \
                         the object has been modified; please apply your changes to the latest \
                         version and try again"
                    ),
                );
            }
            let what = self.judge(Some(&before), &lease);
            self.version += 1;
            lease.metadata.resource_version = Some(self.version.to_string());
            lease.metadata.namespace = Some(NAMESPACE.into());
            self.lease = Some(lease.clone());
            self.record(what, StatusCode::OK, Some(lease.clone()));
            return (StatusCode::OK, axum::Json(lease)).into_response();
        }
        self.problems
            .push(format!("an unexpected request: {method} {uri}"));
        status(StatusCode::NOT_FOUND, "NotFound", format!("{method} {uri}"))
    }

    /// Someone else changes the lease (as `kubectl annotate` would): a new resourceVersion.
    fn touch(&mut self) {
        if let Some(lease) = self.lease.as_mut() {
            self.version += 1;
            lease.metadata.resource_version = Some(self.version.to_string());
            lease
                .metadata
                .labels
                .get_or_insert_default()
                .insert("touched".into(), "by-the-test".into());
        }
    }

    /// The successful writes, as (what, holder).
    fn writes(&self) -> Vec<(&'static str, Option<String>)> {
        self.requests
            .iter()
            .filter(|r| r.what != "get" && r.status < 300)
            .map(|r| (r.what, r.lease.as_ref().and_then(holder)))
            .collect()
    }
}

async fn serve(
    State(cluster): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    cluster
        .lock()
        .unwrap()
        .answer(&method, &uri, &headers, &body)
}

/// The fake API server on a port of its own, and the kubeconfig that points at it.
async fn fake_api(dir: &std::path::Path) -> (Shared, std::path::PathBuf) {
    let cluster = Shared::default();
    let app = axum::Router::new()
        .fallback(serve)
        .with_state(cluster.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: \
             http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: \
             fake\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: {TOKEN}\n"
        ),
    )
    .unwrap();
    (cluster, kubeconfig)
}

struct Setup {
    dir: tempfile::TempDir,
    remote: BareRemote,
    db: TestDb,
    kubeconfig: std::path::PathBuf,
    cluster: Shared,
    _specs: GitRepo,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let specs = GitRepo::new();
        specs.commit(
            "specs",
            &[
                (
                    "projects/p/project.yaml",
                    Some(&common::project("p", "Leadership")),
                ),
                ("projects/p/tasks/t.yaml", Some(&common::task("t", "Wait"))),
            ],
        );
        let remote = BareRemote::new();
        specs.push(&remote, "HEAD", common::BRANCH);
        let db = TestDb::new(Backend::Postgres).await;
        let migrated = Command::new(BIN)
            .args(["migrate", "--database", &db.url])
            .output()
            .unwrap();
        assert!(migrated.status.success(), "{migrated:?}");
        let (cluster, kubeconfig) = fake_api(dir.path()).await;
        Setup {
            dir,
            remote,
            db,
            kubeconfig,
            cluster,
            _specs: specs,
        }
    }

    /// `up --kube` as `name`, listening on a port of its own; `env` and `args` say the rest.
    fn start(&self, name: &str, env: &[(&str, &str)], args: &[&str]) -> Controller {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(BIN);
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy();
            if key_text.starts_with("AGENTOPS_") || key_text.starts_with("KUBERNETES_") {
                command.env_remove(key);
            }
        }
        command
            .args(["up", "--kube", "--no-agents"])
            .arg("--repo")
            .arg(self.remote.url())
            .args(["--database", &self.db.url, "--listen", &addr])
            .args(["--status-interval", "1h", "--shutdown-grace", "5s"])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("data-{name}")))
            .args(args)
            .envs(env.iter().copied())
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("OPENROUTER_API_KEY")
            .env("AGENTOPS_LOG", "info");
        let log = self.dir.path().join(format!("{name}.log"));
        Controller {
            identity: format!("controller-{name}"),
            url: format!("http://{addr}"),
            proc: Proc::spawn(name, command, &log),
        }
    }

    fn cluster(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap()
    }
}

struct Controller {
    identity: String,
    url: String,
    proc: Proc,
}

impl Controller {
    /// `/readyz`'s status, or 0 when nothing answers.
    async fn ready(&self) -> u16 {
        match reqwest::get(format!("{}/readyz", self.url)).await {
            Ok(answer) => answer.status().as_u16(),
            Err(_) => 0,
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let answer = reqwest::get(format!("{}{path}", self.url))
            .await
            .unwrap_or_else(|e| panic!("{} answers {path}: {e}", self.identity));
        (answer.status().as_u16(), answer.text().await.unwrap())
    }

    async fn wait_log(&self, what: &str, within: Duration) {
        let log = self.proc.log.clone();
        eventually(&format!("{} logs {what:?}", self.identity), within, || {
            let log = log.clone();
            async move { common::log_tail(&log, 400).contains(what).then_some(()) }
        })
        .await;
    }

    /// Alive, not ready, and says so in its metrics: a standby.
    async fn assert_standing_by(&mut self) {
        assert!(self.proc.is_running(), "{}", self.proc.log_tail(40));
        assert_eq!(self.get("/healthz").await.0, 200);
        let (ready, why) = self.get("/readyz").await;
        assert_eq!(ready, 503, "{}: {why}", self.identity);
        let (_, metrics) = self.get("/metrics").await;
        assert!(metrics.contains("agentops_leader 0"), "{metrics}");
    }
}

async fn wait_exit(controller: &mut Controller, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = controller.proc.exit_status() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "still running {within:?} after the signal:\n{}",
            controller.proc.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sigterm(controller: &Controller) {
    // SAFETY: signals the process we spawned, as a container runtime does.
    assert_eq!(
        unsafe { libc::kill(controller.proc.pid() as libc::pid_t, libc::SIGTERM) },
        0
    );
}

/// Three replicas: the first creates the lease and leads while the others stand by; it renews
/// through a conflict; killed, it stops renewing and one standby takes the lease over once
/// it has run out; stopped by SIGTERM, the new leader hands the lease back and the last
/// standby takes it at once.
#[tokio::test]
async fn replicas_elect_one_leader_through_a_lease_and_take_over() {
    let setup = Setup::new().await;
    let mut a = setup.start(
        "a",
        &[],
        &[
            "--namespace",
            NAMESPACE,
            "--leader-identity",
            "controller-a",
        ],
    );
    eventually("a leads and is ready", Duration::from_secs(60), || async {
        (a.ready().await == 200).then_some(())
    })
    .await;
    assert_eq!(
        setup.cluster().writes(),
        [("create", Some("controller-a".to_owned()))],
        "a reads the lease, finds none and creates it"
    );
    assert_eq!(setup.cluster().requests[0].what, "get");
    assert_eq!(setup.cluster().requests[0].status, 404);

    // The namespace of the lease from --namespace (b) and from --leader-namespace (c).
    let mut b = setup.start(
        "b",
        &[
            ("AGENTOPS_NAMESPACE", NAMESPACE),
            ("AGENTOPS_LEADER_IDENTITY", "controller-b"),
        ],
        &[],
    );
    let mut c = setup.start(
        "c",
        &[],
        &[
            "--namespace",
            "elsewhere",
            "--leader-namespace",
            NAMESPACE,
            "--leader-identity",
            "controller-c",
        ],
    );
    for standby in [&b, &c] {
        standby
            .wait_log("the leader lease is held", Duration::from_secs(60))
            .await;
    }
    b.assert_standing_by().await;
    c.assert_standing_by().await;
    assert_eq!(a.ready().await, 200);

    // Someone else changes the lease: a's next renewal meets a conflict, reads the lease
    // again, still finds itself the holder and renews at the new version.
    eventually("a renews its lease", Duration::from_secs(20), || async {
        let renewed = setup.cluster().writes().iter().any(|(w, _)| *w == "renew");
        renewed.then_some(())
    })
    .await;
    setup.cluster().touch();
    let renewed_after = setup.cluster().requests.len();
    eventually(
        "a renews through the conflict",
        Duration::from_secs(20),
        || async {
            let cluster = setup.cluster();
            let after: Vec<&str> = cluster.requests[renewed_after..]
                .iter()
                .filter(|r| r.lease.as_ref().and_then(holder).as_deref() == Some("controller-a"))
                .map(|r| r.what)
                .collect();
            let conflict = after.iter().position(|w| *w == "conflict")?;
            after[conflict..].contains(&"renew").then_some(())
        },
    )
    .await;
    let touched = setup.cluster().lease.clone().unwrap();
    assert_eq!(holder(&touched).as_deref(), Some("controller-a"));
    assert_eq!(
        touched
            .metadata
            .labels
            .unwrap_or_default()
            .get("touched")
            .map(String::as_str),
        Some("by-the-test"),
        "the renewal keeps what the other writer changed"
    );
    assert_eq!(a.ready().await, 200);

    // SIGKILL: a stops renewing; a standby takes over once the lease has run out.
    let last_renewal = renewed(setup.cluster().lease.as_ref().unwrap()).unwrap();
    a.proc.kill();
    let killed = Instant::now();
    let b_leads = eventually(
        "a standby leads and is ready",
        Duration::from_secs(60),
        || async {
            if b.ready().await == 200 {
                return Some(true);
            }
            (c.ready().await == 200).then_some(false)
        },
    )
    .await;
    let (mut leader, mut standby) = if b_leads { (b, c) } else { (c, b) };
    let takeover = killed.elapsed();
    println!("takeover_after_sigkill_s {:.2}", takeover.as_secs_f64());
    {
        let cluster = setup.cluster();
        let took = cluster
            .requests
            .iter()
            .rfind(|r| r.what == "take-over")
            .expect("a take-over");
        let lease = took.lease.as_ref().unwrap();
        assert_eq!(holder(lease), Some(leader.identity.clone()));
        assert_eq!(spec(lease).lease_transitions, Some(1));
        assert!(
            renewed(lease).unwrap()
                >= last_renewal + k8s_openapi::jiff::SignedDuration::from_secs(15),
            "taken at {:?}, last renewed at {last_renewal}",
            renewed(lease)
        );
    }
    let (_, metrics) = leader.get("/metrics").await;
    assert!(metrics.contains("agentops_leader 1"), "{metrics}");
    // Several retries later the other standby still stands by and has written nothing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    standby.assert_standing_by().await;
    assert_eq!(leader.ready().await, 200);
    let standby_writes = setup
        .cluster()
        .writes()
        .into_iter()
        .filter(|(_, h)| h.as_deref() == Some(standby.identity.as_str()))
        .count();
    assert_eq!(standby_writes, 0, "{:?}", setup.cluster().writes());

    // SIGTERM: the leader hands the lease back before it exits; the standby takes it at
    // once, long before the lease would have run out.
    let held_until = renewed(setup.cluster().lease.as_ref().unwrap()).unwrap()
        + k8s_openapi::jiff::SignedDuration::from_secs(15);
    sigterm(&leader);
    let status = wait_exit(&mut leader, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", leader.proc.log_tail(40));
    eventually(
        "the last standby is ready",
        Duration::from_secs(30),
        || async { (standby.ready().await == 200).then_some(()) },
    )
    .await;
    {
        let cluster = setup.cluster();
        let released = cluster
            .requests
            .iter()
            .rfind(|r| r.what == "release")
            .expect("a release");
        let acquired = cluster
            .requests
            .iter()
            .rfind(|r| r.what == "acquire")
            .expect("an acquisition");
        let lease = acquired.lease.as_ref().unwrap();
        assert_eq!(holder(lease), Some(standby.identity.clone()));
        assert_eq!(spec(lease).lease_transitions, Some(2));
        assert!(
            renewed(lease).unwrap() < held_until,
            "acquired at {:?}, the released lease ran until {held_until}",
            renewed(lease)
        );
        println!(
            "takeover_after_release_s {:.2}",
            acquired.at.duration_since(released.at).as_secs_f64()
        );
    }
    sigterm(&standby);
    let status = wait_exit(&mut standby, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", standby.proc.log_tail(40));

    let cluster = setup.cluster();
    assert!(cluster.problems.is_empty(), "{:#?}", cluster.problems);
    let writes = cluster.writes();
    let renewals = |identity: &str| {
        writes
            .iter()
            .filter(|(w, h)| *w == "renew" && h.as_deref() == Some(identity))
            .count()
    };
    assert!(renewals("controller-a") >= 2, "{writes:?}");
    assert!(renewals(&leader.identity) >= 1, "{writes:?}");
    let mut handovers: Vec<(&str, Option<String>)> = writes
        .iter()
        .filter(|(w, _)| *w != "renew")
        .cloned()
        .collect();
    handovers.dedup();
    let some = |identity: &str| Some(identity.to_owned());
    assert_eq!(
        handovers,
        [
            ("create", some("controller-a")),
            ("take-over", some(&leader.identity)),
            ("release", None),
            ("acquire", some(&standby.identity)),
            ("release", None),
        ]
    );
    assert!(
        cluster.lease.as_ref().and_then(holder).is_none(),
        "released at the end"
    );
}
