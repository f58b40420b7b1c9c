//! Write-back against real Git remotes and real stores: status commits, pushes racing people's
//! pushes, agent output committed on result branches (or the main branch), output paths that
//! must be refused, and reviews followed to merged or closed without a forge.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentops::api::ApiState;
use agentops::dispatch::{DispatchConfig, Dispatcher};
use agentops::forge::Branches;
use agentops::reconcile::sync::Syncer;
use agentops::source::git::{GitSource, Location, is_own_commit};
use agentops::store::queue::{LeasePolicy, Queue};
use agentops::store::writeback::Writeback;
use agentops::writeback::{Author, GitResults, Retry, Reviews, StatusWriter};
use common::*;
use git2::{FileMode, Oid, Repository, Signature};
use serde_json::{Value, json};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// A bare remote that people push to
// ---------------------------------------------------------------------------------------------

struct Remote {
    _dir: TempDir,
    path: PathBuf,
}

impl Remote {
    fn new() -> Remote {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("remote.git");
        let repo = Repository::init_opts(
            &path,
            git2::RepositoryInitOptions::new()
                .bare(true)
                .initial_head(BRANCH),
        )
        .unwrap();
        // Every ref update is logged, so the test can check each one was a fast-forward.
        repo.config()
            .unwrap()
            .set_str("core.logAllRefUpdates", "always")
            .unwrap();
        Remote { _dir: dir, path }
    }

    fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    fn repo(&self) -> Repository {
        Repository::open_bare(&self.path).unwrap()
    }

    fn head(&self) -> Oid {
        self.tip(BRANCH).expect("the main branch")
    }

    fn tip(&self, branch: &str) -> Option<Oid> {
        self.repo()
            .find_reference(&format!("refs/heads/{branch}"))
            .ok()
            .and_then(|r| r.target())
    }

    /// A person's commit on top of the branch's current head, pushed as a fast-forward
    /// (compare-and-swap on the ref, retried when someone else pushed first).
    fn commit(&self, message: &str, changes: &[(&str, Option<&str>)]) -> Oid {
        let repo = self.repo();
        loop {
            let parent = repo
                .find_reference(&format!("refs/heads/{BRANCH}"))
                .ok()
                .and_then(|r| r.peel_to_commit().ok());
            let mut tree = parent.as_ref().map(|p| p.tree().unwrap().id());
            for (path, content) in changes {
                let base = tree.map(|t| repo.find_tree(t).unwrap());
                let parts: Vec<&str> = path.split('/').collect();
                let blob = content.map(|c| repo.blob(c.as_bytes()).unwrap());
                tree = Some(put(
                    &repo,
                    base.as_ref(),
                    &parts,
                    blob,
                    FileMode::Blob.into(),
                ));
            }
            let tree = repo.find_tree(tree.unwrap()).unwrap();
            let person = Signature::now("A Person", "person@example.com").unwrap();
            let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
            let oid = repo
                .commit(None, &person, &person, message, &tree, &parents)
                .unwrap();
            let name = format!("refs/heads/{BRANCH}");
            let updated = match &parent {
                Some(p) => repo.reference_matching(&name, oid, true, p.id(), "push"),
                None => repo.reference(&name, oid, false, "push"),
            };
            if updated.is_ok() {
                return oid;
            }
        }
    }

    /// A symlink committed by a person.
    fn symlink(&self, path: &str, target: &str) -> Oid {
        let repo = self.repo();
        let parent = repo.find_commit(self.head()).unwrap();
        let blob = repo.blob(target.as_bytes()).unwrap();
        let parts: Vec<&str> = path.split('/').collect();
        let tree = put(
            &repo,
            Some(&parent.tree().unwrap()),
            &parts,
            Some(blob),
            FileMode::Link.into(),
        );
        let tree = repo.find_tree(tree).unwrap();
        let person = Signature::now("A Person", "person@example.com").unwrap();
        repo.commit(
            Some("HEAD"),
            &person,
            &person,
            "a symlink",
            &tree,
            &[&parent],
        )
        .unwrap()
    }

    /// Fast-forward main to `commit` (a merge of a result branch, as GitHub's fast-forward
    /// or a person's `git merge --ff-only` would do it).
    fn fast_forward(&self, commit: Oid) {
        let repo = self.repo();
        let old = self.head();
        assert!(repo.graph_descendant_of(commit, old).unwrap() || commit == old);
        repo.reference_matching(&format!("refs/heads/{BRANCH}"), commit, true, old, "merge")
            .unwrap();
    }

    fn delete_branch(&self, branch: &str) {
        self.repo()
            .find_reference(&format!("refs/heads/{branch}"))
            .unwrap()
            .delete()
            .unwrap();
    }

    fn file(&self, commit: Oid, path: &str) -> Option<String> {
        let repo = self.repo();
        let tree = repo.find_commit(commit).unwrap().tree().unwrap();
        let entry = tree.get_path(Path::new(path)).ok()?;
        let blob = repo.find_blob(entry.id()).unwrap();
        Some(String::from_utf8(blob.content().to_vec()).unwrap())
    }
}

/// `tree` with `blob` at `parts` (or that path removed).
fn put(
    repo: &Repository,
    tree: Option<&git2::Tree<'_>>,
    parts: &[&str],
    blob: Option<Oid>,
    mode: i32,
) -> Oid {
    let mut builder = repo.treebuilder(tree).unwrap();
    let (name, rest) = parts.split_first().unwrap();
    if rest.is_empty() {
        match blob {
            Some(blob) => {
                builder.insert(name, blob, mode).unwrap();
            }
            None => {
                builder.remove(name).unwrap();
            }
        }
    } else {
        let sub = tree
            .and_then(|t| t.get_name(name))
            .map(|e| repo.find_tree(e.id()).unwrap());
        let id = put(repo, sub.as_ref(), rest, blob, mode);
        builder.insert(name, id, FileMode::Tree.into()).unwrap();
    }
    builder.write().unwrap()
}

