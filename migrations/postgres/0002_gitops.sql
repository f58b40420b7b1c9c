-- 0002 — GitOps columns beside the original ones, and the sync_sources table.
--
-- Every object reconciled from a source (Git or Kubernetes) records where it
-- came from and which version of its spec is in effect:
--   source          name of the sync source (sync_sources.name) or e.g. 'kube';
--                   NULL for rows created through the compatible API
--   path            file path (Git) or namespace/name (Kubernetes) it was read from
--   revision        '<branch>@sha1:<commit>' it was last applied from
--   generation      bumped by the controller each time the spec changes
--   spec_hash       hash of the normalized spec, to skip no-op updates
--   (labels and annotations go to the original `metadata` column; every spec
--   field has a column of its own, so no copy of the whole document is kept)
--   status_message  last reconcile error or note (e.g. 'path:line:col: …')
--
-- Column order matches migrations/sqlite/0002_gitops.sql. Every ADD COLUMN
-- has a constant default, so on Postgres 11+ none of them rewrites the table.
-- JSON columns that the dispatcher iterates over get a shape CHECK so a
-- malformed value fails at write time, not inside jsonb_array_elements().

-- ---------------------------------------------------------------------------
-- projects
-- ---------------------------------------------------------------------------

ALTER TABLE projects
    ADD COLUMN title          text,
    ADD COLUMN owner          text,      -- agent accountable for the project
    ADD COLUMN labels         jsonb NOT NULL DEFAULT '{}'
               CONSTRAINT projects_labels_check CHECK (jsonb_typeof(labels) = 'object'),
    ADD COLUMN suspend        boolean NOT NULL DEFAULT false,
    ADD COLUMN source         text,
    ADD COLUMN path           text,
    ADD COLUMN revision       text,
    ADD COLUMN generation     bigint NOT NULL DEFAULT 0
               CONSTRAINT projects_generation_check CHECK (generation >= 0),
    ADD COLUMN spec_hash      text,
    ADD COLUMN status_message text;

-- Git-managed projects are unique by name; API-created rows (source NULL)
-- keep the original's freedom to repeat a name.
CREATE UNIQUE INDEX ux_projects_name_managed ON projects (name) WHERE source IS NOT NULL;

-- ---------------------------------------------------------------------------
-- tasks
-- ---------------------------------------------------------------------------

ALTER TABLE tasks
    ADD COLUMN name                text,   -- the Git/CR name, unique within its project
    -- Role or agent name from the spec. assigned_to keeps its original
    -- meaning and receives the claiming agent's name at claim time.
    ADD COLUMN assignee            text,
    ADD COLUMN capabilities        jsonb NOT NULL DEFAULT '[]'
               CONSTRAINT tasks_capabilities_check CHECK (jsonb_typeof(capabilities) = 'array'),
    -- Array of 'project/task' strings (always qualified, even within a project).
    ADD COLUMN depends_on          jsonb NOT NULL DEFAULT '[]'
               CONSTRAINT tasks_depends_on_check CHECK (jsonb_typeof(depends_on) = 'array'),
    ADD COLUMN action              jsonb,
    ADD COLUMN output              jsonb,
    ADD COLUMN acceptance_criteria jsonb NOT NULL DEFAULT '[]'
               CONSTRAINT tasks_acceptance_criteria_check
               CHECK (jsonb_typeof(acceptance_criteria) = 'array'),
    ADD COLUMN timeout_seconds     integer
               CONSTRAINT tasks_timeout_seconds_check CHECK (timeout_seconds > 0),
    ADD COLUMN retries             integer NOT NULL DEFAULT 2
               CONSTRAINT tasks_retries_check CHECK (retries >= 0),
    ADD COLUMN attempt             integer NOT NULL DEFAULT 0
               CONSTRAINT tasks_attempt_check CHECK (attempt >= 0),
    ADD COLUMN lease_owner         text,
    ADD COLUMN lease_expires_at    timestamptz,
    -- Fencing token: incremented by every claim; heartbeat/progress/complete/
    -- fail must present the current value or match no row.
    ADD COLUMN run_lease           bigint NOT NULL DEFAULT 0
               CONSTRAINT tasks_run_lease_check CHECK (run_lease >= 0),
    ADD COLUMN not_before          timestamptz,   -- retry backoff: not dispatchable before this
    ADD COLUMN dispatch_revision   text,          -- revision the task was dispatched at
    ADD COLUMN source              text,
    ADD COLUMN path                text,
    ADD COLUMN revision            text,
    ADD COLUMN generation          bigint NOT NULL DEFAULT 0
               CONSTRAINT tasks_generation_check CHECK (generation >= 0),
    ADD COLUMN spec_hash           text,
    ADD COLUMN status_message      text;

