use std::process::ExitCode;

use crate::config::{GlobalConfig, StoreConfig};
use crate::store::{AnyStore, ProjectStatus, SourceStatus, Store};
use crate::with_store;

use super::TableFormat;

pub async fn run(
    global: &GlobalConfig,
    store_cfg: &StoreConfig,
    project: Option<&str>,
    format: TableFormat,
) -> anyhow::Result<ExitCode> {
    let store = AnyStore::connect(&store_cfg.url(global)).await?;
    let (projects, sources) = with_store!(store, store => {
        store.migrate().await?;
        (store.project_status(project).await?, store.source_status().await?)
    });
    match format {
        TableFormat::Json => println!("{}", json(&projects)),
        TableFormat::Table => print!("{}", table(&projects, &sources)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `{"projects":[{"name","status","tasks":[{"name","status","agent","attempt"}]}]}`: the
/// shape scripts rely on, nothing more.
pub fn json(projects: &[ProjectStatus]) -> String {
    let projects: Vec<serde_json::Value> = projects
        .iter()
        .map(|p| {
            let tasks: Vec<serde_json::Value> = p
                .tasks
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "name": t.name, "status": t.status, "agent": t.agent, "attempt": t.attempt,
                    })
                })
                .collect();
            serde_json::json!({"name": p.name, "status": p.status, "tasks": tasks})
        })
        .collect();
    serde_json::json!({ "projects": projects }).to_string()
}

pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m", s / 60),
        3_600..86_400 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

pub fn table(projects: &[ProjectStatus], sources: &[SourceStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for source in sources {
        let _ = writeln!(
            out,
            "source {} {} at {}",
            source.name,
            source.url,
            source.revision.as_deref().unwrap_or("(never synced)")
        );
        for e in &source.errors {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    if projects.is_empty() {
        out.push_str("no projects\n");
        return out;
    }
    let width = projects
        .iter()
        .flat_map(|p| p.tasks.iter().map(|t| t.name.len() + 2))
        .chain(projects.iter().map(|p| p.name.len()))
        .max()
        .unwrap_or(4)
        .max(8);
    for p in projects {
        let done = p.tasks.iter().filter(|t| t.status == "completed").count();
        let _ = writeln!(
            out,
            "\n{:width$}  {:<11}  {done}/{} tasks completed",
            p.name,
            p.status,
            p.tasks.len()
        );
        if let Some(message) = &p.message {
            let _ = writeln!(out, "  ! {message}");
        }
        if !p.tasks.is_empty() {
            let _ = writeln!(
                out,
                "  {:w$}  {:<11}  {:<12}  {:>7}  {:>4}",
                "TASK",
                "PHASE",
                "AGENT",
                "ATTEMPT",
                "AGE",
                w = width - 2
            );
        }
        for t in &p.tasks {
            let _ = writeln!(
                out,
                "  {:w$}  {:<11}  {:<12}  {:>7}  {:>4}",
                t.name,
                t.status,
                t.agent.as_deref().unwrap_or("-"),
                t.attempt,
                age(t.age_seconds),
                w = width - 2
            );
            if let Some(message) = &t.message {
                let _ = writeln!(out, "    ! {message}");
            }
        }
    }
    out
}
