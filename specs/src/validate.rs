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

    // Each member of a cycle is told at its own entry, so that every file of the cycle is
    // marked (a hook checking one file of it must fail too), and the path it reads starts
    // with the task in front of it.
    for entry in cycle_entries(&order, &edges) {
        let at = entry.members[0];
        let at_project = match objects[at].key_ref() {
            KeyRef::Task { project, .. } => project,
            _ => "",
        };
        let label = |i: usize| match objects[i].key_ref() {
            KeyRef::Task { project, name } if project == at_project => name.to_owned(),
            KeyRef::Task { project, name } => format!("{project}/{name}"),
            other => other.to_string(),
        };
        v.report(
            &objects[at],
            entry.at,
            format!("dependency cycle: {}", cycle_path(&entry.members, label)),
            &entry.members,
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

/// A cycle's members, the first repeated at the end, joined by arrows. A cycle of more than
/// [`CYCLE_SHOWN`] tasks shows its first ones and how many more there are: one such message
/// per member would otherwise grow with the square of the cycle's length.
fn cycle_path(members: &[usize], label: impl Fn(usize) -> String) -> String {
    let mut parts: Vec<String> = members
        .iter()
        .take(CYCLE_SHOWN)
        .map(|&i| label(i))
        .collect();
    if members.len() > CYCLE_SHOWN {
        parts.push(format!("… {} more", members.len() - CYCLE_SHOWN));
    }
    parts.push(label(members[0]));
    parts.join(" → ")
}

const CYCLE_SHOWN: usize = 12;

/// A `dependsOn` entry that leads into a dependency cycle.
#[derive(Debug, PartialEq)]
struct CycleEntry {
    /// The entry's position in the task `members[0]` declares.
    at: Pos,
    /// The shortest cycle through the entry, from the task that declares it: each member
    /// depends on the next, the last on the first.
    members: Vec<usize>,
}

/// Every entry of the graph that lies on a cycle, each with the shortest cycle through it,
/// in `order` of the declaring tasks and then of their entries. An entry lies on a cycle
/// exactly when it stays inside a strongly connected component; the shortest way back is a
/// breadth-first search inside that component.
fn cycle_entries(order: &[usize], edges: &[Vec<(usize, Pos)>]) -> Vec<CycleEntry> {
    const NONE: usize = usize::MAX;
    let component = components(order, edges);
    let mut entries = Vec::new();
    let mut seen = vec![NONE; edges.len()];
    let mut parent = vec![NONE; edges.len()];
    let mut queue = std::collections::VecDeque::new();
    let mut search = 0;
    for &from in order {
        for &(to, at) in &edges[from] {
            if to == from || component[to] != component[from] || component[from] == NONE {
                continue;
            }
            search += 1;
            queue.clear();
            queue.push_back(to);
            seen[to] = search;
            while let Some(node) = queue.pop_front() {
                if node == from {
                    break;
                }
                for &(next, _) in &edges[node] {
                    if component[next] == component[from] && seen[next] != search {
                        seen[next] = search;
                        parent[next] = node;
                        queue.push_back(next);
                    }
                }
            }
            if seen[from] != search {
                continue;
            }
            // Back from `from` to `to` along the search, then reversed.
            let mut back = Vec::new();
            let mut node = from;
            while node != to && back.len() < edges.len() {
                node = parent[node];
                back.push(node);
            }
            back.reverse();
            let mut members = Vec::with_capacity(back.len() + 1);
            members.push(from);
            members.extend(back);
            entries.push(CycleEntry { at, members });
        }
    }
    entries
}

/// The strongly connected component of every node reached from `order`, by Tarjan's
/// algorithm; iterative, so a long chain cannot overflow the stack. `usize::MAX` for nodes
/// not reached.
fn components(order: &[usize], edges: &[Vec<(usize, Pos)>]) -> Vec<usize> {
    const NONE: usize = usize::MAX;
    let n = edges.len();
    let mut index = vec![NONE; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut component = vec![NONE; n];
    let mut stack: Vec<usize> = Vec::new();
    let mut next_index = 0;
    let mut next_component = 0;
    for &root in order {
        if index[root] != NONE {
            continue;
        }
        index[root] = next_index;
        low[root] = next_index;
        next_index += 1;
        stack.push(root);
        on_stack[root] = true;
        // (node, index of the next edge to follow)
        let mut calls: Vec<(usize, usize)> = vec![(root, 0)];
        while let Some(&mut (node, ref mut next)) = calls.last_mut() {
            if let Some(&(to, _)) = edges[node].get(*next) {
                *next += 1;
                if index[to] == NONE {
                    index[to] = next_index;
                    low[to] = next_index;
                    next_index += 1;
                    stack.push(to);
                    on_stack[to] = true;
                    calls.push((to, 0));
                } else if on_stack[to] {
                    low[node] = low[node].min(index[to]);
                }
                continue;
            }
            calls.pop();
            if let Some(&(caller, _)) = calls.last() {
                low[caller] = low[caller].min(low[node]);
            }
            if low[node] == index[node] {
                while let Some(member) = stack.pop() {
                    on_stack[member] = false;
                    component[member] = next_component;
                    if member == node {
                        break;
                    }
                }
                next_component += 1;
            }
        }
    }
    component
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(n: usize, edges: &[(usize, usize)]) -> Vec<Vec<(usize, Pos)>> {
        let mut graph = vec![Vec::new(); n];
        for (k, &(from, to)) in edges.iter().enumerate() {
            let line = u32::try_from(k).unwrap() + 1;
            graph[from].push((to, Pos { line, column: 1 }));
        }
        graph
    }

    fn cycles(n: usize, edges: &[(usize, usize)]) -> Vec<(u32, Vec<usize>)> {
        let order: Vec<usize> = (0..n).collect();
        cycle_entries(&order, &graph(n, edges))
            .into_iter()
            .map(|e| (e.at.line, e.members))
            .collect()
    }

    #[test]
    fn every_member_of_a_cycle_gets_the_cycle_from_itself() {
        assert_eq!(
            cycles(2, &[(0, 1), (1, 0)]),
            [(1, vec![0, 1]), (2, vec![1, 0])]
        );
        assert_eq!(
            cycles(4, &[(0, 1), (1, 2), (2, 0), (3, 0)]),
            [(1, vec![0, 1, 2]), (2, vec![1, 2, 0]), (3, vec![2, 0, 1])],
            "3 depends on the cycle without being on it"
        );
    }

    #[test]
    fn a_task_on_two_cycles_is_told_at_both_entries() {
        // 0 → 1 → 0 and 0 → 2 → 0: both of 0's entries lead into a cycle.
        assert_eq!(
            cycles(3, &[(0, 1), (0, 2), (1, 0), (2, 0)]),
            [
                (1, vec![0, 1]),
                (2, vec![0, 2]),
                (3, vec![1, 0]),
                (4, vec![2, 0])
            ]
        );
        // A shortcut: 3 reaches 1 directly, and the way back from 1 is the shortest.
        assert_eq!(
            cycles(4, &[(0, 1), (1, 2), (2, 3), (3, 0), (3, 1)]),
            [
                (1, vec![0, 1, 2, 3]),
                (2, vec![1, 2, 3]),
                (3, vec![2, 3, 1]),
                (4, vec![3, 0, 1, 2]),
                (5, vec![3, 1, 2])
            ]
        );
    }

    #[test]
    fn no_cycle_no_entries() {
        assert!(cycles(4, &[(0, 1), (1, 2), (0, 2), (3, 2)]).is_empty());
        assert!(cycles(0, &[]).is_empty());
    }

    #[test]
    fn a_long_cycle_is_named_by_its_first_tasks() {
        let members: Vec<usize> = (0..20).collect();
        let path = cycle_path(&members, |i| format!("t{i}"));
        assert_eq!(
            path,
            "t0 → t1 → t2 → t3 → t4 → t5 → t6 → t7 → t8 → t9 → t10 → t11 → … 8 more → t0"
        );
        assert_eq!(cycle_path(&[3, 4], |i| format!("t{i}")), "t3 → t4 → t3");
    }
}
