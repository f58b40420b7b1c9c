//! What a sync would do to the store, without doing it: the declared objects of a revision
//! (or of a folder) are read in full, the store's rows are loaded, and the same pure
//! [`plan`](super::plan::plan) the syncer applies is computed and described instead. Changed
//! objects are compared column by column with what the store holds.
//!
//! Nothing here writes: the store is only read (and the caller opens it read-only), a folder
//! is read into an in-memory repository, and Git is at most fetched from.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use agentops_specs::{Diagnostic, Kind, ObjectKey};
use git2::{Oid, Repository};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::decide::{Index, decide};
use super::plan::{Current, Event, What};
use super::sync::reread_in;
use crate::source::SourceError;
use crate::source::git::{GitSource, Location};
use crate::store::{Columns, Store, StoreError, columns};

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read the declared objects")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{0} is a folder, which has no revisions: drop --revision")]
    FolderRevision(String),
}

/// Where the declared objects are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Declared {
    /// A revision of the source's repository (a branch, a tag, a ref, a commit id); `None`
    /// for the head of the followed branch, as a sync would take it.
    Revision(Option<String>),
    /// A folder of spec files (such as a checkout of a pull request), read as it is.
    Folder(PathBuf),
}

/// One column whose value a sync would change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    pub field: String,
    /// `null` when the store has no value.
    pub old: Value,
    pub new: Value,
}

/// The columns that differ between what the store holds and what a sync would write, in
/// column name order. A column on one side only counts as `null` on the other.
pub fn compare(old: &Columns, new: &Columns) -> Vec<FieldChange> {
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let (before, after) = (
                old.get(name).unwrap_or(&Value::Null),
                new.get(name).unwrap_or(&Value::Null),
            );
            (before != after).then(|| FieldChange {
                field: name.clone(),
                old: before.clone(),
                new: after.clone(),
            })
        })
        .collect()
}

/// Columns as they are compared: `metadata` becomes `labels` and `annotations` (a project's
/// `labels` column holds the same labels), each `{}` when there are none, as the store keeps
/// an empty map by leaving it out.
pub fn normalize(mut columns: Columns) -> Columns {
    let metadata = match columns.remove("metadata") {
        Some(Value::Object(metadata)) => metadata,
        _ => Columns::new(),
    };
    for key in ["labels", "annotations"] {
        let value = metadata
            .get(key)
            .cloned()
            .unwrap_or_else(|| Value::Object(Columns::new()));
        columns.insert(key.to_owned(), value);
    }
    columns
}

/// An object as the diff names it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectRef {
    pub kind: Kind,
    pub name: String,
    /// A task's project.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The file the object is (or, pruned, was last) declared in.
    pub path: Option<String>,
}

impl ObjectRef {
    fn new(key: &ObjectKey, path: Option<&str>) -> ObjectRef {
        ObjectRef {
            kind: key.kind(),
            name: key.name().to_owned(),
            project: match key {
                ObjectKey::Task { project, .. } => Some(project.clone()),
                _ => None,
            },
            path: path.map(str::to_owned),
        }
    }

