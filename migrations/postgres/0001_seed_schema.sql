-- 0001 — the original AgentOps data model.
--
-- Eight tables, three views, their indexes and the two initial agents, kept
-- column-for-column compatible with the system this project replaces: same
-- names, types, nullability, defaults and value sets. The only deliberate
-- additions are CHECK constraints for every value set (the original let bad
-- values through and answered HTTP 500) and task status `review`.
--
-- Conventions shared with migrations/sqlite/0001_seed_schema.sql:
--   * Column order is identical in both dialects, so `SELECT *` and the
--     `t.*` in active_tasks give the same columns in the same order.
--   * CHECK constraints carry explicit names (<table>_<column>_check) so the
--     store can turn a violation into a 400 with the same code on both backends.
--   * `metadata` comes last in each table: the original model gives it to every
--     table but does not place it.
--   * NULL priority sorts last everywhere. SQLite does that by default for
--     DESC; Postgres is told so explicitly (views and priority indexes). The
--     dispatcher's ORDER BY should read `priority DESC NULLS LAST, created_at`,
--     which both dialects accept and which matches idx_tasks_dispatch (0002).
--
-- gen_random_uuid() is built into Postgres 13+; no extension needed.
-- sqlx runs this file in one transaction: no BEGIN/COMMIT here.

-- ---------------------------------------------------------------------------
-- updated_at maintenance
-- ---------------------------------------------------------------------------

-- Bumps updated_at on every UPDATE unless the statement itself changed
-- updated_at. Same rule as the SQLite trigger (which needs that guard to
-- avoid re-triggering), so both backends behave alike. now() is the
-- transaction's start time, consistent with the created_at/updated_at defaults.
CREATE FUNCTION set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

-- ---------------------------------------------------------------------------
-- projects
-- ---------------------------------------------------------------------------

CREATE TABLE projects (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text NOT NULL,
    description  text,
    status       text NOT NULL DEFAULT 'active'
                 CONSTRAINT projects_status_check
                 CHECK (status IN ('active', 'completed', 'paused', 'cancelled')),
    priority     integer DEFAULT 50
                 CONSTRAINT projects_priority_check
                 CHECK (priority BETWEEN 0 AND 100),
    created_at   timestamptz DEFAULT now(),
    updated_at   timestamptz DEFAULT now(),
    completed_at timestamptz,
    metadata     jsonb DEFAULT '{}'
);

CREATE TRIGGER projects_set_updated_at
    BEFORE UPDATE ON projects
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE INDEX idx_projects_status     ON projects (status);
CREATE INDEX idx_projects_name       ON projects (name);
CREATE INDEX idx_projects_priority   ON projects (priority DESC NULLS LAST);
CREATE INDEX idx_projects_created_at ON projects (created_at DESC);

-- ---------------------------------------------------------------------------
-- tasks
-- ---------------------------------------------------------------------------

CREATE TABLE tasks (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Nullable as in the original (only task_updates.task_id was NOT NULL).
    project_id   uuid REFERENCES projects (id) ON DELETE CASCADE,
    title        text NOT NULL,
    description  text,
    -- The original six plus `review` (output pull request awaiting merge).
    status       text NOT NULL DEFAULT 'pending'
                 CONSTRAINT tasks_status_check
                 CHECK (status IN ('pending', 'in_progress', 'blocked', 'review',
                                   'completed', 'failed', 'cancelled')),
    -- An agent name or a role ('seed', 'cos'); set to the claiming agent's
    -- name at claim time. Deliberately not a foreign key (roles are not rows).
    assigned_to  text,
    -- The original model states the 0–100 range for projects; task priorities
    -- have the same range, so it is checked here too.
    priority     integer DEFAULT 50
                 CONSTRAINT tasks_priority_check
                 CHECK (priority BETWEEN 0 AND 100),
    created_at   timestamptz DEFAULT now(),
    updated_at   timestamptz DEFAULT now(),
    started_at   timestamptz,
    completed_at timestamptz,
    result       jsonb,
    error        text,
    metadata     jsonb DEFAULT '{}'
);

