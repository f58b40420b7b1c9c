//! The work queue (`store::queue`) on real databases: tasks reach the store through a real
//! Git repository and `Syncer::sync`, agents claim and report through the `Queue` trait, and
//! the rows are checked with SQL. Every scenario runs on both backends.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use agentops::store::queue::{
    AgentIdentity, Artifact, Assignment, Claimer, Completion, FailOutcome, Lease, LeasePolicy,
    LeaseState, Queue, Refusal,
};
use common::*;
use serde_json::json;
use uuid::Uuid;

both_backends!(
    claim_takes_only_ready_tasks,
    claim_respects_assignee_role_and_capabilities,
    claim_follows_priority_then_age,
    one_batch_serves_many_claimers,
    a_few_tasks_are_dealt_one_per_claimer,
    stale_run_lease_is_refused,
    complete_batch_answers_each_item,
    fail_retries_with_backoff_then_fails,
    expired_leases_retry_then_fail,
    failed_dependency_blocks_dependents,
    release_keeps_the_attempt,
    question_blocks_the_task,
    heartbeat_extends_and_reports_cancel,
    tokens_authenticate_their_agent,
);

both_backends_multi_thread!(concurrent_claimers_never_share_a_task);

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// A task file for `projects/<project>/tasks/<name>.yaml`; `extra` adds `spec` lines.
fn task_spec(name: &str, extra: &[&str]) -> String {
    let mut spec = format!(
        "{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  title: Task {name}\n  action:\n    prompt: Do {name}\n"
    );
    for line in extra {
        spec.push_str("  ");
        spec.push_str(line);
        spec.push('\n');
    }
    spec
}

fn project_spec(name: &str, suspend: bool) -> String {
    format!(
        "{API}\nkind: Project\nmetadata:\n  name: {name}\nspec:\n  title: {name}\n  suspend: {suspend}\n"
    )
}

fn agent(name: &str, agent_type: &str, capabilities: &[&str]) -> AgentIdentity {
    AgentIdentity {
        name: name.to_owned(),
        agent_type: agent_type.to_owned(),
        capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
        concurrency: 4,
    }
}

fn seed(name: &str) -> AgentIdentity {
    agent(name, "seed", &[])
}

fn policy() -> LeasePolicy {
    LeasePolicy::default()
}

/// Retries are ready again at once.
fn no_backoff() -> LeasePolicy {
    LeasePolicy {
        backoff_base: Duration::ZERO,
        backoff_max: Duration::ZERO,
        ..LeasePolicy::default()
    }
}

fn lease(a: &Assignment) -> Lease {
    Lease {
        id: a.id,
        run_lease: a.run_lease,
    }
}

fn done(a: &Assignment, result: serde_json::Value) -> Completion {
    Completion {
        lease: lease(a),
        result,
        artifacts: Vec::new(),
        review: false,
    }
}

fn names(assignments: &[Assignment]) -> Vec<String> {
    assignments
        .iter()
        .map(|a| format!("{}/{}", a.project, a.name))
        .collect()
}

/// A synced repository and the store under test.
struct Q<S: TestStore + Queue> {
    env: Env<S>,
}

impl<S: TestStore + Queue> Q<S> {
    /// Projects `(name, suspended)` and tasks `(project, name, extra spec lines)`, committed
    /// and synced.
    async fn new(projects: &[(&str, bool)], tasks: &[(&str, &str, &[&str])]) -> Q<S> {
        let mut env = Env::<S>::new().await;
        let mut files: Vec<(String, String)> = projects
            .iter()
            .map(|(p, suspend)| {
                (
                    format!("projects/{p}/project.yaml"),
                    project_spec(p, *suspend),
                )
            })
            .collect();
        files.extend(
            tasks
                .iter()
                .map(|(p, t, extra)| (format!("projects/{p}/tasks/{t}.yaml"), task_spec(t, extra))),
        );
        let changes: Vec<(&str, Option<&str>)> = files
            .iter()
            .map(|(path, content)| (path.as_str(), Some(content.as_str())))
            .collect();
        env.commit("specs", &changes);
        let report = env.sync().await;
        assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
        assert_eq!(env.db.tasks().await.len(), tasks.len());
        Q { env }
    }

    fn q(&self) -> &S {
        self.env.syncer.store()
    }

    fn db(&self) -> &TestDb {
        &self.env.db
    }

    async fn id(&self, project: &str, name: &str) -> Uuid {
        self.db().task(project, name).await.id.parse().unwrap()
    }

    fn task_where(project: &str, name: &str) -> String {
        format!(
            "FROM tasks t JOIN projects p ON p.id = t.project_id \
             WHERE p.name = '{project}' AND t.name = '{name}'"
        )
    }

    /// A task column as text.
    async fn text(&self, project: &str, name: &str, column: &str) -> Option<String> {
        self.db()
            .text(&format!(
                "SELECT CAST(t.{column} AS text) {}",
                Self::task_where(project, name)
            ))
            .await
    }

    /// A task column as a number.
    async fn num(&self, project: &str, name: &str, column: &str) -> i64 {
        self.db()
            .scalar(&format!(
                "SELECT CAST(t.{column} AS bigint) {}",
                Self::task_where(project, name)
            ))
            .await
    }

    /// Seconds from now until a task's time column.
    async fn seconds_until(&self, project: &str, name: &str, column: &str) -> i64 {
        let expr = self.db().seconds_until(&format!("t.{column}"));
        self.db()
            .scalar(&format!(
                "SELECT {expr} {}",
                Self::task_where(project, name)
            ))
            .await
    }

    async fn set(&self, project: &str, name: &str, assignment: &str) {
        let id = self.id(project, name).await;
        let changed = self
            .db()
            .execute(&format!("UPDATE tasks SET {assignment} WHERE id = '{id}'"))
            .await;
        assert_eq!(changed, 1);
    }

    async fn status(&self, project: &str, name: &str) -> String {
        self.text(project, name, "status").await.unwrap()
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db().scalar(sql).await
    }

