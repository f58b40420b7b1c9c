//! Checks across objects: duplicate names, references to projects and tasks, and dependency
//! cycles. Each problem is reported at the field that causes it and marks the objects it
//! concerns as invalid, so the reconciler can keep their last good version and apply the rest.

use std::collections::{HashMap, HashSet};

use crate::diagnostic::Diagnostic;
use crate::model::{KeyRef, Object, Pos, Skeleton, Spec, TaskSpec};

#[derive(Debug, Default)]
pub struct Validation {
    pub diagnostics: Vec<Diagnostic>,
    /// `invalid[i]` is true when `objects[i]` must not be applied.
    pub invalid: Vec<bool>,
}

impl Validation {
    pub fn is_ok(&self) -> bool {
        self.diagnostics.is_empty()
    }
}

impl TaskSpec {
    /// `dependsOn` entries as `(project, task)`, a bare name meaning this task's project.
    pub fn dependency_keys(&self) -> impl Iterator<Item = (&str, &str)> {
        self.depends_on
            .iter()
            .map(|dep| dependency_key(&self.project, dep))
    }
}

/// A `dependsOn` entry as `(project, task)`, a bare name meaning `project`.
fn dependency_key<'a>(project: &'a str, dep: &'a str) -> (&'a str, &'a str) {
    dep.split_once('/').unwrap_or((project, dep))
}

/// What the checks across objects read of each object. A whole [`Object`] has it, and so has
/// its [`Skeleton`], which is what a controller keeps between syncs.
pub trait Declared {
    fn key_ref(&self) -> KeyRef<'_>;
    /// The file, relative to the synced root.
    fn path(&self) -> &str;
    /// Where the object's document starts.
    fn document(&self) -> Pos;
    fn name_pos(&self) -> Pos;
    /// The task's `project` field, or the document when the project came from the path.
    fn project_pos(&self) -> Pos;
    /// A task's `dependsOn` entries as written, each with its position.
    fn depends_on(&self) -> impl Iterator<Item = (&str, Pos)>;
}

impl Declared for Object {
    fn key_ref(&self) -> KeyRef<'_> {
        match &self.spec {
            Spec::Project(_) => KeyRef::Project(self.name()),
            Spec::Task(t) => KeyRef::Task {
                project: &t.project,
                name: self.name(),
            },
            Spec::Agent(_) => KeyRef::Agent(self.name()),
            Spec::Tool(_) => KeyRef::Tool(self.name()),
        }
    }

    fn path(&self) -> &str {
        &self.origin.path
    }

    fn document(&self) -> Pos {
        self.origin.document
    }

    fn name_pos(&self) -> Pos {
        self.origin.name
    }

    fn project_pos(&self) -> Pos {
        self.origin.project
    }

    fn depends_on(&self) -> impl Iterator<Item = (&str, Pos)> {
        let deps = match &self.spec {
            Spec::Task(t) => t.depends_on.as_slice(),
            _ => &[],
        };
        deps.iter().enumerate().map(|(n, dep)| {
            let pos = self.origin.depends_on.get(n).copied().unwrap_or_default();
            (dep.as_str(), pos)
        })
    }
}

impl Declared for Skeleton {
    fn key_ref(&self) -> KeyRef<'_> {
        self.key.as_key_ref()
    }

    fn path(&self) -> &str {
        &self.path
    }

    fn document(&self) -> Pos {
        self.document
    }

    fn name_pos(&self) -> Pos {
        self.name
    }

    fn project_pos(&self) -> Pos {
        self.project
    }

    fn depends_on(&self) -> impl Iterator<Item = (&str, Pos)> {
        self.depends_on.iter().map(|(dep, pos)| (&**dep, *pos))
    }
}

impl<T: Declared + ?Sized> Declared for &T {
    fn key_ref(&self) -> KeyRef<'_> {
        (**self).key_ref()
    }

    fn path(&self) -> &str {
        (**self).path()
    }

    fn document(&self) -> Pos {
        (**self).document()
    }

    fn name_pos(&self) -> Pos {
        (**self).name_pos()
    }

    fn project_pos(&self) -> Pos {
        (**self).project_pos()
    }

    fn depends_on(&self) -> impl Iterator<Item = (&str, Pos)> {
        (**self).depends_on()
    }
}

pub fn validate<D: Declared>(objects: &[D]) -> Validation {
    validate_with_known(objects, &HashSet::new())
}

