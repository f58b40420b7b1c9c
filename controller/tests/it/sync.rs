//! Git → store sync, end to end: real repositories, real databases (Postgres and SQLite), the
//! real `Syncer`. Every scenario runs on both backends (`<scenario>::postgres`, `::sqlite`).

use crate::common;

use std::time::Duration;

use agentops::source::git::Location;
use common::*;
use serde_json::json;

both_backends!(
    files_created_changed_renamed_deleted,
    multi_document_files,
    same_revision_writes_nothing,
    bad_file_keeps_its_last_good_version,
    broken_project_keeps_its_tasks,
    every_file_of_a_cycle_is_invalid,
    folder_is_imported_and_resnapshotted,
);

const PROJECT: &str = "projects/web/project.yaml";
const A: &str = "projects/web/tasks/a.yaml";
const B: &str = "projects/web/tasks/b.yaml";
const C: &str = "projects/web/tasks/c.yaml";
const WRITER: &str = "agents/writer.yaml";

/// Point 1: files created, changed, renamed and deleted across commits.
async fn files_created_changed_renamed_deleted<S: TestStore>() {
    let mut env = Env::<S>::new().await;

    // c1: everything is new.
    let c1 = env.commit(
        "create",
        &[
            (PROJECT, Some(&project("web", "Website"))),
            (A, Some(&task("a", "Task A"))),
            (B, Some(&task("b", "Task B"))),
            (WRITER, Some(&agent("writer", "writing"))),
            ("README.md", Some("# specs\n")),
        ],
    );
    let report = env.sync().await;
    assert_eq!(report.revision, c1);
    assert_eq!(report.files_parsed, 4, "README.md is not a spec file");
    assert_eq!(report.object_writes, 4);
    assert_eq!(report.events, 4);
    assert!(report.cursor_moved);
    assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
    assert_eq!(
        env.project_lines().await,
        [r#"web active g1 projects/web/project.yaml @c1 "Website""#]
    );
    assert_eq!(
        env.task_lines().await,
        [
            r#"web/a pending g1 projects/web/tasks/a.yaml @c1 "Task A""#,
            r#"web/b pending g1 projects/web/tasks/b.yaml @c1 "Task B""#,
        ]
    );
    assert_eq!(
        env.agent_lines().await,
        ["writer specialist idle g1 agents/writer.yaml @c1"]
    );
    assert_eq!(
        env.new_events().await,
        counts(&[
            ("agent.created", 1),
            ("project.created", 1),
            ("task.created", 2)
        ])
    );
    let source = env.db.source().await;
    assert_eq!(source.name, SOURCE);
    assert_eq!(source.branch, BRANCH);
    assert_eq!(source.revision.as_deref(), Some(c1.as_str()));
    assert_eq!(source.errors(), json!([]));
    let web_before = env.db.project("web").await;
    let a1 = env.db.task("web", "a").await;
    let b1 = env.db.task("web", "b").await;

    // c2: a changes, b is renamed with the same content, c is added, the agent changes.
    env.commit(
        "change",
        &[
            (A, Some(&task("a", "Task A, revised"))),
            (C, Some(&task("c", "Task C"))),
            (WRITER, Some(&agent("writer", "writing, editing"))),
        ],
    );
    let c3 = env.rename(B, "projects/web/tasks/b-renamed.yaml");
    let report = env.sync().await;
    assert_eq!(report.revision, c3);
    assert_eq!(report.object_writes, 4, "{report:?}");
    assert_eq!(
        env.task_lines().await,
        [
            r#"web/a pending g2 projects/web/tasks/a.yaml @c3 "Task A, revised""#,
            r#"web/b pending g1 projects/web/tasks/b-renamed.yaml @c3 "Task B""#,
            r#"web/c pending g1 projects/web/tasks/c.yaml @c3 "Task C""#,
        ]
    );
    assert_eq!(
        env.agent_lines().await,
        ["writer specialist idle g2 agents/writer.yaml @c3"]
    );
    assert_eq!(
        env.new_events().await,
        counts(&[
            ("agent.updated", 1),
            ("task.created", 1),
            ("task.moved", 1),
            ("task.updated", 1),
        ])
    );
    let b2 = env.db.task("web", "b").await;
    assert_eq!(b2.id, b1.id, "a rename keeps the row");
    assert_eq!(b2.spec_hash, b1.spec_hash);
    assert_eq!(env.db.task("web", "a").await.id, a1.id);
    // The project did not change: its row was not written.
    assert_eq!(env.db.project("web").await, web_before);

    // c4: a and the agent are deleted.
    let c4 = env.commit("delete", &[(A, None), (WRITER, None)]);
    let report = env.sync().await;
    assert_eq!(report.revision, c4);
    assert_eq!(report.object_writes, 2, "{report:?}");
    assert_eq!(
        env.task_lines().await,
        [
            r#"web/a cancelled g2 projects/web/tasks/a.yaml @c3 "Task A, revised" pruned"#,
            r#"web/b pending g1 projects/web/tasks/b-renamed.yaml @c3 "Task B""#,
            r#"web/c pending g1 projects/web/tasks/c.yaml @c3 "Task C""#,
        ]
    );
    assert_eq!(
        env.agent_lines().await,
        ["writer specialist offline g2 agents/writer.yaml @c3 pruned"]
    );
    assert_eq!(
        env.new_events().await,
        counts(&[("agent.pruned", 1), ("task.pruned", 1)])
    );
    assert_eq!(
        env.db.task("web", "a").await.id,
        a1.id,
        "a pruned row is kept"
    );

    // c5: a comes back (with a new title): pending again, a new generation, the same row.
    env.commit(
        "re-add",
        &[
            (A, Some(&task("a", "Task A, again"))),
            (WRITER, Some(&agent("writer", "writing"))),
        ],
    );
    let report = env.sync().await;
    assert_eq!(report.object_writes, 2, "{report:?}");
    assert_eq!(
        env.task_lines().await,
        [
            r#"web/a pending g3 projects/web/tasks/a.yaml @c5 "Task A, again""#,
            r#"web/b pending g1 projects/web/tasks/b-renamed.yaml @c3 "Task B""#,
            r#"web/c pending g1 projects/web/tasks/c.yaml @c3 "Task C""#,
        ]
    );
    let a5 = env.db.task("web", "a").await;
    assert_eq!((a5.id, a5.attempt), (a1.id, 0));
    let writer = env.db.agent("writer").await;
    assert_eq!((writer.generation, writer.pruned_at), (3, None));
    assert_eq!(
        env.new_events().await,
        counts(&[("agent.revived", 1), ("task.revived", 1)])
    );

    // Work that already ended keeps its outcome when it leaves the source.
    assert_eq!(
        env.db
            .execute("UPDATE tasks SET status = 'completed' WHERE name = 'c'")
            .await,
        1
    );

    // c6: the whole project is removed: it and its open tasks are cancelled, rows kept.
    env.commit(
        "remove the project",
        &[
            (PROJECT, None),
            (A, None),
            ("projects/web/tasks/b-renamed.yaml", None),
            (C, None),
        ],
    );
    let report = env.sync().await;
    assert_eq!(report.object_writes, 4, "{report:?}");
    assert_eq!(
        env.project_lines().await,
        [r#"web cancelled g1 projects/web/project.yaml @c1 "Website" pruned"#]
    );
    assert_eq!(
        env.task_lines().await,
        [
            r#"web/a cancelled g3 projects/web/tasks/a.yaml @c5 "Task A, again" pruned"#,
            r#"web/b cancelled g1 projects/web/tasks/b-renamed.yaml @c3 "Task B" pruned"#,
            r#"web/c completed g1 projects/web/tasks/c.yaml @c3 "Task C" pruned"#,
        ]
    );
    assert_eq!(
        env.new_events().await,
        counts(&[("project.pruned", 1), ("task.pruned", 3)])
    );
    let source = env.db.source().await;
    assert_eq!(source.revision, Some(report.revision));
    assert_eq!(source.errors(), json!([]));

    // c7: the project and one task come back: a new life for both.
    env.commit(
        "restore",
        &[
            (PROJECT, Some(&project("web", "Website"))),
            (B, Some(&task("b", "Task B"))),
        ],
    );
    let report = env.sync().await;
    assert_eq!(report.object_writes, 2, "{report:?}");
    assert_eq!(
        env.project_lines().await,
        [r#"web active g2 projects/web/project.yaml @c7 "Website""#]
    );
    assert_eq!(
        env.task_lines().await[1],
        r#"web/b pending g2 projects/web/tasks/b.yaml @c7 "Task B""#
    );
    assert_eq!(env.db.project("web").await.id, web_before.id);
}

/// Point 2: multi-document files: a project with its tasks in one file, and a file mixing our
/// documents with Kubernetes ones, which are ignored.
async fn multi_document_files<S: TestStore>() {
    const OPS: &str = "projects/ops/ops.yaml";
    const MIXED: &str = "cluster/mixed.yaml";
    let ops = |verify_title: &str, with_deploy: bool| {
        let mut docs = vec![project("ops", "Operations")];
        if with_deploy {
            docs.push(task_in("ops", "deploy", "Deploy"));
        }
        let depends = if with_deploy {
            "  dependsOn: [deploy]\n"
        } else {
            ""
        };
        docs.push(format!(
            "{}{depends}",
            task_in("ops", "verify", verify_title)
        ));
        docs.join("---\n")
    };
    let deployment = |replicas: u32| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: {replicas}\n  template:\n    spec:\n      containers:\n      - name: web\n        image: nginx\n"
        )
    };
    let service =
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - port: 80\n";
    let mixed = |replicas: u32, with_agent: bool| {
        let mut docs = vec![deployment(replicas)];
        if with_agent {
            docs.push(agent("operator", "kubernetes"));
        }
        docs.push(service.to_owned());
        docs.join("---\n")
    };

    let mut env = Env::<S>::new().await;
    env.commit(
        "create",
        &[
            (OPS, Some(&ops("Verify", true))),
            (MIXED, Some(&mixed(1, true))),
            ("cluster/only-k8s.yaml", Some(&deployment(3))),
        ],
    );
    let report = env.sync().await;
    assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
    assert_eq!(report.files_parsed, 3);
    assert_eq!(report.object_writes, 4, "{report:?}");
    assert_eq!(
        env.project_lines().await,
        [r#"ops active g1 projects/ops/ops.yaml @c1 "Operations""#]
    );
    assert_eq!(
        env.task_lines().await,
        [
            r#"ops/deploy pending g1 projects/ops/ops.yaml @c1 "Deploy""#,
            r#"ops/verify pending g1 projects/ops/ops.yaml @c1 "Verify""#,
        ]
    );
    let verify = env.db.task("ops", "verify").await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&verify.depends_on).unwrap(),
        json!(["ops/deploy"])
    );
    assert_eq!(
        env.agent_lines().await,
        ["operator specialist idle g1 cluster/mixed.yaml @c1"]
    );
    assert_eq!(env.db.source().await.errors(), json!([]));
    assert_eq!(
        env.new_events().await,
        counts(&[
            ("agent.created", 1),
            ("project.created", 1),
            ("task.created", 2)
        ])
    );
    let before = env.db.snapshot().await;

    // c2: one document of each file changes; only the changed Task is written.
    env.commit(
        "edit",
        &[
            (OPS, Some(&ops("Verify the rollout", true))),
            (MIXED, Some(&mixed(2, true))),
        ],
    );
    let report = env.sync().await;
    assert_eq!(report.files_parsed, 2);
    assert_eq!(report.object_writes, 1, "{report:?}");
    assert_eq!(env.new_events().await, counts(&[("task.updated", 1)]));
    let after = env.db.snapshot().await;
    assert_eq!(after.projects, before.projects);
    assert_eq!(after.agents, before.agents);
    assert_eq!(after.tasks[0], before.tasks[0], "deploy is untouched");
    assert_eq!(
        env.task_lines().await[1],
        r#"ops/verify pending g2 projects/ops/ops.yaml @c2 "Verify the rollout""#
    );

    // c3: documents removed from inside a file are pruned.
    env.commit(
        "remove documents",
        &[
            (OPS, Some(&ops("Verify the rollout", false))),
            (MIXED, Some(&mixed(2, false))),
        ],
    );
    let report = env.sync().await;
    assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
    assert_eq!(
        env.task_lines().await,
        [
            r#"ops/deploy cancelled g1 projects/ops/ops.yaml @c1 "Deploy" pruned"#,
            r#"ops/verify pending g3 projects/ops/ops.yaml @c3 "Verify the rollout""#,
        ]
    );
    assert_eq!(
        env.agent_lines().await,
        ["operator specialist offline g1 cluster/mixed.yaml @c1 pruned"]
    );
    assert_eq!(
        env.new_events().await,
        counts(&[("agent.pruned", 1), ("task.pruned", 1), ("task.updated", 1)])
    );

    // c4: one bad document makes the whole file bad: every object it declared keeps its last
    // good version and carries the error; the other file is untouched.
    let broken = ops("Verify the rollout", false).replace(
        "  title: Operations\n",
        "  title: Operations\n  colour: red\n",
    );
    env.commit("break one document", &[(OPS, Some(&broken))]);
    let report = env.sync().await;
    assert_eq!(report.diagnostics.len(), 1, "{:?}", report.diagnostics);
    let message = report.diagnostics[0].to_string();
    assert!(
        message.starts_with("projects/ops/ops.yaml:7:3: "),
        "{message}"
    );
    assert_eq!(
        env.project_lines().await,
        [format!(
            r#"ops active g1 projects/ops/ops.yaml @c1 "Operations" ! {message}"#
        )]
    );
    assert_eq!(
        env.task_lines().await,
        [
            r#"ops/deploy cancelled g1 projects/ops/ops.yaml @c1 "Deploy" pruned"#.to_owned(),
            format!(
                r#"ops/verify pending g3 projects/ops/ops.yaml @c3 "Verify the rollout" ! {message}"#
            ),
        ]
    );
    assert_eq!(
        env.new_events().await,
        counts(&[
            ("project.invalid", 1),
            ("source.invalid", 1),
            ("task.invalid", 1)
        ])
    );
}

