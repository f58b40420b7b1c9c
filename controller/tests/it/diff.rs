//! `agentops diff` end to end: a bare remote that a clone pushes to, a scratch database on
//! each backend synced by the real `Syncer`, and the real binary diffing a pull request's
//! branch, a commit or a folder against it. Every scenario also checks that the diff wrote
//! nothing: the store's rows, events and cursor, and the remote's refs, are unchanged.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use agentops::reconcile::sync::Syncer;
use agentops::source::git::{GitSource, Location};
use common::*;
use serde_json::{Value, json};

both_backends!(
    changes_of_a_branch_field_by_field,
    nothing_to_change_right_after_a_sync,
    a_folder_of_specs_is_diffed_as_it_is,
    an_empty_store_is_all_creates,
    revisions_on_a_network_remote,
    the_read_only_store_refuses_writes,
);

const PROJECT: &str = "projects/web/project.yaml";
const A: &str = "projects/web/tasks/a.yaml";
const B: &str = "projects/web/tasks/b.yaml";
const C: &str = "projects/web/tasks/c.yaml";
const D: &str = "projects/web/tasks/d.yaml";
const E: &str = "projects/web/tasks/e.yaml";
const WRITER: &str = "agents/writer.yaml";

/// The binary with a clean environment: no `AGENTOPS_*` from the caller.
fn agentops(data_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentops"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AGENTOPS_") {
            command.env_remove(key);
        }
    }
    command
        .env("AGENTOPS_DATA_DIR", data_dir)
        .env("AGENTOPS_LOG", "warn")
        .current_dir(data_dir);
    command
}

