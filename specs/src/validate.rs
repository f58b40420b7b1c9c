//! Checks across objects: duplicate names, references to projects and tasks, and dependency
//! cycles. Each problem is reported at the field that causes it and marks the objects it
//! concerns as invalid, so the reconciler can keep their last good version and apply the rest.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};

use crate::diagnostic::Diagnostic;
use crate::model::{Object, ObjectKey, Pos, Spec, TaskSpec};

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
        self.depends_on.iter().map(|dep| match dep.split_once('/') {
            Some((project, task)) => (project, task),
            None => (self.project.as_str(), dep.as_str()),
        })
    }
}

pub fn validate<O: Borrow<Object>>(objects: &[O]) -> Validation {
    validate_with_known(objects, &HashSet::new())
}

/// [`validate`], where `known` names objects that exist although they are not in `objects`:
/// those kept at their last good version because their file is broken now. References to
/// them are satisfied, so one broken file does not cascade into errors in its neighbours.
pub fn validate_with_known<O: Borrow<Object>>(
    objects: &[O],
    known: &HashSet<ObjectKey>,
) -> Validation {
    let objects: Vec<&Object> = objects.iter().map(Borrow::borrow).collect();
    let objects = objects.as_slice();
    let mut v = Validation {
        diagnostics: Vec::new(),
        invalid: vec![false; objects.len()],
    };

    // The first declaration in path order wins, so the verdict does not depend on the order
    // the caller happened to read files in.
    let mut order: Vec<usize> = (0..objects.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&objects[a].origin, &objects[b].origin);
        (&a.path, a.document).cmp(&(&b.path, b.document))
    });

    let mut first: HashMap<ObjectKey, usize> = HashMap::with_capacity(objects.len());
    for &i in &order {
        let object = &objects[i];
        match first.get(&object.key()) {
            Some(&j) => {
                let prior = &objects[j].origin;
                v.report(
                    object,
                    object.origin.name,
                    format!(
                        "duplicate {}: already declared at {}:{}:{}",
                        object.key(),
                        prior.path,
                        prior.name.line,
                        prior.name.column
                    ),
                    &[i],
                );
            }
            None => {
                first.insert(object.key(), i);
            }
        }
    }

    let tasks: HashMap<(&str, &str), usize> = first
        .iter()
        .filter_map(|(key, &i)| match key {
            ObjectKey::Task { project, name } => Some(((project.as_str(), name.as_str()), i)),
            _ => None,
        })
        .collect();

    // Edges of the dependency graph, by object index, for the tasks that survive the checks.
    let mut edges: HashMap<usize, Vec<(usize, Pos)>> = HashMap::new();
    for &i in &order {
        let Spec::Task(task) = &objects[i].spec else {
            continue;
        };
        if v.invalid[i] {
            continue;
        }
        let object = &objects[i];
        let project_key = ObjectKey::Project(task.project.clone());
        if !first.contains_key(&project_key) && !known.contains(&project_key) {
            v.report(
                object,
                object.origin.project,
                format!("task's project `{}` does not exist", task.project),
                &[i],
            );
        }
        for (n, (project, name)) in task.dependency_keys().enumerate() {
            let pos = object.origin.depends_on.get(n).copied().unwrap_or_default();
            match tasks.get(&(project, name)) {
                Some(&j) if j == i => {
                    v.report(
                        object,
                        pos,
                        format!("dependency cycle: {name} → {name}"),
                        &[i],
                    );
                }
                Some(&j) => edges.entry(i).or_default().push((j, pos)),
                None if known.contains(&ObjectKey::Task {
                    project: project.to_owned(),
                    name: name.to_owned(),
                }) => {}
                None => {
                    let what = if project == task.project {
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
        let label = |i: usize| match objects[i].key() {
            ObjectKey::Task { project, name } if project == task_project(objects[at]) => name,
            ObjectKey::Task { project, name } => format!("{project}/{name}"),
            other => other.to_string(),
        };
        let mut path: Vec<String> = cycle.members.iter().map(|&i| label(i)).collect();
        path.push(label(cycle.members[0]));
        v.report(
            objects[at],
            pos,
            format!("dependency cycle: {}", path.join(" → ")),
            &cycle.members,
        );
    }

    v.diagnostics.sort();
    v
}

fn task_project(object: &Object) -> &str {
    match &object.spec {
        Spec::Task(t) => &t.project,
        _ => "",
    }
}

impl Validation {
    fn report(&mut self, at: &Object, pos: Pos, message: String, invalid: &[usize]) {
        self.diagnostics
            .push(Diagnostic::new(&at.origin.path, pos, message));
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
fn find_cycles(order: &[usize], edges: &HashMap<usize, Vec<(usize, Pos)>>) -> Vec<Cycle> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut mark: HashMap<usize, Mark> = HashMap::new();
    let mut cycles = Vec::new();
    let none = Vec::new();

    for &root in order {
        if !edges.contains_key(&root) || mark.get(&root).copied().unwrap_or(Mark::New) != Mark::New
        {
            continue;
        }
        // (node, index of the next edge to follow)
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        mark.insert(root, Mark::OnPath);
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            let out = edges.get(&node).unwrap_or(&none);
            if let Some(&(to, pos)) = out.get(*next) {
                *next += 1;
                match mark.get(&to).copied().unwrap_or(Mark::New) {
                    Mark::New => {
                        mark.insert(to, Mark::OnPath);
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
                mark.insert(node, Mark::Done);
                stack.pop();
            }
        }
    }
    cycles
}
