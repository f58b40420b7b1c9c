//! Claims and completions on Postgres: each is one statement, hence one transaction, for
//! the whole batch. The task rows change in a data-modifying CTE, and the `events`,
//! `task_updates`, `artifacts` and `agents` writes hang off its `RETURNING` rows in further
//! CTEs; the batch arrives as one JSON array parameter (`jsonb_to_recordset`), so a batch of
//! any size is one round trip. SQLite has no data-modifying CTEs, hence its own
//! (`queue_sqlite.rs`).

use sqlx::Postgres;

use super::db::{Db, args};
use super::queue::*;
use super::queue_db::{Dispatch, assign, json_text, ready};
use super::{StoreError, query_error};
use crate::dispatch::rules;

/// When task `t` became ready: its last change (the trigger keeps `updated_at`: created,
/// released, retried), the end of its backoff, or its last dependency's completion.
macro_rules! ready_at {
    () => {
        "GREATEST(t.updated_at, t.not_before, CASE WHEN t.depends_on = '[]' THEN NULL ELSE \
         (SELECT max(dt.completed_at) FROM jsonb_array_elements_text(t.depends_on) AS d(dep) \
             JOIN projects dp ON dp.name = split_part(d.dep, '/', 1) \
             JOIN tasks dt ON dt.project_id = dp.id AND dt.name = split_part(d.dep, '/', 2)) END)"
    };
}

/// The event payload every task event carries, for the task rows of `$rows` (with columns
/// id, project_id, name, run_lease, attempt) and the agent `$agent`.
macro_rules! payload {
    ($rows:literal, $agent:literal) => {
        concat!(
            "jsonb_build_object('id', ",
            $rows,
            ".id, ",
            "'project', (SELECT p.name FROM projects p WHERE p.id = ",
            $rows,
            ".project_id), ",
            "'name', ",
            $rows,
            ".name, 'agent', ",
            $agent,
            ", ",
            "'run_lease', ",
            $rows,
            ".run_lease, 'attempt', ",
            $rows,
            ".attempt)"
        )
    };
}

/// Agent `$a`'s `last_active_at` is more than a second old, or… (the condition that follows).
///
/// Claims and completions write an agents row only when they change its status or this
/// holds. They come by the thousand per second, and writing the row on each was a large share
/// of a claim; heartbeats and registrations still write it every time, and liveness allows
/// three heartbeats (30 s by default), so a second's lag is no loss.
macro_rules! stale_or {
    ($a:literal) => {
        concat!(
            "(",
            $a,
            ".last_active_at IS NULL OR ",
            $a,
            ".last_active_at < {now} - interval '1000 milliseconds') OR"
        )
    };
}

/// Agent `$a` holds a task in progress besides those completed in CTE `done`.
macro_rules! holds_more {
    ($a:literal) => {
        concat!(
            "SELECT 1 FROM tasks h WHERE h.lease_owner = ",
            $a,
            ".name AND h.status = 'in_progress' AND h.id NOT IN (SELECT id FROM done)"
        )
    };
}