    /// `web/a` for a task, the name otherwise.
    pub fn qualified_name(&self) -> String {
        match &self.project {
            Some(project) => format!("{project}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Created {
    #[serde(flatten)]
    pub object: ObjectRef,
    /// Every column the row would get (see [`normalize`]).
    pub fields: Columns,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Changed {
    #[serde(flatten)]
    pub object: ObjectRef,
    /// `updated` (the spec changed), `moved` (to another file), `recovered` (its error is
    /// cleared) or `revived` (it was pruned and is declared again).
    pub what: &'static str,
    /// The file it is declared in now, when that is another one.
    pub moved_from: Option<String>,
    pub generation: Generation,
    /// The columns that change, old → new.
    pub fields: Vec<FieldChange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Generation {
    pub old: i64,
    pub new: i64,
}

/// An object declared in a file that is broken now, or itself invalid: its last good
/// version stays in effect and its row gets the message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Flagged {
    #[serde(flatten)]
    pub object: ObjectRef,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileError {
    #[serde(flatten)]
    pub diagnostic: Diagnostic,
    /// Not among the errors the store recorded for its revision.
    pub new: bool,
}

/// What the store holds for the source before the diff.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoreState {
    /// The database has the schema; without it, it holds nothing.
    pub schema: bool,
    /// The revision the source was last synced at; `null` if never.
    pub revision: Option<String>,
    /// Objects of the source the store holds, pruned ones left out.
    pub objects: usize,
}

/// Everything a sync would do, in the order a reader wants it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diff {
    pub source: String,
    /// The revision diffed (`<branch>@sha1:<commit>`); `null` for a folder.
    pub revision: Option<String>,
    /// The folder diffed; `null` for a revision.
    pub folder: Option<String>,
    pub store: StoreState,
    /// Whether a sync would change anything: write a row, or record a new error.
    pub changed: bool,
    pub create: Vec<Created>,
    pub change: Vec<Changed>,
    pub prune: Vec<ObjectRef>,
    pub invalid: Vec<Flagged>,
    /// Every problem in the declared files, as `path:line:column: message`.
    pub errors: Vec<FileError>,
}

/// A plan with what it writes read in full, owning everything: it outlives the index, and
/// crosses from the Git thread to the store.
#[derive(Debug)]
pub struct Draft {
    creates: Vec<Created>,
    updates: Vec<(Uuid, Changed, Columns)>,
    prunes: Vec<ObjectRef>,
    flags: Vec<Flagged>,
    errors: Vec<FileError>,
}

/// Decide against `current` what syncing `tree` would do, and read the objects it writes.
pub fn draft(
    repo: &Repository,
    tree: Oid,
    revision: &str,
    current: &Current,
) -> Result<Draft, DiffError> {
    let index = Index::of_tree(repo, tree)?;
    let (plan, _) = decide(&index, current, revision, &tree.to_string());
    let writes: Vec<_> = plan.creates.iter().chain(&plan.updates).collect();
    let objects = reread_in(repo, index.locate(&writes)).map_err(DiffError::Read)?;
    let mut objects = objects.into_iter().map(|o| normalize(columns(&o)));

    let creates = plan
        .creates
        .iter()
        .zip(objects.by_ref())
        .map(|(write, fields)| Created {
            object: ObjectRef::new(&write.object.key, Some(&write.object.path)),
            fields,
        })
        .collect();
    let what: HashMap<&ObjectKey, What> = plan
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Written { what, key, .. } => Some((*key, *what)),
            _ => None,
        })
        .collect();
    let updates = plan
        .updates
        .iter()
        .zip(objects)
        .map(|(write, fields)| {
            let key = &write.object.key;
            let row = &current.objects[key];
            let path = &*write.object.path;
            let changed = Changed {
                object: ObjectRef::new(key, Some(path)),
                what: match what.get(key) {
                    Some(What::Moved) => "moved",
                    Some(What::Recovered) => "recovered",
                    Some(What::Revived) => "revived",
                    _ => "updated",
                },
                moved_from: row
                    .path
                    .as_deref()
                    .filter(|old| *old != path)
                    .map(str::to_owned),
                generation: Generation {
                    old: row.generation,
                    new: write.generation,
                },
                fields: Vec::new(),
            };
            (write.id, changed, fields)
        })
        .collect();
    let prunes = plan
        .prunes
        .iter()
        .map(|p| ObjectRef::new(&p.key, current.objects[&p.key].path.as_deref()))
        .collect();
    let flags = plan
        .flags
        .iter()
        .map(|f| Flagged {
            object: ObjectRef::new(&f.key, current.objects[&f.key].path.as_deref()),
            message: f.message.clone(),
        })
        .collect();
    let recorded: BTreeSet<&Diagnostic> = current.cursor.iter().flat_map(|c| &c.errors).collect();
    // No cursor in the plan: the recorded one already matches, errors included.
    let errors = plan
        .cursor
        .as_ref()
        .or(current.cursor.as_ref())
        .map_or(&[][..], |c| &c.errors)
        .iter()
        .map(|d| FileError {
            new: !recorded.contains(d),
            diagnostic: d.clone(),
        })
        .collect();
    Ok(Draft {
        creates,
        updates,
        prunes,
        flags,
        errors,
    })
}

impl Draft {
    /// The ids and kinds of the rows whose columns the diff compares.
    pub fn compared_rows(&self) -> Vec<(Kind, Uuid)> {
        self.updates
            .iter()
            .map(|(id, changed, _)| (changed.object.kind, *id))
            .collect()
    }

