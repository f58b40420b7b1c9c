//! Agents off the controller: what the API refuses them (each refusal with its status, and
//! nothing reaching the store or Git), and `agentops agent` processes doing the work of the
//! embedded agents against `up --no-agents` on Postgres.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

const SECRET: &str = "enroll-me";

fn run_task(name: &str) -> String {
    format!(
        "{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  title: Task {name}\n  action:\n    run:\n      command: [\"true\"]\n  output: {{mode: none}}\n"
    )
}

/// A bare remote holding project `p` with the tasks `names`.
fn remote_with(names: &[&str]) -> (GitRepo, BareRemote) {
    let repo = GitRepo::new();
    let project = project("p", "Remote");
    let specs: Vec<(String, String)> = names
        .iter()
        .map(|n| (format!("projects/p/tasks/{n}.yaml"), run_task(n)))
        .collect();
    let mut files: Vec<(&str, Option<&str>)> = vec![("projects/p/project.yaml", Some(&project))];
    for (path, spec) in &specs {
        files.push((path, Some(spec)));
    }
    repo.commit("tasks", &files);
    let remote = BareRemote::new();
    repo.push(&remote, "HEAD", "main");
    (repo, remote)
}

struct Http {
    http: reqwest::Client,
    base: String,
}

impl Http {
    fn new(base: &str) -> Http {
        Http {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            base: base.to_owned(),
        }
    }

    async fn post(&self, path: &str, bearer: Option<&str>, body: &Value) -> (u16, Value) {
        self.post_raw(path, bearer, serde_json::to_vec(body).unwrap())
            .await
    }