    async fn updates(&self, id: Uuid, update_type: &str) -> Vec<(String, String)> {
        self.db()
            .rows(&format!(
                "SELECT agent_name, message FROM task_updates \
                 WHERE task_id = '{id}' AND update_type = '{update_type}' ORDER BY created_at"
            ))
            .await
    }

    async fn agent_status(&self, name: &str) -> String {
        self.db()
            .text(&format!("SELECT status FROM agents WHERE name = '{name}'"))
            .await
            .unwrap()
    }

    async fn claim(&self, agent: &AgentIdentity, max: u32) -> Vec<Assignment> {
        self.q().claim_for(agent, max, &policy()).await.unwrap()
    }

    async fn register(&self, agent: &AgentIdentity) {
        self.q()
            .register(agent, &format!("token-of-{}", agent.name))
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Claim
// ---------------------------------------------------------------------------------------------

/// Readiness: dependencies completed (also across projects), backoff passed, project not
/// suspended; and everything a claim records.
async fn claim_takes_only_ready_tasks<S: TestStore + Queue>() {
    let t = Q::<S>::new(
        &[("web", false), ("docs", false), ("frozen", true)],
        &[
            ("web", "a", &[]),
            ("web", "b", &["dependsOn: [a]"]),
            ("web", "c", &["dependsOn: [docs/d]"]),
            ("docs", "d", &[]),
            ("web", "later", &[]),
            ("frozen", "f", &[]),
        ],
    )
    .await;
    let worker = seed("worker");
    t.register(&worker).await;
    t.set(
        "web",
        "later",
        &format!("not_before = {}", t.db().time_from_now(3600)),
    )
    .await;

    assert_eq!(
        t.q().queue_depth().await.unwrap(),
        [("seed".to_owned(), 2)],
        "a and d are ready; b, c wait for them, later for its backoff, f for its project"
    );
    let first = t.claim(&worker, 10).await;
    let got: BTreeSet<String> = names(&first).into_iter().collect();
    assert_eq!(
        got,
        BTreeSet::from(["docs/d".to_owned(), "web/a".to_owned()])
    );
    assert!(
        t.claim(&worker, 10).await.is_empty(),
        "nothing else is ready"
    );
    assert_eq!(t.q().queue_depth().await.unwrap(), []);

    // What a claim hands out and records.
    let a = first.iter().find(|a| a.name == "a").unwrap();
    let revision = t.db().task("web", "a").await.revision.unwrap();
    assert_eq!(a.id, t.id("web", "a").await);
    assert_eq!((a.run_lease, a.attempt), (1, 0));
    assert_eq!(a.title, "Task a");
    assert_eq!(a.action, json!({"prompt": "Do a"}));
    assert_eq!(a.revision.as_deref(), Some(revision.as_str()));
    let left = (a.lease_expires_at - chrono::Utc::now()).num_seconds();
    assert!((25..=31).contains(&left), "lease ends in {left} s");
    assert_eq!(t.status("web", "a").await, "in_progress");
    assert_eq!(
        t.text("web", "a", "lease_owner").await.as_deref(),
        Some("worker")
    );
    assert_eq!(
        t.text("web", "a", "assigned_to").await.as_deref(),
        Some("worker")
    );
    assert_eq!(t.num("web", "a", "run_lease").await, 1);
    assert_eq!(
        t.text("web", "a", "dispatch_revision").await.as_deref(),
        Some(revision.as_str())
    );
    assert!(t.text("web", "a", "claimed_at").await.is_some());
    assert!(t.text("web", "a", "started_at").await.is_some());
    assert!((25..=31).contains(&t.seconds_until("web", "a", "lease_expires_at").await));
    assert_eq!(t.agent_status("worker").await, "busy");
    let claimed = t.db().events_of("task.claimed").await;
    assert_eq!(claimed.len(), 2);
    assert!(claimed.contains(&json!({
        "id": a.id, "project": "web", "name": "a", "agent": "worker", "run_lease": 1, "attempt": 0
    })));

    // Completing a dependency makes its dependents ready, in the same project and across.
    let answers = t
        .q()
        .complete_as("worker", &[done(a, json!({}))])
        .await
        .unwrap();
    assert_eq!(answers, [Ok(())]);
    assert_eq!(names(&t.claim(&worker, 10).await), ["web/b"]);
    let d = first.iter().find(|a| a.name == "d").unwrap();
    assert_eq!(
        t.q()
            .complete_as("worker", &[done(d, json!({}))])
            .await
            .unwrap(),
        [Ok(())]
    );
    assert_eq!(names(&t.claim(&worker, 10).await), ["web/c"]);

    // The backoff passes; the project is resumed.
    t.set(
        "web",
        "later",
        &format!("not_before = {}", t.db().time_from_now(-1)),
    )
    .await;
    assert_eq!(names(&t.claim(&worker, 10).await), ["web/later"]);
    assert!(t.claim(&worker, 10).await.is_empty());
    t.db()
        .execute("UPDATE projects SET suspend = false WHERE name = 'frozen'")
        .await;
    assert_eq!(names(&t.claim(&worker, 10).await), ["frozen/f"]);
}

/// A task goes to the agent it names, or to an agent of the role it names, that has every
/// capability it lists.
async fn claim_respects_assignee_role_and_capabilities<S: TestStore + Queue>() {
    let t = Q::<S>::new(
        &[("web", false)],
        &[
            ("web", "named", &["assignee: writer"]),
            ("web", "role", &["assignee: seed"]),
            (
                "web",
                "skilled",
                &["assignee: seed", "capabilities: [writing, editing]"],
            ),
            ("web", "chief", &["assignee: cos"]),
        ],
    )
    .await;
    assert_eq!(
        t.q().queue_depth().await.unwrap(),
        [
            ("cos".to_owned(), 1),
            ("seed".to_owned(), 2),
            ("writer".to_owned(), 1)
        ]
    );

    let outsider = agent("outsider", "specialist", &["writing", "editing"]);
    assert!(
        t.claim(&outsider, 10).await.is_empty(),
        "no task names it or its role"
    );

    let writer = agent("writer", "specialist", &["writing"]);
    assert_eq!(names(&t.claim(&writer, 10).await), ["web/named"]);

    let plain = agent("seed-1", "seed", &["writing"]);
    assert_eq!(
        names(&t.claim(&plain, 10).await),
        ["web/role"],
        "skilled needs editing too"
    );

    let skilled = agent("seed-2", "seed", &["research", "editing", "writing"]);
    assert_eq!(names(&t.claim(&skilled, 10).await), ["web/skilled"]);

    let chief = agent("chief-of-staff", "cos", &[]);
    assert_eq!(names(&t.claim(&chief, 10).await), ["web/chief"]);
    assert_eq!(t.q().queue_depth().await.unwrap(), []);
}

/// One batch claim for several agents: each gets what names it, role work is dealt out
/// without any task going twice, nobody gets more than asked, and agents of another pool are
/// served from their own pool in the same call.
async fn one_batch_serves_many_claimers<S: TestStore + Queue>() {
    let mut tasks: Vec<(&str, String, Vec<&str>)> = (0..7)
        .map(|n| ("web", format!("r{n}"), vec!["assignee: seed"]))
        .collect();
    tasks.push(("web", "for-b".to_owned(), vec!["assignee: seed-b"]));
    tasks.push(("web", "chief".to_owned(), vec!["assignee: cos"]));
    let specs: Vec<(&str, &str, &[&str])> = tasks
        .iter()
        .map(|(p, n, extra)| (*p, n.as_str(), extra.as_slice()))
        .collect();
    let t = Q::<S>::new(&[("web", false)], &specs).await;
    let claimers = [
        Claimer {
            agent: agent("seed-a", "seed", &[]),
            max: 3,
        },
        Claimer {
            agent: agent("seed-b", "seed", &[]),
            max: 3,
        },
        Claimer {
            agent: agent("chief-of-staff", "cos", &[]),
            max: 5,
        },
        Claimer {
            agent: agent("seed-c", "seed", &[]),
            max: 0,
        },
    ];
    for c in &claimers {
        t.register(&c.agent).await;
    }
    let answers = t.q().claim(&claimers, &policy()).await.unwrap();
    assert_eq!(answers.len(), 4);
    let got: Vec<Vec<String>> = answers.iter().map(|a| names(a)).collect();
    assert_eq!(got[0].len(), 3, "{got:?}");
    assert_eq!(got[1].len(), 3, "{got:?}");
    assert!(got[1].contains(&"web/for-b".to_owned()), "{got:?}");
    assert_eq!(got[2], ["web/chief"]);
    assert!(got[3].is_empty());
    let all: BTreeSet<&String> = got.iter().flatten().collect();
    assert_eq!(all.len(), 7, "no task twice: {got:?}");
    for (claimer, tasks) in claimers.iter().zip(&answers) {
        for task in tasks {
            let owner = t
                .db()
                .text(&format!(
                    "SELECT lease_owner FROM tasks WHERE id = '{}'",
                    task.id
                ))
                .await
                .unwrap();
            assert_eq!(owner, claimer.agent.name);
        }
    }
    assert_eq!(t.agent_status("seed-a").await, "busy");
    assert_eq!(t.agent_status("seed-c").await, "idle");
    // Two role tasks are left, and the next batch takes them.
    let again = t.q().claim(&claimers[..1], &policy()).await.unwrap();
    assert_eq!(again[0].len(), 2);
    assert!(t.claim(&claimers[1].agent, 10).await.is_empty());
}

/// Fewer ready tasks than claimers: the batch deals them one per claimer in the claimers'
/// order, highest priority first, rather than all to the first claimer that has room.
async fn a_few_tasks_are_dealt_one_per_claimer<S: TestStore + Queue>() {
    let t = Q::<S>::new(
        &[("web", false)],
        &[
            ("web", "low", &["priority: low"]),
            ("web", "high", &["priority: high"]),
        ],
    )
    .await;
    let claimers: Vec<Claimer> = ["seed-a", "seed-b", "seed-c"]
        .into_iter()
        .map(|name| Claimer {
            agent: agent(name, "seed", &[]),
            max: 32,
        })
        .collect();
    for c in &claimers {
        t.register(&c.agent).await;
    }
    let answers = t.q().claim(&claimers, &policy()).await.unwrap();
    let got: Vec<Vec<String>> = answers.iter().map(|a| names(a)).collect();
    assert_eq!(
        got,
        [
            vec!["web/high".to_owned()],
            vec!["web/low".to_owned()],
            vec![]
        ]
    );
}

/// Higher priority first, then older first; in one batch as across claims.
async fn claim_follows_priority_then_age<S: TestStore + Queue>() {
    let mut t = Q::<S>::new(
        &[("web", false)],
        &[
            ("web", "low", &["priority: low"]),
            ("web", "high-old", &["priority: high"]),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    t.env.commit(
        "more",
        &[
            (
                "projects/web/tasks/critical.yaml",
                Some(&task_spec("critical", &["priority: critical"])),
            ),
            (
                "projects/web/tasks/high-new.yaml",
                Some(&task_spec("high-new", &["priority: 70"])),
            ),
            (
                "projects/web/tasks/medium.yaml",
                Some(&task_spec("medium", &["priority: medium"])),
            ),
        ],
    );
    t.env.sync().await;

    let worker = seed("worker");
    assert_eq!(
        names(&t.claim(&worker, 2).await),
        ["web/critical", "web/high-old"]
    );
    assert_eq!(names(&t.claim(&worker, 1).await), ["web/high-new"]);
    assert_eq!(names(&t.claim(&worker, 5).await), ["web/medium", "web/low"]);
}

/// Eight claimers on one store, two agents, until the queue is empty: every task is handed out
/// exactly once and completed exactly once.
async fn concurrent_claimers_never_share_a_task<S: TestStore + Queue>() {
    const TASKS: usize = 300;
    let mut env = Env::<S>::new().await;
    let mut files = vec![(
        "projects/load/project.yaml".to_owned(),
        project_spec("load", false),
    )];
    for i in 0..TASKS {
        let name = format!("t{i:03}");
        files.push((
            format!("projects/load/tasks/{name}.yaml"),
            task_spec(&name, &[]),
        ));
    }
    let changes: Vec<(&str, Option<&str>)> = files
        .iter()
        .map(|(path, content)| (path.as_str(), Some(content.as_str())))
        .collect();
    env.commit("load", &changes);
    env.sync().await;
    assert_eq!(env.db.tasks().await.len(), TASKS);

    let store = Arc::new(S::open(&env.db.url).await);
    for name in ["claimer-a", "claimer-b"] {
        store
            .register(&seed(name), &format!("token-of-{name}"))
            .await
            .unwrap();
    }
    let mut workers = Vec::new();
    for w in 0..8 {
        let store = Arc::clone(&store);
        let me = seed(if w % 2 == 0 { "claimer-a" } else { "claimer-b" });
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = store.claim_for(&me, 7, &policy()).await.expect("claim");
                if got.is_empty() {
                    return mine;
                }
                let completions: Vec<Completion> =
                    got.iter().map(|a| done(a, json!({"by": w}))).collect();
                let answers = store
                    .complete_as(&me.name, &completions)
                    .await
                    .expect("complete");
                assert!(answers.iter().all(Result::is_ok), "{answers:?}");
                mine.extend(got.iter().map(|a| a.id));
            }
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.expect("worker"));
    }
    let distinct: BTreeSet<Uuid> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a task was handed out twice");
    assert_eq!(all.len(), TASKS, "every task was handed out");
    let counts = env.db.event_counts().await;
    assert_eq!(counts.get("task.claimed"), Some(&(TASKS as i64)));
    assert_eq!(counts.get("task.completed"), Some(&(TASKS as i64)));
    assert_eq!(
        env.db
            .scalar("SELECT count(*) FROM tasks WHERE status = 'completed' AND run_lease = 1")
            .await,
        TASKS as i64
    );
    assert_eq!(
        env.db
            .scalar(
                "SELECT count(DISTINCT task_id) FROM task_updates WHERE update_type = 'completion'"
            )
            .await,
        TASKS as i64
    );
    // Two reports of one agent committing at once may each leave it `busy`; a heartbeat
    // settles what it holds.
    for name in ["claimer-a", "claimer-b"] {
        assert_eq!(store.heartbeat(name, &[], &policy()).await.unwrap(), []);
    }
    assert_eq!(
        env.db
            .scalar("SELECT count(*) FROM agents WHERE name IN ('claimer-a', 'claimer-b') AND status = 'idle'")
            .await,
        2,
        "both agents hold nothing at the end"
    );
}

// ---------------------------------------------------------------------------------------------
// Fencing
// ---------------------------------------------------------------------------------------------

/// An agent whose lease expired and whose task went to another agent can no longer report on
/// it; the other agent's completion is the one that counts, once.
async fn stale_run_lease_is_refused<S: TestStore + Queue>() {
    let t = Q::<S>::new(&[("web", false)], &[("web", "job", &[])]).await;
    let (first, second) = (seed("first"), seed("second"));
    t.register(&first).await;
    t.register(&second).await;

    let old = t.claim(&first, 1).await.remove(0);
    assert_eq!(old.run_lease, 1);
    t.set(
        "web",
        "job",
        &format!("lease_expires_at = {}", t.db().time_from_now(-5)),
    )
    .await;
    let expired = t.q().expire_leases(&no_backoff()).await.unwrap();
    assert_eq!(expired.retried, [old.id]);
    assert!(expired.failed.is_empty());
    let new = t
        .q()
        .claim_for(&second, 1, &no_backoff())
        .await
        .unwrap()
        .remove(0);
    assert_eq!((new.id, new.run_lease, new.attempt), (old.id, 2, 1));

    // The first agent: every report is refused and changes nothing.
    let before = t.db().event_counts().await;
    assert_eq!(
        t.q()
            .heartbeat("first", &[lease(&old)], &policy())
            .await
            .unwrap(),
        [LeaseState {
            id: old.id,
            held: false,
            cancel: false
        }]
    );
    assert_eq!(
        t.q()
            .progress("first", lease(&old), "still going")
            .await
            .unwrap(),
        Err(Refusal::NotHeld)
    );
    assert_eq!(
        t.q()
            .complete_as("first", &[done(&old, json!({"by": "first"}))])
            .await
            .unwrap(),
        [Err(Refusal::NotHeld)]
    );
    assert_eq!(
        t.q()
            .fail("first", lease(&old), "gave up", true, &policy())
            .await
            .unwrap(),
        Err(Refusal::NotHeld)
    );
    assert_eq!(
        t.q().question("first", lease(&old), "why?").await.unwrap(),
        Err(Refusal::NotHeld)
    );
    assert_eq!(
        t.q().release("first", lease(&old)).await.unwrap(),
        Err(Refusal::NotHeld)
    );
    // The current run lease under the wrong agent is refused too.
    assert_eq!(
        t.q()
            .complete_as("first", &[done(&new, json!({"by": "first"}))])
            .await
            .unwrap(),
        [Err(Refusal::NotHeld)]
    );
    assert_eq!(
        t.db().event_counts().await,
        before,
        "refusals write nothing"
    );
    assert_eq!(t.status("web", "job").await, "in_progress");
    assert_eq!(
        t.text("web", "job", "lease_owner").await.as_deref(),
        Some("second")
    );
    assert!(t.updates(old.id, "progress").await.is_empty());

    // The second agent completes it; a repeat of that completion is refused.
    let mut completion = done(&new, json!({"by": "second", "summary": "all done"}));
    completion.artifacts.push(Artifact {
        name: "out.md".to_owned(),
        artifact_type: "document".to_owned(),
        key: "runs/job/out.md".to_owned(),
        size_bytes: Some(12),
        mime_type: Some("text/markdown".to_owned()),
    });
    assert_eq!(
        t.q()
            .complete_as("second", std::slice::from_ref(&completion))
            .await
            .unwrap(),
        [Ok(())]
    );
    assert_eq!(
        t.q().complete_as("second", &[completion]).await.unwrap(),
        [Err(Refusal::NotHeld)]
    );
    assert_eq!(
        t.q()
            .complete_as("first", &[done(&old, json!({"by": "first"}))])
            .await
            .unwrap(),
        [Err(Refusal::NotHeld)]
    );

    assert_eq!(t.status("web", "job").await, "completed");
    let result: serde_json::Value =
        serde_json::from_str(&t.text("web", "job", "result").await.unwrap()).unwrap();
    assert_eq!(result, json!({"by": "second", "summary": "all done"}));
    assert_eq!(t.text("web", "job", "lease_owner").await, None);
    assert_eq!(t.text("web", "job", "lease_expires_at").await, None);
    assert!(t.text("web", "job", "completed_at").await.is_some());
    let completed = t.db().events_of("task.completed").await;
    assert_eq!(
        completed,
        [json!({
            "id": new.id, "project": "web", "name": "job", "agent": "second",
            "run_lease": 2, "attempt": 1
        })],
        "completed exactly once"
    );
    assert_eq!(
        t.updates(new.id, "completion").await,
        [("second".to_owned(), "all done".to_owned())]
    );
    assert_eq!(
        t.count(&format!(
            "SELECT count(*) FROM artifacts WHERE task_id = '{}' AND agent_name = 'second' \
             AND artifact_type = 'document' AND s3_key = 'runs/job/out.md' AND size_bytes = 12",
            new.id
        ))
        .await,
        1
    );
    assert_eq!(t.agent_status("second").await, "idle");
}

/// A batch is answered item by item: accepted, refused (stale lease, unknown task, repeat),
/// and only the accepted ones change anything.
async fn complete_batch_answers_each_item<S: TestStore + Queue>() {
    let t = Q::<S>::new(
        &[("web", false)],
        &[
            ("web", "one", &[]),
            ("web", "two", &[]),
            ("web", "three", &[]),
        ],
    )
    .await;
    let worker = seed("worker");
    t.register(&worker).await;
    let got = t.claim(&worker, 3).await;
    assert_eq!(got.len(), 3);
    let by_name = |n: &str| got.iter().find(|a| a.name == n).unwrap();
    let (one, two, three) = (by_name("one"), by_name("two"), by_name("three"));

    let mut first = done(one, json!({"n": 1}));
    first.artifacts = vec![
        Artifact {
            name: "report.md".to_owned(),
            artifact_type: "document".to_owned(),
            key: "k/report.md".to_owned(),
            size_bytes: None,
            mime_type: None,
        },
        Artifact {
            name: "blob".to_owned(),
            artifact_type: "hologram".to_owned(),
            key: "k/blob".to_owned(),
            size_bytes: Some(3),
            mime_type: Some("application/octet-stream".to_owned()),
        },
    ];
    let stale = Completion {
        lease: Lease {
            id: two.id,
            run_lease: two.run_lease + 1,
        },
        result: json!({"n": 2}),
        artifacts: Vec::new(),
        review: false,
    };
    let unknown = Completion {
        lease: Lease {
            id: Uuid::new_v4(),
            run_lease: 1,
        },
        result: json!({}),
        artifacts: Vec::new(),
        review: false,
    };
    let third = done(three, json!({"n": 3}));
    let answers = t
        .q()
        .complete_as(
            "worker",
            &[first.clone(), stale, unknown, third, first.clone()],
        )
        .await
        .unwrap();
    assert_eq!(
        answers,
        [
            Ok(()),
            Err(Refusal::NotHeld),
            Err(Refusal::NoTask),
            Ok(()),
            Err(Refusal::NotHeld)
        ]
    );
    assert_eq!(t.status("web", "one").await, "completed");
    assert_eq!(t.status("web", "two").await, "in_progress");
    assert_eq!(t.status("web", "three").await, "completed");
    assert_eq!(t.text("web", "two", "result").await, None);
    assert_eq!(t.db().events_of("task.completed").await.len(), 2);
    let artifacts: Vec<(String, String, String)> = t
        .db()
        .rows(&format!(
            "SELECT name, artifact_type, s3_key FROM artifacts WHERE task_id = '{}' ORDER BY name",
            one.id
        ))
        .await;
    assert_eq!(
        artifacts,
        [
            ("blob".to_owned(), "other".to_owned(), "k/blob".to_owned()),
            (
                "report.md".to_owned(),
                "document".to_owned(),
                "k/report.md".to_owned()
            ),
        ]
    );
    assert_eq!(t.count("SELECT count(*) FROM artifacts").await, 2);
    assert_eq!(
        t.updates(one.id, "completion").await,
        [("worker".to_owned(), "completed".to_owned())]
    );
    assert!(t.updates(two.id, "completion").await.is_empty());
    assert_eq!(t.agent_status("worker").await, "busy", "it still holds two");

    assert_eq!(
        t.q()
            .complete_as("worker", &[done(two, json!({"n": 2}))])
            .await
            .unwrap(),
        [Ok(())]
    );
    assert_eq!(t.agent_status("worker").await, "idle");
    assert_eq!(t.q().complete_as("worker", &[]).await.unwrap(), []);
}

// ---------------------------------------------------------------------------------------------
// Failure, expiry, dependencies
// ---------------------------------------------------------------------------------------------

async fn fail_retries_with_backoff_then_fails<S: TestStore + Queue>() {
    let t = Q::<S>::new(
        &[("web", false)],
        &[
            ("web", "flaky", &["retries: 1"]),
            ("web", "broken", &["retries: 3", "priority: low"]),
        ],
    )
    .await;
    let worker = seed("worker");
    t.register(&worker).await;
    let slow = LeasePolicy {
        backoff_base: Duration::from_secs(60),
        backoff_max: Duration::from_secs(300),
        ..LeasePolicy::default()
    };

    // flaky: a retryable failure with a retry left → pending, attempt 1, after the backoff.
    let first = t.claim(&worker, 1).await.remove(0);
    assert_eq!(first.name, "flaky");
    assert_eq!(
        t.q()
            .fail("worker", lease(&first), "boom", true, &slow)
            .await
            .unwrap(),
        Ok(FailOutcome::Retry)
    );
    assert_eq!(t.status("web", "flaky").await, "pending");
    assert_eq!(t.num("web", "flaky", "attempt").await, 1);
    assert_eq!(
        t.text("web", "flaky", "error").await.as_deref(),
        Some("boom")
    );
    assert_eq!(t.text("web", "flaky", "lease_owner").await, None);
    assert_eq!(t.text("web", "flaky", "completed_at").await, None);
    let wait = t.seconds_until("web", "flaky", "not_before").await;
    assert!((58..=60).contains(&wait), "backoff {wait} s");
    assert_eq!(
        t.updates(first.id, "error").await,
        [("worker".to_owned(), "boom".to_owned())]
    );
    let retrying = t.db().events_of("task.retrying").await;
    assert_eq!(retrying.len(), 1);
    assert_eq!(retrying[0]["attempt"], 0);
    assert_eq!(retrying[0]["error"], "boom");
    assert_eq!(t.agent_status("worker").await, "idle");

    // Not ready during the backoff: the next claim takes broken instead.
    let next = t.claim(&worker, 5).await;
    assert_eq!(names(&next), ["web/broken"]);
    let broken = &next[0];

    // flaky, once the backoff passed: its last attempt fails → failed.
    t.set(
        "web",
        "flaky",
        &format!("not_before = {}", t.db().time_from_now(-1)),
    )
    .await;
    let second = t.claim(&worker, 1).await.remove(0);
    assert_eq!(
        (second.name.as_str(), second.attempt, second.run_lease),
        ("flaky", 1, 2)
    );
    assert_eq!(
        t.q()
            .fail("worker", lease(&second), "boom again", true, &slow)
            .await
            .unwrap(),
        Ok(FailOutcome::Failed)
    );
    assert_eq!(t.status("web", "flaky").await, "failed");
    assert_eq!(t.num("web", "flaky", "attempt").await, 1);
    assert!(t.text("web", "flaky", "completed_at").await.is_some());
    let failed = t.db().events_of("task.failed").await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["name"], "flaky");
    assert_eq!(failed[0]["error"], "boom again");
    assert_eq!(t.updates(first.id, "error").await.len(), 2);

    // broken: the backoff doubles with each attempt; a non-retryable failure ends it at once.
    assert_eq!(
        t.q()
            .fail("worker", lease(broken), "e1", true, &slow)
            .await
            .unwrap(),
        Ok(FailOutcome::Retry)
    );
    t.set(
        "web",
        "broken",
        &format!("not_before = {}", t.db().time_from_now(-1)),
    )
    .await;
    let again = t.claim(&worker, 1).await.remove(0);
    assert_eq!(again.attempt, 1);
    assert_eq!(
        t.q()
            .fail("worker", lease(&again), "e2", true, &slow)
            .await
            .unwrap(),
        Ok(FailOutcome::Retry)
    );
    let wait = t.seconds_until("web", "broken", "not_before").await;
    assert!((118..=120).contains(&wait), "second backoff {wait} s");
    t.set(
        "web",
        "broken",
        &format!("not_before = {}", t.db().time_from_now(-1)),
    )
    .await;
    let last = t.claim(&worker, 1).await.remove(0);
    assert_eq!(last.attempt, 2);
    assert_eq!(
        t.q()
            .fail("worker", lease(&last), "fatal", false, &slow)
            .await
            .unwrap(),
        Ok(FailOutcome::Failed),
        "not retryable, although a retry is left"
    );
    assert_eq!(t.status("web", "broken").await, "failed");
    assert_eq!(t.num("web", "broken", "attempt").await, 2);
    assert_eq!(
        t.text("web", "broken", "error").await.as_deref(),
        Some("fatal")
    );
    assert_eq!(
        t.q()
            .fail("worker", lease(&last), "fatal", false, &slow)
            .await
            .unwrap(),
        Err(Refusal::NotHeld)
    );
    let nobody = Lease {
        id: Uuid::new_v4(),
        run_lease: 1,
    };
    assert_eq!(
        t.q()
            .fail("worker", nobody, "x", true, &slow)
            .await
            .unwrap(),
        Err(Refusal::NoTask)
    );
}

async fn expired_leases_retry_then_fail<S: TestStore + Queue>() {
    let t = Q::<S>::new(
        &[("web", false)],
        &[
            ("web", "again", &["retries: 1"]),
            ("web", "spent", &["retries: 0"]),
            ("web", "live", &["retries: 1"]),
        ],
    )
    .await;
    let worker = seed("worker");
    assert_eq!(t.claim(&worker, 3).await.len(), 3);
    assert_eq!(
        t.q().expire_leases(&policy()).await.unwrap(),
        Default::default(),
        "no lease ran out yet"
    );
    for name in ["again", "spent"] {
        t.set(
            "web",
            name,
            &format!("lease_expires_at = {}", t.db().time_from_now(-1)),
        )
        .await;
    }
    let backoff = LeasePolicy {
        backoff_base: Duration::from_secs(10),
        ..LeasePolicy::default()
    };
    let expired = t.q().expire_leases(&backoff).await.unwrap();
    assert_eq!(expired.retried, [t.id("web", "again").await]);
    assert_eq!(expired.failed, [t.id("web", "spent").await]);

    assert_eq!(t.status("web", "again").await, "pending");
    assert_eq!(t.num("web", "again", "attempt").await, 1);
    assert_eq!(t.text("web", "again", "lease_owner").await, None);
    assert_eq!(
        t.text("web", "again", "assigned_to").await.as_deref(),
        Some("seed")
    );
    let wait = t.seconds_until("web", "again", "not_before").await;
    assert!((8..=10).contains(&wait), "backoff {wait} s");
    assert_eq!(t.status("web", "spent").await, "failed");
    assert_eq!(
        t.text("web", "spent", "error").await.as_deref(),
        Some("lease expired; retries spent")
    );
    assert!(t.text("web", "spent", "completed_at").await.is_some());
    assert_eq!(t.status("web", "live").await, "in_progress");
    assert_eq!(
        t.text("web", "live", "lease_owner").await.as_deref(),
        Some("worker")
    );

    let lease_expired = t.db().events_of("task.lease_expired").await;
    assert_eq!(lease_expired.len(), 1);
    assert_eq!(lease_expired[0]["name"], "again");
    assert_eq!(lease_expired[0]["agent"], "worker");
    assert_eq!(lease_expired[0]["attempt"], 0);
    let failed = t.db().events_of("task.failed").await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["name"], "spent");
    assert_eq!(failed[0]["error"], "lease expired; retries spent");

