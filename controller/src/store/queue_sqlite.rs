//! Claims and completions on SQLite. SQLite has one writer and no data-modifying CTEs, so
//! each is one `BEGIN IMMEDIATE` transaction of a few set-based statements: the tasks are
//! picked, then changed in one `UPDATE … RETURNING` for the whole batch, and the `events`,
//! `task_updates` and `artifacts` rows follow from one JSON array parameter each.

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};
use sqlx::Sqlite;

use super::StoreError;
use super::db::{Db, args, commit, rows_on, run_on};
use super::queue::*;
use super::queue_db::{
    AssignmentRow, Dispatch, TaskRow, agent_ended, assign, event, events, json_text, returning,
    update, updates,
};
use crate::dispatch::rules;

/// $1 the tasks dealt as [{id, agent}], $2 the lease (ms).
pub(super) const CLAIM: &str = "UPDATE tasks SET status = 'in_progress', lease_owner = r.agent, \
    assigned_to = r.agent, lease_expires_at = {after:2}, run_lease = run_lease + 1, \
    started_at = COALESCE(started_at, {now}), claimed_at = {now}, dispatch_revision = revision \
    FROM {rows:id uuid,agent text} WHERE tasks.id = r.id AND tasks.status = 'pending' \
    RETURNING lease_owner AS agent, id, run_lease, attempt, priority, created_at, \
    max(updated_at, COALESCE(not_before, updated_at), COALESCE((SELECT max(dt.completed_at) \
        FROM json_each(tasks.depends_on) d \
        JOIN projects dp ON dp.name = substr(d.value, 1, instr(d.value, '/') - 1) \
        JOIN tasks dt ON dt.project_id = dp.id \
            AND dt.name = substr(d.value, instr(d.value, '/') + 1)), updated_at)) AS ready_at, \
    COALESCE((SELECT p.name FROM projects p WHERE p.id = tasks.project_id), '') AS project, \
    COALESCE(name, '') AS name, title, COALESCE(description, '') AS description, action, \
    output, acceptance_criteria, timeout_seconds, revision, lease_expires_at, review_comments";

/// $1 completions as [`CompletionRow`].
///
/// Sets `updated_at` itself, so that the `tasks_set_updated_at` trigger does not update every
/// completed row a second time. (The claim cannot: its `RETURNING` reads `updated_at` as the
/// moment the task became ready.)
pub(super) const COMPLETE: &str = concat!(
    "UPDATE tasks SET status = CASE WHEN r.review THEN 'review' ELSE 'completed' END, \
     completed_at = CASE WHEN r.review THEN NULL ELSE {now} END, result = r.result, \
     lease_owner = NULL, lease_expires_at = NULL, status_message = NULL, updated_at = {now} \
     FROM {rows:id uuid,run_lease bigint,agent text,result json,review boolean} \
     WHERE tasks.id = r.id AND tasks.run_lease = r.run_lease AND tasks.lease_owner = r.agent \
     AND tasks.status = 'in_progress'",
    returning!()
);

/// $1 after which entry, $2 how many: one event an entry, as SQLite's row triggers write
/// them, so the entries need not be counted by their events as on Postgres. An entry whose
/// event is gone comes with an empty event.
pub(super) const UNPUBLISHED: &str = "\
    SELECT o.seq, e.id, e.event_type, e.source_agent, e.target_agent, e.payload, e.created_at \
    FROM (SELECT seq, event_ids FROM event_outbox WHERE seq > $1 ORDER BY seq LIMIT $2) o \
    LEFT JOIN json_each(o.event_ids) u ON true LEFT JOIN events e ON e.id = u.value \
    ORDER BY o.seq, u.key";