    async fn post_raw(&self, path: &str, bearer: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await.unwrap();
        let status = answer.status().as_u16();
        let text = answer.text().await.unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("POST {path} answered {status} with non-JSON: {text}"));
        (status, value)
    }

    async fn get(&self, path: &str, bearer: &str) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        let answer = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap();
        let status = answer.status().as_u16();
        let headers = answer.headers().clone();
        (status, headers, answer.bytes().await.unwrap().to_vec())
    }

    async fn register(&self, name: &str, secret: Option<&str>) -> (u16, Value) {
        self.post(
            "/api/v1/agents/register",
            secret,
            &json!({"name": name, "type": "seed"}),
        )
        .await
    }

    async fn token(&self, name: &str) -> String {
        let (status, answer) = self.register(name, Some(SECRET)).await;
        assert_eq!(status, 200, "register {name}: {answer}");
        answer["token"].as_str().unwrap().to_owned()
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

fn metric(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn lease_of(db: &TestDb, name: &str) -> (String, Option<String>, i64) {
    let rows: Vec<(String, Option<String>, i64)> = db
        .rows(&format!(
            "SELECT status, lease_owner, run_lease FROM tasks WHERE name = '{name}'"
        ))
        .await;
    rows.into_iter().next().expect("the task")
}

/// Agents that registered: those holding a token, or seen since registering (the sync adds
/// the built-in `seed` and `cos`, never seen).
async fn agents(db: &TestDb) -> i64 {
    db.scalar(
        "SELECT count(*) FROM agents WHERE last_active_at IS NOT NULL \
         OR name IN (SELECT agent_name FROM agent_sessions)",
    )
    .await
}

async fn completed(db: &TestDb) -> i64 {
    db.scalar("SELECT count(*) FROM tasks WHERE status = 'completed'")
        .await
}

fn proposal(kind: &str, name: &str, files: Value) -> Value {
    json!({"kind": kind, "name": name, "title": format!("New {kind}"), "files": files})
}

/// Every refusal an agent can meet, each with its status, and none changing the store or Git.
#[tokio::test]
async fn refusals_answer_their_status_and_change_nothing() {
    let db = TestDb::new(Backend::Postgres).await;
    let (_repo, remote) = remote_with(&["one", "two"]);
    let dir = tempfile::tempdir().unwrap();
    let mut controller = Controller::start_with(
        &db.url,
        remote.url(),
        dir.path(),
        "30s",
        "10s",
        &[
            "--agent-secret",
            SECRET,
            "--agent-rate-limit",
            "20",
            "--max-agents",
            "3",
            "--no-status",
        ],
    );
    controller.wait_ready(Duration::from_secs(60)).await;
    let api = Http::new(&controller.url);

    // Enrollment: no secret, a wrong one.
    let (status, answer) = api.register("a", None).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = api.register("a", Some("guess")).await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(answer["reason"], "wrong_secret");
    assert_eq!(
        agents(&db).await,
        0,
        "a refused registration records nothing"
    );

    let a = api.token("a").await;
    let b = api.token("b").await;

    // A live name is not given to a new registration, even with the secret, nor to the
    // holder of another name's token; its holder keeps working.
    let (status, answer) = api.register("a", Some(SECRET)).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["agent"], "a");
    assert!(
        answer["last_heartbeat"]
            .as_str()
            .is_some_and(|t| t.contains('T')),
        "{answer}"
    );
    let (status, answer) = api
        .post(
            "/api/v1/agents/register",
            Some(SECRET),
            &json!({"name": "a", "type": "seed", "token": b}),
        )
        .await;
    assert_eq!(status, 409, "another agent's token: {answer}");
    let (status, answer) = api
        .post(
            "/api/v1/claim",
            Some(&a),
            &json!({"max": 1, "wait_ms": 5000}),
        )
        .await;
    assert_eq!(status, 200, "the holder's token still works: {answer}");
    let task = answer["tasks"][0].clone();
    let id = task["id"].as_str().unwrap().to_owned();
    let name = task["name"].as_str().unwrap().to_owned();
    let run_lease = task["run_lease"].as_i64().unwrap();
    assert_eq!(agents(&db).await, 2);

    // B reports on A's task; A with a stale fencing token: 409, the lease untouched.
    let held = lease_of(&db, &name).await;
    assert_eq!(
        held,
        ("in_progress".to_owned(), Some("a".to_owned()), run_lease)
    );
    for (token, lease, what) in [
        (&b, run_lease, "another agent"),
        (&a, run_lease - 1, "stale"),
    ] {
        for (path, body) in [
            (
                format!("/api/v1/tasks/{id}/complete"),
                json!({"run_lease": lease, "result": {"by": what}}),
            ),
            (
                format!("/api/v1/tasks/{id}/fail"),
                json!({"run_lease": lease, "error": what}),
            ),
        ] {
            let (status, answer) = api.post(&path, Some(token), &body).await;
            assert_eq!(status, 409, "{what}: POST {path}: {answer}");
        }
        let (status, _, _) = api
            .get(
                &format!("/api/v1/tasks/{id}/checkout?run_lease={lease}"),
                token,
            )
            .await;
        assert_eq!(status, 409, "{what}: checkout");
    }
    assert_eq!(
        lease_of(&db, &name).await,
        held,
        "nothing reached the store"
    );

    // The holder checks its task out: the tree at its revision, as a tar archive.
    let (status, headers, archive) = api
        .get(
            &format!("/api/v1/tasks/{id}/checkout?run_lease={run_lease}"),
            &a,
        )
        .await;
    assert_eq!(status, 200);
    let commit = headers["x-agentops-commit"].to_str().unwrap().to_owned();
    assert_eq!(remote.refs()["refs/heads/main"], commit);
    let mut entries = tar::Archive::new(&archive[..]);
    let paths: Vec<String> = entries
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        paths.contains(&"projects/p/tasks/one.yaml".to_owned()),
        "{paths:?}"
    );

    // Bad proposals: 400 naming the problem, and no ref moves.
    let refs = remote.refs();
    let project_yaml =
        format!("{API}\nkind: Project\nmetadata:\n  name: web\nspec:\n  title: Web\n");
    let good = json!({"path": "projects/web/project.yaml", "content": project_yaml});
    let cases = [
        (
            proposal(
                "project",
                "web",
                json!([good, {"path": "projects/web/../../x", "content": "x"}]),
            ),
            "`..` is refused",
        ),
        (
            proposal(
                "project",
                "web",
                json!([good, {"path": "/etc/passwd", "content": "x"}]),
            ),
            "absolute paths",
        ),
        (
            proposal(
                "project",
                "web",
                json!([good, {"path": "projects/web/.git/config", "content": "x"}]),
            ),
            "`.git`",
        ),
        (
            proposal(
                "tool",
                "t",
                json!([{"path": ".agentops/status/p.yaml", "content": "x"}]),
            ),
            "`.agentops/`",
        ),
        (
            proposal(
                "project",
                "web",
                json!([good, {"path": "projects/web/l", "content": "/etc", "mode": "symlink"}]),
            ),
            "symlinks are refused",
        ),
        (
            proposal(
                "project",
                "web",
                json!([{"path": "projects/web/project.yaml", "content": format!("{API}\nkind: Project\nmetadata:\n  name: web\nspec:\n  colour: red\n")}]),
            ),
            "projects/web/project.yaml:",
        ),
        (
            proposal(
                "project",
                "p",
                json!([{"path": "projects/p/project.yaml", "content": project("p", "Again")}]),
            ),
            "already exists",
        ),
    ];
    for (body, expected) in &cases {
        let (status, answer) = api.post("/api/v1/proposals", Some(&a), body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let problems = answer["problems"].to_string();
        assert!(problems.contains(expected), "{expected}: {answer}");
    }
    let invalid = cases[5].1;
    let (_, answer) = api.post("/api/v1/proposals", Some(&a), &cases[5].0).await;
    let first = answer["problems"][0].as_str().unwrap();
    let mut parts = first.splitn(4, ':');
    assert_eq!(parts.next(), Some(invalid.trim_end_matches(':')));
    assert!(
        parts.next().is_some_and(|l| l.parse::<u32>().is_ok())
            && parts.next().is_some_and(|c| c.parse::<u32>().is_ok()),
        "path:line:column: {first}"
    );
    assert_eq!(remote.refs(), refs, "nothing reached Git");

    // A good proposal goes up on its branch.
    let (status, answer) = api
        .post(
            "/api/v1/proposals",
            Some(&a),
            &proposal("project", "web", json!([good])),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["branch"], "agentops/proposals/web");
    assert_eq!(
        remote.refs()["refs/heads/agentops/proposals/web"],
        answer["commit"].as_str().unwrap()
    );

    // An oversized body: 413 with JSON, and the controller still serves.
    let big = json!({"name": "c", "type": "seed", "capabilities": ["x".repeat(64 << 10)]});
    let (status, answer) = api
        .post("/api/v1/agents/register", Some(SECRET), &big)
        .await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["limit"], "body_size");
    assert_eq!(
        agents(&db).await,
        2,
        "the oversized registration recorded nothing"
    );

    // A claim flood over B's rate (20/s, bursts of 40): 429s, and A is not limited by it.
    let claim = json!({"max": 1, "wait_ms": 0});
    let flood = (0..100).map(|_| api.post("/api/v1/claim", Some(&b), &claim));
    let mut limited = 0;
    for (status, answer) in futures::future::join_all(flood).await {
        match status {
            429 => {
                assert_eq!(answer["limit"], "rate", "{answer}");
                limited += 1;
            }
            200 => {}
            other => panic!("claim answered {other}: {answer}"),
        }
    }
    assert!(
        limited >= 20,
        "only {limited} of 100 claims at once were over the rate"
    );
    let leased_to_b = db
        .scalar("SELECT count(*) FROM tasks WHERE lease_owner = 'b'")
        .await;
    assert!(
        leased_to_b <= 1,
        "{leased_to_b} tasks went to b: there was one"
    );
    let (status, answer) = api
        .post(
            &format!("/api/v1/tasks/{id}/progress"),
            Some(&a),
            &json!({"run_lease": run_lease, "message": "m"}),
        )
        .await;
    assert_eq!(status, 200, "the limit is per agent: {answer}");

    // The number of agents: a third registers, a fourth is refused.
    api.token("c").await;
    let (status, answer) = api.register("d", Some(SECRET)).await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["limit"], "agents");
    assert_eq!(agents(&db).await, 3);

    let metrics = api.metrics().await;
    for (line, at_least) in [
        (
            "agentops_registrations_refused_total{reason=\"wrong_secret\"}",
            1.0,
        ),
        (
            "agentops_registrations_refused_total{reason=\"no_secret\"}",
            1.0,
        ),
        (
            "agentops_registrations_refused_total{reason=\"name_held\"}",
            2.0,
        ),
        (
            "agentops_registrations_refused_total{reason=\"too_many_agents\"}",
            1.0,
        ),
        ("agentops_api_refusals_total{reason=\"not_held\"}", 4.0),
        (
            "agentops_api_refusals_total{reason=\"rate\"}",
            f64::from(limited),
        ),
        ("agentops_api_refusals_total{reason=\"body_size\"}", 1.0),
        (
            "agentops_api_refusals_total{reason=\"proposal_invalid\"}",
            7.0,
        ),
    ] {
        assert!(
            metric(&metrics, line) >= at_least,
            "{line} < {at_least}:\n{metrics}"
        );
    }
    controller.kill();
}

