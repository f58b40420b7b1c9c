//! The `agentops` binary end to end: validate, reconcile --once, status, migrate.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use serde_json::{Value, json};

both_backends!(
    reconcile_once_then_status,
    migrate_a_fresh_database,
    migrate_a_database_that_recorded_the_released_wording
);

/// The binary with a clean environment: no `AGENTOPS_*` from the caller, its data directory
/// set through `AGENTOPS_DATA_DIR`.
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

/// An examples-like spec repository: two projects with dependent tasks (one across
/// projects), an agent, a tool, and files that are not specs.
fn good_fixture() -> Vec<(&'static str, String)> {
    vec![
        (
            "projects/site/project.yaml",
            format!(
                "{API}\nkind: Project\nmetadata:\n  name: site\n  labels: {{area: marketing}}\nspec:\n  title: Launch the site\n  priority: high\n  owner: cos\n"
            ),
        ),
        (
            "projects/site/tasks/draft.yaml",
            format!(
                "{API}\nkind: Task\nmetadata:\n  name: draft\nspec:\n  title: Draft the copy\n  assignee: writer\n  capabilities: [writing]\n  action:\n    prompt: Write the copy.\n  output: {{mode: pull-request, paths: [site/]}}\n"
            ),
        ),
        (
            "projects/site/tasks/build.yaml",
            format!(
                "{API}\nkind: Task\nmetadata:\n  name: build\nspec:\n  title: Build the page\n  dependsOn: [draft]\n  action:\n    run:\n      command: [make, site]\n  timeout: 5m\n"
            ),
        ),
        (
            "projects/report/project.yaml",
            project("report", "Weekly report"),
        ),
        (
            "projects/report/tasks/gather.yml",
            format!(
                "{API}\nkind: Task\nmetadata:\n  name: gather\nspec:\n  title: Gather status\n  dependsOn: [site/build]\n  action:\n    prompt: Gather.\n"
            ),
        ),
        ("agents/writer.yaml", agent("writer", "writing")),
        (
            "tools/fetch.yaml",
            format!(
                "{API}\nkind: Tool\nmetadata:\n  name: fetch\nspec:\n  type: script\n  command: [python3, tools/fetch.py, \"{{url}}\"]\n"
            ),
        ),
        ("tools/fetch.py", "print('fetch')\n".to_owned()),
        ("README.md", "# specs\n".to_owned()),
    ]
}

/// The good fixture plus two errors, each in a file of its own.
fn bad_fixture() -> Vec<(&'static str, String)> {
    let mut files = good_fixture();
    files.push((
        "projects/site/tasks/extra.yaml",
        format!(
            "{API}\nkind: Task\nmetadata:\n  name: extra\nspec:\n  title: Extra\n  colour: red\n  action:\n    prompt: Extra.\n"
        ),
    ));
    for (path, content) in &mut files {
        if *path == "projects/report/tasks/gather.yml" {
            *content = content.replace("[site/build]", "[site/missing]");
        }
    }
    files
}

fn write_folder(dir: &Path, files: &[(&str, String)]) {
    for (path, content) in files {
        let full = dir.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
    }
}

fn commit_all(repo: &GitRepo, files: &[(&str, String)]) -> String {
    let changes: Vec<(&str, Option<&str>)> =
        files.iter().map(|(p, c)| (*p, Some(c.as_str()))).collect();
    repo.commit("specs", &changes)
}

#[test]
fn validate_a_good_folder_exits_0() {
    let specs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    write_folder(specs.path(), &good_fixture());
    let (code, stdout, stderr) = run(agentops(data.path()).arg("validate").arg(specs.path()));
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(stdout, "");
    assert!(stderr.contains("7 objects, no errors"), "{stderr}");

    let (code, stdout, _) = run(agentops(data.path())
        .args(["validate", "--format", "json"])
        .arg(specs.path()));
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap(), json!([]));
}

