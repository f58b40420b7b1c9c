//! Deciding a sync step from the index of parsed files: the whole repository validated and
//! planned ([`decide`]), or, for the common edit, only the files it touched
//! ([`decide_touched`]). Pure: the syncer (`sync.rs`) reads Git and fills the index, the store
//! applies the plan.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use agentops_specs::{Diagnostic, KeyRef, ObjectKey, Skeleton, validate_with_known};
use git2::Oid;

use super::claims::Conflicts;
use super::plan::{self, Current, Desired, SpecHash};

/// One parsed spec file.
#[derive(Debug)]
pub(super) struct FileEntry {
    pub(super) blob: Oid,
    /// The skeletons of the file's objects with their spec hashes; empty while the file is
    /// broken.
    pub(super) objects: Vec<(Skeleton, SpecHash)>,
    pub(super) errors: Vec<Diagnostic>,
    /// While broken: the objects of its last good version, which stay in effect.
    pub(super) last_good: Vec<ObjectKey>,
}

/// What of a file can change the verdict of validation on other objects: the objects it
/// declares and what they depend on. `None` while the file is broken.
pub(super) type Shape = Option<Vec<(ObjectKey, Vec<Box<str>>)>>;

impl FileEntry {
    pub(super) fn shape(&self) -> Shape {
        self.errors.is_empty().then(|| {
            self.objects
                .iter()
                .map(|(o, _)| {
                    let deps = o.depends_on.iter().map(|(dep, _)| dep.clone()).collect();
                    (o.key.clone(), deps)
                })
                .collect()
        })
    }
}

/// A file a step parsed or removed.
#[derive(Debug)]
pub(super) struct Touched {
    pub(super) path: Arc<str>,
    /// Its shape before the step; `None` when it is new.
    pub(super) before: Option<Shape>,
}

#[derive(Debug, Default)]
pub(super) struct Index {
    pub(super) tree: Option<Oid>,
    pub(super) files: HashMap<Arc<str>, FileEntry>,
}

impl Index {
    /// The keys of every object the index declares: those of good files, and the last good
    /// ones of broken files, which stay in effect.
    pub(super) fn declared_keys(&self) -> HashSet<ObjectKey> {
        self.files
            .values()
            .flat_map(|f| {
                let good = f.objects.iter().map(|(o, _)| o.key.clone());
                let kept = f.last_good.iter().cloned();
                good.chain(kept)
            })
            .collect()
    }
}

/// What a changed path means for the index, before anything is parsed.
#[derive(Debug)]
pub(super) enum Change {
    /// The path holds the blob the index already parsed.
    Unchanged,
    /// The file went away; its entry is gone from the index.
    Removed(Touched),
    /// The blob must be parsed and [`record`]ed under this path.
    Parse(Arc<str>, Oid, Touched),
}

impl Index {
    /// Take note of a path of the tree that changed: its new blob, or `None` when it went away.
    pub(super) fn change(&mut self, path: String, blob: Option<Oid>) -> Change {
        match blob {
            None => match self.files.remove_entry(path.as_str()) {
                Some((path, old)) => Change::Removed(Touched {
                    path,
                    before: Some(old.shape()),
                }),
                None => Change::Unchanged,
            },
            Some(blob) => {
                let old = self.files.get_key_value(path.as_str());
                if old.is_some_and(|(_, f)| f.blob == blob) {
                    return Change::Unchanged;
                }
                // The index's own path is reused so that every skeleton of a file shares it.
                let key = old.map_or_else(|| path.into(), |(key, _)| key.clone());
                let before = old.map(|(_, f)| f.shape());
                Change::Parse(key.clone(), blob, Touched { path: key, before })
            }
        }
    }
}

/// Put a file's parse into the index. A broken file remembers the objects of its last good
/// version, which stay in effect.
pub(super) fn record(
    files: &mut HashMap<Arc<str>, FileEntry>,
    path: Arc<str>,
    blob: Oid,
    objects: Vec<(Skeleton, SpecHash)>,
    errors: Vec<Diagnostic>,
) {
    let previous = files.remove(&path);
    let last_good = match previous {
        _ if errors.is_empty() => Vec::new(),
        None => Vec::new(),
        Some(previous) if previous.errors.is_empty() => {
            previous.objects.into_iter().map(|(o, _)| o.key).collect()
        }
        Some(previous) => previous.last_good,
    };
    files.insert(
        path,
        FileEntry {
            blob,
            objects,
            errors,
            last_good,
        },
    );
}

/// Build the desired state from the whole index, validate it, and plan against the current
/// state. Also returns the objects found invalid.
pub(super) fn decide<'a>(
    index: &'a Index,
    current: &Current,
    revision: &str,
    tree: &str,
) -> (plan::Plan<'a>, HashSet<ObjectKey>) {
    decide_with(index, current, revision, tree, &Conflicts::default())
}

