-- 0007 — three fewer index entries per dispatched task.
--
-- Each claim and completion writes a new version of its task row (not HOT: `status` is in
-- the partial indexes' predicates), so every index of `tasks` that covers the row gets an
-- entry; each completion also writes a task_updates row. Measured on the claim and completion
-- statements alone (a 20,000-task drain in one session), these three cost 5–10 % of their time.

-- (project_id, name) unique for every row, not just named ones: Postgres counts NULLs as
-- distinct, so no row that fit before is refused now, and the full index serves lookups by
-- project_id (the cascade from projects, listings) that needed an index of their own.
DROP INDEX ux_tasks_project_name;
CREATE UNIQUE INDEX ux_tasks_project_name ON tasks (project_id, name);
DROP INDEX idx_tasks_project_id;

-- Every task of a Git source has the same few values here (one per source), so the index
-- never narrowed a lookup: reading a source's tasks reads nearly the whole table either way.
DROP INDEX idx_tasks_source;

-- Nothing reads task updates across tasks by time; they are read per task (task_id).
DROP INDEX idx_task_updates_created_at;