/// $1 claimers of one pool as [{i, agent, max}], $2 their type, $3 their capabilities, $4 the
/// lease in milliseconds.
///
/// Tasks assigned to a claimer by name go to that claimer (`named`, one index walk each).
/// Tasks assigned to the pool's role are picked once for the whole pool, in claim order, and
/// dealt out over the claimers' free slots round-robin (slot 1 of every claimer, then slot 2…),
/// so a few ready tasks spread over the waiting agents instead of all going to the first.
/// The two sets are disjoint (a claimer named like its role takes only role work), so
/// `SKIP LOCKED` never meets a row this statement locked itself.
pub(super) const CLAIM: &str = concat!(
    "WITH claimers AS (SELECT * FROM jsonb_to_recordset(CAST($1 AS text)::jsonb) \
         AS c(i integer, agent text, max integer)), \
     named AS (SELECT c.agent, n.id, n.priority, n.created_at, n.ready_at FROM claimers c \
         CROSS JOIN LATERAL (SELECT t.id, t.priority, t.created_at, ",
    ready_at!(),
    " AS ready_at FROM tasks t WHERE ",
    ready!(),
    " AND t.assignee = c.agent AND c.agent <> $2 \
         AND (t.capabilities = '[]' OR t.capabilities <@ CAST($3 AS text)::jsonb) \
         ORDER BY t.priority DESC NULLS LAST, t.created_at LIMIT c.max \
         FOR UPDATE OF t SKIP LOCKED) n), \
     free AS (SELECT c.i, c.agent, c.max - (SELECT count(*) FROM named \
         WHERE named.agent = c.agent)::integer AS slots FROM claimers c), \
     picked AS (SELECT t.id, t.priority, t.created_at, ",
    ready_at!(),
    " AS ready_at FROM tasks t WHERE ",
    ready!(),
    " AND t.assignee = $2 \
         AND (t.capabilities = '[]' OR t.capabilities <@ CAST($3 AS text)::jsonb) \
         ORDER BY t.priority DESC NULLS LAST, t.created_at \
         LIMIT (SELECT COALESCE(sum(GREATEST(f.slots, 0)), 0) FROM free f) \
         FOR UPDATE OF t SKIP LOCKED), ",
    // Only slots 1..=P of each claimer can be dealt P picked tasks, and they are exactly the
    // first P slots in dealing order: numbering every free slot (1,600 for fifty idle agents
    // of 32) was half of a claim that found one task.
    "slots AS (SELECT f.agent, row_number() OVER (ORDER BY s.k, f.i) AS n FROM free f \
         CROSS JOIN LATERAL generate_series(1, LEAST(f.slots, \
             (SELECT count(*) FROM picked)::integer)) AS s(k)), \
     dealt AS (SELECT s.agent, p.id, p.ready_at FROM (SELECT id, ready_at, row_number() OVER ( \
             ORDER BY priority DESC NULLS LAST, created_at) AS n FROM picked) p \
         JOIN slots s ON s.n = p.n \
         UNION ALL SELECT agent, id, ready_at FROM named), \
     claimed AS (UPDATE tasks t SET status = 'in_progress', lease_owner = d.agent, \
         assigned_to = d.agent, lease_expires_at = {now} + $4 * interval '1 millisecond', \
         updated_at = {now}, \
         run_lease = t.run_lease + 1, started_at = COALESCE(t.started_at, {now}), \
         claimed_at = {now}, dispatch_revision = t.revision \
     FROM dealt d WHERE t.id = d.id AND t.id = ANY(ARRAY(SELECT id FROM dealt)) \
     RETURNING d.agent, d.ready_at, t.id, t.project_id, t.run_lease, t.attempt, t.priority, t.created_at, \
         t.name, t.title, t.description, t.action, t.output, t.acceptance_criteria, \
         t.timeout_seconds, t.revision, t.lease_expires_at, t.review_comments), \
     events AS (INSERT INTO events (event_type, source_agent, payload) \
         SELECT 'task.claimed', c.agent, ",
    payload!("c", "c.agent"),
    " FROM claimed c), ",
    // Rows of `agents` are locked in name order, as every statement that touches several of
    // them does, so that a claim and a batch of completions cannot deadlock.
    "agent AS (UPDATE agents a SET last_active_at = {now}, \
         status = CASE WHEN EXISTS (SELECT 1 FROM claimed c WHERE c.agent = a.name) \
             THEN 'busy' ELSE a.status END \
         WHERE a.name IN (SELECT l.name FROM agents l WHERE l.name IN \
             (SELECT agent FROM claimers) AND (",
    stale_or!("l"),
    " (l.status <> 'busy' AND EXISTS (SELECT 1 FROM claimed c WHERE c.agent = l.name))) \
             ORDER BY l.name FOR UPDATE)) \
     SELECT c.agent, {time:c.ready_at} AS ready_at, CAST(c.id AS text) AS id, c.run_lease, \
         c.attempt, CAST(c.priority AS bigint) AS priority, {time:c.created_at} AS created_at, \
         COALESCE((SELECT p.name FROM projects p WHERE p.id = c.project_id), '') AS project, \
         COALESCE(c.name, '') AS name, c.title, COALESCE(c.description, '') AS description, \
         CAST(c.action AS text) AS action, CAST(c.output AS text) AS output, \
         CAST(c.acceptance_criteria AS text) AS acceptance_criteria, c.timeout_seconds, \
         c.revision, {time:c.lease_expires_at} AS lease_expires_at, c.review_comments \
     FROM claimed c"
);

/// $1 completions as [`CompletionRow`], each naming its agent.
///
/// The tasks are found by primary key (`= ANY(ARRAY(...))`): left to itself, the planner read
/// every task in progress through `idx_tasks_held` and hashed them against the input.
pub(super) const COMPLETE: &str = concat!(
    "WITH input AS (SELECT * FROM jsonb_to_recordset(CAST($1 AS text)::jsonb) \
         AS r(i integer, agent text, id uuid, run_lease bigint, result jsonb, review boolean, \
             message text, artifacts jsonb)), \
     done AS (UPDATE tasks t SET \
         status = CASE WHEN r.review THEN 'review' ELSE 'completed' END, \
         completed_at = CASE WHEN r.review THEN NULL ELSE {now} END, result = r.result, \
         lease_owner = NULL, lease_expires_at = NULL, status_message = NULL, updated_at = {now} \
         FROM input r WHERE t.id = r.id AND t.run_lease = r.run_lease AND t.lease_owner = r.agent \
         AND t.status = 'in_progress' AND t.id = ANY(ARRAY(SELECT id FROM input)) \
         RETURNING r.i, r.agent, t.id, t.project_id, t.name, t.run_lease, t.attempt, t.status), \
     updates AS (INSERT INTO task_updates (task_id, agent_name, update_type, message) \
         SELECT d.id, d.agent, 'completion', r.message FROM done d JOIN input r ON r.i = d.i), \
     stored AS (INSERT INTO artifacts (task_id, agent_name, artifact_type, name, s3_key, \
         size_bytes, mime_type) \
         SELECT d.id, d.agent, a.type, a.name, a.key, a.size_bytes, a.mime_type \
         FROM done d JOIN input r ON r.i = d.i \
         CROSS JOIN LATERAL jsonb_to_recordset(r.artifacts) \
             AS a(name text, type text, key text, size_bytes bigint, mime_type text)), \
     events AS (INSERT INTO events (event_type, source_agent, payload) \
         SELECT CASE WHEN d.status = 'review' THEN 'task.review' ELSE 'task.completed' END, \
             d.agent, ",
    payload!("d", "d.agent"),
    " FROM done d), ",
    // In name order, like the claim: see there.
    "agent AS (UPDATE agents a SET last_active_at = {now}, status = CASE \
         WHEN a.status = 'busy' AND NOT EXISTS (",
    holds_more!("a"),
    ") THEN 'idle' ELSE a.status END \
         WHERE a.name IN (SELECT l.name FROM agents l WHERE l.name IN \
             (SELECT agent FROM done) AND (",
    stale_or!("l"),
    " (l.status = 'busy' AND NOT EXISTS (",
    holds_more!("l"),
    "))) ORDER BY l.name FOR UPDATE)) \
     SELECT r.i, CASE WHEN d.i IS NOT NULL THEN 0 \
         WHEN EXISTS (SELECT 1 FROM tasks x WHERE x.id = r.id) THEN 1 ELSE 2 END AS outcome \
     FROM input r LEFT JOIN done d ON d.i = r.i"
);