#[test]
fn validate_prints_each_error_and_exits_1() {
    let specs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    write_folder(specs.path(), &bad_fixture());

    // Run from elsewhere: paths are relative to the PATH argument, not the working directory.
    let (code, stdout, stderr) = run(agentops(data.path()).arg("validate").arg(specs.path()));
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with("projects/report/tasks/gather.yml:7:15: ")
            && lines[0].contains("site/missing"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("projects/site/tasks/extra.yaml:7:3: ") && lines[1].contains("colour"),
        "{}",
        lines[1]
    );
    assert!(stderr.contains("2 errors"), "{stderr}");

    let (code, json_out, _) = run(agentops(data.path())
        .args(["validate", "--format", "json"])
        .arg(specs.path()));
    assert_eq!(code, 1);
    let list: Vec<serde_json::Map<String, Value>> = serde_json::from_str(&json_out).unwrap();
    assert_eq!(list.len(), 2, "{json_out}");
    for (entry, line) in list.iter().zip(&lines) {
        let keys: Vec<&str> = entry.keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 4, "{entry:?}");
        for key in ["path", "line", "column", "message"] {
            assert!(entry.contains_key(key), "{entry:?}");
        }
        let text = format!(
            "{}:{}:{}: {}",
            entry["path"].as_str().unwrap(),
            entry["line"],
            entry["column"],
            entry["message"].as_str().unwrap()
        );
        assert_eq!(&text, line);
    }

    // A single file given as PATH is reported under the path as given.
    let file = specs.path().join("projects/site/tasks/extra.yaml");
    let (code, stdout, _) = run(agentops(data.path()).arg("validate").arg(&file));
    assert_eq!(code, 1);
    assert!(
        stdout.starts_with(&format!("{}:7:3: ", file.display())),
        "{stdout}"
    );
}

/// Files given one by one, as a pre-commit hook passes them: checked with the rest of their
/// Git work tree, only their own errors printed under the paths as given, YAML of other
/// tools ignored.
#[test]
fn validate_files_in_their_work_tree() {
    let repo = GitRepo::new();
    let data = tempfile::tempdir().unwrap();
    let mut files = good_fixture();
    files.push((
        ".github/workflows/ci.yaml",
        "name: ci\non: [push]\njobs:\n  test:\n    runs-on: ubuntu-latest\n".to_owned(),
    ));
    files.push((
        "deploy/web.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n".to_owned(),
    ));
    commit_all(&repo, &files);
    let validate = |paths: &[&str]| {
        run(agentops(data.path())
            .current_dir(repo.path())
            .arg("validate")
            .args(paths))
    };

    let (code, stdout, stderr) = validate(&[
        "projects/site/tasks/build.yaml",
        "projects/report/tasks/gather.yml",
        ".github/workflows/ci.yaml",
    ]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(stdout, "");

    // draft now depends on build, which depends on draft; and gather names a missing task.
    let draft = "projects/site/tasks/draft.yaml";
    let content = format!("{}  dependsOn: [build]\n", files[1].1);
    std::fs::write(repo.path().join(draft), content).unwrap();
    let (code, stdout, stderr) = validate(&[
        draft,
        "projects/report/tasks/gather.yml",
        ".github/workflows/ci.yaml",
        "deploy/web.yaml",
    ]);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(
        stdout,
        "projects/site/tasks/draft.yaml:12:15: dependency cycle: draft → build → draft\n"
    );
    assert!(stderr.contains("1 errors"), "{stderr}");

    // The other file of the cycle, alone, fails too, at its own entry.
    let (code, stdout, _) = validate(&["projects/site/tasks/build.yaml"]);
    assert_eq!(code, 1);
    assert_eq!(
        stdout,
        "projects/site/tasks/build.yaml:7:15: dependency cycle: build → draft → build\n"
    );

    // A new file not yet added to the index is checked all the same, with its neighbours.
    let extra = "projects/site/tasks/extra.yaml";
    std::fs::write(
        repo.path().join(extra),
        format!("{API}\nkind: Task\nmetadata:\n  name: extra\nspec:\n  title: Extra\n  dependsOn: [missing, build]\n  action:\n    prompt: Extra.\n"),
    )
    .unwrap();
    let (code, stdout, _) = validate(&[extra]);
    assert_eq!(code, 1);
    assert_eq!(
        stdout,
        "projects/site/tasks/extra.yaml:7:15: dependsOn names task `missing`, which does not exist\n"
    );
}

/// The hook a repository gets from `.pre-commit-hooks.yaml`, as pre-commit reads it.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Hook {
    id: String,
    name: String,
    description: String,
    entry: String,
    language: String,
    files: String,
    exclude: String,
    pass_filenames: bool,
    #[serde(default)]
    args: Vec<String>,
}

