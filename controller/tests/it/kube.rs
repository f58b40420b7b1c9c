//! `agentops up --kube` against a fake Kubernetes API server: custom resources become rows
//! through the same plan as Git, their status goes back by server-side apply, deleting work
//! cancels it before its finalizer goes, refused specs stall with an Event, and the watch
//! resumes after a drop and lists again after `410 Gone`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::fake_kube::{Kind, KubeEnv, condition};
use crate::common::{Backend, GitRepo, TestDb, eventually};

const WAIT: Duration = Duration::from_secs(60);

fn sleeping(title: &str) -> Value {
    json!({"project": "web", "title": title, "retries": 2, "output": {"mode": "none"},
        "action": {"run": {"command": ["sleep", "120"]}}})
}

fn prompt(title: &str) -> Value {
    json!({"project": "web", "title": title, "assignee": "nobody", "action": {"prompt": "go"}})
}

/// A Git repository without specs (the Git source runs beside the Kubernetes one), a migrated
/// Postgres database, and the fake server with project `web` in namespace `team`.
async fn setup() -> (KubeEnv, GitRepo, TestDb) {
    let kube = KubeEnv::new().await;
    let repo = GitRepo::new();
    repo.commit("empty", &[("README.md", Some("no specs here\n"))]);
    let db = TestDb::new(Backend::Postgres).await;
    let migrated = std::process::Command::new(env!("CARGO_BIN_EXE_agentops"))
        .args(["migrate", "--database", &db.url])
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");
    kube.fake
        .apply(Kind::Project, "team", "web", json!({"title": "Web"}));
    (kube, repo, db)
}

async fn task_row(db: &TestDb, name: &str) -> Option<(String, String, String)> {
    db.rows::<(String, String, String)>(&format!(
        "SELECT t.title, t.status, t.source FROM tasks t WHERE t.name = '{name}'"
    ))
    .await
    .pop()
}

