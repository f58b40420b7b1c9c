//! Write-back to Kubernetes: each custom resource's `status` subresource, by server-side apply
//! (field manager `agentops`), at most once per resource per status interval; the
//! `agentops.dev/cancel` finalizer on tasks and projects; and an Event on a resource whose spec
//! is refused.
//!
//! What to write is decided by pure functions ([`task_status`], [`project_status`],
//! [`ready_status`], [`Coalescer`], [`finalizer_ops`], [`new_problems`]); [`KubeWriter`] only
//! sends it.

use std::collections::{BTreeMap, HashMap};

use agentops_specs::status::{
    Condition, ConditionStatus, ConditionType, ProjectPhase, ProjectStatus, TaskCounts, TaskPhase,
    TaskStatus,
};
use agentops_specs::{API_VERSION, Kind};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde_json::{Value, json};

use super::render::{result_json, task_message};
use crate::reconcile::kube::Settled;
use crate::source::kube::watch::api;
use crate::source::kube::{CrRef, FINALIZER, KubeError, Resource};
use crate::store::writeback::{StatusProject, StatusTask};

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "agentops";

/// What a condition says, before its transition time is known.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    ready: (bool, &'static str, String),
    reconciling: Option<(&'static str, String)>,
    stalled: Option<(&'static str, String)>,
}

impl Verdict {
    fn ready(reason: &'static str) -> Verdict {
        Verdict {
            ready: (true, reason, String::new()),
            reconciling: None,
            stalled: None,
        }
    }

    fn reconciling(reason: &'static str, message: String) -> Verdict {
        Verdict {
            ready: (false, reason, message.clone()),
            reconciling: Some((reason, message)),
            stalled: None,
        }
    }

    fn stalled(reason: &'static str, message: String) -> Verdict {
        Verdict {
            ready: (false, reason, message.clone()),
            reconciling: None,
            stalled: Some((reason, message)),
        }
    }

    /// The three kstatus conditions. A condition keeps its transition time from `previous`
    /// while its status stays the same.
    fn conditions(
        self,
        generation: Option<i64>,
        previous: &[Condition],
        now: &str,
    ) -> Vec<Condition> {
        let make = |kind: ConditionType, on: bool, reason: &str, message: String| {
            let status = if on {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            };
            let since = previous
                .iter()
                .find(|c| c.condition_type == kind && c.status == status)
                .and_then(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.to_owned());
            Condition {
                condition_type: kind,
                status,
                reason: reason.to_owned(),
                message,
                last_transition_time: Some(since),
                observed_generation: generation,
            }
        };
        let (ready, reason, message) = self.ready;
        let (reconciling, r_reason, r_message) = match self.reconciling {
            Some((reason, message)) => (true, reason, message),
            None => (false, "Idle", String::new()),
        };
        let (stalled, s_reason, s_message) = match self.stalled {
            Some((reason, message)) => (true, reason, message),
            None => (false, "Healthy", String::new()),
        };
        vec![
            make(ConditionType::Ready, ready, reason, message),
            make(ConditionType::Reconciling, reconciling, r_reason, r_message),
            make(ConditionType::Stalled, stalled, s_reason, s_message),
        ]
    }
}

/// A task's status from its row (`None` while it is not synced) and the problems of its spec.
pub fn task_status(
    row: Option<&StatusTask>,
    generation: Option<i64>,
    problems: Option<&str>,
    previous: &[Condition],
    now: &str,
) -> TaskStatus {
    let mut status = TaskStatus {
        observed_generation: generation,
        ..TaskStatus::default()
    };
    let verdict = if let Some(row) = row {
        status.phase = phase(&row.status);
        status.agent = row.agent.clone();
        status.attempt = u32::try_from(row.attempt).ok();
        status.started_at = row.started_at.clone();
        status.completed_at = row.completed_at.clone();
        let message = task_message(row);
        status.message = (!message.is_empty()).then(|| message.to_owned());
        let result = result_json(row);
        status.result = result
            .get("summary")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let output = result.get("output");
        status.branch = output
            .and_then(|o| o.get("branch"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        status.pull_request = output
            .and_then(|o| o.get("pull_request"))
            .and_then(|p| p.get("url"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let message = message.to_owned();
        match status.phase {
            Some(TaskPhase::Completed) => Verdict::ready("Completed"),
            Some(TaskPhase::InProgress) => Verdict::reconciling("Running", message),
            Some(TaskPhase::Review) => Verdict::reconciling("AwaitingReview", message),
            Some(TaskPhase::Blocked) => Verdict::stalled("Blocked", message),
            Some(TaskPhase::Failed) => Verdict::stalled("Failed", message),
            Some(TaskPhase::Cancelled) => Verdict::stalled("Cancelled", message),
            Some(TaskPhase::Pending) | None => Verdict::reconciling("Pending", message),
        }
    } else {
        Verdict::reconciling("Syncing", String::new())
    };
    let verdict = match problems {
        Some(problems) => {
            status.message = Some(problems.to_owned());
            Verdict::stalled("Invalid", problems.to_owned())
        }
        None => verdict,
    };
    status.conditions = verdict.conditions(generation, previous, now);
    status
}

fn phase(status: &str) -> Option<TaskPhase> {
    Some(match status {
        "pending" => TaskPhase::Pending,
        "in_progress" => TaskPhase::InProgress,
        "blocked" => TaskPhase::Blocked,
        "review" => TaskPhase::Review,
        "completed" => TaskPhase::Completed,
        "failed" => TaskPhase::Failed,
        "cancelled" => TaskPhase::Cancelled,
        _ => return None,
    })
}

/// A project's status from its row, its tasks' rows and the problems of its spec.
pub fn project_status(
    row: Option<&StatusProject>,
    tasks: &[&StatusTask],
    generation: Option<i64>,
    problems: Option<&str>,
    previous: &[Condition],
    now: &str,
) -> ProjectStatus {
    let mut counts = TaskCounts::default();
    for task in tasks {
        counts.total += 1;
        match task.status.as_str() {
            "completed" => counts.completed += 1,
            "in_progress" => counts.in_progress += 1,
            "review" => counts.review += 1,
            "pending" => counts.pending += 1,
            "blocked" => counts.blocked += 1,
            "failed" => counts.failed += 1,
            _ => counts.cancelled += 1,
        }
    }
    let phase = row.and_then(|r| match r.status.as_str() {
        "active" => Some(ProjectPhase::Active),
        "completed" => Some(ProjectPhase::Completed),
        "paused" => Some(ProjectPhase::Paused),
        "cancelled" => Some(ProjectPhase::Cancelled),
        _ => None,
    });
    let message = row.and_then(|r| r.status_message.clone());
    let open = counts.total - counts.cancelled;
    let verdict = match (row, problems) {
        (_, Some(problems)) => Verdict::stalled("Invalid", problems.to_owned()),
        (None, None) => Verdict::reconciling("Syncing", String::new()),
        (Some(_), None) => {
            if counts.failed + counts.blocked > 0 {
                let text = format!(
                    "{} failed, {} blocked of {open} tasks",
                    counts.failed, counts.blocked
                );
                Verdict::stalled("TasksStalled", text)
            } else if phase == Some(ProjectPhase::Completed) || counts.completed == open {
                Verdict::ready("Completed")
            } else {
                let text = format!("{} of {open} tasks completed", counts.completed);
                Verdict::reconciling("TasksOpen", text)
            }
        }
    };
    ProjectStatus {
        phase,
        progress: Some(format!("{}/{open}", counts.completed)),
        tasks: Some(counts),
        message: problems.map(str::to_owned).or(message),
        observed_generation: generation,
        conditions: verdict.conditions(generation, previous, now),
    }
}

/// An agent's or tool's status: ready once synced, stalled while its spec is refused.
pub fn ready_status(
    synced: bool,
    generation: Option<i64>,
    problems: Option<&str>,
    previous: &[Condition],
    now: &str,
) -> Value {
    let verdict = match (problems, synced) {
        (Some(problems), _) => Verdict::stalled("Invalid", problems.to_owned()),
        (None, true) => Verdict::ready("Synced"),
        (None, false) => Verdict::reconciling("Syncing", String::new()),
    };
    json!({
        "observedGeneration": generation,
        "conditions": verdict.conditions(generation, previous, now),
    })
}

/// The status apply patch of a resource: the whole status this manager owns.
pub fn status_patch(kind: Kind, status: &impl serde::Serialize) -> Value {
    json!({"apiVersion": API_VERSION, "kind": kind.as_str(), "status": status})
}

/// What was last applied to each resource's status: a status is applied again only when it
/// differs, and at most once per flush, which runs once per status interval.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// As JSON text: a fifth of the memory of the value.
    sent: HashMap<CrRef, String>,
}

impl Coalescer {
    /// Whether `status` differs from what was last applied to `cr`.
    pub fn due(&self, cr: &CrRef, status: &Value) -> bool {
        self.sent.get(cr).map(String::as_str) != Some(status.to_string().as_str())
    }

    pub fn sent(&mut self, cr: CrRef, status: Value) {
        self.sent.insert(cr, status.to_string());
    }

    /// The conditions last applied to `cr`, for their transition times.
    pub fn previous(&self, cr: &CrRef) -> Vec<Condition> {
        #[derive(serde::Deserialize)]
        struct Sent {
            status: Conditions,
        }
        #[derive(serde::Deserialize)]
        struct Conditions {
            #[serde(default)]
            conditions: Vec<Condition>,
        }
        self.sent
            .get(cr)
            .and_then(|text| serde_json::from_str::<Sent>(text).ok())
            .map(|s| s.status.conditions)
            .unwrap_or_default()
    }

    /// Forget resources that are gone.
    pub fn retain(&mut self, keep: impl Fn(&CrRef) -> bool) {
        self.sent.retain(|cr, _| keep(cr));
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinalizerOp {
    /// Put the finalizer on a task or project that lacks it.
    Add(CrRef),
    /// The resource is being deleted and its work is cancelled: let it go.
    Remove(CrRef),
}

/// The finalizer writes the resources need. `requested` holds the resource versions writes
/// were already sent for, which wait for the watch to show them.
pub fn finalizer_ops<'a>(
    resources: impl Iterator<Item = &'a Resource>,
    settled: impl Fn(&CrRef) -> Settled,
    requested: &HashMap<CrRef, String>,
) -> Vec<FinalizerOp> {
    resources
        .filter(|r| requested.get(&r.cr) != Some(&r.resource_version))
        .filter_map(|r| {
            if r.deleting {
                (r.has_finalizer && settled(&r.cr) == Settled::Released)
                    .then(|| FinalizerOp::Remove(r.cr.clone()))
            } else {
                (r.wants_finalizer() && !r.has_finalizer).then(|| FinalizerOp::Add(r.cr.clone()))
            }
        })
        .collect()
}

/// The problems that are new since `before`, by path: each gets an Event.
pub fn new_problems<'a>(
    before: &BTreeMap<String, String>,
    now: &'a BTreeMap<String, String>,
) -> Vec<(&'a str, &'a str)> {
    now.iter()
        .filter(|(path, message)| before.get(*path) != Some(*message))
        .map(|(path, message)| (path.as_str(), message.as_str()))
        .collect()
}

/// Sends what the functions above decide.
#[derive(Clone)]
pub struct KubeWriter {
    client: kube::Client,
    recorder: Recorder,
}

impl KubeWriter {
    pub fn new(client: kube::Client) -> KubeWriter {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        KubeWriter {
            recorder: Recorder::new(client.clone(), reporter),
            client,
        }
    }

    /// Server-side apply of the resource's status subresource, forced: the status is ours.
    pub async fn apply_status(&self, cr: &CrRef, patch: &Value) -> Result<(), KubeError> {
        let api = api(&self.client, cr.kind, Some(&cr.namespace));
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&cr.name, &params, &Patch::Apply(patch))
            .await
            .map(drop)
            .map_err(|source| KubeError::Api {
                doing: format!("applying the status of {}", cr.path()),
                source,
            })
    }

    /// Add or remove the finalizer. The patch carries the resource version it was decided
    /// on, so a resource changed meanwhile refuses it (and the next round decides again).
    pub async fn finalizer(&self, op: &FinalizerOp, resource: &Resource) -> Result<(), KubeError> {
        let (cr, finalizers, doing) = match op {
            FinalizerOp::Add(cr) => {
                let mut list = resource.finalizers.clone();
                list.push(FINALIZER.to_owned());
                (cr, list, "adding the finalizer to")
            }
            FinalizerOp::Remove(cr) => {
                let list = resource
                    .finalizers
                    .iter()
                    .filter(|f| *f != FINALIZER)
                    .cloned()
                    .collect();
                (cr, list, "removing the finalizer from")
            }
        };
        let patch = json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": resource.resource_version,
        }});
        let api = api(&self.client, cr.kind, Some(&cr.namespace));
        api.patch(
            &cr.name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            },
            &Patch::Merge(&patch),
        )
        .await
        .map(drop)
        .map_err(|source| KubeError::Api {
            doing: format!("{doing} {}", cr.path()),
            source,
        })
    }

    /// A Warning Event on the resource: its spec is refused.
    pub async fn refused(&self, resource: &Resource, message: &str) -> Result<(), KubeError> {
        let cr = &resource.cr;
        let reference = ObjectReference {
            api_version: Some(API_VERSION.to_owned()),
            kind: Some(cr.kind.as_str().to_owned()),
            name: Some(cr.name.clone()),
            namespace: Some(cr.namespace.clone()),
            uid: resource.uid.clone(),
            resource_version: Some(resource.resource_version.clone()),
            ..ObjectReference::default()
        };
        // An Event's note holds at most 1 kB.
        let mut note = message.to_owned();
        if note.len() > 1000 {
            let cut = (0..=1000)
                .rev()
                .find(|&i| note.is_char_boundary(i))
                .unwrap_or(0);
            note.truncate(cut);
        }
        let event = Event {
            type_: EventType::Warning,
            reason: "Invalid".to_owned(),
            note: Some(note),
            action: "Validate".to_owned(),
            secondary: None,
        };
        self.recorder
            .publish(&event, &reference)
            .await
            .map_err(|source| KubeError::Api {
                doing: format!("recording an Event on {}", cr.path()),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: &str) -> StatusTask {
        StatusTask {
            id: "1".into(),
            project: "web".into(),
            name: "draft".into(),
            title: "Draft".into(),
            status: status.into(),
            agent: Some("seed".into()),
            attempt: 2,
            started_at: Some("2026-01-01T00:00:00Z".into()),
            completed_at: None,
            status_message: None,
            error: None,
            result: Some(
                r#"{"summary": "wrote copy.md", "output": {"branch": "agentops/web/draft", "pull_request": {"number": 7, "url": "https://example/pull/7"}}}"#
                    .into(),
            ),
        }
    }

    fn condition(status: &TaskStatus, kind: ConditionType) -> &Condition {
        status
            .conditions
            .iter()
            .find(|c| c.condition_type == kind)
            .unwrap()
    }

    #[test]
    fn a_running_task_is_reconciling_with_every_field_of_its_row() {
        let status = task_status(Some(&row("in_progress")), Some(3), None, &[], "T1");
        assert_eq!(status.phase, Some(TaskPhase::InProgress));
        assert_eq!(status.agent.as_deref(), Some("seed"));
        assert_eq!(status.attempt, Some(2));
        assert_eq!(status.started_at.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(status.result.as_deref(), Some("wrote copy.md"));
        assert_eq!(status.branch.as_deref(), Some("agentops/web/draft"));
        assert_eq!(
            status.pull_request.as_deref(),
            Some("https://example/pull/7")
        );
        assert_eq!(status.observed_generation, Some(3));
        let reconciling = condition(&status, ConditionType::Reconciling);
        assert_eq!(
            (reconciling.status, reconciling.reason.as_str()),
            (ConditionStatus::True, "Running")
        );
        assert_eq!(
            condition(&status, ConditionType::Ready).status,
            ConditionStatus::False
        );
        assert_eq!(
            condition(&status, ConditionType::Stalled).status,
            ConditionStatus::False
        );
    }

    #[test]
    fn a_completed_task_is_ready_and_keeps_transition_times_that_did_not_change() {
        let running = task_status(Some(&row("in_progress")), Some(1), None, &[], "T1");
        let done = task_status(
            Some(&row("completed")),
            Some(1),
            None,
            &running.conditions,
            "T2",
        );
        let ready = condition(&done, ConditionType::Ready);
        assert_eq!(ready.status, ConditionStatus::True);
        assert_eq!(ready.last_transition_time.as_deref(), Some("T2"));
        // Stalled was False before and still is.
        let stalled = condition(&done, ConditionType::Stalled);
        assert_eq!(stalled.last_transition_time.as_deref(), Some("T1"));
    }

    #[test]
    fn a_refused_spec_stalls_with_its_message_whatever_the_row_says() {
        let problem = "team/tasks/draft:5:3: depends on `nope`, which is not declared";
        let status = task_status(Some(&row("pending")), Some(4), Some(problem), &[], "T");
        let stalled = condition(&status, ConditionType::Stalled);
        assert_eq!(stalled.status, ConditionStatus::True);
        assert_eq!(stalled.reason, "Invalid");
        assert_eq!(stalled.message, problem);
        assert_eq!(status.message.as_deref(), Some(problem));
        assert_eq!(
            condition(&status, ConditionType::Ready).status,
            ConditionStatus::False
        );
        let unsynced = task_status(None, Some(1), Some(problem), &[], "T");
        assert_eq!(unsynced.phase, None);
        assert_eq!(
            condition(&unsynced, ConditionType::Stalled).status,
            ConditionStatus::True
        );
    }

    #[test]
    fn a_failed_task_stalls_with_its_error() {
        let mut failed = row("failed");
        failed.error = Some("exit 1".into());
        let status = task_status(Some(&failed), None, None, &[], "T");
        let stalled = condition(&status, ConditionType::Stalled);
        assert_eq!(
            (stalled.status, stalled.message.as_str()),
            (ConditionStatus::True, "exit 1")
        );
    }

    #[test]
    fn a_project_counts_its_tasks() {
        let project = StatusProject {
            name: "web".into(),
            status: "active".into(),
            status_message: None,
        };
        let (a, b, c) = (row("completed"), row("in_progress"), row("cancelled"));
        let status = project_status(Some(&project), &[&a, &b, &c], Some(1), None, &[], "T");
        assert_eq!(status.progress.as_deref(), Some("1/2"));
        assert_eq!(status.tasks.as_ref().unwrap().cancelled, 1);
        let reconciling = status
            .conditions
            .iter()
            .find(|c| c.condition_type == ConditionType::Reconciling)
            .unwrap();
        assert_eq!(reconciling.status, ConditionStatus::True);
        let done = project_status(Some(&project), &[&a, &c], Some(1), None, &[], "T");
        let ready = done
            .conditions
            .iter()
            .find(|c| c.condition_type == ConditionType::Ready)
            .unwrap();
        assert_eq!(ready.status, ConditionStatus::True);
    }

    fn cr(name: &str) -> CrRef {
        CrRef {
            kind: Kind::Task,
            namespace: "team".into(),
            name: name.into(),
        }
    }

    #[test]
    fn the_coalescer_applies_a_status_only_when_it_changed() {
        let mut coalescer = Coalescer::default();
        let first = json!({"status": {"phase": "pending"}});
        assert!(coalescer.due(&cr("a"), &first));
        coalescer.sent(cr("a"), first.clone());
        assert!(!coalescer.due(&cr("a"), &first));
        assert!(coalescer.due(&cr("a"), &json!({"status": {"phase": "completed"}})));
        coalescer.retain(|_| false);
        assert!(coalescer.due(&cr("a"), &first));
    }

    fn resource(name: &str, deleting: bool, finalizer: bool, rv: &str) -> Resource {
        Resource {
            cr: cr(name),
            uid: None,
            resource_version: rv.into(),
            generation: Some(1),
            deleting,
            has_finalizer: finalizer,
            finalizers: if finalizer {
                vec![FINALIZER.into()]
            } else {
                vec![]
            },
            project: Some("web".into()),
            document: Vec::new().into(),
        }
    }

    #[test]
    fn finalizers_are_added_to_work_and_removed_once_it_is_cancelled() {
        let resources = [
            resource("new", false, false, "1"),
            resource("held", false, true, "2"),
            resource("cancelled", true, true, "3"),
            resource("running", true, true, "4"),
            resource("asked", false, false, "5"),
        ];
        let settled = |cr: &CrRef| {
            if cr.name == "cancelled" {
                Settled::Released
            } else {
                Settled::Pending
            }
        };
        let requested = HashMap::from([(cr("asked"), "5".to_owned())]);
        assert_eq!(
            finalizer_ops(resources.iter(), settled, &requested),
            [
                FinalizerOp::Add(cr("new")),
                FinalizerOp::Remove(cr("cancelled"))
            ]
        );
        let mut agent = resource("agent", false, false, "6");
        agent.cr.kind = Kind::Agent;
        assert_eq!(finalizer_ops([agent].iter(), settled, &HashMap::new()), []);
    }

    #[test]
    fn only_new_problems_get_an_event() {
        let before = BTreeMap::from([
            ("a".to_owned(), "x".to_owned()),
            ("b".to_owned(), "y".to_owned()),
        ]);
        let now = BTreeMap::from([
            ("a".to_owned(), "x".to_owned()),
            ("b".to_owned(), "z".to_owned()),
            ("c".to_owned(), "w".to_owned()),
        ]);
        assert_eq!(new_problems(&before, &now), [("b", "z"), ("c", "w")]);
    }
}
