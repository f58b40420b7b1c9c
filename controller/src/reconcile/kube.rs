//! The sync of the Kubernetes source: each namespace is a source (`kube:<namespace>`) whose
//! "files" are its custom resources, each at `<namespace>/<plural>/<name>` and read as the YAML
//! document of its spec. The same index, decision and plan as the Git syncer's then apply: a
//! resource that does not parse keeps its last good version in effect, cross-object validation
//! flags what it refuses, and a resource that goes away is pruned (its work cancelled, its
//! history kept).
//!
//! A resource being deleted (`deletionTimestamp` set) counts as gone, and so do the tasks of a
//! project being deleted: their work is cancelled before the finalizer lets them go.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use agentops_specs::{Diagnostic, Kind, Object, ObjectKey, Pos, parse_file};
use futures::future::BoxFuture;
use git2::{ObjectType, Oid};

use super::claims::{Claims, Conflicts};
use super::decide::{Change, Index, Touched, decide_touched, decide_with, record};
use super::plan::{self, Current, SpecHash, Write};
use super::sync::{SyncError, SyncReport, declare};
use crate::source::kube::watch::Change as Watched;
use crate::source::kube::{CrRef, Resource, source_name};
use crate::store::{Objects, SourceInfo, Store, StoreError};

/// One namespace: a source of its own.
struct Space {
    info: SourceInfo,
    index: Index,
    /// The documents of the resources in the index, by path, to read the written ones again.
    documents: HashMap<Arc<str>, Arc<[u8]>>,
    current: Option<Current>,
    invalid: HashSet<ObjectKey>,
    /// The `resourceVersion` of the last change to a spec here.
    revision: String,
    touched: Vec<Touched>,
    /// A full decision was made since the store was last loaded.
    warm: bool,
    /// The claims version the last decision saw.
    claims_seen: u64,
}

impl Space {
    fn new(namespace: &str, cluster: &str) -> Space {
        Space {
            info: SourceInfo {
                name: source_name(namespace),
                url: cluster.to_owned(),
                branch: String::new(),
                path: namespace.to_owned(),
            },
            index: Index::default(),
            documents: HashMap::new(),
            current: None,
            invalid: HashSet::new(),
            revision: String::new(),
            touched: Vec::new(),
            warm: false,
            claims_seen: u64::MAX,
        }
    }
}

pub struct KubeSyncer<S> {
    store: S,
    cluster: String,
    resources: BTreeMap<CrRef, Resource>,
    spaces: BTreeMap<String, Space>,
    /// The kinds listed at least once: nothing is decided before all four are, or the first
    /// list of projects would prune every task not listed yet.
    listed: HashSet<Kind>,
    claims: Option<Claims>,
}

/// The state of one resource after a sync, for status and finalizers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Its spec is in effect in the store (or, broken, its last good version is).
    Live,
    /// Gone from the source, and its row pruned or never written: its work is cancelled.
    Released,
    /// Not synced yet.
    Pending,
}

impl<S: Store> KubeSyncer<S> {
    /// `cluster` is recorded as the sources' URL.
    pub fn new(store: S, cluster: &str) -> KubeSyncer<S> {
        KubeSyncer {
            store,
            cluster: cluster.to_owned(),
            resources: BTreeMap::new(),
            spaces: BTreeMap::new(),
            listed: HashSet::new(),
            claims: None,
        }
    }

