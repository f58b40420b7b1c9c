//! Plan writes as JSON rows, the one shape both backends read in SQL.
//!
//! Rows are serialized straight from the plan into one JSON string per batch, batch by batch,
//! so applying a plan of 100,000 objects never holds more than a batch or two of rows, and of
//! whole objects, in memory: the plan knows its objects by their skeletons, and the objects of
//! each batch of writes are read (by [`Objects`]) while the batch before is being written.

use std::collections::{BTreeMap, VecDeque};

use agentops_specs::{Kind, Object, ObjectKey, ObjectMeta, Spec};
use futures::future::BoxFuture;
use serde::Serialize;
use uuid::Uuid;

use super::sql::Sql;
use super::{Objects, StoreError};
use crate::reconcile::plan::{Event, Plan, SpecHash, Write};

/// Rows per statement: large enough that a cold sync of 100,000 tasks is a few dozen
/// statements, small enough that one statement's JSON stays a few megabytes.
pub const BATCH: usize = 2_000;

/// The original `metadata` column: labels and annotations. Every spec field has a column of
/// its own, so no copy of the whole document is stored (it cost 15 % of a cold sync).
#[derive(Serialize)]
struct MetadataJson<'a> {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

/// Columns every reconciled object has.
#[derive(Serialize)]
struct Common<'a> {
    id: Uuid,
    name: &'a str,
    source: &'a str,
    revision: &'a str,
    path: &'a str,
    generation: i64,
    spec_hash: SpecHash,
    metadata: MetadataJson<'a>,
    revive: bool,
}

#[derive(Serialize)]
struct Row<'a, T: Serialize> {
    #[serde(flatten)]
    common: Common<'a>,
    #[serde(flatten)]
    columns: T,
}

#[derive(Serialize)]
struct ProjectColumns<'a> {
    title: &'a str,
    description: &'a str,
    priority: u8,
    owner: Option<&'a str>,
    labels: &'a BTreeMap<String, String>,
    suspend: bool,
}

#[derive(Serialize)]
struct TaskColumns<'a> {
    project_id: Option<Uuid>,
    title: &'a str,
    description: &'a str,
    assignee: &'a str,
    priority: u8,
    capabilities: &'a [String],
    /// Always qualified, `project/task`.
    depends_on: Vec<String>,
    action: &'a agentops_specs::Action,
    output: &'a agentops_specs::Output,
    acceptance_criteria: &'a [String],
    timeout_seconds: Option<u64>,
    retries: u32,
}

#[derive(Serialize)]
struct AgentColumns<'a> {
    #[serde(rename = "type")]
    agent_type: &'a str,
    capabilities: &'a [String],
    models: &'a [String],
    concurrency: u32,
    instructions: &'a str,
}

#[derive(Serialize)]
struct ToolColumns<'a> {
    description: &'a str,
    tool_type: &'a str,
    created_by: &'a str,
    implementation: Implementation<'a>,
}

#[derive(Serialize)]
struct Implementation<'a> {
    command: &'a [String],
}

fn metadata(meta: &ObjectMeta) -> MetadataJson<'_> {
    MetadataJson {
        labels: &meta.labels,
        annotations: &meta.annotations,
    }
}

