//! Crash safety of dispatch with real processes: the `agentops up` controller on Postgres and a
//! loopback port, `agentops-agent-run` agents, tasks from a generated Git repository, and
//! SIGKILL. Whatever dies when, every task is completed exactly once: one `task.completed`
//! event and one `completion` task update each, and a report under a lost lease is refused.
//!
//! Leases are short (`--lease 2s --heartbeat 500ms`) so that expiries happen within seconds.
//! Every child process is in a guard that SIGKILLs its process group on drop, also when an
//! assertion panics. Processes log to files in the test's temporary directory; failures show
//! their last lines.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::PgPool;

const LEASE: &str = "2s";
const HEARTBEAT: &str = "500ms";
const LEASE_TIME: Duration = Duration::from_secs(2);
const HEARTBEAT_TIME: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// A task of project `p` that runs `argv`, retried up to `retries` times.
fn run_task(name: &str, argv: &[&str], retries: u32) -> String {
    // A JSON array of strings is a YAML flow sequence of double-quoted strings.
    let argv = serde_json::to_string(argv).unwrap();
    format!(
        "{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  title: Task {name}\n  retries: {retries}\n  action:\n    run:\n      command: {argv}\n"
    )
}

/// A repository with project `p` and the given tasks (name, spec) in one commit.
fn repo_with(tasks: &[(String, String)]) -> GitRepo {
    let repo = GitRepo::new();
    let project = project("p", "Dispatch");
    let paths: Vec<String> = tasks
        .iter()
        .map(|(name, _)| format!("projects/p/tasks/{name}.yaml"))
        .collect();
    let mut files: Vec<(&str, Option<&str>)> = vec![("projects/p/project.yaml", Some(&project))];
    for (path, (_, spec)) in paths.iter().zip(tasks) {
        files.push((path, Some(spec)));
    }
    repo.commit("tasks", &files);
    repo
}

fn pg(db: &TestDb) -> &PgPool {
    match &db.pool {
        Pool::Pg(pool) => pool,
        Pool::Sqlite(_) => unreachable!("the dispatch tests run on Postgres"),
    }
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pg(db))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// One task's dispatch columns.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct TaskState {
    id: String,
    status: String,
    lease_owner: Option<String>,
    attempt: i32,
    run_lease: i64,
}

async fn task_state(db: &TestDb, name: &str) -> TaskState {
    sqlx::query_as(
        "SELECT CAST(id AS text) AS id, status, lease_owner, attempt, run_lease \
         FROM tasks WHERE name = $1",
    )
    .bind(name)
    .fetch_one(pg(db))
    .await
    .unwrap_or_else(|e| panic!("task {name}: {e}"))
}