/// The pre-commit hook runs a real subcommand: its entry, with its arguments and the file
/// names pre-commit would pass, passes a good spec and fails a bad one at its line.
#[test]
fn the_pre_commit_hook_runs_agentops_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join(".pre-commit-hooks.yaml")).unwrap();
    let hooks: Vec<Hook> = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    let hook = &hooks[0];
    assert_eq!(hook.id, "agentops-validate");
    assert_eq!(hook.name, "agentops validate");
    assert!(hook.description.contains("path:line:column"), "{hook:?}");
    // The binary's package is not at the top of the repository, where pre-commit's `rust`
    // language would `cargo install` it from.
    assert_eq!(hook.language, "system");
    assert_eq!(hook.files, r"\.ya?ml$");
    assert_eq!(hook.exclude, r"^\.agentops/");
    assert!(hook.pass_filenames);
    let mut entry = hook.entry.split_whitespace();
    assert_eq!(entry.next(), Some("agentops"));
    let entry_args: Vec<&str> = entry.collect();

    let repo = GitRepo::new();
    let data = tempfile::tempdir().unwrap();
    let mut files = good_fixture();
    let bad = "projects/site/tasks/extra.yaml";
    files.push((
        bad,
        format!("{API}\nkind: Task\nmetadata:\n  name: extra\nspec:\n  title: Extra\n  colour: red\n  action:\n    prompt: Extra.\n"),
    ));
    commit_all(&repo, &files);
    let hook_run = |file: &str| {
        run(agentops(data.path())
            .current_dir(repo.path())
            .args(&entry_args)
            .args(&hook.args)
            .arg(file))
    };
    let (code, stdout, stderr) = hook_run("projects/site/tasks/build.yaml");
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let (code, stdout, stderr) = hook_run(bad);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.starts_with(&format!("{bad}:7:3: ")) && stdout.contains("colour"),
        "{stdout}"
    );
}

/// `--root`: files are checked with the specs under it, their projects taken from their place
/// below it; without it, a file outside any work tree is checked alone.
#[test]
fn validate_files_under_a_root() {
    let top = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    write_folder(&top.path().join("specs"), &good_fixture());
    let build = "specs/projects/site/tasks/build.yaml";
    let (code, stdout, stderr) = run(agentops(data.path())
        .current_dir(top.path())
        .args(["validate", "--root", "specs", build]));
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");

    let (code, stdout, _) = run(agentops(data.path())
        .current_dir(top.path())
        .args(["validate", build]));
    assert_eq!(code, 1);
    assert!(
        stdout.starts_with(&format!("{build}:")) && stdout.contains("task has no project"),
        "{stdout}"
    );

    let (code, _, stderr) = run(agentops(data.path()).current_dir(top.path()).args([
        "validate",
        "--root",
        "specs/projects/report",
        build,
    ]));
    assert_eq!(code, 2);
    assert!(stderr.contains("is not inside"), "{stderr}");
}

/// The projects and tasks `status --format json` must show for the bad fixture (whose
/// invalid task `extra` is never created) or the good one.
fn expected_status() -> Value {
    json!({"projects": [
        {"name": "report", "status": "active", "tasks": [
            {"name": "gather", "status": "pending", "agent": "seed", "attempt": 0},
        ]},
        {"name": "site", "status": "active", "tasks": [
            {"name": "build", "status": "pending", "agent": "seed", "attempt": 0},
            {"name": "draft", "status": "pending", "agent": "writer", "attempt": 0},
        ]},
    ]})
}

