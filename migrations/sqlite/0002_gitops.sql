-- 0002 — GitOps columns beside the original ones, and the sync_sources table.
-- SQLite dialect of migrations/postgres/0002_gitops.sql (same names, order,
-- constraint names and meaning; see that file for what each column holds).
-- Type mapping and the timestamp/JSON/STRICT rules are described at the top
-- of 0001_seed_schema.sql.
--
-- SQLite's ALTER TABLE adds one column per statement, and an added column
-- may only have a constant default (so no timestamp defaults here: none of
-- the added timestamp columns has one anyway). CHECK constraints on added
-- columns are verified against existing rows, which all take the defaults.

-- ---------------------------------------------------------------------------
-- projects
-- ---------------------------------------------------------------------------

ALTER TABLE projects ADD COLUMN title          TEXT;
ALTER TABLE projects ADD COLUMN owner          TEXT;  -- agent accountable for the project
ALTER TABLE projects ADD COLUMN labels         TEXT NOT NULL DEFAULT '{}'
    CONSTRAINT projects_labels_check CHECK (json_valid(labels) AND json_type(labels) = 'object');
ALTER TABLE projects ADD COLUMN suspend        INTEGER NOT NULL DEFAULT 0
    CHECK (suspend IN (0, 1));
ALTER TABLE projects ADD COLUMN source         TEXT;
ALTER TABLE projects ADD COLUMN path           TEXT;
ALTER TABLE projects ADD COLUMN revision       TEXT;
ALTER TABLE projects ADD COLUMN generation     INTEGER NOT NULL DEFAULT 0
    CONSTRAINT projects_generation_check CHECK (generation >= 0);
ALTER TABLE projects ADD COLUMN spec_hash      TEXT;
ALTER TABLE projects ADD COLUMN status_message TEXT;

-- Git-managed projects are unique by name; API-created rows (source NULL)
-- keep the original's freedom to repeat a name.
CREATE UNIQUE INDEX ux_projects_name_managed ON projects (name) WHERE source IS NOT NULL;

-- ---------------------------------------------------------------------------
-- tasks
-- ---------------------------------------------------------------------------

ALTER TABLE tasks ADD COLUMN name                TEXT;  -- the Git/CR name
ALTER TABLE tasks ADD COLUMN assignee            TEXT;  -- role or agent from the spec
ALTER TABLE tasks ADD COLUMN capabilities        TEXT NOT NULL DEFAULT '[]'
    CONSTRAINT tasks_capabilities_check
    CHECK (json_valid(capabilities) AND json_type(capabilities) = 'array');
ALTER TABLE tasks ADD COLUMN depends_on          TEXT NOT NULL DEFAULT '[]'  -- ["project/task", …]
    CONSTRAINT tasks_depends_on_check
    CHECK (json_valid(depends_on) AND json_type(depends_on) = 'array');
ALTER TABLE tasks ADD COLUMN action              TEXT CHECK (action IS NULL OR json_valid(action));
ALTER TABLE tasks ADD COLUMN output              TEXT CHECK (output IS NULL OR json_valid(output));
ALTER TABLE tasks ADD COLUMN acceptance_criteria TEXT NOT NULL DEFAULT '[]'
    CONSTRAINT tasks_acceptance_criteria_check
    CHECK (json_valid(acceptance_criteria) AND json_type(acceptance_criteria) = 'array');
ALTER TABLE tasks ADD COLUMN timeout_seconds     INTEGER
    CONSTRAINT tasks_timeout_seconds_check CHECK (timeout_seconds > 0);
ALTER TABLE tasks ADD COLUMN retries             INTEGER NOT NULL DEFAULT 2
    CONSTRAINT tasks_retries_check CHECK (retries >= 0);
ALTER TABLE tasks ADD COLUMN attempt             INTEGER NOT NULL DEFAULT 0
    CONSTRAINT tasks_attempt_check CHECK (attempt >= 0);
ALTER TABLE tasks ADD COLUMN lease_owner         TEXT;
ALTER TABLE tasks ADD COLUMN lease_expires_at    TEXT
    CHECK (lease_expires_at GLOB '????-??-??T??:??:??.???Z');
ALTER TABLE tasks ADD COLUMN run_lease           INTEGER NOT NULL DEFAULT 0  -- fencing token
    CONSTRAINT tasks_run_lease_check CHECK (run_lease >= 0);
