-- 0001 — the original AgentOps data model,
-- SQLite dialect of migrations/postgres/0001_seed_schema.sql: same tables,
-- columns (in the same order), CHECK constraint names, views, indexes and
-- initial rows.
--
-- Type mapping:
--   uuid          TEXT, lowercase hyphenated ('xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx').
--                 The application supplies ids; the default is a random v4 uuid.
--   jsonb         TEXT holding JSON, CHECK json_valid() (Postgres rejects bad
--                 JSON by type; this keeps the backends alike). Nullable
--                 columns say `x IS NULL OR json_valid(x)` because
--                 json_valid(NULL) is 0, not NULL, in some SQLite versions.
--   timestamptz   TEXT, RFC 3339 UTC with exactly three fractional digits and 'Z',
--                 e.g. '2025-01-31T09:15:02.123Z': the format of
--                 strftime('%Y-%m-%dT%H:%M:%fZ','now'). A CHECK enforces the
--                 shape because the store compares these as text
--                 (lease_expires_at < now, not_before <= now, ORDER BY
--                 created_at), which orders correctly only with one fixed-width
--                 format. NB: sqlx binds a chrono DateTime as '+00:00' with a
--                 variable fraction, which this CHECK rejects; bind
--                 `dt.to_rfc3339_opts(SecondsFormat::Millis, true)` instead.
--   numeric(10,6) REAL
--   boolean       INTEGER 0/1 (CHECK)
--   int/bigint    INTEGER
--
-- Tables are STRICT (SQLite 3.37+; sqlx bundles a newer one) so a value of
-- the wrong type is an error instead of being stored as is. In particular
-- sqlx binds uuid::Uuid as a 16-byte BLOB, which would never equal the TEXT
-- ids here; STRICT turns that into an immediate "cannot store BLOB value in
-- TEXT column" error. Bind ids as text (uuid.hyphenated() / to_string()).
--
-- `id TEXT PRIMARY KEY` is also NOT NULL: SQLite otherwise allows NULL in a
-- non-integer primary key (a historical quirk).
--
-- Foreign keys are enforced only on connections with PRAGMA foreign_keys=ON;
-- sqlx's SqliteConnectOptions turns it on by default.
--
-- sqlx runs this file in one transaction: no BEGIN/COMMIT and no PRAGMA
-- that would need to run outside one.

-- ---------------------------------------------------------------------------
-- projects
-- ---------------------------------------------------------------------------

CREATE TABLE projects (
    id           TEXT NOT NULL PRIMARY KEY DEFAULT (lower(
                     hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' ||
                     substr(hex(randomblob(2)), 2) || '-' ||
                     substr('89ab', 1 + (random() & 3), 1) || substr(hex(randomblob(2)), 2) || '-' ||
                     hex(randomblob(6)))),
    name         TEXT NOT NULL,
    description  TEXT,
    status       TEXT NOT NULL DEFAULT 'active'
                 CONSTRAINT projects_status_check
                 CHECK (status IN ('active', 'completed', 'paused', 'cancelled')),
    priority     INTEGER DEFAULT 50
                 CONSTRAINT projects_priority_check
                 CHECK (priority BETWEEN 0 AND 100),
    created_at   TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                 CHECK (created_at GLOB '????-??-??T??:??:??.???Z'),
    updated_at   TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                 CHECK (updated_at GLOB '????-??-??T??:??:??.???Z'),
    completed_at TEXT CHECK (completed_at GLOB '????-??-??T??:??:??.???Z'),
    metadata     TEXT DEFAULT '{}' CHECK (metadata IS NULL OR json_valid(metadata))
) STRICT;

-- Bumps updated_at on every UPDATE that did not itself change updated_at.
-- The guard also stops the inner UPDATE from re-firing the trigger should
-- recursive_triggers ever be on. IS (not =) so a NULL updated_at is bumped too.
CREATE TRIGGER projects_set_updated_at
AFTER UPDATE ON projects
FOR EACH ROW WHEN old.updated_at IS new.updated_at
BEGIN
    UPDATE projects SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
    WHERE rowid = new.rowid;
END;