    assert_eq!(
        t.q().expire_leases(&backoff).await.unwrap(),
        Default::default(),
        "a second sweep finds nothing"
    );
}

async fn failed_dependency_blocks_dependents<S: TestStore + Queue>() {
    let t = Q::<S>::new(
        &[("web", false)],
        &[
            ("web", "a", &["retries: 0"]),
            ("web", "x", &["assignee: cos"]),
            ("web", "b", &["dependsOn: [a]"]),
            ("web", "c", &["dependsOn: [x]"]),
            ("web", "d", &["dependsOn: [x, a]"]),
            ("web", "e", &["assignee: cos"]),
        ],
    )
    .await;
    let worker = seed("worker");
    let a = t.claim(&worker, 10).await;
    assert_eq!(names(&a), ["web/a"]);
    assert_eq!(
        t.q().block_dependents().await.unwrap(),
        0,
        "nothing failed yet"
    );

    assert_eq!(
        t.q()
            .fail("worker", lease(&a[0]), "no", false, &policy())
            .await
            .unwrap(),
        Ok(FailOutcome::Failed)
    );
    t.set("web", "x", "status = 'cancelled'").await;
    assert_eq!(t.q().block_dependents().await.unwrap(), 3);
    let t = &t;
    let line = |name: &'static str| async move {
        (
            t.status("web", name).await,
            t.text("web", name, "status_message").await,
        )
    };
    assert_eq!(
        line("b").await,
        (
            "blocked".to_owned(),
            Some("dependency web/a failed".to_owned())
        )
    );
    assert_eq!(
        line("c").await,
        (
            "blocked".to_owned(),
            Some("dependency web/x cancelled".to_owned())
        )
    );
    assert_eq!(
        line("d").await,
        (
            "blocked".to_owned(),
            Some("dependency web/x cancelled".to_owned())
        ),
        "the first of its dependencies that ended badly"
    );
    assert_eq!(line("e").await, ("pending".to_owned(), None));
    let blocked: BTreeMap<String, serde_json::Value> = t
        .db()
        .events_of("task.blocked")
        .await
        .into_iter()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["message"].clone()))
        .collect();
    assert_eq!(
        blocked,
        BTreeMap::from([
            ("b".to_owned(), json!("dependency web/a failed")),
            ("c".to_owned(), json!("dependency web/x cancelled")),
            ("d".to_owned(), json!("dependency web/x cancelled")),
        ])
    );
    assert_eq!(t.q().block_dependents().await.unwrap(), 0, "only once");
}

