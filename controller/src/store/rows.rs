//! Plan writes as JSON rows, the one shape both backends read in SQL.
//!
//! Rows are serialized straight from the plan into one JSON string per batch, batch by batch,
//! so applying a plan of 100,000 objects never holds more than one batch of rows in memory.

use agentops_specs::{ObjectKey, ObjectMeta, Spec};
use serde::Serialize;

use super::sql::Sql;
use crate::reconcile::plan::{Flag, Plan, Prune, Write};

/// Rows per statement: large enough that a cold sync of 100,000 tasks is a few dozen
/// statements, small enough that one statement's JSON stays a few megabytes.
pub const BATCH: usize = 2_000;

/// The original `metadata` column: labels and annotations. Every spec field has a column of
/// its own, so no copy of the whole document is stored (it cost 15 % of a cold sync).
#[derive(Serialize)]
struct MetadataJson<'a> {
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    labels: &'a std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    annotations: &'a std::collections::BTreeMap<String, String>,
}

/// Columns every reconciled object has.
#[derive(Serialize)]
struct Common<'a> {
    id: String,
    name: &'a str,
    source: &'a str,
    revision: &'a str,
    path: &'a str,
    generation: i64,
    spec_hash: &'a str,
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
    labels: &'a std::collections::BTreeMap<String, String>,
    suspend: bool,
}

#[derive(Serialize)]
struct TaskColumns<'a> {
    project_id: Option<String>,
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
    implementation: serde_json::Value,
}

fn metadata(meta: &ObjectMeta) -> MetadataJson<'_> {
    MetadataJson {
        labels: &meta.labels,
        annotations: &meta.annotations,
    }
}

fn write_row(out: &mut Vec<u8>, write: &Write<'_>, source: &str, revision: &str) {
    let object = write.object;
    let common = Common {
        id: write.id.to_string(),
        name: object.name(),
        source,
        revision,
        path: &object.origin.path,
        generation: write.generation,
        spec_hash: write.spec_hash,
        metadata: metadata(&object.metadata),
        revive: write.revive,
    };
    // Serializing plain structs of strings and numbers into a Vec cannot fail.
    let result = match &object.spec {
        Spec::Project(p) => serde_json::to_writer(
            &mut *out,
            &Row {
                common,
                columns: ProjectColumns {
                    title: &p.title,
                    description: &p.description,
                    priority: p.priority.value(),
                    owner: p.owner.as_deref(),
                    labels: &object.metadata.labels,
                    suspend: p.suspend,
                },
            },
        ),
        Spec::Task(t) => serde_json::to_writer(
            &mut *out,
            &Row {
                common,
                columns: TaskColumns {
                    project_id: write.project_id.map(|id| id.to_string()),
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
            },
        ),
        Spec::Agent(a) => serde_json::to_writer(
            &mut *out,
            &Row {
                common,
                columns: AgentColumns {
                    agent_type: a.agent_type.as_str(),
                    capabilities: &a.capabilities,
                    models: &a.models,
                    concurrency: a.concurrency,
                    instructions: &a.instructions,
                },
            },
        ),
        Spec::Tool(t) => serde_json::to_writer(
            &mut *out,
            &Row {
                common,
                columns: ToolColumns {
                    description: &t.description,
                    tool_type: t.tool_type.as_str(),
                    created_by: &t.created_by,
                    implementation: serde_json::json!({"command": t.command}),
                },
            },
        ),
    };
    result.expect("rows serialize");
}

fn table_of_key(key: &ObjectKey) -> (&'static str, &str) {
    match key {
        ObjectKey::Project(n) => ("projects", n),
        ObjectKey::Task { name, .. } => ("tasks", name),
        ObjectKey::Agent(n) => ("agents", n),
        ObjectKey::Tool(n) => ("tools", n),
    }
}

/// Projects before tasks: a task row refers to its project's.
const TABLES: [&str; 4] = ["projects", "agents", "tools", "tasks"];

/// A JSON array built one element at a time.
fn json_array<T>(items: &[T], mut write: impl FnMut(&mut Vec<u8>, &T)) -> String {
    let mut out = Vec::with_capacity(items.len() * 512 + 2);
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(&mut out, item);
    }
    out.push(b']');
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// The statements that apply a plan, in order, each with its batch of rows as a JSON array.
/// Lazy: each batch is serialized only when the previous one has been sent.
pub fn batches<'p>(
    plan: &'p Plan<'_>,
    source: &'p str,
    sql: &'static Sql,
) -> impl Iterator<Item = (&'static str, String)> + 'p {
    let revision = plan.revision.as_str();
    let writes = TABLES.into_iter().flat_map(move |table| {
        [(true, &plan.creates), (false, &plan.updates)]
            .into_iter()
            .flat_map(move |(is_create, writes)| {
                let rows: Vec<&Write<'_>> = writes
                    .iter()
                    .filter(|w| table_of_key(&w.object.key()).0 == table)
                    .collect();
                let statements = sql.table(table);
                let statement = if is_create {
                    statements.insert.as_str()
                } else {
                    statements.update.as_str()
                };
                chunked(rows, move |chunk| {
                    json_array(chunk, |out, w| write_row(out, w, source, revision))
                })
                .map(move |json| (statement, json))
            })
    });
    let prunes = TABLES.into_iter().flat_map(move |table| {
        let rows: Vec<&Prune> = plan
            .prunes
            .iter()
            .filter(|p| table_of_key(&p.key).0 == table)
            .collect();
        chunked(rows, |chunk| {
            json_array(chunk, |out, p| {
                let (_, name) = table_of_key(&p.key);
                serde_json::to_writer(
                    out,
                    &serde_json::json!({"id": p.id.to_string(), "name": name}),
                )
                .expect("rows serialize");
            })
        })
        .map(move |json| (sql.table(table).prune.as_str(), json))
    });
    let flags = TABLES.into_iter().flat_map(move |table| {
        let rows: Vec<&Flag> = plan
            .flags
            .iter()
            .filter(|f| table_of_key(&f.key).0 == table)
            .collect();
        chunked(rows, |chunk| {
            json_array(chunk, |out, f| {
                let (_, name) = table_of_key(&f.key);
                serde_json::to_writer(
                    out,
                    &serde_json::json!({"id": f.id.to_string(), "name": name, "message": f.message}),
                )
                .expect("rows serialize");
            })
        })
        .map(move |json| (sql.table(table).flag.as_str(), json))
    });
    let events = chunked(plan.events.iter().collect(), |chunk| {
        json_array(chunk, |out, e| {
            serde_json::to_writer(
                out,
                &serde_json::json!({
                    "id": uuid::Uuid::new_v4().to_string(),
                    "event_type": e.event_type,
                    "payload": e.payload,
                }),
            )
            .expect("rows serialize");
        })
    })
    .map(move |json| (sql.events.as_str(), json));
    writes.chain(prunes).chain(flags).chain(events)
}

fn chunked<T>(
    items: Vec<T>,
    mut render: impl FnMut(&[T]) -> String,
) -> impl Iterator<Item = String> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= items.len() {
            return None;
        }
        let end = (start + BATCH).min(items.len());
        let json = render(&items[start..end]);
        start = end;
        Some(json)
    })
}