CREATE INDEX idx_projects_status     ON projects (status);
CREATE INDEX idx_projects_name       ON projects (name);
-- SQLite sorts NULL lowest, so DESC already puts NULL priorities last, like
-- the explicit NULLS LAST in the Postgres migration.
CREATE INDEX idx_projects_priority   ON projects (priority DESC);
CREATE INDEX idx_projects_created_at ON projects (created_at DESC);

-- ---------------------------------------------------------------------------
-- tasks
-- ---------------------------------------------------------------------------

CREATE TABLE tasks (
    id           TEXT NOT NULL PRIMARY KEY DEFAULT (lower(
                     hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' ||
                     substr(hex(randomblob(2)), 2) || '-' ||
                     substr('89ab', 1 + (random() & 3), 1) || substr(hex(randomblob(2)), 2) || '-' ||
                     hex(randomblob(6)))),
    -- Nullable as in the original (only task_updates.task_id was NOT NULL).
    project_id   TEXT REFERENCES projects (id) ON DELETE CASCADE,
    title        TEXT NOT NULL,
    description  TEXT,
    -- The original six plus `review` (output pull request awaiting merge).
    status       TEXT NOT NULL DEFAULT 'pending'
                 CONSTRAINT tasks_status_check
                 CHECK (status IN ('pending', 'in_progress', 'blocked', 'review',
                                   'completed', 'failed', 'cancelled')),
    -- An agent name or a role ('seed', 'cos'); set to the claiming agent's
    -- name at claim time. Deliberately not a foreign key (roles are not rows).
    assigned_to  TEXT,
    -- The original model states 0–100 for projects; tasks have the same range.
    priority     INTEGER DEFAULT 50
                 CONSTRAINT tasks_priority_check
                 CHECK (priority BETWEEN 0 AND 100),
    created_at   TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                 CHECK (created_at GLOB '????-??-??T??:??:??.???Z'),
    updated_at   TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                 CHECK (updated_at GLOB '????-??-??T??:??:??.???Z'),
    started_at   TEXT CHECK (started_at GLOB '????-??-??T??:??:??.???Z'),
    completed_at TEXT CHECK (completed_at GLOB '????-??-??T??:??:??.???Z'),
    result       TEXT CHECK (result IS NULL OR json_valid(result)),
    error        TEXT,
    metadata     TEXT DEFAULT '{}' CHECK (metadata IS NULL OR json_valid(metadata))
) STRICT;

CREATE TRIGGER tasks_set_updated_at
AFTER UPDATE ON tasks
FOR EACH ROW WHEN old.updated_at IS new.updated_at
BEGIN
    UPDATE tasks SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
    WHERE rowid = new.rowid;
END;

CREATE INDEX idx_tasks_project_id      ON tasks (project_id);
-- Serves every lookup by status as well (leading column), so there is no
-- separate single-column index on tasks.status.
CREATE INDEX idx_tasks_status_priority ON tasks (status, priority DESC);
-- GET /tasks?assigned_to= and the agent_activity join.
CREATE INDEX idx_tasks_assigned_to     ON tasks (assigned_to);
CREATE INDEX idx_tasks_created_at      ON tasks (created_at DESC);

-- ---------------------------------------------------------------------------
-- task_updates
-- ---------------------------------------------------------------------------

CREATE TABLE task_updates (
    id          TEXT NOT NULL PRIMARY KEY DEFAULT (lower(
                    hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' ||
                    substr(hex(randomblob(2)), 2) || '-' ||
                    substr('89ab', 1 + (random() & 3), 1) || substr(hex(randomblob(2)), 2) || '-' ||
                    hex(randomblob(6)))),
    task_id     TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    agent_name  TEXT NOT NULL,
    update_type TEXT NOT NULL
                CONSTRAINT task_updates_update_type_check
                CHECK (update_type IN ('progress', 'question', 'completion', 'error', 'info')),
    message     TEXT NOT NULL,
    created_at  TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                CHECK (created_at GLOB '????-??-??T??:??:??.???Z'),
    metadata    TEXT DEFAULT '{}' CHECK (metadata IS NULL OR json_valid(metadata))
) STRICT;