// ---------------------------------------------------------------------------------------------
// Release, question, heartbeat
// ---------------------------------------------------------------------------------------------

async fn release_keeps_the_attempt<S: TestStore + Queue>() {
    let t = Q::<S>::new(&[("web", false)], &[("web", "job", &["retries: 3"])]).await;
    let (first, second) = (seed("first"), seed("second"));
    t.register(&first).await;
    // One failed attempt, so that "unchanged" is told apart from "reset".
    let claimed = t
        .q()
        .claim_for(&first, 1, &no_backoff())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        t.q()
            .fail("first", lease(&claimed), "flaky", true, &no_backoff())
            .await
            .unwrap(),
        Ok(FailOutcome::Retry)
    );
    let held = t
        .q()
        .claim_for(&first, 1, &no_backoff())
        .await
        .unwrap()
        .remove(0);
    assert_eq!((held.attempt, held.run_lease), (1, 2));
    assert_eq!(t.agent_status("first").await, "busy");

    assert_eq!(t.q().release("first", lease(&held)).await.unwrap(), Ok(()));
    assert_eq!(t.status("web", "job").await, "pending");
    assert_eq!(
        t.num("web", "job", "attempt").await,
        1,
        "a hand-back is no attempt"
    );
    assert_eq!(t.text("web", "job", "lease_owner").await, None);
    assert_eq!(
        t.text("web", "job", "assigned_to").await.as_deref(),
        Some("seed")
    );
    assert_eq!(t.agent_status("first").await, "idle");
    let released = t.db().events_of("task.released").await;
    assert_eq!(released.len(), 1);
    assert_eq!(released[0]["agent"], "first");
    assert_eq!(released[0]["run_lease"], 2);

    // Ready at once, for anyone.
    let taken = t.claim(&second, 1).await.remove(0);
    assert_eq!((taken.id, taken.attempt, taken.run_lease), (held.id, 1, 3));
    assert_eq!(
        t.q().release("first", lease(&held)).await.unwrap(),
        Err(Refusal::NotHeld)
    );
}

