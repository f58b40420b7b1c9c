//! The Kubernetes source of `up --kube`, as one task: it takes the watch's changes, syncs the
//! namespaces they touched through the same plan as Git, manages the finalizers and Events
//! after each sync, and applies the resources' status once per status interval (and once more
//! on the way out).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use agentops_specs::Kind;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::reconcile::claims::Claims;
use crate::reconcile::kube::KubeSyncer;
use crate::reconcile::sync::SyncReport;
use crate::source::kube::watch::{Change, watch};
use crate::source::kube::{CrRef, namespace_of_source, source_name};
use crate::store::Store;
use crate::store::writeback::{StatusTask, Writeback};
use crate::telemetry::{InternalEvent, SyncCompleted, SyncFailed};
use crate::writeback::kube::{
    Coalescer, FinalizerOp, KubeWriter, finalizer_ops, new_problems, project_status, ready_status,
    status_patch, task_status,
};

/// How many status patches are in flight at once.
const PATCHES_IN_FLIGHT: usize = 32;
/// At most this many watch changes are taken into one sync.
const BATCH: usize = 20_000;

#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// `None`: every namespace.
    pub namespace: Option<String>,
    pub status_interval: Duration,
}

/// What the loop has done so far, for benchmarks and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KubeCounts {
    pub syncs: u64,
    pub status_patches: u64,
    pub finalizer_patches: u64,
    pub events: u64,
}

/// The Kubernetes source and its write-back, until `stop`.
pub struct KubeLoop<S> {
    client: kube::Client,
    syncer: KubeSyncer<S>,
    writer: KubeWriter,
    coalescer: Coalescer,
    /// Finalizer writes sent, by the resource version they were decided on.
    requested: HashMap<CrRef, String>,
    problems: BTreeMap<String, String>,
    pub counts: KubeCounts,
    /// Counts the status flushes done.
    flushes: tokio::sync::watch::Sender<u64>,
    /// Wakes when another source's declarations change.
    claims: Option<tokio::sync::watch::Receiver<u64>>,
}

impl<S: Store + Writeback + Clone> KubeLoop<S> {
    pub fn new(client: kube::Client, store: S) -> KubeLoop<S> {
        KubeLoop {
            syncer: KubeSyncer::new(store, "kubernetes"),
            writer: KubeWriter::new(client.clone()),
            client,
            coalescer: Coalescer::default(),
            requested: HashMap::new(),
            problems: BTreeMap::new(),
            counts: KubeCounts::default(),
            flushes: tokio::sync::watch::channel(0).0,
            claims: None,
        }
    }

    /// Decide alongside the other sources of this controller (see [`Claims`]).
    pub fn with_claims(mut self, claims: Claims) -> KubeLoop<S> {
        self.claims = Some(claims.changed());
        self.syncer = self.syncer.with_claims(claims);
        self
    }