CREATE TRIGGER tasks_set_updated_at
    BEFORE UPDATE ON tasks
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE INDEX idx_tasks_project_id      ON tasks (project_id);
-- Serves every lookup by status as well (leading column), so there is no
-- separate single-column index on tasks.status: it would only add write cost
-- on the busiest table.
CREATE INDEX idx_tasks_status_priority ON tasks (status, priority DESC NULLS LAST);
-- Not a status/type/name/FK column, but GET /tasks?assigned_to= filters on it
-- and agent_activity joins on it.
CREATE INDEX idx_tasks_assigned_to     ON tasks (assigned_to);
CREATE INDEX idx_tasks_created_at      ON tasks (created_at DESC);

-- ---------------------------------------------------------------------------
-- task_updates
-- ---------------------------------------------------------------------------

CREATE TABLE task_updates (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    task_id     uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    agent_name  text NOT NULL,
    update_type text NOT NULL
                CONSTRAINT task_updates_update_type_check
                CHECK (update_type IN ('progress', 'question', 'completion', 'error', 'info')),
    message     text NOT NULL,
    created_at  timestamptz DEFAULT now(),
    metadata    jsonb DEFAULT '{}'
);

CREATE INDEX idx_task_updates_task_id     ON task_updates (task_id);
CREATE INDEX idx_task_updates_agent_name  ON task_updates (agent_name);
CREATE INDEX idx_task_updates_update_type ON task_updates (update_type);
CREATE INDEX idx_task_updates_created_at  ON task_updates (created_at DESC);

-- ---------------------------------------------------------------------------
-- agents
-- ---------------------------------------------------------------------------

CREATE TABLE agents (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name           text NOT NULL UNIQUE,   -- the unique index also serves name lookups
    type           text NOT NULL
                   CONSTRAINT agents_type_check
                   CHECK (type IN ('cos', 'seed', 'specialist', 'meta')),
    status         text NOT NULL DEFAULT 'idle'
                   CONSTRAINT agents_status_check
                   CHECK (status IN ('idle', 'busy', 'offline', 'error')),
    capabilities   jsonb DEFAULT '[]',
    created_by     text,                   -- the agent that created it
    created_at     timestamptz DEFAULT now(),
    last_active_at timestamptz,
    metadata       jsonb DEFAULT '{}'
);

CREATE INDEX idx_agents_type       ON agents (type);
CREATE INDEX idx_agents_status     ON agents (status);
CREATE INDEX idx_agents_created_at ON agents (created_at DESC);

-- ---------------------------------------------------------------------------
-- events
-- ---------------------------------------------------------------------------

CREATE TABLE events (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_type   text NOT NULL,            -- open set ('task.created', …): no CHECK
    source_agent text,
    target_agent text,
    payload      jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz DEFAULT now(),
    processed_at timestamptz,
    metadata     jsonb DEFAULT '{}'
);

CREATE INDEX idx_events_event_type  ON events (event_type);
CREATE INDEX idx_events_created_at  ON events (created_at DESC);
-- Unprocessed events in arrival order; stays small because processed rows leave it.
CREATE INDEX idx_events_unprocessed ON events (created_at) WHERE processed_at IS NULL;

-- ---------------------------------------------------------------------------
-- artifacts
-- ---------------------------------------------------------------------------

CREATE TABLE artifacts (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    task_id       uuid REFERENCES tasks (id) ON DELETE CASCADE,
    agent_name    text NOT NULL,
    artifact_type text NOT NULL
                  CONSTRAINT artifacts_artifact_type_check
                  CHECK (artifact_type IN ('code', 'document', 'image', 'data', 'log', 'other')),
    name          text NOT NULL,
    s3_key        text NOT NULL,           -- object-storage key
    size_bytes    bigint,
    mime_type     text,
    created_at    timestamptz DEFAULT now(),
    metadata      jsonb DEFAULT '{}'
);

CREATE INDEX idx_artifacts_task_id       ON artifacts (task_id);
CREATE INDEX idx_artifacts_agent_name    ON artifacts (agent_name);
CREATE INDEX idx_artifacts_artifact_type ON artifacts (artifact_type);
CREATE INDEX idx_artifacts_name          ON artifacts (name);
CREATE INDEX idx_artifacts_created_at    ON artifacts (created_at DESC);

-- ---------------------------------------------------------------------------
-- tools
-- ---------------------------------------------------------------------------