async fn question_blocks_the_task<S: TestStore + Queue>() {
    let t = Q::<S>::new(&[("web", false)], &[("web", "job", &[])]).await;
    let worker = seed("worker");
    t.register(&worker).await;
    let held = t.claim(&worker, 1).await.remove(0);
    assert_eq!(
        t.q()
            .question("worker", lease(&held), "Which tone?")
            .await
            .unwrap(),
        Ok(())
    );
    assert_eq!(t.status("web", "job").await, "blocked");
    assert_eq!(
        t.text("web", "job", "status_message").await.as_deref(),
        Some("question: Which tone?")
    );
    assert_eq!(t.text("web", "job", "lease_owner").await, None);
    assert_eq!(t.text("web", "job", "lease_expires_at").await, None);
    assert_eq!(
        t.updates(held.id, "question").await,
        [("worker".to_owned(), "Which tone?".to_owned())]
    );
    let asked = t.db().events_of("task.question").await;
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0]["question"], "Which tone?");
    assert_eq!(t.agent_status("worker").await, "idle");
    assert!(
        t.claim(&worker, 1).await.is_empty(),
        "it waits for a person"
    );
    assert_eq!(
        t.q()
            .heartbeat("worker", &[lease(&held)], &policy())
            .await
            .unwrap(),
        [LeaseState {
            id: held.id,
            held: false,
            cancel: false
        }]
    );
    assert_eq!(
        t.q()
            .progress("worker", lease(&held), "still thinking")
            .await
            .unwrap(),
        Err(Refusal::NotHeld)
    );
}