/// Events of `event_type` about task `id`, oldest first, as (agent, run_lease, attempt).
async fn task_events(db: &TestDb, event_type: &str, id: &str) -> Vec<(String, i64, i64)> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT payload FROM events WHERE event_type = $1 AND payload->>'id' = $2 \
         ORDER BY created_at",
    )
    .bind(event_type)
    .bind(id)
    .fetch_all(pg(db))
    .await
    .unwrap();
    rows.into_iter()
        .map(|(p,)| {
            (
                p["agent"].as_str().unwrap_or("").to_owned(),
                p["run_lease"].as_i64().unwrap(),
                p["attempt"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Task updates of `update_type` about task `id`, oldest first, as (agent, message).
async fn task_updates(db: &TestDb, update_type: &str, id: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT agent_name, message FROM task_updates \
         WHERE update_type = $1 AND task_id = CAST($2 AS uuid) ORDER BY created_at",
    )
    .bind(update_type)
    .bind(id)
    .fetch_all(pg(db))
    .await
    .unwrap()
}

/// Raw calls to the agent protocol, for the tests that check its answers one by one.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(base: &str) -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            base: base.to_owned(),
        }
    }

    /// POST `path` with `body` and, if given, `Authorization: <auth>`; the status and the
    /// JSON answer (`null` if it is not JSON).
    async fn post(&self, path: &str, auth: Option<&str>, body: &Value) -> (u16, Value) {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        let answer = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = answer.status().as_u16();
        let body = answer.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// POST with the agent's token.
    async fn call(&self, token: &str, path: &str, body: &Value) -> (u16, Value) {
        self.post(path, Some(&format!("Bearer {token}")), body)
            .await
    }

    /// Registers a `seed` agent and returns its token; checks the answer.
    async fn register(&self, name: &str) -> String {
        self.register_holding(name, None).await
    }

    /// Registers again as the holder of `token`, which a live name needs.
    async fn register_holding(&self, name: &str, token: Option<&str>) -> String {
        let (status, answer) = self
            .post(
                "/api/v1/agents/register",
                None,
                &json!({"name": name, "type": "seed", "token": token}),
            )
            .await;
        assert_eq!(status, 200, "register {name}: {answer}");
        assert_eq!(answer["agent"], name);
        // The lease and heartbeat as configured, fractions included.
        assert_eq!(answer["lease_seconds"].as_f64(), Some(2.0), "{answer}");
        assert_eq!(answer["heartbeat_seconds"].as_f64(), Some(0.5), "{answer}");
        answer["token"].as_str().expect("a token").to_owned()
    }

    async fn claim(&self, token: &str, wait_ms: u64) -> Vec<Value> {
        let (status, answer) = self
            .call(
                token,
                "/api/v1/claim",
                &json!({"max": 1, "wait_ms": wait_ms}),
            )
            .await;
        assert_eq!(status, 200, "claim: {answer}");
        answer["tasks"].as_array().expect("tasks").clone()
    }
}

/// A scratch database, a repository with `tasks`, and a controller on them, ready.
struct Setup {
    controller: Controller,
    // Dropped after the controller (fields drop in order): the database outlives its users.
    db: TestDb,
    _repo: GitRepo,
    /// The processes' logs and the controller's data directory; kept when the test fails, or
    /// always with `AGENTOPS_TEST_KEEP=1`.
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
    /// Starts the controller; it may not be ready yet.
    async fn start(tasks: &[(String, String)]) -> Setup {
        let db = TestDb::new(Backend::Postgres).await;
        let repo = repo_with(tasks);
        let dir = tempfile::Builder::new()
            .prefix("agentops-dispatch-")
            .tempdir()
            .unwrap();
        let controller = Controller::start(&db.url, repo.path(), dir.path(), LEASE, HEARTBEAT);
        Setup {
            controller,
            db,
            _repo: repo,
            dir: Some(dir),
        }
    }

    /// Waits until the controller is ready with all `expected` tasks in the store.
    async fn ready(&mut self, expected: usize) {
        self.controller.wait_ready(Duration::from_secs(60)).await;
        let synced = count(
            &self.db,
            "SELECT count(*) FROM tasks WHERE source IS NOT NULL",
        )
        .await;
        assert_eq!(synced, expected as i64, "every task reached the store");
    }

    /// Starts the controller and waits until it is ready.
    async fn new(tasks: &[(String, String)]) -> Setup {
        let mut setup = Setup::start(tasks).await;
        setup.ready(tasks.len()).await;
        setup
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().expect("the test's directory").path()
    }

    fn agent(&self, name: &str, concurrency: usize) -> Proc {
        let log = self.path().join(format!("{name}.log"));
        spawn_agent(&self.controller.url, name, concurrency, &log)
    }
}

// ---------------------------------------------------------------------------------------------
// 1. An agent SIGKILLed mid-task
// ---------------------------------------------------------------------------------------------

/// Agent A takes the only task, whose command sleeps; A is SIGKILLed while it runs. The task
/// stays A's until the lease runs out (nobody heartbeats it), then goes to agent B as attempt
/// 1 and is completed once, by B. A coming back and reporting its old lease is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_task_loses_it_to_another_agent_after_the_lease() {
    let scratch = tempfile::tempdir().unwrap();
    let runs = scratch.path().join("runs");
    // Each run appends its pid: the runs are counted and the strays killed. The first sleeps
    // long enough to outlive the wait below if it survived its agent; the retry sleeps briefly.
    let command = format!(
        "[ -s {runs} ] && pause=3 || pause=30; echo $$ >> {runs}; exec sleep $pause",
        runs = runs.display()
    );
    let setup = Setup::new(&[(
        "slow".to_owned(),
        run_task("slow", &["sh", "-c", &command], 2),
    )])
    .await;
    let db = &setup.db;
    let mut strays = Strays::default();
    let read_runs = || -> Vec<u32> {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().parse().expect("a pid"))
            .collect()
    };

    let mut a = setup.agent("agent-a", 1);
    let first = eventually("agent-a runs the task", Duration::from_secs(20), || async {
        let state = task_state(db, "slow").await;
        let running = state.lease_owner.as_deref() == Some("agent-a") && !read_runs().is_empty();
        running.then_some(state)
    })
    .await;
    assert_eq!(
        (first.status.as_str(), first.attempt, first.run_lease),
        ("in_progress", 0, 1)
    );
    // Let a heartbeat or two go by, so that the lease the kill leaves behind is a renewed one.
    tokio::time::sleep(HEARTBEAT_TIME * 2).await;
    assert!(a.is_running(), "agent-a is alive:\n{}", a.log_tail(20));

    // SIGKILL to the agent's process group, and reaped: it runs no code of its own after this.
    let a_pid = a.pid();
    a.kill();
    let killed_at = Instant::now();
    assert!(!pid_alive(a_pid), "agent-a is dead");
    read_runs().into_iter().for_each(|pid| strays.add(pid));
    // The command dies with its agent (the kernel's parent-death signal), well before the
    // lease would hand the task to someone else: the work is not done twice. The kernel
    // signals it at once; the wait is for it to be reaped.
    let a_runs = read_runs();
    assert_eq!(a_runs.len(), 1, "agent-a ran the command once: {a_runs:?}");
    eventually(
        "agent-a's command dies with agent-a",
        Duration::from_secs(2),
        || async { (!a_runs.iter().copied().any(pid_alive)).then_some(()) },
    )
    .await;

    let mut b = setup.agent("agent-b", 1);
    let second = eventually(
        "agent-b takes the task over",
        Duration::from_secs(20),
        || async {
            let state = task_state(db, "slow").await;
            (state.lease_owner.as_deref() == Some("agent-b")).then_some(state)
        },
    )
    .await;
    let taken_after = killed_at.elapsed();
    // A's last heartbeat was at most one interval before the kill; its lease ran a full lease
    // from there. Sooner would mean the task was handed out while A still held it.
    assert!(
        taken_after >= LEASE_TIME - HEARTBEAT_TIME - Duration::from_millis(100),
        "re-dispatched {taken_after:?} after the kill, within the {LEASE_TIME:?} lease"
    );
    assert_eq!((second.attempt, second.run_lease), (1, 2), "{second:?}");

    let done = eventually("the task is completed", Duration::from_secs(30), || async {
        let state = task_state(db, "slow").await;
        (state.status != "in_progress" && state.status != "pending").then_some(state)
    })
    .await;
    read_runs().into_iter().for_each(|pid| strays.add(pid));
    assert!(b.is_running(), "agent-b is alive:\n{}", b.log_tail(20));
    assert_eq!(
        (
            done.status.as_str(),
            done.attempt,
            done.run_lease,
            done.lease_owner.as_deref()
        ),
        ("completed", 1, 2, None),
        "{done:?}\n{}",
        b.log_tail(20)
    );

    let id = &done.id;
    assert_eq!(
        task_events(db, "task.claimed", id).await,
        [("agent-a".to_owned(), 1, 0), ("agent-b".to_owned(), 2, 1)]
    );
    assert_eq!(
        task_events(db, "task.lease_expired", id).await,
        [("agent-a".to_owned(), 1, 0)]
    );
    assert_eq!(
        task_events(db, "task.completed", id).await,
        [("agent-b".to_owned(), 2, 1)]
    );
    let completions = task_updates(db, "completion", id).await;
    assert_eq!(completions.len(), 1, "{completions:?}");
    assert_eq!(completions[0].0, "agent-b");
    assert_eq!(
        task_updates(db, "error", id).await,
        [("agent-a".to_owned(), "lease expired".to_owned())]
    );
    // By the database's clock: the lease ran out a full lease after A was last heard from
    // (its last heartbeat), not before.
    let silent: f64 = sqlx::query_scalar(
        "SELECT CAST(EXTRACT(EPOCH FROM (e.created_at - a.last_active_at)) AS float8) \
         FROM events e, agents a WHERE e.event_type = 'task.lease_expired' \
         AND e.payload->>'id' = $1 AND a.name = 'agent-a'",
    )
    .bind(id)
    .fetch_one(pg(db))
    .await
    .unwrap();
    assert!(
        silent >= LEASE_TIME.as_secs_f64(),
        "the lease expired {silent} s after agent-a's last heartbeat"
    );
    // The command ran twice: A's run (orphaned by the kill, as the agent runs commands in a
    // process group of their own) and B's.
    assert_eq!(read_runs().len(), 2, "runs: {:?}", read_runs());

    // A comes back under its name and reports what it was doing: all refused.
    let api = Api::new(&setup.controller.url);
    let token = api.register("agent-a").await;
    let path = |verb: &str| format!("/api/v1/tasks/{id}/{verb}");
    for (verb, body) in [
        (
            "complete",
            json!({"run_lease": 1, "result": {"late": true}}),
        ),
        ("progress", json!({"run_lease": 1, "message": "late"})),
        (
            "fail",
            json!({"run_lease": 1, "error": "late", "retryable": true}),
        ),
    ] {
        let (status, answer) = api.call(&token, &path(verb), &body).await;
        assert_eq!(status, 409, "late {verb}: {answer}");
    }
    let (status, answer) = api
        .call(
            &token,
            "/api/v1/complete",
            &json!({"tasks": [{"id": id, "run_lease": 1}]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["tasks"][0]["ok"], false, "{answer}");

    assert_eq!(task_events(db, "task.completed", id).await.len(), 1);
    assert_eq!(task_updates(db, "completion", id).await.len(), 1);
    assert_eq!(task_updates(db, "progress", id).await.len(), 0);
    assert_eq!(task_state(db, "slow").await, done);
}

/// Like the kill, but agent A is frozen (SIGSTOP) instead, and thawed once B has completed
/// the task: A's own late report (or its heartbeat's `held: false`) changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_that_wakes_after_losing_its_lease_reports_nothing_that_counts() {
    let scratch = tempfile::tempdir().unwrap();
    let runs = scratch.path().join("runs");
    let command = format!("echo $$ >> {}; exec sleep 1", runs.display());
    let setup = Setup::new(&[(
        "nap".to_owned(),
        run_task("nap", &["sh", "-c", &command], 2),
    )])
    .await;
    let db = &setup.db;
    let run_count = || {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count()
    };

    let mut a = setup.agent("agent-a", 1);
    eventually("agent-a runs the task", Duration::from_secs(20), || async {
        let state = task_state(db, "nap").await;
        (state.lease_owner.as_deref() == Some("agent-a") && run_count() == 1).then_some(())
    })
    .await;
    // The command, in a process group of its own, runs on and exits; A cannot see it.
    a.signal_group(libc::SIGSTOP);

    let mut b = setup.agent("agent-b", 1);
    let done = eventually(
        "agent-b completes the task",
        Duration::from_secs(30),
        || async {
            let state = task_state(db, "nap").await;
            (state.status == "completed").then_some(state)
        },
    )
    .await;
    assert_eq!((done.attempt, done.run_lease), (1, 2), "{done:?}");

    a.signal_group(libc::SIGCONT);
    // Long enough for A's tokio timers to fire, its child's exit to be seen, and a completion
    // or a heartbeat to reach the controller.
    eventually(
        "agent-a says it lost the lease",
        Duration::from_secs(10),
        || async {
            let log = a.log_tail(50);
            let lost = log.contains("lease lost") || log.contains("lease is no longer ours");
            lost.then_some(())
        },
    )
    .await;
    assert!(a.is_running(), "agent-a survives:\n{}", a.log_tail(20));
    assert!(b.is_running(), "agent-b survives:\n{}", b.log_tail(20));

    let id = &done.id;
    assert_eq!(
        task_events(db, "task.completed", id).await,
        [("agent-b".to_owned(), 2, 1)],
        "agent-a:\n{}",
        a.log_tail(20)
    );
    assert_eq!(task_updates(db, "completion", id).await.len(), 1);
    assert_eq!(task_state(db, "nap").await, done);
}

