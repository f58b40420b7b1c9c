//! End to end with the embedded agents, offline: the real `agentops` binary on real Git
//! repositories (a bare remote reached by `file://`, and a clone where the test plays the
//! person who merges), with an SQLite store.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::common::{git, published_repo};

const BIN: &str = env!("CARGO_BIN_EXE_agentops");

/// The Git examples: `examples/` but for `kubernetes/`, which declares the same objects as
/// custom resources.
fn copy_dir(from: &Path, to: &Path) {
    let walk = walkdir::WalkDir::new(from).min_depth(1).into_iter();
    for entry in walk.filter_entry(|e| e.depth() != 1 || e.file_name() != "kubernetes") {
        let entry = entry.unwrap();
        let target = to.join(entry.path().strip_prefix(from).unwrap());
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A spec repository on a bare remote, a clone of it, a database and a data directory.
struct Setup {
    _dir: tempfile::TempDir,
    remote: PathBuf,
    clone: PathBuf,
    db: String,
    data: PathBuf,
}

impl Setup {
    /// `fill` writes the repository's first commit into the folder it is given.
    fn new(fill: impl FnOnce(&Path)) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let (remote, clone) = published_repo(dir.path(), fill);
        Setup {
            db: format!("sqlite://{}", dir.path().join("db.sqlite").display()),
            data: dir.path().join("data"),
            remote,
            clone,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.remote.display())
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(args)
            .args(["--repo", &self.url(), "--database", &self.db])
            .arg("--data-dir")
            .arg(&self.data)
            .env_remove("OPENROUTER_API_KEY")
            .env_remove("AGENTOPS_GITHUB_TOKEN")
            .env("AGENTOPS_LOG", "warn")
            .kill_on_drop(true);
        command
    }

    async fn run(mut command: tokio::process::Command) -> Output {
        let output = tokio::time::timeout(Duration::from_secs(120), command.output())
            .await
            .expect("agentops finishes")
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn up_command(&self) -> tokio::process::Command {
        let mut command = self.command(&["up", "--exit-when-idle"]);
        command.args(["--listen", "127.0.0.1:0", "--status-interval", "100ms"]);
        command
    }

    async fn up(&self) -> Output {
        Setup::run(self.up_command()).await
    }

    async fn status(&self) -> Value {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(["status", "--format", "json", "--database", &self.db])
            .kill_on_drop(true);
        let output = Setup::run(command).await;
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// `(project/task, status)` of every task `agentops status` shows.
    async fn tasks(&self) -> Vec<(String, String)> {
        let status = self.status().await;
        let mut tasks = Vec::new();
        for project in status["projects"].as_array().unwrap() {
            for task in project["tasks"].as_array().unwrap() {
                tasks.push((
                    format!(
                        "{}/{}",
                        project["name"].as_str().unwrap(),
                        task["name"].as_str().unwrap()
                    ),
                    task["status"].as_str().unwrap().to_owned(),
                ));
            }
        }
        tasks.sort();
        tasks
    }

    fn fetch(&self) {
        git(&self.clone, &["fetch", "-q", "--prune", "origin"]);
        git(&self.clone, &["reset", "-q", "--hard", "origin/main"]);
    }

    fn branches(&self) -> Vec<String> {
        self.fetch();
        git(&self.clone, &["branch", "-r", "--format=%(refname:short)"])
            .lines()
            .filter_map(|b| b.strip_prefix("origin/"))
            .filter(|b| b.starts_with("agentops/"))
            .map(str::to_owned)
            .collect()
    }

    /// The person merges `branch` into main.
    fn merge(&self, branch: &str) {
        self.fetch();
        git(
            &self.clone,
            &["merge", "-q", "--no-edit", &format!("origin/{branch}")],
        );
        git(&self.clone, &["push", "-q", "origin", "main"]);
    }

    fn file_on_main(&self, path: &str) -> Option<String> {
        self.fetch();
        std::fs::read_to_string(self.clone.join(path)).ok()
    }

    /// Runs `up` until every task is completed, merging the result branches (not the
    /// proposals) in between, as a reviewer would; returns the result branches merged.
    async fn complete_everything(&self) -> Vec<String> {
        let mut merged = Vec::new();
        for _ in 0..12 {
            self.up().await;
            let tasks = self.tasks().await;
            if tasks.iter().all(|(_, status)| status == "completed") {
                return merged;
            }
            for (task, status) in &tasks {
                assert!(
                    ["completed", "review", "pending"].contains(&status.as_str()),
                    "{task} is {status}: {tasks:?}"
                );
            }
            for branch in self.branches() {
                if !branch.starts_with("agentops/proposals/") && !merged.contains(&branch) {
                    self.merge(&branch);
                    merged.push(branch);
                }
            }
        }
        panic!("not every task completed: {:?}", self.tasks().await);
    }

    async fn sqlite(&self) -> sqlx::SqlitePool {
        sqlx::SqlitePool::connect(&self.db).await.unwrap()
    }
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[tokio::test]
async fn examples_complete_offline_with_the_embedded_agents() {
    let setup = Setup::new(|work| copy_dir(&examples(), work));
    let merged = setup.complete_everything().await;

    let tasks = setup.tasks().await;
    assert_eq!(tasks.len(), 9, "{tasks:?}");
    assert!(tasks.iter().all(|(_, s)| s == "completed"), "{tasks:?}");
    // Every pull-request task's output went through its result branch.
    for task in [
        "competitor-research/list-competitors",
        "competitor-research/collect-pricing",
        "competitor-research/summarise-findings",
        "launch-website/draft-copy",
        "launch-website/build-page",
        "launch-website/launch-checklist",
        "launch-website/announce",
    ] {
        assert!(
            merged.contains(&format!("agentops/{task}")),
            "{task}: {merged:?}"
        );
    }
    // Outputs are on main: written offline, by a tool, by commands that saw their
    // dependencies' merged outputs.
    let copy = setup.file_on_main("site/copy.md").expect("site/copy.md");
    assert!(copy.to_lowercase().contains("offline"), "{copy}");
    let page = setup.file_on_main("site/index.html").unwrap();
    assert!(
        !page.contains("coming soon"),
        "built without the copy: {page}"
    );
    let pricing = setup.file_on_main("research/pricing.md").unwrap();
    assert!(pricing.contains("## competitors.md"), "{pricing}");
    let log = setup.file_on_main("site/build-page.log").unwrap();
    assert!(log.contains("exit status: 0"), "{log}");
    // `output.mode: commit` went straight to main, without a branch.
    let inventory = setup.file_on_main("reports/inventory.txt").unwrap();
    assert!(inventory.contains("weekly-report"), "{inventory}");
    assert!(!merged.iter().any(|b| b.contains("gather-status")));
    // The `plan` task's proposal stands on its own branch, unmerged.
    let branches = setup.branches();
    assert!(
        branches
            .iter()
            .any(|b| b.starts_with("agentops/proposals/") && !b.contains("tool-")),
        "{branches:?}"
    );
    // Status committed for every project, and it says completed.
    for project in ["competitor-research", "launch-website", "weekly-report"] {
        let status = setup
            .file_on_main(&format!(".agentops/status/{project}.yaml"))
            .unwrap_or_else(|| panic!("no status file for {project}"));
        assert!(status.contains("completed"), "{status}");
    }
    // The tool's use was counted.
    let pool = setup.sqlite().await;
    let (count, used): (i64, Option<String>) =
        sqlx::query_as("SELECT usage_count, last_used_at FROM tools WHERE name = 'outline'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(count, 1);
    assert!(used.is_some());
}

#[tokio::test]
async fn ask_proposes_a_project_that_runs_once_merged() {
    let setup = Setup::new(|work| {
        std::fs::write(work.join("README.md"), "specs\n").unwrap();
    });
    let mut ask = setup.command(&[
        "ask",
        "Onboard new customers.\n- Write a welcome note\n- List three next steps\n- Draft a follow-up email",
        "--project",
        "onboarding",
    ]);
    ask.kill_on_drop(true);
    let output = Setup::run(ask).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.trim(), "branch agentops/proposals/onboarding");
    assert!(
        setup
            .branches()
            .contains(&"agentops/proposals/onboarding".to_owned())
    );

    // What the branch holds passes the real `validate`.
    setup.fetch();
    git(
        &setup.clone,
        &["checkout", "-q", "origin/agentops/proposals/onboarding"],
    );
    let project = setup.clone.join("projects/onboarding");
    assert!(project.join("project.yaml").exists());
    let validate = std::process::Command::new(BIN)
        .arg("validate")
        .arg(&setup.clone)
        .output()
        .unwrap();
    assert!(
        validate.status.success(),
        "{}{}",
        String::from_utf8_lossy(&validate.stdout),
        String::from_utf8_lossy(&validate.stderr)
    );
    git(&setup.clone, &["checkout", "-q", "main"]);

    // Nothing runs before the merge.
    setup.up().await;
    assert!(setup.tasks().await.is_empty());

    setup.merge("agentops/proposals/onboarding");
    setup.complete_everything().await;
    let tasks = setup.tasks().await;
    // One task per bullet, each after the one before, each merged before the next ran.
    assert_eq!(tasks.len(), 3, "{tasks:?}");
    assert!(
        tasks
            .iter()
            .all(|(t, s)| t.starts_with("onboarding/") && s == "completed"),
        "{tasks:?}"
    );
}

/// Offline, a request that lists its steps in one sentence is planned as one task per step,
/// in order, each depending on the one before.
#[tokio::test]
async fn ask_plans_a_listed_sentence_as_a_chain_of_tasks() {
    let setup = Setup::new(|work| {
        std::fs::write(work.join("README.md"), "specs\n").unwrap();
    });
    let mut ask = setup.command(&[
        "ask",
        "Plan a team offsite: book a venue, send the invitations, collect dietary needs, then confirm the catering",
    ]);
    ask.kill_on_drop(true);
    let output = Setup::run(ask).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.trim(),
        "branch agentops/proposals/plan-a-team-offsite"
    );

    setup.fetch();
    git(
        &setup.clone,
        &[
            "checkout",
            "-q",
            "origin/agentops/proposals/plan-a-team-offsite",
        ],
    );
    let dir = setup.clone.join("projects/plan-a-team-offsite/tasks");
    let mut tasks: Vec<(String, String, Vec<String>)> = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path
            .strip_prefix(&setup.clone)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let parsed = agentops_specs::parse_file(&rel, &std::fs::read(&path).unwrap());
        assert!(parsed.errors.is_empty(), "{rel}: {:?}", parsed.errors);
        for object in parsed.objects {
            let agentops_specs::Spec::Task(task) = &object.spec else {
                panic!("{rel} holds a {:?}", object.spec);
            };
            tasks.push((
                object.name().to_owned(),
                task.title.clone(),
                task.depends_on.clone(),
            ));
        }
    }
    // Follow the chain from the task that depends on nothing.
    let mut chain = Vec::new();
    let mut previous: Option<String> = None;
    while let Some(next) = tasks
        .iter()
        .find(|(_, _, deps)| deps.as_slice() == previous.as_slice())
    {
        chain.push((next.0.clone(), next.1.clone(), next.2.clone()));
        previous = Some(next.0.clone());
    }
    assert_eq!(chain.len(), tasks.len(), "not one chain: {tasks:?}");
    let expect = |name: &str, title: &str, after: Option<&str>| {
        (
            name.to_owned(),
            title.to_owned(),
            after.map(str::to_owned).into_iter().collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        chain,
        [
            expect("book-a-venue", "Book a venue", None),
            expect(
                "send-the-invitations",
                "Send the invitations",
                Some("book-a-venue")
            ),
            expect(
                "collect-dietary-needs",
                "Collect dietary needs",
                Some("send-the-invitations")
            ),
            expect(
                "confirm-the-catering",
                "Confirm the catering",
                Some("collect-dietary-needs")
            ),
        ]
    );
    let project = std::fs::read_to_string(
        setup
            .clone
            .join("projects/plan-a-team-offsite/project.yaml"),
    )
    .unwrap();
    assert!(
        project.contains("title: Plan a team offsite\n"),
        "{project}"
    );
}

fn run_task(name: &str, script: &str, paths: &str) -> String {
    format!(
        "apiVersion: agentops.dev/v1alpha1\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  \
         title: {name}\n  action:\n    run:\n      command: [bash, -c, {script:?}]\n  \
         output: {{mode: commit, paths: [{paths}]}}\n  retries: 0\n  timeout: 1m\n"
    )
}

fn limits_project(work: &Path, task: &str) {
    let dir = work.join("projects/limits/tasks");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        work.join("projects/limits/project.yaml"),
        "apiVersion: agentops.dev/v1alpha1\nkind: Project\nmetadata:\n  name: limits\nspec:\n  \
         title: Limits\n",
    )
    .unwrap();
    std::fs::write(dir.join("t.yaml"), task).unwrap();
}

/// A command that writes outside its output paths fails its task, and none of its files
/// (not even those inside) reach Git.
#[tokio::test]
async fn a_run_cannot_write_outside_its_output_paths() {
    let setup = Setup::new(|work| {
        limits_project(
            work,
            &run_task(
                "escape",
                "mkdir -p out && echo ok > out/ok.txt && echo bad > evil.txt && echo changed >> README.md",
                "out/",
            ),
        );
        std::fs::write(work.join("README.md"), "original\n").unwrap();
    });
    let before = setup.file_on_main("README.md").unwrap();
    setup.up().await;
    assert_eq!(
        setup.tasks().await,
        [("limits/escape".to_owned(), "failed".to_owned())]
    );
    let pool = setup.sqlite().await;
    let error: Option<String> = sqlx::query_scalar("SELECT error FROM tasks WHERE name = 'escape'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let error = error.unwrap();
    assert!(
        error.contains("evil.txt") && error.contains("README.md") && error.contains("outside"),
        "{error}"
    );
    assert_eq!(setup.file_on_main("evil.txt"), None);
    assert_eq!(setup.file_on_main("out/ok.txt"), None);
    assert_eq!(setup.file_on_main("README.md").unwrap(), before);
    assert!(setup.branches().is_empty());
}

/// A command sees none of the controller's secrets: not the model key, not the forge token,
/// no `AGENTOPS_*` setting, nothing else from the controller's environment.
#[tokio::test]
async fn a_run_cannot_read_the_controllers_secrets() {
    let setup = Setup::new(|work| {
        limits_project(
            work,
            &run_task(
                "snoop",
                "mkdir -p out && env | sort > out/env.txt && env && cat /proc/self/environ | tr '\\0' '\\n'",
                "out/",
            ),
        );
    });
    let mut up = setup.up_command();
    up.env("OPENROUTER_API_KEY", "secret-123")
        .env("AGENTOPS_GITHUB_TOKEN", "ghp_token-456")
        .env("AGENTOPS_GITHUB_REPO", "owner/repo")
        .env("AGENTOPS_GITHUB_API_URL", "http://127.0.0.1:9")
        .env("SOME_SERVICE_KEY", "key-789");
    let output = Setup::run(up).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        setup.tasks().await,
        [("limits/snoop".to_owned(), "completed".to_owned())],
        "{stderr}"
    );
    let env = setup.file_on_main("out/env.txt").expect("out/env.txt");
    let log = setup.file_on_main("out/snoop.log").expect("out/snoop.log");
    let pool = setup.sqlite().await;
    let result: Option<String> =
        sqlx::query_scalar("SELECT result FROM tasks WHERE name = 'snoop'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let result = result.unwrap();
    // The command did print its environment…
    assert!(env.contains("HOME="), "{env}");
    assert!(log.contains("HOME=") && log.contains("PATH="), "{log}");
    assert!(result.contains("HOME="), "{result}");
    // …and none of the controller's.
    for text in [&env, &log, &result] {
        for secret in [
            "secret-123",
            "ghp_token-456",
            "key-789",
            "AGENTOPS_",
            "OPENROUTER",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for name in &names {
        // bash adds a few of its own (PWD, SHLVL, _); nothing comes from the controller.
        assert!(
            [
                "HOME", "TMPDIR", "LANG", "PATH", "PWD", "SHLVL", "_", "OLDPWD"
            ]
            .contains(name),
            "{name} in {env}"
        );
    }
}

/// A task that names a tool that does not exist is blocked with a question, and the Seed
/// proposes the tool on `agentops/proposals/tool-<name>` with files `validate` accepts.
#[tokio::test]
async fn a_missing_tool_is_drafted_and_proposed() {
    let setup = Setup::new(|work| {
        limits_project(
            work,
            "apiVersion: agentops.dev/v1alpha1\nkind: Task\nmetadata:\n  name: shout\nspec:\n  \
             title: Shout the greeting\n  action:\n    tool:\n      name: shout\n      \
             with: {text: hello, out: out/shout.txt}\n  output: {paths: [out/]}\n",
        );
    });
    setup.up().await;
    assert_eq!(
        setup.tasks().await,
        [("limits/shout".to_owned(), "blocked".to_owned())]
    );
    let pool = setup.sqlite().await;
    let question: Option<String> =
        sqlx::query_scalar("SELECT status_message FROM tasks WHERE name = 'shout'")
            .fetch_optional(&pool)
            .await
            .unwrap();
    let question = question.expect("a question");
    assert!(
        question.contains("`shout`") && question.contains("agentops/proposals/tool-shout"),
        "{question}"
    );
    assert!(
        setup
            .branches()
            .contains(&"agentops/proposals/tool-shout".to_owned())
    );
    git(
        &setup.clone,
        &["checkout", "-q", "origin/agentops/proposals/tool-shout"],
    );
    let spec = std::fs::read_to_string(setup.clone.join("tools/shout.yaml")).unwrap();
    assert!(spec.contains("kind: Tool"), "{spec}");
    let validate = std::process::Command::new(BIN)
        .arg("validate")
        .arg(&setup.clone)
        .output()
        .unwrap();
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stdout)
    );
    git(&setup.clone, &["checkout", "-q", "main"]);

    // Once the tool is merged, the task is no longer blocked: it runs and completes.
    setup.merge("agentops/proposals/tool-shout");
    setup.complete_everything().await;
    assert_eq!(
        setup.tasks().await,
        [("limits/shout".to_owned(), "completed".to_owned())]
    );
    let unblocked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'task.unblocked'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unblocked, 1);
}

/// A command that outlives its task's timeout is stopped and the task fails (no retries
/// left); nothing it would have written reaches Git.
#[tokio::test]
async fn a_run_is_stopped_at_its_timeout() {
    let setup = Setup::new(|work| {
        limits_project(
            work,
            &run_task(
                "slow",
                "sleep 120 && mkdir -p out && echo late > out/late.txt",
                "out/",
            )
            .replace("timeout: 1m", "timeout: 1s"),
        );
    });
    let started = std::time::Instant::now();
    setup.up().await;
    // Far below the command's two minutes, however loaded the machine: it was stopped, not
    // waited for.
    assert!(started.elapsed() < Duration::from_secs(90));
    assert_eq!(
        setup.tasks().await,
        [("limits/slow".to_owned(), "failed".to_owned())]
    );
    let pool = setup.sqlite().await;
    let error: Option<String> = sqlx::query_scalar("SELECT error FROM tasks WHERE name = 'slow'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(error.unwrap().contains("timed out"));
    assert_eq!(setup.file_on_main("out/late.txt"), None);
}

/// What the fake GitHub API was asked.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    auth: Option<String>,
    body: Value,
}

/// With a forge, `ask` opens the pull request "New project: …" for its branch, and prints
/// its URL. GitHub is a fake inside the test that records every call.
#[tokio::test]
async fn ask_opens_a_pull_request_on_the_forge() {
    use std::sync::{Arc, Mutex};
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let recorded = calls.clone();
    let app = axum::Router::new().fallback(
        move |method: axum::http::Method,
              uri: axum::http::Uri,
              headers: axum::http::HeaderMap,
              body: axum::body::Bytes| {
            let recorded = recorded.clone();
            async move {
                let call = Call {
                    method: method.to_string(),
                    path: uri
                        .path_and_query()
                        .map(|p| p.as_str().to_owned())
                        .unwrap_or_default(),
                    auth: headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                };
                recorded.lock().unwrap().push(call.clone());
                let answer = if call.method == "GET" {
                    serde_json::json!([])
                } else {
                    serde_json::json!({
                        "number": 12,
                        "html_url": "https://github.example/owner/repo/pull/12",
                        "state": "open"
                    })
                };
                let status = if call.method == "GET" { 200 } else { 201 };
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    axum::Json(answer),
                )
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let setup = Setup::new(|work| {
        std::fs::write(work.join("README.md"), "specs\n").unwrap();
    });
    let mut ask = setup.command(&[
        "ask",
        "Plan the team offsite.\n- Book a venue\n- Send invitations",
    ]);
    ask.env("AGENTOPS_GITHUB_TOKEN", "test-token")
        .env("AGENTOPS_GITHUB_API_URL", &api)
        .env("AGENTOPS_GITHUB_REPO", "owner/repo");
    let output = Setup::run(ask).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let branch = stdout
        .lines()
        .find_map(|l| l.strip_prefix("branch "))
        .expect("a branch")
        .to_owned();
    assert!(branch.starts_with("agentops/proposals/"), "{stdout}");
    assert!(
        stdout.contains("pull request https://github.example/owner/repo/pull/12"),
        "{stdout}"
    );
    assert!(setup.branches().contains(&branch));

    let calls = calls.lock().unwrap().clone();
    assert!(
        calls
            .iter()
            .all(|c| c.auth.as_deref() == Some("Bearer test-token")),
        "{calls:?}"
    );
    let post = calls
        .iter()
        .find(|c| c.method == "POST")
        .expect("a pull request opened");
    assert_eq!(post.path, "/repos/owner/repo/pulls");
    assert_eq!(post.body["head"], branch.as_str());
    assert_eq!(post.body["base"], "main");
    assert_eq!(post.body["title"], "New project: Plan the team offsite");
    assert!(
        post.body["body"].as_str().unwrap().contains("Book a venue"),
        "{post:?}"
    );
}

/// Work that needs a capability no agent has: the Seed drafts a specialist `Agent` spec and
/// proposes it on a branch whose files `validate` accepts; once a person merges it, the next
/// `up` runs that specialist, which takes the task and completes it.
#[tokio::test]
async fn a_missing_specialist_is_proposed_and_runs_once_merged() {
    let setup = Setup::new(|work| {
        limits_project(
            work,
            "apiVersion: agentops.dev/v1alpha1\nkind: Task\nmetadata:\n  name: translate\n\
             spec:\n  title: Translate the greeting\n  assignee: specialist\n  \
             capabilities: [translation]\n  action:\n    prompt: Translate hello into French \
             and write out/hello-fr.md\n  output: {mode: commit, paths: [out/]}\n",
        );
    });
    // Nobody can take the task, so `up` would not go idle on its own: run it until the
    // proposal is there.
    let mut up = setup.command(&["up"]);
    up.args(["--listen", "127.0.0.1:0", "--status-interval", "100ms"]);
    let mut running = up.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let branch = loop {
        if let Some(b) = setup
            .branches()
            .into_iter()
            .find(|b| b.starts_with("agentops/proposals/agent-"))
        {
            break b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no specialist was proposed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    running.kill().await.unwrap();
    assert_eq!(
        setup.tasks().await,
        [("limits/translate".to_owned(), "pending".to_owned())],
        "nobody could take it"
    );

    setup.fetch();
    git(
        &setup.clone,
        &["checkout", "-q", &format!("origin/{branch}")],
    );
    let name = branch.trim_start_matches("agentops/proposals/agent-");
    let spec = std::fs::read_to_string(setup.clone.join(format!("agents/{name}.yaml"))).unwrap();
    assert!(
        spec.contains("kind: Agent") && spec.contains("translation"),
        "{spec}"
    );
    let validate = std::process::Command::new(BIN)
        .arg("validate")
        .arg(&setup.clone)
        .output()
        .unwrap();
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stdout)
    );
    git(&setup.clone, &["checkout", "-q", "main"]);

    setup.merge(&branch);
    setup.up().await;
    assert_eq!(
        setup.tasks().await,
        [("limits/translate".to_owned(), "completed".to_owned())]
    );
    let pool = setup.sqlite().await;
    let by: Option<String> =
        sqlx::query_scalar("SELECT assigned_to FROM tasks WHERE name = 'translate'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(by.as_deref(), Some(name), "the specialist did it");
    // Offline, the file restates what the provider was given: the specialist's instructions
    // from its spec are among it.
    let written = setup.file_on_main("out/hello-fr.md").unwrap();
    assert!(
        written.contains("## Specialist instructions\n\n") && written.contains("write only within"),
        "{written}"
    );
}