/// Tasks in a stable order, so the comparison does not depend on how ties sort.
fn sorted(mut status: Value) -> Value {
    for project in status["projects"].as_array_mut().unwrap() {
        project["tasks"]
            .as_array_mut()
            .unwrap()
            .sort_by_key(|t| t["name"].as_str().unwrap().to_owned());
    }
    status
}

async fn reconcile_once_then_status<S: TestStore>() {
    let db = TestDb::new(S::BACKEND).await;
    let data = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    // gather depends on a task that does not exist, extra has an unknown field.
    let revision = commit_all(&repo, &bad_fixture());

    let (code, stdout, stderr) = run(agentops(data.path())
        .args(["reconcile", "--once", "--repo"])
        .arg(repo.path())
        .args(["--database", &db.url]));
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains("projects/site/tasks/extra.yaml:7:3: "),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("synced {revision}")), "{stderr}");
    assert!(
        data.path().join("mirrors").is_dir(),
        "the mirror lives in --data-dir"
    );

    let (code, stdout, stderr) =
        run(agentops(data.path()).args(["status", "--format", "json", "--database", &db.url]));
    assert_eq!(code, 0, "{stderr}");
    let status: Value = serde_json::from_str(&stdout).unwrap();
    let mut expected = expected_status();
    // gather is invalid and was never synced: its project has no task yet.
    expected["projects"][0]["tasks"] = json!([]);
    assert_eq!(sorted(status), expected);

    // Fix gather and drop extra: the next pass creates gather.
    let fixed = repo.commit(
        "fix",
        &[
            (
                "projects/report/tasks/gather.yml",
                Some(&good_fixture()[4].1),
            ),
            ("projects/site/tasks/extra.yaml", None),
        ],
    );
    let (code, _, stderr) = run(agentops(data.path())
        .args(["--data-dir"])
        .arg(data.path())
        .args(["reconcile", "--once", "--repo"])
        .arg(repo.path())
        .args(["--database", &db.url]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains(&format!("synced {fixed}")), "{stderr}");
    assert!(stderr.contains(", 0 errors"), "{stderr}");
    let (code, stdout, _) =
        run(agentops(data.path()).args(["status", "--format", "json", "--database", &db.url]));
    assert_eq!(code, 0);
    assert_eq!(
        sorted(serde_json::from_str(&stdout).unwrap()),
        expected_status()
    );
    assert_eq!(db.source().await.revision.as_deref(), Some(fixed.as_str()));
}

#[test]
fn reconcile_defaults_to_sqlite_in_the_data_dir_and_imports_a_folder() {
    let specs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    write_folder(specs.path(), &good_fixture());

    let (code, _, stderr) = run(agentops(data.path())
        .args(["reconcile", "--once", "--repo"])
        .arg(specs.path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("is not the top of a Git repository: importing it into"),
        "{stderr}"
    );
    assert!(data.path().join("agentops.db").is_file());
    assert!(data.path().join("imports").is_dir());
    assert!(!specs.path().join(".git").exists());

    let (code, stdout, stderr) = run(agentops(data.path()).args(["status", "--format", "json"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        sorted(serde_json::from_str(&stdout).unwrap()),
        expected_status()
    );
}

/// Migration 1's comments were reworded after release. A database that recorded the released
/// text still migrates, and a checksum that matches neither text still stops the migration.
async fn migrate_a_database_that_recorded_the_released_wording<S: TestStore>() {
    let db = TestDb::new(S::BACKEND).await;
    let data = tempfile::tempdir().unwrap();
    let migrate = || run(agentops(data.path()).args(["migrate", "--database", &db.url]));
    let (code, _, stderr) = migrate();
    assert_eq!(code, 0, "{stderr}");
    let released = match S::BACKEND {
        Backend::Postgres => {
            "'\\x7b64ff4450dba1837b5eb4706b1fcd85be1f1606c5cb9f3cf59e7f7d49bb69911aec279e937d8d573b98705413441a65'::bytea"
        }
        Backend::Sqlite => {
            "X'5c0e2ef85bd29d67cd713a6f87010bfe615b4f69689e6980b01b822cf2dbf506afbcf7a8850f60e765f2a3d6998477d9'"
        }
    };
    let current = db
        .text("SELECT CAST(version AS TEXT) FROM _sqlx_migrations WHERE version = 1")
        .await;
    assert_eq!(current.as_deref(), Some("1"));
    assert_eq!(
        db.execute(&format!(
            "UPDATE _sqlx_migrations SET checksum = {released} WHERE version = 1"
        ))
        .await,
        1
    );
    let (code, _, stderr) = migrate();
    assert_eq!(code, 0, "the released wording is accepted: {stderr}");
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM _sqlx_migrations WHERE version = 1 AND checksum = {released}"
        ))
        .await,
        0,
        "the recorded checksum is brought up to date"
    );

    let other = match S::BACKEND {
        Backend::Postgres => "'\\x00'::bytea",
        Backend::Sqlite => "X'00'",
    };
    db.execute(&format!(
        "UPDATE _sqlx_migrations SET checksum = {other} WHERE version = 1"
    ))
    .await;
    let (code, _, stderr) = migrate();
    assert_ne!(code, 0, "a checksum of neither text is a real change");
    assert!(stderr.contains("migrations"), "{stderr}");
}