CREATE INDEX idx_task_updates_task_id     ON task_updates (task_id);
CREATE INDEX idx_task_updates_agent_name  ON task_updates (agent_name);
CREATE INDEX idx_task_updates_update_type ON task_updates (update_type);
CREATE INDEX idx_task_updates_created_at  ON task_updates (created_at DESC);

-- ---------------------------------------------------------------------------
-- agents
-- ---------------------------------------------------------------------------

CREATE TABLE agents (
    id             TEXT NOT NULL PRIMARY KEY DEFAULT (lower(
                       hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' ||
                       substr(hex(randomblob(2)), 2) || '-' ||
                       substr('89ab', 1 + (random() & 3), 1) || substr(hex(randomblob(2)), 2) || '-' ||
                       hex(randomblob(6)))),
    name           TEXT NOT NULL UNIQUE,   -- the unique index also serves name lookups
    type           TEXT NOT NULL
                   CONSTRAINT agents_type_check
                   CHECK (type IN ('cos', 'seed', 'specialist', 'meta')),
    status         TEXT NOT NULL DEFAULT 'idle'
                   CONSTRAINT agents_status_check
                   CHECK (status IN ('idle', 'busy', 'offline', 'error')),
    capabilities   TEXT DEFAULT '[]' CHECK (capabilities IS NULL OR json_valid(capabilities)),
    created_by     TEXT,                   -- the agent that created it
    created_at     TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                   CHECK (created_at GLOB '????-??-??T??:??:??.???Z'),
    last_active_at TEXT CHECK (last_active_at GLOB '????-??-??T??:??:??.???Z'),
    metadata       TEXT DEFAULT '{}' CHECK (metadata IS NULL OR json_valid(metadata))
) STRICT;

CREATE INDEX idx_agents_type       ON agents (type);
CREATE INDEX idx_agents_status     ON agents (status);
CREATE INDEX idx_agents_created_at ON agents (created_at DESC);

-- ---------------------------------------------------------------------------
-- events
-- ---------------------------------------------------------------------------

CREATE TABLE events (
    id           TEXT NOT NULL PRIMARY KEY DEFAULT (lower(
                     hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' ||
                     substr(hex(randomblob(2)), 2) || '-' ||
                     substr('89ab', 1 + (random() & 3), 1) || substr(hex(randomblob(2)), 2) || '-' ||
                     hex(randomblob(6)))),
    event_type   TEXT NOT NULL,            -- open set ('task.created', …): no CHECK
    source_agent TEXT,
    target_agent TEXT,
    payload      TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(payload)),
    created_at   TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                 CHECK (created_at GLOB '????-??-??T??:??:??.???Z'),
    processed_at TEXT CHECK (processed_at GLOB '????-??-??T??:??:??.???Z'),
    metadata     TEXT DEFAULT '{}' CHECK (metadata IS NULL OR json_valid(metadata))
) STRICT;

CREATE INDEX idx_events_event_type  ON events (event_type);
CREATE INDEX idx_events_created_at  ON events (created_at DESC);
CREATE INDEX idx_events_unprocessed ON events (created_at) WHERE processed_at IS NULL;

-- ---------------------------------------------------------------------------
-- artifacts
-- ---------------------------------------------------------------------------

CREATE TABLE artifacts (
    id            TEXT NOT NULL PRIMARY KEY DEFAULT (lower(
                      hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' ||
                      substr(hex(randomblob(2)), 2) || '-' ||
                      substr('89ab', 1 + (random() & 3), 1) || substr(hex(randomblob(2)), 2) || '-' ||
                      hex(randomblob(6)))),
    task_id       TEXT REFERENCES tasks (id) ON DELETE CASCADE,
    agent_name    TEXT NOT NULL,
    artifact_type TEXT NOT NULL
                  CONSTRAINT artifacts_artifact_type_check
                  CHECK (artifact_type IN ('code', 'document', 'image', 'data', 'log', 'other')),
    name          TEXT NOT NULL,
    s3_key        TEXT NOT NULL,           -- object-storage key
    size_bytes    INTEGER,
    mime_type     TEXT,
    created_at    TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                  CHECK (created_at GLOB '????-??-??T??:??:??.???Z'),
    metadata      TEXT DEFAULT '{}' CHECK (metadata IS NULL OR json_valid(metadata))
) STRICT;