    /// Hears of every status flush, by their count.
    pub fn flushes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.flushes.subscribe()
    }

    pub fn syncer(&self) -> &KubeSyncer<S> {
        &self.syncer
    }

    /// Run until `stop`. `on_sync` hears of every sync that reached the store.
    pub async fn run(
        mut self,
        options: KubeOptions,
        stop: CancellationToken,
        mut on_sync: impl FnMut(&str, &SyncReport) + Send,
    ) -> KubeCounts {
        // Namespaces synced before: what went from them while nobody watched is pruned.
        match self.syncer.store().source_status().await {
            Ok(sources) => {
                for source in sources {
                    if let Some(ns) = namespace_of_source(&source.name)
                        && options.namespace.as_deref().is_none_or(|n| n == ns)
                    {
                        self.syncer.know_namespace(ns);
                    }
                }
            }
            Err(e) => tracing::warn!("cannot list the synced sources: {}", crate::error_chain(&e)),
        }
        let mut watch = watch(&self.client, options.namespace.as_deref());
        let interval = options.status_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                change = watch.changes.recv() => {
                    let Some(change) = change else { break };
                    self.observe(change);
                    let mut taken = 1;
                    while taken < BATCH {
                        match watch.changes.try_recv() {
                            Ok(change) => self.observe(change),
                            Err(_) => break,
                        }
                        taken += 1;
                    }
                    self.sync(&mut on_sync).await;
                }
                Some(()) = claims_changed(&mut self.claims) => {
                    self.sync(&mut on_sync).await;
                }
                _ = tick.tick() => {
                    self.flush_status().await;
                    self.finalizers().await;
                }
            }
        }
        self.flush_status().await;
        self.counts
    }

    fn observe(&mut self, change: Change) {
        if let Change::Failed(kind, error) = &change {
            tracing::warn!("watching {}: {error}; retrying", kind.plural());
        }
        self.syncer.observe(change);
    }

    /// Sync what changed, then act on the finalizers and Events it calls for.
    pub async fn sync(&mut self, on_sync: &mut (impl FnMut(&str, &SyncReport) + Send)) {
        let began = std::time::Instant::now();
        for (source, result) in self.syncer.sync().await {
            self.counts.syncs += 1;
            match result {
                Ok(report) => {
                    SyncCompleted {
                        source: &source,
                        report: &report,
                        took: began.elapsed(),
                    }
                    .emit();
                    if report.object_writes > 0 || report.files_parsed > 0 {
                        super::print_report(&report);
                    }
                    on_sync(&source, &report);
                }
                Err(error) => SyncFailed {
                    source: &source,
                    error: &error,
                }
                .emit(),
            }
        }
        if self.syncer.ready() {
            self.finalizers().await;
            self.events().await;
        }
    }

    /// Put the finalizer on new work; let deleted work go once it is cancelled.
    pub async fn finalizers(&mut self) {
        let ops = finalizer_ops(
            self.syncer.resources(),
            |cr| self.syncer.settled(cr),
            &self.requested,
        );
        let writer = &self.writer;
        let syncer = &self.syncer;
        let sent: Vec<(CrRef, String)> = futures::stream::iter(ops)
            .filter_map(|op| async move {
                let cr = match &op {
                    FinalizerOp::Add(cr) | FinalizerOp::Remove(cr) => cr,
                };
                let resource = syncer.resource(cr)?;
                match writer.finalizer(&op, resource).await {
                    Ok(()) => Some((cr.clone(), resource.resource_version.clone())),
                    Err(e) => {
                        tracing::warn!("{}", crate::error_chain(&e));
                        None
                    }
                }
            })
            .collect()
            .await;
        self.counts.finalizer_patches += sent.len() as u64;
        self.requested.retain(|cr, rv| {
            syncer
                .resource(cr)
                .is_some_and(|r| &r.resource_version == rv)
        });
        self.requested.extend(sent);
    }

    /// An Event on every resource with a problem it did not have at the last sync.
    async fn events(&mut self) {
        let now = self.syncer.all_problems();
        for (path, message) in new_problems(&self.problems, &now) {
            let Some(resource) = CrRef::from_path(path).and_then(|cr| self.syncer.resource(&cr))
            else {
                continue;
            };
            match self.writer.refused(resource, message).await {
                Ok(()) => self.counts.events += 1,
                Err(e) => tracing::warn!("{}", crate::error_chain(&e)),
            }
        }
        self.problems = now;
    }

    /// Apply every status that changed since it was last applied. Returns how many were.
    pub async fn flush_status(&mut self) -> usize {
        if !self.syncer.ready() {
            return 0;
        }
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut by_namespace: BTreeMap<&str, Vec<&crate::source::kube::Resource>> = BTreeMap::new();
        for resource in self.syncer.resources().filter(|r| !r.deleting) {
            by_namespace
                .entry(resource.cr.namespace.as_str())
                .or_default()
                .push(resource);
        }
        let mut due = Vec::new();
        for (namespace, resources) in by_namespace {
            let snapshot = match self
                .syncer
                .store()
                .status_snapshot(&source_name(namespace))
                .await
            {
                Ok(snapshot) => snapshot,
                Err(e) => {
                    tracing::warn!(
                        "cannot read the status of {namespace}: {}",
                        crate::error_chain(&e)
                    );
                    continue;
                }
            };
            let declares_agents_or_tools = resources
                .iter()
                .any(|r| matches!(r.cr.kind, Kind::Agent | Kind::Tool));
            let found = if declares_agents_or_tools {
                self.syncer
                    .store()
                    .agents_and_tools(&source_name(namespace))
                    .await
            } else {
                Ok(Default::default())
            };
            let (agents, tools) = match found {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(
                        "cannot read the agents and tools of {namespace}: {}",
                        crate::error_chain(&e)
                    );
                    continue;
                }
            };
            let agents: HashMap<&str, _> = agents.iter().map(|a| (a.name.as_str(), a)).collect();
            let tools: HashMap<&str, _> = tools.iter().map(|t| (t.name.as_str(), t)).collect();
            let mut tasks: HashMap<(&str, &str), &StatusTask> = HashMap::new();
            let mut of_project: HashMap<&str, Vec<&StatusTask>> = HashMap::new();
            for task in &snapshot.tasks {
                tasks.insert((task.project.as_str(), task.name.as_str()), task);
                of_project
                    .entry(task.project.as_str())
                    .or_default()
                    .push(task);
            }
            let projects: HashMap<&str, _> = snapshot
                .projects
                .iter()
                .map(|p| (p.name.as_str(), p))
                .collect();
            for resource in resources {
                let cr = &resource.cr;
                let problems = self.syncer.problems(cr);
                let problems = problems.as_deref();
                let previous = self.coalescer.previous(cr);
                let generation = resource.generation;
                let status = match cr.kind {
                    Kind::Task => {
                        let row = resource
                            .project
                            .as_deref()
                            .and_then(|p| tasks.get(&(p, cr.name.as_str())).copied());
                        serde_json::to_value(task_status(
                            row, generation, problems, &previous, &now,
                        ))
                    }
                    Kind::Project => {
                        let row = projects.get(cr.name.as_str()).copied();
                        let list = of_project
                            .get(cr.name.as_str())
                            .map_or(&[][..], Vec::as_slice);
                        serde_json::to_value(project_status(
                            row, list, generation, problems, &previous, &now,
                        ))
                    }
                    Kind::Agent | Kind::Tool => {
                        let mut status = ready_status(
                            self.syncer.settled(cr) == crate::reconcile::kube::Settled::Live,
                            generation,
                            problems,
                            &previous,
                            &now,
                        );
                        let name = cr.name.as_str();
                        if cr.kind == Kind::Agent {
                            resource_fields(&mut status, agents.get(name).map(|a| agent_fields(a)));
                        } else {
                            resource_fields(&mut status, tools.get(name).map(|t| tool_fields(t)));
                        }
                        Ok(status)
                    }
                };
                let Ok(status) = status else { continue };
                let patch = status_patch(cr.kind, &status);
                if self.coalescer.due(cr, &patch) {
                    due.push((cr.clone(), patch));
                }
            }
        }
        let writer = &self.writer;
        let applied: Vec<(CrRef, serde_json::Value)> = futures::stream::iter(due)
            .map(|(cr, patch)| async move {
                match writer.apply_status(&cr, &patch).await {
                    Ok(()) => Some((cr, patch)),
                    Err(e) => {
                        tracing::warn!("{}", crate::error_chain(&e));
                        None
                    }
                }
            })
            .buffer_unordered(PATCHES_IN_FLIGHT)
            .filter_map(|x| async move { x })
            .collect()
            .await;
        let count = applied.len();
        for (cr, patch) in applied {
            self.coalescer.sent(cr, patch);
        }
        let syncer = &self.syncer;
        self.coalescer.retain(|cr| syncer.resource(cr).is_some());
        self.counts.status_patches += count as u64;
        self.flushes.send_modify(|n| *n += 1);
        count
    }
}

/// Waits for the claims to change; `None` at once when there are none, or they are gone.
async fn claims_changed(claims: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Option<()> {
    match claims {
        Some(rx) => rx.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// What an `Agent` resource's status says of its agent (`kubectl get agents` shows `phase`).
fn agent_fields(agent: &crate::store::writeback::StatusAgent) -> serde_json::Value {
    serde_json::json!({
        "phase": agent.status,
        "running": agent.running,
        "lastSeen": agent.last_seen,
    })
}

/// What a `Tool` resource's status says of its tool: synced tools may be called.
fn tool_fields(tool: &crate::store::writeback::StatusTool) -> serde_json::Value {
    serde_json::json!({"phase": "available", "usageCount": tool.usage_count})
}

/// `fields` merged into `status`, leaving out those that are null.
fn resource_fields(status: &mut serde_json::Value, fields: Option<serde_json::Value>) {
    if let (Some(status), Some(serde_json::Value::Object(fields))) =
        (status.as_object_mut(), fields)
    {
        status.extend(fields.into_iter().filter(|(_, v)| !v.is_null()));
    }
}