    /// Decide alongside other sources: an object another source declares too is refused.
    pub fn with_claims(mut self, claims: Claims) -> KubeSyncer<S> {
        self.claims = Some(claims);
        self
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Sync `namespace` even without resources, so that what the store holds from it is
    /// pruned when its resources went away while no controller watched.
    pub fn know_namespace(&mut self, namespace: &str) {
        let cluster = &self.cluster;
        self.spaces
            .entry(namespace.to_owned())
            .or_insert_with(|| Space::new(namespace, cluster));
    }

    /// Every resource as last seen.
    pub fn resources(&self) -> impl Iterator<Item = &Resource> {
        self.resources.values()
    }

    pub fn resource(&self, cr: &CrRef) -> Option<&Resource> {
        self.resources.get(cr)
    }

    /// Whether all four kinds have been listed.
    pub fn ready(&self) -> bool {
        self.listed.len() == Kind::ALL.len()
    }

    /// Take note of what the watch said.
    pub fn observe(&mut self, change: Watched) {
        match change {
            Watched::Apply(resource) => self.put(resource),
            Watched::Delete(resource) => {
                let cr = resource.cr.clone();
                let was_deleting = self.project_deleting(&cr);
                self.resources.remove(&cr);
                self.bump(&cr.namespace, &resource.resource_version);
                self.refresh(&cr);
                if cr.kind == Kind::Project && !was_deleting {
                    self.refresh_tasks_of(&cr);
                }
            }
            Watched::Listed(kind, list) => {
                self.listed.insert(kind);
                let listed: HashSet<CrRef> = list.iter().map(|r| r.cr.clone()).collect();
                let gone: Vec<CrRef> = self
                    .resources
                    .keys()
                    .filter(|cr| cr.kind == kind && !listed.contains(cr))
                    .cloned()
                    .collect();
                for cr in &gone {
                    self.resources.remove(cr);
                }
                let mut paths: Vec<CrRef> = gone;
                for resource in list {
                    let (ns, rv) = (
                        resource.cr.namespace.clone(),
                        resource.resource_version.clone(),
                    );
                    paths.push(resource.cr.clone());
                    self.resources.insert(resource.cr.clone(), resource);
                    self.bump(&ns, &rv);
                }
                for cr in &paths {
                    self.refresh(cr);
                }
                if kind == Kind::Project {
                    let tasks: Vec<CrRef> = self
                        .resources
                        .keys()
                        .filter(|cr| cr.kind == Kind::Task)
                        .cloned()
                        .collect();
                    for cr in &tasks {
                        self.refresh(cr);
                    }
                }
            }
            Watched::Failed(..) => {}
        }
    }

    fn put(&mut self, resource: Resource) {
        let cr = resource.cr.clone();
        let was_deleting = self.project_deleting(&cr);
        let rv = resource.resource_version.clone();
        self.resources.insert(cr.clone(), resource);
        if self.refresh(&cr) {
            self.bump(&cr.namespace, &rv);
        }
        if cr.kind == Kind::Project && was_deleting != self.project_deleting(&cr) {
            self.bump(&cr.namespace, &rv);
            self.refresh_tasks_of(&cr);
        }
    }

    fn bump(&mut self, namespace: &str, revision: &str) {
        let cluster = &self.cluster;
        let space = self
            .spaces
            .entry(namespace.to_owned())
            .or_insert_with(|| Space::new(namespace, cluster));
        if !revision.is_empty() && newer(revision, &space.revision) {
            space.revision = revision.to_owned();
        }
    }

    /// The project `cr` is, being deleted.
    fn project_deleting(&self, cr: &CrRef) -> bool {
        cr.kind == Kind::Project && self.resources.get(cr).is_some_and(|r| r.deleting)
    }

    fn refresh_tasks_of(&mut self, project: &CrRef) {
        let tasks: Vec<CrRef> = self
            .resources
            .values()
            .filter(|r| {
                r.cr.kind == Kind::Task
                    && r.cr.namespace == project.namespace
                    && r.project.as_deref() == Some(project.name.as_str())
            })
            .map(|r| r.cr.clone())
            .collect();
        for cr in &tasks {
            self.refresh(cr);
        }
    }

    /// Whether the resource, as it is now, is in effect: not being deleted, nor its project.
    fn effective(&self, cr: &CrRef) -> Option<&Resource> {
        let resource = self.resources.get(cr).filter(|r| !r.deleting)?;
        if let Some(project) = &resource.project {
            let project = CrRef {
                kind: Kind::Project,
                namespace: cr.namespace.clone(),
                name: project.clone(),
            };
            if self.project_deleting(&project) {
                return None;
            }
        }
        Some(resource)
    }

    /// Bring the index entry of `cr` up to date. Returns whether it changed.
    fn refresh(&mut self, cr: &CrRef) -> bool {
        let document: Option<Arc<[u8]>> = self.effective(cr).map(|r| Arc::clone(&r.document));
        let cluster = &self.cluster;
        let space = self
            .spaces
            .entry(cr.namespace.clone())
            .or_insert_with(|| Space::new(&cr.namespace, cluster));
        let blob = document
            .as_ref()
            .map(|d| Oid::hash_object(ObjectType::Blob, d).unwrap_or(Oid::ZERO_SHA1));
        match space.index.change(cr.path(), blob) {
            Change::Unchanged => false,
            Change::Removed(gone) => {
                space.documents.remove(&gone.path);
                space.touched.push(gone);
                true
            }
            Change::Parse(path, blob, before) => {
                let document = document.expect("a blob comes from a document");
                let parsed = parse_file(&path, &document);
                let objects = parsed
                    .objects
                    .iter()
                    .map(|o| (o.skeleton(Arc::clone(&path)), SpecHash::of(o)))
                    .collect();
                record(
                    &mut space.index.files,
                    Arc::clone(&path),
                    blob,
                    objects,
                    parsed.errors,
                );
                space.documents.insert(path, document);
                space.touched.push(before);
                true
            }
        }
    }

    /// Decide and apply every namespace that changed. Returns each one's report.
    pub async fn sync(&mut self) -> Vec<(String, Result<SyncReport, SyncError>)> {
        if !self.ready() {
            return Vec::new();
        }
        let mut reports = Vec::new();
        for space in self.spaces.values_mut() {
            let claims_read = self.claims.as_ref().map(Claims::version);
            let claims_moved = claims_read.is_some_and(|v| v != space.claims_seen);
            if space.warm && space.touched.is_empty() && !claims_moved {
                continue;
            }
            if claims_moved {
                space.warm = false;
            }
            let conflicts = self
                .claims
                .as_ref()
                .map(|c| c.others(&space.info.name))
                .unwrap_or_default();
            let result = step(&self.store, space, &conflicts).await;
            if let (Ok(_), Some(claims), Some(read)) = (&result, &self.claims, claims_read) {
                space.claims_seen = declare(claims, &space.info.name, &space.index, read);
            }
            if result.is_err() {
                // Whether the store took the writes is unknown: decide afresh next time.
                space.current = None;
                space.warm = false;
            }
            reports.push((space.info.name.clone(), result));
        }
        reports
    }

    /// The problems found at `cr`'s path, joined, if any.
    pub fn problems(&self, cr: &CrRef) -> Option<String> {
        let space = self.spaces.get(&cr.namespace)?;
        let path = cr.path();
        let errors = &space.current.as_ref()?.cursor.as_ref()?.errors;
        let found: Vec<String> = errors
            .iter()
            .filter(|d| d.path == path)
            .map(Diagnostic::to_string)
            .collect();
        (!found.is_empty()).then(|| found.join("; "))
    }

    /// Every problem of every namespace, by path.
    pub fn all_problems(&self) -> BTreeMap<String, String> {
        let mut all: BTreeMap<String, String> = BTreeMap::new();
        for space in self.spaces.values() {
            let Some(cursor) = space.current.as_ref().and_then(|c| c.cursor.as_ref()) else {
                continue;
            };
            for d in &cursor.errors {
                all.entry(d.path.clone())
                    .and_modify(|m| {
                        m.push_str("; ");
                        m.push_str(&d.to_string());
                    })
                    .or_insert_with(|| d.to_string());
            }
        }
        all
    }

    /// Where a resource stands after the last sync.
    pub fn settled(&self, cr: &CrRef) -> Settled {
        let Some(space) = self.spaces.get(&cr.namespace) else {
            return Settled::Pending;
        };
        let Some(current) = space.current.as_ref().filter(|_| space.touched.is_empty()) else {
            return Settled::Pending;
        };
        let path = cr.path();
        if space.index.files.contains_key(path.as_str()) {
            return Settled::Live;
        }
        let live = current
            .objects
            .iter()
            .any(|(key, row)| !row.pruned && row_belongs(key, row.path.as_deref(), cr, &path));
        if live {
            Settled::Pending
        } else {
            Settled::Released
        }
    }
}

/// Whether a store row is the resource's, or (for a project) one of its tasks.
fn row_belongs(key: &ObjectKey, row_path: Option<&str>, cr: &CrRef, path: &str) -> bool {
    if row_path == Some(path) {
        return true;
    }
    cr.kind == Kind::Project
        && matches!(key, ObjectKey::Task { project, .. } if *project == cr.name)
}

/// Whether resource version `a` is newer than `b`. They are opaque to clients, but every
/// API server makes them increasing integers; anything else counts as newer.
fn newer(a: &str, b: &str) -> bool {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => a != b,
    }
}