fn run(command: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("run agentops");
    (
        status.code().expect("exit code"),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

/// The commit id of a revision as the test helpers spell it (`main@sha1:<id>`).
fn sha(revision: &str) -> &str {
    revision.rsplit_once("sha1:").expect("a revision").1
}

/// A clone pushing to a bare remote, a scratch database and a syncer following the remote's
/// `main`. The diff gets a data directory of its own, as on a CI runner.
struct World<S: TestStore> {
    syncer: Syncer<S>,
    db: TestDb,
    clone: GitRepo,
    remote: BareRemote,
    _sync_data: tempfile::TempDir,
    diff_data: tempfile::TempDir,
}

impl<S: TestStore> World<S> {
    async fn new() -> World<S> {
        let remote = BareRemote::new();
        let db = TestDb::new(S::BACKEND).await;
        let sync_data = tempfile::tempdir().unwrap();
        let source = GitSource::new(
            Location::Remote(remote.url()),
            BRANCH,
            "",
            sync_data.path(),
            None,
        );
        World {
            syncer: Syncer::new(source, SOURCE, S::open(&db.url).await),
            db,
            clone: GitRepo::new(),
            remote,
            _sync_data: sync_data,
            diff_data: tempfile::tempdir().unwrap(),
        }
    }

    /// Commit on the clone's current branch and push it as `branch`.
    fn publish(&self, branch: &str, changes: &[(&str, Option<&str>)]) -> String {
        let revision = self.clone.commit("specs", changes);
        self.clone.push(&self.remote, "HEAD", branch);
        sha(&revision).to_owned()
    }

    /// `agentops diff --repo <remote> --database <db>` with more arguments.
    fn diff(&self, args: &[&str]) -> (i32, String, String) {
        run(agentops(self.diff_data.path())
            .args([
                "diff",
                "--repo",
                &self.remote.url(),
                "--database",
                &self.db.url,
            ])
            .args(args))
    }

    fn diff_json(&self, args: &[&str]) -> (i32, Value) {
        let mut all = vec!["--format", "json"];
        all.extend_from_slice(args);
        let (code, stdout, stderr) = self.diff(&all);
        let value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("diff --format json: {e}\n{stdout}\n{stderr}"));
        (code, value)
    }

    /// What the diff must leave as it was.
    async fn untouched(&self) -> (DbSnapshot, std::collections::BTreeMap<String, String>) {
        (self.db.snapshot().await, self.remote.refs())
    }
}

fn task_with(name: &str, title: &str, extra: &str) -> String {
    format!(
        "{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  title: {title}\n{extra}  action:\n    prompt: Do {name}\n"
    )
}

fn first_version() -> Vec<(&'static str, Option<String>)> {
    vec![
        (PROJECT, Some(project("web", "Website"))),
        (A, Some(task("a", "Task A"))),
        (B, Some(task("b", "Task B"))),
        (C, Some(task("c", "Task C"))),
        (WRITER, Some(agent("writer", "writing"))),
        // The controller's own files are never specs, whatever they hold.
        (".agentops/status/web.yaml", Some("not: [a spec".to_owned())),
    ]
}

fn borrowed<'a>(files: &'a [(&'a str, Option<String>)]) -> Vec<(&'a str, Option<&'a str>)> {
    files.iter().map(|(p, c)| (*p, c.as_deref())).collect()
}

/// A pull request's branch: a title and a priority change, a deletion, a file broken in an
/// object that is synced (its last good version stays), a new task and a new broken file.
async fn changes_of_a_branch_field_by_field<S: TestStore>() {
    let mut world = World::<S>::new().await;
    let c1 = world.publish(BRANCH, &borrowed(&first_version()));
    let report = world.syncer.sync().await.expect("sync");
    assert_eq!(report.object_writes, 5);

    world.clone.branch("pr");
    let broken_c = task_with("c", "Task C", "  colour: red\n");
    let head = world.publish(
        "pr",
        &[
            (
                A,
                Some(&task_with("a", "Task A, revised", "  priority: high\n")),
            ),
            (B, None),
            (C, Some(&broken_c)),
            (D, Some(&task("d", "Task D"))),
            (E, Some(&task_with("e", "Task E", "  retries: many\n"))),
        ],
    );
    let before = world.untouched().await;

    let (code, diff) = world.diff_json(&["--revision", "pr"]);
    assert_eq!(code, 1, "{diff:#}");
    assert_eq!(diff["source"], "default");
    assert_eq!(diff["revision"], format!("main@sha1:{head}"));
    assert_eq!(diff["folder"], Value::Null);
    assert_eq!(
        diff["store"],
        json!({"schema": true, "revision": format!("main@sha1:{c1}"), "objects": 5})
    );
    assert_eq!(diff["changed"], true);
    let created: Vec<(&str, &str, &str)> = diff["create"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap(),
                c["path"].as_str().unwrap(),
                c["fields"]["title"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(created, [("d", D, "Task D")]);
    assert_eq!(diff["create"][0]["fields"]["priority"], 50);
    assert_eq!(
        diff["change"],
        json!([{
            "kind": "Task", "name": "a", "project": "web", "path": A, "what": "updated",
            "moved_from": null, "generation": {"old": 1, "new": 2},
            "fields": [
                {"field": "priority", "old": 50, "new": 70},
                {"field": "title", "old": "Task A", "new": "Task A, revised"},
            ],
        }])
    );
    assert_eq!(
        diff["prune"],
        json!([{"kind": "Task", "name": "b", "project": "web", "path": B}])
    );
    let invalid = &diff["invalid"];
    assert_eq!(invalid.as_array().unwrap().len(), 1, "{invalid:#}");
    assert_eq!(invalid[0]["name"], "c");
    let c_error = invalid[0]["message"].as_str().unwrap();
    assert!(c_error.starts_with(&format!("{C}:7:3: ")), "{c_error}");
    assert!(c_error.contains("colour"), "{c_error}");
    let errors: Vec<String> = diff["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["new"], true, "{e}");
            format!(
                "{}:{}:{}",
                e["path"].as_str().unwrap(),
                e["line"],
                e["column"]
            )
        })
        .collect();
    assert_eq!(errors, [format!("{C}:7:3"), format!("{E}:7:12")]);

    // The same diff as text, for a pull request comment.
    let (code, text, stderr) = world.diff(&["--revision", "pr"]);
    assert_eq!(code, 1, "{stderr}");
    for line in [
        "**A sync would change the store**: 1 to create, 1 to change, 1 to prune, 1 to flag \
         invalid; 2 errors in the files (2 new).",
        &format!("+ Task web/d \"Task D\" ({D})"),
        &format!("~ Task web/a ({A}), generation 1 → 2"),
        "    priority: 50 → 70",
        "    title: \"Task A\" → \"Task A, revised\"",
        &format!("- Task web/b ({B})"),
        &format!("! Task web/c keeps its last good version: {c_error}"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in\n{text}"
        );
    }
    assert!(text.contains(&format!("\n{C}:7:3: ")), "{text}");
    assert!(text.contains(&format!("\n{E}:7:12: ")), "{text}");

    // The pull request's commit by id, and the full ref, name the same revision, also on
    // a runner whose mirror has never seen them; and so does a forge's pull request ref
    // that is on no branch.
    world.clone.push(&world.remote, "HEAD", "refs/pull/7/head");
    let remote_refs = world.remote.refs();
    for revision in [head.as_str(), "refs/heads/pr", "refs/pull/7/head"] {
        world.diff_data = tempfile::tempdir().unwrap();
        let (code, again) = world.diff_json(&["--revision", revision]);
        assert_eq!((code, &again), (1, &diff), "--revision {revision}");
    }
    let before = (before.0, remote_refs);
    // The clone itself as the repository: its own branch `pr`.
    let (code, stdout, stderr) = run(agentops(world.diff_data.path()).args([
        "diff",
        "--repo",
        world.clone.path().to_str().unwrap(),
        "--branch",
        BRANCH,
        "--database",
        &world.db.url,
        "--revision",
        "pr",
        "--format",
        "json",
    ]));
    assert_eq!(code, 1, "{stderr}");
    let local: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(local["revision"], diff["revision"]);
    assert_eq!(local["change"], diff["change"]);
    assert_eq!(local["prune"], diff["prune"]);

    assert_eq!(world.untouched().await, before, "the diff wrote something");

    // Syncing that revision does what the diff said.
    world.clone.push(&world.remote, "HEAD", BRANCH);
    let report = world.syncer.sync().await.expect("sync");
    assert_eq!(report.object_writes, 4, "{report:?}");
    let title = world
        .db
        .text("SELECT title FROM tasks WHERE name = 'a'")
        .await;
    assert_eq!(title.as_deref(), Some("Task A, revised"));
}

/// Right after a sync of a revision, diffing it (by default, by branch or by commit) finds
/// nothing to do and exits 0, also with an invalid file whose error the store has recorded.
async fn nothing_to_change_right_after_a_sync<S: TestStore>() {
    let mut world = World::<S>::new().await;
    let mut files = first_version();
    files.push((E, Some(task_with("e", "Task E", "  retries: many\n"))));
    let c1 = world.publish(BRANCH, &borrowed(&files));
    world.syncer.sync().await.expect("sync");
    let before = world.untouched().await;

    for args in [&[][..], &["--revision", "main"], &["--revision", &c1]] {
        let (code, diff) = world.diff_json(args);
        assert_eq!(code, 0, "{args:?}: {diff:#}");
        assert_eq!(diff["changed"], false);
        assert_eq!(diff["revision"], format!("main@sha1:{c1}"));
        for list in ["create", "change", "prune", "invalid"] {
            assert_eq!(diff[list], json!([]), "{list}");
        }
        assert_eq!(diff["errors"].as_array().unwrap().len(), 1);
        assert_eq!(diff["errors"][0]["path"], E);
        assert_eq!(diff["errors"][0]["new"], false);
    }
    let (code, text, stderr) = world.diff(&[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        text.contains("**No changes: the store already matches**: no object changes; 1 error in the files (0 new)."),
        "{text}"
    );
    assert!(!text.contains("```diff"), "{text}");

    // A revision that does not exist is an error, not an empty diff.
    let (code, stdout, stderr) = world.diff(&["--revision", "no-such-branch"]);
    assert_eq!(code, 2, "{stdout}");
    assert!(stderr.contains("no revision `no-such-branch`"), "{stderr}");

    assert_eq!(world.untouched().await, before, "the diff wrote something");
}

/// `--path DIR`: a checkout with uncommitted edits is read as it is, a rename shows as a
/// move, and the controller's own `.agentops/` files are not specs.
async fn a_folder_of_specs_is_diffed_as_it_is<S: TestStore>() {
    let mut world = World::<S>::new().await;
    world.publish(BRANCH, &borrowed(&first_version()));
    world.syncer.sync().await.expect("sync");
    let before = world.untouched().await;

    let checkout = world.clone.path();
    std::fs::rename(
        checkout.join(B),
        checkout.join("projects/web/tasks/b2.yaml"),
    )
    .unwrap();
    std::fs::write(checkout.join(WRITER), agent("writer", "writing, editing")).unwrap();
    std::fs::create_dir_all(checkout.join(".agentops/status")).unwrap();
    std::fs::write(checkout.join(".agentops/status/web.yaml"), "not: [a spec").unwrap();

    let (code, diff) = world.diff_json(&["--path", checkout.to_str().unwrap()]);
    assert_eq!(code, 1, "{diff:#}");
    assert_eq!(diff["revision"], Value::Null);
    assert_eq!(
        diff["folder"],
        checkout.canonicalize().unwrap().display().to_string()
    );
    assert_eq!(diff["create"], json!([]));
    assert_eq!(diff["prune"], json!([]));
    assert_eq!(diff["errors"], json!([]), "the .agentops/ file is no spec");
    assert_eq!(
        diff["change"],
        json!([
            {
                "kind": "Agent", "name": "writer", "path": WRITER, "what": "updated",
                "moved_from": null, "generation": {"old": 1, "new": 2},
                "fields": [{
                    "field": "capabilities", "old": ["writing"], "new": ["writing", "editing"],
                }],
            },
            {
                "kind": "Task", "name": "b", "project": "web",
                "path": "projects/web/tasks/b2.yaml", "what": "moved", "moved_from": B,
                "generation": {"old": 1, "new": 1}, "fields": [],
            },
        ])
    );
    let (code, text, _) = world.diff(&["--path", checkout.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        text.contains(&format!(
            "~ Task web/b (projects/web/tasks/b2.yaml)\n    path: {B} → projects/web/tasks/b2.yaml\n"
        )),
        "{text}"
    );
    assert!(
        text.contains("    capabilities: [\"writing\"] → [\"writing\",\"editing\"]\n"),
        "{text}"
    );
    assert_eq!(world.untouched().await, before, "the diff wrote something");
}

/// A database that was never migrated holds nothing: every object is a create, and the diff
/// creates no table (nor, for SQLite, a file that is not there).
async fn an_empty_store_is_all_creates<S: TestStore>() {
    let remote = BareRemote::new();
    let clone = GitRepo::new();
    let revision = clone.commit("specs", &borrowed(&first_version()));
    clone.push(&remote, "HEAD", BRANCH);
    let db = TestDb::new(S::BACKEND).await;
    let data = tempfile::tempdir().unwrap();

    let tables = "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'";
    let sqlite_tables = "SELECT count(*) FROM sqlite_master WHERE type = 'table'";
    let count_tables = || async {
        match S::BACKEND {
            Backend::Postgres => db.scalar(tables).await,
            Backend::Sqlite => db.scalar(sqlite_tables).await,
        }
    };
    assert_eq!(count_tables().await, 0);
    let (code, stdout, stderr) = run(agentops(data.path()).args([
        "diff",
        "--repo",
        &remote.url(),
        "--database",
        &db.url,
        "--format",
        "json",
    ]));
    assert_eq!(code, 1, "{stderr}");
    let diff: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        diff["store"],
        json!({"schema": false, "revision": null, "objects": 0})
    );
    assert_eq!(diff["revision"], revision);
    let mut created: Vec<String> = diff["create"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["kind"].as_str().unwrap(),
                c["name"].as_str().unwrap()
            )
        })
        .collect();
    created.sort();
    assert_eq!(
        created,
        ["Agent writer", "Project web", "Task a", "Task b", "Task c"]
    );
    assert_eq!(count_tables().await, 0, "the diff created tables");

    // Migrated, but nothing synced from this source: still all creates, said so.
    let store = S::open(&db.url).await;
    drop(store);
    let (code, text, stderr) =
        run(agentops(data.path()).args(["diff", "--repo", &remote.url(), "--database", &db.url]));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        text.contains(
            "Store: nothing synced from source `default` yet, so every object is a create."
        ),
        "{text}"
    );
    assert!(
        text.contains("**A sync would change the store**: 5 to create."),
        "{text}"
    );

    // `--subpath` reads the specs of a directory of the repository, paths relative to it.
    let (code, stdout, stderr) = run(agentops(data.path()).args([
        "diff",
        "--repo",
        &remote.url(),
        "--database",
        &db.url,
        "--subpath",
        "agents",
        "--format",
        "json",
    ]));
    assert_eq!(code, 1, "{stderr}");
    let diff: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(diff["create"].as_array().unwrap().len(), 1, "{diff:#}");
    assert_eq!(
        (&diff["create"][0]["name"], &diff["create"][0]["path"]),
        (&json!("writer"), &json!("writer.yaml"))
    );
    let (code, _, stderr) = run(agentops(data.path()).args([
        "diff",
        "--repo",
        &remote.url(),
        "--database",
        &db.url,
        "--subpath",
        "nowhere",
    ]));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("path `nowhere` is not a directory"),
        "{stderr}"
    );

    if S::BACKEND == Backend::Sqlite {
        let missing = data.path().join("nowhere/agentops.db");
        let (code, text, stderr) = run(agentops(data.path()).args([
            "diff",
            "--repo",
            &remote.url(),
            "--database",
            &format!("sqlite://{}", missing.display()),
        ]));
        assert_eq!(code, 1, "{stderr}");
        assert!(text.contains("has no agentops schema"), "{text}");
        assert!(!missing.exists() && !missing.parent().unwrap().exists());
    }
}

