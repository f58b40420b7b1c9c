//! The reconcile decision, as a pure function: what the source declares and what the store
//! holds go in, the list of writes comes out. Nothing here touches a database or Git, so every
//! rule is tested with plain `#[test]`s below.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use agentops_specs::{Diagnostic, Kind, Object, ObjectKey, Skeleton};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What tells a changed spec from an unchanged one: the first 16 bytes of the SHA-256 of the
/// object's metadata and spec as JSON. Stored as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpecHash([u8; 16]);

impl SpecHash {
    pub fn of(object: &Object) -> SpecHash {
        let json = serde_json::to_vec(&(&object.metadata, &object.spec))
            .expect("specs serialize to JSON: they came from YAML");
        let mut hash = [0; 16];
        hash.copy_from_slice(&Sha256::digest(&json)[..16]);
        SpecHash(hash)
    }

    /// A hash as the store holds it. `None` for text this build never writes, which then
    /// matches no spec, as it did when hashes were compared as text.
    pub fn parse(text: &str) -> Option<SpecHash> {
        if !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut hash = [0; 16];
        hex::decode_to_slice(text, &mut hash).ok()?;
        Some(SpecHash(hash))
    }
}

impl fmt::Display for SpecHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0; 32];
        hex::encode_to_slice(self.0, &mut text).expect("32 digits for 16 bytes");
        f.write_str(std::str::from_utf8(&text).expect("hex digits are ASCII"))
    }
}

impl serde::Serialize for SpecHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What the source declares at one revision. Objects are known by their skeletons: the store
/// reads the whole object again only for those it writes.
#[derive(Debug, Default)]
pub struct Desired<'a> {
    /// Objects that passed every check, with their spec hash.
    pub objects: Vec<(&'a Skeleton, SpecHash)>,
    /// Objects that are declared but failed validation: keep their last good version.
    pub invalid: Vec<&'a Skeleton>,
    /// Files that could not be read as a whole: whatever the store holds from them stays in
    /// effect, untouched by pruning.
    pub broken_paths: HashSet<&'a str>,
    /// Every problem in the source at this revision.
    pub diagnostics: Vec<Diagnostic>,
}

/// What the store holds for one source.
#[derive(Debug, Default, Clone)]
pub struct Current {
    pub objects: HashMap<ObjectKey, CurrentObject>,
    pub cursor: Option<Cursor>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CurrentObject {
    pub id: Uuid,
    /// Shared with the sync index for the objects a sync wrote.
    pub path: Option<Arc<str>>,
    pub spec_hash: Option<SpecHash>,
    pub generation: i64,
    pub status_message: Option<String>,
    pub pruned: bool,
}

/// How far a source has been synced: the revision, its tree, and the problems found there.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Cursor {
    pub revision: String,
    pub tree: String,
    pub errors: Vec<Diagnostic>,
}

/// The writes one sync makes. Empty when the store already matches the source.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    /// The source revision the writes come from.
    pub revision: String,
    pub creates: Vec<Write<'a>>,
    pub updates: Vec<Write<'a>>,
    pub prunes: Vec<Prune>,
    pub flags: Vec<Flag>,
    pub events: Vec<Event<'a>>,
    /// Set when the cursor moves; `None` when this revision was synced already.
    pub cursor: Option<Cursor>,
}

impl Plan<'_> {
    /// No row at all needs writing.
    pub fn is_empty(&self) -> bool {
        self.creates.is_empty()
            && self.updates.is_empty()
            && self.prunes.is_empty()
            && self.flags.is_empty()
            && self.events.is_empty()
            && self.cursor.is_none()
    }

    pub fn object_writes(&self) -> usize {
        self.creates.len() + self.updates.len() + self.prunes.len() + self.flags.len()
    }
}

/// A row to insert or to overwrite with the object's spec.
#[derive(Debug, Clone)]
pub struct Write<'a> {
    pub id: Uuid,
    pub object: &'a Skeleton,
    pub spec_hash: SpecHash,
    pub generation: i64,
    /// A task's project row.
    pub project_id: Option<Uuid>,
    /// The object had been pruned and is declared again: it starts a new life.
    pub revive: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Prune {
    pub id: Uuid,
    pub key: ObjectKey,
}