/// [`decide`], with the objects other sources declare too refused (with the error that
/// says so), so that neither source overwrites the other's row.
pub(super) fn decide_with<'a>(
    index: &'a Index,
    current: &Current,
    revision: &str,
    tree: &str,
    conflicts: &Conflicts,
) -> (plan::Plan<'a>, HashSet<ObjectKey>) {
    let mut objects: Vec<&'a Skeleton> = Vec::with_capacity(index.files.len());
    let mut hashes: Vec<SpecHash> = Vec::with_capacity(index.files.len());
    let mut desired = Desired::default();
    let mut known: HashSet<KeyRef<'_>> = HashSet::new();
    // In path order, which is also roughly the order of the blobs in a pack: the objects
    // written are read again in this order, and reading a pack in order is several times
    // faster than jumping about in it.
    let mut files: Vec<_> = index.files.iter().collect();
    files.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (path, file) in files {
        desired.diagnostics.extend(file.errors.iter().cloned());
        if file.errors.is_empty() {
            for (object, hash) in &file.objects {
                objects.push(object);
                hashes.push(*hash);
            }
        } else {
            desired.broken_paths.insert(&**path);
            known.extend(file.last_good.iter().map(ObjectKey::as_key_ref));
        }
    }
    if !desired.broken_paths.is_empty() {
        // What the store holds from a broken file stays in effect, so it can be referred to.
        known.extend(
            current
                .objects
                .iter()
                .filter(|(_, row)| {
                    !row.pruned
                        && row
                            .path
                            .as_deref()
                            .is_some_and(|p| desired.broken_paths.contains(p))
                })
                .map(|(key, _)| key.as_key_ref()),
        );
    }
    if !conflicts.is_empty() {
        let mut kept = Vec::with_capacity(objects.len());
        let mut kept_hashes = Vec::with_capacity(objects.len());
        for (object, hash) in objects.into_iter().zip(hashes) {
            match conflicts.message(&object.key) {
                Some(message) => {
                    desired
                        .diagnostics
                        .push(Diagnostic::new(&*object.path, object.name, message));
                    desired.invalid.push(object);
                }
                None => {
                    kept.push(object);
                    kept_hashes.push(hash);
                }
            }
        }
        objects = kept;
        hashes = kept_hashes;
    }
    let validation = validate_with_known(&objects, &known);
    desired.diagnostics.extend(validation.diagnostics);
    desired.objects.reserve(objects.len());
    for (i, object) in objects.into_iter().enumerate() {
        if validation.invalid[i] {
            desired.invalid.push(object);
        } else {
            desired.objects.push((object, hashes[i]));
        }
    }
    let invalid = desired.invalid.iter().map(|o| o.key.clone()).collect();
    (
        plan::plan(&desired, current, revision, tree, uuid::Uuid::new_v4),
        invalid,
    )
}