/// The remote served by `git daemon` (a real `git upload-pack` over `git://`), which, like
/// GitHub, lets a fetch ask for any commit reachable from a ref. Nothing is shared with the
/// mirror here, so every revision has to be fetched.
async fn serve(remote: &BareRemote, log: &Path) -> (Proc, String) {
    let config = Command::new("git")
        .args(["config", "uploadpack.allowReachableSHA1InWant", "true"])
        .current_dir(&remote.path)
        .status()
        .unwrap();
    assert!(config.success());
    let port = free_port();
    let mut command = Command::new("git");
    command
        .arg("daemon")
        .arg("--export-all")
        .arg("--reuseaddr")
        .arg("--listen=127.0.0.1")
        .arg(format!("--port={port}"))
        .arg(format!(
            "--base-path={}",
            remote.path.parent().unwrap().display()
        ));
    let proc = Proc::spawn("git daemon", command, log);
    let url = format!("git://127.0.0.1:{port}/remote.git");
    eventually(
        "git daemon serves the remote",
        Duration::from_secs(10),
        || {
            let url = url.clone();
            async move {
                let out = Command::new("git")
                    .args(["ls-remote", &url])
                    .output()
                    .ok()?;
                out.status.success().then_some(())
            }
        },
    )
    .await;
    (proc, url)
}

