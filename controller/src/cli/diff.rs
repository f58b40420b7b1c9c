//! `agentops diff`: what syncing a revision (or a folder of specs) would do to the store,
//! shown as text a pull request comment can carry, or as JSON. Writes nothing.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use crate::config::{GlobalConfig, StoreConfig};
use crate::reconcile::diff::{Declared, Diff, FieldChange};
use crate::store::AnyStore;
use crate::with_store;

use super::Format;

#[derive(Debug, Clone, Args)]
pub struct DiffArgs {
    /// The spec repository: a local path or a `file://`, `https://` or `ssh://` URL.
    #[arg(long, env = "AGENTOPS_REPO", default_value = ".")]
    pub repo: String,
    /// The branch the controller follows; for a local repository, the one it has checked out.
    #[arg(long, env = "AGENTOPS_BRANCH")]
    pub branch: Option<String>,
    /// The revision to diff: a branch, a tag, a ref such as `refs/pull/7/head`, or a commit
    /// id. The followed branch's head by default.
    #[arg(long, conflicts_with = "path")]
    pub revision: Option<String>,
    /// A folder of spec files to diff instead of a revision (such as a checkout of a pull
    /// request), read as it is.
    #[arg(long, value_name = "DIR")]
    pub path: Option<PathBuf>,
    /// The directory inside the repository that holds the specs (what `reconcile` and `up`
    /// call `--path`).
    #[arg(long, env = "AGENTOPS_PATH", default_value = "")]
    pub subpath: String,
    /// The name the source's objects are recorded under in the store.
    #[arg(long, env = "AGENTOPS_SOURCE_NAME", default_value = "default")]
    pub source_name: String,
    /// Token for `https://` remotes.
    #[arg(long, env = "AGENTOPS_GIT_TOKEN", hide_env_values = true)]
    pub git_token: Option<String>,
    #[command(flatten)]
    pub store: StoreConfig,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// Exit 0 when a sync would change nothing, 1 when it would; errors exit 2 (in `main`).
pub async fn run(global: &GlobalConfig, args: &DiffArgs) -> anyhow::Result<ExitCode> {
    let declared = match &args.path {
        Some(path) => {
            if !path.is_dir() {
                anyhow::bail!("--path {}: not a directory", path.display());
            }
            Declared::Folder(path.canonicalize()?)
        }
        None => Declared::Revision(args.revision.clone()),
    };
    let source = super::reconcile::locate(
        global,
        &args.repo,
        args.branch.as_deref(),
        &args.subpath,
        args.git_token.clone(),
    )?;
    let url = args.store.url(global);
    let diff = match AnyStore::connect_read_only(&url).await? {
        Some(store) => with_store!(store, store => {
            crate::reconcile::diff::diff(Some(&store), &source, &args.source_name, declared).await?
        }),
        None => {
            crate::reconcile::diff::diff::<crate::store::SqliteStore>(
                None,
                &source,
                &args.source_name,
                declared,
            )
            .await?
        }
    };
    match args.format {
        Format::Text => print!("{}", text(&diff)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&diff)?),
    }
    Ok(if diff.changed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// A JSON value on one line: strings quoted, so that an empty one shows.
fn value(v: &Value) -> String {
    v.to_string()
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The diff as Markdown that reads as plain text too: a summary, the objects in a `diff`
/// block (so a forge colours creates and prunes), and the files' errors in a block of their
/// own.
pub fn text(diff: &Diff) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### agentops diff: source `{}`\n", diff.source);
    let declared = match (&diff.revision, &diff.folder) {
        (Some(revision), _) => format!("revision `{revision}`"),
        (_, Some(folder)) => format!("folder `{folder}`"),
        _ => "nothing".to_owned(),
    };
    let store = if !diff.store.schema {
        "the database has no agentops schema (it does not exist or was never migrated), so it \
         holds nothing and every object is a create"
            .to_owned()
    } else {
        match &diff.store.revision {
            Some(revision) => format!(
                "synced at `{revision}`, {}",
                plural(diff.store.objects, "object", "objects")
            ),
            None => format!(
                "nothing synced from source `{}` yet, so every object is a create",
                diff.source
            ),
        }
    };
    let _ = writeln!(out, "Declared: {declared}.  \nStore: {store}.\n");

    let new_errors = diff.errors.iter().filter(|e| e.new).count();
    let mut summary = Vec::new();
    for (n, what) in [
        (diff.create.len(), "to create"),
        (diff.change.len(), "to change"),
        (diff.prune.len(), "to prune"),
        (diff.invalid.len(), "to flag invalid"),
    ] {
        if n > 0 {
            summary.push(format!("{n} {what}"));
        }
    }
    if summary.is_empty() {
        summary.push("no object changes".to_owned());
    }
    let mut summary = summary.join(", ");
    if !diff.errors.is_empty() {
        let _ = write!(
            summary,
            "; {} in the files ({new_errors} new)",
            plural(diff.errors.len(), "error", "errors")
        );
    }
    let verdict = if diff.changed {
        "A sync would change the store"
    } else {
        "No changes: the store already matches"
    };
    let _ = writeln!(out, "**{verdict}**: {summary}.\n");

    let any_object = !(diff.create.is_empty()
        && diff.change.is_empty()
        && diff.prune.is_empty()
        && diff.invalid.is_empty());
    if any_object {
        out.push_str("```diff\n");
        for c in &diff.create {
            let title = c
                .fields
                .get("title")
                .filter(|t| t.is_string())
                .map(|t| format!(" {}", value(t)))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "+ {} {}{title} ({})",
                c.object.kind,
                c.object.qualified_name(),
                c.object.path.as_deref().unwrap_or("-")
            );
        }
        for c in &diff.change {
            let path = c.object.path.as_deref().unwrap_or("-");
            let generation = if c.generation.old != c.generation.new {
                format!(", generation {} → {}", c.generation.old, c.generation.new)
            } else {
                String::new()
            };
            let what = match c.what {
                "revived" => " revived (it was pruned)".to_owned(),
                "recovered" => " recovered (its error is cleared)".to_owned(),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "~ {} {}{what} ({path}){generation}",
                c.object.kind,
                c.object.qualified_name(),
            );
            if let Some(from) = &c.moved_from {
                let _ = writeln!(out, "    path: {from} → {path}");
            }
            for FieldChange { field, old, new } in &c.fields {
                let _ = writeln!(out, "    {field}: {} → {}", value(old), value(new));
            }
        }
        for p in &diff.prune {
            let _ = writeln!(
                out,
                "- {} {} ({})",
                p.kind,
                p.qualified_name(),
                p.path.as_deref().unwrap_or("-")
            );
        }
        for f in &diff.invalid {
            let _ = writeln!(
                out,
                "! {} {} keeps its last good version: {}",
                f.object.kind,
                f.object.qualified_name(),
                f.message
            );
        }
        out.push_str("```\n\n");
    }
    if !diff.errors.is_empty() {
        out.push_str("Errors in the files:\n\n```\n");
        for e in &diff.errors {
            let mark = if e.new { " (new)" } else { "" };
            let _ = writeln!(out, "{}{mark}", e.diagnostic);
        }
        out.push_str("```\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::diff::{
        Changed, Created, FileError, Flagged, Generation, ObjectRef, StoreState,
    };
    use agentops_specs::{Diagnostic, Kind, Pos};
    use serde_json::json;

    fn task(name: &str, path: &str) -> ObjectRef {
        ObjectRef {
            kind: Kind::Task,
            name: name.into(),
            project: Some("web".into()),
            path: Some(path.into()),
        }
    }

    fn empty() -> Diff {
        Diff {
            source: "default".into(),
            revision: Some("main@sha1:2".into()),
            folder: None,
            store: StoreState {
                schema: true,
                revision: Some("main@sha1:1".into()),
                objects: 3,
            },
            changed: false,
            create: vec![],
            change: vec![],
            prune: vec![],
            invalid: vec![],
            errors: vec![],
        }
    }

    #[test]
    fn text_shows_each_kind_of_change_in_a_diff_block() {
        let mut diff = empty();
        diff.changed = true;
        let mut fields = serde_json::Map::new();
        fields.insert("title".into(), json!("New task"));
        diff.create.push(Created {
            object: task("n", "projects/web/tasks/n.yaml"),
            fields,
        });
        diff.change.push(Changed {
            object: task("a", "projects/web/tasks/a2.yaml"),
            what: "updated",
            moved_from: Some("projects/web/tasks/a.yaml".into()),
            generation: Generation { old: 1, new: 2 },
            fields: vec![
                FieldChange {
                    field: "priority".into(),
                    old: json!(50),
                    new: json!(70),
                },
                FieldChange {
                    field: "title".into(),
                    old: json!("A"),
                    new: json!("A, revised"),
                },
            ],
        });
        diff.prune.push(task("c", "projects/web/tasks/c.yaml"));
        diff.invalid.push(Flagged {
            object: task("d", "projects/web/tasks/d.yaml"),
            message: "projects/web/tasks/d.yaml:4:3: bad".into(),
        });
        diff.errors.push(FileError {
            diagnostic: Diagnostic::new(
                "projects/web/tasks/d.yaml",
                Pos { line: 4, column: 3 },
                "bad",
            ),
            new: true,
        });
        let text = text(&diff);
        assert_eq!(
            text,
            "### agentops diff: source `default`\n\n\
             Declared: revision `main@sha1:2`.  \n\
             Store: synced at `main@sha1:1`, 3 objects.\n\n\
             **A sync would change the store**: 1 to create, 1 to change, 1 to prune, \
             1 to flag invalid; 1 error in the files (1 new).\n\n\
             ```diff\n\
             + Task web/n \"New task\" (projects/web/tasks/n.yaml)\n\
             ~ Task web/a (projects/web/tasks/a2.yaml), generation 1 → 2\n\
             \x20   path: projects/web/tasks/a.yaml → projects/web/tasks/a2.yaml\n\
             \x20   priority: 50 → 70\n\
             \x20   title: \"A\" → \"A, revised\"\n\
             - Task web/c (projects/web/tasks/c.yaml)\n\
             ! Task web/d keeps its last good version: projects/web/tasks/d.yaml:4:3: bad\n\
             ```\n\n\
             Errors in the files:\n\n\
             ```\n\
             projects/web/tasks/d.yaml:4:3: bad (new)\n\
             ```\n"
        );
    }

    #[test]
    fn text_of_nothing_to_do_says_so_without_blocks() {
        let text = text(&empty());
        assert!(
            text.contains("**No changes: the store already matches**: no object changes."),
            "{text}"
        );
        assert!(!text.contains("```"), "{text}");
    }

    #[test]
    fn text_says_why_everything_is_a_create() {
        let mut diff = empty();
        diff.store = StoreState {
            schema: false,
            revision: None,
            objects: 0,
        };
        assert!(text(&diff).contains("has no agentops schema"));
        diff.store.schema = true;
        assert!(text(&diff).contains("nothing synced from source `default` yet"));
    }
}