fn write_row(out: &mut Vec<u8>, write: &Write<'_>, object: &Object, source: &str, revision: &str) {
    let common = Common {
        id: write.id,
        name: object.name(),
        source,
        revision,
        path: &object.origin.path,
        generation: write.generation,
        spec_hash: write.spec_hash,
        metadata: metadata(&object.metadata),
        revive: write.revive,
    };
    match &object.spec {
        Spec::Project(p) => row(
            out,
            common,
            ProjectColumns {
                title: &p.title,
                description: &p.description,
                priority: p.priority.value(),
                owner: p.owner.as_deref(),
                labels: &object.metadata.labels,
                suspend: p.suspend,
            },
        ),
        Spec::Task(t) => row(
            out,
            common,
            TaskColumns {
                project_id: write.project_id,
                title: &t.title,
                description: &t.description,
                assignee: &t.assignee,
                priority: t.priority.value(),
                capabilities: &t.capabilities,
                depends_on: t
                    .dependency_keys()
                    .map(|(project, task)| format!("{project}/{task}"))
                    .collect(),
                action: &t.action,
                output: &t.output,
                acceptance_criteria: &t.acceptance_criteria,
                timeout_seconds: t.timeout.map(|d| d.as_secs()),
                retries: t.retries,
            },
        ),
        Spec::Agent(a) => row(
            out,
            common,
            AgentColumns {
                agent_type: a.agent_type.as_str(),
                capabilities: &a.capabilities,
                models: &a.models,
                concurrency: a.concurrency,
                instructions: &a.instructions,
            },
        ),
        Spec::Tool(t) => row(
            out,
            common,
            ToolColumns {
                description: &t.description,
                tool_type: t.tool_type.as_str(),
                created_by: &t.created_by,
                implementation: Implementation {
                    command: &t.command,
                },
            },
        ),
    }
}

/// The columns a sync writes from `object`, by name, as JSON: the spec's columns and
/// `metadata`, without the row's bookkeeping (id, source, revision, generation, hash) and
/// without `project_id`, which names a row rather than a value.
pub fn columns(object: &Object) -> serde_json::Map<String, serde_json::Value> {
    let write = Write {
        id: Uuid::nil(),
        object: &object.skeleton(object.origin.path.as_str().into()),
        spec_hash: SpecHash::of(object),
        generation: 0,
        project_id: None,
        revive: false,
    };
    let mut out = Vec::new();
    write_row(&mut out, &write, object, "", "");
    let mut row: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out).expect("a row is a JSON object");
    for bookkeeping in [
        "id",
        "name",
        "source",
        "revision",
        "path",
        "generation",
        "spec_hash",
        "revive",
        "project_id",
    ] {
        row.remove(bookkeeping);
    }
    row
}

pub(super) fn table(kind: Kind) -> &'static str {
    match kind {
        Kind::Project => "projects",
        Kind::Task => "tasks",
        Kind::Agent => "agents",
        Kind::Tool => "tools",
    }
}

/// Projects before tasks: a task row refers to its project's.
const TABLES: [&str; 4] = ["projects", "agents", "tools", "tasks"];

/// The row of a prune, or of a flag with its message.
#[derive(Serialize, Clone, Copy)]
struct KeyRow<'a> {
    id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    name: &'a str,
}

#[derive(Serialize)]
struct EventRow<'a> {
    event_type: &'static str,
    id: Uuid,
    payload: Payload<'a>,
}

/// Every event's payload, one shape for all: the fields an event does not have are left out,
/// except `path`, which a pruned object without one gives as `null`. Fields are in
/// alphabetical order, the order the payloads had when they were built as JSON maps, so the
/// stored text is the same.
#[derive(Serialize)]
struct Payload<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    column: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    project: Option<&'a str>,
    revision: &'a str,
}

fn payload<'a>(event: &'a Event<'_>, revision: &'a str) -> Payload<'a> {
    let object = |key: &'a agentops_specs::ObjectKey, path: Option<&'a str>| Payload {
        column: None,
        generation: None,
        kind: Some(key.kind().as_str()),
        line: None,
        message: None,
        name: Some(key.name()),
        path,
        project: match key {
            agentops_specs::ObjectKey::Task { project, .. } => Some(project),
            _ => None,
        },
        revision,
    };
    match event {
        Event::Written {
            key,
            path,
            generation,
            ..
        } => Payload {
            generation: Some(*generation),
            ..object(key, Some(path))
        },
        Event::Invalid(e) => Payload {
            message: Some(&e.message),
            ..object(&e.key, Some(&e.path))
        },
        Event::Pruned(e) => object(&e.key, e.path.as_deref()),
        Event::Source(d) => Payload {
            column: Some(d.column),
            generation: None,
            kind: None,
            line: Some(d.line),
            message: Some(&d.message),
            name: None,
            path: Some(&d.path),
            project: None,
            revision,
        },
    }
}