/// A pull request's head that is on no branch, by its ref and by its commit id, fetched
/// from a network remote into a runner's empty mirror.
async fn revisions_on_a_network_remote<S: TestStore>() {
    let mut world = World::<S>::new().await;
    world.publish(BRANCH, &borrowed(&first_version()));
    world.syncer.sync().await.expect("sync");
    world.clone.branch("pr");
    let head = sha(&world
        .clone
        .commit("retitle", &[(A, Some(&task("a", "Task A2")))]))
    .to_owned();
    world.clone.push(&world.remote, "HEAD", "refs/pull/7/head");
    let logs = tempfile::tempdir().unwrap();
    let (_daemon, url) = serve(&world.remote, &logs.path().join("daemon.log")).await;
    let before = world.untouched().await;

    for revision in ["refs/pull/7/head", head.as_str()] {
        let data = tempfile::tempdir().unwrap();
        let (code, stdout, stderr) = run(agentops(data.path()).args([
            "diff",
            "--repo",
            &url,
            "--database",
            &world.db.url,
            "--revision",
            revision,
            "--format",
            "json",
        ]));
        assert_eq!(code, 1, "--revision {revision}: {stdout}{stderr}");
        let diff: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(diff["revision"], format!("main@sha1:{head}"));
        assert_eq!(
            diff["change"][0]["fields"],
            json!([{"field": "title", "old": "Task A", "new": "Task A2"}])
        );
    }
    assert_eq!(world.untouched().await, before, "the diff wrote something");
}

/// The connection the diff reads through cannot write, even if asked to: migrating through
/// it fails and leaves the database without a table.
async fn the_read_only_store_refuses_writes<S: TestStore>() {
    use agentops::store::{AnyStore, Store};
    let db = TestDb::new(S::BACKEND).await;
    let store = AnyStore::connect_read_only(&db.url)
        .await
        .expect("connect")
        .expect("the database exists");
    let migrated = agentops::with_store!(store, s => s.migrate().await);
    assert!(
        migrated.is_err(),
        "migrating a read-only connection succeeded"
    );
    let tables = match S::BACKEND {
        Backend::Postgres => {
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        }
        Backend::Sqlite => "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
    };
    assert_eq!(db.scalar(tables).await, 0);
}