CREATE UNIQUE INDEX ux_tasks_project_name ON tasks (project_id, name) WHERE name IS NOT NULL;

-- Dispatchable work: pending tasks by priority, oldest first. `status` is the
-- partial-index predicate rather than a key column (it would be constant).
-- The claim query must order by `priority DESC NULLS LAST, created_at` to be
-- served by it. Readiness (dependencies, not_before, suspended project) is
-- filtered row by row on top of this order.
CREATE INDEX idx_tasks_dispatch ON tasks (priority DESC NULLS LAST, created_at)
    WHERE status = 'pending';

-- No index on lease_expires_at: the expiry sweep looks only at in_progress
-- tasks (bounded by total agent concurrency, found via idx_tasks_status_priority),
-- and an index on a column rewritten by every heartbeat would defeat HOT updates.

-- ---------------------------------------------------------------------------
-- agents
-- ---------------------------------------------------------------------------

ALTER TABLE agents
    ADD COLUMN models         jsonb NOT NULL DEFAULT '[]'   -- tried in order
               CONSTRAINT agents_models_check CHECK (jsonb_typeof(models) = 'array'),
    ADD COLUMN concurrency    integer NOT NULL DEFAULT 1
               CONSTRAINT agents_concurrency_check CHECK (concurrency >= 1),
    ADD COLUMN instructions   text,
    ADD COLUMN source         text,
    ADD COLUMN path           text,
    ADD COLUMN revision       text,
    ADD COLUMN generation     bigint NOT NULL DEFAULT 0
               CONSTRAINT agents_generation_check CHECK (generation >= 0),
    ADD COLUMN spec_hash      text,
    ADD COLUMN status_message text;

-- ---------------------------------------------------------------------------
-- tools
-- ---------------------------------------------------------------------------

ALTER TABLE tools
    ADD COLUMN source         text,
    ADD COLUMN path           text,
    ADD COLUMN revision       text,
    ADD COLUMN generation     bigint NOT NULL DEFAULT 0
               CONSTRAINT tools_generation_check CHECK (generation >= 0),
    ADD COLUMN spec_hash      text,
    ADD COLUMN status_message text;

-- ---------------------------------------------------------------------------
-- sync_sources: one row per configured source, the sync cursor
-- ---------------------------------------------------------------------------

CREATE TABLE sync_sources (
    name      text PRIMARY KEY,
    url       text NOT NULL,
    branch    text NOT NULL,
    path      text NOT NULL DEFAULT '',   -- '' = repository root
    revision  text,                       -- '<branch>@sha1:<commit>' last synced
    tree_oid  text,                       -- tree last synced, base of the next incremental diff
    synced_at timestamptz,
    -- Current errors, e.g. [{"path", "line", "column", "message"}]; [] when clean.
    errors    jsonb NOT NULL DEFAULT '[]'
              CONSTRAINT sync_sources_errors_check CHECK (jsonb_typeof(errors) = 'array')
);

-- ---------------------------------------------------------------------------
-- views
-- ---------------------------------------------------------------------------

-- Postgres froze active_tasks' `t.*` at the 0001 column list. Re-create it so
-- it carries every task column again (original ones first, then the GitOps
-- ones, then project_name and update_count). CREATE OR REPLACE cannot do this
-- because project_name/update_count would change position, hence DROP.
-- agent_activity and project_progress name their columns and are unaffected.
DROP VIEW active_tasks;

CREATE VIEW active_tasks AS
SELECT t.*,
       p.name AS project_name,
       (SELECT count(*) FROM task_updates tu WHERE tu.task_id = t.id) AS update_count
FROM tasks t
LEFT JOIN projects p ON p.id = t.project_id
WHERE t.status IN ('pending', 'in_progress', 'blocked')
ORDER BY t.priority DESC NULLS LAST, t.created_at ASC;