/// An object whose new version is invalid: the message goes on its row, the last good version
/// stays in effect.
#[derive(Debug, Clone, PartialEq)]
pub struct Flag {
    pub id: Uuid,
    pub key: ObjectKey,
    pub message: String,
}

/// What happened to an object, the second half of its event's type (`task.created`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    Created,
    Updated,
    Moved,
    Recovered,
    Revived,
    Invalid,
    Pruned,
}

/// One `events` row. Its payload (`rows.rs`) carries the plan's revision and, for an object,
/// its kind, name, project (tasks) and path. The rare kinds are boxed: nearly every event of
/// a large sync is `Written`, and this keeps each of them small.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<'a> {
    /// The object's row is written: created, updated, moved, recovered or revived.
    Written {
        what: What,
        key: &'a ObjectKey,
        path: &'a str,
        generation: i64,
    },
    /// The object is flagged with the message; its last good version stays in effect.
    Invalid(Box<Invalid>),
    /// The object left the source.
    Pruned(Box<Pruned>),
    /// A problem in the source that the previous revision did not have.
    Source(Box<Diagnostic>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub key: ObjectKey,
    pub path: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pruned {
    pub key: ObjectKey,
    pub path: Option<Arc<str>>,
}

impl Event<'_> {
    pub fn event_type(&self) -> &'static str {
        let (kind, what) = match self {
            Event::Written { what, key, .. } => (key.kind(), *what),
            Event::Invalid(e) => (e.key.kind(), What::Invalid),
            Event::Pruned(e) => (e.key.kind(), What::Pruned),
            Event::Source(_) => return "source.invalid",
        };
        // A row per `Kind`, a column per `What`, each in declaration order.
        const TYPES: [[&str; 7]; 4] = [
            [
                "project.created",
                "project.updated",
                "project.moved",
                "project.recovered",
                "project.revived",
                "project.invalid",
                "project.pruned",
            ],
            [
                "task.created",
                "task.updated",
                "task.moved",
                "task.recovered",
                "task.revived",
                "task.invalid",
                "task.pruned",
            ],
            [
                "agent.created",
                "agent.updated",
                "agent.moved",
                "agent.recovered",
                "agent.revived",
                "agent.invalid",
                "agent.pruned",
            ],
            [
                "tool.created",
                "tool.updated",
                "tool.moved",
                "tool.recovered",
                "tool.revived",
                "tool.invalid",
                "tool.pruned",
            ],
        ];
        TYPES[kind as usize][what as usize]
    }
}

/// A status message is shown in tables and on the board: keep it to a readable length.
const MAX_MESSAGE: usize = 2_000;