    /// The diff, with each changed object's columns compared to `stored` (by row id).
    pub fn finish(
        self,
        stored: &HashMap<Uuid, Columns>,
        source: &str,
        declared: DeclaredAt,
        store: StoreState,
    ) -> Diff {
        let change: Vec<Changed> = self
            .updates
            .into_iter()
            .map(|(id, mut changed, new)| {
                let old = stored.get(&id).cloned().map(normalize).unwrap_or_default();
                changed.fields = compare(&old, &new);
                changed
            })
            .collect();
        let changed = !self.creates.is_empty()
            || !change.is_empty()
            || !self.prunes.is_empty()
            || !self.flags.is_empty()
            || self.errors.iter().any(|e| e.new);
        let (revision, folder) = match declared {
            DeclaredAt::Revision(revision) => (Some(revision), None),
            DeclaredAt::Folder(folder) => (None, Some(folder)),
        };
        Diff {
            source: source.to_owned(),
            revision,
            folder,
            store,
            changed,
            create: self.creates,
            change,
            prune: self.prunes,
            invalid: self.flags,
            errors: self.errors,
        }
    }
}

/// What was read: a revision, or a folder, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeclaredAt {
    Revision(String),
    Folder(String),
}

/// A repository that lives in memory only: a folder read into it leaves nothing on disk.
fn in_memory_repository() -> Result<Repository, SourceError> {
    let git = |source| SourceError::Git {
        doing: "making an in-memory repository",
        source,
    };
    let odb = git2::Odb::new().map_err(git)?;
    odb.add_new_mempack_backend(1).map_err(git)?;
    Repository::from_odb(odb).map_err(git)
}

/// Read what `declared` names and draft its sync against `current`. Blocks (Git).
pub fn read_declared(
    source: &GitSource,
    declared: &Declared,
    current: &Current,
) -> Result<(Draft, DeclaredAt), DiffError> {
    let folder = match (declared, &source.location) {
        (Declared::Folder(folder), _) => Some(folder.clone()),
        (Declared::Revision(None), Location::Folder(folder)) => Some(folder.clone()),
        (Declared::Revision(Some(_)), Location::Folder(folder)) => {
            return Err(DiffError::FolderRevision(folder.display().to_string()));
        }
        _ => None,
    };
    if let Some(folder) = folder {
        let repo = in_memory_repository()?;
        let tree = crate::source::import::write_tree(&repo, &folder)?;
        let label = format!("{}@folder:{tree}", source.branch);
        let draft = draft(&repo, tree, &label, current)?;
        return Ok((draft, DeclaredAt::Folder(folder.display().to_string())));
    }
    let Declared::Revision(revision) = declared else {
        unreachable!("folders are read above")
    };
    let (repo, commit) = match (revision, &source.location) {
        (None, _) => {
            let repo = source.open()?;
            source.refresh(&repo, &[])?;
            let commit = source.snapshot(&repo)?.commit;
            (repo, commit)
        }
        // The repository itself is read: it has every branch and commit the user can name.
        (Some(revision), Location::Local(path)) => {
            let repo = Repository::open(path).map_err(|source| SourceError::Git {
                doing: "opening the repository",
                source,
            })?;
            // Its own names, as `git` resolves them there: `main` is its branch `main`.
            let commit = repo
                .revparse_single(revision)
                .and_then(|o| o.peel_to_commit())
                .map_err(|_| SourceError::NoRevision {
                    url: source.location.url(),
                    revision: revision.clone(),
                })?
                .id();
            (repo, commit)
        }
        (Some(revision), _) => {
            let repo = source.open()?;
            source.fetch_revision(&repo, revision)?;
            let commit = source.resolve(&repo, revision)?.id();
            (repo, commit)
        }
    };
    let tree = {
        let commit = repo
            .find_commit(commit)
            .map_err(|source| SourceError::Git {
                doing: "reading a commit",
                source,
            })?;
        source.tree_at(&commit)?
    };
    let label = format!("{}@sha1:{commit}", source.branch);
    let draft = draft(&repo, tree, &label, current)?;
    Ok((draft, DeclaredAt::Revision(label)))
}