async fn heartbeat_extends_and_reports_cancel<S: TestStore + Queue>() {
    let mut t = Q::<S>::new(
        &[("web", false)],
        &[("web", "keep", &[]), ("web", "gone", &[])],
    )
    .await;
    let worker = seed("worker");
    t.register(&worker).await;
    let got = t.claim(&worker, 2).await;
    let keep = got.iter().find(|a| a.name == "keep").unwrap().clone();
    let gone = got.iter().find(|a| a.name == "gone").unwrap().clone();

    // Progress is recorded under a held lease.
    assert_eq!(
        t.q()
            .progress("worker", lease(&keep), "halfway")
            .await
            .unwrap(),
        Ok(())
    );
    assert_eq!(
        t.updates(keep.id, "progress").await,
        [("worker".to_owned(), "halfway".to_owned())]
    );
    assert_eq!(
        t.db().events_of("task.progress").await[0]["message"],
        "halfway"
    );

    t.set(
        "web",
        "keep",
        &format!("lease_expires_at = {}", t.db().time_from_now(5)),
    )
    .await;
    t.db()
        .execute("UPDATE agents SET last_active_at = NULL, status = 'idle' WHERE name = 'worker'")
        .await;
    let long = LeasePolicy {
        lease: Duration::from_secs(600),
        ..LeasePolicy::default()
    };
    assert_eq!(
        t.q()
            .heartbeat("worker", &[lease(&keep), lease(&gone)], &long)
            .await
            .unwrap(),
        [
            LeaseState {
                id: keep.id,
                held: true,
                cancel: false
            },
            LeaseState {
                id: gone.id,
                held: true,
                cancel: false
            },
        ]
    );
    let left = t.seconds_until("web", "keep", "lease_expires_at").await;
    assert!((595..=600).contains(&left), "lease extended to {left} s");
    assert_eq!(
        t.count("SELECT count(*) FROM agents WHERE name = 'worker' AND last_active_at IS NOT NULL")
            .await,
        1,
        "the agent was seen"
    );
    assert_eq!(t.agent_status("worker").await, "busy", "it holds two tasks");

    // A stale run lease is not extended.
    let stale = Lease {
        id: keep.id,
        run_lease: keep.run_lease - 1,
    };
    assert_eq!(
        t.q().heartbeat("worker", &[stale], &long).await.unwrap(),
        [LeaseState {
            id: keep.id,
            held: false,
            cancel: false
        }]
    );
    // Another agent cannot extend it either.
    assert!(
        !t.q()
            .heartbeat("intruder", &[lease(&keep)], &long)
            .await
            .unwrap()[0]
            .held
    );

    // `gone` leaves the repository: cancelled, and the holder is told to stop.
    t.env
        .commit("drop gone", &[("projects/web/tasks/gone.yaml", None)]);
    t.env.sync().await;
    assert_eq!(t.status("web", "gone").await, "cancelled");
    assert_eq!(
        t.q()
            .heartbeat("worker", &[lease(&keep), lease(&gone)], &policy())
            .await
            .unwrap(),
        [
            LeaseState {
                id: keep.id,
                held: true,
                cancel: false
            },
            LeaseState {
                id: gone.id,
                held: false,
                cancel: true
            },
        ]
    );
    assert_eq!(
        t.q()
            .complete_as("worker", &[done(&gone, json!({}))])
            .await
            .unwrap(),
        [Err(Refusal::NotHeld)]
    );
    assert_eq!(
        t.agent_status("worker").await,
        "busy",
        "it still holds keep"
    );

    assert_eq!(
        t.q()
            .complete_as("worker", &[done(&keep, json!({}))])
            .await
            .unwrap(),
        [Ok(())]
    );
    t.db()
        .execute("UPDATE agents SET status = 'busy' WHERE name = 'worker'")
        .await;
    assert_eq!(t.q().heartbeat("worker", &[], &policy()).await.unwrap(), []);
    assert_eq!(t.agent_status("worker").await, "idle", "it holds nothing");
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

async fn tokens_authenticate_their_agent<S: TestStore + Queue>() {
    let t = Q::<S>::new(&[("web", false)], &[]).await;
    let q = t.q();
    let writer = agent("writer", "specialist", &["writing"]);
    q.register(&writer, "hash-1").await.unwrap();
    q.register(&seed("other"), "hash-other").await.unwrap();

    assert_eq!(
        q.authenticate("hash-1").await.unwrap(),
        Some(writer.clone())
    );
    assert_eq!(q.authenticate("no-such-hash").await.unwrap(), None);
    assert_eq!(
        t.count("SELECT count(*) FROM agent_sessions WHERE token_hash = 'hash-1' AND last_seen_at IS NOT NULL")
            .await,
        1,
        "authenticating marks the session seen"
    );
    let row: Vec<(String, String, i64)> = t
        .db()
        .rows("SELECT type, status, CAST(concurrency AS bigint) FROM agents WHERE name = 'writer'")
        .await;
    assert_eq!(row, [("specialist".to_owned(), "idle".to_owned(), 4)]);

    // Registering again: a new token, the old one stops working, the identity is updated.
    let writer2 = AgentIdentity {
        capabilities: vec!["writing".to_owned(), "editing".to_owned()],
        concurrency: 2,
        ..writer.clone()
    };
    q.register(&writer2, "hash-2").await.unwrap();
    assert_eq!(q.authenticate("hash-1").await.unwrap(), None);
    assert_eq!(q.authenticate("hash-2").await.unwrap(), Some(writer2));
    assert_eq!(
        q.authenticate("hash-other").await.unwrap().map(|a| a.name),
        Some("other".to_owned()),
        "another agent's token is untouched"
    );
    assert_eq!(
        t.count("SELECT count(*) FROM agent_sessions WHERE agent_name = 'writer'")
            .await,
        1
    );
}