/// A name goes free once its holder's presence expires; the token then ends with it.
#[tokio::test]
async fn a_name_is_free_once_its_agent_is_gone_and_its_token_ends() {
    let db = TestDb::new(Backend::Postgres).await;
    let (_repo, remote) = remote_with(&["one"]);
    let dir = tempfile::tempdir().unwrap();
    let mut controller = Controller::start_with(
        &db.url,
        remote.url(),
        dir.path(),
        "2s",
        "200ms",
        &["--agent-secret", SECRET, "--no-status"],
    );
    controller.wait_ready(Duration::from_secs(60)).await;
    let api = Http::new(&controller.url);
    let old = api.token("a").await;
    let (status, _) = api.register("a", Some(SECRET)).await;
    assert_eq!(status, 409);
    // Three heartbeats (600 ms) without a sign of life: offline, and the name is free.
    let mut free = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let offline = db
            .scalar("SELECT count(*) FROM agents WHERE name = 'a' AND status = 'offline'")
            .await;
        if offline == 1 {
            free = true;
            break;
        }
    }
    assert!(free, "a was never marked offline");
    let (status, answer) = api
        .post("/api/v1/heartbeat", Some(&old), &json!({"tasks": []}))
        .await;
    assert_eq!(
        status, 401,
        "the token ended with the registration: {answer}"
    );
    let sessions = db.scalar("SELECT count(*) FROM agent_sessions").await;
    assert_eq!(sessions, 0);
    let (status, answer) = api.register("a", Some(SECRET)).await;
    assert_eq!(status, 200, "{answer}");
    controller.kill();
}