/// The common edit, decided without looking at the rest of the repository: files whose
/// objects keep their names and dependencies, none of which was invalid. Validation would
/// reach the same verdict as last time for every object, so only the touched objects need
/// planning, against their own rows. `None` when the step changes more than that.
pub(super) fn decide_touched<'a>(
    index: &'a Index,
    touched: &[Touched],
    invalid: &HashSet<ObjectKey>,
    conflicts: &Conflicts,
    current: &Current,
    revision: &str,
    tree: &str,
) -> Option<plan::Plan<'a>> {
    let cursor = current.cursor.as_ref()?;
    let mut desired = Desired {
        diagnostics: cursor.errors.clone(),
        ..Desired::default()
    };
    let mut scope = Current {
        objects: HashMap::new(),
        cursor: Some(cursor.clone()),
    };
    let mut projects = HashSet::new();
    for t in touched {
        let file = index.files.get(&t.path)?;
        let before = t.before.as_ref()?.as_ref()?;
        if file.shape().as_ref() != Some(before) {
            return None;
        }
        for (object, hash) in &file.objects {
            let key = &object.key;
            if invalid.contains(key) || conflicts.message(key).is_some() {
                return None;
            }
            let row = current.objects.get(key)?;
            scope.objects.insert(key.clone(), row.clone());
            desired.objects.push((object, *hash));
            if let ObjectKey::Task { project, .. } = key {
                projects.insert(ObjectKey::Project(project.clone()));
            }
        }
    }
    // A task's row needs its project's: bring the (unchanged) project into scope as declared,
    // so the plan resolves the id and sees nothing to write for it.
    for project in projects {
        if scope.objects.contains_key(&project) {
            continue;
        }
        if invalid.contains(&project) {
            return None;
        }
        let row = current.objects.get(&project)?;
        let file = index.files.get(row.path.as_deref()?)?;
        let (object, hash) = file.objects.iter().find(|(o, _)| o.key == project)?;
        scope.objects.insert(project, row.clone());
        desired.objects.push((object, *hash));
    }
    Some(plan::plan(
        &desired,
        &scope,
        revision,
        tree,
        uuid::Uuid::new_v4,
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use agentops_specs::parse_file;
    use git2::ObjectType;
    use proptest::prelude::*;

    use super::*;

    const PROJECTS: usize = 2;
    const TASKS: usize = 6;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum State {
        Present,
        Broken,
        Absent,
    }

    #[derive(Debug, Clone)]
    struct TaskModel {
        title: u8,
        priority: u8,
        depends_on: BTreeSet<usize>,
        state: State,
    }

    /// Projects and tasks, one object per file, as the test edits them. Task `i` belongs to
    /// project `i % PROJECTS` and may depend on any task of its project, itself included, so
    /// that edits can make and break cycles.
    #[derive(Debug, Clone)]
    struct Repo {
        project_titles: [u8; PROJECTS],
        tasks: Vec<TaskModel>,
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Retitle { task: usize, title: u8 },
        Reprioritise { task: usize, priority: u8 },
        RetitleProject { project: usize, title: u8 },
        Depend { task: usize, on: usize },
        Undepend { task: usize },
        Break { task: usize },
        Remove { task: usize },
        Restore { task: usize },
    }

    impl Edit {
        /// Whether the edit keeps every object's name and dependencies, which is the edit the
        /// incremental path exists for.
        fn keeps_shape(&self) -> bool {
            matches!(
                self,
                Edit::Retitle { .. } | Edit::Reprioritise { .. } | Edit::RetitleProject { .. }
            )
        }
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let task = 0..TASKS;
        prop_oneof![
            4 => (task.clone(), any::<u8>()).prop_map(|(task, title)| Edit::Retitle { task, title }),
            2 => (task.clone(), 0u8..=100).prop_map(|(task, priority)| Edit::Reprioritise { task, priority }),
            2 => (0..PROJECTS, any::<u8>()).prop_map(|(project, title)| Edit::RetitleProject { project, title }),
            1 => (task.clone(), 0..TASKS / PROJECTS).prop_map(|(task, n)| Edit::Depend { task, on: task % PROJECTS + n * PROJECTS }),
            1 => task.clone().prop_map(|task| Edit::Undepend { task }),
            1 => task.clone().prop_map(|task| Edit::Break { task }),
            1 => task.clone().prop_map(|task| Edit::Remove { task }),
            1 => task.prop_map(|task| Edit::Restore { task }),
        ]
    }

    impl Repo {
        fn new() -> Repo {
            Repo {
                project_titles: [0; PROJECTS],
                tasks: (0..TASKS)
                    .map(|i| TaskModel {
                        title: 0,
                        priority: 50,
                        // A chain within each project.
                        depends_on: i.checked_sub(PROJECTS).into_iter().collect(),
                        state: State::Present,
                    })
                    .collect(),
            }
        }

        fn apply(&mut self, edit: &Edit) {
            match *edit {
                Edit::Retitle { task, title } => self.tasks[task].title = title,
                Edit::Reprioritise { task, priority } => self.tasks[task].priority = priority,
                Edit::RetitleProject { project, title } => self.project_titles[project] = title,
                Edit::Depend { task, on } => {
                    self.tasks[task].depends_on.insert(on);
                }
                Edit::Undepend { task } => self.tasks[task].depends_on.clear(),
                Edit::Break { task } => self.tasks[task].state = State::Broken,
                Edit::Remove { task } => self.tasks[task].state = State::Absent,
                Edit::Restore { task } => self.tasks[task].state = State::Present,
            }
        }

        fn files(&self) -> BTreeMap<String, String> {
            let mut files = BTreeMap::new();
            for (p, title) in self.project_titles.iter().enumerate() {
                files.insert(
                    format!("projects/p{p}/project.yaml"),
                    format!(
                        "apiVersion: agentops.dev/v1alpha1\nkind: Project\nmetadata: {{name: p{p}}}\nspec: {{title: Project {title}}}\n"
                    ),
                );
            }
            for (i, task) in self.tasks.iter().enumerate() {
                let path = format!("projects/p{}/tasks/t{i}.yaml", i % PROJECTS);
                let deps: Vec<String> = task.depends_on.iter().map(|d| format!("t{d}")).collect();
                let text = match task.state {
                    State::Absent => continue,
                    State::Broken => format!(
                        "apiVersion: agentops.dev/v1alpha1\nkind: Task\nmetadata: {{name: t{i}}}\nspec: {{title: [unclosed\n"
                    ),
                    State::Present => format!(
                        "apiVersion: agentops.dev/v1alpha1\nkind: Task\nmetadata: {{name: t{i}}}\nspec:\n  title: Task {}\n  priority: {}\n  dependsOn: [{}]\n  action: {{prompt: go}}\n",
                        task.title,
                        task.priority,
                        deps.join(", ")
                    ),
                };
                files.insert(path, text);
            }
            files
        }
    }

    /// Bring the index from the files of `before` to those of `after`, as a sync step reading
    /// the tree diff would.
    fn step(
        index: &mut Index,
        before: &BTreeMap<String, String>,
        after: &BTreeMap<String, String>,
    ) -> Vec<Touched> {
        let mut touched = Vec::new();
        let paths: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
        for path in paths {
            if before.get(path) == after.get(path) {
                continue;
            }
            let blob = after
                .get(path)
                .map(|text| Oid::hash_object(ObjectType::Blob, text.as_bytes()).unwrap());
            match index.change(path.clone(), blob) {
                Change::Unchanged => {}
                Change::Removed(gone) => touched.push(gone),
                Change::Parse(path, blob, before) => {
                    let parsed = parse_file(&path, after[&*path].as_bytes());
                    let objects = parsed
                        .objects
                        .iter()
                        .map(|o| (o.skeleton(Arc::clone(&path)), SpecHash::of(o)))
                        .collect();
                    record(&mut index.files, path, blob, objects, parsed.errors);
                    touched.push(before);
                }
            }
        }
        touched
    }

    /// A plan as the store would apply it, in an order of its own: the two paths may list the
    /// same writes in different orders. Ids of created rows are random, so creates show
    /// without them.
    fn summary(plan: &plan::Plan<'_>) -> Vec<String> {
        let mut lines = vec![format!(
            "revision {} cursor {:?}",
            plan.revision, plan.cursor
        )];
        lines.extend(plan.creates.iter().map(|w| {
            format!(
                "create {:?} at {} hash {:?} generation {} revive {}",
                w.object.key, w.object.path, w.spec_hash, w.generation, w.revive
            )
        }));
        lines.extend(plan.updates.iter().map(|w| {
            format!(
                "update {} {:?} at {} hash {:?} generation {} project {:?} revive {}",
                w.id,
                w.object.key,
                w.object.path,
                w.spec_hash,
                w.generation,
                w.project_id,
                w.revive
            )
        }));
        lines.extend(plan.prunes.iter().map(|p| format!("{p:?}")));
        lines.extend(plan.flags.iter().map(|f| format!("{f:?}")));
        lines.extend(plan.events.iter().map(|e| format!("{e:?}")));
        lines[1..].sort();
        lines
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// On any sequence of edits, whenever the incremental path decides, it decides what
        /// the full pass over the repository decides, and it does decide the common edit.
        #[test]
        fn the_incremental_decision_equals_the_full_one(edits in prop::collection::vec(edit(), 1..24)) {
            let mut repo = Repo::new();
            let mut files = repo.files();
            let mut index = Index::default();
            let mut current = Current::default();
            step(&mut index, &BTreeMap::new(), &files);
            let (first, mut invalid) = decide(&index, &current, "r0", "t0");
            plan::apply_to_current(&mut current, first);

            for (n, edit) in edits.iter().enumerate() {
                let (revision, tree) = (format!("r{}", n + 1), format!("t{}", n + 1));
                let all_valid_before = invalid.is_empty()
                    && repo.tasks.iter().all(|t| t.state == State::Present);
                repo.apply(edit);
                let next = repo.files();
                let touched = step(&mut index, &files, &next);
                files = next;
                if touched.is_empty() {
                    continue;
                }

                let (full, full_invalid) = decide(&index, &current, &revision, &tree);
                let incremental = decide_touched(&index, &touched, &invalid, &Conflicts::default(), &current, &revision, &tree);
                match incremental {
                    Some(incremental) => {
                        prop_assert_eq!(summary(&incremental), summary(&full), "after {:?}", edit);
                        prop_assert_eq!(&full_invalid, &invalid, "after {:?}", edit);
                        plan::apply_to_current(&mut current, incremental);
                    }
                    None => {
                        prop_assert!(
                            !(edit.keeps_shape() && all_valid_before),
                            "{:?} of a valid repository keeps every name and dependency, yet \
                             the incremental path declined it",
                            edit
                        );
                        invalid = full_invalid;
                        plan::apply_to_current(&mut current, full);
                    }
                }
            }
        }
    }
}