impl Dispatch for Sqlite {
    /// As on Postgres, per pool: the tasks named for each claimer first, then the pool's role
    /// tasks, picked once in claim order and dealt over the claimers' free slots round-robin
    /// ([`deal`]). Nothing can take a task between the pick and the update: SQLite has one
    /// writer, and the transaction holds the write lock from its start.
    async fn claim(
        db: &Db<Self>,
        claimers: &[Claimer],
        policy: &LeasePolicy,
    ) -> Result<Vec<Vec<Assignment>>, StoreError> {
        if claimers.iter().all(|c| c.max == 0) {
            return Ok(vec![Vec::new(); claimers.len()]);
        }
        let sql = &db.sql.queue;
        let mut tx = db.begin().await?;
        let names: Vec<&str> = claimers
            .iter()
            .filter(|c| c.agent.name != c.agent.agent_type)
            .map(|c| c.agent.name.as_str())
            .collect();
        let names = json_text(&names)?;
        let doing = "looking for tasks assigned by name";
        let named: Vec<(String,)> =
            rows_on::<Sqlite, _>(&mut tx, &sql.named_pending, args![&names], doing).await?;
        let named: HashSet<String> = named.into_iter().map(|(n,)| n).collect();
        let mut dealt: Vec<Value> = Vec::new();
        let mut picked: HashSet<String> = HashSet::new();
        for pool in rules::pools(claimers) {
            let pool: Vec<usize> = pool.into_iter().filter(|&i| claimers[i].max > 0).collect();
            let Some(&first) = pool.first() else { continue };
            let (role, capabilities) = claimers[first].pool();
            let capabilities = json_text(&capabilities)?;
            let mut free = Vec::with_capacity(pool.len());
            for &i in &pool {
                let (name, max) = (&claimers[i].agent.name, i64::from(claimers[i].max));
                let mut taken = 0;
                if named.contains(name) {
                    let args = args![name, &capabilities, max];
                    let ids: Vec<(String,)> =
                        rows_on::<Sqlite, _>(&mut tx, &sql.pick, args, "picking tasks").await?;
                    taken = ids.len() as i64;
                    dealt.extend(
                        ids.into_iter()
                            .map(|(id,)| json!({"id": id, "agent": name})),
                    );
                }
                free.push(u32::try_from(max - taken).unwrap_or(0));
            }
            let room: i64 = free.iter().map(|&f| i64::from(f)).sum();
            if room > 0 {
                // Tasks another pool of this round picked are not leased yet, so they are
                // still found here: asked for beyond them, and passed over.
                let args = args![role, &capabilities, room + picked.len() as i64];
                let ids: Vec<(String,)> =
                    rows_on::<Sqlite, _>(&mut tx, &sql.pick, args, "picking tasks").await?;
                let ids: Vec<(String,)> = ids
                    .into_iter()
                    .filter(|(id,)| !picked.contains(id))
                    .take(room as usize)
                    .collect();
                picked.extend(ids.iter().map(|(id,)| id.clone()));
                let slots = rules::deal(&free, ids.len());
                for ((id,), slot) in ids.into_iter().zip(slots) {
                    dealt.push(json!({"id": id, "agent": claimers[pool[slot]].agent.name}));
                }
            }
        }
        let rows: Vec<AssignmentRow> = if dealt.is_empty() {
            Vec::new()
        } else {
            let dealt = json_text(&dealt)?;
            let args = args![&dealt, millis(policy.lease)];
            rows_on::<Sqlite, _>(&mut tx, &sql.claim, args, "claiming tasks").await?
        };
        let claimed: Vec<Value> = rows
            .iter()
            .map(|r| {
                let payload = json!({"id": r.id, "project": r.project, "name": r.name,
                    "agent": r.agent, "run_lease": r.run_lease, "attempt": r.attempt});
                event("task.claimed", &r.agent, payload)
            })
            .collect();
        events(db, &mut tx, &claimed).await?;
        for claimer in claimers.iter().filter(|c| c.max > 0) {
            let name = claimer.agent.name.as_str();
            let took = rows.iter().any(|r| r.agent == name);
            let args = args![name, took, 1000];
            let doing = "updating the agent";
            run_on::<Sqlite>(&mut tx, &sql.agent_claimed, args, doing).await?;
        }
        commit(tx, "committing a claim").await?;
        let mut answers = vec![Vec::new(); claimers.len()];
        assign(&mut answers, claimers, rows)?;
        Ok(answers)
    }

    async fn complete(
        db: &Db<Self>,
        completions: &[AgentCompletion<'_>],
    ) -> Result<Vec<Result<(), Refusal>>, StoreError> {
        let sql = &db.sql.queue;
        let (rows, repeats) = completion_rows(completions);
        let mut tx = db.begin().await?;
        let input = json_text(&rows)?;
        let done: Vec<TaskRow> =
            rows_on::<Sqlite, _>(&mut tx, &sql.complete, args![&input], "completing tasks").await?;
        let done_keys: HashSet<(&str, i64)> =
            done.iter().map(|d| (d.id.as_str(), d.run_lease)).collect();
        let (accepted, refused): (Vec<&CompletionRow<'_>>, Vec<&CompletionRow<'_>>) = rows
            .iter()
            .partition(|r| done_keys.contains(&(r.id.as_str(), r.run_lease)));
        let found: HashSet<String> = if refused.is_empty() {
            HashSet::new()
        } else {
            let ids: Vec<Value> = refused.iter().map(|r| json!({"id": r.id})).collect();
            let ids = json_text(&ids)?;
            let found: Vec<(String,)> =
                rows_on::<Sqlite, _>(&mut tx, &sql.found, args![&ids], "looking up tasks").await?;
            found.into_iter().map(|(id,)| id).collect()
        };
        if !accepted.is_empty() {
            let task_updates: Vec<Value> = accepted
                .iter()
                .map(|r| update(&r.id, r.agent, "completion", &r.message))
                .collect();
            updates(db, &mut tx, &task_updates).await?;
            let artifacts: Vec<Value> = accepted
                .iter()
                .flat_map(|r| {
                    r.artifacts.iter().map(|a| {
                        json!({"id": r.id, "agent": r.agent, "type": a.artifact_type,
                            "name": a.name, "key": a.key, "size_bytes": a.size_bytes,
                            "mime_type": a.mime_type})
                    })
                })
                .collect();
            if !artifacts.is_empty() {
                let artifacts = json_text(&artifacts)?;
                let doing = "recording artifacts";
                run_on::<Sqlite>(&mut tx, &sql.artifacts, args![&artifacts], doing).await?;
            }
            let agents: HashMap<(&str, i64), &str> = accepted
                .iter()
                .map(|r| ((r.id.as_str(), r.run_lease), r.agent))
                .collect();
            let completed: Vec<Value> = done
                .iter()
                .map(|d| {
                    let agent = agents
                        .get(&(d.id.as_str(), d.run_lease))
                        .copied()
                        .unwrap_or_default();
                    let kind = match d.status.as_str() {
                        "review" => "task.review",
                        _ => "task.completed",
                    };
                    event(kind, agent, d.payload(Some(agent)))
                })
                .collect();
            events(db, &mut tx, &completed).await?;
        }
        let mut reporting: Vec<&str> = rows.iter().map(|r| r.agent).collect();
        reporting.sort_unstable();
        reporting.dedup();
        for agent in reporting {
            agent_ended(db, &mut tx, agent).await?;
        }
        commit(tx, "committing completions").await?;
        let mut sent = vec![None; completions.len()];
        for r in &accepted {
            sent[r.i] = Some(Ok(()));
        }
        for r in &refused {
            sent[r.i] = Some(Err(if found.contains(&r.id) {
                Refusal::NotHeld
            } else {
                Refusal::NoTask
            }));
        }
        Ok(rules::completion_answers(sent, &repeats))
    }
}