async fn migrate_a_fresh_database<S: TestStore>() {
    let db = TestDb::new(S::BACKEND).await;
    let data = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        // Twice: the second run finds everything applied.
        let (code, stdout, stderr) =
            run(agentops(data.path()).args(["migrate", "--database", &db.url]));
        assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
        assert!(stderr.contains("migrations applied"), "{stderr}");
    }
    let migrations = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(
        match S::BACKEND {
            Backend::Postgres => "../migrations/postgres",
            Backend::Sqlite => "../migrations/sqlite",
        },
    ))
    .unwrap()
    .count() as i64;
    assert_eq!(
        db.scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .await,
        migrations
    );
    assert_eq!(db.scalar("SELECT count(*) FROM sync_sources").await, 0);
    assert_eq!(
        db.scalar("SELECT count(*) FROM agents WHERE name IN ('cos', 'seed')")
            .await,
        2
    );
    assert_eq!(db.scalar("SELECT count(*) FROM project_progress").await, 0);
}

/// `completions`: a script for each shell that knows the subcommands; bash's parses and
/// registers the completion when sourced.
#[test]
fn completions_for_bash_zsh_and_fish() {
    let data = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let (code, script, stderr) = run(agentops(data.path()).args(["completions", shell]));
        assert_eq!(code, 0, "{shell}: {stderr}");
        for subcommand in ["validate", "up", "diff", "completions"] {
            assert!(script.contains(subcommand), "{shell} lacks {subcommand}");
        }
        match shell {
            "zsh" => assert!(script.starts_with("#compdef agentops"), "{script}"),
            "fish" => assert!(
                script.contains("complete -c agentops -n \"__fish_agentops_needs_command\""),
                "{script}"
            ),
            _ => {}
        }
    }

    let script = data.path().join("agentops.bash");
    let (code, text, _) = run(agentops(data.path()).args(["completions", "bash"]));
    assert_eq!(code, 0);
    std::fs::write(&script, text).unwrap();
    let (code, stdout, stderr) = run(Command::new("bash").arg("-n").arg(&script));
    assert_eq!(code, 0, "bash -n: {stdout}{stderr}");
    let (code, stdout, stderr) = run(Command::new("bash")
        .arg("-c")
        .arg("source \"$1\" && complete -p agentops")
        .arg("bash")
        .arg(&script));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("-F _agentops agentops"), "{stdout}");
    // The function completes a subcommand from its first letters.
    let (code, stdout, stderr) = run(Command::new("bash")
        .arg("-c")
        .arg(
            "source \"$1\"; COMP_WORDS=(agentops comp); COMP_CWORD=1; \
             _agentops agentops comp agentops; printf '%s\\n' \"${COMPREPLY[@]}\"",
        )
        .arg("bash")
        .arg(&script));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, "completions\n");
}