pub fn plan<'a>(
    desired: &Desired<'a>,
    current: &Current,
    revision: &str,
    tree: &str,
    mut new_id: impl FnMut() -> Uuid,
) -> Plan<'a> {
    let mut plan = Plan {
        revision: revision.to_owned(),
        ..Plan::default()
    };

    // Projects first: a new task needs the id of its (possibly new) project.
    let mut ordered: Vec<&(&'a Skeleton, SpecHash)> = desired.objects.iter().collect();
    ordered.sort_by_key(|(o, _)| o.key.kind() != Kind::Project);

    let mut project_ids: HashMap<&str, Uuid> = HashMap::new();
    let mut declared: HashSet<&'a ObjectKey> =
        HashSet::with_capacity(desired.objects.len() + desired.invalid.len());

    for &(object, hash) in ordered {
        let key = &object.key;
        let project_id = match key {
            ObjectKey::Task { project, .. } => {
                let id = project_ids.get(project.as_str()).copied().or_else(|| {
                    current
                        .objects
                        .get(&ObjectKey::Project(project.clone()))
                        .map(|p| p.id)
                });
                if id.is_none() {
                    // Validation guarantees the project is declared; it has no row when its
                    // own file is broken and it was never synced. The task waits for it.
                    declared.insert(key);
                    continue;
                }
                id
            }
            _ => None,
        };
        let path = &*object.path;
        let write = match current.objects.get(key) {
            None => {
                let write = Write {
                    id: new_id(),
                    object,
                    spec_hash: hash,
                    generation: 1,
                    project_id,
                    revive: false,
                };
                plan.events.push(Event::Written {
                    what: What::Created,
                    key,
                    path,
                    generation: 1,
                });
                plan.creates.push(write.clone());
                write
            }
            Some(row) => {
                let spec_changed = row.spec_hash != Some(hash);
                let moved = row.path.as_deref() != Some(path);
                let recovered = row.status_message.is_some();
                let generation = row.generation + i64::from(spec_changed || row.pruned);
                let write = Write {
                    id: row.id,
                    object,
                    spec_hash: hash,
                    generation,
                    project_id,
                    revive: row.pruned,
                };
                let what = if row.pruned {
                    Some(What::Revived)
                } else if spec_changed {
                    Some(What::Updated)
                } else if moved {
                    Some(What::Moved)
                } else if recovered {
                    Some(What::Recovered)
                } else {
                    None
                };
                if let Some(what) = what {
                    plan.events.push(Event::Written {
                        what,
                        key,
                        path,
                        generation,
                    });
                    plan.updates.push(write.clone());
                }
                write
            }
        };
        if let ObjectKey::Project(name) = key {
            project_ids.insert(name, write.id);
        }
        declared.insert(key);
    }

    let by_path: BTreeMap<&str, Vec<&Diagnostic>> =
        desired
            .diagnostics
            .iter()
            .fold(BTreeMap::new(), |mut map, d| {
                map.entry(d.path.as_str()).or_default().push(d);
                map
            });
    let message_for = |path: &str| -> String {
        let mut message = by_path
            .get(path)
            .map(|ds| {
                ds.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_else(|| format!("{path}: invalid"));
        if message.len() > MAX_MESSAGE {
            let cut = (0..=MAX_MESSAGE)
                .rev()
                .find(|&i| message.is_char_boundary(i))
                .unwrap_or(0);
            message.truncate(cut);
            message.push('…');
        }
        message
    };
    let flag = |plan: &mut Plan<'a>, key: &ObjectKey, row: &CurrentObject, path: &str| {
        let message = message_for(path);
        if row.status_message.as_deref() != Some(message.as_str()) {
            plan.events.push(Event::Invalid(Box::new(Invalid {
                key: key.clone(),
                path: path.to_owned(),
                message: message.clone(),
            })));
            plan.flags.push(Flag {
                id: row.id,
                key: key.clone(),
                message,
            });
        }
    };

    for object in &desired.invalid {
        let key = &object.key;
        if let Some(row) = current.objects.get(key).filter(|row| !row.pruned) {
            flag(&mut plan, key, row, &object.path);
        }
        declared.insert(key);
    }

    // Deterministic order keeps plans (and their events) reproducible.
    let mut rows: Vec<(&ObjectKey, &CurrentObject)> = current
        .objects
        .iter()
        .filter(|(key, row)| !row.pruned && !declared.contains(key))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(b.0));
    for (key, row) in rows {
        match row.path.as_deref() {
            Some(path) if desired.broken_paths.contains(path) => {
                flag(&mut plan, key, row, path);
            }
            _ => {
                plan.events.push(Event::Pruned(Box::new(Pruned {
                    key: key.clone(),
                    path: row.path.clone(),
                })));
                plan.prunes.push(Prune {
                    id: row.id,
                    key: key.clone(),
                });
            }
        }
    }

    let mut errors = desired.diagnostics.clone();
    errors.sort();
    let cursor = Cursor {
        revision: revision.to_owned(),
        tree: tree.to_owned(),
        errors,
    };
    let before: BTreeSet<&Diagnostic> = current
        .cursor
        .iter()
        .flat_map(|c| c.errors.iter())
        .collect();
    for d in &cursor.errors {
        if !before.contains(d) {
            plan.events.push(Event::Source(Box::new(d.clone())));
        }
    }
    if current.cursor.as_ref() != Some(&cursor) {
        plan.cursor = Some(cursor);
    }
    plan
}

