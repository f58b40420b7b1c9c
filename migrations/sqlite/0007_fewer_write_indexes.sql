-- 0007 — three fewer index entries per dispatched task (see the Postgres migration of the
-- same name). SQLite, like Postgres, counts NULLs as distinct in a unique index.

DROP INDEX ux_tasks_project_name;
CREATE UNIQUE INDEX ux_tasks_project_name ON tasks (project_id, name);
DROP INDEX idx_tasks_project_id;
DROP INDEX idx_tasks_source;
DROP INDEX idx_task_updates_created_at;