/// Point 3: syncing a revision again writes nothing: not from the same syncer, not from a new
/// process; a commit that touches no spec file moves only the cursor.
async fn same_revision_writes_nothing<S: TestStore>() {
    let mut env = Env::<S>::new().await;
    let c1 = env.commit(
        "create",
        &[
            (PROJECT, Some(&project("web", "Website"))),
            (A, Some(&task("a", "Task A"))),
            (B, Some(&task("b", "Task B"))),
            (WRITER, Some(&agent("writer", "writing"))),
            ("README.md", Some("# specs\n")),
        ],
    );
    let first = env.sync().await;
    assert_eq!(first.object_writes, 4);
    let synced = env.db.snapshot().await;
    assert_eq!(synced.events.values().sum::<i64>(), 4);
    // Any write from here on would stamp a later time than the rows carry now.
    tokio::time::sleep(Duration::from_millis(5)).await;

    // The same syncer, the same revision.
    let again = env.sync().await;
    assert_noop(&again);
    assert_eq!(again.revision, c1);
    assert_eq!(again.files_parsed, 0);
    assert_eq!(env.db.snapshot().await, synced);

    // A new process: everything is read again, nothing is written.
    let mut fresh = env.fresh_syncer().await;
    let cold = fresh.sync().await.expect("sync");
    assert_noop(&cold);
    assert_eq!(cold.revision, c1);
    assert_eq!(cold.files_parsed, 4);
    assert_eq!(env.db.snapshot().await, synced);

    // A commit that changes no spec file: the cursor moves, no object row, no event.
    let c2 = env.commit("docs", &[("README.md", Some("# specs\n\nMore words.\n"))]);
    let readme = env.sync().await;
    assert_eq!(readme.revision, c2);
    assert_eq!((readme.object_writes, readme.events), (0, 0), "{readme:?}");
    assert!(readme.cursor_moved);
    let moved = env.db.snapshot().await;
    assert_eq!(moved.projects, synced.projects);
    assert_eq!(moved.tasks, synced.tasks);
    assert_eq!(moved.agents, synced.agents);
    assert_eq!(moved.events, synced.events);
    assert_eq!(moved.xmin_objects, synced.xmin_objects);
    let (before, after) = (&synced.sources[0], &moved.sources[0]);
    assert_eq!(after.revision.as_deref(), Some(c2.as_str()));
    assert_ne!(after.tree_oid, before.tree_oid);
    assert_ne!(after.synced_at, before.synced_at);
    assert_eq!(after.errors(), json!([]));

    // The same in a new process, which has to re-read every file to know nothing changed.
    let c3 = env.commit("docs", &[("docs/notes.txt", Some("notes\n"))]);
    let mut fresh = env.fresh_syncer().await;
    let cold = fresh.sync().await.expect("sync");
    assert_eq!(cold.revision, c3);
    assert_eq!((cold.object_writes, cold.events), (0, 0), "{cold:?}");
    assert!(cold.cursor_moved);
    let moved_again = env.db.snapshot().await;
    assert_eq!(moved_again.tasks, synced.tasks);
    assert_eq!(moved_again.projects, synced.projects);
    assert_eq!(moved_again.agents, synced.agents);
    assert_eq!(moved_again.events, synced.events);
    assert_eq!(moved_again.xmin_objects, synced.xmin_objects);
    assert_eq!(
        moved_again.sources[0].revision.as_deref(),
        Some(c3.as_str())
    );
    // And once more from that process: nothing at all.
    assert_noop(&fresh.sync().await.expect("sync"));
    assert_eq!(env.db.snapshot().await, moved_again);

    // A spec file whose text changes but whose objects do not: read, nothing written.
    let commented = format!("# a comment\n{}", task("a", "Task A"));
    env.commit("comment", &[(A, Some(&commented))]);
    let comment = env.sync().await;
    assert_eq!(comment.files_parsed, 1);
    assert_eq!(
        (comment.object_writes, comment.events),
        (0, 0),
        "{comment:?}"
    );
    assert!(comment.cursor_moved);
    let commented_snapshot = env.db.snapshot().await;
    assert_eq!(commented_snapshot.tasks, synced.tasks);
    assert_eq!(commented_snapshot.xmin_objects, synced.xmin_objects);
}