/// Bring the in-memory view of the store up to date with a plan the store has applied.
pub fn apply_to_current(current: &mut Current, mut plan: Plan<'_>) {
    // The view grows by a row for each object created: a cold sync's largest allocation, made
    // once, after the events, which are no longer needed, have made room.
    plan.events = Vec::new();
    current.objects.reserve(plan.creates.len());
    for write in plan.creates.iter().chain(&plan.updates) {
        current.objects.insert(
            write.object.key.clone(),
            CurrentObject {
                id: write.id,
                path: Some(Arc::clone(&write.object.path)),
                spec_hash: Some(write.spec_hash),
                generation: write.generation,
                status_message: None,
                pruned: false,
            },
        );
    }
    for prune in &plan.prunes {
        if let Some(row) = current.objects.get_mut(&prune.key) {
            row.pruned = true;
        }
    }
    for flag in plan.flags {
        if let Some(row) = current.objects.get_mut(&flag.key) {
            row.status_message = Some(flag.message);
        }
    }
    if let Some(cursor) = plan.cursor {
        current.cursor = Some(cursor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentops_specs::parse_file;

    /// The skeletons and hashes of the files' objects, as the sync index keeps them.
    fn objects(files: &[(&str, &str)]) -> Vec<(Skeleton, SpecHash)> {
        files
            .iter()
            .flat_map(|(path, text)| {
                let parsed = parse_file(path, text.as_bytes());
                assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
                let path: std::sync::Arc<str> = (*path).into();
                parsed
                    .objects
                    .into_iter()
                    .map(move |o| (o.skeleton(path.clone()), SpecHash::of(&o)))
            })
            .collect()
    }

    const PROJECT: &str = "apiVersion: agentops.dev/v1alpha1\nkind: Project\nmetadata: {name: web}\nspec: {title: Web}\n";

    fn task(name: &str, title: &str) -> String {
        format!(
            "apiVersion: agentops.dev/v1alpha1\nkind: Task\nmetadata: {{name: {name}}}\nspec: {{title: {title}, action: {{prompt: go}}}}\n"
        )
    }

    fn ids() -> impl FnMut() -> Uuid {
        let mut n = 0u128;
        move || {
            n += 1;
            Uuid::from_u128(n)
        }
    }

    fn desired(objects: &[(Skeleton, SpecHash)]) -> Desired<'_> {
        Desired {
            objects: objects.iter().map(|(o, h)| (o, *h)).collect(),
            ..Desired::default()
        }
    }

    #[test]
    fn new_objects_are_created_projects_first_with_events() {
        let objs = objects(&[
            ("projects/web/tasks/a.yaml", &task("a", "A")),
            ("projects/web/project.yaml", PROJECT),
        ]);
        let plan = plan(
            &desired(&objs),
            &Current::default(),
            "main@sha1:1",
            "t1",
            ids(),
        );
        assert_eq!(plan.creates.len(), 2);
        assert_eq!(plan.creates[0].object.key.kind(), Kind::Project);
        assert_eq!(plan.creates[1].project_id, Some(plan.creates[0].id));
        assert_eq!(plan.creates[1].generation, 1);
        let types: Vec<&str> = plan.events.iter().map(Event::event_type).collect();
        assert_eq!(types, ["project.created", "task.created"]);
        assert!(plan.cursor.is_some());
    }

    fn synced(objs: &[(Skeleton, SpecHash)]) -> Current {
        let mut current = Current::default();
        let p = plan(&desired(objs), &current, "main@sha1:1", "t1", ids());
        apply_to_current(&mut current, p);
        current
    }

    #[test]
    fn same_revision_again_plans_nothing() {
        let objs = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "A")),
        ]);
        let current = synced(&objs);
        let again = plan(&desired(&objs), &current, "main@sha1:1", "t1", ids());
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn new_revision_without_spec_change_only_moves_the_cursor() {
        let objs = objects(&[("projects/web/project.yaml", PROJECT)]);
        let current = synced(&objs);
        let next = plan(&desired(&objs), &current, "main@sha1:2", "t2", ids());
        assert_eq!(next.object_writes(), 0);
        assert!(next.events.is_empty());
        assert_eq!(next.cursor.unwrap().revision, "main@sha1:2");
    }

    #[test]
    fn changed_spec_bumps_generation_once() {
        let v1 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "A")),
        ]);
        let current = synced(&v1);
        let v2 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "Changed")),
        ]);
        let p = plan(&desired(&v2), &current, "main@sha1:2", "t2", ids());
        assert_eq!(p.updates.len(), 1);
        assert_eq!(p.updates[0].generation, 2);
        assert_eq!(p.events[0].event_type(), "task.updated");
    }

    #[test]
    fn renamed_file_moves_without_new_generation() {
        let v1 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "A")),
        ]);
        let current = synced(&v1);
        let v2 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/renamed.yaml", &task("a", "A")),
        ]);
        let p = plan(&desired(&v2), &current, "main@sha1:2", "t2", ids());
        assert_eq!(p.updates.len(), 1);
        assert_eq!(p.updates[0].generation, 1);
        assert_eq!(p.events[0].event_type(), "task.moved");
        assert!(p.prunes.is_empty());
    }

    #[test]
    fn removed_object_is_pruned_then_revived() {
        let v1 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "A")),
        ]);
        let mut current = synced(&v1);
        let v2 = objects(&[("projects/web/project.yaml", PROJECT)]);
        let p = plan(&desired(&v2), &current, "main@sha1:2", "t2", ids());
        assert_eq!(p.prunes.len(), 1);
        assert_eq!(p.events[0].event_type(), "task.pruned");
        apply_to_current(&mut current, p);

        let p = plan(&desired(&v1), &current, "main@sha1:3", "t3", ids());
        assert_eq!(p.updates.len(), 1);
        assert!(p.updates[0].revive);
        assert_eq!(p.updates[0].generation, 2);
        assert_eq!(p.events[0].event_type(), "task.revived");
    }

    #[test]
    fn broken_file_keeps_its_objects_and_flags_them_once() {
        let v1 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "A")),
        ]);
        let mut current = synced(&v1);

        let v2 = objects(&[("projects/web/project.yaml", PROJECT)]);
        let mut d = desired(&v2);
        d.broken_paths.insert("projects/web/tasks/a.yaml");
        d.diagnostics.push(Diagnostic::new(
            "projects/web/tasks/a.yaml",
            agentops_specs::Pos { line: 3, column: 7 },
            "unknown field `titel`",
        ));
        let p = plan(&d, &current, "main@sha1:2", "t2", ids());
        assert!(p.prunes.is_empty());
        assert_eq!(p.flags.len(), 1);
        assert_eq!(
            p.flags[0].message,
            "projects/web/tasks/a.yaml:3:7: unknown field `titel`"
        );
        let types: Vec<&str> = p.events.iter().map(Event::event_type).collect();
        assert_eq!(types, ["task.invalid", "source.invalid"]);
        apply_to_current(&mut current, p);

        let p = plan(&d, &current, "main@sha1:3", "t3", ids());
        assert_eq!(p.object_writes(), 0, "{p:?}");
        assert!(p.events.is_empty());

        // Fixed back to exactly the last good version: the message is cleared.
        let p = plan(&desired(&v1), &current, "main@sha1:4", "t4", ids());
        assert_eq!(p.updates.len(), 1);
        assert_eq!(p.updates[0].generation, 1);
        assert_eq!(p.events[0].event_type(), "task.recovered");
    }

    #[test]
    fn invalid_new_version_keeps_the_row_and_is_flagged() {
        let v1 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "A")),
        ]);
        let current = synced(&v1);
        let mut d = desired(&v1[..1]);
        d.invalid.push(&v1[1].0);
        d.diagnostics.push(Diagnostic::new(
            "projects/web/tasks/a.yaml",
            agentops_specs::Pos { line: 5, column: 3 },
            "dependency cycle: a → a",
        ));
        let p = plan(&d, &current, "main@sha1:2", "t2", ids());
        assert!(p.prunes.is_empty());
        assert!(p.updates.is_empty());
        assert_eq!(p.flags.len(), 1);
    }

    #[test]
    fn task_of_a_never_synced_broken_project_waits() {
        let objs = objects(&[("projects/web/tasks/a.yaml", &task("a", "A"))]);
        let p = plan(&desired(&objs), &Current::default(), "r", "t", ids());
        assert!(p.creates.is_empty());
    }
}