CREATE TABLE tools (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name           text NOT NULL UNIQUE,
    description    text,
    created_by     text NOT NULL,
    tool_type      text NOT NULL
                   CONSTRAINT tools_tool_type_check
                   CHECK (tool_type IN ('function', 'api', 'script', 'service')),
    implementation jsonb NOT NULL,
    usage_count    integer DEFAULT 0,
    created_at     timestamptz DEFAULT now(),
    last_used_at   timestamptz,
    metadata       jsonb DEFAULT '{}'
);

CREATE INDEX idx_tools_tool_type  ON tools (tool_type);
CREATE INDEX idx_tools_created_at ON tools (created_at DESC);

-- ---------------------------------------------------------------------------
-- model_usage (one row per LLM call)
-- ---------------------------------------------------------------------------

CREATE TABLE model_usage (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_name         text NOT NULL,
    model_name         text NOT NULL,
    provider           text NOT NULL,
    -- SET NULL, not CASCADE: spend stays on the books when a task is deleted.
    task_id            uuid REFERENCES tasks (id) ON DELETE SET NULL,
    prompt_tokens      integer,
    completion_tokens  integer,
    total_tokens       integer,
    estimated_cost_usd numeric(10, 6),
    created_at         timestamptz DEFAULT now(),
    metadata           jsonb DEFAULT '{}'
);

CREATE INDEX idx_model_usage_agent_name ON model_usage (agent_name);
CREATE INDEX idx_model_usage_model_name ON model_usage (model_name);
CREATE INDEX idx_model_usage_task_id    ON model_usage (task_id);
CREATE INDEX idx_model_usage_created_at ON model_usage (created_at DESC);

-- ---------------------------------------------------------------------------
-- views
-- ---------------------------------------------------------------------------

-- Every task column plus project_name and update_count, for open tasks.
-- `review` is deliberately not included: the original definition lists
-- pending, in_progress and blocked, and /stats/overview's "active tasks"
-- count comes from here. Note that Postgres expands t.* when the view is
-- created; 0002 re-creates this view so it carries the GitOps task columns.
CREATE VIEW active_tasks AS
SELECT t.*,
       p.name AS project_name,
       (SELECT count(*) FROM task_updates tu WHERE tu.task_id = t.id) AS update_count
FROM tasks t
LEFT JOIN projects p ON p.id = t.project_id
WHERE t.status IN ('pending', 'in_progress', 'blocked')
ORDER BY t.priority DESC NULLS LAST, t.created_at ASC;

-- Per agent; tasks are matched on assigned_to = agent name (roles such as
-- 'seed' therefore count for the agent named 'seed').
CREATE VIEW agent_activity AS
SELECT a.name,
       a.type,
       a.status,
       count(t.id)                                        AS tasks_assigned,
       count(t.id) FILTER (WHERE t.status = 'completed')  AS tasks_completed,
       count(t.id) FILTER (WHERE t.status = 'failed')     AS tasks_failed,
       a.last_active_at
FROM agents a
LEFT JOIN tasks t ON t.assigned_to = a.name
GROUP BY a.id, a.name, a.type, a.status, a.last_active_at;

CREATE VIEW project_progress AS
SELECT p.id,
       p.name,
       p.status,
       p.priority,
       count(t.id)                                         AS total_tasks,
       count(t.id) FILTER (WHERE t.status = 'completed')   AS completed_tasks,
       count(t.id) FILTER (WHERE t.status = 'in_progress') AS in_progress_tasks,
       count(t.id) FILTER (WHERE t.status = 'pending')     AS pending_tasks,
       count(t.id) FILTER (WHERE t.status = 'failed')      AS failed_tasks,
       p.created_at,
       p.completed_at
FROM projects p
LEFT JOIN tasks t ON t.project_id = p.id
GROUP BY p.id, p.name, p.status, p.priority, p.created_at, p.completed_at;

-- ---------------------------------------------------------------------------
-- initial rows
-- ---------------------------------------------------------------------------

INSERT INTO agents (name, type, capabilities) VALUES
    ('cos',  'cos',  '["task_management", "agent_creation", "strategic_planning", "communication"]'),
    ('seed', 'seed', '["task_execution", "tool_creation", "agent_creation", "general_purpose"]')
ON CONFLICT (name) DO NOTHING;