fn source_of(remote: &Remote, data: &Path) -> GitSource {
    GitSource::new(Location::Remote(remote.url()), BRANCH, "", data, None)
}

fn quick_retry() -> Retry {
    Retry {
        attempts: 50,
        backoff: Duration::from_millis(2),
    }
}

/// Every path where the trees of a commit and its first parent differ.
fn changed_paths(repo: &Repository, commit: &git2::Commit<'_>) -> Vec<String> {
    let parent = commit.parent(0).ok().map(|p| p.tree().unwrap());
    let diff = repo
        .diff_tree_to_tree(parent.as_ref(), Some(&commit.tree().unwrap()), None)
        .unwrap();
    diff.deltas()
        .map(|d| {
            d.new_file()
                .path()
                .or(d.old_file().path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect()
}

fn specs() -> Vec<(&'static str, String)> {
    vec![
        ("projects/web/project.yaml", project("web", "The website")),
        (
            "projects/web/tasks/draft.yaml",
            task("draft", "Draft the copy"),
        ),
        ("projects/docs/project.yaml", project("docs", "The docs")),
        (
            "projects/docs/tasks/write.yaml",
            task("write", "Write the docs"),
        ),
    ]
}

fn changes<'a>(files: &'a [(&'a str, String)]) -> Vec<(&'a str, Option<&'a str>)> {
    files.iter().map(|(p, c)| (*p, Some(c.as_str()))).collect()
}

// ---------------------------------------------------------------------------------------------
// Status files
// ---------------------------------------------------------------------------------------------

/// A status commit is the controller's own: syncing it writes nothing at all to the store,
/// and in a local repository with the branch checked out it updates the working tree's
/// status files and nothing else.
async fn status_commit_writes_nothing_to_the_store<S: TestStore + Writeback + Clone>() {
    let mut env = Env::<S>::new().await;
    let files = specs();
    env.commit("specs", &changes(&files));
    env.commit("notes", &[("NOTES.md", Some("people's notes\n"))]);
    let report = env.sync().await;
    assert_eq!(report.object_writes, 4, "{report:?}");
    let before = env.db.snapshot().await;

    let source = env.syncer.source().clone();
    let store = S::open(&env.db.url).await;
    let mut writer = StatusWriter::new(
        store,
        SOURCE,
        source.clone(),
        Author::default(),
        quick_retry(),
    );
    let commit = writer.flush().await.unwrap().expect("a status commit");

    // The commit is on the local repository's branch, authored as configured, with the
    // revision trailer, touching only `.agentops/`.
    let local = Repository::open(env.repo.path()).unwrap();
    let head = local.head().unwrap().peel_to_commit().unwrap();
    assert_eq!(head.id(), commit);
    assert_eq!(head.author().name().ok(), Some("agentops"));
    let revision = env.db.source().await.revision.unwrap();
    assert!(
        head.message()
            .unwrap()
            .contains(&format!("Agentops-Revision: {revision}")),
        "{}",
        head.message().unwrap()
    );
    let touched = changed_paths(&local, &head);
    assert_eq!(
        touched,
        [
            ".agentops/STATUS.md",
            ".agentops/status/docs.yaml",
            ".agentops/status/web.yaml"
        ]
    );
    assert!(is_own_commit(&local, &head));
    // The checkout was refreshed: the files are there and nothing is left modified.
    let board = std::fs::read_to_string(env.repo.path().join(".agentops/STATUS.md")).unwrap();
    assert!(board.contains("## web (active)"), "{board}");
    let statuses = local.statuses(None).unwrap();
    let dirty: Vec<String> = statuses
        .iter()
        .map(|s| format!("{:?} {}", s.status(), s.path().unwrap_or("")))
        .collect();
    assert!(dirty.is_empty(), "the checkout is not clean: {dirty:?}");

    // Syncing the status commit (and a second one) writes nothing.
    let report = env.sync().await;
    assert_noop(&report);
    assert_eq!(report.files_parsed, 0);
    env.db
        .execute("UPDATE tasks SET status = 'in_progress' WHERE name = 'draft'")
        .await;
    let before = DbSnapshot {
        tasks: env.db.tasks().await,
        xmin_objects: env
            .db
            .xmin(&["projects", "tasks", "agents", "events"])
            .await,
        ..before
    };
    let second = writer
        .flush()
        .await
        .unwrap()
        .expect("a second status commit");
    assert_ne!(second, commit);
    assert_noop(&env.sync().await);
    assert_eq!(
        env.db.snapshot().await,
        before,
        "a status commit changed the store"
    );
    // Nothing changed since: no commit.
    assert_eq!(writer.flush().await.unwrap(), None);

    // A person's commit after the status commits is synced as usual.
    let rev = env.commit(
        "retitle",
        &[(
            "projects/web/tasks/draft.yaml",
            Some(&task("draft", "Draft it again")),
        )],
    );
    let report = env.sync().await;
    assert_eq!(report.object_writes, 1, "{report:?}");
    assert_eq!(
        env.db.source().await.revision.as_deref(),
        Some(rev.as_str())
    );
}

/// 50 people's commits pushed while the controller commits status: all of them stay, the
/// remote only ever fast-forwards, and no status commit touches anything outside
/// `.agentops/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_pushing_while_status_is_committed() {
    let remote = Remote::new();
    let files = specs();
    let first = remote.commit("specs", &changes(&files));
    let data = tempfile::tempdir().unwrap();
    let source = source_of(&remote, data.path());
    let db = TestDb::new(Backend::Sqlite).await;
    let store = agentops::store::SqliteStore::open(&db.url).await;
    let mut syncer = Syncer::new(source.clone(), SOURCE, store.clone());
    syncer.sync().await.unwrap();
    let mut writer = StatusWriter::new(
        store.clone(),
        SOURCE,
        source,
        Author::default(),
        quick_retry(),
    );

    let people_path = remote.path.clone();
    let people = std::thread::spawn(move || {
        let remote = Remote {
            _dir: tempfile::tempdir().unwrap(),
            path: people_path,
        };
        let mut commits = Vec::new();
        for i in 0..50 {
            let note = format!("note {i}\n");
            let path = format!("notes/{:02}.md", i % 7);
            commits.push(remote.commit(&format!("note {i}"), &[(path.as_str(), Some(&note))]));
            std::thread::sleep(Duration::from_millis(3));
        }
        commits
    });

    let mut status_commits = Vec::new();
    let mut round = 0;
    while !people.is_finished() || round < 5 {
        round += 1;
        let phase = ["pending", "in_progress", "completed", "failed"][round % 4];
        db.execute(&format!(
            "UPDATE tasks SET status = '{phase}', attempt = {round} WHERE name = 'draft'"
        ))
        .await;
        if let Some(commit) = writer.flush().await.unwrap() {
            status_commits.push(commit);
        }
        syncer.sync().await.unwrap();
    }
    let human = people.join().unwrap();
    status_commits.extend(writer.flush().await.unwrap());
    let head = remote.head();
    let repo = remote.repo();

    // Every person's commit is in the final history.
    for (i, c) in std::iter::once(&first).chain(&human).enumerate() {
        assert!(
            *c == head || repo.graph_descendant_of(head, *c).unwrap(),
            "commit {i} ({c}) is not in the final history"
        );
    }
    // Each ref update of the remote's branch was a fast-forward.
    let reflog = repo.reflog(&format!("refs/heads/{BRANCH}")).unwrap();
    assert!(
        reflog.len() >= 51 + status_commits.len().min(1),
        "the reflog has {} entries",
        reflog.len()
    );
    for entry in reflog.iter() {
        let (old, new) = (entry.id_old(), entry.id_new());
        assert!(
            old.is_zero() || repo.graph_descendant_of(new, old).unwrap(),
            "{old} -> {new} is not a fast-forward"
        );
    }
    // Status commits touch only `.agentops/`, and there were some.
    let mut walk = repo.revwalk().unwrap();
    walk.push(head).unwrap();
    let mut seen_status = 0;
    for oid in walk {
        let commit = repo.find_commit(oid.unwrap()).unwrap();
        if commit.author().name().ok() != Some("agentops") {
            continue;
        }
        seen_status += 1;
        for path in changed_paths(&repo, &commit) {
            assert!(
                path.starts_with(".agentops/"),
                "status commit {} touched {path}",
                commit.id()
            );
        }
        assert!(is_own_commit(&repo, &commit));
    }
    assert!(seen_status >= 2, "only {seen_status} status commits landed");
    assert_eq!(
        seen_status,
        status_commits.len(),
        "every status commit made is in the history, and no other"
    );
    // The status shown is the last one the store had.
    let last = remote.file(head, ".agentops/status/web.yaml").unwrap();
    assert!(last.contains(&format!("attempt: {round}")), "{last}");
    // People's notes are all there, untouched by status commits.
    for i in 43..50 {
        let note = remote
            .file(head, &format!("notes/{:02}.md", i % 7))
            .unwrap();
        assert_eq!(note, format!("note {i}\n"));
    }
}

/// A remote served by `git daemon` (real `git receive-pack`), with a pre-receive hook that
/// refuses the next `n` pushes.
struct Daemon {
    _proc: Proc,
    url: String,
    refusals: PathBuf,
}

impl Daemon {
    async fn serve(remote: &Remote, dir: &Path) -> Daemon {
        let refusals = dir.join("refusals");
        std::fs::write(&refusals, "0").unwrap();
        let hook = remote.path.join("hooks/pre-receive");
        std::fs::create_dir_all(hook.parent().unwrap()).unwrap();
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\nn=$(cat '{0}')\nif [ \"$n\" -gt 0 ]; then echo $((n - 1)) > '{0}'; \
                 echo 'refused by the test hook' >&2; exit 1; fi\nexit 0\n",
                refusals.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        let port = free_port();
        let mut command = std::process::Command::new("git");
        command
            .arg("daemon")
            .arg("--export-all")
            .arg("--enable=receive-pack")
            .arg("--reuseaddr")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!(
                "--base-path={}",
                remote.path.parent().unwrap().display()
            ));
        let proc = Proc::spawn("git daemon", command, &dir.join("daemon.log"));
        let url = format!("git://127.0.0.1:{port}/remote.git");
        // Ready once it lists the branch.
        eventually(
            "git daemon serves the remote",
            Duration::from_secs(10),
            || {
                let url = url.clone();
                async move {
                    let out = std::process::Command::new("git")
                        .args(["ls-remote", &url])
                        .output()
                        .ok()?;
                    out.status.success().then_some(())
                }
            },
        )
        .await;
        Daemon {
            _proc: proc,
            url,
            refusals,
        }
    }

    fn refuse_next(&self, n: u32) {
        std::fs::write(&self.refusals, n.to_string()).unwrap();
    }
}

/// Over a real `git receive-pack`, a refused ref (reported through `push_update_reference`,
/// while the push itself "succeeds") is an event and a retry; a push refused every time is an
/// error and an event, and the status is pushed by the next flush even though nothing changed
/// in the store since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_pushes_are_events_and_are_retried() {
    let remote = Remote::new();
    let files = specs();
    remote.commit("specs", &changes(&files));
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::serve(&remote, dir.path()).await;
    let source = GitSource::new(
        Location::Remote(daemon.url.clone()),
        BRANCH,
        "",
        &dir.path().join("data"),
        None,
    );
    let db = TestDb::new(Backend::Sqlite).await;
    let store = agentops::store::SqliteStore::open(&db.url).await;
    Syncer::new(source.clone(), SOURCE, store.clone())
        .sync()
        .await
        .unwrap();
    let retry = Retry {
        attempts: 3,
        backoff: Duration::from_millis(10),
    };
    let mut writer = StatusWriter::new(store, SOURCE, source, Author::default(), retry);

    daemon.refuse_next(2);
    let commit = writer
        .flush()
        .await
        .unwrap()
        .expect("pushed on the third attempt");
    assert_eq!(remote.head(), commit);
    let refused = db.events_of("status.push_refused").await;
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[0]["error"]
            .as_str()
            .unwrap()
            .contains("refs/heads/main"),
        "{refused:?}"
    );

    db.execute("UPDATE tasks SET status = 'failed' WHERE name = 'draft'")
        .await;
    daemon.refuse_next(3);
    let error = writer.flush().await.unwrap_err();
    assert!(error.to_string().contains("after 3 attempts"), "{error}");
    assert_eq!(remote.head(), commit, "a refused push moved the branch");
    assert_eq!(db.events_of("status.push_failed").await.len(), 1);
    // The next flush pushes what is still pending.
    let pushed = writer.flush().await.unwrap().expect("the pending status");
    assert_eq!(remote.head(), pushed);
    let yaml = remote.file(pushed, ".agentops/status/web.yaml").unwrap();
    assert!(yaml.contains("phase: failed"), "{yaml}");
}

/// `reconcile --once` syncs and commits the status before it exits.
#[tokio::test]
async fn reconcile_once_flushes_the_status() {
    let remote = Remote::new();
    let files = specs();
    remote.commit("specs", &changes(&files));
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_agentops"))
        .args(["reconcile", "--once", "--repo", &remote.url()])
        .arg("--database")
        .arg(format!(
            "sqlite://{}",
            dir.path().join("db.sqlite").display()
        ))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--author-name",
            "Status Bot",
            "--author-email",
            "bot@example.com",
        ])
        .env("AGENTOPS_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("status committed:"), "{stderr}");
    let repo = remote.repo();
    let head = repo.find_commit(remote.head()).unwrap();
    assert_eq!(head.author().name().ok(), Some("Status Bot"));
    assert_eq!(head.author().email().ok(), Some("bot@example.com"));
    let yaml = remote.file(head.id(), ".agentops/status/web.yaml").unwrap();
    assert!(
        yaml.contains("\"draft\":\n    title: \"Draft the copy\"\n    phase: pending"),
        "{yaml}"
    );
    // Run again: nothing changed, so no commit.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_agentops"))
        .args(["reconcile", "--once", "--repo", &remote.url()])
        .arg("--database")
        .arg(format!(
            "sqlite://{}",
            dir.path().join("db.sqlite").display()
        ))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("AGENTOPS_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(stderr.contains("status unchanged"), "{stderr}");
    assert_eq!(remote.head(), head.id());
}

/// A dependency cycle across two projects: after a sync, each project's status file carries
/// the error of its own task, at that task's `dependsOn` entry.
#[tokio::test]
async fn every_task_of_a_cycle_has_its_error_in_the_status() {
    let remote = Remote::new();
    let files = specs();
    remote.commit("specs", &changes(&files));
    let dir = tempfile::tempdir().unwrap();
    let reconcile = || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_agentops"))
            .args(["reconcile", "--once", "--repo", &remote.url()])
            .arg("--database")
            .arg(format!(
                "sqlite://{}",
                dir.path().join("db.sqlite").display()
            ))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("AGENTOPS_LOG", "warn")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{stderr}");
    };
    reconcile();
    let draft = "projects/web/tasks/draft.yaml";
    let write = "projects/docs/tasks/write.yaml";
    remote.commit(
        "a cycle",
        &[
            (
                draft,
                Some(&format!(
                    "{}  dependsOn: [docs/write]\n",
                    task("draft", "Draft the copy")
                )),
            ),
            (
                write,
                Some(&format!(
                    "{}  dependsOn: [web/draft]\n",
                    task("write", "Write the docs")
                )),
            ),
        ],
    );
    reconcile();
    let head = remote.head();
    for (project, message) in [
        (
            "web",
            format!("{draft}:9:15: dependency cycle: draft → docs/write → draft"),
        ),
        (
            "docs",
            format!("{write}:9:15: dependency cycle: write → web/draft → write"),
        ),
    ] {
        let yaml = remote
            .file(head, &format!(".agentops/status/{project}.yaml"))
            .unwrap_or_else(|| panic!("no status for {project}"));
        assert!(
            yaml.contains(&format!("    message: \"{message}\"\n")),
            "{project}: {yaml}"
        );
    }
}