/// The whole diff: `store` is `None` when there is no database yet (an SQLite file that does
/// not exist), which then holds nothing.
pub async fn diff<S: Store>(
    store: Option<&S>,
    source: &GitSource,
    source_name: &str,
    declared: Declared,
) -> Result<Diff, DiffError> {
    let schema = match store {
        Some(store) => store.has_schema().await?,
        None => false,
    };
    let current = match store {
        Some(store) if schema => store.load(source_name).await?,
        _ => Current::default(),
    };
    let state = StoreState {
        schema,
        revision: current.cursor.as_ref().map(|c| c.revision.clone()),
        objects: current.objects.values().filter(|o| !o.pruned).count(),
    };
    let source = source.clone();
    let (draft, at) =
        tokio::task::spawn_blocking(move || read_declared(&source, &declared, &current))
            .await
            .map_err(|e| DiffError::Source(SourceError::Worker(e)))??;
    let rows = draft.compared_rows();
    let stored = match store {
        Some(store) if !rows.is_empty() => store.fields(&rows).await?,
        _ => HashMap::new(),
    };
    Ok(draft.finish(&stored, source_name, at, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn columns(value: Value) -> Columns {
        match value {
            Value::Object(map) => map,
            _ => panic!("an object"),
        }
    }

    #[test]
    fn compare_lists_changed_columns_old_to_new_in_name_order() {
        let old = columns(json!({"title": "Old", "priority": 50, "retries": 2}));
        let new = columns(json!({"title": "New", "priority": 70, "retries": 2}));
        assert_eq!(
            compare(&old, &new),
            [
                FieldChange {
                    field: "priority".into(),
                    old: json!(50),
                    new: json!(70)
                },
                FieldChange {
                    field: "title".into(),
                    old: json!("Old"),
                    new: json!("New")
                },
            ]
        );
        assert_eq!(compare(&new, &new), []);
    }

    #[test]
    fn compare_counts_a_column_on_one_side_as_null_on_the_other() {
        let old = columns(json!({"owner": "cos", "timeout_seconds": null}));
        let new = columns(json!({"timeout_seconds": 300}));
        let changes = compare(&old, &new);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(
            (changes[0].field.as_str(), &changes[0].old, &changes[0].new),
            ("owner", &json!("cos"), &Value::Null)
        );
        assert_eq!(
            (changes[1].field.as_str(), &changes[1].old, &changes[1].new),
            ("timeout_seconds", &Value::Null, &json!(300))
        );
    }

    #[test]
    fn compare_looks_inside_json_columns_regardless_of_key_order() {
        let old = columns(json!({"action": {"prompt": "go", "kind": "prompt"}}));
        let same = columns(json!({"action": {"kind": "prompt", "prompt": "go"}}));
        assert_eq!(compare(&old, &same), []);
        let other = columns(json!({"action": {"kind": "prompt", "prompt": "stop"}}));
        assert_eq!(compare(&old, &other)[0].field, "action");
    }

    #[test]
    fn normalize_splits_metadata_and_fills_empty_maps() {
        let stored = columns(json!({"title": "T", "metadata": {"labels": {"area": "web"}}}));
        assert_eq!(
            Value::Object(normalize(stored)),
            json!({"title": "T", "labels": {"area": "web"}, "annotations": {}})
        );
        // A project row's `labels` column and its metadata hold the same labels.
        let project = columns(json!({"labels": {"a": "1"}, "metadata": {"labels": {"a": "1"}}}));
        assert_eq!(
            Value::Object(normalize(project)),
            json!({"labels": {"a": "1"}, "annotations": {}})
        );
        assert_eq!(
            Value::Object(normalize(Columns::new())),
            json!({"labels": {}, "annotations": {}})
        );
    }
}