// ---------------------------------------------------------------------------------------------
// 2. The controller SIGKILLed again and again during a run
// ---------------------------------------------------------------------------------------------

const RUN_TASKS: usize = 2_000;
/// 20 agent processes of concurrency 1: 20 tasks at once, and 20 separate clients that must
/// each find the controller again after every restart.
const RUN_AGENTS: usize = 20;
/// Kills of a serving controller at random points of the run…
const RUN_KILLS: usize = 12;
/// …and kills soon after a restart, whether it is serving yet or not.
const STARTUP_KILLS: usize = 3;

#[derive(Debug)]
enum KillPoint {
    /// Once the controller serves agents (or, `after_sync`, is ready) and has completed
    /// `share` of its part of the tasks left then.
    Serving {
        share: f64,
        delay: Duration,
        after_sync: bool,
    },
    /// A moment after the restart, whatever it is doing.
    Startup { delay: Duration },
}

/// 2,000 near no-op tasks, 20 agent processes; the controller is SIGKILLed once during its
/// first start (migrations or the first sync), at 12 random points of the run and 3 times
/// soon after a restart, and restarted each time on the same database, repository, data
/// directory and port. Every task ends `completed` with exactly one completion event and one
/// completion update, from the agent that held its last lease; no task is lost or added; every
/// agent outlives every restart.
///
/// A serving kill comes after a random share of the tasks left when the controller began to
/// serve agents, so that every kill lands inside the run however fast the machine is; a
/// startup kill comes a random delay after a restart. `AGENTOPS_TEST_SEED` replays a seed's
/// kill points (not its timing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_at_random_points_loses_and_doubles_no_task() {
    let seed: u64 = std::env::var("AGENTOPS_TEST_SEED")
        .ok()
        .map(|s| s.parse().expect("AGENTOPS_TEST_SEED is a number"))
        .unwrap_or_else(rand::random);
    println!("seed {seed} (AGENTOPS_TEST_SEED={seed} replays the kill points)");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let tasks: Vec<(String, String)> = (1..=RUN_TASKS)
        .map(|i| {
            let name = format!("t-{i:04}");
            // A claim whose answer a kill lost comes back after its lease as a new attempt, as
            // may a task whose report could not get through in time: leave room for those.
            let spec = run_task(&name, &["true"], 100);
            (name, spec)
        })
        .collect();
    let mut setup = Setup::start(&tasks).await;
    // The first kill: during the migrations or the first sync, which writes the 2,000 tasks.
    tokio::time::sleep(Duration::from_millis(rng.random_range(50..1_000))).await;
    let migrated = count(
        &setup.db,
        "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() \
         AND tablename = 'tasks'",
    )
    .await
        == 1;
    setup.controller.kill();
    println!(
        "kill #0 while starting for the first time ({:?} after the test started, {})",
        started.elapsed(),
        if migrated {
            "migrated"
        } else {
            "not migrated yet"
        }
    );
    setup.controller.spawn();
    setup.ready(RUN_TASKS).await;
    let db = &setup.db;
    println!("{RUN_TASKS} tasks synced after {:?}", started.elapsed());

    let mut agents: Vec<Proc> = (1..=RUN_AGENTS)
        .map(|i| setup.agent(&format!("runner-{i:02}"), 1))
        .collect();

    let completed = || count(db, "SELECT count(*) FROM tasks WHERE status = 'completed'");
    // Serving kills: once the restarted controller answers agents, after a random share of
    // the tasks left then (up to 60% of its part), so that the kills spread over the run
    // however fast it goes: each share leaves room for the kills still to come. A restarted
    // controller serves agents while its first sync re-reads the repository, which takes
    // longer than a share of the tasks, so most serving kills hit that; the first comes in
    // the steady state after a sync. Startup kills: a delay after a restart, before the
    // controller answers or just after (migrations, the sync, the first sweep, agents coming
    // back); never the last kill, which could otherwise come after the run.
    let mut points: Vec<KillPoint> = (0..RUN_KILLS)
        .map(|n| KillPoint::Serving {
            share: rng.random_range(0.05..=0.6),
            delay: Duration::from_millis(rng.random_range(0..40)),
            after_sync: n == 0,
        })
        .collect();
    for _ in 0..STARTUP_KILLS {
        let at = rng.random_range(1..points.len());
        let delay = Duration::from_millis(rng.random_range(0..600));
        points.insert(at, KillPoint::Startup { delay });
    }
    println!("kill points: {points:?}");

    // (completed tasks when killed, whether it was serving)
    let mut kills: Vec<(i64, bool)> = Vec::new();
    for (index, point) in points.iter().enumerate() {
        let delay = match point {
            KillPoint::Startup { delay } => *delay,
            KillPoint::Serving {
                share,
                delay,
                after_sync,
            } => {
                if *after_sync {
                    setup.controller.wait_ready(Duration::from_secs(30)).await;
                } else {
                    setup.controller.wait_serving(Duration::from_secs(30)).await;
                }
                let at_serving = completed().await;
                // Kills to come, this one included, and four more shares for the run's end: a
                // restart also completes the tasks whose reports waited for it, on top.
                let shares = (points.len() - index + 4) as f64;
                let left = (RUN_TASKS as i64 - at_serving) as f64;
                let done = at_serving + ((left / shares) * share).ceil() as i64;
                eventually(
                    &format!("{done} tasks are completed"),
                    Duration::from_secs(60),
                    || async { (completed().await >= done).then_some(()) },
                )
                .await;
                *delay
            }
        };
        tokio::time::sleep(delay).await;
        // Serving: its API answers agents, whether or not its first sync is done (`/readyz`
        // 503 until then).
        let answer = if setup.controller.is_running() {
            reqwest::get(format!("{}/readyz", setup.controller.url))
                .await
                .ok()
                .map(|r| r.status())
        } else {
            None
        };
        let serving = answer.is_some();
        let before = completed().await;
        setup.controller.kill();
        println!(
            "kill #{} at {before} completed ({}, {:?} after the test started)",
            kills.len() + 1,
            match answer {
                Some(reqwest::StatusCode::OK) => "serving, synced",
                Some(_) => "serving, syncing",
                None => "starting",
            },
            started.elapsed()
        );
        kills.push((before, serving));
        // Down for a moment, as a supervisor would restart it.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        setup.controller.spawn();
    }
    setup.controller.wait_ready(Duration::from_secs(30)).await;
    println!("last restart after {:?}", started.elapsed());

    let finished = eventually(
        "every task is completed",
        Duration::from_secs(60),
        || async {
            let failed = count(db, "SELECT count(*) FROM tasks WHERE status = 'failed'").await;
            assert_eq!(
                failed,
                0,
                "tasks failed:\n{}",
                setup.controller.log_tail(30)
            );
            (completed().await == RUN_TASKS as i64).then_some(Instant::now())
        },
    )
    .await;
    println!("all completed after {:?}", started.elapsed());

    // The kills came during the run, at least 12 of them while it was serving.
    assert_eq!(kills.len(), RUN_KILLS + STARTUP_KILLS);
    for (before, _) in &kills {
        assert!(
            *before < RUN_TASKS as i64,
            "a kill after the run ended: {kills:?}"
        );
    }
    let serving = kills.iter().filter(|(_, serving)| *serving).count();
    assert!(
        serving >= RUN_KILLS,
        "only {serving} kills hit a serving controller: {kills:?}"
    );

    // Every agent lived through every restart.
    for agent in &mut agents {
        let status = agent.exit_status();
        assert!(
            status.is_none(),
            "{} died: {status:?}\n{}",
            agent.name,
            agent.log_tail(20)
        );
    }

    // Exactly once, per task.
    let per_task: Vec<(String, String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT t.name, t.status, t.run_lease, \
           (SELECT count(*) FROM events e WHERE e.event_type = 'task.completed' \
              AND e.payload->>'id' = CAST(t.id AS text)), \
           (SELECT count(*) FROM task_updates u WHERE u.update_type = 'completion' \
              AND u.task_id = t.id), \
           (SELECT max(CAST(e.payload->>'run_lease' AS bigint)) FROM events e \
              WHERE e.event_type = 'task.completed' AND e.payload->>'id' = CAST(t.id AS text)) \
         FROM tasks t WHERE t.source IS NOT NULL ORDER BY t.name",
    )
    .fetch_all(pg(db))
    .await
    .unwrap();
    let names: Vec<&str> = per_task.iter().map(|t| t.0.as_str()).collect();
    let expected: Vec<String> = (1..=RUN_TASKS).map(|i| format!("t-{i:04}")).collect();
    assert_eq!(names, expected, "no task lost or added");
    let wrong: Vec<_> = per_task
        .iter()
        .filter(|(_, status, run_lease, events, updates, completed_lease)| {
            status != "completed" || *events != 1 || *updates != 1 || completed_lease != run_lease
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "tasks not completed exactly once by their last lease holder \
         (name, status, run_lease, completion events, completion updates, completed lease): \
         {wrong:?}"
    );
    let total_events = count(
        db,
        "SELECT count(*) FROM events WHERE event_type = 'task.completed'",
    )
    .await;
    let total_updates = count(
        db,
        "SELECT count(*) FROM task_updates WHERE update_type = 'completion'",
    )
    .await;
    assert_eq!(
        (total_events, total_updates),
        (RUN_TASKS as i64, RUN_TASKS as i64)
    );
    // The first sync, killed or not, created each task once.
    let created = count(
        db,
        "SELECT count(*) FROM events WHERE event_type = 'task.created'",
    )
    .await;
    assert_eq!(created, RUN_TASKS as i64);

    let event_counts: BTreeMap<String, i64> = sqlx::query_as(
        "SELECT event_type, count(*) FROM events GROUP BY event_type ORDER BY event_type",
    )
    .fetch_all(pg(db))
    .await
    .unwrap()
    .into_iter()
    .collect();
    let max_attempt = count(
        db,
        "SELECT CAST(COALESCE(max(attempt), 0) AS bigint) FROM tasks",
    )
    .await;
    println!(
        "{} kills during the run ({serving} while serving), {} starts; events {event_counts:?}; highest \
         attempt {max_attempt}; the run took {:?}, the test {:?}",
        kills.len(),
        setup.controller.starts,
        finished - started,
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A completion under an expired and re-claimed lease, over HTTP
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_after_the_lease_went_to_another_agent_is_refused() {
    let setup = Setup::new(&[("solo".to_owned(), run_task("solo", &["true"], 2))]).await;
    let db = &setup.db;
    let api = Api::new(&setup.controller.url);
    let a = api.register("agent-a").await;
    let b = api.register("agent-b").await;

    let claimed_at = Instant::now();
    let tasks = api.claim(&a, 5_000).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let id = tasks[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (tasks[0]["run_lease"].as_i64(), tasks[0]["attempt"].as_i64()),
        (Some(1), Some(0))
    );
    assert_eq!(tasks[0]["action"], json!({"run": {"command": ["true"]}}));

    // Held by A: B gets nothing while the lease lasts.
    assert_eq!(api.claim(&b, 200).await, Vec::<Value>::new());

    // A goes quiet; once the lease has run out (and the retry's backoff), B gets it.
    let tasks = api.claim(&b, 15_000).await;
    let waited = claimed_at.elapsed();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["id"], id.as_str());
    assert_eq!(
        (tasks[0]["run_lease"].as_i64(), tasks[0]["attempt"].as_i64()),
        (Some(2), Some(1))
    );
    assert!(
        waited >= LEASE_TIME,
        "re-claimed after {waited:?}, within the lease"
    );
    // B heartbeats as a real agent would, so that a slow machine cannot see it go quiet while
    // A's reports are checked.
    let b_beats = tokio::spawn({
        let (api, b, id) = (api.clone(), b.clone(), id.clone());
        async move {
            loop {
                let beat = json!({"tasks": [{"id": id, "run_lease": 2}]});
                api.call(&b, "/api/v1/heartbeat", &beat).await;
                tokio::time::sleep(HEARTBEAT_TIME).await;
            }
        }
    });

    // By the database's clock, the lease ran out no sooner than a lease after the claim.
    let held_for: f64 = sqlx::query_scalar(
        "SELECT CAST(EXTRACT(EPOCH FROM (x.created_at - c.created_at)) AS float8) \
         FROM events c, events x WHERE c.event_type = 'task.claimed' \
         AND x.event_type = 'task.lease_expired' AND c.payload->>'id' = $1 \
         AND x.payload->>'id' = $1 AND c.payload->>'agent' = 'agent-a'",
    )
    .bind(&id)
    .fetch_one(pg(db))
    .await
    .unwrap();
    assert!(
        held_for >= LEASE_TIME.as_secs_f64(),
        "the lease expired {held_for} s after the claim"
    );

    // A went quiet for longer than its presence lasts. Once it is marked offline its
    // registration has ended and its token is refused; it registers again to report.
    let beat = json!({"tasks": [{"id": id, "run_lease": 1}]});
    let (status, answer) = api.call(&a, "/api/v1/heartbeat", &beat).await;
    let a = match status {
        401 => api.register("agent-a").await,
        _ => {
            assert_eq!(status, 200, "{answer}");
            a
        }
    };

    // A's heartbeat says the lease is gone; its reports are refused.
    let (status, answer) = api
        .call(
            &a,
            "/api/v1/heartbeat",
            &json!({"tasks": [{"id": id, "run_lease": 1}]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["tasks"],
        json!([{"id": id, "held": false, "cancel": false}])
    );
    let complete = format!("/api/v1/tasks/{id}/complete");
    let (status, answer) = api
        .call(
            &a,
            &complete,
            &json!({"run_lease": 1, "result": {"by": "a"}}),
        )
        .await;
    assert_eq!(status, 409, "{answer}");
    let (status, answer) = api
        .call(
            &a,
            "/api/v1/complete",
            &json!({"tasks": [{"id": id, "run_lease": 1, "result": {"by": "a"}}]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["tasks"][0]["ok"], false, "{answer}");
    // Nor can A borrow B's lease number: the lease is B's.
    let (status, answer) = api
        .call(
            &a,
            &complete,
            &json!({"run_lease": 2, "result": {"by": "a"}}),
        )
        .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(task_events(db, "task.completed", &id).await, []);

    // B completes; a second completion, even B's own, is refused.
    let (status, answer) = api
        .call(
            &b,
            &complete,
            &json!({"run_lease": 2, "result": {"by": "b"}}),
        )
        .await;
    assert_eq!((status, &answer), (200, &json!({"ok": true})));
    b_beats.abort();
    let (status, answer) = api
        .call(
            &b,
            &complete,
            &json!({"run_lease": 2, "result": {"by": "b"}}),
        )
        .await;
    assert_eq!(status, 409, "{answer}");
    let (status, answer) = api
        .call(
            &a,
            &complete,
            &json!({"run_lease": 1, "result": {"by": "a"}}),
        )
        .await;
    assert_eq!(status, 409, "{answer}");

    assert_eq!(
        task_events(db, "task.completed", &id).await,
        [("agent-b".to_owned(), 2, 1)]
    );
    assert_eq!(task_updates(db, "completion", &id).await.len(), 1);
    let state = task_state(db, "solo").await;
    assert_eq!(
        (state.status.as_str(), state.attempt, state.run_lease),
        ("completed", 1, 2)
    );
    let result: Value = sqlx::query_scalar("SELECT result FROM tasks WHERE name = 'solo'")
        .fetch_one(pg(db))
        .await
        .unwrap();
    assert_eq!(result, json!({"by": "b"}));
}

/// A claim that waits longer than presence lasts (three heartbeats) keeps its agent online:
/// the agent is on an open connection, and its token must still work when the wait ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_waiting_in_a_long_claim_stays_registered() {
    let setup = Setup::new(&[("solo".to_owned(), run_task("solo", &["true"], 2))]).await;
    let api = Api::new(&setup.controller.url);
    let holder = api.register("agent-a").await;
    let waiter = api.register("agent-b").await;
    assert_eq!(api.claim(&holder, 5_000).await.len(), 1);

    // Six heartbeats' wait with nothing to take (A heartbeats its task meanwhile).
    let id = task_state(&setup.db, "solo").await.id;
    let beats = async {
        for _ in 0..8 {
            tokio::time::sleep(HEARTBEAT_TIME).await;
            let beat = json!({"tasks": [{"id": id, "run_lease": 1}]});
            let (status, answer) = api.call(&holder, "/api/v1/heartbeat", &beat).await;
            assert_eq!(status, 200, "{answer}");
        }
    };
    let (tasks, ()) = tokio::join!(api.claim(&waiter, 3_000), beats);
    assert_eq!(tasks, Vec::<Value>::new());

    let (status, answer) = api
        .call(&waiter, "/api/v1/heartbeat", &json!({"tasks": []}))
        .await;
    assert_eq!(status, 200, "the waiter's token after its wait: {answer}");
    let status: String = sqlx::query_scalar("SELECT status FROM agents WHERE name = 'agent-b'")
        .fetch_one(pg(&setup.db))
        .await
        .unwrap();
    assert_ne!(status, "offline");
}

// ---------------------------------------------------------------------------------------------
// 4. Who may call what
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tokens_get_401_and_agents_not_holding_a_task_get_409() {
    let setup = Setup::new(&[("solo".to_owned(), run_task("solo", &["true"], 2))]).await;
    let db = &setup.db;
    let api = Api::new(&setup.controller.url);
    let id = task_state(db, "solo").await.id;
    let lease = json!({"run_lease": 1});
    let task = |verb: &str| format!("/api/v1/tasks/{id}/{verb}");

    // Every authenticated endpoint, with a body that would be fine with a good token.
    let calls: Vec<(String, Value)> = vec![
        ("/api/v1/claim".to_owned(), json!({"max": 1, "wait_ms": 0})),
        (
            "/api/v1/heartbeat".to_owned(),
            json!({"tasks": [{"id": id, "run_lease": 1}]}),
        ),
        (
            "/api/v1/complete".to_owned(),
            json!({"tasks": [{"id": id, "run_lease": 1}]}),
        ),
        (task("complete"), lease.clone()),
        (task("progress"), json!({"run_lease": 1, "message": "m"})),
        (task("fail"), json!({"run_lease": 1, "error": "e"})),
        (task("question"), json!({"run_lease": 1, "question": "q"})),
        (task("release"), lease.clone()),
    ];
    let old = api.register("agent-a").await;
    let a = api.register_holding("agent-a", Some(&old)).await;
    assert_ne!(old, a);
    let bad_auth = [
        None,
        Some("Bearer ".to_owned()),
        Some("Bearer not-a-token".to_owned()),
        Some(a.clone()),               // no scheme
        Some(format!("Basic {a}")),    // another scheme
        Some(format!("Bearer {old}")), // replaced by registering again
    ];
    for (path, body) in &calls {
        for auth in &bad_auth {
            let (status, answer) = api.post(path, auth.as_deref(), body).await;
            assert_eq!(status, 401, "POST {path} with {auth:?}: {answer}");
        }
    }
    // Nothing got through: the task was never claimed.
    let state = task_state(db, "solo").await;
    assert_eq!(
        (state.status.as_str(), state.run_lease),
        ("pending", 0),
        "{state:?}"
    );

    let tasks = api.claim(&a, 5_000).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let b = api.register("agent-b").await;

    // B is a registered agent, but the task is A's.
    let not_held: Vec<(String, Value)> = vec![
        (
            task("complete"),
            json!({"run_lease": 1, "result": {"by": "b"}}),
        ),
        (
            task("progress"),
            json!({"run_lease": 1, "message": "b was here"}),
        ),
        (
            task("fail"),
            json!({"run_lease": 1, "error": "b", "retryable": false}),
        ),
        (task("question"), json!({"run_lease": 1, "question": "b?"})),
        (task("release"), lease.clone()),
    ];
    for (path, body) in &not_held {
        let (status, answer) = api.call(&b, path, body).await;
        assert_eq!(status, 409, "B: POST {path}: {answer}");
    }
    let (status, answer) = api
        .call(
            &b,
            "/api/v1/complete",
            &json!({"tasks": [{"id": id, "run_lease": 1}]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["tasks"][0]["id"], id.as_str(), "{answer}");
    assert_eq!(answer["tasks"][0]["ok"], false, "{answer}");
    assert!(answer["tasks"][0]["error"].is_string(), "{answer}");
    let (status, answer) = api
        .call(
            &b,
            "/api/v1/heartbeat",
            &json!({"tasks": [{"id": id, "run_lease": 1}]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["tasks"][0]["held"], false, "{answer}");
    // A itself, with a run lease it does not hold.
    for (path, body) in &not_held {
        let mut body = body.clone();
        body["run_lease"] = json!(2);
        let (status, answer) = api.call(&a, path, &body).await;
        assert_eq!(status, 409, "A with run_lease 2: POST {path}: {answer}");
    }
    // A task that does not exist.
    let missing = format!("/api/v1/tasks/{}/complete", uuid::Uuid::new_v4());
    let (status, answer) = api.call(&a, &missing, &lease).await;
    assert_eq!(status, 404, "{answer}");

    // None of it touched the task, which is still A's to complete.
    let state = task_state(db, "solo").await;
    assert_eq!(
        (
            state.status.as_str(),
            state.lease_owner.as_deref(),
            state.run_lease
        ),
        ("in_progress", Some("agent-a"), 1),
        "{state:?}"
    );
    let updates = count(db, "SELECT count(*) FROM task_updates").await;
    assert_eq!(updates, 0, "refused reports wrote task updates");
    let (status, answer) = api
        .call(
            &a,
            &task("complete"),
            &json!({"run_lease": 1, "result": {"by": "a"}}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        task_events(db, "task.completed", &id).await,
        [("agent-a".to_owned(), 1, 0)]
    );
}