/// [`validate`], where `known` names objects that exist although they are not in `objects`:
/// those kept at their last good version because their file is broken now. References to
/// them are satisfied, so one broken file does not cascade into errors in its neighbours.
pub fn validate_with_known<D: Declared>(objects: &[D], known: &HashSet<KeyRef<'_>>) -> Validation {
    let mut v = Validation {
        diagnostics: Vec::new(),
        invalid: vec![false; objects.len()],
    };

    // The first declaration in path order wins, so the verdict does not depend on the order
    // the caller happened to read files in.
    let mut order: Vec<usize> = (0..objects.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&objects[a], &objects[b]);
        (a.path(), a.document()).cmp(&(b.path(), b.document()))
    });

    let mut first: HashMap<KeyRef<'_>, usize> = HashMap::with_capacity(objects.len());
    for &i in &order {
        let object = &objects[i];
        let key = object.key_ref();
        match first.get(&key) {
            Some(&j) => {
                let prior = &objects[j];
                let at = prior.name_pos();
                v.report(
                    object,
                    object.name_pos(),
                    format!(
                        "duplicate {key}: already declared at {}:{}:{}",
                        prior.path(),
                        at.line,
                        at.column
                    ),
                    &[i],
                );
            }
            None => {
                first.insert(key, i);
            }
        }
    }

    // Edges of the dependency graph, by object index, for the tasks that survive the checks.
    let mut edges: Vec<Vec<(usize, Pos)>> = vec![Vec::new(); objects.len()];
    for &i in &order {
        let object = &objects[i];
        let KeyRef::Task {
            project: task_project,
            ..
        } = object.key_ref()
        else {
            continue;
        };
        if v.invalid[i] {
            continue;
        }
        let project_key = KeyRef::Project(task_project);
        if !first.contains_key(&project_key) && !known.contains(&project_key) {
            v.report(
                object,
                object.project_pos(),
                format!("task's project `{task_project}` does not exist"),
                &[i],
            );
        }
        for (dep, pos) in object.depends_on() {
            let (project, name) = dependency_key(task_project, dep);
            let key = KeyRef::Task { project, name };
            match first.get(&key) {
                Some(&j) if j == i => {
                    v.report(
                        object,
                        pos,
                        format!("dependency cycle: {name} → {name}"),
                        &[i],
                    );
                }
                Some(&j) => edges[i].push((j, pos)),
                None if known.contains(&key) => {}
                None => {
                    let what = if project == task_project {
                        format!("`{name}`")
                    } else {
                        format!("`{project}/{name}`")
                    };
                    v.report(
                        object,
                        pos,
                        format!("dependsOn names task {what}, which does not exist"),
                        &[i],
                    );
                }
            }
        }
    }

    for cycle in find_cycles(&order, &edges) {
        let (at, pos) = cycle.closing;
        let at_project = match objects[at].key_ref() {
            KeyRef::Task { project, .. } => project,
            _ => "",
        };
        let label = |i: usize| match objects[i].key_ref() {
            KeyRef::Task { project, name } if project == at_project => name.to_owned(),
            KeyRef::Task { project, name } => format!("{project}/{name}"),
            other => other.to_string(),
        };
        let mut path: Vec<String> = cycle.members.iter().map(|&i| label(i)).collect();
        path.push(label(cycle.members[0]));
        v.report(
            &objects[at],
            pos,
            format!("dependency cycle: {}", path.join(" → ")),
            &cycle.members,
        );
    }

    v.diagnostics.sort();
    v
}

impl Validation {
    fn report(&mut self, at: &impl Declared, pos: Pos, message: String, invalid: &[usize]) {
        self.diagnostics
            .push(Diagnostic::new(at.path(), pos, message));
        for &i in invalid {
            self.invalid[i] = true;
        }
    }
}

struct Cycle {
    /// In dependency order: each member depends on the next, the last on the first.
    members: Vec<usize>,
    /// The task and `dependsOn` entry that close the cycle: where the error is reported.
    closing: (usize, Pos),
}

/// Every dependency cycle reachable by depth-first search, each reported once at the edge that
/// closes it. Iterative, so a long chain cannot overflow the stack.
fn find_cycles(order: &[usize], edges: &[Vec<(usize, Pos)>]) -> Vec<Cycle> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::New; edges.len()];
    let mut cycles = Vec::new();

    for &root in order {
        if edges[root].is_empty() || mark[root] != Mark::New {
            continue;
        }
        // (node, index of the next edge to follow)
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = Mark::OnPath;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&(to, pos)) = edges[node].get(*next) {
                *next += 1;
                match mark[to] {
                    Mark::New => {
                        mark[to] = Mark::OnPath;
                        stack.push((to, 0));
                    }
                    Mark::OnPath => {
                        let start = stack.iter().position(|&(n, _)| n == to).unwrap_or(0);
                        cycles.push(Cycle {
                            members: stack[start..].iter().map(|&(n, _)| n).collect(),
                            closing: (node, pos),
                        });
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    cycles
}
