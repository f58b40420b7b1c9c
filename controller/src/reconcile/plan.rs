//! The reconcile decision, as a pure function: what the source declares and what the store
//! holds go in, the list of writes comes out. Nothing here touches a database or Git, so every
//! rule is tested with plain `#[test]`s below.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use agentops_specs::{Diagnostic, Kind, Object, ObjectKey, Spec};
use uuid::Uuid;

/// What the source declares at one revision.
#[derive(Debug, Default)]
pub struct Desired<'a> {
    /// Objects that passed every check, with their spec hash.
    pub objects: Vec<(&'a Object, &'a str)>,
    /// Objects that are declared but failed validation: keep their last good version.
    pub invalid: Vec<&'a Object>,
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
    pub path: Option<String>,
    pub spec_hash: Option<String>,
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
    pub events: Vec<Event>,
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
    pub object: &'a Object,
    pub spec_hash: &'a str,
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

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_type: String,
    pub payload: serde_json::Value,
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
    let event = |kind: Kind, what: &str, key: &ObjectKey, extra: serde_json::Value| {
        let mut payload = serde_json::json!({
            "kind": kind.as_str(),
            "name": key_name(key),
            "revision": revision,
        });
        if let ObjectKey::Task { project, .. } = key {
            payload["project"] = project.clone().into();
        }
        if let (Some(map), serde_json::Value::Object(extra)) = (payload.as_object_mut(), extra) {
            map.extend(extra);
        }
        Event {
            event_type: format!("{}.{what}", kind.as_str().to_ascii_lowercase()),
            payload,
        }
    };

    // Projects first: a new task needs the id of its (possibly new) project.
    let mut ordered: Vec<&(&Object, &str)> = desired.objects.iter().collect();
    ordered.sort_by_key(|(o, _)| o.kind() != Kind::Project);

    let mut project_ids: HashMap<&str, Uuid> = HashMap::new();
    let mut declared: HashSet<ObjectKey> = HashSet::with_capacity(desired.objects.len());

    for &&(object, hash) in &ordered {
        let key = object.key();
        let project_id = match &object.spec {
            Spec::Task(t) => {
                let id = project_ids.get(t.project.as_str()).copied().or_else(|| {
                    current
                        .objects
                        .get(&ObjectKey::Project(t.project.clone()))
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
        let write = match current.objects.get(&key) {
            None => {
                let write = Write {
                    id: new_id(),
                    object,
                    spec_hash: hash,
                    generation: 1,
                    project_id,
                    revive: false,
                };
                plan.events.push(event(
                    object.kind(),
                    "created",
                    &key,
                    serde_json::json!({"path": object.origin.path, "generation": 1}),
                ));
                plan.creates.push(write.clone());
                write
            }
            Some(row) => {
                let spec_changed = row.spec_hash.as_deref() != Some(hash);
                let moved = row.path.as_deref() != Some(object.origin.path.as_str());
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
                    Some("revived")
                } else if spec_changed {
                    Some("updated")
                } else if moved {
                    Some("moved")
                } else if recovered {
                    Some("recovered")
                } else {
                    None
                };
                if let Some(what) = what {
                    plan.events.push(event(
                        object.kind(),
                        what,
                        &key,
                        serde_json::json!({"path": object.origin.path, "generation": generation}),
                    ));
                    plan.updates.push(write.clone());
                }
                write
            }
        };
        if let Spec::Project(_) = object.spec {
            project_ids.insert(object.name(), write.id);
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
            plan.events.push(event(
                key.kind(),
                "invalid",
                key,
                serde_json::json!({"path": path, "message": message}),
            ));
            plan.flags.push(Flag {
                id: row.id,
                key: key.clone(),
                message,
            });
        }
    };

    for object in &desired.invalid {
        let key = object.key();
        if let Some(row) = current.objects.get(&key).filter(|row| !row.pruned) {
            flag(&mut plan, &key, row, &object.origin.path);
        }
        declared.insert(key);
    }

    // Deterministic order keeps plans (and their events) reproducible.
    let mut rows: Vec<(&ObjectKey, &CurrentObject)> = current
        .objects
        .iter()
        .filter(|(key, row)| !row.pruned && !declared.contains(*key))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(b.0));
    for (key, row) in rows {
        match row.path.as_deref() {
            Some(path) if desired.broken_paths.contains(path) => {
                flag(&mut plan, key, row, path);
            }
            _ => {
                plan.events.push(event(
                    key.kind(),
                    "pruned",
                    key,
                    serde_json::json!({"path": row.path}),
                ));
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
            plan.events.push(Event {
                event_type: "source.invalid".to_owned(),
                payload: serde_json::json!({
                    "path": d.path, "line": d.line, "column": d.column,
                    "message": d.message, "revision": revision,
                }),
            });
        }
    }
    if current.cursor.as_ref() != Some(&cursor) {
        plan.cursor = Some(cursor);
    }
    plan
}

fn key_name(key: &ObjectKey) -> &str {
    match key {
        ObjectKey::Project(n) | ObjectKey::Agent(n) | ObjectKey::Tool(n) => n,
        ObjectKey::Task { name, .. } => name,
    }
}

/// Bring the in-memory view of the store up to date with a plan the store has applied.
pub fn apply_to_current(current: &mut Current, plan: &Plan<'_>) {
    for write in plan.creates.iter().chain(&plan.updates) {
        current.objects.insert(
            write.object.key(),
            CurrentObject {
                id: write.id,
                path: Some(write.object.origin.path.clone()),
                spec_hash: Some(write.spec_hash.to_owned()),
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
    for flag in &plan.flags {
        if let Some(row) = current.objects.get_mut(&flag.key) {
            row.status_message = Some(flag.message.clone());
        }
    }
    if let Some(cursor) = &plan.cursor {
        current.cursor = Some(cursor.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentops_specs::parse_file;

    fn objects(files: &[(&str, &str)]) -> Vec<Object> {
        files
            .iter()
            .flat_map(|(path, text)| {
                let parsed = parse_file(path, text.as_bytes());
                assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
                parsed.objects
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

    fn desired<'a>(objects: &'a [Object], hashes: &'a [String]) -> Desired<'a> {
        Desired {
            objects: objects
                .iter()
                .zip(hashes)
                .map(|(o, h)| (o, h.as_str()))
                .collect(),
            ..Desired::default()
        }
    }

    fn hashes(objects: &[Object]) -> Vec<String> {
        objects
            .iter()
            .map(|o| format!("{:?}{:?}", o.metadata, o.spec))
            .collect()
    }

    #[test]
    fn new_objects_are_created_projects_first_with_events() {
        let objs = objects(&[
            ("projects/web/tasks/a.yaml", &task("a", "A")),
            ("projects/web/project.yaml", PROJECT),
        ]);
        let hs = hashes(&objs);
        let plan = plan(
            &desired(&objs, &hs),
            &Current::default(),
            "main@sha1:1",
            "t1",
            ids(),
        );
        assert_eq!(plan.creates.len(), 2);
        assert_eq!(plan.creates[0].object.kind(), Kind::Project);
        assert_eq!(plan.creates[1].project_id, Some(plan.creates[0].id));
        assert_eq!(plan.creates[1].generation, 1);
        let types: Vec<&str> = plan.events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["project.created", "task.created"]);
        assert!(plan.cursor.is_some());
    }

    fn synced(objs: &[Object], hs: &[String]) -> Current {
        let mut current = Current::default();
        let p = plan(&desired(objs, hs), &current, "main@sha1:1", "t1", ids());
        apply_to_current(&mut current, &p);
        current
    }

    #[test]
    fn same_revision_again_plans_nothing() {
        let objs = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "A")),
        ]);
        let hs = hashes(&objs);
        let current = synced(&objs, &hs);
        let again = plan(&desired(&objs, &hs), &current, "main@sha1:1", "t1", ids());
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn new_revision_without_spec_change_only_moves_the_cursor() {
        let objs = objects(&[("projects/web/project.yaml", PROJECT)]);
        let hs = hashes(&objs);
        let current = synced(&objs, &hs);
        let next = plan(&desired(&objs, &hs), &current, "main@sha1:2", "t2", ids());
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
        let h1 = hashes(&v1);
        let current = synced(&v1, &h1);
        let v2 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "Changed")),
        ]);
        let h2 = hashes(&v2);
        let p = plan(&desired(&v2, &h2), &current, "main@sha1:2", "t2", ids());
        assert_eq!(p.updates.len(), 1);
        assert_eq!(p.updates[0].generation, 2);
        assert_eq!(p.events[0].event_type, "task.updated");
    }

    #[test]
    fn renamed_file_moves_without_new_generation() {
        let v1 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "A")),
        ]);
        let h1 = hashes(&v1);
        let current = synced(&v1, &h1);
        let v2 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/renamed.yaml", &task("a", "A")),
        ]);
        let h2 = hashes(&v2);
        let p = plan(&desired(&v2, &h2), &current, "main@sha1:2", "t2", ids());
        assert_eq!(p.updates.len(), 1);
        assert_eq!(p.updates[0].generation, 1);
        assert_eq!(p.events[0].event_type, "task.moved");
        assert!(p.prunes.is_empty());
    }

    #[test]
    fn removed_object_is_pruned_then_revived() {
        let v1 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "A")),
        ]);
        let h1 = hashes(&v1);
        let mut current = synced(&v1, &h1);
        let v2 = objects(&[("projects/web/project.yaml", PROJECT)]);
        let h2 = hashes(&v2);
        let p = plan(&desired(&v2, &h2), &current, "main@sha1:2", "t2", ids());
        assert_eq!(p.prunes.len(), 1);
        assert_eq!(p.events[0].event_type, "task.pruned");
        apply_to_current(&mut current, &p);

        let p = plan(&desired(&v1, &h1), &current, "main@sha1:3", "t3", ids());
        assert_eq!(p.updates.len(), 1);
        assert!(p.updates[0].revive);
        assert_eq!(p.updates[0].generation, 2);
        assert_eq!(p.events[0].event_type, "task.revived");
    }

    #[test]
    fn broken_file_keeps_its_objects_and_flags_them_once() {
        let v1 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "A")),
        ]);
        let h1 = hashes(&v1);
        let mut current = synced(&v1, &h1);

        let v2 = objects(&[("projects/web/project.yaml", PROJECT)]);
        let h2 = hashes(&v2);
        let mut d = desired(&v2, &h2);
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
        let types: Vec<&str> = p.events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["task.invalid", "source.invalid"]);
        apply_to_current(&mut current, &p);

        let p = plan(&d, &current, "main@sha1:3", "t3", ids());
        assert_eq!(p.object_writes(), 0, "{p:?}");
        assert!(p.events.is_empty());

        // Fixed back to exactly the last good version: the message is cleared.
        let p = plan(&desired(&v1, &h1), &current, "main@sha1:4", "t4", ids());
        assert_eq!(p.updates.len(), 1);
        assert_eq!(p.updates[0].generation, 1);
        assert_eq!(p.events[0].event_type, "task.recovered");
    }

    #[test]
    fn invalid_new_version_keeps_the_row_and_is_flagged() {
        let v1 = objects(&[
            ("projects/web/project.yaml", PROJECT),
            ("projects/web/tasks/a.yaml", &task("a", "A")),
        ]);
        let h1 = hashes(&v1);
        let current = synced(&v1, &h1);
        let mut d = desired(&v1[..1], &h1[..1]);
        d.invalid.push(&v1[1]);
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
        let hs = hashes(&objs);
        let p = plan(&desired(&objs, &hs), &Current::default(), "r", "t", ids());
        assert!(p.creates.is_empty());
    }
}