/// $1 after which entry, $2 how many events: the entries from there on until they hold $2
/// events (the last one may take the batch past $2: an entry is published whole), each event
/// in the order its statement wrote it. An entry whose event is gone comes with an empty
/// event, and so does one without events, so that both are cleared.
///
/// The events are fetched by primary key (`= ANY(ARRAY(...))`): joined plainly, the planner
/// may hash the whole `events` table on every pass, which cost 20–35 ms a pass with a few
/// ten thousand events and grows with the table.
pub(super) const UNPUBLISHED: &str = "\
    WITH o AS MATERIALIZED (SELECT seq, event_ids FROM ( \
            SELECT seq, event_ids, sum(cardinality(event_ids)) OVER (ORDER BY seq) \
                - cardinality(event_ids) AS before \
            FROM (SELECT seq, event_ids FROM event_outbox WHERE seq > $1 \
                ORDER BY seq LIMIT $2) first_entries) counted \
        WHERE before < $2), \
    ids AS MATERIALIZED (SELECT o.seq, u.id, u.n FROM o \
        LEFT JOIN LATERAL unnest(o.event_ids) WITH ORDINALITY AS u(id, n) ON true) \
    SELECT ids.seq, CAST(e.id AS text) AS id, e.event_type, e.source_agent, e.target_agent, \
        CAST(e.payload AS text) AS payload, {time:e.created_at} AS created_at \
    FROM ids LEFT JOIN events e ON e.id = ids.id \
        AND e.id = ANY(ARRAY(SELECT id FROM ids WHERE id IS NOT NULL)) \
    ORDER BY ids.seq, ids.n";

impl Dispatch for Postgres {
    async fn claim(
        db: &Db<Self>,
        claimers: &[Claimer],
        policy: &LeasePolicy,
    ) -> Result<Vec<Vec<Assignment>>, StoreError> {
        let mut answers = vec![Vec::new(); claimers.len()];
        for pool in rules::pools(claimers) {
            let input: Vec<serde_json::Value> = pool
                .iter()
                .filter(|&&i| claimers[i].max > 0)
                .map(|&i| {
                    let max = i32::try_from(claimers[i].max).unwrap_or(i32::MAX);
                    serde_json::json!({"i": i, "agent": claimers[i].agent.name, "max": max})
                })
                .collect();
            if input.is_empty() {
                continue;
            }
            let (agent_type, capabilities) = claimers[pool[0]].pool();
            let (input, capabilities) = (json_text(&input)?, json_text(&capabilities)?);
            let args = args![&input, agent_type, &capabilities, millis(policy.lease)];
            let rows = db.rows(&db.sql.queue.claim, args, "claiming tasks").await?;
            assign(&mut answers, claimers, rows)?;
        }
        Ok(answers)
    }

    async fn complete(
        db: &Db<Self>,
        completions: &[AgentCompletion<'_>],
    ) -> Result<Vec<Result<(), Refusal>>, StoreError> {
        let (rows, repeats) = completion_rows(completions);
        let outcomes: Vec<(i32, i32)> = sqlx::query_as(db.sql.queue.complete.as_str())
            .bind(json_text(&rows)?)
            .fetch_all(db.pool())
            .await
            .map_err(query_error("completing tasks"))?;
        let mut sent = vec![None; completions.len()];
        for (i, outcome) in outcomes {
            let answer = match outcome {
                0 => Ok(()),
                1 => Err(Refusal::NotHeld),
                _ => Err(Refusal::NoTask),
            };
            if let Some(slot) = usize::try_from(i).ok().and_then(|i| sent.get_mut(i)) {
                *slot = Some(answer);
            }
        }
        Ok(rules::completion_answers(sent, &repeats))
    }
}