/// A JSON array built one element at a time.
fn json_array<T>(
    items: impl ExactSizeIterator<Item = T>,
    mut write: impl FnMut(&mut Vec<u8>, T),
) -> String {
    let mut out = Vec::with_capacity(items.len() * 512 + 2);
    out.push(b'[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(&mut out, item);
    }
    out.push(b']');
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

fn row(out: &mut Vec<u8>, common: Common<'_>, columns: impl Serialize) {
    to_json(out, &Row { common, columns });
}

/// Serializing plain structs of strings and numbers into a Vec cannot fail.
fn to_json(out: &mut Vec<u8>, row: &impl Serialize) {
    serde_json::to_writer(out, row).expect("rows serialize");
}

/// One statement to run, with the rows it reads.
enum Step<'p, 'a> {
    Writes(&'static str, Vec<&'p Write<'a>>),
    Keys(&'static str, Vec<KeyRow<'p>>),
    Events(&'p [Event<'a>]),
}

/// The statements that apply a plan, in order, each with its batch of rows as a JSON array.
/// Lazy: each batch is serialized only when the previous one has been sent.
pub struct Batches<'p, 'a, O> {
    revision: &'p str,
    source: &'p str,
    objects: &'p O,
    events: &'static str,
    steps: VecDeque<Step<'p, 'a>>,
    /// The objects of the next write step in `steps`, already being read.
    next_objects: Option<BoxFuture<'static, Result<Vec<Object>, StoreError>>>,
}

impl<'p, 'a, O: Objects> Batches<'p, 'a, O> {
    pub fn new(plan: &'p Plan<'a>, source: &'p str, sql: &'static Sql, objects: &'p O) -> Self {
        let mut write_steps = Vec::new();
        for table in TABLES {
            let statements = sql.table(table);
            for (statement, writes) in [
                (statements.insert.as_str(), &plan.creates),
                (statements.update.as_str(), &plan.updates),
            ] {
                let rows: Vec<&Write<'a>> = writes
                    .iter()
                    .filter(|w| self::table(w.object.key.kind()) == table)
                    .collect();
                write_steps.extend(
                    rows.chunks(BATCH)
                        .map(|chunk| Step::Writes(statement, chunk.to_vec())),
                );
            }
        }
        // A batch of events after each batch of writes: events need no objects, so the
        // database has work while the next batch's objects are read. Within the one
        // transaction, the order is not seen.
        let mut events = plan.events.chunks(BATCH).map(Step::Events);
        let mut steps = VecDeque::new();
        for write in write_steps {
            steps.push_back(write);
            steps.extend(events.next());
        }
        let key_row = |id, key: &'p ObjectKey, message| {
            (
                key.kind(),
                KeyRow {
                    id,
                    message,
                    name: key.name(),
                },
            )
        };
        let prunes = plan.prunes.iter().map(|p| key_row(p.id, &p.key, None));
        let flags = plan
            .flags
            .iter()
            .map(|f| key_row(f.id, &f.key, Some(f.message.as_str())));
        for (rows, flag) in [(prunes.collect::<Vec<_>>(), false), (flags.collect(), true)] {
            for table in TABLES {
                let statements = sql.table(table);
                let statement = if flag {
                    &statements.flag
                } else {
                    &statements.prune
                };
                let rows: Vec<KeyRow<'p>> = rows
                    .iter()
                    .filter(|(kind, _)| self::table(*kind) == table)
                    .map(|(_, row)| *row)
                    .collect();
                steps.extend(
                    rows.chunks(BATCH)
                        .map(|chunk| Step::Keys(statement.as_str(), chunk.to_vec())),
                );
            }
        }
        steps.extend(events);
        Batches {
            revision: &plan.revision,
            source,
            objects,
            events: sql.core.events.as_str(),
            steps,
            next_objects: None,
        }
    }

    /// The next statement and its rows; `None` when the plan is done.
    pub async fn next(&mut self) -> Option<Result<(&'static str, String), StoreError>> {
        let step = self.steps.pop_front()?;
        Some(self.render(step).await)
    }

    async fn render(&mut self, step: Step<'p, 'a>) -> Result<(&'static str, String), StoreError> {
        let revision = self.revision;
        Ok(match step {
            Step::Writes(statement, writes) => {
                let objects = match self.next_objects.take() {
                    Some(objects) => objects,
                    None => self.objects.fetch(&writes),
                };
                // Read the next batch's objects while this one is serialized and written.
                let next = self.steps.iter().find_map(|step| match step {
                    Step::Writes(_, next) => Some(next),
                    _ => None,
                });
                self.next_objects = next.map(|next| self.objects.fetch(next));
                let objects = objects.await?;
                debug_assert_eq!(objects.len(), writes.len());
                let source = self.source;
                let rows = json_array(writes.iter().zip(&objects), |out, (write, object)| {
                    write_row(out, write, object, source, revision)
                });
                (statement, rows)
            }
            Step::Keys(statement, rows) => (statement, json_array(rows.iter(), to_json)),
            Step::Events(events) => {
                let rows = json_array(events.iter(), |out, e| {
                    to_json(
                        out,
                        &EventRow {
                            event_type: e.event_type(),
                            id: Uuid::new_v4(),
                            payload: payload(e, revision),
                        },
                    )
                });
                (self.events, rows)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use agentops_specs::{Diagnostic, ObjectKey, Pos};

    use super::*;
    use crate::reconcile::plan::{Invalid, Pruned, What};

    fn text(event: &Event<'_>) -> String {
        serde_json::to_string(&payload(event, "main@sha1:1")).unwrap()
    }

    /// The payloads as they were when built as JSON maps, byte for byte: SQLite keeps the
    /// text as written.
    #[test]
    fn event_payloads_keep_their_fields_and_order() {
        let task = ObjectKey::Task {
            project: "web".into(),
            name: "a".into(),
        };
        let agent = ObjectKey::Agent("writer".into());
        let written = Event::Written {
            what: What::Created,
            key: &task,
            path: "projects/web/tasks/a.yaml",
            generation: 1,
        };
        assert_eq!(
            text(&written),
            r#"{"generation":1,"kind":"Task","name":"a","path":"projects/web/tasks/a.yaml","project":"web","revision":"main@sha1:1"}"#
        );
        let invalid = Event::Invalid(Box::new(Invalid {
            key: agent.clone(),
            path: "agents/writer.yaml".into(),
            message: "agents/writer.yaml:3:7: bad".into(),
        }));
        assert_eq!(
            text(&invalid),
            r#"{"kind":"Agent","message":"agents/writer.yaml:3:7: bad","name":"writer","path":"agents/writer.yaml","revision":"main@sha1:1"}"#
        );
        let pruned = Event::Pruned(Box::new(Pruned {
            key: task.clone(),
            path: None,
        }));
        assert_eq!(
            text(&pruned),
            r#"{"kind":"Task","name":"a","path":null,"project":"web","revision":"main@sha1:1"}"#
        );
        let source = Event::Source(Box::new(Diagnostic::new(
            "agents/writer.yaml",
            Pos { line: 3, column: 7 },
            "bad",
        )));
        assert_eq!(
            text(&source),
            r#"{"column":7,"line":3,"message":"bad","path":"agents/writer.yaml","revision":"main@sha1:1"}"#
        );
        assert_eq!(
            [&written, &invalid, &pruned, &source].map(Event::event_type),
            [
                "task.created",
                "agent.invalid",
                "task.pruned",
                "source.invalid"
            ]
        );
    }
}