ALTER TABLE tasks ADD COLUMN not_before          TEXT  -- retry backoff
    CHECK (not_before GLOB '????-??-??T??:??:??.???Z');
ALTER TABLE tasks ADD COLUMN dispatch_revision   TEXT;
ALTER TABLE tasks ADD COLUMN source              TEXT;
ALTER TABLE tasks ADD COLUMN path                TEXT;
ALTER TABLE tasks ADD COLUMN revision            TEXT;
ALTER TABLE tasks ADD COLUMN generation          INTEGER NOT NULL DEFAULT 0
    CONSTRAINT tasks_generation_check CHECK (generation >= 0);
ALTER TABLE tasks ADD COLUMN spec_hash           TEXT;
ALTER TABLE tasks ADD COLUMN status_message      TEXT;

CREATE UNIQUE INDEX ux_tasks_project_name ON tasks (project_id, name) WHERE name IS NOT NULL;

-- Dispatchable work: pending tasks by priority (NULL last, SQLite's natural
-- DESC order), oldest first. Serves
--   WHERE status = 'pending' ORDER BY priority DESC NULLS LAST, created_at
-- without a sort step (checked with EXPLAIN QUERY PLAN).
CREATE INDEX idx_tasks_dispatch ON tasks (priority DESC, created_at) WHERE status = 'pending';

-- ---------------------------------------------------------------------------
-- agents
-- ---------------------------------------------------------------------------

ALTER TABLE agents ADD COLUMN models         TEXT NOT NULL DEFAULT '[]'  -- tried in order
    CONSTRAINT agents_models_check CHECK (json_valid(models) AND json_type(models) = 'array');
ALTER TABLE agents ADD COLUMN concurrency    INTEGER NOT NULL DEFAULT 1
    CONSTRAINT agents_concurrency_check CHECK (concurrency >= 1);
ALTER TABLE agents ADD COLUMN instructions   TEXT;
ALTER TABLE agents ADD COLUMN source         TEXT;
ALTER TABLE agents ADD COLUMN path           TEXT;
ALTER TABLE agents ADD COLUMN revision       TEXT;
ALTER TABLE agents ADD COLUMN generation     INTEGER NOT NULL DEFAULT 0
    CONSTRAINT agents_generation_check CHECK (generation >= 0);
ALTER TABLE agents ADD COLUMN spec_hash      TEXT;
ALTER TABLE agents ADD COLUMN status_message TEXT;

-- ---------------------------------------------------------------------------
-- tools
-- ---------------------------------------------------------------------------

ALTER TABLE tools ADD COLUMN source         TEXT;
ALTER TABLE tools ADD COLUMN path           TEXT;
ALTER TABLE tools ADD COLUMN revision       TEXT;
ALTER TABLE tools ADD COLUMN generation     INTEGER NOT NULL DEFAULT 0
    CONSTRAINT tools_generation_check CHECK (generation >= 0);
ALTER TABLE tools ADD COLUMN spec_hash      TEXT;
ALTER TABLE tools ADD COLUMN status_message TEXT;

-- ---------------------------------------------------------------------------
-- sync_sources: one row per configured source, the sync cursor
-- ---------------------------------------------------------------------------

CREATE TABLE sync_sources (
    name      TEXT NOT NULL PRIMARY KEY,
    url       TEXT NOT NULL,
    branch    TEXT NOT NULL,
    path      TEXT NOT NULL DEFAULT '',   -- '' = repository root
    revision  TEXT,                       -- '<branch>@sha1:<commit>' last synced
    tree_oid  TEXT,                       -- base of the next incremental diff
    synced_at TEXT CHECK (synced_at GLOB '????-??-??T??:??:??.???Z'),
    errors    TEXT NOT NULL DEFAULT '[]'
              CONSTRAINT sync_sources_errors_check
              CHECK (json_valid(errors) AND json_type(errors) = 'array')
) STRICT;

-- ---------------------------------------------------------------------------
-- views
-- ---------------------------------------------------------------------------

-- Nothing to do: SQLite stores a view as SQL text and expands active_tasks'
-- `t.*` at each use, so it already returns the new task columns (in the same
-- order as the re-created Postgres view). The other two views name their
-- columns.