/// `up` commits the status on its interval and once more on its way out.
#[tokio::test]
async fn up_commits_the_status_before_it_exits() {
    let remote = Remote::new();
    let p = project("web", "The website");
    remote.commit("specs", &[("projects/web/project.yaml", Some(p.as_str()))]);
    let dir = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentops"));
    command
        .args(["up", "--repo", &remote.url(), "--exit-when-idle"])
        .args(["--status-interval", "100ms", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--database")
        .arg(format!(
            "sqlite://{}",
            dir.path().join("db.sqlite").display()
        ))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("AGENTOPS_LOG", "warn")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("up exits once idle")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let repo = remote.repo();
    let head = repo.find_commit(remote.head()).unwrap();
    assert_eq!(head.author().name().ok(), Some("agentops"), "{stderr}");
    assert!(is_own_commit(&repo, &head));
    let yaml = remote.file(head.id(), ".agentops/status/web.yaml").unwrap();
    assert!(yaml.contains("project: \"web\"\nphase: active"), "{yaml}");
    assert!(yaml.contains("tasks: {}"), "{yaml}");
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// A controller's API in this process, on a store and a remote.
struct Api {
    url: String,
    http: reqwest::Client,
    _loops: agentops::dispatch::Background,
}

impl Api {
    async fn start<S: TestStore + Queue + Writeback + agentops::store::usage::UsageLog + Clone>(
        store: S,
        source: GitSource,
    ) -> Api {
        let dispatcher = Dispatcher::new(store.clone(), DispatchConfig::default());
        let loops = dispatcher.start();
        let results = GitResults {
            store,
            source,
            author: Author::default(),
            retry: quick_retry(),
        };
        let state = ApiState::with_writeback(dispatcher, Some(Arc::new(results)), None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            agentops::api::serve(
                listener,
                agentops::api::router(state),
                std::future::pending(),
            )
            .await
            .unwrap();
        });
        Api {
            url,
            http: reqwest::Client::new(),
            _loops: loops,
        }
    }

    async fn post(&self, token: Option<&str>, path: &str, body: Value) -> (u16, Value) {
        let mut request = self.http.post(format!("{}{path}", self.url)).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await.unwrap();
        let status = answer.status().as_u16();
        (status, answer.json().await.unwrap_or(Value::Null))
    }

    async fn register(&self, name: &str) -> String {
        let (status, body) = self
            .post(
                None,
                "/api/v1/agents/register",
                json!({"name": name, "type": "seed"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    async fn claim(&self, token: &str, max: u32, wait_ms: u64) -> Vec<Value> {
        let (status, body) = self
            .post(
                Some(token),
                "/api/v1/claim",
                json!({"max": max, "wait_ms": wait_ms}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["tasks"].as_array().unwrap().clone()
    }

    async fn complete(&self, token: &str, task: &Value, body: Value) -> (u16, Value) {
        let mut body = body;
        body["run_lease"] = task["run_lease"].clone();
        let id = task["id"].as_str().unwrap();
        self.post(Some(token), &format!("/api/v1/tasks/{id}/complete"), body)
            .await
    }
}

fn output_task(name: &str, mode: &str, paths: &str, depends: &str) -> String {
    format!(
        "{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  title: Task {name}\n  action:\n    prompt: Do {name}\n  output:\n    mode: {mode}\n    paths: [{paths}]\n{depends}"
    )
}

struct ResultsEnv<S: TestStore> {
    remote: Remote,
    _data: TempDir,
    db: TestDb,
    store: S,
    source: GitSource,
    syncer: Syncer<S>,
    api: Api,
    token: String,
    seed: Oid,
}

impl<S: TestStore + Queue + Writeback + agentops::store::usage::UsageLog + Clone> ResultsEnv<S> {
    async fn new() -> ResultsEnv<S> {
        Self::new_with(|_| {}).await
    }

    /// With `more` done to the remote after the specs are committed, before they are synced.
    async fn new_with(more: impl FnOnce(&Remote)) -> ResultsEnv<S> {
        let remote = Remote::new();
        let files = vec![
            ("projects/web/project.yaml", project("web", "The website")),
            (
                "projects/web/tasks/draft.yaml",
                output_task("draft", "pull-request", "site/", ""),
            ),
            (
                "projects/web/tasks/publish.yaml",
                output_task("publish", "pull-request", "site/", "  dependsOn: [draft]\n"),
            ),
            (
                "projects/web/tasks/direct.yaml",
                output_task("direct", "commit", "docs/", ""),
            ),
            (
                "projects/web/tasks/quiet.yaml",
                output_task("quiet", "none", "site/", ""),
            ),
            ("README.md", "The website.\n".to_owned()),
            ("site/index.html", "<h1>old</h1>\n".to_owned()),
        ];
        remote.commit("specs", &changes(&files));
        more(&remote);
        let seed = remote.head();
        let data = tempfile::tempdir().unwrap();
        let source = source_of(&remote, data.path());
        let db = TestDb::new(S::BACKEND).await;
        let store = S::open(&db.url).await;
        let mut syncer = Syncer::new(source.clone(), SOURCE, store.clone());
        syncer.sync().await.unwrap();
        let api = Api::start(store.clone(), source.clone()).await;
        let token = api.register("writer").await;
        ResultsEnv {
            remote,
            _data: data,
            db,
            store,
            source,
            syncer,
            api,
            token,
            seed,
        }
    }

    /// Claim everything ready and return it by task name.
    async fn claim_all(&self) -> std::collections::BTreeMap<String, Value> {
        self.api
            .claim(&self.token, 10, 2_000)
            .await
            .into_iter()
            .map(|t| (t["name"].as_str().unwrap().to_owned(), t))
            .collect()
    }

    async fn status(&self, name: &str) -> String {
        self.db.task("web", name).await.status
    }

    /// Claim everything, complete `draft` with `files`, and return the tip of its result
    /// branch.
    async fn complete_draft(&self, files: Value) -> Oid {
        let claimed = self.claim_all().await;
        let (status, body) = self
            .api
            .complete(&self.token, &claimed["draft"], json!({ "files": files }))
            .await;
        assert_eq!(status, 200, "{body}");
        self.remote.tip("agentops/web/draft").unwrap()
    }

    async fn result(&self, name: &str) -> Value {
        let text = self
            .db
            .text(&format!(
                "SELECT CAST(result AS text) FROM tasks WHERE name = '{name}'"
            ))
            .await
            .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn reviews(&self) -> Reviews<S> {
        Reviews {
            store: self.store.clone(),
            forge: Arc::new(Branches {
                source: self.source.clone(),
            }),
            base: BRANCH.to_owned(),
            policy: LeasePolicy {
                backoff_base: Duration::ZERO,
                ..LeasePolicy::default()
            },
        }
    }
}

/// Output files land on `agentops/<project>/<task>` from the dispatch revision, authored by
/// the agent with the task trailers; the task waits in `review` (its dependents too) until the
/// branch is merged into main, which completes it.
async fn output_goes_to_a_result_branch_and_merging_completes_it<S>()
where
    S: TestStore + Queue + Writeback + agentops::store::usage::UsageLog + Clone,
{
    let mut env = ResultsEnv::<S>::new().await;
    let claimed = env.claim_all().await;
    assert_eq!(
        claimed.keys().collect::<Vec<_>>(),
        ["direct", "draft", "quiet"]
    );
    // People keep working while the agent does: the result still starts at the dispatch
    // revision.
    env.remote
        .commit("later", &[("README.md", Some("Changed later.\n"))]);

    let (status, body) = env
        .api
        .complete(
            &env.token,
            &claimed["draft"],
            json!({"result": {"summary": "drafted"}, "files": [
                {"path": "site/copy.md", "content": "# Welcome\n"},
                {"path": "site/logo.bin", "content_base64": "AP8A"},
                {"path": "site/run.sh", "content": "#!/bin/sh\n", "mode": "executable"}
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(env.status("draft").await, "review");

    let branch = "agentops/web/draft";
    let tip = env.remote.tip(branch).expect("the result branch");
    let repo = env.remote.repo();
    let commit = repo.find_commit(tip).unwrap();
    assert_eq!(
        commit.parent_id(0).unwrap(),
        env.seed,
        "not from the dispatch revision"
    );
    assert_eq!(commit.author().name().ok(), Some("writer"));
    assert_eq!(commit.committer().name().ok(), Some("agentops"));
    let message = commit.message().unwrap();
    assert!(
        message.contains("\nAgentops-Task: web/draft\n"),
        "{message}"
    );
    assert!(message.contains("\nAgentops-Attempt: 0\n"), "{message}");
    assert_eq!(
        env.remote.file(tip, "site/copy.md").as_deref(),
        Some("# Welcome\n")
    );
    assert_eq!(
        env.remote.file(tip, "README.md").as_deref(),
        Some("The website.\n")
    );
    let tree = commit.tree().unwrap();
    let logo = tree.get_path(Path::new("site/logo.bin")).unwrap();
    assert_eq!(repo.find_blob(logo.id()).unwrap().content(), [0u8, 0xff, 0]);
    let run = tree.get_path(Path::new("site/run.sh")).unwrap();
    assert_eq!(run.filemode(), i32::from(FileMode::BlobExecutable));
    let mut changed = changed_paths(&repo, &commit);
    changed.sort();
    assert_eq!(changed, ["site/copy.md", "site/logo.bin", "site/run.sh"]);

    let result = env.result("draft").await;
    assert_eq!(result["summary"], "drafted");
    assert_eq!(result["output"]["branch"], branch);
    assert_eq!(result["output"]["commit"], tip.to_string());
    assert_eq!(result["output"]["base"], env.seed.to_string());
    assert_eq!(env.db.events_of("task.review").await.len(), 1);

    // In review, `publish` (which depends on `draft`) is not ready.
    assert!(env.api.claim(&env.token, 1, 300).await.is_empty());
    // Not merged yet: nothing happens.
    let report = env.reviews().check().await.unwrap();
    assert_eq!(report, Default::default());
    assert_eq!(env.status("draft").await, "review");

    // A person merges the branch (a merge commit on top of main, as a merge button does).
    let head = env.remote.head();
    let merge = {
        let parent = repo.find_commit(head).unwrap();
        let tree = put(
            &repo,
            Some(&parent.tree().unwrap()),
            &["site", "copy.md"],
            Some(repo.blob(b"# Welcome\n").unwrap()),
            FileMode::Blob.into(),
        );
        let tree = repo.find_tree(tree).unwrap();
        let person = Signature::now("A Person", "person@example.com").unwrap();
        repo.commit(
            None,
            &person,
            &person,
            "Merge agentops/web/draft",
            &tree,
            &[&parent, &commit],
        )
        .unwrap()
    };
    env.remote.fast_forward(merge);
    env.syncer.sync().await.unwrap();
    let report = env.reviews().check().await.unwrap();
    assert_eq!(report.merged, 1, "{report:?}");
    assert_eq!(env.status("draft").await, "completed");
    let completed = env.db.events_of("task.completed").await;
    assert!(
        completed
            .iter()
            .any(|e| e["name"] == "draft"
                && e["merged"].as_str().is_some_and(|m| m.contains(branch))),
        "{completed:?}"
    );
    // Its dependent is ready now.
    let next = env.api.claim(&env.token, 1, 2_000).await;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0]["name"], "publish");
}

/// `output.mode: commit` puts the files on the main branch and completes the task; a task
/// whose mode is `none` may not write files at all.
async fn commit_mode_goes_to_main<S>()
where
    S: TestStore + Queue + Writeback + agentops::store::usage::UsageLog + Clone,
{
    let env = ResultsEnv::<S>::new().await;
    let claimed = env.claim_all().await;
    let before = env.remote.head();
    let (status, body) = env
        .api
        .complete(
            &env.token,
            &claimed["direct"],
            json!({"result": "done", "files": [{"path": "docs/guide.md", "content": "Guide\n"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(env.status("direct").await, "completed");
    let head = env.remote.head();
    let repo = env.remote.repo();
    let commit = repo.find_commit(head).unwrap();
    assert_eq!(commit.parent_id(0).unwrap(), before);
    assert_eq!(commit.author().name().ok(), Some("writer"));
    assert!(
        commit
            .message()
            .unwrap()
            .contains("Agentops-Task: web/direct")
    );
    assert_eq!(
        env.remote.file(head, "docs/guide.md").as_deref(),
        Some("Guide\n")
    );
    assert_eq!(changed_paths(&repo, &commit), ["docs/guide.md"]);
    let result = env.result("direct").await;
    assert_eq!(result["value"], "done");
    assert_eq!(result["output"]["mode"], "commit");

    let (status, body) = env
        .api
        .complete(
            &env.token,
            &claimed["quiet"],
            json!({"files": [{"path": "site/x", "content": "x"}]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("output mode is `none`"),
        "{body}"
    );
    assert_eq!(env.status("quiet").await, "in_progress");
}

/// Each bad output path is refused with a 400 that names it, before anything reaches Git;
/// the task stays held, so the agent can send a corrected completion.
#[tokio::test]
async fn bad_output_paths_are_refused() {
    let env = ResultsEnv::<agentops::store::SqliteStore>::new_with(|remote| {
        remote.symlink("site/linked", "../README.md");
    })
    .await;
    let claimed = env.claim_all().await;
    let draft = &claimed["draft"];
    let cases = [
        (
            json!({"path": "site/../README.md", "content": "x"}),
            "`..` is refused",
        ),
        (
            json!({"path": "/etc/passwd", "content": "x"}),
            "absolute paths are refused",
        ),
        (
            json!({"path": "site/.git/config", "content": "x"}),
            "inside `.git` are refused",
        ),
        (
            json!({"path": ".git/config", "content": "x"}),
            "inside `.git` are refused",
        ),
        (
            json!({"path": ".agentops/status/web.yaml", "content": "x"}),
            "belongs to the controller",
        ),
        (
            json!({"path": "site/link", "content": "../../x", "mode": "symlink"}),
            "symlinks are refused",
        ),
        (
            json!({"path": "site/linked/x.md", "content": "x"}),
            "passes through the symlink `site/linked`",
        ),
        (
            json!({"path": "site/linked", "content": "x"}),
            "symlinks are refused",
        ),
        (
            json!({"path": "README.md", "content": "x"}),
            "outside the task's output.paths (site)",
        ),
        (
            json!({"path": "site/x", "content_base64": "%%%"}),
            "content_base64 is not base64",
        ),
    ];
    let branch = "agentops/web/draft";
    for (file, expected) in cases {
        let (status, body) = env
            .api
            .complete(&env.token, draft, json!({"files": [file.clone()]}))
            .await;
        assert_eq!(status, 400, "{file}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(expected), "{file}: {error}");
        let path = file["path"].as_str().unwrap();
        assert!(
            error.contains(path),
            "the error does not name `{path}`: {error}"
        );
        assert_eq!(env.remote.tip(branch), None, "{file} reached Git");
    }
    assert_eq!(env.status("draft").await, "in_progress");
    // A correct completion still goes through.
    let (status, body) = env
        .api
        .complete(
            &env.token,
            draft,
            json!({"files": [{"path": "site/ok.md", "content": "ok"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(env.remote.tip(branch).is_some());
}

/// Bodies the protocol's types do not accept are refused with a 400 naming the field and the
/// value, and the agent's lease is untouched.
#[tokio::test]
async fn malformed_protocol_bodies_are_refused_naming_the_value() {
    let env = ResultsEnv::<agentops::store::SqliteStore>::new_with(|_| {}).await;
    let claimed = env.claim_all().await;
    let (status, body) = env
        .api
        .post(
            None,
            "/api/v1/agents/register",
            json!({"name": "someone", "type": "boss"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("type") && error.contains("`boss`"),
        "{error}"
    );

    for (path, request) in [
        (
            "/api/v1/heartbeat",
            json!({"tasks": [{"id": "id-1", "run_lease": 1}]}),
        ),
        (
            "/api/v1/complete",
            json!({"tasks": [{"id": "id-1", "run_lease": 1, "result": {}}]}),
        ),
    ] {
        let (status, body) = env.api.post(Some(&env.token), path, request).await;
        assert_eq!(status, 400, "{path}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("invalid task id `id-1`"), "{path}: {error}");
    }
    let draft = &claimed["draft"];
    let (status, body) = env
        .api
        .post(
            Some(&env.token),
            "/api/v1/heartbeat",
            json!({"tasks": [{"id": draft["id"], "run_lease": draft["run_lease"]}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tasks"][0]["held"], true, "{body}");
    assert_eq!(env.status("draft").await, "in_progress");
}

/// Without a forge, deleting a result branch unmerged rejects the output: the task is retried
/// with attempt + 1 (its next output starts again from the dispatch revision, the old branch
/// being gone); once its retries are spent it fails.
async fn deleted_branch_retries_then_fails<S>()
where
    S: TestStore + Queue + Writeback + agentops::store::usage::UsageLog + Clone,
{
    let env = ResultsEnv::<S>::new().await;
    env.db
        .execute("UPDATE tasks SET retries = 1 WHERE name = 'draft'")
        .await;
    let branch = "agentops/web/draft";
    let first = env
        .complete_draft(json!([{"path": "site/a.md", "content": "a"}]))
        .await;
    // The branch stays: still open.
    assert_eq!(env.reviews().check().await.unwrap(), Default::default());

    // A person deletes the branch without merging it: rejected.
    env.remote.delete_branch(branch);
    let report = env.reviews().check().await.unwrap();
    assert_eq!(report.retried, 1, "{report:?}");
    let row = env.db.task("web", "draft").await;
    assert_eq!((row.status.as_str(), row.attempt), ("pending", 1));
    let updates: Vec<(String, String)> = env
        .db
        .rows("SELECT update_type, message FROM task_updates WHERE update_type = 'info'")
        .await;
    assert_eq!(updates.len(), 1);
    assert!(
        updates[0].1.contains("closed without merging"),
        "{updates:?}"
    );

    let again = env.api.claim(&env.token, 1, 3_000).await;
    assert_eq!(again[0]["name"], "draft");
    assert_eq!(again[0]["attempt"], 1);
    let (status, body) = env
        .api
        .complete(
            &env.token,
            &again[0],
            json!({"files": [{"path": "site/b.md", "content": "b"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let second = env.remote.tip(branch).unwrap();
    assert_ne!(second, first);
    let repo = env.remote.repo();
    let commit = repo.find_commit(second).unwrap();
    assert!(commit.message().unwrap().contains("Agentops-Attempt: 1"));
    assert_eq!(
        commit.parent_id(0).unwrap(),
        env.seed,
        "the deleted branch is gone: start again"
    );

    env.remote.delete_branch(branch);
    let report = env.reviews().check().await.unwrap();
    assert_eq!(report.failed, 1, "{report:?}");
    assert_eq!(env.status("draft").await, "failed");
    assert_eq!(env.db.events_of("task.failed").await.len(), 1);
}

/// Without a forge, a squash merge (a person's own commit on main with the branch's changes)
/// followed by deleting the branch completes the task: the result commit is not in main's
/// history, but its changes are, so the work is not done again.
async fn squash_merged_branch_completes<S>()
where
    S: TestStore + Queue + Writeback + agentops::store::usage::UsageLog + Clone,
{
    let env = ResultsEnv::<S>::new().await;
    let branch = "agentops/web/draft";
    let result = env
        .complete_draft(json!([
            {"path": "site/a.md", "content": "a"},
            {"path": "site/b.md", "content": "b"}
        ]))
        .await;

    // Main moves on, then takes only part of the branch: not merged, still open.
    env.remote
        .commit("Unrelated work", &[("docs/notes.md", Some("notes"))]);
    env.remote
        .commit("Squash part of it", &[("site/a.md", Some("a"))]);
    assert_eq!(env.reviews().check().await.unwrap(), Default::default());
    assert_eq!(env.status("draft").await, "review");

    // The rest lands too, in a commit of the person's own; then the branch is deleted.
    let squash = env
        .remote
        .commit("Squash-merge draft", &[("site/b.md", Some("b"))]);
    assert!(
        !env.remote
            .repo()
            .graph_descendant_of(squash, result)
            .unwrap()
    );
    env.remote.delete_branch(branch);
    let report = env.reviews().check().await.unwrap();
    assert_eq!((report.merged, report.retried), (1, 0), "{report:?}");
    let row = env.db.task("web", "draft").await;
    assert_eq!((row.status.as_str(), row.attempt), ("completed", 0));
}

both_backends!(
    status_commit_writes_nothing_to_the_store,
    output_goes_to_a_result_branch_and_merging_completes_it,
    commit_mode_goes_to_main,
    deleted_branch_retries_then_fails,
    squash_merged_branch_completes,
);

/// A completion with files refused by the controller does not need the store's agreement
/// first: a stale run lease is refused before anything reaches Git.
#[tokio::test]
async fn stale_leases_commit_nothing() {
    let env = ResultsEnv::<agentops::store::SqliteStore>::new().await;
    let claimed = env.claim_all().await;
    let mut stale = claimed["draft"].clone();
    stale["run_lease"] = json!(stale["run_lease"].as_i64().unwrap() + 5);
    let (status, body) = env
        .api
        .complete(
            &env.token,
            &stale,
            json!({"files": [{"path": "site/a.md", "content": "a"}]}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(env.remote.tip("agentops/web/draft"), None);
}

// ---------------------------------------------------------------------------------------------
// The webhook
// ---------------------------------------------------------------------------------------------

fn github_signature(secret: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn nudged(
    triggers: &mut agentops::source::watch::Triggers,
) -> Option<agentops::source::watch::Reason> {
    tokio::time::timeout(Duration::from_millis(300), triggers.next())
        .await
        .ok()
}

/// Deliveries must be signed with the secret; a signed push or pull_request event nudges the
/// poll and the review check, anything else nudges nothing.
#[tokio::test]
async fn webhook_verifies_signatures_and_nudges() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = agentops::store::SqliteStore::open(&db.url).await;
    let dispatcher = Dispatcher::new(store, DispatchConfig::default());
    let mut triggers = agentops::source::watch::Triggers::new(Duration::from_secs(3600));
    assert_eq!(
        triggers.next().await,
        agentops::source::watch::Reason::Start
    );
    let review = Arc::new(tokio::sync::Notify::new());
    let hooks = agentops::api::Hooks {
        secret: Some("s3cret".to_owned()),
        sync: triggers.nudger(),
        review: review.clone(),
    };
    let state = ApiState::with_writeback(dispatcher, None, Some(hooks));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/github", listener.local_addr().unwrap());
    tokio::spawn(async move {
        agentops::api::serve(
            listener,
            agentops::api::router(state),
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    let http = reqwest::Client::new();
    let body = br#"{"ref": "refs/heads/main"}"#.to_vec();
    let deliver = |event: &'static str, signature: Option<String>| {
        let mut request = http
            .post(&url)
            .header("x-github-event", event)
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(signature) = signature {
            request = request.header("x-hub-signature-256", signature);
        }
        request.send()
    };

    let unsigned = deliver("push", None).await.unwrap();
    assert_eq!(unsigned.status(), 401);
    let wrong = deliver("push", Some(github_signature("other", &body)))
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        nudged(&mut triggers).await,
        None,
        "a refused delivery nudged the poll"
    );

    let push = deliver("push", Some(github_signature("s3cret", &body)))
        .await
        .unwrap();
    assert_eq!(push.status(), 202);
    assert_eq!(
        nudged(&mut triggers).await,
        Some(agentops::source::watch::Reason::Nudge)
    );
    tokio::time::timeout(Duration::from_millis(300), review.notified())
        .await
        .expect("the review check was not nudged");

    let pr = deliver("pull_request", Some(github_signature("s3cret", &body)))
        .await
        .unwrap();
    assert_eq!(pr.status(), 202);
    assert_eq!(
        nudged(&mut triggers).await,
        Some(agentops::source::watch::Reason::Nudge)
    );

    let ping = deliver("ping", Some(github_signature("s3cret", &body)))
        .await
        .unwrap();
    assert_eq!(ping.status(), 200);
    let issues = deliver("issues", Some(github_signature("s3cret", &body)))
        .await
        .unwrap();
    assert_eq!(issues.status(), 202);
    assert_eq!(
        nudged(&mut triggers).await,
        None,
        "an unrelated event nudged the poll"
    );
}
