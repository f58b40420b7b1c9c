-- Pending tasks by assignee, in claim order (see the Postgres twin).
CREATE INDEX idx_tasks_pending_assignee ON tasks (assignee, priority DESC, created_at)
    WHERE status = 'pending';

-- The tasks an agent holds. Every report of an agent asks whether it still holds any (to keep
-- its status busy or idle); without this that was a scan of every task, per agent, per batch.
CREATE INDEX idx_tasks_held ON tasks (lease_owner) WHERE status = 'in_progress';