/// A written object to read again: its path, its resource's document, its position.
type Wanted = (Arc<str>, Option<Arc<[u8]>>, Pos);

/// Reads the written objects again from the resources' documents.
struct Documents<'a> {
    documents: &'a HashMap<Arc<str>, Arc<[u8]>>,
}

impl Objects for Documents<'_> {
    fn fetch(&self, writes: &[&Write<'_>]) -> BoxFuture<'static, Result<Vec<Object>, StoreError>> {
        let wanted: Vec<Wanted> = writes
            .iter()
            .map(|w| {
                let path = Arc::clone(&w.object.path);
                let document = self.documents.get(&path).cloned();
                (path, document, w.object.document)
            })
            .collect();
        Box::pin(async move {
            wanted
                .into_iter()
                .map(|(path, document, pos)| {
                    let document = document.ok_or_else(|| {
                        StoreError::Objects(format!("{path}: the resource is not there").into())
                    })?;
                    parse_file(&path, &document)
                        .objects
                        .into_iter()
                        .find(|o| o.origin.document == pos)
                        .ok_or_else(|| {
                            StoreError::Objects(
                                format!("{path}: the object is not there when read again").into(),
                            )
                        })
                })
                .collect()
        })
    }
}

async fn step<S: Store>(
    store: &S,
    space: &mut Space,
    conflicts: &Conflicts,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    if space.current.is_none() {
        space.current = Some(store.load(&space.info.name).await?);
        space.warm = false;
    }
    let touched = std::mem::take(&mut space.touched);
    let current = space.current.as_mut().expect("loaded above");
    let revision = space.revision.clone();
    let mut report = SyncReport {
        revision: revision.clone(),
        files_parsed: touched
            .iter()
            .filter(|t| space.index.files.contains_key(&t.path))
            .count(),
        read: started.elapsed(),
        ..SyncReport::default()
    };
    let started = Instant::now();
    let incremental = space
        .warm
        .then(|| {
            decide_touched(
                &space.index,
                &touched,
                &space.invalid,
                conflicts,
                current,
                &revision,
                &revision,
            )
        })
        .flatten();
    let desired = match incremental {
        Some(plan) => plan,
        None => {
            let (plan, invalid) =
                decide_with(&space.index, current, &revision, &revision, conflicts);
            space.invalid = invalid;
            plan
        }
    };
    report.decide = started.elapsed();
    drop(touched);
    let started = Instant::now();
    let documents = Documents {
        documents: &space.documents,
    };
    store.apply(&space.info, &desired, &documents).await?;
    report.apply = started.elapsed();
    report.object_writes = desired.object_writes();
    report.events = desired.events.len();
    report.cursor_moved = desired.cursor.is_some();
    plan::apply_to_current(current, desired);
    space.warm = true;
    report.diagnostics = current
        .cursor
        .as_ref()
        .map(|c| c.errors.clone())
        .unwrap_or_default();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_versions_compare_as_numbers() {
        assert!(newer("10", "9"));
        assert!(!newer("9", "10"));
        assert!(newer("9", ""));
        assert!(!newer("9", "9"));
    }

    #[test]
    fn a_project_owns_its_tasks_rows_for_the_finalizer() {
        let project = CrRef {
            kind: Kind::Project,
            namespace: "team".into(),
            name: "web".into(),
        };
        let task = ObjectKey::Task {
            project: "web".into(),
            name: "a".into(),
        };
        assert!(row_belongs(
            &task,
            Some("team/tasks/a"),
            &project,
            "team/projects/web"
        ));
        let other = ObjectKey::Task {
            project: "docs".into(),
            name: "a".into(),
        };
        assert!(!row_belongs(
            &other,
            Some("team/tasks/a"),
            &project,
            "team/projects/web"
        ));
        assert!(row_belongs(
            &ObjectKey::Project("web".into()),
            Some("team/projects/web"),
            &project,
            "team/projects/web"
        ));
    }
}