/// `apiVersion … title … colour` with the unknown field on line 7, column 3.
fn task_with_unknown_field(name: &str, title: &str) -> String {
    format!(
        "{API}\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  title: {title}\n  colour: red\n  action:\n    prompt: Do {name}\n"
    )
}

/// Point 4: a bad file leaves everything else synced and its own last good version in place.
async fn bad_file_keeps_its_last_good_version<S: TestStore>() {
    let mut env = Env::<S>::new().await;
    env.commit(
        "create",
        &[
            (PROJECT, Some(&project("web", "Website"))),
            (A, Some(&task("a", "Task A"))),
            (B, Some(&task("b", "Task B"))),
        ],
    );
    env.sync().await;
    env.new_events().await;
    let a1 = env.db.task("web", "a").await;

    // c2: a gets an unknown field (and a new title), b changes in the same commit.
    env.commit(
        "break a, change b",
        &[
            (A, Some(&task_with_unknown_field("a", "Task A v2"))),
            (B, Some(&task("b", "Task B v2"))),
        ],
    );
    let report = env.sync().await;
    assert_eq!(report.diagnostics.len(), 1, "{:?}", report.diagnostics);
    let d = report.diagnostics[0].clone();
    assert_eq!((d.path.as_str(), d.line, d.column), (A, 7, 3), "{d}");
    assert!(d.message.contains("colour"), "{d}");
    let message = format!("{A}:7:3: {}", d.message);
    assert_eq!(d.to_string(), message);
    assert_eq!(report.object_writes, 2, "b updated, a flagged: {report:?}");
    assert_eq!(
        env.task_lines().await,
        [
            format!(r#"web/a pending g1 projects/web/tasks/a.yaml @c1 "Task A" ! {message}"#),
            r#"web/b pending g2 projects/web/tasks/b.yaml @c2 "Task B v2""#.to_owned(),
        ]
    );
    let a2 = env.db.task("web", "a").await;
    assert_eq!(
        a2.spec_hash, a1.spec_hash,
        "the last good spec stays in effect"
    );
    assert_eq!(
        env.new_events().await,
        counts(&[
            ("source.invalid", 1),
            ("task.invalid", 1),
            ("task.updated", 1)
        ])
    );
    let invalid = env.db.events_of("task.invalid").await;
    assert_eq!(invalid[0]["name"], "a");
    assert_eq!(invalid[0]["project"], "web");
    assert_eq!(invalid[0]["path"], A);
    assert_eq!(invalid[0]["message"], message.as_str());
    let source_invalid = env.db.events_of("source.invalid").await;
    assert_eq!(
        (
            &source_invalid[0]["path"],
            &source_invalid[0]["line"],
            &source_invalid[0]["column"],
            &source_invalid[0]["message"]
        ),
        (&json!(A), &json!(7), &json!(3), &json!(d.message))
    );
    assert_eq!(
        env.db.source().await.errors(),
        json!([{"path": A, "line": 7, "column": 3, "message": d.message}])
    );

    // The broken state is stable: again, and from a new process, nothing is written.
    let broken = env.db.snapshot().await;
    assert_noop(&env.sync().await);
    let mut fresh = env.fresh_syncer().await;
    let cold = fresh.sync().await.expect("sync");
    assert_noop(&cold);
    assert_eq!(cold.diagnostics, report.diagnostics);
    assert_eq!(env.db.snapshot().await, broken);

    // c3: now a YAML syntax error: a new message, a new event, still the last good spec.
    env.commit(
        "break a differently",
        &[(
            A,
            Some(&format!(
                "{API}\nkind: Task\nmetadata:\n  name: a\nspec:\n  title: [unclosed\n"
            )),
        )],
    );
    let report = env.sync().await;
    assert_eq!(report.diagnostics.len(), 1, "{:?}", report.diagnostics);
    let d3 = report.diagnostics[0].clone();
    assert_eq!(d3.path, A);
    assert_ne!(d3, d);
    let a3 = env.db.task("web", "a").await;
    assert_eq!(a3.status_message, Some(d3.to_string()));
    assert_eq!((a3.title.as_str(), a3.generation), ("Task A", 1));
    assert_eq!(a3.spec_hash, a1.spec_hash);
    assert_eq!(
        env.new_events().await,
        counts(&[("source.invalid", 1), ("task.invalid", 1)])
    );
    assert_eq!(
        env.db.source().await.errors(),
        serde_json::to_value(&report.diagnostics).unwrap()
    );

    // c4: fixed back to exactly the last good version: recovered, message cleared.
    env.commit("fix a", &[(A, Some(&task("a", "Task A")))]);
    let report = env.sync().await;
    assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
    assert_eq!(
        env.task_lines().await,
        [
            r#"web/a pending g1 projects/web/tasks/a.yaml @c4 "Task A""#,
            r#"web/b pending g2 projects/web/tasks/b.yaml @c2 "Task B v2""#,
        ]
    );
    assert_eq!(env.new_events().await, counts(&[("task.recovered", 1)]));
    assert_eq!(env.db.source().await.errors(), json!([]));

    // c5: broken again, then fixed with a new spec: the message is cleared and the
    // generation moves once.
    env.commit(
        "break a again",
        &[(A, Some(&task_with_unknown_field("a", "Task A v3")))],
    );
    env.sync().await;
    assert!(env.db.task("web", "a").await.status_message.is_some());
    env.commit("fix a again", &[(A, Some(&task("a", "Task A v3")))]);
    env.sync().await;
    assert_eq!(
        env.task_lines().await[0],
        r#"web/a pending g2 projects/web/tasks/a.yaml @c6 "Task A v3""#
    );
    assert_eq!(env.db.source().await.errors(), json!([]));
}

/// A dependency cycle through three files and two projects: each file gets the error at its
/// own `dependsOn` entry, each task keeps its last good version flagged with it, and the
/// source's errors list all three; breaking the cycle clears them all.
async fn every_file_of_a_cycle_is_invalid<S: TestStore>() {
    const OPS: &str = "projects/ops/project.yaml";
    const D: &str = "projects/ops/tasks/d.yaml";
    let depends =
        |name: &str, title: &str, on: &str| format!("{}  dependsOn: [{on}]\n", task(name, title));
    let mut env = Env::<S>::new().await;
    env.commit(
        "create",
        &[
            (PROJECT, Some(&project("web", "Website"))),
            (OPS, Some(&project("ops", "Operations"))),
            (A, Some(&task("a", "Task A"))),
            (B, Some(&task("b", "Task B"))),
            (D, Some(&task("d", "Task D"))),
        ],
    );
    let report = env.sync().await;
    assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
    env.new_events().await;

    env.commit(
        "close a cycle",
        &[
            (A, Some(&depends("a", "Task A v2", "b"))),
            (B, Some(&depends("b", "Task B v2", "ops/d"))),
            (D, Some(&depends("d", "Task D v2", "web/a"))),
        ],
    );
    let report = env.sync().await;
    let expected = [
        format!("{D}:9:15: dependency cycle: d → web/a → web/b → d"),
        format!("{A}:9:15: dependency cycle: a → b → ops/d → a"),
        format!("{B}:9:15: dependency cycle: b → ops/d → a → b"),
    ];
    let lines: Vec<String> = report.diagnostics.iter().map(ToString::to_string).collect();
    assert_eq!(lines, expected);
    assert_eq!(
        env.task_lines().await,
        [
            format!(r#"ops/d pending g1 {D} @c1 "Task D" ! {}"#, expected[0]),
            format!(r#"web/a pending g1 {A} @c1 "Task A" ! {}"#, expected[1]),
            format!(r#"web/b pending g1 {B} @c1 "Task B" ! {}"#, expected[2]),
        ]
    );
    assert_eq!(
        env.db.source().await.errors(),
        serde_json::to_value(&report.diagnostics).unwrap()
    );
    assert_eq!(
        env.new_events().await,
        counts(&[("source.invalid", 3), ("task.invalid", 3)])
    );
    let mut flagged: Vec<String> = env
        .db
        .events_of("task.invalid")
        .await
        .iter()
        .map(|e| e["path"].as_str().unwrap_or_default().to_owned())
        .collect();
    flagged.sort();
    assert_eq!(flagged, [D, A, B]);

    // Breaking the cycle at one task clears every member; the other two take effect now.
    env.commit("break the cycle", &[(D, Some(&task("d", "Task D v2")))]);
    let report = env.sync().await;
    assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
    assert_eq!(
        env.task_lines().await,
        [
            format!(r#"ops/d pending g2 {D} @c3 "Task D v2""#),
            format!(r#"web/a pending g2 {A} @c3 "Task A v2""#),
            format!(r#"web/b pending g2 {B} @c3 "Task B v2""#),
        ]
    );
    assert_eq!(env.db.source().await.errors(), json!([]));
}

/// Point 4, continued: a broken project.yaml keeps its last good version, and its tasks,
/// which refer to it, stay valid (and new ones are created).
async fn broken_project_keeps_its_tasks<S: TestStore>() {
    let mut env = Env::<S>::new().await;
    env.commit(
        "create",
        &[
            (PROJECT, Some(&project("web", "Website"))),
            (A, Some(&task("a", "Task A"))),
            (B, Some(&task("b", "Task B"))),
        ],
    );
    env.sync().await;
    env.new_events().await;

    let broken = format!(
        "{API}\nkind: Project\nmetadata:\n  name: web\nspec:\n  title: Website v2\n  colour: red\n"
    );
    env.commit(
        "break the project, add a task",
        &[(PROJECT, Some(&broken)), (C, Some(&task("c", "Task C")))],
    );
    let report = env.sync().await;
    assert!(!report.diagnostics.is_empty());
    assert!(
        report.diagnostics.iter().all(|d| d.path == PROJECT),
        "only project.yaml is in error: {:?}",
        report.diagnostics
    );
    let message = report
        .diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    assert!(
        message.starts_with(&format!("{PROJECT}:7:3: ")),
        "{message}"
    );
    assert_eq!(
        env.project_lines().await,
        [format!(
            r#"web active g1 projects/web/project.yaml @c1 "Website" ! {message}"#
        )]
    );
    assert_eq!(
        env.task_lines().await,
        [
            r#"web/a pending g1 projects/web/tasks/a.yaml @c1 "Task A""#,
            r#"web/b pending g1 projects/web/tasks/b.yaml @c1 "Task B""#,
            r#"web/c pending g1 projects/web/tasks/c.yaml @c2 "Task C""#,
        ]
    );
    assert_eq!(
        env.new_events().await,
        counts(&[
            ("project.invalid", 1),
            ("source.invalid", report.diagnostics.len() as i64),
            ("task.created", 1),
        ])
    );
    assert_eq!(
        env.db.source().await.errors(),
        serde_json::to_value(&report.diagnostics).unwrap()
    );

    // A new process sees the same: no task error, nothing to write.
    let before = env.db.snapshot().await;
    let mut fresh = env.fresh_syncer().await;
    let cold = fresh.sync().await.expect("sync");
    assert_noop(&cold);
    assert_eq!(cold.diagnostics, report.diagnostics);
    assert_eq!(env.db.snapshot().await, before);

    // Fixed: the new version applies, the message is cleared.
    env.commit("fix", &[(PROJECT, Some(&project("web", "Website v2")))]);
    let report = env.sync().await;
    assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
    assert_eq!(
        env.project_lines().await,
        [r#"web active g2 projects/web/project.yaml @c3 "Website v2""#]
    );
    assert_eq!(env.db.source().await.errors(), json!([]));
    assert_eq!(env.new_events().await, counts(&[("project.updated", 1)]));
}

/// Point 5: a folder that is not a Git repository is imported, and re-snapshotted when it
/// changes.
async fn folder_is_imported_and_resnapshotted<S: TestStore>() {
    let mut env = Env::<S>::folder().await;
    let folder = env.folder.as_ref().unwrap().path().to_owned();
    let write = |path: &str, content: Option<&str>| {
        let full = folder.join(path);
        match content {
            Some(content) => {
                std::fs::create_dir_all(full.parent().unwrap()).unwrap();
                std::fs::write(full, content).unwrap();
            }
            None => std::fs::remove_file(full).unwrap(),
        }
    };
    assert!(
        matches!(&env.syncer.source().location, Location::Folder(f) if *f == folder.canonicalize().unwrap()),
        "{:?}",
        env.syncer.source().location
    );
    write(PROJECT, Some(&project("web", "Website")));
    write(A, Some(&task("a", "Task A")));

    let first = env.sync().await;
    assert!(
        first.revision.starts_with("main@sha1:"),
        "{}",
        first.revision
    );
    assert_eq!(first.object_writes, 2);
    assert_eq!(
        env.task_lines().await,
        [format!(
            r#"web/a pending g1 projects/web/tasks/a.yaml @{} "Task A""#,
            first.revision
        )]
    );
    let source = env.db.source().await;
    assert_eq!(
        source.url,
        folder.canonicalize().unwrap().display().to_string()
    );
    assert_eq!(source.revision.as_deref(), Some(first.revision.as_str()));
    assert!(
        env.syncer.source().mirror.starts_with(env.data.path()),
        "the import lives in the data directory"
    );
    assert!(
        !folder.join(".git").exists(),
        "the folder itself is left alone"
    );

    // Unchanged folder: no new snapshot, nothing written.
    let again = env.sync().await;
    assert_noop(&again);
    assert_eq!(again.revision, first.revision);

    // Changed: a new snapshot, the change applied.
    write(A, Some(&task("a", "Task A, revised")));
    write(B, Some(&task("b", "Task B")));
    let second = env.sync().await;
    assert_ne!(second.revision, first.revision);
    assert_eq!(second.object_writes, 2);
    let lines = env.task_lines().await;
    assert_eq!(
        lines,
        [
            format!(
                r#"web/a pending g2 projects/web/tasks/a.yaml @{} "Task A, revised""#,
                second.revision
            ),
            format!(
                r#"web/b pending g1 projects/web/tasks/b.yaml @{} "Task B""#,
                second.revision
            ),
        ]
    );

    // Deleted from the folder: pruned.
    write(B, None);
    let third = env.sync().await;
    assert_ne!(third.revision, second.revision);
    assert_eq!(third.object_writes, 1);
    let b = env.db.task("web", "b").await;
    assert_eq!(b.status, "cancelled");
    assert!(b.pruned_at.is_some());

    // A new process importing the same folder into the same data directory: nothing new.
    let mut fresh = env.fresh_syncer().await;
    let cold = fresh.sync().await.expect("sync");
    assert_noop(&cold);
    assert_eq!(cold.revision, third.revision);
}
