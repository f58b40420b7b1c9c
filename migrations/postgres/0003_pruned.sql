-- 0003 — remember when an object left its source.
--
-- A pruned object keeps its rows and history (its status becomes cancelled,
-- or offline for an agent). pruned_at tells a prune apart from a person's
-- cancellation, so that an object that comes back to the source starts a new
-- life (pending again) instead of staying cancelled.
ALTER TABLE projects ADD COLUMN pruned_at timestamptz;
ALTER TABLE tasks    ADD COLUMN pruned_at timestamptz;
ALTER TABLE agents   ADD COLUMN pruned_at timestamptz;
ALTER TABLE tools    ADD COLUMN pruned_at timestamptz;

-- The reconciler loads its view of a source by these.
CREATE INDEX idx_projects_source ON projects (source) WHERE source IS NOT NULL;
CREATE INDEX idx_tasks_source    ON tasks (source)    WHERE source IS NOT NULL;