#[tokio::test]
async fn resources_sync_their_status_applies_and_deleting_running_work_cancels_it_first() {
    let (kube, repo, db) = setup().await;
    kube.fake
        .apply(Kind::Task, "team", "sleep", sleeping("Sleep"));
    kube.fake
        .apply(Kind::Task, "team", "draft", prompt("Draft copy"));
    let controller = kube.start(repo.path(), &db.url, &[]);

    // Created: rows of source kube:team, the finalizer on work, the status applied.
    eventually("the task runs", WAIT, || async {
        let row = task_row(&db, "sleep").await?;
        (row.1 == "in_progress").then_some(())
    })
    .await;
    assert_eq!(
        task_row(&db, "draft").await,
        Some(("Draft copy".into(), "pending".into(), "kube:team".into()))
    );
    let status = eventually("the running task's status is applied", WAIT, || async {
        let status = kube.status("tasks", "sleep")?;
        (status["phase"] == "in_progress").then_some(status)
    })
    .await;
    assert_eq!(status["agent"], "seed", "{status}");
    assert_eq!(status["attempt"], 0, "the first attempt: {status}");
    assert_eq!(status["observedGeneration"], 1, "{status}");
    assert!(status["startedAt"].is_string(), "{status}");
    assert_eq!(
        condition(&status, "Reconciling").unwrap()["status"],
        "True",
        "{status}"
    );
    assert_eq!(
        condition(&status, "Ready").unwrap()["status"],
        "False",
        "{status}"
    );
    for (kind, name) in [
        (Kind::Task, "sleep"),
        (Kind::Task, "draft"),
        (Kind::Project, "web"),
    ] {
        eventually("the finalizer is on the work", WAIT, || async {
            let object = kube.fake.get(kind, "team", name)?;
            let finalizers = object["metadata"]["finalizers"].as_array()?.clone();
            (finalizers == [json!("agentops.dev/cancel")]).then_some(())
        })
        .await;
    }
    let project = eventually("the project's status", WAIT, || async {
        let status = kube.status("projects", "web")?;
        (status["progress"] == "0/2").then_some(status)
    })
    .await;
    assert_eq!(project["phase"], "active", "{project}");

    // Changed: a new generation, and the status says it was observed.
    kube.fake
        .apply(Kind::Task, "team", "draft", prompt("Draft better copy"));
    eventually("the new title is synced", WAIT, || async {
        let row = task_row(&db, "draft").await?;
        (row.0 == "Draft better copy").then_some(())
    })
    .await;
    eventually("generation 2 is observed", WAIT, || async {
        let status = kube.status("tasks", "draft")?;
        (status["observedGeneration"] == 2).then_some(())
    })
    .await;

    // Deleted while running: cancelled in the store (its lease dropped, so the agent is told
    // to stop), and only then the finalizer goes and the resource with it.
    kube.fake.delete(Kind::Task, "team", "sleep");
    eventually(
        "the deleted task is gone from the API server",
        WAIT,
        || async {
            kube.fake
                .get(Kind::Task, "team", "sleep")
                .is_none()
                .then_some(())
        },
    )
    .await;
    let (_, status, _) = task_row(&db, "sleep")
        .await
        .expect("history stays in the store");
    assert_eq!(status, "cancelled");
    let lease: Option<String> = db
        .text("SELECT lease_owner FROM tasks WHERE name = 'sleep'")
        .await;
    assert_eq!(lease, None, "the lease is dropped");
    let removal = kube
        .finalizer_patches("tasks", "sleep")
        .into_iter()
        .find(|r| r.status == 200 && r.body["metadata"]["finalizers"] == json!([]))
        .expect("the finalizer was removed");
    let pruned_at: String = db
        .text(
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
             FROM events WHERE event_type = 'task.pruned' AND payload->>'name' = 'sleep'",
        )
        .await
        .expect("the prune is recorded");
    let pruned_at: chrono::DateTime<chrono::Utc> = pruned_at.parse().unwrap();
    assert!(
        pruned_at <= removal.at,
        "the task was cancelled at {pruned_at}, after its finalizer went at {}",
        removal.at
    );

    // Deleting the project cancels its remaining task, then lets the project go.
    kube.fake.delete(Kind::Project, "team", "web");
    eventually("the project is released", WAIT, || async {
        kube.fake
            .get(Kind::Project, "team", "web")
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(task_row(&db, "draft").await.unwrap().1, "cancelled");
    assert_eq!(
        db.text("SELECT status FROM projects WHERE name = 'web'")
            .await
            .as_deref(),
        Some("cancelled")
    );
    drop(controller);
    kube.check_requests();
}

#[tokio::test]
async fn a_refused_spec_stalls_with_an_event_keeps_its_last_good_version_and_the_rest_syncs() {
    let (kube, repo, db) = setup().await;
    kube.fake.apply(Kind::Task, "team", "a", prompt("First"));
    let _controller = kube.start(repo.path(), &db.url, &[]);
    eventually("task a is synced", WAIT, || async {
        task_row(&db, "a").await.map(drop)
    })
    .await;

    // A spec the parser refuses (no action): the row keeps its last good version.
    kube.fake.apply(
        Kind::Task,
        "team",
        "a",
        json!({"project": "web", "title": "Second", "assignee": "nobody"}),
    );
    // A spec cross-object validation refuses: a dependency nobody declares.
    let mut dangling = prompt("Dangling");
    dangling["dependsOn"] = json!(["nope"]);
    kube.fake.apply(Kind::Task, "team", "b", dangling);
    // And one that is fine.
    kube.fake.apply(Kind::Task, "team", "c", prompt("Fine"));

    eventually("task c syncs", WAIT, || async {
        task_row(&db, "c").await.map(drop)
    })
    .await;
    for (name, needle) in [("a", "action"), ("b", "nope")] {
        let status = eventually("the refused task is stalled", WAIT, || async {
            let status = kube.status("tasks", name)?;
            (condition(&status, "Stalled")?["status"] == "True").then_some(status)
        })
        .await;
        let stalled = condition(&status, "Stalled").unwrap();
        assert_eq!(stalled["reason"], "Invalid", "{status}");
        let message = stalled["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("team/tasks/{name}:")) && message.contains(needle),
            "{status}"
        );
        assert_eq!(status["message"], message, "{status}");
        let event = eventually("an Event on the refused task", WAIT, || async {
            kube.fake
                .events()
                .into_iter()
                .find(|e| e["regarding"]["name"] == name)
        })
        .await;
        assert_eq!(event["type"], "Warning", "{event}");
        assert_eq!(event["reason"], "Invalid", "{event}");
        assert_eq!(event["regarding"]["kind"], "Task", "{event}");
        assert_eq!(event["regarding"]["namespace"], "team", "{event}");
        assert!(event["note"].as_str().unwrap().contains(needle), "{event}");
    }
    assert_eq!(
        task_row(&db, "a").await.unwrap().0,
        "First",
        "the last good version stays"
    );
    assert_eq!(
        task_row(&db, "b").await,
        None,
        "an invalid new task is not written"
    );
    let c = kube.status("tasks", "c");
    assert!(c.is_none_or(|s| condition(&s, "Stalled").unwrap()["status"] == "False"));

    // Fixed: synced, and no longer stalled.
    kube.fake.apply(Kind::Task, "team", "a", prompt("Third"));
    eventually("the fixed spec syncs", WAIT, || async {
        (task_row(&db, "a").await?.0 == "Third").then_some(())
    })
    .await;
    eventually("the fixed task is no longer stalled", WAIT, || async {
        let status = kube.status("tasks", "a")?;
        (condition(&status, "Stalled")?["status"] == "False").then_some(())
    })
    .await;
    kube.check_requests();
}

/// The watch requests of tasks and the list requests of tasks.
fn task_reads(kube: &KubeEnv) -> (Vec<String>, usize) {
    let requests = kube.fake.requests();
    let tasks = requests
        .iter()
        .filter(|r| r.path == "/apis/agentops.dev/v1alpha1/namespaces/team/tasks");
    let watches = tasks
        .clone()
        .filter(|r| r.query.get("watch").is_some_and(|w| w == "true"))
        .map(|r| r.query.get("resourceVersion").cloned().unwrap_or_default())
        .collect();
    let lists = tasks.filter(|r| !r.query.contains_key("watch")).count();
    (watches, lists)
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_its_version_and_gone_lists_again() {
    let (kube, repo, db) = setup().await;
    kube.fake.apply(Kind::Task, "team", "one", prompt("One"));
    let _controller = kube.start(repo.path(), &db.url, &[]);
    eventually("task one is synced", WAIT, || async {
        task_row(&db, "one").await.map(drop)
    })
    .await;
    // Let the status and finalizer writes settle, then note what the watch has seen.
    eventually("the statuses are applied", WAIT, || async {
        kube.status("tasks", "one").map(drop)
    })
    .await;
    let (watches, lists) = task_reads(&kube);
    assert_eq!(lists, 1, "one initial list");
    assert_eq!(watches.len(), 1, "{watches:?}");

    // Dropped: the watch comes back from where it was, without listing again.
    let seen = kube.fake.resource_version();
    kube.fake.drop_watches();
    kube.fake.apply(Kind::Task, "team", "two", prompt("Two"));
    eventually("task two is synced after the drop", WAIT, || async {
        task_row(&db, "two").await.map(drop)
    })
    .await;
    let (watches, lists) = task_reads(&kube);
    assert_eq!(lists, 1, "a dropped watch resumes without listing");
    let resumed: u64 = watches[1].parse().unwrap();
    assert!(
        resumed > 0 && resumed <= seen,
        "resumed from {resumed}; the server was at {seen} when it dropped"
    );

    // Gone: the history is compacted, the watch must list again, and what changed meanwhile
    // (a task removed, another added) is seen.
    kube.fake.expire_history();
    kube.fake
        .apply(Kind::Task, "team", "three", prompt("Three"));
    kube.fake.delete(Kind::Task, "team", "one");
    eventually("task three is synced after the relist", WAIT, || async {
        task_row(&db, "three").await.map(drop)
    })
    .await;
    eventually("task one is cancelled", WAIT, || async {
        (task_row(&db, "one").await?.1 == "cancelled").then_some(())
    })
    .await;
    let (_, lists) = task_reads(&kube);
    assert!(lists >= 2, "410 Gone makes the watcher list again");
    kube.check_requests();
}

#[tokio::test]
async fn an_object_of_git_and_of_a_namespace_is_an_error_on_both_and_is_not_overwritten() {
    let (kube, repo, db) = setup().await;
    repo.commit(
        "project web in Git too",
        &[(
            "projects/web/project.yaml",
            Some("apiVersion: agentops.dev/v1alpha1\nkind: Project\nmetadata:\n  name: web\nspec:\n  title: Web from Git\n"),
        )],
    );
    kube.fake
        .apply(Kind::Project, "team", "ops", json!({"title": "Ops"}));
    let _controller = kube.start(repo.path(), &db.url, &[]);

    // The namespace says so on the resource.
    let status = eventually("the namespace's project is stalled", WAIT, || async {
        let status = kube.status("projects", "web")?;
        (condition(&status, "Stalled")?["status"] == "True").then_some(status)
    })
    .await;
    let message = condition(&status, "Stalled").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("also declared by source `default`"),
        "{status}"
    );
    // Git says so in its source's errors.
    eventually("the Git source reports the conflict", WAIT, || async {
        let errors: Vec<(String,)> = db
            .rows("SELECT CAST(errors AS text) FROM sync_sources WHERE name = 'default'")
            .await;
        errors
            .first()
            .filter(|(e,)| e.contains("also declared by source `kube:team`"))
            .map(drop)
    })
    .await;
    // One row, flagged, its title from whichever source wrote it first; the rest syncs.
    let rows: Vec<(String, String, Option<String>)> =
        eventually("the row is flagged", WAIT, || async {
            let rows: Vec<(String, String, Option<String>)> = db
                .rows("SELECT title, source, status_message FROM projects WHERE name = 'web'")
                .await;
            rows.iter()
                .all(|r| r.2.as_deref().is_some_and(|m| m.contains("also declared")))
                .then_some(rows)
        })
        .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (title, source, _) = &rows[0];
    let expected = if source == "default" {
        "Web from Git"
    } else {
        "Web"
    };
    assert_eq!(title, expected, "{rows:?}");
    eventually("the other project syncs", WAIT, || async {
        db.text("SELECT source FROM projects WHERE name = 'ops'")
            .await
    })
    .await;
    kube.check_requests();
}

/// With `--agent-service-accounts`, an agent in the cluster registers with its ServiceAccount
/// token: the controller asks the API server (a TokenReview) whose it is, and admits only the
/// accounts listed. An unknown token is a `401`, another account a `403`, and neither
/// registers; a registration without a bearer asks the API server nothing. `agentops agent`
/// reads the token from a file, as from a pod's projected token.
#[tokio::test]
async fn a_service_account_token_enrolls_only_the_listed_accounts() {
    let (kube, repo, db) = setup().await;
    kube.fake
        .authenticate("token-of-agents", "system:serviceaccount:team:agents");
    kube.fake
        .authenticate("token-of-intruder", "system:serviceaccount:team:intruder");
    let _controller = kube.start(
        repo.path(),
        &db.url,
        &["--no-agents", "--agent-service-accounts", "team:agents"],
    );
    let api = format!("http://{}", kube.addr);
    let http = reqwest::Client::new();
    // Ready: it leads, and serves the API rather than a standby's health checks.
    eventually("the controller is ready", WAIT, || async {
        let answer = http.get(format!("{api}/readyz")).send().await.ok()?;
        answer.status().is_success().then_some(())
    })
    .await;
    let register = |name: &'static str, bearer: Option<&'static str>| {
        let (http, api) = (http.clone(), api.clone());
        async move {
            let mut request = http
                .post(format!("{api}/api/v1/agents/register"))
                .json(&json!({"name": name, "type": "seed"}));
            if let Some(token) = bearer {
                request = request.bearer_auth(token);
            }
            let answer = request.send().await.unwrap();
            let status = answer.status().as_u16();
            let text = answer.text().await.unwrap();
            let body = serde_json::from_str::<Value>(&text)
                .unwrap_or_else(|_| panic!("register {name}: {status} {text}"));
            (status, body)
        }
    };

    let (status, answer) = register("seed-pod", Some("token-of-agents")).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["token"].as_str().is_some_and(|t| !t.is_empty()),
        "{answer}"
    );
    let (status, answer) = register("intruder", Some("token-of-intruder")).await;
    assert_eq!(
        (status, answer["reason"].as_str()),
        (403, Some("account_not_allowed")),
        "{answer}"
    );
    let (status, answer) = register("guesser", Some("a-guess")).await;
    assert_eq!(
        (status, answer["reason"].as_str()),
        (401, Some("wrong_secret")),
        "{answer}"
    );
    let (status, answer) = register("anonymous", None).await;
    assert_eq!(
        (status, answer["reason"].as_str()),
        (401, Some("no_secret")),
        "{answer}"
    );
    let reviewed: Vec<String> = kube
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/apis/authentication.k8s.io/v1/tokenreviews")
        .map(|r| {
            assert_eq!((r.method.as_str(), r.status), ("POST", 201), "{r:?}");
            r.body["spec"]["token"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        reviewed,
        ["token-of-agents", "token-of-intruder", "a-guess"],
        "one review per token, none without one"
    );
    let registered: Vec<(String,)> = db
        .rows("SELECT agent_name FROM agent_sessions ORDER BY 1")
        .await;
    assert_eq!(registered, [("seed-pod".to_owned(),)]);

    // The agent process, its token in a file.
    let token_file = kube.dir.path().join("token");
    std::fs::write(&token_file, "token-of-agents\n").unwrap();
    let mut agent = crate::common::spawn_agentops_agent(
        &api,
        "seed",
        "seed-from-file",
        &["--agent-secret-file", token_file.to_str().unwrap()],
        &kube.dir.path().join("agent.log"),
    );
    eventually("the agent process registers", WAIT, || async {
        let n = db
            .scalar("SELECT count(*) FROM agent_sessions WHERE agent_name = 'seed-from-file'")
            .await;
        (n == 1).then_some(())
    })
    .await;
    agent.kill();
    kube.check_requests();
}

/// An Agent resource's status says what its agent is doing (`phase` idle, then busy while it
/// holds a task, with the count), and a Tool's that it is available and how often it was
/// used; both with the kstatus conditions.
#[tokio::test]
async fn agent_and_tool_resources_show_their_phase() {
    let (kube, repo, db) = setup().await;
    kube.fake.apply(
        Kind::Agent,
        "team",
        "writer",
        json!({"type": "specialist", "capabilities": ["writing"], "concurrency": 1}),
    );
    kube.fake.apply(
        Kind::Tool,
        "team",
        "shout",
        json!({"type": "script", "description": "Shout.", "command": ["echo", "{text}"]}),
    );
    let _controller = kube.start(repo.path(), &db.url, &["--no-agents"]);

    let tool = eventually("the tool is available", WAIT, || async {
        let status = kube.status("tools", "shout")?;
        (status["phase"] == "available").then_some(status)
    })
    .await;
    assert_eq!(tool["usageCount"], 0, "{tool}");
    assert_eq!(
        condition(&tool, "Ready").unwrap()["status"],
        "True",
        "{tool}"
    );
    let agent = eventually("the agent is idle", WAIT, || async {
        let status = kube.status("agents", "writer")?;
        (status["phase"] == "idle").then_some(status)
    })
    .await;
    assert_eq!(agent["running"], 0, "{agent}");

    // The agent registers (from this machine: no enrollment is configured) and takes a task
    // assigned to it.
    kube.fake.apply(
        Kind::Task,
        "team",
        "draft",
        json!({"project": "web", "title": "Draft", "assignee": "writer",
               "action": {"prompt": "go"}}),
    );
    let api = format!("http://{}", kube.addr);
    let http = reqwest::Client::new();
    let registered: Value = http
        .post(format!("{api}/api/v1/agents/register"))
        .json(&json!({"name": "writer", "type": "specialist", "capabilities": ["writing"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = registered["token"].as_str().unwrap().to_owned();
    eventually("the agent claims the task", WAIT, || async {
        let answer: Value = http
            .post(format!("{api}/api/v1/claim"))
            .bearer_auth(&token)
            .json(&json!({"max": 1, "wait_ms": 1000}))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (answer["tasks"].as_array()?.len() == 1).then_some(())
    })
    .await;
    let busy = eventually("the agent is busy", WAIT, || async {
        let status = kube.status("agents", "writer")?;
        (status["phase"] == "busy").then_some(status)
    })
    .await;
    assert_eq!(busy["running"], 1, "{busy}");
    assert!(busy["lastSeen"].is_string(), "{busy}");
    kube.check_requests();
}