/// `path` relative to a test directory, as a string.
fn at(dir: &Path, path: &str) -> String {
    dir.join(path).display().to_string()
}

/// Four `agentops agent seed` processes work through 200 tasks while `up --no-agents` is
/// SIGKILLed and restarted eight times: every task completes, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_agents_finish_every_task_once_across_controller_kills() {
    const TASKS: usize = 200;
    const KILLS: usize = 8;
    let db = TestDb::new(Backend::Postgres).await;
    let names: Vec<String> = (0..TASKS).map(|i| format!("t{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (_repo, remote) = remote_with(&refs);
    let dir = tempfile::tempdir().unwrap();
    let mut controller = Controller::start_with(
        &db.url,
        remote.url(),
        dir.path(),
        "3s",
        "500ms",
        &[
            "--agent-secret",
            SECRET,
            "--no-status",
            "--redis",
            "redis://127.0.0.1:6379",
        ],
    );
    controller.wait_ready(Duration::from_secs(60)).await;
    // Presence keys are per name in Redis: names of this run's own.
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let mut agents: Vec<Proc> = (0..4)
        .map(|i| {
            let name = format!("seed-{run}-{i}");
            spawn_agentops_agent(
                &controller.url,
                "seed",
                &name,
                &["--agent-secret", SECRET, "--concurrency", "4"],
                Path::new(&at(dir.path(), &format!("{name}.log"))),
            )
        })
        .collect();
    let mut kills = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    while completed(&db).await < TASKS as i64 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {TASKS} completed after {kills} kills:\n{}",
            completed(&db).await,
            controller.log_tail(30)
        );
        let done = completed(&db).await;
        // Spread the kills over the run: one each time another ~1/10 of the tasks is done.
        if kills < KILLS && done >= ((kills + 1) * TASKS / (KILLS + 2)) as i64 {
            controller.kill();
            kills += 1;
            controller.spawn();
            controller.wait_serving(Duration::from_secs(60)).await;
        }
        for agent in &mut agents {
            assert!(
                agent.is_running(),
                "an agent exited:\n{}",
                agent.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kills, KILLS, "every kill came during the run");
    // Exactly once per task: one completion event and one completion update each.
    let wrong: Vec<(String, String, i64, i64)> = db
        .rows(
            "SELECT t.name, t.status, \
               (SELECT count(*) FROM events e WHERE e.event_type = 'task.completed' \
                  AND e.payload->>'id' = CAST(t.id AS text)), \
               (SELECT count(*) FROM task_updates u WHERE u.update_type = 'completion' \
                  AND u.task_id = t.id) \
             FROM tasks t WHERE t.source IS NOT NULL ORDER BY t.name",
        )
        .await;
    assert_eq!(wrong.len(), TASKS, "no task lost or added");
    let wrong: Vec<_> = wrong
        .into_iter()
        .filter(|(_, status, events, updates)| {
            status != "completed" || *events != 1 || *updates != 1
        })
        .collect();
    assert!(wrong.is_empty(), "not completed exactly once: {wrong:?}");
    for agent in &mut agents {
        agent.kill();
    }
    controller.kill();
}

/// The example repository, plus a task that needs a tool nobody wrote yet.
fn example_repo(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    published_repo(dir, |work| {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for entry in walkdir::WalkDir::new(&examples).min_depth(1) {
            let entry = entry.unwrap();
            let target = work.join(entry.path().strip_prefix(&examples).unwrap());
            if entry.file_type().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
            } else {
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
        let tasks = work.join("projects/shouting/tasks");
        std::fs::create_dir_all(&tasks).unwrap();
        std::fs::write(
            work.join("projects/shouting/project.yaml"),
            format!(
                "{API}\nkind: Project\nmetadata:\n  name: shouting\nspec:\n  title: Shouting\n"
            ),
        )
        .unwrap();
        std::fs::write(
            tasks.join("shout.yaml"),
            format!(
                "{API}\nkind: Task\nmetadata:\n  name: shout\nspec:\n  title: Shout the greeting\n  \
                 action:\n    tool:\n      name: shout\n      with: {{text: hello, out: out/shout.txt}}\n  \
                 output: {{mode: commit, paths: [out/]}}\n"
            ),
        )
        .unwrap();
    })
}

fn branches(clone: &Path) -> Vec<String> {
    git(clone, &["fetch", "-q", "--prune", "origin"]);
    git(clone, &["reset", "-q", "--hard", "origin/main"]);
    git(clone, &["branch", "-r", "--format=%(refname:short)"])
        .lines()
        .filter_map(|b| b.strip_prefix("origin/"))
        .filter(|b| b.starts_with("agentops/"))
        .map(str::to_owned)
        .collect()
}

fn merge(clone: &Path, branch: &str) {
    git(
        clone,
        &["merge", "-q", "--no-edit", &format!("origin/{branch}")],
    );
    git(clone, &["push", "-q", "origin", "main"]);
}

/// `up --no-agents` on Postgres, NATS and Redis, and the Seed, the Chief of Staff and the
/// example specialists as `agentops agent` processes, complete the example repository
/// offline: the `plan` task's proposal branch is made through the controller, and a missing
/// tool is drafted, proposed through it, merged and then used.
#[tokio::test]
async fn agent_processes_complete_the_example_offline() {
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let (remote, clone) = example_repo(dir.path());
    let prefix = format!("e2e{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let url = format!("file://{}", remote.display());
    let mut controller = Controller::start_with(
        &db.url,
        url.as_str(),
        dir.path(),
        "30s",
        "1s",
        &[
            "--agent-secret",
            SECRET,
            "--exit-when-idle",
            "--status-interval",
            "200ms",
            "--nats",
            "nats://127.0.0.1:4222",
            "--bus-prefix",
            &prefix,
            "--redis",
            "redis://127.0.0.1:6379",
        ],
    );
    controller.kill();
    let mut merged: Vec<String> = Vec::new();
    let mut tool_merged = false;
    for round in 0..12 {
        controller.spawn();
        controller.wait_serving(Duration::from_secs(60)).await;
        let common = [
            "--agent-secret",
            SECRET,
            "--nats",
            "nats://127.0.0.1:4222",
            "--bus-prefix",
            &prefix,
        ];
        let mut agents = Vec::new();
        for (role, name, extra) in [
            (
                "seed",
                "seed-remote",
                &["--capabilities", "writing,research,code"][..],
            ),
            ("cos", "cos-remote", &[][..]),
            ("copywriter", "copywriter", &[][..]),
            ("researcher", "researcher", &[][..]),
        ] {
            let mut args: Vec<&str> = common.to_vec();
            args.extend_from_slice(extra);
            let log = dir.path().join(format!("{name}-{round}.log"));
            agents.push(spawn_agentops_agent(
                &controller.url,
                role,
                name,
                &args,
                &log,
            ));
        }
        // The controller exits once no task can move without a person.
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        while controller.is_running() {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round} did not go idle:\n{}\n{}",
                controller.log_tail(30),
                agents[0].log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for agent in &mut agents {
            agent.kill();
        }
        let tasks: Vec<(String, String)> = db
            .rows("SELECT name, status FROM tasks WHERE source IS NOT NULL ORDER BY name")
            .await;
        if tasks.iter().all(|(_, s)| s == "completed") {
            break;
        }
        for branch in branches(&clone) {
            let result = !branch.starts_with("agentops/proposals/");
            let tool = branch == "agentops/proposals/tool-shout";
            if (result || (tool && !tool_merged)) && !merged.contains(&branch) {
                merge(&clone, &branch);
                tool_merged |= tool;
                merged.push(branch);
            }
        }
    }
    let tasks: Vec<(String, String)> = db
        .rows("SELECT name, status FROM tasks WHERE source IS NOT NULL ORDER BY name")
        .await;
    assert_eq!(tasks.len(), 10, "{tasks:?}");
    assert!(tasks.iter().all(|(_, s)| s == "completed"), "{tasks:?}");
    assert!(tool_merged, "the missing tool was proposed: {merged:?}");
    let proposals = branches(&clone);
    assert!(
        proposals
            .iter()
            .any(|b| b.starts_with("agentops/proposals/") && !b.contains("tool-")),
        "the plan task's proposal branch: {proposals:?}"
    );
    // Work reached main through result branches and commits: written offline, by the
    // example's tool, and by the tool that was proposed and merged.
    let copy = std::fs::read_to_string(clone.join("site/copy.md")).unwrap();
    assert!(copy.to_lowercase().contains("offline"), "{copy}");
    let pricing = std::fs::read_to_string(clone.join("research/pricing.md")).unwrap();
    assert!(pricing.contains("## competitors.md"), "{pricing}");
    let shout = std::fs::read_to_string(clone.join("out/shout.log")).unwrap();
    assert!(
        shout.contains("tools/shout.") && shout.contains("exit status: 0"),
        "the proposed tool ran: {shout}"
    );
    // Every task was done by a process, none by the controller itself.
    let done_by: Vec<(String,)> = db
        .rows(
            "SELECT DISTINCT payload->>'agent' FROM events WHERE event_type = 'task.completed' \
             ORDER BY 1",
        )
        .await;
    for (agent,) in &done_by {
        assert!(
            ["seed-remote", "cos-remote", "copywriter", "researcher"].contains(&agent.as_str()),
            "{done_by:?}"
        );
    }
}

/// Work that needs a capability no agent has, with the agents off the controller: an
/// `agentops agent seed` process learns of it from the controller, drafts a specialist and
/// proposes it through `POST /api/v1/proposals`; once a person merges the spec, an
/// `agentops agent NAME` process runs it and completes the task. Only a `seed` agent may ask
/// what no agent can take.
#[tokio::test]
async fn a_remote_seed_proposes_a_missing_specialist_that_then_runs() {
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let (remote, clone) = published_repo(dir.path(), |work| {
        std::fs::create_dir_all(work.join("projects/words/tasks")).unwrap();
        std::fs::write(
            work.join("projects/words/project.yaml"),
            format!("{API}\nkind: Project\nmetadata:\n  name: words\nspec:\n  title: Words\n"),
        )
        .unwrap();
        std::fs::write(
            work.join("projects/words/tasks/translate.yaml"),
            format!(
                "{API}\nkind: Task\nmetadata:\n  name: translate\nspec:\n  title: Translate the \
                 greeting\n  assignee: specialist\n  capabilities: [translation]\n  action:\n    \
                 prompt: Translate hello into French and write out/hello-fr.md\n  output: {{mode: \
                 commit, paths: [out/]}}\n"
            ),
        )
        .unwrap();
    });
    let url = format!("file://{}", remote.display());
    let mut controller = Controller::start_with(
        &db.url,
        url.as_str(),
        dir.path(),
        "30s",
        "1s",
        &["--agent-secret", SECRET, "--poll-interval", "1s"],
    );
    controller.wait_ready(Duration::from_secs(60)).await;
    let http = Http::new(&controller.url);

    // Asking as another role is refused, and counted.
    let (status, answer) = http
        .post(
            "/api/v1/agents/register",
            Some(SECRET),
            &json!({"name": "cos-probe", "type": "cos"}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let cos_token = answer["token"].as_str().unwrap().to_owned();
    let (status, _, body) = http.get("/api/v1/specialists/gaps", &cos_token).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert!(
        String::from_utf8_lossy(&body).contains("only a seed agent"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        metric(
            &http.metrics().await,
            "agentops_api_refusals_total{reason=\"forbidden\"}"
        ),
        1.0
    );
    // A seed is told the gap, and the names it may not take.
    let seed_token = http.token("seed-probe").await;
    let (status, _, body) = http.get("/api/v1/specialists/gaps", &seed_token).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let gaps: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        gaps["gaps"][0]["capabilities"],
        json!(["translation"]),
        "{gaps}"
    );
    assert_eq!(gaps["gaps"][0]["title"], "Translate the greeting", "{gaps}");
    assert!(
        gaps["taken"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "seed-probe"),
        "{gaps}"
    );

    let mut seed = spawn_agentops_agent(
        &controller.url,
        "seed",
        "seed-remote",
        &["--agent-secret", SECRET],
        &dir.path().join("seed.log"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let branch = loop {
        if let Some(b) = branches(&clone)
            .into_iter()
            .find(|b| b.starts_with("agentops/proposals/agent-"))
        {
            break b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no specialist was proposed:\n{}\n{}",
            seed.log_tail(20),
            controller.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        lease_of(&db, "translate").await.0,
        "pending",
        "nobody could take it"
    );
    let name = branch
        .trim_start_matches("agentops/proposals/agent-")
        .to_owned();
    git(&clone, &["checkout", "-q", &format!("origin/{branch}")]);
    let spec = std::fs::read_to_string(clone.join(format!("agents/{name}.yaml"))).unwrap();
    assert!(
        spec.contains("kind: Agent") && spec.contains("translation"),
        "{spec}"
    );
    git(&clone, &["checkout", "-q", "main"]);
    merge(&clone, &branch);

    // Once the controller has synced the merged spec, the specialist runs as its own process.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut specialist = None;
    while lease_of(&db, "translate").await.0 != "completed" {
        assert!(
            std::time::Instant::now() < deadline,
            "the specialist did not complete the task:\n{}",
            controller.log_tail(20)
        );
        if specialist.is_none() {
            let synced = db
                .scalar(&format!(
                    "SELECT count(*) FROM agents WHERE name = '{name}' AND pruned_at IS NULL"
                ))
                .await;
            if synced == 1 {
                specialist = Some(spawn_agentops_agent(
                    &controller.url,
                    &name,
                    &name,
                    &["--agent-secret", SECRET],
                    &dir.path().join("specialist.log"),
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let by: Vec<(Option<String>,)> = db
        .rows("SELECT assigned_to FROM tasks WHERE name = 'translate'")
        .await;
    assert_eq!(
        by[0].0.as_deref(),
        Some(name.as_str()),
        "the specialist did it"
    );
    seed.kill();
    if let Some(mut specialist) = specialist {
        specialist.kill();
    }
    controller.kill();
}