CREATE INDEX idx_artifacts_task_id       ON artifacts (task_id);
CREATE INDEX idx_artifacts_agent_name    ON artifacts (agent_name);
CREATE INDEX idx_artifacts_artifact_type ON artifacts (artifact_type);
CREATE INDEX idx_artifacts_name          ON artifacts (name);
CREATE INDEX idx_artifacts_created_at    ON artifacts (created_at DESC);

-- ---------------------------------------------------------------------------
-- tools
-- ---------------------------------------------------------------------------

CREATE TABLE tools (
    id             TEXT NOT NULL PRIMARY KEY DEFAULT (lower(
                       hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' ||
                       substr(hex(randomblob(2)), 2) || '-' ||
                       substr('89ab', 1 + (random() & 3), 1) || substr(hex(randomblob(2)), 2) || '-' ||
                       hex(randomblob(6)))),
    name           TEXT NOT NULL UNIQUE,
    description    TEXT,
    created_by     TEXT NOT NULL,
    tool_type      TEXT NOT NULL
                   CONSTRAINT tools_tool_type_check
                   CHECK (tool_type IN ('function', 'api', 'script', 'service')),
    implementation TEXT NOT NULL CHECK (json_valid(implementation)),
    usage_count    INTEGER DEFAULT 0,
    created_at     TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                   CHECK (created_at GLOB '????-??-??T??:??:??.???Z'),
    last_used_at   TEXT CHECK (last_used_at GLOB '????-??-??T??:??:??.???Z'),
    metadata       TEXT DEFAULT '{}' CHECK (metadata IS NULL OR json_valid(metadata))
) STRICT;

CREATE INDEX idx_tools_tool_type  ON tools (tool_type);
CREATE INDEX idx_tools_created_at ON tools (created_at DESC);

-- ---------------------------------------------------------------------------
-- model_usage (one row per LLM call)
-- ---------------------------------------------------------------------------

CREATE TABLE model_usage (
    id                 TEXT NOT NULL PRIMARY KEY DEFAULT (lower(
                           hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' ||
                           substr(hex(randomblob(2)), 2) || '-' ||
                           substr('89ab', 1 + (random() & 3), 1) || substr(hex(randomblob(2)), 2) || '-' ||
                           hex(randomblob(6)))),
    agent_name         TEXT NOT NULL,
    model_name         TEXT NOT NULL,
    provider           TEXT NOT NULL,
    -- SET NULL, not CASCADE: spend stays on the books when a task is deleted.
    task_id            TEXT REFERENCES tasks (id) ON DELETE SET NULL,
    prompt_tokens      INTEGER,
    completion_tokens  INTEGER,
    total_tokens       INTEGER,
    estimated_cost_usd REAL,               -- numeric(10,6) in Postgres
    created_at         TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                       CHECK (created_at GLOB '????-??-??T??:??:??.???Z'),
    metadata           TEXT DEFAULT '{}' CHECK (metadata IS NULL OR json_valid(metadata))
) STRICT;

CREATE INDEX idx_model_usage_agent_name ON model_usage (agent_name);
CREATE INDEX idx_model_usage_model_name ON model_usage (model_name);
CREATE INDEX idx_model_usage_task_id    ON model_usage (task_id);
CREATE INDEX idx_model_usage_created_at ON model_usage (created_at DESC);

-- ---------------------------------------------------------------------------
-- views (same SQL text as Postgres)
-- ---------------------------------------------------------------------------

-- Every task column plus project_name and update_count, for open tasks
-- (`review` deliberately excluded, as in the original definition). SQLite
-- expands t.* each time the view is used, so the GitOps columns added by 0002
-- appear here automatically, in the same order as in Postgres.
CREATE VIEW active_tasks AS
SELECT t.*,
       p.name AS project_name,
       (SELECT count(*) FROM task_updates tu WHERE tu.task_id = t.id) AS update_count
FROM tasks t
LEFT JOIN projects p ON p.id = t.project_id
WHERE t.status IN ('pending', 'in_progress', 'blocked')
ORDER BY t.priority DESC NULLS LAST, t.created_at ASC;

-- Per agent; tasks are matched on assigned_to = agent name.
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
